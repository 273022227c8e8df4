"""Shared core: models, data, evaluation and benchmarking, used by every capability."""
