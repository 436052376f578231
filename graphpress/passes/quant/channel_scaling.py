"""Per-channel scales moved between a producer and the layers that read its channels.

Let a *producer* ``P`` compute ``y`` with channels ``c`` (a LayerNorm / RMSNorm, a multiply by a
per-channel weight, a linear or convolution) and let every path from ``y`` to the layers that
read it commute with a positive per-channel scale. Then, for any ``s > 0``,

    P'(x) = P(x) / s            (the producer's per-channel parameters divided by s[c])
    W'[:, k] = W[:, k] * s[c(k)]  (each reading layer's input channel k, fed by channel c(k))

computes the same function: every op on the way carries ``y / s`` to ``x_k / s[c(k)]`` at the
reading layer, and ``W' (x / s) = W x``. The ops that commute with a positive per-channel scale
(for the channel layout they see) are the views (reshape, permute, transpose, expand, ...),
identities (clone, dropout in eval, dtype casts), the positive-homogeneous activations ``relu``
and ``leaky_relu``, pooling and means over other dims, a multiply or divide by an unscaled
tensor (``silu(gate) * up``), and a product whose right operand carries the scale along its
columns (``p @ v``, SDPA's value). Anything else (an add, a norm, ``gelu``, a program output) on
some path refuses the producer, with that op named.

In exact arithmetic any ``s`` works; in floating point ``W / s`` and ``W * s`` are rounded when
stored, which perturbs the function by about one ulp per weight (MiniLM amplifies that beyond
4x its own fp32 error). Scales rounded to powers of two (:func:`power_of_two`, the passes'
default) make every divide and multiply exact: the rewritten program then computes the same
bits, short of overflow and subnormals.

Where the channels go is tracked exactly, not guessed: a tensor of channel ids (``arange(C)``
along the producer's channel dim) runs through the same view ops; at a reading layer the ids,
constant over every dim but the layer's input-channel dim, give ``c(k)``. A linear reads its
channels on the last dim (a flatten before it maps ``C*H*W`` features to their ``C``
channels); a convolution on dim 1 (groups 1, or depthwise). This module finds producers
(:func:`find_chains`) and applies scales (:func:`apply_scales`); ``smooth_quant``, ``equalize``
and AWQ choose the scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from graphpress.analysis.channels.rules import op_name
from graphpress.ir.graph import reads_only_metadata
from graphpress.ir.program import Program
from graphpress.pipeline.base import Skip

__all__ = ["Chain", "Reader", "apply_scales", "find_chains", "power_of_two", "reader_scale",
           "to_producer", "weight_input_range"]

_NORMS = ("layer_norm", "rms_norm")
_LAYERS = ("linear", "conv1d", "conv2d", "conv3d")
# ops applied to the channel ids as they are (their other arguments are literals)
_VIEWS = ("view", "reshape", "_unsafe_view", "permute", "transpose", "t", "unsqueeze",
          "squeeze", "flatten", "expand", "slice", "select", "contiguous", "clone", "alias",
          "detach", "repeat", "unflatten")
_IDENTITIES = ("relu", "leaky_relu", "dropout", "to", "_to_copy", "neg", "type_as")
_POOLS = ("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
          "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
          "adaptive_max_pool2d", "max_pool2d_with_indices")
_REDUCTIONS = ("mean", "sum", "amax")
_PRODUCTS = ("matmul", "bmm")


@dataclass
class Reader:
    """A layer reading the producer's channels: input channel ``k`` of ``weight`` is fed by
    producer channel ``channel_of[k]``."""

    node: Node
    op: str
    weight: Node
    value: Node              # the layer's input (where activation statistics are taken)
    channel_of: torch.Tensor  # int64 [K]


@dataclass
class Chain:
    """A producer whose channels only reach ``readers`` through scale-commuting ops."""

    producer: Node
    op: str
    params: list[Node]       # weight placeholders scaled by 1 / s along dim 0
    channels: int
    readers: list[Reader]

    @property
    def where(self) -> str:
        return f"{self.op} {self.producer.name}"


def _own_constant(program: Program, value: object) -> Node | None:
    """``value`` if it is a constant weight read by one node only (a shared or mutated weight
    cannot be rescaled for one of its readers)."""
    if (isinstance(value, Node) and program.is_constant(value) and len(value.users) == 1):
        return value
    return None


def _producer(program: Program, node: Node, kinds: tuple[str, ...]
              ) -> tuple[str, list[Node], int, int] | str | None:
    """(op, parameters, channels, channel dim) of a producer, a refusal, or None (not one)."""
    if node.op != "call_function":
        return None
    op = op_name(node)
    if op in _NORMS and "norm" in kinds:
        shape = node.args[1]
        weight = node.args[2] if len(node.args) > 2 else None
        bias = node.args[3] if op == "layer_norm" and len(node.args) > 3 else None
        if weight is None:
            return f"{op} {node.name} has no affine weight to absorb the scale"
        params = [_own_constant(program, w) for w in (weight, bias) if w is not None]
        if any(p is None for p in params) or len(shape) != 1:
            return f"{op} {node.name}: its weight is shared, computed or not per channel"
        return op, params, int(shape[0]), -1
    if op == "mul" and "norm" in kinds and len(node.args) == 2:
        weights = [a for a in node.args if isinstance(a, Node) and program.is_weight(a)]
        if len(weights) != 1 or weights[0].meta["val"].dim() != 1:
            return None
        out = node.meta["val"].shape
        weight = _own_constant(program, weights[0])
        if weight is None or weight.meta["val"].shape[0] != out[-1]:
            return None
        return "mul", [weight], int(out[-1]), -1
    if op in _LAYERS and "layer" in kinds:
        weight = _own_constant(program, node.args[1])
        bias = node.args[2] if len(node.args) > 2 else None
        if weight is None or (bias is not None and _own_constant(program, bias) is None):
            return f"{op} {node.name}: its weight or bias is shared, computed or written"
        params = [weight] + ([bias] if bias is not None else [])
        return op, params, int(weight.meta["val"].shape[0]), -1 if op == "linear" else 1
    return None


def _initial_ids(node: Node, channels: int, dim: int) -> torch.Tensor:
    shape = list(node.meta["val"].shape)
    view = [1] * len(shape)
    view[dim] = channels
    return torch.arange(channels).view(view).expand(shape)


def _along(ids: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The ids along ``dim`` if they are constant over every other dim, else None."""
    moved = ids.movedim(dim, -1).reshape(-1, ids.shape[dim])
    first = moved[0]
    return first if bool((moved == first).all()) else None


