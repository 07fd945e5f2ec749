"""User-facing errors: one line that names the file, key or value and what would be valid.

Anything a user can cause (a config key, a corpus file, a checkpoint path) is raised as a
`RaylmError`; the CLI prints its message alone and exits 2. Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations


class RaylmError(Exception):
    """An error the user can fix; its message is one complete line.

    What it is said of travels as fields, and the line is built from them here, in one place:
    `key` (a config key such as "run.resume_from", or a command option such as "--data") with
    the `value` it holds, or else the file `path` (and `line`); then the `detail`. A caller
    that knows the thing by another name (a command's argument rather than a config key)
    re-raises `said_of(...)` with other fields: the detail stays, no text is rewritten.
    Values are shown as written (a path unquoted); an error raised with its whole line as
    `detail` and no fields is shown as it is.
    """

    def __init__(self, detail: str, *, key: str | None = None, value: object = None,
                 path: object = None, line: int | None = None):
        super().__init__(detail)
        self.detail, self.key, self.value, self.path, self.line = detail, key, value, path, line

    def subject(self) -> str | None:
        """What the error is said of, as the line begins: "key=value" (a config key or "--option=value"), "path:line"."""
        if self.key is not None:
            return self.key if self.value is None else f"{self.key}={self.value}"
        if self.path is not None:
            return f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return None

    def __str__(self) -> str:
        subject = self.subject()
        return f"{subject}: {self.detail}" if subject else self.detail

    def said_of(self, *, key: str | None = None, value: object = None, path: object = None,
                line: int | None = None) -> RaylmError:
        """The same error (type and detail) said of another subject: the fields given, no others."""
        return type(self)(self.detail, key=key, value=value, path=path, line=line)


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
