"""The weight-quantization algorithms on plain tensors: GPTQ, AWQ's searches, bias correction,
the shared grid and the statistics collectors, each against a hand-derived result."""

from __future__ import annotations

import pytest
import torch

from graphpress.quant.algorithms.awq import (
    AwqReader,
    awq_clip_search,
    awq_refine_qparams,
    awq_scale_search,
    weight_salience,
)
from graphpress.quant.algorithms.bias_correction import output_shift
from graphpress.quant.algorithms.eora import eora_factors
from graphpress.quant.algorithms.gptq import DAMP_CANDIDATES, gptq_damp_search, gptq_quantize
from graphpress.quant.algorithms.grid import fake_quantize, minmax_qparams
from graphpress.quant.algorithms.statistics import AbsMax, AbsMean, Gram, Mean, Rows
from graphpress.quant.spec import QuantSpec

INT4_G8 = QuantSpec("int4", "per_group", group_size=8, symmetric=False)
INT4_ROW = QuantSpec("int4", "per_channel", symmetric=True)


def _correlated(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=generator)
    return torch.randn(rows, k, generator=generator) @ mix


def _rtn(weight: torch.Tensor, block: list[int], spec: QuantSpec) -> torch.Tensor:
    return fake_quantize(weight, block, spec, *minmax_qparams(weight, block, spec))


def _output_error(weight: torch.Tensor, quantized: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (weight - quantized).T) ** 2).sum())


@pytest.mark.parametrize(("spec", "block", "act_order"), [
    (INT4_G8, [1, 8], False), (INT4_G8, [1, 8], True), (INT4_ROW, [1, 32], False),
    (QuantSpec("int8", "per_channel"), [1, 32], True)])
def test_gptq_beats_round_to_nearest_and_stays_on_its_grid(spec: QuantSpec, block: list[int],
                                                           act_order: bool) -> None:
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    x = _correlated(512, 32)
    quantized, scale, zero_point = gptq_quantize(weight, x.T @ x, spec, block,
                                                 act_order=act_order, block=16)
    assert scale.shape == (16, 32 // block[1])
    assert (zero_point is None) == spec.symmetric
    # on the grid its qparams define: the inserted fake-quant is the identity on it
    assert torch.equal(fake_quantize(quantized, block, spec, scale, zero_point), quantized)
    assert _output_error(weight, quantized, x) < 0.8 * _output_error(weight, _rtn(weight, block,
                                                                                  spec), x)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest() -> None:
    """With H = I no column's error has anywhere to go: every OBS update is 0."""
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    quantized, _, _ = gptq_quantize(weight, torch.eye(16), INT4_G8, [1, 8], damp=0.0)
    assert torch.equal(quantized, _rtn(weight, [1, 8], INT4_G8))


def test_gptq_two_columns_by_hand() -> None:
    """H = [[1, r], [r, 1]]: after column 0 rounds with error e, column 1 becomes w1 + r e
    (the OBS update -e [H^-1]_01 / [H^-1]_00 = r e) and rounds on the row's grid."""
    r = 0.6
    weight = torch.tensor([[0.37, -0.81]])
    hessian = torch.tensor([[1.0, r], [r, 1.0]])
    quantized, scale, _ = gptq_quantize(weight, hessian, INT4_ROW, [1, 2], damp=0.0)
    step = 0.81 / 7.5                                   # symmetric int4: amax / ((7 + 8) / 2)
    q0 = torch.round(torch.tensor(0.37) / step) * step
    w1 = -0.81 + r * (0.37 - q0)
    q1 = torch.clamp(torch.round(w1 / step), -8, 7) * step
    assert float(scale) == pytest.approx(step)
    assert quantized[0, 0].item() == pytest.approx(q0.item(), abs=1e-6)
    assert quantized[0, 1].item() == pytest.approx(q1.item(), abs=1e-6)


def test_gptq_refuses_shapes_and_float_grids() -> None:
    with pytest.raises(ValueError, match=r"\[N, K\] weight and a \[K, K\] Hessian"):
        gptq_quantize(torch.randn(4, 8), torch.eye(4), INT4_G8, [1, 8])
    with pytest.raises(ValueError, match="integer grids"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), QuantSpec("float8_e4m3fn", "per_channel"),
                      [1, 8])


