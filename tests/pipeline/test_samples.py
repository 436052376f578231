"""Generated samples keep what the model depends on; runs on samples leave no state behind."""

from __future__ import annotations

import torch

from graphpress.frontends import trace
from graphpress.pipeline.samples import generate_samples, preserved_state, run_samples
from tests.models import Counter


def test_generated_samples_follow_the_example() -> None:
    ids = torch.tensor([[3, 7, 12, 5]])
    mask = torch.tensor([[1, 1, 1, 0]])
    x = torch.randn(2, 64) * 1e-3 + 5.0
    samples = generate_samples(((ids, mask, x, 0.5), {"flag": torch.tensor([True])}), 3)
    assert len(samples) == 3
    for (new_ids, new_mask, new_x, scalar), kwargs in samples:
        assert new_ids.dtype == ids.dtype and new_ids.shape == ids.shape
        assert int(new_ids.min()) >= 3 and int(new_ids.max()) <= 12
        assert torch.equal(new_mask, mask), "masks are kept"
        assert new_x.dtype == x.dtype and not torch.equal(new_x, x)
        assert abs(float(new_x.mean()) - 5.0) < 0.01 and float(new_x.std()) < 0.01
        assert scalar == 0.5 and torch.equal(kwargs["flag"], torch.tensor([True]))
    assert not torch.equal(samples[0][0][2], samples[1][0][2]), "each sample is new"
    again = generate_samples(((ids, mask, x, 0.5), {"flag": torch.tensor([True])}), 3)
    assert torch.equal(again[2][0][2], samples[2][0][2]), "seeded: reproducible"


def test_runs_start_from_the_same_state_and_leave_none() -> None:
    model = Counter()
    program = trace(Counter(), (torch.ones(1),))
    samples = [((torch.ones(1),), {})] * 3
    for fn in (model, program):
        outputs = run_samples(fn, samples)
        assert [float(o) for o in outputs] == [2.0, 2.0, 2.0]
    assert float(model.count) == 0.0
    assert float(program.weight("count")) == 0.0
    assert float(program(torch.ones(1))) == 2.0 and float(program(torch.ones(1))) == 3.0


def test_preserved_state_restores_a_module_after_an_error() -> None:
    model = Counter()
    try:
        with preserved_state(model):
            model(torch.ones(1))
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert float(model.count) == 0.0
