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


def read_json_object(path, error: type[FastRFTError], missing_hint: str = "") -> dict:
    """Parse a JSON file that must hold an object; any problem raises ``error`` naming the path."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: not found{missing_hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
