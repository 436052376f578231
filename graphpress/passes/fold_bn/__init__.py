"""fold_bn: BatchNorm and constant per-channel affine ops folded into conv/linear weights.

``match`` recognizes the layers (conv, transposed conv, linear), ``affine`` reads an op as a
per-channel affine map, ``algebra`` folds the map into the neighbouring weight, ``fold_bn`` is
the pass. Views, arguments and erasure come from :mod:`graphpress.ir.graph`.
"""
