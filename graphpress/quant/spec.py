"""What one quantized tensor looks like: :class:`QuantSpec`.

A spec fixes the storage type, the quantization grid and how tensors are blocked:

    q = clamp(round(x / scale) + zero_point, quant_min, quant_max)     (integers)
    q = clamp(x / scale, -max, max) cast to float8                     (fp8, no zero point)
    x_hat = (q - zero_point) * scale

``round`` is round-half-to-even, as in torch's fake-quant ops. One ``(scale, zero_point)`` pair
covers a block of the tensor; :meth:`QuantSpec.block_size` gives the block shape for a tensor of
a given shape (the block_size convention of the ``graphpress::*_affine`` ops: the qparams have
shape ``[s // b for s, b in zip(shape, block_size)]``):

* ``per_tensor``: one block, the whole tensor;
* ``per_channel``: one block per index of ``axis`` (weights: the output channel, axis 0);
* ``per_group``: blocks of ``group_size`` consecutive elements along the last dim (the input
  dim K of a linear weight ``[N, K]``), one per row and group;
* ``per_token``: one block per row of the last dim (activations ``[..., tokens, K]``).

Integer ranges: int8 [-128, 127] (symmetric narrow range [-127, 127] on request), uint8
[0, 255], int4 [-8, 7], uint4 [0, 15], int3 [-4, 3], uint3 [0, 7] (the 3- and 4-bit grids are
stored one value a byte in int8 / uint8). Symmetric specs have zero point 0 (unsigned symmetric
types are refused: their grid cannot hold negative values). fp8 ranges are the types' largest
finite values: e4m3fn 448, e5m2 57344.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["DTYPES", "GRANULARITIES", "OBSERVERS", "QuantSpec", "block_minmax",
           "weight_block_size"]

# name -> (quant_min, quant_max, storage dtype)
DTYPES: dict[str, tuple[float, float, torch.dtype]] = {
    "int8": (-128, 127, torch.int8),
    "uint8": (0, 255, torch.uint8),
    "int4": (-8, 7, torch.int8),
    "uint4": (0, 15, torch.uint8),
    "int3": (-4, 3, torch.int8),
    "uint3": (0, 7, torch.uint8),
    "float8_e4m3fn": (-448.0, 448.0, torch.float8_e4m3fn),
    "float8_e5m2": (-57344.0, 57344.0, torch.float8_e5m2),
}
GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")
OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "entropy")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized (see the module docstring)."""

    dtype: str = "int8"
    granularity: str = "per_tensor"
    axis: int = 0
    group_size: int | None = None
    symmetric: bool = True
    narrow_range: bool = False
    signed_scale: bool = False       # symmetric: the block's largest-magnitude value -> qmin
    dynamic: bool = False            # qparams computed in the graph on every call
    observer: str = "minmax"         # how static qparams are calibrated
    observer_args: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown quantized dtype {self.dtype!r}; known: "
                             f"{', '.join(DTYPES)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; known: "
                             f"{', '.join(GRANULARITIES)}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer {self.observer!r}; known: {', '.join(OBSERVERS)}")
        if self.granularity == "per_group":
            if self.group_size is None or self.group_size < 1:
                raise ValueError("per_group quantization needs group_size >= 1, got "
                                 f"{self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size is for per_group quantization, not {self.granularity}")
        if self.is_float and not self.symmetric:
            raise ValueError(f"{self.dtype} is scale-only: use symmetric=True")
        if self.symmetric and self.dtype.startswith("uint"):
            raise ValueError(f"{self.dtype} cannot be symmetric (no negative values); use "
                             f"{self.dtype[1:]} or symmetric=False")
        if self.narrow_range and (self.is_float or not self.symmetric):
            raise ValueError("narrow_range is for symmetric integer types")
        if self.signed_scale and (self.is_float or not self.symmetric or self.narrow_range):
            raise ValueError("signed_scale is for symmetric integer types without narrow_range")
        if self.signed_scale and (self.dynamic or self.observer != "minmax"):
            raise ValueError("signed_scale needs each block's signed extreme, which only static "
                             "min-max qparams keep: use observer='minmax' and dynamic=False")

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith("float8")

    @property
    def storage_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][2]

    def qrange(self) -> tuple[float, float]:
        """(quant_min, quant_max) of the grid."""
        low, high, _ = DTYPES[self.dtype]
        if self.narrow_range:
            low = -high
        return low, high

    def block_size(self, shape: tuple[int, ...] | torch.Size) -> list[int]:
        """The block shape for a tensor of ``shape`` (one qparam pair per block)."""
        shape = list(shape)
        if self.granularity == "per_tensor" or not shape:
            return shape
        if self.granularity == "per_channel":
            axis = self.axis % len(shape)
            return [1 if i == axis else s for i, s in enumerate(shape)]
        if self.granularity == "per_token":
            return [1] * (len(shape) - 1) + [shape[-1]]
        assert self.group_size is not None
        if shape[-1] % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide the last dim "
                             f"({shape[-1]}) of a tensor of shape {tuple(shape)}")
        return [1] * (len(shape) - 1) + [self.group_size]

    def describe(self) -> str:
        parts = [self.dtype, self.granularity]
        if self.group_size:
            parts.append(f"g{self.group_size}")
        parts.append(("sym signed" if self.signed_scale else "sym") if self.symmetric
                     else "asym")
        parts.append("dynamic" if self.dynamic else self.observer)
        return " ".join(parts)


def weight_block_size(spec: QuantSpec, shape: tuple[int, ...] | torch.Size, out_axis: int,
                      k_axis: int, where: str) -> list[int]:
    """The block shape of a layer's weight: one block per index of the output-channel axis
    ``out_axis`` (per channel), groups along the contracted axis ``k_axis`` (per group)."""
    shape = tuple(int(s) for s in shape)
    if spec.granularity == "per_tensor":
        return list(shape)
    if spec.granularity == "per_channel":
        return [1 if i == out_axis % len(shape) else s for i, s in enumerate(shape)]
    if spec.granularity == "per_group":
        assert spec.group_size is not None
        k = shape[k_axis]
        if k % spec.group_size:
            raise ValueError(f"group_size={spec.group_size} does not divide K={k} of {where} "
                             f"(weight shape {shape}); pick a group size that divides {k}, or "
                             "skip this layer")
        block = [1] * len(shape)
        block[k_axis] = spec.group_size
        return block
    raise ValueError(f"{spec.granularity} is not a weight granularity ({where}); use "
                     "per_tensor, per_channel or per_group")


def block_minmax(x: torch.Tensor, block_size: list[int] | tuple[int, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block min and max in float32, shaped ``[s // b for s, b in zip(shape, block_size)]``
    (the qparam shape)."""
    split: list[int] = []
    for size, block in zip(x.shape, block_size, strict=True):
        split += [size // block, block]
    blocks = x.detach().to(torch.float32).reshape(split)
    inner = tuple(range(1, 2 * x.dim(), 2))
    return blocks.amin(dim=inner), blocks.amax(dim=inner)
