"""The ``graphpress::`` op library: ops that passes introduce, one registry entry per op.

:mod:`graphpress.ops.registry` defines ops (:func:`define_op`) and keeps their entries;
:mod:`graphpress.ops.quant` holds the affine quantization family (``quantize_affine``,
``dequantize_affine``, ``fake_quantize_affine``, ``choose_qparams_affine``; docs/ops/quant.md);
:mod:`graphpress.ops.dequant_matmul` the matmuls on packed weights (``dequant_matmul``,
``dynamic_quant_matmul``) in the formats of :mod:`graphpress.ops.packing`
(docs/ops/packed_formats.md).
Importing this package defines them. Plugins define their own ops through the same registry, in
their own namespace.
"""

from graphpress.ops import dequant_matmul, packing, quant
from graphpress.ops.registry import OpEntry, check_op, define_op, entries, lookup

__all__ = ["OpEntry", "check_op", "define_op", "dequant_matmul", "entries", "lookup", "packing",
           "quant"]
