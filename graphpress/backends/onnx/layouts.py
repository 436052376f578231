"""Attention outputs made contiguous for the ONNX exporter (a copy of the Program).

``torch.onnx.export`` decomposes the program (``run_decompositions``), then re-runs the
decomposed graph on new fake tensors (its type-promotion pass). ``aten.contiguous`` and
``aten.reshape`` decompose by the strides the first run sees: nothing and a ``view`` when the
input looks contiguous, a copy otherwise. ``scaled_dot_product_attention`` does not report the
same strides in the two runs: in the decomposition its output follows the layout of the query
(``[B, H, L, D]`` read through a transpose of ``[B, L, H, D]``: Swin's and every
``view(B, L, H, D).transpose(1, 2)`` attention), in the second run it is contiguous. The usual
``out.transpose(1, 2).contiguous().reshape(B, L, -1)`` after it is then decomposed to a bare
``view`` that the second run refuses ("Cannot view a tensor with shape ... and strides ...").

Every attention output is therefore followed by ``clone(memory_format=contiguous_format)``:
contiguous in both runs, so whatever reads it decomposes the same way in both. A clone is
``Identity`` in ONNX (the exporter's optimizer removes it), so the model computes the same
values with the same nodes. The program the user holds is not changed.
"""

from __future__ import annotations

import torch

from graphpress.ir.program import Program

__all__ = ["ATTENTION_OPS", "contiguous_attention_outputs"]

ATTENTION_OPS = (torch.ops.aten.scaled_dot_product_attention.default,)
"""Ops whose output strides the exporter's two fake-tensor runs report differently."""


def contiguous_attention_outputs(program: Program) -> Program:
    """``program`` itself when it has no attention op, else a copy in which every attention
    output is read through a contiguous clone."""
    if not any(node.target in ATTENTION_OPS for node in program.graph.nodes):
        return program
    lowered = program.copy()
    graph = lowered.graph
    for node in list(graph.nodes):
        if node.target not in ATTENTION_OPS:
            continue
        with graph.inserting_after(node):
            clone = graph.call_function(torch.ops.aten.clone.default, (node,),
                                        {"memory_format": torch.contiguous_format})
        node.replace_all_uses_with(clone, delete_user_cb=lambda user, c=clone: user is not c)
        clone.meta.update({key: value for key, value in node.meta.items() if key != "val"})
        clone.meta["val"] = node.meta["val"].clone(memory_format=torch.contiguous_format)
    lowered.graph_module.recompile()
    return lowered