def test_gptq_dead_inputs_get_zero_columns() -> None:
    x = _correlated(64, 16)
    x[:, 3] = 0.0
    quantized, _, _ = gptq_quantize(torch.randn(4, 16), x.T @ x, INT4_G8, [1, 8])
    assert torch.all(quantized[:, 3] == 0)


def _folds(x: torch.Tensor, count: int = 4) -> list[torch.Tensor]:
    return [x[i::count].T.double() @ x[i::count].double() for i in range(count)]


@pytest.mark.parametrize("act_order", [False, True])
def test_damp_search_scores_each_candidate_on_the_fold_it_left_out(act_order: bool) -> None:
    """The batched sweep against one gptq_quantize per (candidate, fold), by hand."""
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    folds = _folds(_correlated(40, 32, seed=5))
    damp, errors = gptq_damp_search(weight, folds, INT4_G8, [1, 8], act_order=act_order, block=16)
    expected = []
    for candidate in DAMP_CANDIDATES:
        total = 0.0
        for held in folds:
            q, _, _ = gptq_quantize(weight, sum(folds) - held, INT4_G8, [1, 8], damp=candidate,
                                    act_order=act_order, block=16)
            r = (weight - q).double()
            total += float(((r @ held) * r).sum())
        expected.append(total)
    assert errors == pytest.approx(expected, rel=1e-5)
    assert damp == DAMP_CANDIDATES[min(range(len(expected)), key=expected.__getitem__)]


def test_damp_search_damps_harder_when_the_rows_are_few() -> None:
    """Few rows for the width (48 for 64 inputs): the undamped Hessian is overfit, so a large
    damp wins on held-out rows; with 4000 rows the Hessian is right and 0.01 wins."""
    generator = torch.Generator().manual_seed(6)
    mix, weight = torch.randn(64, 64, generator=generator), torch.randn(16, 64, generator=generator)
    spec = QuantSpec("int4", "per_group", group_size=16)
    few, _ = gptq_damp_search(weight, _folds(torch.randn(48, 64, generator=generator) @ mix),
                              spec, [1, 16])
    many, _ = gptq_damp_search(weight, _folds(torch.randn(4000, 64, generator=generator) @ mix),
                               spec, [1, 16])
    assert few >= 0.3 and many == 0.01


def test_damp_search_needs_two_folds() -> None:
    with pytest.raises(ValueError, match="needs at least 2, got 1"):
        gptq_damp_search(torch.randn(4, 8), [torch.eye(8)], INT4_G8, [1, 8])


