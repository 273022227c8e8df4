"""Importing this module registers every capability's step types and runtime modules."""

from leanlm import cast, distill, finetune, prune, quantize, sparsify  # noqa: F401
