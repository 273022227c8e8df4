"""Distillation: a student learns a teacher's distributions (forward/reverse KL, generalized JSD), on the
reference text or on its own samples (on-policy), with the teacher live or its top-k logits cached."""

from leanlm.distill.distill import DistillConfig, Teacher, distill_

__all__ = ["DistillConfig", "Teacher", "distill_"]
