"""One writer per directory: a lease file that names its holder, kept fresh by a heartbeat.

A run (or sweep) directory has one writer at a time: it holds `DIR/raylm.lock` from before it
reads or writes anything there until it exits, and a second writer stops with one line naming
the holder, without touching the directory; readers take no lock. docs/cluster.md ("One writer
per run directory") describes the lease, how each store takes it exclusively and when it is stale.

    create(dir)    make `dir` (exclusive: it must not exist) and hold its lock
    acquire(dir)   hold the lock of an existing `dir`; LockHeld names a live holder

Each store (`_LocalStore`, `_S3Store`, `_BestEffortStore`) creates a lease only where none is
and replaces a stale one by compare-and-swap, so that of two processes that find one stale
lease only one wins: locally under a kernel lock (flock), which dies with its holder and so
never goes stale; on S3 by conditional writes; elsewhere by writing and reading back.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from raylm import storage
from raylm.errors import RaylmError

LOCK_FILE = "raylm.lock"
REFRESH_S = 10.0
STALE_AFTER_S = 3 * REFRESH_S
BEST_EFFORT_SETTLE_S = 1.0
"""How long a best-effort writer waits before it reads its lease back."""


class LockHeld(RaylmError):
    """Another live process holds the directory's lock."""


# ---------------------------------------------------------------------------------------
# The lease


def _boot_id() -> str:
    """This boot of this machine and this pid namespace: where a pid means the same process
    (containers on one machine share its boot id and may share a hostname, not their pids)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (tells a reused pid apart); '' if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    return not started or not _pid_start(pid) or _pid_start(pid) == started


@dataclass(frozen=True)
class Lease:
    host: str
    pid: int
    started: str
    """When the holder took the lock (UTC, ISO 8601)."""
    heartbeat: float
    """Unix time of the holder's last refresh."""
    token: str
    boot_id: str = ""
    pid_start: str = ""

    @classmethod
    def mine(cls) -> Lease:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), _utc(now), now, secrets.token_hex(8), _boot_id(),
                   _pid_start(os.getpid()))

    def refreshed(self) -> Lease:
        return Lease(**{**asdict(self), "heartbeat": time.time()})

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Lease | None:
        try:
            raw = json.loads(data)
            return cls(**{k: raw[k] for k in ("host", "pid", "started", "heartbeat", "token")},
                       boot_id=str(raw.get("boot_id", "")), pid_start=str(raw.get("pid_start", "")))
        except (ValueError, TypeError, KeyError):
            return None

    def stale(self) -> bool:
        if self.host == socket.gethostname() and self.boot_id == _boot_id():
            return not _pid_alive(self.pid, self.pid_start)
        return time.time() - self.heartbeat > STALE_AFTER_S

    def describe(self) -> str:
        age = max(0, round(time.time() - self.heartbeat))
        return f"host {self.host} pid {self.pid} (started {self.started}, heartbeat {age} s ago)"


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------
# Stores: create exclusively, read, compare-and-swap, delete


