"""The algebra of folding a per-channel affine map into a conv, transposed conv or linear weight.

A per-channel affine map is ``a(x)[c] = x[c] * s[c] + t[c]``. Eval-mode BatchNorm is one::

    BN(x) = (x - mean) / sqrt(var + eps) * gamma + beta
          = x * s + t,   s = gamma / sqrt(var + eps),   t = beta - mean * s

(``gamma = 1, beta = 0`` for ``affine=False``). A layer ``L(x) = W (*) x + b`` is linear in ``x``,
so an affine map on either side of it folds into its weights:

* after it (output side), per output channel ``o``:
  ``a(L(x)) = (W * s[o]) (*) x + (b * s + t)``;
* before it (input side), per input channel ``i``:
  ``L(a(x)) = (W * s[i]) (*) x + (b + sum over i and taps of W * t[i])``. The shift becomes a
  constant bias only when every output sums over every tap of real input: no zero padding, and
  not a transposed convolution (its border outputs see fewer taps). A pure scale has no such
  condition, since zero padding commutes with scaling.

Where the channel lives in the weight (``axis``):

* conv ``[C_out, C_in / g, *k]`` and linear ``[C_out, C_in]``: output channels on axis 0,
  input channels on axis 1;
* transposed conv ``[C_in, C_out / g, *k]``: input channels on axis 0, output channels on
  axis 1.

Axis 0 indexes channels directly. Axis 1 holds ``C / g`` channels of each of the ``g`` groups,
and row ``r`` belongs to group ``r // (rows / g)``, so channel ``(r // (rows / g)) * cols + j``
scales entry ``[r, j]``. Everything is computed in float64 and cast back to the weight's dtype,
so the only rounding left is that of storing the folded weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["batchnorm_affine", "channels", "fold_input", "fold_output"]

Tensor = torch.Tensor


def batchnorm_affine(weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                     eps: float) -> tuple[Tensor, Tensor]:
    """Scale and shift (float64) of an eval-mode BatchNorm: ``BN(x) = x * s + t``."""
    inv_std = 1.0 / torch.sqrt(var.double() + eps)
    scale = inv_std if weight is None else weight.double() * inv_std
    shift = -mean.double() * scale
    if bias is not None:
        shift = shift + bias.double()
    return scale, shift


def channels(shape: Sequence[int], axis: int, groups: int) -> int:
    """Number of channels a weight of ``shape`` has along ``axis`` (0 or 1, see the docstring)."""
    return shape[0] if axis == 0 else shape[1] * groups


def _along(vector: Tensor, shape: Sequence[int], axis: int, groups: int) -> Tensor:
    """``vector`` (one value per channel, or one value for all) shaped to broadcast against a
    weight of ``shape`` so that each entry meets the value of its channel on ``axis``."""
    count = channels(shape, axis, groups)
    vector = vector.reshape(-1).expand(count)
    taps = [1] * (len(shape) - 2)
    if axis == 0:
        return vector.reshape(shape[0], 1, *taps)
    rows = shape[0] // groups
    per_row = vector.reshape(groups, 1, shape[1]).expand(groups, rows, shape[1])
    return per_row.reshape(shape[0], shape[1], *taps)


def fold_output(weight: Tensor, bias: Tensor | None, scale: Tensor | None,
                shift: Tensor | None, axis: int, groups: int) -> tuple[Tensor, Tensor | None]:
    """Weight and bias of ``a(L(x))``; output channels on weight ``axis``. The bias stays None
    when there was none and there is no shift."""
    count = channels(weight.shape, axis, groups)
    new_weight = weight
    if scale is not None:
        new_weight = (weight.double() * _along(scale, weight.shape, axis, groups)).to(weight.dtype)
    if bias is None and shift is None:
        return new_weight, None
    new_bias = (torch.zeros(count, dtype=torch.float64) if bias is None else bias.double())
    if scale is not None:
        new_bias = new_bias * scale.reshape(-1).expand(count)
    if shift is not None:
        new_bias = new_bias + shift.reshape(-1).expand(count)
    return new_weight, new_bias.to(weight.dtype if bias is None else bias.dtype)


def fold_input(weight: Tensor, bias: Tensor | None, scale: Tensor | None,
               shift: Tensor | None, axis: int, groups: int) -> tuple[Tensor, Tensor | None]:
    """Weight and bias of ``L(a(x))``; input channels on weight ``axis``. A shift needs output
    channels on axis 0 (conv, linear): the caller refuses it for transposed convolutions."""
    new_weight = weight
    if scale is not None:
        new_weight = (weight.double() * _along(scale, weight.shape, axis, groups)).to(weight.dtype)
    if shift is None:
        return new_weight, bias
    if axis != 1:
        raise ValueError("an input-side shift folds only into conv/linear (input channels on "
                         "axis 1), not into a transposed convolution")
    taps = (weight.double() * _along(shift, weight.shape, 1, groups)).sum(
        dim=tuple(range(1, weight.ndim)))
    new_bias = taps if bias is None else bias.double() + taps
    return new_weight, new_bias.to(weight.dtype if bias is None else bias.dtype)
