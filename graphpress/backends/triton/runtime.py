"""What generated Triton modules call at run time, so their source stays about the program:
operand strides in an iteration shape, block sizes from the shapes, matmul tile configurations,
and the Triton implementations of graphpress ops (the op registry's ``triton_lowering``).

Under ``TRITON_INTERPRET=1`` (CPU tensors) blocks are large, as every program instance costs
interpreter time; on a GPU they are the usual register-sized tiles and matmuls autotune over a
small list.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton

from graphpress.errors import BackendError
from graphpress.ops.registry import lookup

__all__ = ["attention_blocks", "attention_scale", "channels", "dense", "interpreting",
           "matmul_configs", "matmul_grid", "pointwise_block", "prune_matmul_configs",
           "row_block", "strides", "triton_lowering"]


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def strides(tensor: torch.Tensor, shape: Sequence[int]) -> tuple[int, ...]:
    """The strides that address ``tensor`` broadcast to ``shape`` (0 along broadcast dims)."""
    return tensor.expand(tuple(shape)).stride()


def channels(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """A per-channel ``[C]`` tensor as ``[C, 1, ...]``, broadcasting along dim 1 of a rank-``rank``
    tensor (batch norm's layout)."""
    return tensor.reshape(-1, *([1] * (rank - 2)))


def dense(tensor: torch.Tensor, shape: Sequence[int]) -> bool:
    """Whether ``tensor`` has ``shape`` and is contiguous (read at the flat index)."""
    return tuple(tensor.shape) == tuple(shape) and tensor.is_contiguous()


def pointwise_block(numel: int) -> int:
    cap = 1 << 16 if interpreting() else 1024
    return min(cap, max(16, triton.next_power_of_2(max(numel, 1))))


def row_block(rows: int, block_n: int) -> int:
    """Rows per program: a tile of at most 4096 elements (65536 in the interpreter)."""
    tile = 1 << 16 if interpreting() else 4096
    return max(1, min(triton.next_power_of_2(max(rows, 1)), tile // block_n))


_INTERPRETER_TILES = (16, 32, 64, 128)


def _fit(size: int, cap: int = 128) -> int:
    return min(max(triton.next_power_of_2(max(size, 1)), 16), cap)


def matmul_configs() -> list[triton.Config]:
    """Tile configurations: on a GPU a small autotune list; in the interpreter every power-of-two
    tile, of which :func:`prune_matmul_configs` keeps the one that fits the shapes (the
    interpreter's ``tl.dot`` costs in proportion to the padded tile)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k})
                for m in _INTERPRETER_TILES for n in _INTERPRETER_TILES
                for k in _INTERPRETER_TILES]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in ((128, 128, 32, 8, 3), (64, 128, 32, 4, 4),
                                  (128, 64, 32, 4, 4), (64, 64, 64, 4, 3), (32, 64, 32, 4, 4),
                                  (16, 64, 64, 4, 4))]


def prune_matmul_configs(configs: list[triton.Config], named_args: dict[str, Any],
                         **_: Any) -> list[triton.Config]:
    """The configurations worth timing for these ``M, N, K``: in the interpreter the one
    fitting tile; on a GPU those whose ``BLOCK_M`` does not exceed ``M`` by more than 16."""
    m, n, k = named_args["M"], named_args["N"], named_args["K"]
    if interpreting():
        want = (_fit(m), _fit(n), _fit(k))
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) == want]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))]
    return kept or configs


def matmul_grid(m: int, n: int, batch: int) -> Callable[[dict[str, Any]], tuple[int, int, int]]:
    def grid(meta: dict[str, Any]) -> tuple[int, int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), batch)

    return grid


def attention_scale(scale: float | None, head_dim: int) -> float:
    """SDPA's scale: the given one, else ``1 / sqrt(head_dim)``."""
    return scale if scale is not None else head_dim ** -0.5


def attention_blocks(queries: int, keys: int, head_dim: int, value_dim: int) -> dict[str, int]:
    """Tiles of the attention kernel: query and key blocks, padded head dims (>= 16 for
    ``tl.dot``); in the interpreter the blocks that fit the sequence lengths."""
    if interpreting():
        block_m, block_n = _fit(queries), _fit(keys)
    else:
        block_m, block_n = (64, 64) if max(head_dim, value_dim) > 64 else (128, 64)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_E": _fit(head_dim, 256),
            "BLOCK_EV": _fit(value_dim, 256)}


def triton_lowering(name: str) -> Callable[..., Any]:
    """The Triton implementation of the graphpress op ``name`` (``namespace::op``)."""
    entry = lookup(name)
    if entry is None or entry.triton_lowering is None:
        raise BackendError(f"the graphpress op {name} has no Triton implementation")
    return entry.triton_lowering
