"""Exceptions that the runtime raises on purpose.

Every error a user can trigger with bad input is one of these, with a message that says what was
received, what was expected and how to fix it.
"""

from __future__ import annotations


class TTARuntimeError(Exception):
    """Base class of the runtime's own errors."""


class InvalidInputError(TTARuntimeError, ValueError):
    """An input image (or batch) is not something the runtime can take.

    The message names what was received and what is expected. The runtime's state is untouched.
    """


class ModelLoadError(TTARuntimeError):
    """A model card or its weights are missing, malformed, tampered with, or do not fit each other."""


class ConfigError(TTARuntimeError, ValueError):
    """A configuration value, recipe or override is not valid."""


class UnknownNameError(TTARuntimeError, KeyError):
    """A registry lookup by a name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(ConfigError):
    """An optional backend (package, provider or device) that a request names is not available here."""


class MissingExtraError(BackendUnavailableError, ImportError):
    """An optional package is not installed; the message names the extra (or package) to install."""
