"""Shared qparams (``QuantConfig(shared_qparams=("cat", "add"))``): one scale for the inputs of
ops whose integer kernels need it.

A concatenation of int8 tensors is a copy only if every input has the output's scale and zero
point; an int8 residual add is cheapest (and on some backends only possible) with one scale for
both inputs. So each such op's inputs, and the op's output where a layer reads it, form a
*group* quantized with one set of qparams:

* ``"cat"``: every tensor of a ``cat`` (and the cat itself: its values are the union of the
  inputs', so its fake-quant then changes nothing);
* ``"add"``: both operands of an ``add`` of two activations of one shape (a residual add);
  adds with a constant or a broadcast operand are not residual adds and are left alone.

Groups that share a value merge (a value read by a cat and an add is one group). One observer
sees every value of a group on every calibration batch, so its range covers all of them, and
every member's fake-quant uses its qparams; a value in a group is fake-quantized once, for all
its readers with that spec. Members whose layer has another activation spec (an override) keep
their own qparams.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from graphpress.analysis.channels.rules import op_name
from graphpress.ir.program import Program
from graphpress.passes.quant.placement import (
    Layer,
    Operand,
    activation_block,
    activation_refusal,
    layer_context,
)
from graphpress.pipeline.base import Skip
from graphpress.quant.config import QuantConfig

__all__ = ["shared_groups"]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, names: list[str]) -> None:
        roots = [self.find(n) for n in names]
        for root in roots[1:]:
            self.parent[root] = roots[0]


def _members(program: Program, node: Node, op: str) -> list[tuple[int, int | None, Node]]:
    """(argument index, list position, value) of the inputs that share qparams at ``node``."""
    if op == "cat":
        tensors = node.args[0]
        return [(0, i, v) for i, v in enumerate(tensors) if isinstance(v, Node)]
    if node.target != torch.ops.aten.add.Tensor or len(node.args) < 2:
        return []
    left, right = node.args[0], node.args[1]
    if not (isinstance(left, Node) and isinstance(right, Node)):
        return []
    if program.is_weight(left) or program.is_weight(right):
        return []
    if tuple(left.meta["val"].shape) != tuple(right.meta["val"].shape):
        return []
    return [(0, None, left), (1, None, right)]


def shared_groups(program: Program, config: QuantConfig
                  ) -> tuple[list[Layer], dict[str, int], list[Skip]]:
    """The cat / add nodes with their shared operands, ``value name -> group id`` for every
    value in a group, and the refusals with their reasons."""
    layers, skipped = [], []
    groups = _UnionFind()
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        op = op_name(node)
        if op not in config.shared_qparams:
            continue
        members = _members(program, node, op)
        if not members:
            continue
        module, where, layer_config = layer_context(program, config, node, op)
        spec = layer_config.activation if layer_config is not None else None
        if spec != config.activation:
            skipped.append(Skip(node.name, f"{where}: no shared qparams: an override gives it "
                                           "another activation spec"))
            continue
        refusals = [activation_refusal(value, spec) for _, _, value in members]
        if any(refusals):
            reason = next(r for r in refusals if r)
            skipped.append(Skip(node.name, f"{where}: no shared qparams: an input {reason}"))
            continue
        operands = [Operand("activation", node, index, value, spec,
                            activation_block(spec, value), position)
                    for index, position, value in members]
        layers.append(Layer(node, op, module, layer_config, operands))
        groups.union([value.name for _, _, value in members]
                     + ([node.name] if op == "cat" else []))
    roots: dict[str, int] = {}
    group_of = {name: roots.setdefault(groups.find(name), len(roots))
                for name in list(groups.parent)}
    return layers, group_of, skipped
