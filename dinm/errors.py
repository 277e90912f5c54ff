"""Errors a person can act on: each message names the field, file or argument and how to fix it."""


class DinmError(Exception):
    """Base class of every error dinm raises on purpose."""


class InstanceError(DinmError, ValueError):
    """An instance file or record is malformed (missing field, empty text, unreadable JSON)."""


class ArchitectureError(DinmError, KeyError):
    """The model's architecture is not in dinm's table."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(DinmError, ValueError):
    """An `EditConfig` field or a CLI option has a bad value."""


class EditError(DinmError, RuntimeError):
    """An edit diverged (NaN/inf) or could not run; the model was left as it was."""


class DeltaError(DinmError, ValueError):
    """A delta file is unreadable, malformed, or does not belong to the model it is applied to."""


class ModelLoadError(DinmError, ValueError):
    """A model argument does not name a loadable model."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
