"""User-facing errors.

Every error a user can cause (bad input, a missing file, a hub name while offline, an unknown config
key) is a :class:`TokenCompressError`. Command-line entry points catch it and print its one-line
message with a non-zero exit code instead of a traceback.
"""

from __future__ import annotations


class TokenCompressError(Exception):
    """Base class of the errors a user can fix; the message says what went wrong and what to do."""


class DataSourceError(TokenCompressError):
    """A corpus source cannot be read (missing path, unreachable hub dataset, no text)."""


class ReconstructorLoadError(TokenCompressError):
    """A reconstructor cannot be loaded (unreachable hub name, missing or corrupt directory)."""


class ConfigError(TokenCompressError):
    """A configuration is invalid (unknown key, wrong type, out-of-range value)."""


class InputError(TokenCompressError):
    """An input text or argument is unusable (empty text, mask rate outside [0, 1), ...)."""


class CheckpointError(TokenCompressError):
    """A run folder or checkpoint is missing, incomplete or corrupt."""
