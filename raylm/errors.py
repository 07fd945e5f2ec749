"""User-facing errors: one line that names the file, key or value and what would be valid.

Anything a user can cause (a config key, a corpus file, a checkpoint path) is raised as a
`RaylmError`; the CLI prints its message alone and exits 2. Any other exception is a bug
and keeps its traceback.
"""


class RaylmError(Exception):
    """An error the user can fix; its message is one complete line."""


class ConfigError(RaylmError):
    """A config key is unknown, mistyped or holds an impossible value."""


class DataError(RaylmError):
    """A corpus file, record or prepared dataset cannot be used."""


class CheckpointError(RaylmError):
    """A checkpoint is missing, incomplete or does not match the run."""
