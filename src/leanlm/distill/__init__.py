"""Distillation: a student learns a teacher's distributions (forward/reverse KL, generalized JSD)."""

from leanlm.distill.distill import DistillConfig, distill_

__all__ = ["DistillConfig", "distill_"]
