"""The ``graphpress::`` op library: ops that passes introduce, one registry entry per op.

Today the package holds the registry only (:mod:`graphpress.ops.registry`); the first product
ops (quantize / dequantize) come with the quantization passes. Plugins define their own ops
through the same registry (:func:`define_op`), in their own namespace.
"""

from graphpress.ops.registry import OpEntry, check_op, define_op, entries, lookup

__all__ = ["OpEntry", "check_op", "define_op", "entries", "lookup"]
