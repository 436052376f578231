"""insert_fake_quant's weight algorithms on tiny programs (GPTQ, AWQ, bias correction, EoRA):
what they store, that the contract checks the same final weights (and AWQ's folding exactly),
the errors, and the zoo's transformers with verify=True."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.errors import ContractViolation, InputError, PassError, PipelineError
from graphpress.passes.quant import weight_algorithms
from graphpress.pipeline.samples import generate_samples
from graphpress.quant.algorithms.grid import fake_quantize
from graphpress.testing.zoo import ZooModel, zoo_models

W4 = "insert_fake_quant(scheme='int4_weight_only', group_size=16"


class NormMLP(nn.Module):
    """A pre-norm MLP block whose norm feeds two linears (AWQ folds into the norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.up, self.gate = nn.Linear(32, 64, bias=False), nn.Linear(32, 64, bias=False)
        self.down = nn.Linear(64, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.down(self.up(h) * torch.sigmoid(self.gate(h)))


def _norm_mlp() -> tuple[nn.Module, list[tuple[torch.Tensor]]]:
    torch.manual_seed(0)
    model = NormMLP().eval()
    with torch.no_grad():
        model.norm.weight[[3, 17]] = 12.0    # salient input channels
    generator = torch.Generator().manual_seed(1)
    return model, [(torch.randn(4, 8, 32, generator=generator),) for _ in range(4)]


def _error(compiled: gp.CompiledModel, model: nn.Module, batches: list) -> float:
    with torch.no_grad():
        return sum(float((compiled(*b) - model(*b)).pow(2).sum()) for b in batches)


def _compile(model: nn.Module, batches: list, passes: str) -> gp.CompiledModel:
    return gp.compile(model, batches[0], calibration_data=batches, passes=passes, verify=True)


def test_gptq_stores_weights_on_the_inserted_grid_and_beats_rtn() -> None:
    model, batches = _norm_mlp()
    rtn = _compile(model, batches, W4 + ")")
    gptq = _compile(model, batches, W4 + ", algorithm='gptq')")
    record = gptq.report().records[0]
    assert record.stats["gptq_layers"] == 3 and record.max_error <= 1e-5
    plan = record.details["weight_plan"]
    assert set(plan.adjusted) == {"up.weight", "gate.weight", "down.weight"}
    for name, tensor in plan.adjusted.items():
        scale, zero_point = plan.qparams[name]
        assert torch.equal(fake_quantize(tensor, [1, 16], _spec(), scale, zero_point), tensor)
        assert torch.equal(gptq.program.weights()[name], tensor)
    assert _error(gptq, model, batches) < 0.8 * _error(rtn, model, batches)
    assert any("gptq" in line and "RTN's" in line for line in record.details["summary"])


def _spec() -> gp.quant.QuantSpec:
    return gp.quant.int4_weight_only(group_size=16).weight


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_algorithms_on_the_signed_scale_grid(algorithm: str) -> None:
    """GPTQ's and AWQ's weights land on the signed-scale grid (negative scales included) and
    beat its round-to-nearest."""
    model, batches = _norm_mlp()
    config = gp.quant.int4_weight_only(group_size=16, symmetric=True, signed_scale=True)

    def compiled(**options: object) -> gp.CompiledModel:
        return gp.compile(model, batches[0], calibration_data=batches, verify=True,
                          passes=[gp.passes.InsertFakeQuant(config, **options)])
    rtn, tuned = compiled(), compiled(algorithm=algorithm)
    plan = tuned.report().records[0].details["weight_plan"]
    for name, (scale, zero_point) in plan.qparams.items():
        assert zero_point is None and bool((scale < 0).any())
        weight = tuned.program.weights()[name]
        on_grid = fake_quantize(weight, [1, 16], config.weight, scale, zero_point)
        # GPTQ stores the quantized weight itself; AWQ the folded float one, clipped qparams
        assert torch.equal(on_grid, weight) == (algorithm == "gptq")
        assert torch.equal(fake_quantize(on_grid, [1, 16], config.weight, scale, None), on_grid)
    assert plan.qparams
    assert _error(tuned, model, batches) < 0.9 * _error(rtn, model, batches)


def test_gptq_act_order_option() -> None:
    model, batches = _norm_mlp()
    compiled = _compile(model, batches, W4 + ", algorithm='gptq', "
                                             "algorithm_options={'act_order': True})")
    assert compiled.report().records[0].stats["gptq_layers"] == 3


def test_sequential_gptq_takes_each_hessian_after_the_layers_before_are_quantized() -> None:
    from graphpress.quant.algorithms.gptq import gptq_quantize

    model, batches = _norm_mlp()
    compiled = _compile(model, batches, W4 + ", algorithm='gptq', "
                                             "algorithm_options={'sequential': True})")
    weights = compiled.program.weights()
    with torch.no_grad():
        h = torch.cat([model.norm(x).reshape(-1, 32) for (x,) in batches]).double()
        up, _, _ = gptq_quantize(model.up.weight, h.T @ h, _spec(), [1, 16])
        gate, _, _ = gptq_quantize(model.gate.weight, h.T @ h, _spec(), [1, 16])
        assert torch.equal(weights["up.weight"], up) and torch.equal(weights["gate.weight"], gate)
        # down's inputs come from the quantized up and gate, not from the float ones
        mid = torch.cat([(model.norm(x) @ up.T) * torch.sigmoid(model.norm(x) @ gate.T)
                         for (x,) in batches]).reshape(-1, 64).double()
        down, _, _ = gptq_quantize(model.down.weight, mid.T @ mid, _spec(), [1, 16])
    assert torch.allclose(weights["down.weight"], down, atol=1e-6)
    parallel = _compile(model, batches, W4 + ", algorithm='gptq')").program.weights()
    assert torch.equal(parallel["up.weight"], up)
    assert not torch.allclose(parallel["down.weight"], down, atol=1e-6)


def test_gptq_auto_damp_quantizes_with_the_damping_its_search_chose() -> None:
    from graphpress.quant.algorithms.gptq import gptq_damp_search, gptq_quantize

    model, batches = _norm_mlp()
    compiled = _compile(model, batches, W4 + ", algorithm='gptq', "
                                             "algorithm_options={'damp': 'auto'})")
    record = compiled.report().records[0]
    assert record.stats["gptq_layers"] == 3 and record.max_error <= 1e-5
    with torch.no_grad():
        rows = [model.norm(x).reshape(-1, 32).double() for (x,) in batches]
    # four batches, four folds: batch b is fold b
    damp, _ = gptq_damp_search(model.up.weight.detach(), [h.T @ h for h in rows], _spec(),
                               [1, 16])
    h = torch.cat(rows)
    up, _, _ = gptq_quantize(model.up.weight.detach(), h.T @ h, _spec(), [1, 16], damp=damp)
    assert torch.equal(compiled.program.weights()["up.weight"], up)
    line = next(line for line in record.details["summary"] if line.startswith("gptq linear:"))
    assert f"damp {damp:g} (held-out error / damp 0.01's" in line


def test_awq_folds_into_the_norm_exactly_and_beats_rtn() -> None:
    model, batches = _norm_mlp()
    rtn = _compile(model, batches, W4 + ")")
    awq = _compile(model, batches, W4 + ", algorithm='awq')")
    record = awq.report().records[0]
    plan = record.details["weight_plan"]
    assert {"norm.weight", "norm.bias", "up.weight", "gate.weight"} <= set(plan.folded)
    assert not torch.equal(awq.program.weights()["norm.weight"], model.norm.weight)
    assert plan.qparams  # clipping chose qparams
    assert _error(awq, model, batches) < _error(rtn, model, batches)
    # the folding alone (no quantization) is the same function, bit for bit
    folded = gp.compile(model, batches[0], passes=[]).program
    for name, tensor in plan.folded.items():
        folded.replace_weight(name, tensor)
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(folded(*batch), model(*batch))


def test_awq_reports_the_spread_of_input_channel_magnitudes() -> None:
    """The summary line of a producer states max / median of mean|X_c| over its channels (what
    the scale search has to protect): the norm's channels 3 and 17 are scaled by 12."""
    model, batches = _norm_mlp()
    awq = _compile(model, batches, W4 + ", algorithm='awq')")
    with torch.no_grad():
        mean_abs = torch.cat([model.norm(x).reshape(-1, 32) for (x,) in batches]).abs().mean(0)
    expected = float(mean_abs.max() / mean_abs.median())
    line = next(line for line in awq.report().records[0].details["summary"]
                if line.startswith("awq ") and "alpha" in line)
    assert line.endswith(f"input channel magnitude max / median {expected:.1f}")
    assert expected > 5


def test_awq_two_sided_clipping_and_exact_scales() -> None:
    """The options of the search: two-sided clipping picks a low and a high ratio per block
    (recorded as qparams the contract checks), exact scales fold within the referee."""
    model, batches = _norm_mlp()
    rtn = _compile(model, batches, W4 + ")")
    awq = _compile(model, batches, W4 + ", algorithm='awq', algorithm_options={'two_sided': "
                   "True, 'power_of_two': False, 'duo': False})")
    record = awq.report().records[0]
    assert record.max_error <= 1e-5 and record.details["weight_plan"].qparams
    assert _error(awq, model, batches) < _error(rtn, model, batches)
    assert any(line.startswith("awq clipping") for line in record.details["summary"])


def test_awq_grid_refinement_lowers_the_error_of_clipping() -> None:
    """``refine`` re-fits each block's grid after the clipping search (qparams the contract
    checks); with ``clip=False`` it starts from the min-max grid."""
    model, batches = _norm_mlp()
    clipped = _compile(model, batches, W4 + ", algorithm='awq', algorithm_options={'refine': 0})")
    refined = _compile(model, batches, W4 + ", algorithm='awq', algorithm_options={'refine': 4})")
    alone = _compile(model, batches, W4 + ", algorithm='awq', algorithm_options={'refine': 4, "
                     "'clip': False})")
    for compiled in (refined, alone):
        record = compiled.report().records[0]
        assert record.max_error <= 1e-5 and record.details["weight_plan"].qparams
    assert _error(refined, model, batches) < _error(clipped, model, batches)
    assert any("refined" in line for line in refined.report().records[0].details["summary"])


def test_awq_exact_part_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A folding that changes the float function fails the contract, naming the exact part,
    even though the quantized reference uses the same (wrong) weights."""
    model, batches = _norm_mlp()
    apply = weight_algorithms.apply_scales

    def broken(program: gp.Program, chain: object, scale: torch.Tensor) -> None:
        apply(program, chain, scale)
        param = chain.params[0]
        program.replace_weight(param, program.weight(param) * 1.01)
    monkeypatch.setattr(weight_algorithms, "apply_scales", broken)
    with pytest.raises(ContractViolation, match="exact part of its contract failed"):
        _compile(model, batches, W4 + ", algorithm='awq')")


def test_bias_correction_restores_the_mean_output() -> None:
    """Weight-only: after correction the quantized layer's mean output over the calibration
    data equals the float one (the closed form of the correction)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(32, 16, generator=generator) + 2.0,) for _ in range(3)]
    scheme = "insert_fake_quant(scheme='int4_weight_only', group_size=8"
    plain = _compile(model, batches, scheme + ")")
    corrected = _compile(model, batches, scheme + ", bias_correction=True)")
    record = corrected.report().records[0]
    assert record.stats["bias_corrected"] == 1

    def mean_output(fn: object) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([fn(*b) for b in batches]).double().mean(0)
    reference = mean_output(model)
    assert (mean_output(corrected) - reference).abs().max() < 1e-5
    assert (mean_output(plain) - reference).abs().max() > 1e-3


