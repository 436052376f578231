"""Channel rules of matrix products: ``matmul``, ``bmm``, ``mm``, ``addmm`` (see ``solver.py``
for the invariant).

``C[..., i, j] = sum_k A[..., i, k] * B[..., k, j]``:

- batch dimensions: every batch element is a product of its own, so a batch dimension of ``A``,
  of ``B`` and of ``C`` is one dimension and their channels are unified. In eager attention
  (``s = q @ k.transpose(-2, -1)``, ``softmax(s) @ v``) this couples the heads of q, k and v, and
  under grouped-query attention the query heads that read one repeated KV head; such groups are
  marked as heads. A batch dimension
  that only one operand carries (the other broadcasts it from size 1, or lacks it) is not
  matched: its channels are blocked, naming the node.
- the contracted dimension ``k``: the channels of ``A``'s last and ``B``'s second-to-last
  dimension couple. Removing channel ``c`` from both drops the term ``A[..., c] * B[c, ...]``,
  which the masked original zeroes through the weights that produce the operands (``x @ W``
  with a weight ``W`` prunes like a linear layer; ``q @ k^T`` in head_dim mode prunes the same
  positions of q and k).
- the rows ``i`` of ``A`` and the columns ``j`` of ``B`` pass to ``C``. A 1-D operand has no
  rows (``A``) or columns (``B``); ``C`` then has no such dimension.
- ``addmm(bias, A, W) = bias + A @ W`` (the ``Conv1D`` layer of GPT-2-style decoders, whose
  weight is stored ``[in, out]``): the product as above, and the bias, broadcast from the right,
  is added elementwise, so its last dimension joins ``C``'s columns (its row dimension, where it
  has one of full size, joins ``C``'s rows). ``W``'s axis 1 thus creates the output channels and
  its axis 0 reads the input channels: a linear layer with its weight transposed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.fx import Node

from graphpress.analysis.channels.rules import dim, link, op_name, rule, shape

if TYPE_CHECKING:
    from graphpress.analysis.channels.solver import Layout, Tracer
    from graphpress.ir.program import Program

__all__: list[str] = []


@rule("matmul", "bmm", "mm")
def _matmul(t: Tracer, node: Node, program: Program) -> Any:
    a, b = node.args[0], node.args[1]
    where = f"{op_name(node)} (node {node.name})"
    da = [dim(t, a, i, program) for i in range(a.meta["val"].dim())]
    db = [dim(t, b, i, program) for i in range(b.meta["val"].dim())]
    t.unify(da[-1], db[-2] if len(db) > 1 else db[0], where)
    rows, cols = da[-2:-1], db[-1:] if len(db) > 1 else []
    batch = _batch(t, (da[:-2], shape(a)[:-2]), (db[:-2], shape(b)[:-2]), where)
    return [*batch, *rows, *cols]


@rule("addmm")
def _addmm(t: Tracer, node: Node, program: Program) -> Any:
    bias, a, b = node.args[0], node.args[1], node.args[2]
    where = f"addmm (node {node.name})"
    rows, inner = dim(t, a, 0, program), dim(t, a, 1, program)
    link(t, b, 0, inner, where)        # like linear: W's input axis takes A's channels
    cols = dim(t, b, 1, program)
    if isinstance(bias, Node):
        sizes, out = shape(bias), (rows, cols)
        for i in range(-len(sizes), 0):
            if sizes[i] == shape(node)[i]:
                link(t, bias, len(sizes) + i, out[i], where)
            elif sizes[i] != 1:
                t.block([dim(t, bias, len(sizes) + i, program)], f"{where}: bias shape")
    return [rows, cols]


def _batch(t: Tracer, a: tuple[list[Layout], tuple[int, ...]],
           b: tuple[list[Layout], tuple[int, ...]], where: str) -> list[Layout]:
    """The broadcast batch dimensions (aligned from the right) of two operands."""
    out = []
    for i in range(-max(len(a[0]), len(b[0])), 0):
        present = [(layouts[i], sizes[i]) for layouts, sizes in (a, b) if -i <= len(layouts)]
        if len(present) == 2 and present[0][1] == present[1][1]:
            out.append(t.unify(present[0][0], present[1][0], where))
            if not t.head_dim:          # channels that batch a product are attention heads
                t.heads.update(s for s, _ in out[-1])
            continue
        full = [layout for layout, n in present if n != 1] or [present[0][0]]
        t.block(full, f"{where} broadcasts this batch dimension (not matched in both operands)")
        out.append(full[0])
    return out
