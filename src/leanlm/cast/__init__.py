"""Dtype cast: float32 -> bfloat16 / float16, the simplest halving of memory and disk."""

from leanlm.cast.cast import CastConfig, cast_

__all__ = ["CastConfig", "cast_"]
