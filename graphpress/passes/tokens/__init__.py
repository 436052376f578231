"""Token merging: ``merge_tokens`` (the pass), ``plan`` (blocks, refusals, schedule choice),
``schedule`` (constant, decreasing, explicit, FLOP budget), ``matching`` (the graph of one
bipartite soft matching step), ``pruning`` (``mode="prune"``: drop the least attended tokens),
``respecialize`` (the shorter token axis carried downstream), ``reference`` (the contract's
full-length simulation)."""

from graphpress.passes.tokens.merge_tokens import MergeTokens

__all__ = ["MergeTokens"]
