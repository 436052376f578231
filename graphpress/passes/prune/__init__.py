"""prune_channels: structural pruning of coupled channel groups.

``importance`` scores channels, ``plan`` decides and applies what is removed (plans are data),
``prune_channels`` is the pass; ``rounding`` chooses ``round_to`` from measured layer latency.
"""
