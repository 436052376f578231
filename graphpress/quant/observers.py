"""Observers: the statistics that fix static qparams, exactly mergeable across processes.

An observer is made for one :class:`QuantSpec` and one tensor shape (:func:`make_observer`).
It sees tensors with :meth:`Observer.update`, reduces each to one statistic per block (the
block_size convention of the quant ops: qparams of shape ``[s // b for s, b in zip(shape,
block_size)]``; a per-tensor activation may change its batch size between updates) and turns
the statistics into a clipping range ``[lo, hi]`` per block (:meth:`Observer.ranges`), then into
``(scale, zero_point)`` with the one qparams formula, ``graphpress.ops.quant.qparams_from_minmax``
(:meth:`Observer.qparams`; zero_point is None for symmetric and float8 specs). All statistics are
float32 (values are observed in float32) or int64 counts; all are deterministic.

* ``minmax``: ``lo = min x``, ``hi = max x`` over everything seen.
* ``moving_average``: per update (batch) ``b`` the block minimum ``m_b`` and maximum ``M_b``;
  ``lo_1 = m_1``, ``lo_b = lo_{b-1} + c (m_b - lo_{b-1})`` (likewise ``hi``), ``c`` =
  ``observer_args["averaging_constant"]`` (default 0.01), torch's MovingAverageMinMaxObserver.
  The average depends on the order of the batches, so the observer keeps the per-batch minima
  and maxima and averages them when asked: merging concatenates the sequences (``a`` then
  ``b``) and the result is bit-identical to one observer that saw ``a``'s batches then ``b``'s.
* ``percentile`` (``observer_args["percentile"]`` = p, default 99.999), ``mse`` and ``entropy``
  read a histogram (below). percentile: asymmetric ``lo, hi`` = the ``1 - p/100`` and ``p/100``
  quantiles of ``x``; symmetric ``hi = -lo`` = the ``p/100`` quantile of ``|x|``; quantiles
  interpolate linearly inside a bin.
* ``mse``: candidates ``[k/S lo0, k/S hi0]`` for ``k = 1..S`` (``S`` =
  ``observer_args["steps"]``, default 100; ``[lo0, hi0]`` the min-max range, widened to 0), each
  scored by ``sum_j n_j (c_j - fq(c_j))^2`` over bin centers ``c_j`` with counts ``n_j``, ``fq``
  the graphpress fake-quantize with that candidate's qparams; the smallest error wins (the
  smallest ``k`` on ties).
* ``entropy`` (TensorRT's calibration): on the histogram of ``|x|`` (of the one side the data
  has, when it has one), for each threshold ``t`` bins from ``L`` to all: ``P`` = the first ``t``
  bins with the mass beyond added to the last, ``Q`` = ``P`` merged into ``L`` equal chunks (the
  last takes the remainder) and spread back evenly over each chunk's non-empty bins; the ``t``
  minimizing ``KL(P || Q) = sum P log(P / Q) / N`` gives the threshold ``T = t w``, clipped to
  the data. ``L`` is the number of grid steps covering ``[0, T]``: ``(qmax - qmin + 1) / 2``,
  or ``qmax - qmin + 1`` for an asymmetric spec on one-signed data. Integer dtypes only.

**The histogram** (exact to merge). A block's values are binned on a grid fixed by a power of
two: with ``B`` bins per side (``observer_args["bins"]``, a power of two, default
``min(2048, next_pow2(block elements))``, at least ``next_pow2(L)`` for entropy) and ``2^e`` the
smallest power of two above the block's ``max |x|`` seen so far, bin ``j = floor(x B / 2^e)``
in ``[-B, B)``, width ``w = 2^e / B``. ``x B / 2^e`` is exact in float64, so the bin of a value
depends only on the final ``e``. When ``e`` grows by ``s`` the counts move to bin ``j >> s``
(``floor(j / 2^s)``, also exact): the histogram after any sequence of updates and merges is the
one a single pass over all the data with the final ``e`` gives. Merging takes the larger ``e``,
moves both and adds the counts. Resolution: ``w <= max|x| / (B / 2)``; the exact min and max
are kept too, so no range exceeds the data's.

**Distributed** (:meth:`Observer.all_reduce`): minima and maxima are all-reduced with MIN and
MAX, histogram exponents with MAX and then the moved counts with SUM (integers: exact), and the
moving average's per-batch sequences are all-gathered and concatenated in rank order. Every
rank then holds the statistics one process gets from rank 0's batches, then rank 1's, ..., so
the qparams are identical, not merely close.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.distributed as dist

from graphpress.errors import InputError
from graphpress.ops.quant import fake_quantize_affine, qparam_shape, qparams_from_minmax
from graphpress.quant.spec import QuantSpec

__all__ = ["EntropyObserver", "MSEObserver", "MinMaxObserver", "MovingAverageObserver",
           "Observer", "PercentileObserver", "make_observer"]

_EPS = float(torch.finfo(torch.float32).eps)
_EMPTY = -(2 ** 20)        # histogram exponent of a block that has seen only zeros (or nothing)


class Observer(ABC):
    """Statistics of the values of one quantized tensor; see the module docstring."""

    kind = ""
    options: tuple[str, ...] = ("eps",)

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...]) -> None:
        if spec.dynamic:
            raise ValueError(f"{spec.describe()} is dynamic: its qparams are computed in the "
                             "graph on every call, so it has no observer")
        unknown = sorted(set(spec.observer_args) - set(self.options))
        if unknown:
            raise ValueError(f"observer {self.kind!r} does not take {unknown}; it accepts: "
                             f"{', '.join(self.options)}")
        self.spec = spec
        self.shape = tuple(int(s) for s in shape)
        self.qshape = tuple(int(s) for s in qparam_shape(self.shape,
                                                         spec.block_size(self.shape)))
        self.nblocks = math.prod(self.qshape)
        self.block_numel = math.prod(self.shape) // max(self.nblocks, 1)
        self.eps = float(spec.observer_args.get("eps", _EPS))

    # -- the interface -------------------------------------------------------------------

    def update(self, x: torch.Tensor) -> None:
        """Observe one tensor (an empty one changes nothing)."""
        blocks = self._blocks(x)
        if blocks is not None:
            self._update(blocks)

    def ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` per block (qparam shape): the range the qparams cover."""
        self._check_seen()
        lo, hi = self._ranges()
        return lo.reshape(self.qshape), hi.reshape(self.qshape)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale, zero_point)`` of the qparam shape; zero_point None when symmetric or fp8."""
        lo, hi = self.ranges()
        quant_min, quant_max = self.spec.qrange()
        scale, zero_point = qparams_from_minmax(lo, hi, quant_min, quant_max,
                                                self.spec.symmetric, self.spec.dtype, self.eps,
                                                signed_scale=self.spec.signed_scale)
        return scale, None if self.spec.symmetric or self.spec.is_float else zero_point

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """The statistics, as tensors (``load_state`` takes them back)."""

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state())
        if set(state) != expected:
            raise ValueError(f"a {self.kind} observer's state has the keys {sorted(expected)}, "
                             f"got {sorted(state)}")
        self._load(state)

    def merge(self, other: Observer) -> Observer:
        """Add ``other``'s statistics (as if this observer had then seen its data); returns
        self."""
        if (type(other) is not type(self) or other.spec != self.spec
                or other.qshape != self.qshape or other.options_key() != self.options_key()):
            raise ValueError(f"cannot merge a {other.kind} observer ({other.spec.describe()}, "
                             f"qparams {other.qshape}) into a {self.kind} observer "
                             f"({self.spec.describe()}, qparams {self.qshape}): only observers "
                             "made by make_observer from the same spec and shape merge")
        self._merge(other)
        return self

    @abstractmethod
    def all_reduce(self, group: Any = None) -> None:
        """Combine the statistics of every rank of ``group`` (collective: every rank calls
        it, in the same order for every observer)."""

    def options_key(self) -> tuple[Any, ...]:
        return tuple(sorted((k, repr(v)) for k, v in self.spec.observer_args.items()))

    # -- helpers -------------------------------------------------------------------------

    def _blocks(self, x: Any) -> torch.Tensor | None:
        """``x`` as float32 ``[blocks, elements per block]``, or None when empty."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"an observer ({self.spec.describe()}) observes tensors, got "
                             f"{type(x).__name__}")
        if x.numel() == 0:
            return None
        if x.dim() != len(self.shape):
            raise InputError(f"an observer made for shape {self.shape} got a tensor of shape "
                             f"{tuple(x.shape)}; make one observer per tensor shape")
        block = self.spec.block_size(tuple(x.shape))
        qshape = tuple(s // b for s, b in zip(x.shape, block))
        if qshape != self.qshape:
            raise InputError(f"an observer made for shape {self.shape} ({self.spec.describe()}, "
                             f"qparams {self.qshape}) got a tensor of shape {tuple(x.shape)}, "
                             f"whose qparams would have shape {qshape}; only dimensions inside "
                             "one block (the batch of a per-tensor spec) may change")
        x = x.detach().to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"an observer ({self.spec.describe()}) got non-finite values "
                             "(inf or nan): the data or the model produces them; quantization "
                             "needs finite ranges")
        split: list[int] = []
        for size, b in zip(x.shape, block):
            split += [size // b, b]
        rank = len(block)
        order = [2 * i for i in range(rank)] + [2 * i + 1 for i in range(rank)]
        return x.reshape(split).permute(order).reshape(self.nblocks, -1)

    def _check_seen(self) -> None:
        if not self._seen():
            raise ValueError(f"the {self.kind} observer ({self.spec.describe()}) has seen no "
                             "data: calibrate it (calibration_data) before asking for qparams")

    @abstractmethod
    def _update(self, blocks: torch.Tensor) -> None:
        ...

    @abstractmethod
    def _ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    @abstractmethod
    def _seen(self) -> bool:
        ...

    @abstractmethod
    def _load(self, state: dict[str, torch.Tensor]) -> None:
        ...

    @abstractmethod
    def _merge(self, other: Any) -> None:
        ...


def _collective_device(group: Any) -> torch.device:
    """Where collective tensors must live for ``group``'s backend (NCCL: the current GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    moved = tensor.to(_collective_device(group)).contiguous()
    dist.all_reduce(moved, op=op, group=group)
    return moved.to(tensor.device)


class _RangeStats:
    """Exact per-block min and max (shared by min-max and the histogram observers)."""

    def __init__(self, nblocks: int) -> None:
        self.min_val = torch.full((nblocks,), math.inf)
        self.max_val = torch.full((nblocks,), -math.inf)

    def update(self, blocks: torch.Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, blocks.amin(dim=1).cpu())
        self.max_val = torch.maximum(self.max_val, blocks.amax(dim=1).cpu())

    def merge(self, other: _RangeStats) -> None:
        self.min_val = torch.minimum(self.min_val, other.min_val)
        self.max_val = torch.maximum(self.max_val, other.max_val)

    def all_reduce(self, group: Any) -> None:
        self.min_val = _all_reduce(self.min_val, dist.ReduceOp.MIN, group)
        self.max_val = _all_reduce(self.max_val, dist.ReduceOp.MAX, group)

    def seen(self) -> bool:
        return bool(torch.isfinite(self.min_val).all())


class MinMaxObserver(Observer):
    """``[min x, max x]`` over all the data."""

    kind = "minmax"

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...]) -> None:
        super().__init__(spec, shape)
        self.stats = _RangeStats(self.nblocks)

    def _update(self, blocks: torch.Tensor) -> None:
        self.stats.update(blocks)

    def _ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stats.min_val, self.stats.max_val

    def _seen(self) -> bool:
        return self.stats.seen()

    def state(self) -> dict[str, torch.Tensor]:
        return {"min_val": self.stats.min_val.clone(), "max_val": self.stats.max_val.clone()}

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        self.stats.min_val = state["min_val"].to(torch.float32).reshape(self.nblocks).clone()
        self.stats.max_val = state["max_val"].to(torch.float32).reshape(self.nblocks).clone()

    def _merge(self, other: MinMaxObserver) -> None:
        self.stats.merge(other.stats)

    def all_reduce(self, group: Any = None) -> None:
        self.stats.all_reduce(group)


class MovingAverageObserver(Observer):
    """Exponential moving average of the per-batch min and max (order: the batches')."""

    kind = "moving_average"
    options = ("eps", "averaging_constant")

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...]) -> None:
        super().__init__(spec, shape)
        self.averaging_constant = float(spec.observer_args.get("averaging_constant", 0.01))
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError("moving_average needs 0 < averaging_constant <= 1, got "
                             f"{self.averaging_constant}")
        self.batch_min = torch.empty((0, self.nblocks))
        self.batch_max = torch.empty((0, self.nblocks))

    def _update(self, blocks: torch.Tensor) -> None:
        self.batch_min = torch.cat([self.batch_min, blocks.amin(dim=1).cpu()[None]])
        self.batch_max = torch.cat([self.batch_max, blocks.amax(dim=1).cpu()[None]])

    def _ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.averaging_constant
        lo, hi = self.batch_min[0].clone(), self.batch_max[0].clone()
        for m, big_m in zip(self.batch_min[1:], self.batch_max[1:]):
            lo = lo + c * (m - lo)
            hi = hi + c * (big_m - hi)
        return lo, hi

    def _seen(self) -> bool:
        return self.batch_min.shape[0] > 0

    def state(self) -> dict[str, torch.Tensor]:
        return {"batch_min": self.batch_min.clone(), "batch_max": self.batch_max.clone()}

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        self.batch_min = state["batch_min"].to(torch.float32).reshape(-1, self.nblocks).clone()
        self.batch_max = state["batch_max"].to(torch.float32).reshape(-1, self.nblocks).clone()

    def _merge(self, other: MovingAverageObserver) -> None:
        self.batch_min = torch.cat([self.batch_min, other.batch_min])
        self.batch_max = torch.cat([self.batch_max, other.batch_max])

    def all_reduce(self, group: Any = None) -> None:
        device = _collective_device(group)
        world = dist.get_world_size(group)
        count = torch.tensor([self.batch_min.shape[0]], device=device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        longest = int(max(c.item() for c in counts))
        gathered = []
        for local in (self.batch_min, self.batch_max):
            padded = torch.zeros((longest, self.nblocks), device=device)
            padded[: local.shape[0]] = local.to(device)
            parts = [torch.zeros_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded, group=group)
            gathered.append(torch.cat([p[: int(c.item())].cpu() for p, c in zip(parts, counts)]))
        self.batch_min, self.batch_max = gathered


class _HistogramObserver(Observer):
    """The power-of-two histogram of the module docstring, with the exact min and max."""

    options = ("eps", "bins")

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...]) -> None:
        super().__init__(spec, shape)
        bins = spec.observer_args.get("bins", self._default_bins())
        if not isinstance(bins, int) or bins < 2 or bins & (bins - 1):
            raise ValueError(f"observer {self.kind!r}: bins (per side) must be a power of two "
                             f">= 2, got {bins!r}")
        self.bins = bins
        self.log2_bins = bins.bit_length() - 1
        self.stats = _RangeStats(self.nblocks)
        self.exponent = torch.full((self.nblocks,), _EMPTY, dtype=torch.int64)
        self.counts = torch.zeros((self.nblocks, 2 * bins), dtype=torch.int64)

    def _default_bins(self) -> int:
        return min(2048, _next_pow2(self.block_numel))

    def options_key(self) -> tuple[Any, ...]:
        return (*super().options_key(), self.bins)

    # statistics

    def _update(self, blocks: torch.Tensor) -> None:
        self.stats.update(blocks)
        absmax = blocks.abs().amax(dim=1)
        _, exp = torch.frexp(absmax)
        batch_exponent = torch.where(absmax > 0, exp.to(torch.int64),
                                     torch.full_like(absmax, _EMPTY, dtype=torch.int64)).cpu()
        exponent = torch.maximum(self.exponent, batch_exponent)
        self.counts = self._moved(self.counts, self.exponent, exponent)
        self.exponent = exponent
        # blocks of zeros bin at 0 whatever the factor: give them a finite one
        factor = torch.exp2((self.log2_bins - exponent.clamp(min=-200)).to(torch.float64))
        index = torch.floor(blocks.to(torch.float64) * factor.to(blocks.device)[:, None])
        index = index.to(torch.int64) + self.bins
        offsets = torch.arange(self.nblocks, device=blocks.device)[:, None] * (2 * self.bins)
        found = torch.bincount((index + offsets).flatten(), minlength=self.nblocks * 2 * self.bins)
        self.counts = self.counts + found.reshape(self.nblocks, 2 * self.bins).cpu()

    def _moved(self, counts: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``counts`` binned for exponents ``old`` moved to the coarser grid of ``new``."""
        shift = (new - old).clamp(min=0, max=62)
        if not bool((shift > 0).any()):
            return counts
        offset = torch.arange(-self.bins, self.bins)[None, :]
        target = torch.bitwise_right_shift(offset, shift[:, None]) + self.bins
        return torch.zeros_like(counts).scatter_add_(1, target, counts)

    def _seen(self) -> bool:
        return self.stats.seen()

    def state(self) -> dict[str, torch.Tensor]:
        return {"min_val": self.stats.min_val.clone(), "max_val": self.stats.max_val.clone(),
                "exponent": self.exponent.clone(), "counts": self.counts.clone()}

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["counts"].shape) != (self.nblocks, 2 * self.bins):
            raise ValueError(f"histogram counts of shape {tuple(state['counts'].shape)} do not "
                             f"fit this observer ({self.nblocks} blocks, {self.bins} bins per "
                             "side)")
        self.stats.min_val = state["min_val"].to(torch.float32).reshape(self.nblocks).clone()
        self.stats.max_val = state["max_val"].to(torch.float32).reshape(self.nblocks).clone()
        self.exponent = state["exponent"].to(torch.int64).reshape(self.nblocks).clone()
        self.counts = state["counts"].to(torch.int64).clone()

    def _merge(self, other: _HistogramObserver) -> None:
        self.stats.merge(other.stats)
        exponent = torch.maximum(self.exponent, other.exponent)
        self.counts = (self._moved(self.counts, self.exponent, exponent)
                       + self._moved(other.counts, other.exponent, exponent))
        self.exponent = exponent

    def all_reduce(self, group: Any = None) -> None:
        self.stats.all_reduce(group)
        exponent = _all_reduce(self.exponent, dist.ReduceOp.MAX, group)
        moved = self._moved(self.counts, self.exponent, exponent)
        self.counts = _all_reduce(moved, dist.ReduceOp.SUM, group)
        self.exponent = exponent

    # reading the histogram

    def _width(self) -> torch.Tensor:
        """Bin width per block (float64); blocks of zeros get 2^-200 (their bins are empty
        beyond bin 0)."""
        return torch.exp2((self.exponent.clamp(min=-200) - self.log2_bins).to(torch.float64))

    def _one_sided(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Histograms of ``|x|`` in ``B`` bins, for ``x >= 0`` and for ``x < 0`` (bin ``j`` of
        the negative side holds ``x`` in ``[-(j + 1) w, -j w)``)."""
        positive = self.counts[:, self.bins:]
        negative = self.counts[:, : self.bins].flip(1)
        return positive, negative

    def _clip(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.maximum(lo.to(torch.float32), self.stats.min_val)
        hi = torch.minimum(hi.to(torch.float32), self.stats.max_val)
        return lo, torch.maximum(hi, lo)

    def _symmetric_clip(self, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._clip(-amax, amax)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


def _quantile(counts: torch.Tensor, left: torch.Tensor, width: torch.Tensor,
              q: float) -> torch.Tensor:
    """The ``q`` quantile per row of a histogram (bin ``j`` = ``[left + j w, left + (j+1) w)``),
    interpolated linearly inside the bin (float64)."""
    cumulative = counts.cumsum(dim=1).to(torch.float64)
    target = q * cumulative[:, -1:]
    index = torch.searchsorted(cumulative, target).clamp(max=counts.shape[1] - 1)
    before = torch.where(index > 0, cumulative.gather(1, (index - 1).clamp(min=0)),
                         torch.zeros_like(target))
    inside = counts.gather(1, index).to(torch.float64).clamp(min=1)
    fraction = ((target - before) / inside).clamp(0, 1)
    return (left[:, None] + (index + fraction) * width[:, None])[:, 0]


class PercentileObserver(_HistogramObserver):
    """Clip to the ``percentile`` quantiles (see the module docstring)."""

    kind = "percentile"
    options = ("eps", "bins", "percentile")

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...]) -> None:
        super().__init__(spec, shape)
        self.percentile = float(spec.observer_args.get("percentile", 99.999))
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    def _ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.percentile / 100.0
        width = self._width()
        if self.spec.symmetric:
            positive, negative = self._one_sided()
            amax = _quantile(positive + negative, torch.zeros_like(width), width, q)
            return self._symmetric_clip(amax)
        left = -self.bins * width
        lo = _quantile(self.counts, left, width, 1.0 - q)
        hi = _quantile(self.counts, left, width, q)
        return self._clip(lo, hi)


class MSEObserver(_HistogramObserver):
    """The range among ``steps`` shrunk min-max ranges with the least quantization MSE."""

    kind = "mse"
    options = ("eps", "bins", "steps")

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...]) -> None:
        super().__init__(spec, shape)
        self.steps = spec.observer_args.get("steps", 100)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"mse needs steps >= 1 (an integer), got {self.steps!r}")

    def _ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        width = self._width()
        centers = ((torch.arange(-self.bins, self.bins, dtype=torch.float64)[None, :] + 0.5)
                   * width[:, None]).to(torch.float32)
        counts = self.counts.to(torch.float64)
        lo0 = self.stats.min_val.clamp(max=0.0)
        hi0 = self.stats.max_val.clamp(min=0.0)
        quant_min, quant_max = self.spec.qrange()
        block = [1, 2 * self.bins]
        best_error = torch.full((self.nblocks,), math.inf, dtype=torch.float64)
        best_lo, best_hi = lo0.clone(), hi0.clone()
        for k in range(1, self.steps + 1):
            lo, hi = lo0 * (k / self.steps), hi0 * (k / self.steps)
            scale, zero_point = qparams_from_minmax(lo[:, None], hi[:, None], quant_min,
                                                    quant_max, self.spec.symmetric,
                                                    self.spec.dtype, self.eps)
            zero_point = None if self.spec.symmetric or self.spec.is_float else zero_point
            fq = fake_quantize_affine(centers, block, scale, zero_point, quant_min, quant_max,
                                      self.spec.dtype)
            error = (counts * (centers - fq).to(torch.float64) ** 2).sum(dim=1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
        return self._clip(best_lo, best_hi)


class EntropyObserver(_HistogramObserver):
    """TensorRT's KL-divergence threshold (see the module docstring)."""

    kind = "entropy"

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...]) -> None:
        if spec.is_float:
            raise ValueError(f"the entropy observer needs an integer grid, not {spec.dtype}; "
                             "use observer='minmax', 'percentile' or 'mse' for float8")
        quant_min, quant_max = spec.qrange()
        self.levels_full = int(quant_max - quant_min + 1)
        super().__init__(spec, shape)

    def _default_bins(self) -> int:
        return max(super()._default_bins(), _next_pow2(self.levels_full))

    def _ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        positive, negative = self._one_sided()
        min_val, max_val = self.stats.min_val, self.stats.max_val
        one_signed = (~torch.tensor(self.spec.symmetric)) & ((min_val >= 0) | (max_val <= 0))
        histogram = torch.where((min_val >= 0)[:, None], positive,
                                torch.where((max_val <= 0)[:, None], negative,
                                            positive + negative))
        levels = torch.where(one_signed, self.levels_full, self.levels_full // 2)
        threshold = torch.empty(self.nblocks, dtype=torch.float64)
        for count in sorted(set(levels.tolist())):
            rows = levels == count
            threshold[rows] = _kl_threshold(histogram[rows].to(torch.float64), count).double()
        return self._symmetric_clip(threshold * self._width())


def _kl_threshold(histogram: torch.Tensor, levels: int) -> torch.Tensor:
    """Per row, the number of bins ``t`` (``levels <= t <= bins``) whose clipped distribution
    loses the least information quantized into ``levels`` chunks (first minimum on ties)."""
    rows, bins = histogram.shape
    total = histogram.sum(dim=1).clamp(min=1)
    best = torch.full((rows,), math.inf, dtype=torch.float64)
    best_t = torch.full((rows,), bins, dtype=torch.int64)
    for t in range(min(levels, bins), bins + 1):
        p = histogram[:, :t].clone()
        p[:, -1] += histogram[:, t:].sum(dim=1)
        chunk = (torch.arange(t) // max(t // levels, 1)).clamp(max=levels - 1)
        chunk = chunk[None, :].expand(rows, t)
        nonzero = (p > 0).to(torch.float64)
        mass = torch.zeros((rows, levels), dtype=torch.float64).scatter_add_(1, chunk, p)
        filled = torch.zeros((rows, levels), dtype=torch.float64).scatter_add_(1, chunk, nonzero)
        q = (mass / filled.clamp(min=1)).gather(1, chunk)
        terms = torch.where(p > 0, p * (torch.log(p.clamp(min=1e-300))
                                        - torch.log(q.clamp(min=1e-300))),
                            torch.zeros_like(p))
        divergence = terms.sum(dim=1) / total
        better = divergence < best
        best = torch.where(better, divergence, best)
        best_t = torch.where(better, torch.full_like(best_t, t), best_t)
    return best_t


OBSERVER_TYPES: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(spec: QuantSpec, shape: tuple[int, ...]) -> Observer:
    """The observer ``spec.observer`` names, for a tensor of ``shape`` (static specs only)."""
    return OBSERVER_TYPES[spec.observer](spec, tuple(shape))
