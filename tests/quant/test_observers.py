"""Observers: qparams on known data, per channel / per group, determinism, exact merging, and
clipping of outliers by the histogram observers."""

from __future__ import annotations

import pytest
import torch

from graphpress.errors import InputError
from graphpress.ops.quant import qparams_from_minmax
from graphpress.quant.observers import make_observer
from graphpress.quant.spec import OBSERVERS, QuantSpec

ALL = list(OBSERVERS)


def spec(observer: str = "minmax", **kwargs: object) -> QuantSpec:
    args = kwargs.pop("args", {})
    return QuantSpec(observer=observer, observer_args=args, **kwargs)  # type: ignore[arg-type]


def data(seed: int, shape: tuple[int, ...] = (256, 16)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_minmax_exact_values() -> None:
    obs = make_observer(spec(symmetric=False), (2, 3))
    obs.update(torch.tensor([[-1.0, 0.5, 2.0], [0.0, 1.0, 1.5]]))
    obs.update(torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    lo, hi = obs.ranges()
    assert lo.shape == hi.shape == (1, 1)
    assert (lo.item(), hi.item()) == (-1.0, 3.0)
    scale, zero_point = obs.qparams()
    assert scale.item() == pytest.approx(4.0 / 255)
    assert zero_point is not None and zero_point.item() == -128 + round(1.0 / (4.0 / 255))
    sym = make_observer(spec(), (2, 3))
    sym.update(torch.tensor([[-1.0, 0.5, 2.0], [0.0, 1.0, 1.5]]))
    scale, zero_point = sym.qparams()
    assert zero_point is None and scale.item() == pytest.approx(2.0 / 127.5)


def test_moving_average_exact_values() -> None:
    obs = make_observer(spec("moving_average", symmetric=False, args={"averaging_constant": 0.5}),
                        (4,))
    for lo, hi in [(-2.0, 2.0), (0.0, 4.0), (-4.0, 0.0)]:
        obs.update(torch.tensor([lo, hi, 0.0, 0.0]))
    lo, hi = obs.ranges()
    # lo: -2 -> -1 -> -2.5; hi: 2 -> 3 -> 1.5
    assert (lo.item(), hi.item()) == (-2.5, 1.5)


def test_qparams_use_the_shared_formula() -> None:
    for observer in ALL:
        obs = make_observer(spec(observer, symmetric=False), (256, 16))
        obs.update(data(0))
        lo, hi = obs.ranges()
        expected = qparams_from_minmax(lo, hi, -128, 127, False, "int8")
        scale, zero_point = obs.qparams()
        assert torch.equal(scale, expected[0]) and torch.equal(zero_point, expected[1])


def test_percentile_on_a_known_distribution() -> None:
    # 0, 1, ..., 9999: the 99th percentile is 9900 (bins are 16 wide here: within one bin)
    values = torch.arange(10000, dtype=torch.float32)
    obs = make_observer(spec("percentile", symmetric=False, args={"percentile": 99.0}), (10000,))
    obs.update(values)
    lo, hi = obs.ranges()
    assert lo.item() == pytest.approx(100.0, abs=16)
    assert hi.item() == pytest.approx(9900.0, abs=16)
    sym = make_observer(spec("percentile", args={"percentile": 99.0}), (10000,))
    sym.update(values - 5000)
    lo, hi = sym.ranges()
    assert hi.item() == pytest.approx(4950.0, abs=8) and lo.item() == -hi.item()


@pytest.mark.parametrize("observer", ["percentile", "mse", "entropy"])
def test_outlier_is_clipped(observer: str) -> None:
    # one value at 60 among 200000 of N(0, 1). MSE: a range [-T, T] costs (60 - T)^2 for the
    # outlier plus 200000 (T / 127.5)^2 / 12 of rounding, least at T ~ 60 / 2.03
    x = data(1, (200000,))
    x[1234] = 60.0
    minmax = make_observer(spec(), x.shape)
    minmax.update(x)
    clipping = make_observer(spec(observer, args={"percentile": 99.9} if observer == "percentile"
                                  else {}), x.shape)
    clipping.update(x)
    lo, hi = clipping.ranges()
    assert minmax.ranges()[1].item() == 60.0
    limit = 33.0 if observer == "mse" else 10.0
    assert hi.item() < limit and -limit < lo.item()
    assert clipping.qparams()[0].item() < minmax.qparams()[0].item() * limit / 60
    assert lo.item() >= x.min().item()
    if observer == "mse":
        assert hi.item() > 27.0


@pytest.mark.parametrize("observer", ALL)
def test_no_clipping_without_outliers_beyond_the_data(observer: str) -> None:
    x = data(2)
    obs = make_observer(spec(observer, symmetric=False), x.shape)
    obs.update(x)
    lo, hi = obs.ranges()
    assert x.min() <= lo <= hi <= x.max()


@pytest.mark.parametrize("observer", ALL)
def test_deterministic(observer: str) -> None:
    results = []
    for _ in range(2):
        obs = make_observer(spec(observer, symmetric=False), (256, 16))
        for seed in range(3):
            obs.update(data(seed))
        results.append(obs.qparams())
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("observer", ALL)
def test_merge_equals_one_observer_on_the_union(observer: str) -> None:
    make = lambda: make_observer(spec(observer, symmetric=False), (256, 16))  # noqa: E731
    whole, first, second = make(), make(), make()
    # growing magnitudes: the histogram grid coarsens between batches
    batches = [data(seed) * 4.0 ** seed for seed in range(4)]
    for i, batch in enumerate(batches):
        whole.update(batch)
        (first if i < 2 else second).update(batch)
    first.merge(second)
    for key, value in whole.state().items():
        assert torch.equal(value, first.state()[key]), key
    assert torch.equal(whole.qparams()[0], first.qparams()[0])
    assert torch.equal(whole.qparams()[1], first.qparams()[1])


def test_histogram_merge_is_order_independent() -> None:
    make = lambda: make_observer(spec("entropy"), (256, 16))  # noqa: E731
    a, b = make(), make()
    a.update(data(0) * 100)
    b.update(data(1) * 0.01)
    ab = make().merge(a).merge(b)
    ba = make().merge(b).merge(a)
    assert all(torch.equal(ab.state()[k], ba.state()[k]) for k in ab.state())


@pytest.mark.parametrize("observer", ALL)
def test_per_channel(observer: str) -> None:
    x = data(3, (4, 1000))
    x = x * torch.tensor([1.0, 2.0, 4.0, 8.0])[:, None]
    obs = make_observer(spec(observer, granularity="per_channel"), (4, 1000))
    obs.update(x)
    scale, zero_point = obs.qparams()
    assert scale.shape == (4, 1) and zero_point is None
    for channel in range(4):
        alone = make_observer(spec(observer), (1, 1000))
        alone.update(x[channel : channel + 1])
        assert torch.equal(alone.qparams()[0].flatten(), scale[channel])
    assert bool((scale[1:] > scale[:-1]).all())


def test_per_channel_activation_axis_and_batch_size() -> None:
    obs = make_observer(spec(granularity="per_channel", axis=1), (8, 3, 5))
    obs.update(torch.ones(8, 3, 5) * torch.tensor([1.0, 2.0, 3.0])[None, :, None])
    assert obs.qparams()[0].shape == (1, 3, 1)
    with pytest.raises(InputError, match="qparams would have shape"):
        obs.update(torch.ones(8, 4, 5))
    per_tensor = make_observer(spec(), (8, 3))
    per_tensor.update(torch.ones(2, 3))        # a smaller last batch is fine per tensor
    assert per_tensor.ranges()[1].item() == 1.0


@pytest.mark.parametrize("observer", ["minmax", "mse", "percentile"])
def test_per_group(observer: str) -> None:
    w = data(4, (6, 32))
    obs = make_observer(spec(observer, dtype="int4", granularity="per_group", group_size=8,
                             symmetric=False), (6, 32))
    obs.update(w)
    scale, zero_point = obs.qparams()
    assert scale.shape == zero_point.shape == (6, 4)
    lo, hi = obs.ranges()
    blocks = w.reshape(6, 4, 8)
    assert bool((lo >= blocks.amin(-1)).all()) and bool((hi <= blocks.amax(-1)).all())


@pytest.mark.parametrize("observer", ALL)
def test_int3_grid(observer: str) -> None:
    """Every observer calibrates the 8-level grid: asymmetric scale (max - min) / 7 for min-max,
    zero points inside [-4, 3], and the observers that clip never widen the range."""
    obs = make_observer(spec(observer, dtype="int3", symmetric=False), (256, 16))
    x = data(6)
    obs.update(x)
    scale, zero_point = obs.qparams()
    assert zero_point is not None and -4 <= int(zero_point.min()) <= int(zero_point.max()) <= 3
    if observer == "minmax":
        assert scale.item() == pytest.approx(float(x.max() - x.min()) / 7)
    else:
        assert scale.item() <= float(x.max() - x.min()) / 7 * (1 + 1e-6)


def test_fp8_has_no_zero_point() -> None:
    obs = make_observer(spec("mse", dtype="float8_e4m3fn"), (256, 16))
    obs.update(data(5))
    scale, zero_point = obs.qparams()
    assert zero_point is None and scale.item() > 0


def test_state_round_trip() -> None:
    for observer in ALL:
        obs = make_observer(spec(observer), (256, 16))
        obs.update(data(6))
        copy = make_observer(spec(observer), (256, 16))
        copy.load_state(obs.state())
        assert torch.equal(copy.qparams()[0], obs.qparams()[0])
        with pytest.raises(ValueError, match="state has the keys"):
            copy.load_state({"nothing": torch.zeros(1)})


def test_errors() -> None:
    with pytest.raises(ValueError, match="dynamic"):
        make_observer(QuantSpec(dynamic=True, granularity="per_token"), (4, 4))
    with pytest.raises(ValueError, match="does not take"):
        make_observer(spec("minmax", args={"percentile": 99.0}), (4,))
    with pytest.raises(ValueError, match="power of two"):
        make_observer(spec("mse", args={"bins": 100}), (4,))
    with pytest.raises(ValueError, match="integer grid"):
        make_observer(spec("entropy", dtype="float8_e4m3fn"), (4,))
    obs = make_observer(spec(), (4,))
    with pytest.raises(ValueError, match="has seen no data"):
        obs.qparams()
    with pytest.raises(ValueError, match="non-finite"):
        obs.update(torch.tensor([1.0, float("inf"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="cannot merge"):
        obs.merge(make_observer(spec("percentile"), (4,)))
