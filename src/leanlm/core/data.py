"""Moved to leanlm.data.corpus in the 0.2 re-layering; the old name keeps working, with a warning."""

from leanlm.core.moved import moved

__getattr__ = moved(__name__, "leanlm.data.corpus")
