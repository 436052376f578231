"""``gp.quant``: quantization schemes (QuantSpec, QuantConfig and presets), observers and
calibration, used by the ``insert_fake_quant`` pass."""

from graphpress.quant.config import (
    PRESETS,
    QuantConfig,
    fp8,
    int4_weight_only,
    int8_dynamic,
    int8_static,
    int8_weight_only,
    scheme,
    w4a8,
)
from graphpress.quant.spec import QuantSpec

__all__ = [
    "PRESETS",
    "QuantConfig",
    "QuantSpec",
    "fp8",
    "int4_weight_only",
    "int8_dynamic",
    "int8_static",
    "int8_weight_only",
    "scheme",
    "w4a8",
]