def test_awq_scales_protect_a_salient_channel() -> None:
    """One input channel carries activations 50x the others: scaling it up before rounding
    lowers the output error; alpha = 0 (the first loss) is plain round-to-nearest."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(256, 16, generator=generator)
    x[:, 5] *= 50
    weight = torch.randn(8, 16, generator=generator)
    reader = AwqReader(x, weight, [1, 8], torch.arange(16))
    scale, alpha, losses = awq_scale_search(x.abs().mean(0), [reader], INT4_G8,
                                            power_of_two=False)
    rtn_loss = _output_error(weight, _rtn(weight, [1, 8], INT4_G8), x)
    assert losses[0] == pytest.approx(rtn_loss, rel=1e-4)
    assert alpha > 0 and min(losses) < losses[0]
    assert float(scale.max() * scale.min()) == pytest.approx(1.0)   # normalized
    assert int(scale.argmax()) == 5


def test_awq_power_of_two_candidates() -> None:
    x = torch.randn(64, 8).abs() + 0.1
    reader = AwqReader(x, torch.randn(4, 8), [1, 8], torch.arange(8))
    scale, _, _ = awq_scale_search(x.mean(0), [reader], INT4_G8, grid=5)
    assert torch.equal(scale, torch.exp2(torch.round(torch.log2(scale))))


def test_awq_duo_candidates_weigh_the_weights() -> None:
    """The duo family (x^alpha / w^(1 - alpha)) is scored after the plain one: twice the
    losses, the plain family's first is RTN's, and the best of both is kept."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(256, 16, generator=generator)
    x[:, 2] *= 20
    weight = torch.randn(8, 16, generator=generator)
    reader = AwqReader(x, weight, [1, 8], torch.arange(16))
    plain = awq_scale_search(x.abs().mean(0), [reader], INT4_G8, grid=10, power_of_two=False)
    duo = awq_scale_search(x.abs().mean(0), [reader], INT4_G8, grid=10, power_of_two=False,
                           duo=True)
    assert len(plain[2]) == 10 and len(duo[2]) == 20 and duo[2][:10] == plain[2]
    assert min(duo[2]) <= min(plain[2])
    assert float(duo[0].max() * duo[0].min()) == pytest.approx(1.0)


def test_weight_salience_by_hand() -> None:
    """mean over rows of |W| / (its block's max |W|), per producer channel; two readers and a
    channel map that feeds channel 0 twice (GQA-style repeats) average over all of them."""
    first = torch.tensor([[1.0, -2.0], [4.0, 2.0]])     # blocks [1, 2]: row maxima 2 and 4
    second = torch.tensor([[3.0, 3.0]])
    readers = [AwqReader(torch.ones(1, 2), first, [1, 2], torch.tensor([0, 1])),
               AwqReader(torch.ones(1, 2), second, [1, 2], torch.tensor([0, 0]))]
    # channel 0: 1/2, 4/4 (first) and 1, 1 (second); channel 1: 2/2, 2/4
    expected = torch.tensor([(0.5 + 1.0 + 1.0 + 1.0) / 4, (1.0 + 0.5) / 2], dtype=torch.float64)
    assert torch.allclose(weight_salience(readers, 2), expected)


def test_awq_clipping_never_loses_to_the_full_range() -> None:
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(6, 16, generator=generator)
    weight[2, 3] = 8.0                                   # an outlier stretches its group's grid
    x = torch.randn(128, 16, generator=generator)
    low, high = awq_clip_search(x, weight, [1, 8], INT4_G8)
    assert torch.equal(low, high), "one ratio for both ends"
    assert low.shape == (6, 2) and float(low.min()) >= 0.5 and float(low.max()) <= 1.0
    clipped = fake_quantize(weight, [1, 8], INT4_G8, *minmax_qparams(weight, [1, 8], INT4_G8,
                                                                     low))
    assert _output_error(weight, clipped, x) <= _output_error(weight, _rtn(weight, [1, 8],
                                                                           INT4_G8), x)
    with pytest.raises(ValueError, match="per-row blocks"):
        awq_clip_search(x, weight, [6, 16], INT4_G8)


def test_two_sided_clipping_shrinks_the_ends_apart() -> None:
    """An outlier on the high side only: the two-sided search shrinks the two ends apart, and
    its error is never above the one-ratio search's (whose pairs it contains)."""
    generator = torch.Generator().manual_seed(6)
    weight = torch.rand(4, 8, generator=generator) - 0.5
    weight[:, 0] = 4.0                                   # every row: one large positive weight
    x = torch.randn(256, 8, generator=generator)
    x[:, 0] *= 0.05                                      # ... on an input that barely fires
    spec = QuantSpec("int3", "per_group", group_size=8, symmetric=False)
    one = awq_clip_search(x, weight, [1, 8], spec, steps=10)
    low, high = awq_clip_search(x, weight, [1, 8], spec, steps=10, two_sided=True)
    assert float(high.max()) < 1.0 and not torch.equal(low, high)

    def error(ratios: tuple[torch.Tensor, torch.Tensor]) -> float:
        return _output_error(weight, fake_quantize(weight, [1, 8], spec, *minmax_qparams(
            weight, [1, 8], spec, *ratios)), x)
    assert error((low, high)) <= error(one) < error((torch.ones(4, 1), torch.ones(4, 1)))


