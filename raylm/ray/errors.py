"""What the user sees when Ray is between raylm and an error: raylm's one line, not Ray's tracebacks.

User errors raised inside Ray tasks, actors and Train workers arrive wrapped: Ray re-raises a
task's exception as `RayTaskError` (a subclass of the original's type, with `.cause`), Ray
Train V2 as `WorkerGroupError.worker_failures[rank]` wrapping `UserExceptionWithTraceback`.
`user_errors` unwraps them to the plain one-line error. The chain is walked by type, never by
matching message text.

On their way, Ray's libraries log the same error with its whole traceback on the console of
the process that saw it (the driver, or a worker whose output Ray streams to the driver):
Ray Data's executor ("An exception was raised from a task of operator ..."), its top-level
handler ("Full stack trace"), the streaming split coordinator, Ray Train's worker ("Error in
training function"). `hide_user_error_tracebacks` marks those records `hide` when the
exception they carry holds a RaylmError: console handlers drop them, Ray's log files keep
them. Any other exception (a bug) keeps its traceback everywhere. Ray Data's issue-detector
reports (heuristics about its own operators, nothing a raylm user sets) and its "Progress bars
disabled" notice are hidden from consoles the same way, whole (`raylm.ray.compat`, item 4).

A lost cluster (every Ray process gone, or the cluster at RAY_ADDRESS unreachable) reaches the
driver as a Ray system exception; `cluster_loss` turns it into `ClusterLost`, one line that
says how to continue.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from raylm import errors
from raylm.ray.compat import DIAGNOSTIC_LOGGERS, train_user_exception

_MAX_DEPTH = 64

# The loggers that print a user error's traceback on a console (Ray 2.60). A record of any
# other logger is left alone; a Ray upgrade that renames one shows the traceback again, which
# tests/test_ray_errors.py catches.
TRACEBACK_LOGGERS = (
    "ray.data._internal.execution.streaming_executor_state",  # the executor: task failed + traceback
    "ray.data._internal.execution.streaming_executor",  # "Dataset ... execution failed"
    "ray.data._internal.iterator.stream_split_iterator",  # "Split 0 epoch 0 get() failed ...: <traceback>"
    "ray.data.exceptions",  # the driver's "Full stack trace"
    "ray.train.v2._internal.util",  # a Train worker's "Error in training function:" + traceback
)


class ClusterLost(errors.RaylmError):
    """The Ray cluster went away under a command; a run's finished checkpoints are kept.

    Exit status 1 (not 2: nothing in the user's input is wrong)."""

    exit_code = 1

    def __init__(self, cause: str, run_dir: str | None = None, cluster: str = "the Ray cluster",
                 logs: str | None = None):
        self.cause, self.run_dir, self.cluster, self.logs = cause, run_dir, cluster, logs
        if run_dir is not None:
            then = f"its finished checkpoints are kept: continue with run.resume_from={run_dir}"
        else:
            then = "run the command again"
        message = f"{cluster} went away ({cause}); {then}"
        super().__init__(message + (f" ({logs})" if logs else ""))


_OWN = (errors.__name__, __name__)


def _causes(exc: BaseException):
    yield getattr(exc, "cause", None)  # RayTaskError
    yield train_user_exception(exc)  # Ray Train's UserExceptionWithTraceback
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
            if isinstance(e, ClusterLost):
                return e
            cls = next(c for c in type(e).__mro__ if c.__module__ in _OWN)
            message = str(e.args[0]) if e.args else str(e)  # its detail: str() of Ray's wrapper adds a traceback
            found = cls(message.splitlines()[0] if message else cls.__name__, key=getattr(e, "key", None),
                        value=getattr(e, "value", None), path=getattr(e, "path", None), line=getattr(e, "line", None))
            found.raised_in_ray = True  # its traceback is in Ray's logs (`ray_session` names them)
            return found
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
        if isinstance(e, errors.RaylmError) and type(e).__module__ in _OWN:
            raise
        found = find_user_error(e)
        if found is None:
            raise
    if found is not None:
        raise found


# ---------------------------------------------------------------------------------------
# A lost cluster


def lost_cluster_cause(exc: BaseException) -> str | None:
    """The name of the Ray system exception in `exc`'s chain that says the driver lost its
    cluster (its actors, raylet or GCS unreachable), or None.

    A task's or worker's own failure is not one: a `RayTaskError` (even one whose cause is an
    actor's death inside that task) and Ray Train's failures are left as they are."""
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.LocalRayletDiedError, rex.NodeDiedError, rex.RpcError, rex.RaySystemError,
            ConnectionError)
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and len(seen) < _MAX_DEPTH:
        seen.add(id(e))
        if isinstance(e, errors.RaylmError):  # already said in one line (a ClusterLost naming its run)
            return None
        if isinstance(e, lost) and not isinstance(e, rex.RayTaskError):
            return type(e).__name__
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def cluster_loss(run_dir: str | None = None):
    """Re-raise a lost cluster as `ClusterLost` (naming `run_dir` to resume from); anything else as it is."""
    cause = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 -- only classified, never swallowed
        cause = lost_cluster_cause(e)
        if cause is None:
            raise
    if cause is not None:
        raise ClusterLost(cause, run_dir) from None


