"""Quantization: `quantize_(model, config)` with one config type per method.

Round-to-nearest (RTN) weight-only int8 lives here today; the runtime module that computes
with the packed weights is in `int8_linear.py`, the pure tensor math in `rtn_ops.py`.
"""

from leanlm.quantize.base import QUANTIZERS, quantize_
from leanlm.quantize.rtn import RTNConfig

__all__ = ["quantize_", "RTNConfig", "QUANTIZERS"]
