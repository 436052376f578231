"""``gp.quant``: quantization schemes (QuantSpec, QuantConfig and presets), observers and
calibration, used by the ``insert_fake_quant`` pass; quantization-aware training
(``prepare_qat``, ``convert``: :mod:`graphpress.quant.qat`)."""

from graphpress.quant.calibration import calibrate
from graphpress.quant.config import (
    PRESETS,
    QuantConfig,
    fp8,
    int3_weight_only,
    int4_weight_only,
    int8_dynamic,
    int8_static,
    int8_weight_only,
    scheme,
    w4a8,
)
from graphpress.quant.observers import Observer, make_observer
from graphpress.quant.qat import (
    convert,
    enable_fake_quant,
    enable_observers,
    freeze_bn_stats,
    prepare_qat,
)
from graphpress.quant.spec import QuantSpec

__all__ = [
    "PRESETS",
    "Observer",
    "QuantConfig",
    "QuantSpec",
    "calibrate",
    "convert",
    "enable_fake_quant",
    "enable_observers",
    "fp8",
    "freeze_bn_stats",
    "int3_weight_only",
    "int4_weight_only",
    "int8_dynamic",
    "int8_static",
    "int8_weight_only",
    "make_observer",
    "prepare_qat",
    "scheme",
    "w4a8",
]
