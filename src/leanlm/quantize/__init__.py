"""Quantization: `quantize_(model, config)` with one config type per method.

Methods: round-to-nearest (`rtn.py`); GPTQ (`gptq.py`), AWQ (`awq.py`) and SmoothQuant W8A8
(`smoothquant.py`), layer by layer with calibration data, AWQ and SmoothQuant moving scales across
the exact pairs of `scale_pairs.py`; sensitivity-based mixed precision (`mixed.py`). Their pure
tensor math is in `*_ops.py`; the runtime modules that compute with the packed weights are
`int8_linear.py`, `int4_linear.py` and `w8a8_linear.py`.
"""

from leanlm.quantize import int4_linear, int8_linear, w8a8_linear  # noqa: F401  (register the runtime modules)
from leanlm.quantize.awq import AWQConfig
from leanlm.quantize.base import QUANTIZERS, quantize_
from leanlm.quantize.gptq import GPTQConfig
from leanlm.quantize.mixed import MixedConfig
from leanlm.quantize.rtn import RTNConfig
from leanlm.quantize.smoothquant import SmoothQuantConfig

__all__ = ["quantize_", "RTNConfig", "GPTQConfig", "AWQConfig", "SmoothQuantConfig", "MixedConfig", "QUANTIZERS"]