def test_grid_refinement_by_hand_symmetric() -> None:
    """w = 0.1 * [3, 1, -2, 7] on int4 symmetric: min-max's step is 0.7 / 7.5, whose codes are
    [3, 1, -2, 7]; with H = I the least-squares step for those codes is q.w / q.q = 6.3 / 63 =
    0.1, on which w is exact."""
    spec = QuantSpec("int4", "per_group", group_size=4, symmetric=True)
    weight = torch.tensor([[0.3, 0.1, -0.2, 0.7]])
    x = torch.eye(4)
    start = minmax_qparams(weight, [1, 4], spec)
    assert float(start[0]) == pytest.approx(0.7 / 7.5)
    scale, zero_point = awq_refine_qparams(x, weight, [1, 4], spec, *start, steps=1)
    assert zero_point is None and float(scale) == pytest.approx(0.1, rel=1e-6)
    assert torch.allclose(fake_quantize(weight, [1, 4], spec, scale, None), weight, atol=1e-7)


def test_grid_refinement_by_hand_asymmetric() -> None:
    """w = 0.1 * (q + 2) with codes q = [-4, -2, 3, 0] on int3 asymmetric (codes [-4, 3]):
    min-max spans [-0.2, 0.5] with step 0.1 and zero point -2 already; shrink the high end to
    0.4 (step 0.6 / 7, codes [-4, -2, 4 -> 3, 0]) and one refinement step (a 2 x 2 solve)
    goes back to step 0.1, zero point -2."""
    spec = QuantSpec("int3", "per_group", group_size=4, symmetric=False)
    weight = torch.tensor([[-0.2, 0.0, 0.5, 0.2]])
    x = torch.eye(4)
    start = minmax_qparams(weight, [1, 4], spec, 1.0, torch.tensor([[0.8]]))
    assert spec.qrange() == (-4, 3) and int(start[1]) == -2
    assert float(start[0]) == pytest.approx(0.6 / 7)
    scale, zero_point = awq_refine_qparams(x, weight, [1, 4], spec, *start, steps=2)
    assert float(scale) == pytest.approx(0.1, rel=1e-5) and int(zero_point) == -2
    assert torch.allclose(fake_quantize(weight, [1, 4], spec, scale, zero_point), weight,
                          atol=1e-6)


@pytest.mark.parametrize("spec", [
    INT4_G8, QuantSpec("int3", "per_group", group_size=8, symmetric=True),
    QuantSpec("int3", "per_group", group_size=8, symmetric=True, signed_scale=True)])
