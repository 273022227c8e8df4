"""Quantization: `quantize_(model, config)` with one config type per method.

Methods: round-to-nearest (`rtn.py`) and GPTQ (`gptq.py`, layer by layer with calibration data),
their pure tensor math in `*_ops.py`; the runtime modules that compute with the packed weights
are `int8_linear.py` and `int4_linear.py`.
"""

from leanlm.quantize import int4_linear, int8_linear  # noqa: F401  (register the runtime modules for loading)
from leanlm.quantize.base import QUANTIZERS, quantize_
from leanlm.quantize.gptq import GPTQConfig
from leanlm.quantize.rtn import RTNConfig

__all__ = ["quantize_", "RTNConfig", "GPTQConfig", "QUANTIZERS"]
