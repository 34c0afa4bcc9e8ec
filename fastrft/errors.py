"""User-facing errors.

Every error a user can fix (a bad flag, a malformed dataset line, a missing model file) is raised as a
subclass of :class:`FastRFTError` with a message that names the offending thing and says what to change.
The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class FastRFTError(ValueError):
    """Base class of errors caused by user input."""


class ConfigError(FastRFTError):
    """A config field or CLI flag has an invalid or contradictory value."""


class DataError(FastRFTError):
    """A dataset file or record is missing or malformed."""


class ModelLoadError(FastRFTError):
    """A model directory is missing, incomplete or of an unsupported architecture."""
