"""Source text shared by the kernel renderers: signatures, comments, launches, the allocation
of a group's outputs."""

from __future__ import annotations

from collections.abc import Callable

from torch.fx import Node

from graphpress.backends.triton.body import Body
from graphpress.backends.triton.lowering import channel_operands
from graphpress.backends.triton.schedule import Group

__all__ = ["RenderedKernel", "allocations", "comment", "group_shape", "launch", "mark_channels",
           "signature", "strided", "wrap"]


class RenderedKernel:
    """A kernel's source and the host lines that run it."""

    def __init__(self, name: str, source: str, host: list[str]) -> None:
        self.name, self.source, self.host = name, source, host


def strided(name: str, coords: list[str]) -> str:
    """The address offset of input ``name`` at ``coords`` (its strides ``{name}_st{d}``)."""
    return " + ".join(f"{c} * {name}_st{d}" for d, c in enumerate(coords)) or "0"


def signature(name: str, params: list[tuple[str, str]], header: list[str],
              lines: list[str]) -> str:
    """A ``@triton.jit`` function: one parameter per line, then the header and body lines."""
    args = ",\n        ".join(p for p, _ in params)
    body = "\n".join(f"    {line}" for line in [*header, *lines])
    return f"@triton.jit\ndef {name}(\n        {args},\n):\n{body}\n"


def comment(group: Group) -> list[str]:
    """Comment lines naming the IR nodes a kernel covers."""
    ops = ", ".join(f"{n.name} ({n.target})" for n in group.nodes)
    return [f"# {line}" for line in wrap(f"covers: {ops}")]


def wrap(text: str, width: int = 92) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` characters."""
    lines, current = [], ""
    for word in text.split(" "):
        if current and len(current) + len(word) + 1 > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return [*lines, current]


def mark_channels(group: Group, body: Body) -> None:
    """Read the per-channel operands of the group's members through their channel view."""
    for node in group.nodes:
        body.channel_inputs.update(a for a in channel_operands(node) if a not in group.nodes)


def allocations(group: Group, body: Body, var: Callable[[Node], str],
                shape_of: Callable[[Node], str], store: Callable[[int, str, Node], str]
                ) -> tuple[list[str], list[str]]:
    """Host lines allocating every output, and the kernel's store lines."""
    device = f"{var(group.inputs()[0])}.device"
    host, stores = [], []
    for j, node in enumerate(group.outputs()):
        val = node.meta["val"]
        host.append(f"{var(node)} = torch.empty({shape_of(node)}, dtype={val.dtype}, "
                    f"device={device})")
        body.params.append((f"out{j}_ptr", var(node)))
        stores.append(store(j, body.values[node], node))
    return host, stores


def group_shape(group: Group, shape_of: Callable[[Node], str]) -> str:
    """The host expression of the group's iteration shape."""
    anchor = group.nodes[0].args[0] if group.kind == "row" else group.nodes[0]
    return shape_of(anchor)


def launch(callee: str, params: list[tuple[str, str]], width: int = 92) -> list[str]:
    """The launch call with the host side of ``params``, wrapped on indented lines."""
    lines, current = [f"{callee}("], ""
    for _, host in params:
        if not host:
            continue
        piece = f"{host}, "
        if current and len(current) + len(piece) > width:
            lines.append(f"    {current.rstrip()}")
            current = ""
        current += piece
    lines.append(f"    {current.rstrip(', ')})")
    return lines
