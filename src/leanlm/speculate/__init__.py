"""Speculative decoding: drafters (prompt lookup, a draft model) and the lossless verify loop."""

from leanlm.speculate.drafters import DraftModel, PromptLookup
from leanlm.speculate.loop import DraftLength, Sampling, SpecStats, speculative_generate

__all__ = ["DraftLength", "DraftModel", "PromptLookup", "Sampling", "SpecStats", "speculative_generate"]
