"""leanlm: make a causal LM cheaper, faster and better at one job, and measure every step."""

from leanlm.core.paths import leanlm_version
from leanlm.errors import LeanLMError

__version__ = leanlm_version()

__all__ = ["LeanLMError", "__version__", "load_model", "evaluate", "benchmark", "optimize", "auto", "load_recipe", "quantize_",
           "prune_"]


def __getattr__(name: str):
    # Heavy imports (torch, transformers) wait until the API is used, so `leanlm --help` is instant.
    if name == "load_model":
        from leanlm.models.load import load_model
        return load_model
    if name == "evaluate":
        from leanlm.measure.evaluate import evaluate
        return evaluate
    if name == "benchmark":
        from leanlm.measure.bench import benchmark
        return benchmark
    if name == "optimize":
        from leanlm.pipeline.optimize import optimize
        return optimize
    if name == "auto":
        from leanlm.auto import auto
        return auto
    if name == "load_recipe":
        from leanlm.pipeline.recipe import load_recipe
        return load_recipe
    if name == "quantize_":
        from leanlm.quantize import quantize_
        return quantize_
    if name == "prune_":
        from leanlm.prune import prune_
        return prune_
    raise AttributeError(f"module 'leanlm' has no attribute {name!r}")
