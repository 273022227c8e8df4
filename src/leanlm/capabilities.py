"""Importing this module registers every capability's step types and runtime modules."""

from leanlm import cast, prune, quantize  # noqa: F401