def test_bias_correction_gives_a_bias_to_layers_without_one() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(64, 5, bias=False)).eval()
    batches = [(torch.rand(2, 3, 4, 4) + 0.5,) for _ in range(3)]
    compiled = _compile(model, batches,
                        "insert_fake_quant(scheme='int8_static', bias_correction=True)")
    record = compiled.report().records[0]
    assert record.stats["bias_corrected"] == 2 and record.max_error <= 1e-5
    assert any("corrected_bias" in name for name in compiled.program.weights())


def test_errors_name_the_fix() -> None:
    model, batches = _norm_mlp()
    with pytest.raises(PipelineError, match="unknown algorithm 'obq'; known: rtn, gptq, awq"):
        gp.compile(model, batches[0], passes=W4 + ", algorithm='obq')")
    with pytest.raises(PipelineError, match="does not take dampening; it accepts: damp"):
        gp.compile(model, batches[0],
                   passes=W4 + ", algorithm='gptq', algorithm_options={'dampening': 1})")
    with pytest.raises(PipelineError, match="damp=-1 is neither a number >= 0 nor 'auto'"):
        gp.compile(model, batches[0], calibration_data=batches,
                   passes=W4 + ", algorithm='gptq', algorithm_options={'damp': -1})")
    with pytest.raises(PipelineError, match=r"refine=1.5 is not a step count >= 0 \(0: keep"):
        gp.compile(model, batches[0], calibration_data=batches,
                   passes=W4 + ", algorithm='awq', algorithm_options={'refine': 1.5})")
    with pytest.raises(PassError, match="damp='auto' .* needs at least 2, got 1"):
        gp.compile(model, batches[0], calibration_data=batches[:1],
                   passes=W4 + ", algorithm='gptq', algorithm_options={'damp': 'auto'})")
    with pytest.raises(InputError, match="gptq needs calibration data"):
        gp.compile(model, batches[0], passes=W4 + ", algorithm='gptq')")


