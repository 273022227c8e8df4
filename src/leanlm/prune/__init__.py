"""Pruning: `prune_(model, config)` with one config type per method.

Methods: magnitude (`magnitude.py`), Wanda (`wanda.py`) and SparseGPT (`sparsegpt.py`), the last
two layer by layer with calibration data through core.layerwise; their pure math is `prune_ops.py`.
Each reaches a target sparsity or an N:M pattern and verifies what every layer achieved.
Structured pruning gives a smaller dense HF model: whole blocks (`depth.py`), FFN channels
(`width.py`) or attention heads and KV groups (`heads.py`), their math in `structured_ops.py`.
2:4 layers kept compressed for the GPU (`sparse24_`) live in leanlm.sparsify with the other runtime
sparsity.
"""

from leanlm.core.moved import moved
from leanlm.prune.base import PRUNERS, prune_
from leanlm.prune.depth import DepthConfig
from leanlm.prune.heads import HeadsConfig
from leanlm.prune.magnitude import MagnitudeConfig
from leanlm.prune.sparsegpt import SparseGPTConfig
from leanlm.prune.wanda import WandaConfig
from leanlm.prune.width import WidthConfig

__all__ = ["prune_", "MagnitudeConfig", "WandaConfig", "SparseGPTConfig", "DepthConfig", "WidthConfig", "HeadsConfig",
           "PRUNERS"]

__getattr__ = moved(__name__, {n: "leanlm.sparsify.sparse24" for n in ("sparse24_", "Sparse24Config", "Sparse24Linear")})
