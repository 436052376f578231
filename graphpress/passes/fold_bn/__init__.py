"""fold_bn: BatchNorm and constant per-channel affine ops folded into conv/linear weights.

``match`` finds the foldable patterns, ``affine`` reads an op as a per-channel affine map,
``algebra`` folds the map into the neighbouring weight, ``fold_bn`` is the pass.
"""
