"""Fusion passes: ``fuse_dequant_matmul`` (matmuls on fake-quantized weights become matmuls on
packed integer weights, docs/passes/fuse_dequant_matmul.md)."""

from graphpress.passes.fusion.fuse_dequant_matmul import FuseDequantMatmul

__all__ = ["FuseDequantMatmul"]
