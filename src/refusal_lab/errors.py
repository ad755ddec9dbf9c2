"""The project's own error type.

Every failure caused by user input (a bad model id, an object list with a typo, a layer out of
range, ...) raises :class:`RefusalLabError` with one sentence that names the fix. The CLI prints
that sentence and exits non-zero; tracebacks are shown only with ``--debug``.
"""

from __future__ import annotations


class RefusalLabError(Exception):
    """A user-facing error: its message is one clear sentence naming the problem and the fix."""

    exit_code: int = 2


class ModelLoadError(RefusalLabError):
    """The model could not be found, downloaded, verified or adapted."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture has no adapter in ``refusal_lab.models.adapters``."""


class PromptError(RefusalLabError):
    """A template, object list or position label is invalid for this tokenizer."""


class ConfigError(RefusalLabError):
    """A configuration value or file is invalid."""


class SiteError(RefusalLabError):
    """A hook site name, layer or head index does not exist for this model."""