# ---------------------------------------------------------------------------------------
# Console logging


class _HideUserErrors(logging.Filter):
    """On one of TRACEBACK_LOGGERS: mark a record `hide` when the exception it logs (its
    exc_info, or the one being handled where it is logged) holds a RaylmError."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info and record.exc_info[1] is not None else sys.exc_info()[1]
        if exc is not None and find_user_error(exc) is not None:
            record.hide = True
            _drop_hidden_on_consoles(logging.getLogger(record.name))
        return True


class _DropHidden(logging.Filter):
    """On a console handler: drop records marked `hide` (Ray Data's own console does the same)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "hide", False)


class _HideAll(logging.Filter):
    """On a logger of Ray's diagnostics (`DIAGNOSTIC_LOGGERS`): mark every record `hide`, so it
    reaches Ray's log files (ray-data.log) and no console (`raylm.ray.compat`, item 4)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.hide = True
        _drop_hidden_on_consoles(logging.getLogger(record.name))
        return True


_HIDE = _HideUserErrors()
_DROP = _DropHidden()
_HIDE_ALL = _HideAll()


def _drop_hidden_on_consoles(logger: logging.Logger) -> None:
    """Give every console handler a record of `logger` reaches the `_DropHidden` filter. Done when
    a record is hidden, not before: Ray Train configures its handlers anew in each worker."""
    node: logging.Logger | None = logger
    while node is not None:
        for handler in node.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and _DROP not in handler.filters:
                handler.addFilter(_DROP)
        node = node.parent if node.propagate else None


def hide_user_error_tracebacks() -> None:
    """Keep user errors' tracebacks off this process's console (for its whole life: Ray's
    `worker_process_setup_hook` of a cluster raylm started or a job it runs)."""
    for name in TRACEBACK_LOGGERS:
        logger = logging.getLogger(name)
        if _HIDE not in logger.filters:
            logger.addFilter(_HIDE)
    for name in DIAGNOSTIC_LOGGERS:
        logger = logging.getLogger(name)
        if _HIDE_ALL not in logger.filters:
            logger.addFilter(_HIDE_ALL)


@contextlib.contextmanager
def user_error_tracebacks_hidden():
    """`hide_user_error_tracebacks` on this process for the duration of a command."""
    added = [(logging.getLogger(n), _HIDE) for n in TRACEBACK_LOGGERS if _HIDE not in logging.getLogger(n).filters]
    added += [(logging.getLogger(n), _HIDE_ALL) for n in DIAGNOSTIC_LOGGERS if _HIDE_ALL not in logging.getLogger(n).filters]
    for logger, hide in added:
        logger.addFilter(hide)
    try:
        yield
    finally:
        for logger, hide in added:
            logger.removeFilter(hide)
