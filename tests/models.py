"""Tiny hand-built models for structural tests (the zoo covers realistic ones)."""

from __future__ import annotations

import torch
from torch import nn


class ConvBNLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class Redundant(nn.Module):
    """Repeated subexpressions, a dead branch, computations on weights, an unused weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 0.5))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = torch.relu(x) + torch.relu(x)
        _dead = torch.sigmoid(x) * 3
        w = self.fc.weight.t() * 2.0
        s = self.scale * self.scale
        return {"out": self.fc(a) + a @ w * s, "a": a}


class Counter(nn.Module):
    """A step counter: the buffer is written on every call (state, never a constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count.add_(1)
        return x + self.count


def conv_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


def vec_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),)
