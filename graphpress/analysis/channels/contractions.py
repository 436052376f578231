"""Channel rules of matrix products: ``matmul``, ``bmm``, ``mm`` (see ``solver.py`` for the
invariant).

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.fx import Node

from graphpress.analysis.channels.rules import dim, op_name, rule, shape

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
