"""Example graphpress plugin: the ``remove_identity_ops`` pass.

graphpress finds it through the entry point ``remove_identity_ops`` of the group
``graphpress.passes`` declared in this package's ``pyproject.toml``; nothing here registers it
by hand. See :mod:`graphpress_example_plugin.remove_identity_ops` for the rules.
"""

from graphpress_example_plugin.remove_identity_ops import RemoveIdentityOps

__all__ = ["RemoveIdentityOps"]
