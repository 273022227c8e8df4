"""Pruning: `prune_(model, config)` with one config type per method.

Methods: magnitude (`magnitude.py`), Wanda (`wanda.py`) and SparseGPT (`sparsegpt.py`), the last
two layer by layer with calibration data through core.layerwise; their pure math is `prune_ops.py`.
Each reaches a target sparsity or an N:M pattern and verifies what every layer achieved.
Structured pruning gives a smaller dense HF model: whole blocks (`depth.py`), FFN channels
(`width.py`) or attention heads and KV groups (`heads.py`), their math in `structured_ops.py`.
`sparse24_` (`sparse24.py`) keeps 2:4-pruned layers compressed and runs them through leanlm's GPU
kernel; the format's math is `sparse24_ops.py`.
"""

from leanlm.prune.base import PRUNERS, prune_
from leanlm.prune.depth import DepthConfig
from leanlm.prune.heads import HeadsConfig
from leanlm.prune.magnitude import MagnitudeConfig
from leanlm.prune.sparse24 import Sparse24Config, Sparse24Linear, sparse24_
from leanlm.prune.sparsegpt import SparseGPTConfig
from leanlm.prune.wanda import WandaConfig
from leanlm.prune.width import WidthConfig

__all__ = ["prune_", "MagnitudeConfig", "WandaConfig", "SparseGPTConfig", "DepthConfig", "WidthConfig", "HeadsConfig",
           "PRUNERS",
           "sparse24_", "Sparse24Config", "Sparse24Linear"]