def test_gptq_leaves_convolutions_to_rounding_and_says_so() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2)).eval()
    batches = [(torch.randn(2, 3, 4, 4),) for _ in range(2)]
    compiled = _compile(model, batches,
                        "insert_fake_quant(scheme='int8_weight_only', algorithm='gptq')")
    record = compiled.report().records[0]
    assert record.stats["gptq_layers"] == 1
    assert any("rounding to nearest" in why for _, why in record.skipped)


def test_eora_adds_a_float_branch_that_lowers_the_error() -> None:
    model, batches = _norm_mlp()
    rtn = _compile(model, batches, W4 + ")")
    for algorithm in ("rtn", "gptq"):
        plain = _compile(model, batches, W4 + f", algorithm='{algorithm}')")
        eora = _compile(model, batches, W4 + f", algorithm='{algorithm}', eora_rank=4)")
        record = eora.report().records[0]
        assert record.stats["eora_layers"] == 3 and record.max_error <= 1e-5
        assert _error(eora, model, batches) < 0.5 * _error(plain, model, batches)
    assert _error(eora, model, batches) < _error(rtn, model, batches)
    weights = eora.program.weights()
    assert weights["up.eora_a"].shape == (4, 32) and weights["up.eora_b"].shape == (64, 4)
    linears = [n for n in eora.program.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 3 + 6
    with pytest.raises(PipelineError, match="eora_rank must be >= 0"):
        gp.compile(model, batches[0], passes=W4 + ", eora_rank=-1)")


def test_eora_branch_reads_the_unquantized_activation() -> None:
    model, batches = _norm_mlp()
    compiled = _compile(model, batches, "insert_fake_quant(scheme='int8_static', eora_rank=2, "
                                        "bias_correction=True)")
    record = compiled.report().records[0]
    assert record.stats["eora_layers"] == 3 and record.stats["bias_corrected"] == 3
    fq = torch.ops.graphpress.fake_quantize_affine.default
    for node in compiled.program.graph.nodes:
        if node.target == torch.ops.aten.linear.default and "eora_a" in str(node.args[1]):
            assert node.args[0].target != fq


def _transformers() -> list[pytest.param]:
    return [pytest.param(e, id=e.name, marks=[pytest.mark.slow] if e.name == "minilm" else [])
            for e in zoo_models(include=("transformer",))]


@pytest.mark.parametrize("options", [
    "algorithm='gptq'", "algorithm='awq'", "eora_rank=4",
    "algorithm='awq', algorithm_options={'loss': 'block', 'two_sided': True}"])
@pytest.mark.parametrize("entry", _transformers())
def test_algorithms_on_the_zoo(entry: ZooModel, options: str) -> None:
    model, inputs = entry.make()
    batches = [args for args, _ in generate_samples((inputs, {}), 4, seed=1)]
    compiled = gp.compile(model, inputs, calibration_data=batches, verify=True,
                          passes=f"{W4}, {options})")
    record = compiled.report().records[-1]
    assert record.max_error is not None and record.max_error <= 1e-5
    assert record.metrics["cosine vs input"] > 0.9, record.metrics
    if options == "algorithm='gptq'":
        assert record.stats["gptq_layers"] == record.stats["weights"]
