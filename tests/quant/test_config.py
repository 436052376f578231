"""QuantSpec and QuantConfig: ranges, the block_size convention, presets, overrides, errors."""

from __future__ import annotations

import pytest
import torch

import graphpress as gp
from graphpress.quant import QuantConfig, QuantSpec


def test_ranges_and_storage() -> None:
    assert QuantSpec("int8").qrange() == (-128, 127)
    assert QuantSpec("int8", narrow_range=True).qrange() == (-127, 127)
    assert QuantSpec("uint8", symmetric=False).qrange() == (0, 255)
    assert QuantSpec("int4").qrange() == (-8, 7)
    assert QuantSpec("uint4", symmetric=False).qrange() == (0, 15)
    assert QuantSpec("int3").qrange() == (-4, 3)
    assert QuantSpec("uint3", symmetric=False).qrange() == (0, 7)
    assert QuantSpec("int3").storage_dtype == torch.int8
    assert QuantSpec("float8_e4m3fn").qrange() == (-448.0, 448.0)
    assert QuantSpec("float8_e5m2").qrange() == (-57344.0, 57344.0)


def test_block_sizes() -> None:
    shape = (6, 8)
    assert QuantSpec("int8", "per_tensor").block_size(shape) == [6, 8]
    assert QuantSpec("int8", "per_channel").block_size(shape) == [1, 8]
    assert QuantSpec("int8", "per_channel", axis=1).block_size(shape) == [6, 1]
    assert QuantSpec("int4", "per_group", group_size=4).block_size(shape) == [1, 4]
    assert QuantSpec("int8", "per_token").block_size((2, 3, 8)) == [1, 1, 8]
    with pytest.raises(ValueError, match="does not divide the last dim"):
        QuantSpec("int4", "per_group", group_size=3).block_size(shape)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dtype": "int2"}, "unknown quantized dtype"),
    ({"granularity": "per_row"}, "unknown granularity"),
    ({"observer": "magic"}, "unknown observer"),
    ({"granularity": "per_group"}, "needs group_size"),
    ({"group_size": 32}, "group_size is for per_group"),
    ({"dtype": "float8_e4m3fn", "symmetric": False}, "scale-only"),
    ({"dtype": "uint8"}, "cannot be symmetric"),
    ({"dtype": "uint3"}, "cannot be symmetric"),
    ({"symmetric": False, "narrow_range": True}, "narrow_range"),
    ({"symmetric": False, "signed_scale": True}, "signed_scale is for symmetric integer"),
    ({"dtype": "float8_e4m3fn", "signed_scale": True}, "signed_scale is for symmetric integer"),
    ({"narrow_range": True, "signed_scale": True}, "without narrow_range"),
    ({"signed_scale": True, "dynamic": True}, "only static min-max qparams keep"),
    ({"signed_scale": True, "observer": "mse"}, "use observer='minmax'"),
])
def test_bad_specs_name_the_problem(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)  # type: ignore[arg-type]


def test_presets_and_overrides() -> None:
    static = gp.quant.int8_static(observer="percentile", skip=["*.classifier"])
    assert static.activation is not None and static.activation.observer == "percentile"
    assert static.for_layer("model.classifier", "linear") is None
    assert static.for_layer("model.features.0", "conv2d") is static
    assert gp.quant.scheme("int4_weight_only", group_size=64).weight.group_size == 64
    w3 = gp.quant.scheme("int3_weight_only", group_size=64)
    assert (w3.weight.dtype, w3.weight.group_size, w3.weight.symmetric) == ("int3", 64, False)
    assert w3.activation is None and w3.name == "int3_weight_only(group_size=64)"
    mixed = gp.quant.int8_dynamic().with_overrides(
        ("op:conv2d", gp.quant.int8_weight_only()),
        (lambda path, op: path.startswith("lm_head"), None))
    assert mixed.for_layer("encoder.conv", "conv2d").name == "int8_weight_only"
    assert mixed.for_layer("lm_head", "linear") is None
    assert gp.quant.w4a8().activation.dynamic and gp.quant.fp8(dynamic=False).activation.observer


def test_bad_schemes_and_configs() -> None:
    with pytest.raises(ValueError, match="unknown quantization scheme 'int2'.*int8_static"):
        gp.quant.scheme("int2")
    with pytest.raises(ValueError, match="does not take"):
        gp.quant.scheme("int8_dynamic", group_size=32)
    with pytest.raises(ValueError, match="cannot be dynamic"):
        QuantConfig(weight=QuantSpec("int8", dynamic=True))
    with pytest.raises(ValueError, match="needs a weight spec"):
        QuantConfig()
