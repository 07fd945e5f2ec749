"""User errors raised inside Ray tasks, actors and Train workers arrive wrapped; this unwraps them to one line.

Ray re-raises a task's exception as `RayTaskError` (a subclass of the original's type, with
`.cause`), Ray Train V2 as `WorkerGroupError.worker_failures[rank]` wrapping
`UserExceptionWithTraceback`. The chain is walked by type, never by matching message text.
"""

from __future__ import annotations

import contextlib

from raylm import errors

_MAX_DEPTH = 64


def _causes(exc: BaseException):
    yield getattr(exc, "cause", None)  # RayTaskError
    yield getattr(exc, "_base_exc", None)  # Ray Train's UserExceptionWithTraceback
    yield exc.__cause__
    yield exc.__context__
    failures = getattr(exc, "worker_failures", None)  # Ray Train V2 WorkerGroupError
    if isinstance(failures, dict):
        yield from (failures[rank] for rank in sorted(failures))
    controller = getattr(exc, "controller_failure", None)
    if controller is not None:
        yield controller


def find_user_error(exc: BaseException) -> errors.RaylmError | None:
    """The RaylmError behind `exc`, as a plain instance of its raylm class with a one-line message."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < _MAX_DEPTH:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, errors.RaylmError):
            inner = getattr(e, "cause", None)
            if isinstance(inner, errors.RaylmError):
                e = inner
            cls = next(c for c in type(e).__mro__ if c.__module__ == errors.__name__)
            message = str(e.args[0]) if e.args else str(e)
            return cls(message.splitlines()[0] if message else cls.__name__)
        todo.extend(c for c in _causes(e) if c is not None)
    return None


@contextlib.contextmanager
def user_errors():
    """Re-raise a wrapped RaylmError from Ray as the plain one-line error; anything else as it is.

    The plain error is raised after the wrapped one is dropped: its traceback holds the frames
    of Ray Data's executor, whose actors (and their CPUs) live until those frames are freed.
    """
    found = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 -- only unwrapped, never swallowed
        if isinstance(e, errors.RaylmError) and type(e).__module__ == errors.__name__:
            raise
        found = find_user_error(e)
        if found is None:
            raise
    if found is not None:
        raise found