def test_grid_refinement_never_loses_to_its_start_per_block(spec: QuantSpec) -> None:
    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(16, 32, generator=generator)
    x = _correlated(256, 32, seed=3)
    start = minmax_qparams(weight, [1, 8], spec)
    refined = awq_refine_qparams(x, weight, [1, 8], spec, *start, steps=4)

    def block_errors(grid: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        diff = (weight - fake_quantize(weight, [1, 8], spec, *grid)).reshape(16, 4, 8)
        return (torch.einsum("tgk,ngk->tng", x.reshape(256, 4, 8), diff) ** 2).sum(dim=0)
    before, after = block_errors(start), block_errors(refined)
    assert bool((after <= before * (1 + 1e-9)).all())
    assert float(after.sum()) < 0.9 * float(before.sum())
    if spec.signed_scale:
        assert torch.equal(refined[0].sign(), start[0].sign())


def test_bias_correction_of_a_linear_is_the_mean_error_by_hand() -> None:
    x = torch.randn(40, 5, 12, dtype=torch.float64) + 1.0
    weight = torch.randn(7, 12, dtype=torch.float64)
    quantized = _rtn(weight.float(), [1, 12], INT4_ROW).double()
    mean = Mean()
    mean.update(x)
    shift = output_shift(lambda a, w: torch.nn.functional.linear(a, w), mean.value, weight,
                         quantized, -1)
    expected = (x.reshape(-1, 12) @ (weight - quantized).T).mean(0)
    assert torch.allclose(shift, expected, atol=1e-12)


def test_bias_correction_of_a_conv_counts_borders() -> None:
    """Zero padding makes border outputs see fewer inputs: the shift is still the mean of
    conv(x, W - Q) over the data, because the mean input is kept per position."""
    x = torch.rand(30, 3, 6, 6, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    quantized = _rtn(weight.float(), [1, 3, 3, 3], QuantSpec("int8", "per_channel")).double()

    def conv(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(a, w, None, 1, 1)
    mean = Mean()
    for part in x.split(7):
        mean.update(part)
    shift = output_shift(conv, mean.value, weight, quantized, 1)
    expected = (conv(x, weight) - conv(x, quantized)).mean(dim=(0, 2, 3))
    assert torch.allclose(shift, expected, atol=1e-12)


def test_statistics_collectors() -> None:
    parts = [torch.randn(2, 3, 4) for _ in range(3)]
    whole = torch.cat(parts)
    collectors = {"absmax": AbsMax(-1), "absmean": AbsMean(1), "gram": Gram(), "mean": Mean(),
                  "rows": Rows(limit=5)}
    for part in parts:
        for collector in collectors.values():
            collector.update(part)
    rows = whole.reshape(-1, 4).double()
    assert torch.allclose(collectors["absmax"].value, rows.abs().amax(0))
    assert torch.allclose(collectors["absmean"].value,
                          whole.double().abs().movedim(1, -1).reshape(-1, 3).mean(0))
    assert torch.allclose(collectors["gram"].total, rows.T @ rows)
    assert collectors["gram"].count == 18
    assert torch.allclose(collectors["mean"].value, whole.double().mean(0))
    sample = collectors["rows"].value
    assert sample.shape == (5, 4) and torch.equal(sample[0], whole.reshape(-1, 4)[0])


def test_eora_minimizes_the_error_on_the_activations() -> None:
    """In the norm of H = X^T X the eigenspace projection beats a plain SVD of the error;
    at full rank it compensates everything."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(400, 24, generator=generator, dtype=torch.float64) @ torch.randn(
        24, 24, generator=generator, dtype=torch.float64)
    error = torch.randn(10, 24, generator=generator, dtype=torch.float64)

    def on_x(e: torch.Tensor) -> float:
        return float(((x @ e.T) ** 2).sum())
    u, s, vt = torch.linalg.svd(error, full_matrices=False)
    for rank in (1, 3, 6):
        a, b = eora_factors(error, x.T @ x, rank)
        assert a.shape == (rank, 24) and b.shape == (10, rank)
        plain = (u[:, :rank] * s[:rank]) @ vt[:rank]
        assert on_x(error - b @ a) < on_x(error - plain)
    a, b = eora_factors(error, x.T @ x, 10)
    assert on_x(error - b @ a) < 1e-18 * on_x(error)


def test_eora_ignores_directions_the_data_never_visits() -> None:
    x = torch.randn(50, 6, dtype=torch.float64)
    x[:, 4:] = 0
    a, _ = eora_factors(torch.randn(3, 6, dtype=torch.float64), x.T @ x, 2)
    assert torch.all(a[:, 4:].abs() < 1e-12)
    with pytest.raises(ValueError, match="rank must be in"):
        eora_factors(torch.randn(3, 6), torch.eye(6), 4)
