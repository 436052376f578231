"""Calibration: observers fed from a Program run, bad calibration data, and data-parallel
calibration over 2 gloo processes giving the qparams of one process on the union."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from graphpress.errors import InputError
from graphpress.frontends import trace
from graphpress.ir.program import Program
from graphpress.quant.calibration import calibrate
from graphpress.quant.observers import Observer, make_observer
from graphpress.quant.spec import OBSERVERS, QuantSpec


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def program() -> Program:
    return trace(net(), (torch.randn(4, 8),))


def batches(count: int = 6) -> list[tuple[tuple[torch.Tensor, ...], dict]]:
    g = torch.Generator().manual_seed(1)
    # growing magnitudes, so the histograms' grids coarsen from batch to batch
    return [((torch.randn(4, 8, generator=g) * 2.0 ** i,), {}) for i in range(count)]


def node_named(prog: Program, target: str) -> str:
    return next(n.name for n in prog.graph.nodes if n.op == "call_function"
                and target in str(n.target))


def observers(prog: Program) -> dict[str, list[Observer]]:
    relu = node_named(prog, "relu")
    return {relu: [make_observer(QuantSpec("int8", symmetric=False, observer=kind), (4, 16))
                   for kind in OBSERVERS]
            + [make_observer(QuantSpec("int8", "per_channel", axis=1, observer="percentile"),
                             (4, 16))]}


def test_calibrate_feeds_the_node_values() -> None:
    prog = program()
    relu = node_named(prog, "relu")
    obs = make_observer(QuantSpec("uint8", symmetric=False), (4, 16))
    data = batches()
    assert calibrate(prog, {relu: obs}, data) == 6
    with torch.no_grad():
        expected = max(float(torch.relu(net().fc1(x)).max()) for (x,), _ in data)
    lo, hi = obs.ranges()
    assert lo.item() == 0.0 and hi.item() == expected


def test_no_batches() -> None:
    prog = program()
    with pytest.raises(InputError, match="needs calibration data.*int8_dynamic"):
        calibrate(prog, observers(prog), [])
    assert calibrate(prog, {}, []) == 0


def test_wrong_structure() -> None:
    prog = program()
    good = batches(2)
    with pytest.raises(InputError, match=r"calibration batch 1 is a Tensor.*x: float32\[4, 8\]"):
        calibrate(prog, observers(prog), [good[0], torch.randn(4, 8)])
    with pytest.raises(InputError, match="calibration batch 1 does not match the example"):
        calibrate(prog, observers(prog), [good[0], ((torch.randn(4, 8), torch.randn(4, 8)), {})])
    with pytest.raises(InputError, match=r"calibration batch 2 does not match.*shape\[1\]"):
        calibrate(prog, observers(prog), [*good, ((torch.randn(4, 5),), {})])
    with pytest.raises(InputError, match=r"calibration batch 1 does not run.*float32\[4, 8\]"):
        calibrate(prog, observers(prog), [good[0], ((torch.ones(4, 8, dtype=torch.int64),), {})])
    with pytest.raises(InputError, match="no node named nope"):
        calibrate(prog, {"nope": make_observer(QuantSpec(), (1,))}, good)


def test_observer_error_names_batch_and_value() -> None:
    prog = program()
    relu = node_named(prog, "relu")
    data = batches(3)
    data[2] = ((torch.full((4, 8), float("nan")),), {})
    with pytest.raises(InputError, match=f"calibration batch 2, value {relu}: .*non-finite"):
        calibrate(prog, {relu: make_observer(QuantSpec(), (4, 16))}, data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        prog = program()
        table = observers(prog)
        data = batches()
        share = len(data) // world
        count = calibrate(prog, table, data[rank * share:(rank + 1) * share])
        qparams = [obs.qparams() for group in table.values() for obs in group]
        torch.save({"count": count, "qparams": qparams}, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_on_the_union(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    prog = program()
    table = observers(prog)
    assert calibrate(prog, table, batches()) == 6
    expected = [obs.qparams() for group in table.values() for obs in group]
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["count"] == 6
        for kind, (scale, zero_point), (want_scale, want_zero_point) in zip(
                [*OBSERVERS, "percentile per channel"], result["qparams"], expected, strict=True):
            assert torch.equal(scale, want_scale), kind
            assert (zero_point is None and want_zero_point is None) or torch.equal(
                zero_point, want_zero_point), kind
