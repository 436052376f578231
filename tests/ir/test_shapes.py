"""fake_over_meta builds what FakeTensor's constructor builds."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from graphpress.ir.shapes import fake_over_meta


def _meta(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype,
          requires_grad: bool) -> torch.Tensor:
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta",
                               requires_grad=requires_grad)


def _summary(value: FakeTensor) -> tuple:
    return (type(value), value.shape, value.stride(), value.dtype, value.device,
            value.requires_grad, isinstance(value, torch.nn.Parameter),
            torch._C._dispatch_keys(value), value.fake_mode, value.__dict__)


@pytest.mark.parametrize("is_param", [False, True])
@pytest.mark.parametrize(("shape", "stride", "dtype", "requires_grad"), [
    ((4, 3, 2), (6, 2, 1), torch.float32, True),
    ((4, 3), (1, 4), torch.float16, False),
    ((5,), (1,), torch.int64, False),
    ((2, 1, 3), (3, 7, 1), torch.bfloat16, True),
])
def test_fake_over_meta_equals_the_constructor(shape, stride, dtype, requires_grad, is_param):
    mode = FakeTensorMode()
    device = torch.device("cpu")
    fake_over_meta(mode, _meta((1,), (1,), dtype, False), device, is_param=is_param)  # caches
    expected = FakeTensor(mode, _meta(shape, stride, dtype, requires_grad), device,
                          _is_param=is_param)
    built = fake_over_meta(mode, _meta(shape, stride, dtype, requires_grad), device,
                           is_param=is_param)
    assert _summary(built) == _summary(expected)
    with mode:      # and it computes like one
        assert (built.sum() if dtype.is_floating_point else built + 1).device == device


def test_fake_over_meta_rejects_a_tensor_that_is_not_meta():
    mode = FakeTensorMode()
    device = torch.device("cpu")
    fake_over_meta(mode, _meta((2,), (1,), torch.float32, False), device)
    with pytest.raises(ValueError, match="needs a meta tensor"):
        fake_over_meta(mode, torch.zeros(2), device)


def test_fake_over_meta_keeps_one_state_per_mode():
    first, second = FakeTensorMode(), FakeTensorMode()
    device = torch.device("cpu")
    for mode in (first, second, first, second):
        value = fake_over_meta(mode, _meta((2,), (1,), torch.float32, False), device)
        assert value.fake_mode is mode
