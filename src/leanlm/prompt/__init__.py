"""Lean prompts: compress a long context to a token budget, keeping what the model needs (`leanlm prompt
compress`), and find what makes a prompt longer or less clear than it needs to be (`leanlm prompt lint`)."""

from leanlm.prompt.compress import Compressed, compress
from leanlm.prompt.lint import Finding, lint

__all__ = ["Compressed", "Finding", "compress", "lint"]