def _substitute(node: Node, value: Node, ids: torch.Tensor) -> tuple[list, dict] | None:
    args = [ids if a is value else a for a in node.args]
    if any(isinstance(a, Node) for a in args) or any(isinstance(v, Node)
                                                     for v in node.kwargs.values()):
        return None
    return args, dict(node.kwargs)


def _step(program: Program, user: Node, value: Node, ids: torch.Tensor
          ) -> torch.Tensor | Reader | str:
    """What ``user`` does with the scaled ``value``: the ids of its output, a reader, or why
    the scale does not pass."""
    op = op_name(user)
    where = f"{op} {user.name}"
    positions = [i for i, a in enumerate(user.args) if a is value]
    if len(positions) != 1 or any(v is value for v in user.kwargs.values()):
        return f"{where} reads the scaled value twice or by keyword"
    position = positions[0]
    out = user.meta.get("val")
    if isinstance(out, torch.Tensor) and any(not isinstance(s, int) for s in out.shape):
        return f"{where} has a symbolic shape"
    if op in _LAYERS and position == 0:
        weight = _own_constant(program, user.args[1])
        if weight is None:
            return f"{where}: its weight is shared, computed or written"
        dim = -1 if op == "linear" else 1
        channel_of = _along(ids, dim)
        if channel_of is None:
            return f"{where}: its input channels mix producer channels along other dims"
        if op != "linear":
            groups = int(user.args[6]) if len(user.args) > 6 else 1
            cin = int(user.args[0].meta["val"].shape[1])
            if groups not in (1, cin):
                return f"{where} is a grouped convolution (groups={groups})"
        return Reader(user, op, weight, value, channel_of.clone())
    if op in _VIEWS or op in _IDENTITIES:
        if op == "dropout" and len(user.args) > 2 and user.args[2]:
            return f"{where} is a training-mode dropout"
        if op in _IDENTITIES:
            return ids if out is None or tuple(out.shape) == tuple(ids.shape) else (
                f"{where} changes the shape")
        call = _substitute(user, value, ids)
        if call is None:
            return f"{where} has computed arguments"
        return user.target(*call[0], **call[1])
    if op in _POOLS or op in _REDUCTIONS:
        return _channelwise(user, op, ids, out)
    if op == "getitem":
        return ids if user.args[1] == 0 else "getitem of a pooling's indices"
    if op in ("mul", "div"):
        other = user.args[1 - position]
        if op == "div" and position != 0:
            return f"{where} divides by the scaled value"
        if isinstance(other, Node) and not isinstance(other.meta.get("val"), torch.Tensor):
            return f"{where} multiplies by a symbolic number"
        return ids.expand(tuple(out.shape)) if ids.dim() == out.dim() else (
            ids.reshape((1,) * (out.dim() - ids.dim()) + tuple(ids.shape)).expand(
                tuple(out.shape)))
    if op in _PRODUCTS or op == "scaled_dot_product_attention":
        right = 2 if op == "scaled_dot_product_attention" else 1
        if position != right:
            return f"{where} contracts over the scaled channels (only the right operand of a " \
                   "product, SDPA's value, may carry them)"
        columns = ids.select(-2, 0).unsqueeze(-2)
        if not bool((ids == columns).all()):
            return f"{where}: the scaled operand's channels vary along the contracted dim"
        lead = (1,) * (out.dim() - columns.dim())
        return columns.reshape(lead + tuple(columns.shape)).expand(tuple(out.shape))
    hint = " (run fold_bn first)" if "batch_norm" in op else ""
    return (f"{where} reads the scaled channels and does not commute with a per-channel "
            f"scale{hint}")


