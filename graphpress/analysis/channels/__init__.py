"""Channel dependency analysis: which channels of which tensors must be pruned together.

``solver`` holds the union-find over per-axis channel symbols and the public
``channel_groups``; ``rules`` the per-op propagation rules; ``views`` the rules of reshapes and
slices; ``layers`` the rules of conv, linear and normalization layers.
"""

from graphpress.analysis.channels.solver import (
    ChannelAnalysis,
    ChannelGroup,
    ChannelSlice,
    channel_groups,
)

__all__ = ["ChannelAnalysis", "ChannelGroup", "ChannelSlice", "channel_groups"]
