"""Ops defined through the registry for its tests (namespace ``gptest``); importing this module
defines them, as importing a plugin's op library would."""

from __future__ import annotations

import torch
from onnxscript import opset18 as op
from onnxscript.onnx_types import TensorType

from graphpress.ops import define_op


def _scale_add(x: torch.Tensor, s: float) -> torch.Tensor:
    """x * s + 1."""
    return x * s + 1


def _scale_add_fake(x: torch.Tensor, s: float) -> torch.Tensor:
    return torch.empty_like(x)


def _scale_add_onnx(x: TensorType, s: float) -> TensorType:
    scale = op.CastLike(op.Constant(value_float=s), x)
    return op.Add(op.Mul(x, scale), op.CastLike(op.Constant(value_float=1.0), x))


SCALE_ADD = define_op("gptest::scale_add", _scale_add, fake=_scale_add_fake,
                      onnx_translation=_scale_add_onnx)


def _opaque_scale(x: torch.Tensor, s: float) -> torch.Tensor:
    """x * s, pure but never evaluated ahead of time (as fake-quant must not be)."""
    return x * s


OPAQUE_SCALE = define_op("gptest::opaque_scale", _opaque_scale, fake=_scale_add_fake,
                         foldable=False)


def _logged(x: torch.Tensor) -> torch.Tensor:
    """x + 0, declared with an effect: never deleted or merged."""
    return x.clone()


LOGGED = define_op("gptest::logged", _logged, fake=torch.empty_like, pure=False,
                   foldable=False)