def _channelwise(user: Node, op: str, ids: torch.Tensor, out: object) -> torch.Tensor | str:
    """Pools (over dims 2+) and reductions over dims other than the channels' keep each
    channel apart: the output's ids follow the channel dim."""
    where = f"{op} {user.name}"
    if isinstance(out, tuple):
        out = out[0]
    if op in _REDUCTIONS:
        dims = user.args[1] if len(user.args) > 1 else None
        keep = bool(user.args[2]) if len(user.args) > 2 else bool(user.kwargs.get("keepdim"))
        if dims is None:
            return f"{where} reduces over every dim"
        dims = [d % ids.dim() for d in ([dims] if isinstance(dims, int) else dims)]
        for d in dims:
            if not bool((ids == ids.narrow(d, 0, 1)).all()):
                return f"{where} reduces over the scaled channels"
        reduced = ids.amax(dim=dims, keepdim=keep)
        return reduced if tuple(reduced.shape) == tuple(out.shape) else f"{where}: shape"
    channel_of = _along(ids, 1)
    if channel_of is None or ids.dim() < 3:
        return f"{where}: the channels are not on dim 1"
    view = [1] * out.dim()
    view[1] = channel_of.numel()
    return channel_of.view(view).expand(tuple(out.shape))


def _trace(program: Program, producer: Node, channels: int, dim: int) -> list[Reader] | str:
    ids_of: dict[Node, torch.Tensor] = {producer: _initial_ids(producer, channels, dim)}
    readers: list[Reader] = []
    pending = [producer]
    while pending:
        value = pending.pop()
        for user in value.users:
            if user.op == "output":
                return f"the scaled value {value.name} is an output of the program"
            if reads_only_metadata(user, value) or op_name(user) == "_assert_tensor_metadata":
                continue
            if user in ids_of:
                return f"{op_name(user)} {user.name} is reached by two scaled paths"
            found = _step(program, user, value, ids_of[value])
            if isinstance(found, str):
                return found
            if isinstance(found, Reader):
                readers.append(found)
                continue
            ids_of[user] = found
            pending.append(user)
    return readers or "no layer reads its channels"


