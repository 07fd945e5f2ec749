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


class SourceNotFound(DataError):
    """A data source's path, directory or glob names no file."""


class EmptySplit(DataError):
    """A split (train or validation) holds no files or no sequences."""


class TrainingError(RaylmError):
    """Training cannot go on (for example the loss stayed non-finite); checkpoints so far are kept."""


class RunInterrupted(KeyboardInterrupt):
    """The run stopped before train.max_steps (Ctrl-C, SIGTERM); its good checkpoints are kept."""

    def __init__(self, run_dir: str):
        super().__init__(run_dir)
        self.run_dir = run_dir
