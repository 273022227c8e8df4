"""Exceptions that leanlm raises for bad input.

Every public entry point turns user mistakes into a `LeanLMError` whose message says what was
wrong and what to do; the CLI prints it without a traceback and exits with status 2.
"""


class LeanLMError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in leanlm."""


class ModelNotFoundError(LeanLMError):
    pass


class UnsupportedModelError(LeanLMError):
    pass


class InsufficientMemoryError(LeanLMError):
    pass


class DataError(LeanLMError):
    pass


class ConfigError(LeanLMError):
    pass


class OutputError(LeanLMError):
    """The output path cannot be written."""


class OutputExistsError(OutputError):
    pass