def find_chains(program: Program, kinds: tuple[str, ...], reader_ops: tuple[str, ...]
                ) -> tuple[list[Chain], list[Skip]]:
    """Every producer (``kinds``: "norm" for layer/RMS norms and per-channel multiplies,
    "layer" for linear and conv) whose channels reach only layers of ``reader_ops``, and a
    refusal for each candidate that does not qualify."""
    chains, skipped = [], []
    for node in program.graph.nodes:
        found = _producer(program, node, kinds)
        if found is None:
            continue
        if isinstance(found, str):
            skipped.append(Skip(node.name, found))
            continue
        op, params, channels, dim = found
        if any(not isinstance(s, int) for s in node.meta["val"].shape):
            skipped.append(Skip(node.name, f"{op} {node.name} has a symbolic shape"))
            continue
        readers = _trace(program, node, channels, dim)
        if isinstance(readers, str):
            skipped.append(Skip(node.name, f"{op} {node.name}: {readers}"))
            continue
        odd = [r for r in readers if r.op not in reader_ops]
        if odd:
            skipped.append(Skip(node.name, f"{op} {node.name}: read by {odd[0].op} "
                                           f"{odd[0].node.name}, not by {'/'.join(reader_ops)}"))
            continue
        chains.append(Chain(node, op, params, channels, readers))
    return chains, skipped


def reader_scale(reader: Reader, scale: torch.Tensor) -> torch.Tensor:
    """``scale`` (one per producer channel) laid out on the reader's weight: a tensor that
    broadcasts against it, multiplying input channel ``k`` by ``scale[channel_of[k]]``."""
    weight = reader.weight.meta["val"]
    per_input = scale[reader.channel_of]
    view = [1] * weight.dim()
    if reader.op == "linear":
        view[1] = per_input.numel()
        return per_input.view(view)
    groups = int(reader.node.args[6]) if len(reader.node.args) > 6 else 1
    if groups == 1:
        view[1] = per_input.numel()
        return per_input.view(view)
    multiplier = weight.shape[0] // per_input.numel()      # depthwise: output o reads o // m
    view[0] = weight.shape[0]
    return per_input.repeat_interleave(multiplier).view(view)


def power_of_two(scale: torch.Tensor) -> torch.Tensor:
    """``2 ** round(log2(scale))``: the nearest power of two, by which every float multiply
    and divide is exact (short of overflow and subnormals)."""
    return torch.exp2(torch.round(torch.log2(scale)))


def apply_scales(program: Program, chain: Chain, scale: torch.Tensor) -> None:
    """Divide the producer's channels by ``scale`` and multiply its readers' input channels by
    it (computed in float64, stored in each weight's dtype)."""
    scale = scale.to(torch.float64)
    for param in chain.params:
        tensor = program.weight(param).detach()
        view = [1] * tensor.dim()
        view[0] = chain.channels
        program.replace_weight(param, (tensor.to(torch.float64) / scale.view(view))
                               .to(tensor.dtype))
    for reader in chain.readers:
        tensor = program.weight(reader.weight).detach()
        program.replace_weight(reader.weight, (tensor.to(torch.float64)
                                               * reader_scale(reader, scale)).to(tensor.dtype))


def to_producer(reader: Reader, per_input: torch.Tensor, channels: int) -> torch.Tensor:
    """A per-input-channel statistic of ``reader`` (``[K]``) as the maximum over the inputs
    each producer channel feeds (``[channels]``; 0 for a channel no input reads)."""
    out = torch.zeros(channels, dtype=per_input.dtype)
    return out.scatter_reduce(0, reader.channel_of, per_input, reduce="amax", include_self=True)


def weight_input_range(program: Program, reader: Reader) -> torch.Tensor:
    """``max |W|`` per input channel of the reader's weight (``[K]``: linear columns, conv
    input channels; a depthwise conv's per-channel filter)."""
    weight = program.weight(reader.weight).detach().abs().to(torch.float64)
    if reader.op == "linear":
        return weight.amax(dim=0)
    groups = int(reader.node.args[6]) if len(reader.node.args) > 6 else 1
    if groups == 1:
        return weight.transpose(0, 1).reshape(weight.shape[1], -1).amax(dim=1)
    per_output = weight.reshape(weight.shape[0], -1).amax(dim=1)
    return per_output.reshape(reader.channel_of.numel(), -1).amax(dim=1)
