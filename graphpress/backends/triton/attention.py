"""The attention kernel: ``scaled_dot_product_attention(q, k, v, attn_mask, is_causal, scale)``
as one pass over the keys with an online softmax (FlashAttention's forward).

For a tile of ``BLOCK_M`` queries, keys and values are read ``BLOCK_N`` at a time::

    s = (q @ k^T) * scale  (+ mask, or -inf where a boolean mask is False or causality forbids)
    m' = max(m, rowmax(s));  p = exp(s - m');  a = exp(m - m')
    l = l * a + rowsum(p);   acc = acc * a + p @ v;   m = m'
    out = acc / l

``m`` starts at ``-inf``; while it is still ``-inf`` the exponents use 0 in its place, so a
block whose keys are all masked adds nothing and a query that may attend to no key at all gives
``0 / 0``, NaN, as ATen's math implementation does (a large finite negative mask, such as
Hugging Face's ``finfo.min``, still gives ATen's uniform weights). ``is_causal`` is ATen's
top-left alignment: query ``i`` sees keys ``j <= i``. Leading dims (batch, heads) are the
grid's second axis; every operand is read through its strides (the mask broadcast to
``[*batch, L, S]``, 0 along broadcast dims), so transposed heads and expanded masks are never
copied. Products accumulate in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import Node

from graphpress.backends.triton.body import decompose
from graphpress.backends.triton.lowering import sdpa_arguments
from graphpress.backends.triton.schedule import Group
from graphpress.backends.triton.text import RenderedKernel, comment, launch

__all__ = ["render_attention"]


def _arguments(node: Node) -> tuple[Node, Node, Node, Node | None, bool, float | None]:
    values = sdpa_arguments(node)
    return (values["query"], values["key"], values["value"], values.get("attn_mask"),
            bool(values.get("is_causal", False)), values.get("scale"))


def render_attention(group: Group, var: Callable[[Node], str], shape_of: Callable[[Node], str],
                     precision: str) -> RenderedKernel:
    """The kernel of an attention group (one ``scaled_dot_product_attention`` node)."""
    (node,), g = group.nodes, group.index
    name = f"attention_{g}"
    q, k, v, mask, causal, scale = _arguments(node)
    out = node.meta["val"]
    nb = out.dim() - 2
    dtype = "tl.float32" if out.dtype == torch.float32 else None
    dot = (lambda a, b: f"tl.dot({a}, {b}, input_precision=\"{precision}\")") if dtype else (
        lambda a, b: f"tl.dot({a}, {b})")
    params: list[tuple[str, str]] = []

    def operand(prefix: str, tensor: Node, shape: str) -> None:
        params.append((f"{prefix}_ptr", var(tensor)))
        params.append((", ".join(f"{prefix}_st{d}" for d in range(nb + 2)),
                       f"*strides({var(tensor)}, {shape})"))

    operand("q", q, f"(*batch_{g}, l_{g}, e_{g})")
    operand("k", k, f"(*batch_{g}, s_{g}, e_{g})")
    operand("v", v, f"(*batch_{g}, s_{g}, ev_{g})")
    if mask is not None:
        operand("mask", mask, f"(*batch_{g}, l_{g}, s_{g})")
    params.append(("out_ptr", var(node)))
    if nb:
        params.append((", ".join(f"bsize{d}" for d in range(nb)), f"*batch_{g}"))
    params += [("L, S, E, EV", f"l_{g}, s_{g}, e_{g}, ev_{g}"), ("scale", f"scale_{g}"),
               ("BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, "
                "BLOCK_EV: tl.constexpr", f"**blocks_{g}")]

    def base(prefix: str) -> str:
        return " + ".join(f"b{d} * {prefix}_st{d}" for d in range(nb)) or "0"

    lines = [*decompose("pid_b", [f"bsize{d}" for d in range(nb)], "b"),
             "rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)",
             "re = tl.arange(0, BLOCK_E)", "rev = tl.arange(0, BLOCK_EV)",
             f"q = tl.load(q_ptr + {base('q')} + rm[:, None] * q_st{nb} + re[None, :] * "
             f"q_st{nb + 1}, mask=(rm[:, None] < L) & (re[None, :] < E), other=0.0)",
             'm = tl.full((BLOCK_M,), float("-inf"), tl.float32)',
             "l = tl.zeros((BLOCK_M,), tl.float32)",
             "acc = tl.zeros((BLOCK_M, BLOCK_EV), tl.float32)",
             "for n0 in range(0, S, BLOCK_N):",
             "    rn = n0 + tl.arange(0, BLOCK_N).to(tl.int64)",
             f"    k = tl.load(k_ptr + {base('k')} + rn[None, :] * k_st{nb} + re[:, None] * "
             f"k_st{nb + 1}, mask=(rn[None, :] < S) & (re[:, None] < E), other=0.0)",
             f"    s = {dot('q', 'k')} * scale",
             "    allowed = rn[None, :] < S"]
    if causal:
        lines.append("    allowed = allowed & (rn[None, :] <= rm[:, None])")
    if mask is not None:
        load = (f"tl.load(mask_ptr + {base('mask')} + rm[:, None] * mask_st{nb} + rn[None, :] * "
                f"mask_st{nb + 1}, mask=(rm[:, None] < L) & (rn[None, :] < S)")
        if mask.meta["val"].dtype == torch.bool:
            lines.append(f"    allowed = allowed & ({load}, other=0) != 0)")
        else:
            lines.append(f"    s = s + {load}, other=0.0).to(tl.float32)")
    lines += ['    s = tl.where(allowed, s, float("-inf"))',
              "    m_new = tl.maximum(m, tl.max(s, axis=1))",
              '    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)',
              "    p = tl.exp(s - m_safe[:, None])",
              "    alpha = tl.exp(m - m_safe)",
              "    l = l * alpha + tl.sum(p, axis=1)",
              f"    v = tl.load(v_ptr + {base('v')} + rn[:, None] * v_st{nb} + rev[None, :] * "
              f"v_st{nb + 1}, mask=(rn[:, None] < S) & (rev[None, :] < EV), other=0.0)",
              f"    acc = acc * alpha[:, None] + {dot('p.to(v.dtype)', 'v')}",
              "    m = m_new",
              "out = acc / l[:, None]",
              "flat = (pid_b * L + rm[:, None]) * EV + rev[None, :]",
              "tl.store(out_ptr + flat, out.to(out_ptr.dtype.element_ty), "
              "mask=(rm[:, None] < L) & (rev[None, :] < EV))"]
    header = ["pid_b = tl.program_id(1).to(tl.int64)"]
    args = ",\n        ".join(p for p, _ in params)
    text = "\n".join(f"    {line}" for line in [*comment(group), *header, *lines])
    source = f"@triton.jit\ndef {name}(\n        {args},\n):\n{text}\n"
    scale_value = "None" if scale is None else repr(float(scale))
    host = [f"batch_{g} = tuple({var(q)}.shape[:-2])",
            f"l_{g}, e_{g} = {var(q)}.shape[-2:]",
            f"s_{g}, ev_{g} = {var(v)}.shape[-2:]",
            f"scale_{g} = attention_scale({scale_value}, e_{g})",
            f"blocks_{g} = attention_blocks(l_{g}, s_{g}, e_{g}, ev_{g})",
            f"{var(node)} = torch.empty({shape_of(node)}, dtype={out.dtype}, "
            f"device={var(q)}.device)",
            *launch(f"{name}[(triton.cdiv(l_{g}, blocks_{g}['BLOCK_M']), "
                    f"math.prod(batch_{g}))]", params)]
    return RenderedKernel(name, source, host)
