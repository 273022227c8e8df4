"""Moved to leanlm.measure.bench in the 0.2 re-layering; the old name keeps working, with a warning."""

from leanlm.core.moved import moved

__getattr__ = moved(__name__, "leanlm.measure.bench")