class _LocalStore:
    """Local disks and NFS: link() to create, rename() aside to take over."""

    def __init__(self, path: str):
        self.path = path

    def _tmp(self, token: str) -> str:
        return f"{self.path}.{token}.tmp"

    def create(self, lease: Lease):
        tmp = self._tmp(lease.token)
        with open(tmp, "wb") as f:
            f.write(lease.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)

    def read(self):
        try:
            with open(self.path, "rb") as f:
                return f.read(), None
        except FileNotFoundError:
            return None, None

    @contextlib.contextmanager
    def _guard(self):
        """Excludes the other read-compare-replace sequences on this lease (takeovers, refreshes,
        releases) of every process and thread; the kernel drops it when its holder dies, so it
        never goes stale. A flock of the directory; where the file system refuses that (NFS
        emulates flock with whole-file locks, which a directory opened for reading cannot take),
        of a `raylm.lock.guard` file beside the lease."""
        import fcntl

        fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                os.close(fd)
                fd = os.open(f"{self.path}.guard", os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _current(self) -> Lease | None:
        data, _ = self.read()
        return Lease.from_bytes(data) if data else None

    def _replace(self, lease: Lease) -> None:
        """The lease file replaced whole in one rename: the name is never absent, so an exclusive
        create (`link`) can never slip in between."""
        tmp = self._tmp(lease.token)
        with open(tmp, "wb") as f:
            f.write(lease.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def take_over(self, stale: Lease, version, lease: Lease):
        with self._guard():
            current = self._current()
            if current is None:
                return self.create(lease)  # released meanwhile: a plain exclusive create
            if current.token != stale.token:
                return None  # another taker won first
            self._replace(lease)
            return True

    def refresh(self, lease: Lease, version):
        with self._guard():
            current = self._current()
            if current is None or current.token != lease.token:
                return None
            self._replace(lease)
            return True

    def delete(self, lease: Lease, version) -> None:
        with self._guard():
            current = self._current()
            if current is not None and current.token == lease.token:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)


class _S3Store:
    """S3 with conditional writes (If-None-Match, If-Match on the ETag), through boto3."""

    def __init__(self, uri: str):
        import boto3

        _, fs_path = storage.resolve(uri)
        self.bucket, self.key = fs_path.split("/", 1)
        region = next((os.environ[v] for v in storage.REGION_VARS if os.environ.get(v)), None)
        self.client = boto3.client("s3", endpoint_url=storage.endpoint(), region_name=region)

    @staticmethod
    def _lost(e: Exception) -> bool:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404")

    def _put(self, lease: Lease, **condition):
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=lease.to_bytes(),
                                          **condition)["ETag"]
        except ClientError as e:
            if self._lost(e):
                return None
            raise OSError(str(e)) from None

    def create(self, lease: Lease):
        return self._put(lease, IfNoneMatch="*")

    def read(self):
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if self._lost(e):
                return None, None
            raise OSError(str(e)) from None
        return got["Body"].read(), got["ETag"]

    def take_over(self, stale: Lease, version, lease: Lease):
        return self._put(lease, IfMatch=version)

    def refresh(self, lease: Lease, version):
        return self._put(lease, IfMatch=version)

    def delete(self, lease: Lease, version) -> None:
        from botocore.exceptions import ClientError

        with contextlib.suppress(ClientError):
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)


class _BestEffortStore:
    """A store without conditional writes through pyarrow: write, pause, read back, compare."""

    def __init__(self, uri: str):
        self.path = uri

    def read(self):
        try:
            return storage.read_bytes(self.path), None
        except FileNotFoundError:
            return None, None

    def _write_and_check(self, lease: Lease):
        storage.write_bytes(self.path, lease.to_bytes())
        time.sleep(BEST_EFFORT_SETTLE_S)
        data, _ = self.read()
        back = Lease.from_bytes(data) if data else None
        return True if back is not None and back.token == lease.token else None

    def create(self, lease: Lease):
        if self.read()[0] is not None:
            return None
        return self._write_and_check(lease)

    def take_over(self, stale: Lease, version, lease: Lease):
        data, _ = self.read()
        current = Lease.from_bytes(data) if data else None
        if data is not None and (current is None or current.token != stale.token):
            return None
        return self._write_and_check(lease)

    def refresh(self, lease: Lease, version):
        data, _ = self.read()
        current = Lease.from_bytes(data) if data else None
        if current is None or current.token != lease.token:
            return None
        storage.write_bytes(self.path, lease.to_bytes())
        return True

    def delete(self, lease: Lease, version) -> None:
        data, _ = self.read()
        current = Lease.from_bytes(data) if data else None
        if current is not None and current.token == lease.token:
            storage.delete_file(self.path)


