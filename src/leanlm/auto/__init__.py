"""leanlm auto: the search across every technique (see search.py)."""

from leanlm.auto.search import auto

__all__ = ["auto"]
