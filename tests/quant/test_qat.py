"""QAT: the straight-through and LSQ gradients, conv-bn simulated folding, convert (equal to the
QAT module in eval, saves, loads, exports to ONNX), and the digits CNN recovering accuracy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpress as gp
from graphpress.quant import QuantConfig, QuantSpec
from graphpress.quant.qat import FakeQuantize, QATLayer, freeze, qat_info
from graphpress.testing.zoo import accuracy, digits_data, get_model

INT8_ASYM = QuantSpec("int8", "per_tensor", symmetric=False)


def _observed(spec: QuantSpec, low: float, high: float, *, learn: bool = False) -> FakeQuantize:
    """A static activation FakeQuantize that has observed the range [low, high]."""
    fq = FakeQuantize(spec, "activation", [1], learn_scale=learn)
    fq.train()
    fq(torch.tensor([low, high]))
    return fq.eval()


class ConvBnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.3, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def _net() -> ConvBnNet:
    torch.manual_seed(0)
    return ConvBnNet().eval()


def test_ste_gradient_is_one_inside_the_range_and_zero_outside() -> None:
    fq = _observed(INT8_ASYM, -1.0, 1.0)
    x = torch.tensor([-3.0, -1.0, -0.4, 0.3, 0.99, 1.5, 3.0], requires_grad=True)
    y = fq(x)
    y.backward(torch.ones_like(y))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    scale = float(fq.scale)
    assert torch.allclose(y[2:5], x[2:5], atol=scale / 2)   # inside: within half a step
    assert y[0] == y[1] and y[5] == y[6]                      # outside: clamped


def test_lsq_scale_gradient() -> None:
    spec = INT8_ASYM
    fq = _observed(spec, -1.0, 1.0, learn=True)
    assert isinstance(fq.scale, nn.Parameter)
    x = torch.tensor([-3.0, -0.37, 0.0, 0.26, 0.61, 2.5], requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5, -1.0])
    fq(x).backward(g)
    s, z = float(fq.scale.detach()), float(fq.zero_point)
    qmin, qmax = spec.qrange()
    grid = torch.round(x.detach() * (1 / torch.tensor(s))) + z
    inside = (grid >= qmin) & (grid <= qmax)
    per_element = torch.where(inside, grid - z - x.detach() / s,
                              torch.where(grid < qmin, qmin - z, qmax - z))
    expected = (g * per_element).sum() / math.sqrt(x.numel() * qmax)
    assert torch.allclose(fq.scale.grad.reshape(()), expected, rtol=1e-5, atol=1e-7)
    assert x.grad.tolist() == inside.float().mul(g).tolist()


def test_lsq_per_channel_weight_gradient_has_the_scale_shape() -> None:
    net = _net()
    qat = gp.quant.prepare_qat(net, gp.quant.int8_static(), (torch.randn(2, 3, 6, 6),),
                               learn_scales=True)
    qat(torch.randn(4, 3, 6, 6)).sum().backward()
    weight_quant = qat.conv.weight_quant
    assert weight_quant.scale.shape == (8, 1, 1, 1)
    assert weight_quant.scale.grad is not None and weight_quant.scale.grad.abs().sum() > 0
    assert qat.conv.input_quant.scale.grad is not None


@pytest.mark.parametrize("training", [True, False])
def test_conv_bn_simulated_folding_equals_conv_bn_without_fake_quant(training: bool) -> None:
    net = _net()
    qat = gp.quant.prepare_qat(net, gp.quant.int8_static(), (torch.randn(2, 3, 6, 6),))
    assert isinstance(qat.conv, QATLayer) and isinstance(qat.bn, nn.Identity)
    assert "folds bn" in qat_info(qat).layers["conv"]
    gp.quant.enable_fake_quant(qat, False)
    x = torch.randn(8, 3, 6, 6)
    net.train(training)
    qat.train(training)
    expected, got = net(x), qat(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qat.conv.bn.running_mean, net.bn.running_mean)
    torch.testing.assert_close(qat.conv.bn.running_var, net.bn.running_var)
    expected.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(qat.conv.layer.weight.grad, net.conv.weight.grad,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(qat.conv.bn.weight.grad, net.bn.weight.grad,
                               rtol=1e-4, atol=1e-5)


def test_training_updates_running_statistics_and_eval_uses_them() -> None:
    net = _net()
    qat = gp.quant.prepare_qat(net, gp.quant.int8_static(), (torch.randn(2, 3, 6, 6),))
    bn = qat.conv.bn
    before = bn.running_mean.clone()
    qat.train()
    qat(torch.randn(8, 3, 6, 6) + 1.0)
    trained = bn.running_mean.clone()
    assert not torch.equal(trained, before)
    qat.eval()
    x = torch.randn(4, 3, 6, 6)
    y = qat(x)
    assert torch.equal(bn.running_mean, trained)
    # eval: conv(x, FQ(W * f)) + beta + (b - running_mean) * f with the running statistics
    f = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = qat.conv.weight_quant(qat.conv.layer.weight * f.reshape(-1, 1, 1, 1))
    bias = bn.bias + (qat.conv.layer.bias - bn.running_mean) * f
    conv = F.conv2d(qat.conv.input_quant(x), weight, bias, padding=1)
    torch.testing.assert_close(y, qat.fc(F.relu(conv).flatten(1)), rtol=0, atol=0)
    gp.quant.freeze_bn_stats(gp.quant.enable_observers(qat, False))
    qat.train()
    torch.testing.assert_close(qat(x), y, rtol=0, atol=0)   # the eval form, frozen statistics
    assert torch.equal(bn.running_mean, trained)


def test_observer_is_a_moving_average_until_disabled() -> None:
    fq = FakeQuantize(INT8_ASYM, "activation", [1], averaging_constant=0.5).train()
    fq(torch.tensor([-1.0, 1.0]))
    fq(torch.tensor([-3.0, 2.0]))
    assert fq.min_val.item() == -2.0 and fq.max_val.item() == 1.5
    gp.quant.enable_observers(fq, False)
    fq(torch.tensor([-10.0, 10.0]))
    assert fq.min_val.item() == -2.0 and fq.max_val.item() == 1.5
    assert fq.scale.item() == pytest.approx(3.5 / 255)


def _train(qat: nn.Module, steps: int = 5) -> None:
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    qat.train()
    for step in range(steps):
        torch.manual_seed(step)
        optimizer.zero_grad()
        qat(torch.randn(8, 3, 6, 6)).square().mean().backward()
        optimizer.step()


def test_convert_equals_qat_eval_saves_loads_and_exports(tmp_path) -> None:
    example = (torch.randn(2, 3, 6, 6),)
    qat = gp.quant.prepare_qat(_net(), gp.quant.int8_static(), example)
    _train(qat)
    compiled = gp.quant.convert(qat, dynamic_batch=True)
    targets = [n.target for n in compiled.program.graph_module.graph.nodes]
    assert targets.count(torch.ops.graphpress.fake_quantize_affine.default) == 4
    assert not any("batch_norm" in str(t) for t in targets)
    assert "convert vs QAT eval max abs error" in compiled.report().extra
    x = torch.randn(16, 3, 6, 6)
    qat.eval()
    with torch.no_grad():
        expected = qat(x)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    loaded = gp.load(compiled.save(tmp_path / "qat"))
    torch.testing.assert_close(loaded(x), compiled(x), rtol=0, atol=0)
    # onnxruntime's int8 kernels may round a value to the neighbouring grid point; the eager
    # comparison of gp.compile is at fp32 tolerance, so it is made here with a step's margin
    onnx = gp.quant.convert(qat, backend="onnx", verify=False, dynamic_batch=True,
                            backend_options={"opset": 21})
    assert (onnx.save(tmp_path / "onnx") / "model.onnx").exists()
    got = onnx(x)
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


def test_dynamic_activations_and_overrides() -> None:
    example = (torch.randn(2, 3, 6, 6),)
    qat = gp.quant.prepare_qat(_net(), gp.quant.int8_dynamic(skip=["fc"]), example)
    assert isinstance(qat.fc, nn.Linear)
    assert qat_info(qat).skipped == [("fc", "an override keeps it in float")]
    _train(qat, steps=2)
    compiled = gp.quant.convert(qat)
    targets = [n.target for n in compiled.program.graph_module.graph.nodes]
    assert torch.ops.graphpress.choose_qparams_affine.default in targets
    qat.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(*example), qat(*example), rtol=1e-5, atol=1e-5)
    static_per_token = QuantConfig(activation=QuantSpec("int8", "per_token"))
    with pytest.raises(ValueError, match="static activation qparams must be per_tensor"):
        gp.quant.prepare_qat(_net(), static_per_token, example)


def test_conv_output_read_elsewhere_keeps_the_batch_norm() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    qat = gp.quant.prepare_qat(Residual().eval(), gp.quant.int8_static(),
                               (torch.randn(2, 4, 3, 3),))
    assert isinstance(qat.bn, nn.BatchNorm2d) and qat.conv.bn is None


def test_layer_called_twice_in_a_step_trains() -> None:
    """The observer replaces its qparams (the first call saved them for its backward)."""
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    qat = gp.quant.prepare_qat(Twice(), gp.quant.int8_static(), (torch.randn(2, 4),))
    x = torch.randn(8, 4)
    qat(x).sum().backward()
    assert qat.fc.layer.weight.grad is not None
    qat.eval()
    with torch.no_grad():
        torch.testing.assert_close(gp.quant.convert(qat)(x[:2]), qat(x[:2]), rtol=0, atol=0)


def test_errors_name_the_fix() -> None:
    example = (torch.randn(2, 3, 6, 6),)
    with pytest.raises(TypeError, match="prepare_qat"):
        gp.quant.convert(_net())
    qat = gp.quant.prepare_qat(_net(), gp.quant.int8_static(), example)
    with pytest.raises(RuntimeError, match="observer has seen no data"):
        qat.eval()(*example)
    with pytest.raises(ValueError, match="already prepared"):
        gp.quant.prepare_qat(qat, gp.quant.int8_static(), example)
    signed = gp.quant.int4_weight_only(group_size=32, symmetric=True, signed_scale=True)
    with pytest.raises(ValueError, match="cannot train int4 per_group g32 sym signed"):
        gp.quant.prepare_qat(_net(), signed, example)
    # an override's signed grid is refused too, naming the layer
    with pytest.raises(ValueError, match=r"sym signed minmax \(signed_scale\) at fc"):
        gp.quant.prepare_qat(_net(), gp.quant.int8_static().with_overrides(("fc", signed)),
                             example)
    group = QuantConfig(weight=QuantSpec("int4", "per_group", group_size=7))
    with pytest.raises(ValueError, match="group_size=7 does not divide K=288 of fc"):
        gp.quant.prepare_qat(_net().requires_grad_(False),
                             group.with_overrides(skip=["conv"]), example)
    calibrated = gp.quant.prepare_qat(_net(), gp.quant.int8_static(), example,
                                      calibration_data=[example])
    assert bool(calibrated.conv.input_quant.observed)
    assert isinstance(freeze(calibrated).conv, nn.Module)


def test_user_model_is_untouched() -> None:
    net = _net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    qat = gp.quant.prepare_qat(net, gp.quant.int8_static(), (torch.randn(2, 3, 6, 6),))
    _train(qat)
    gp.quant.convert(qat)
    assert isinstance(net.conv, nn.Conv2d) and isinstance(net.bn, nn.BatchNorm2d)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_digits_cnn_int4_qat_recovers_float_accuracy(one_thread: None) -> None:
    """int4 per-channel weights (groups of 32 on the classifier) + int8 activations: PTQ,
    then three epochs of QAT (the last with observers and BN statistics frozen) lower the
    training loss and keep test accuracy within a point of float; the converted program
    scores as the QAT module does."""
    x_train, y_train, x_test, y_test = digits_data()
    model = get_model("digits_cnn").build()
    config = QuantConfig(weight=QuantSpec("int4", "per_channel"), activation=INT8_ASYM)
    config = config.with_overrides(("classifier", QuantConfig(
        weight=QuantSpec("int4", "per_group", group_size=32), activation=INT8_ASYM)))
    qat = gp.quant.prepare_qat(model, config, (x_test[:2],),
                               calibration_data=[(b,) for b in x_train.split(256)])

    def loss() -> float:
        qat.eval()
        with torch.no_grad():
            return F.cross_entropy(qat(x_train), y_train).item()

    float_accuracy = accuracy(model, x_test, y_test)
    ptq_loss, ptq_accuracy = loss(), accuracy(qat.eval(), x_test, y_test)
    optimizer = torch.optim.Adam(qat.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(3):
        if epoch == 2:
            gp.quant.enable_observers(qat, False)
            gp.quant.freeze_bn_stats(qat)
        qat.train()
        for batch in torch.randperm(len(x_train), generator=generator).split(64):
            optimizer.zero_grad()
            F.cross_entropy(qat(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    qat_loss, qat_accuracy = loss(), accuracy(qat.eval(), x_test, y_test)
    print(f"float {float_accuracy:.2%}, PTQ {ptq_accuracy:.2%} (loss {ptq_loss:.4f}), "
          f"QAT {qat_accuracy:.2%} (loss {qat_loss:.4f})")
    assert qat_loss < ptq_loss
    assert qat_accuracy >= float_accuracy - 0.01
    compiled = gp.quant.convert(qat, dynamic_batch=True)
    assert accuracy(compiled, x_test, y_test) == qat_accuracy