def _store(path: str | Path):
    if not storage.is_uri(path):
        return _LocalStore(str(path))
    if str(path).startswith("s3://"):
        try:
            return _S3Store(str(path))
        except ImportError:  # boto3 is not installed
            pass
    return _BestEffortStore(str(path))


# ---------------------------------------------------------------------------------------
# Holding a lock


class DirLock:
    """A held lock: refreshed by a daemon thread until `release()` (a context manager too)."""

    def __init__(self, directory: str | Path, store, lease: Lease, version):
        self.directory, self.path = directory, storage.child(directory, LOCK_FILE)
        self._store, self.lease, self._version = store, lease, version
        self.lost = False
        self._stop = threading.Event()
        self._guard = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="raylm-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(REFRESH_S):
            with self._guard:
                if self._stop.is_set():
                    return
                lease = self.lease.refreshed()
                try:
                    version = self._store.refresh(lease, self._version)
                except OSError:
                    continue  # a store that does not answer now: try again at the next beat
                if version is None:
                    self.lost = True
                    print(f"raylm: warning: the lock {self.path} is no longer this process's; "
                          "another writer took it over", flush=True)
                    return
                self.lease, self._version = lease, version

    def release(self) -> None:
        """Stop the heartbeat and remove the lease (only if it is still ours); idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._guard:
            if not self.lost:
                with contextlib.suppress(OSError):
                    self._store.delete(self.lease, self._version)

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _held_message(what: str, directory, current: Lease | None, path) -> str:
    if current is None:
        return (f"{what} {directory} is locked by {path}, which is unreadable; if no process writes to "
                "this directory, remove that file")
    return f"{what} {directory} is in use by {current.describe()}; wait for it to finish or stop it (its lock: {path})"


def check_free(directory: str | Path, what: str = "directory") -> None:
    """LockHeld when a live process holds `directory` (a check before slow work; `acquire` decides)."""
    with storage.errors(directory, None, RaylmError):
        data, _ = _store(storage.child(directory, LOCK_FILE)).read()
    if data is None:
        return
    current = Lease.from_bytes(data)
    if current is None or not current.stale():
        raise LockHeld(_held_message(what, directory, current, storage.child(directory, LOCK_FILE)))


def acquire(directory: str | Path, what: str = "directory") -> DirLock:
    """Hold the lock of `directory` (which exists); LockHeld, in one line naming the holder, when
    a live process holds it. A stale lease is taken over."""
    path = storage.child(directory, LOCK_FILE)
    store = _store(path)
    with storage.errors(directory, None, RaylmError):
        for _ in range(5):  # each turn loses only to another process that then holds the lock
            lease = Lease.mine()
            version = store.create(lease)
            if version is not None:
                return DirLock(directory, store, lease, version)
            data, current_version = store.read()
            if data is None:
                continue  # released meanwhile
            current = Lease.from_bytes(data)
            if current is None or not current.stale():
                raise LockHeld(_held_message(what, directory, current, path))
            version = store.take_over(current, current_version, lease)
            if version is not None:
                return DirLock(directory, store, lease, version)
    raise LockHeld(f"{what} {directory}: other processes keep taking its lock ({path}); try again")


def create(directory: str | Path, what: str = "directory") -> DirLock:
    """Make `directory` and hold its lock. FileExistsError when it exists: locally an exclusive
    mkdir; on object storage, any object under the prefix, or a lease another start created first."""
    if not storage.is_uri(directory):
        Path(directory).parent.mkdir(parents=True, exist_ok=True)
        Path(directory).mkdir()  # FileExistsError: exactly one concurrent start gets each name
        return acquire(directory, what)
    if storage.exists(directory):
        raise FileExistsError(str(directory))
    store = _store(storage.child(directory, LOCK_FILE))
    lease = Lease.mine()
    version = store.create(lease)
    if version is None:
        raise FileExistsError(str(directory))
    return DirLock(directory, store, lease, version)
