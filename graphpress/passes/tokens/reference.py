"""The reference of merge_tokens' contract: the program before the pass, run node by node, with
:class:`graphpress.testing.token_merging.MergeSimulation` applied at each merge point the pass
used and its key bias added to every later attention. Shapes never change, so this shares no
code with the rewrite; outputs match the merged program where it keeps positions (the
protected tokens) and, with ``unmerge``, everywhere.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from graphpress.ir.program import Program
from graphpress.ir.runner import ProgramRunner

__all__ = ["MergedReference"]


class MergedReference(ProgramRunner):
    """``before`` with token merging simulated at full length (``plan``: the pass's details)."""

    def __init__(self, before: Program, plan: dict[str, Any]) -> None:
        super().__init__(before)
        self.plan = plan
        self.merges = {m["mid"]: m for m in plan["merges"]}
        self.keys = {m["key"] for m in plan["merges"]}
        self.attention = {a["at"]: a for a in plan["attention"]}
        self.masks = {plan["validity_mask"]} if plan["validity_mask"] else set()
        self.pruning = plan.get("mode") == "prune"
        self.probs: dict[str, torch.Tensor] = {}
        self.importance_at = {m["attention"]: m["mid"] for m in plan["merges"]} \
            if self.pruning else {}

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.values: dict[str, torch.Tensor] = {}
        self.probs = {}
        self.simulation = None
        return super().run(*args, **kwargs)

    def evaluate(self, n: Node) -> Any:
        from graphpress.testing.token_merging import MergeSimulation, key_validity

        value = self._evaluate(n)
        if n.name in self.keys or n.name in self.masks:
            self.values[n.name] = value
        if n.name in self.importance_at and n.target is not \
                torch.ops.aten.scaled_dot_product_attention.default:
            self.probs[self.importance_at[n.name]] = value   # the softmax output
        merge = self.merges.get(n.name)
        if merge is not None:
            if self.simulation is None:
                mask = self.values.get(self.plan["validity_mask"])
                valid = key_validity(mask) if mask is not None and mask.shape[-1] > 1 else None
                if valid is not None and valid.shape[0] != value.shape[0]:
                    valid = valid.expand(value.shape[0], -1)
                self.simulation = MergeSimulation(value.shape[0], value.shape[1],
                                                  self.plan["protected"], valid)
            if self.pruning:
                self.simulation.prune_step(self.probs[n.name], merge["r"])
            else:
                value = self.simulation.step(value, self.values[merge["key"]], merge["r"])
        return value

    def _evaluate(self, n: Node) -> Any:
        site = self.attention.get(n.name)
        if n.name in self.importance_at and n.target is \
                torch.ops.aten.scaled_dot_product_attention.default:
            return self._sdpa_with_probs(n, site)
        if site is None or self.simulation is None:
            return super().evaluate(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args, kwargs = list(args), dict(kwargs)
        bias = self.simulation.key_bias(self.plan["proportional"], torch.float32)
        if site["kind"] == "sdpa":
            query = args[0]
            bias = bias.to(query.dtype)[:, None, None, :]
            mask = kwargs.pop("attn_mask", args[3] if len(args) > 3 else None)
            if mask is None:
                mask = bias
            elif mask.dtype == torch.bool:
                mask = torch.where(mask, 0.0, float("-inf")).to(bias.dtype) + bias
            else:
                mask = mask + bias
            if len(args) > 3:
                args[3] = mask
            else:
                kwargs["attn_mask"] = mask
            return getattr(self, n.op)(n.target, tuple(args), kwargs)
        out = super().evaluate(n) if site["kind"] == "mask_add" else args[0]
        return self._biased(n, site, out, bias, args, kwargs)

    def _biased(self, n: Node, site: Any, out: Any, bias: torch.Tensor, args: list[Any],
                kwargs: dict[str, Any]) -> Any:
        bias = bias.to(out.dtype)[:, None, None, :]
        if out.dim() == 3:  # [B * H, N, N] logits
            batch, tokens = bias.shape[0], bias.shape[-1]
            bias = bias.expand(batch, out.shape[0] // batch, 1, tokens).reshape(-1, 1, tokens)
        out = out + bias
        if site["kind"] == "mask_add":
            return out
        args[0] = out
        return getattr(self, n.op)(n.target, tuple(args), kwargs)

    def _sdpa_with_probs(self, n: Node, site: Any) -> Any:
        """An SDPA node (biased as the others) whose attention probabilities pruning needs."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        query, key = args[0], args[1]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if site is not None and self.simulation is not None:
            bias = self.simulation.key_bias(False, query.dtype)[:, None, None, :]
            mask = bias if mask is None else (
                torch.where(mask, 0.0, float("-inf")).to(bias.dtype) + bias
                if mask.dtype == torch.bool else mask + bias)
        scale = kwargs.get("scale") or query.shape[-1] ** -0.5
        logits = query @ key.transpose(-1, -2) * scale
        if mask is not None:
            logits = (logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                      else logits + mask)
        probs = logits.softmax(dim=-1)
        self.probs[self.importance_at[n.name]] = probs
        return (probs @ args[2]).to(query.dtype)
