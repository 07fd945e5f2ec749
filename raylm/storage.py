"""Where a run's files live: a local path or an object-storage URI (s3://, gs://), as a pyarrow filesystem.

Plain Python and pyarrow, no Ray. Every path a config names (`data.sources[].path`,
`data.prepared_path`, `run.output_dir`, `run.resume_from`, `tokenizer.path`) goes through
`resolve(path) -> (pyarrow filesystem, path on it)`; the helpers below (read, write, list,
delete, copy) take a local path or a URI alike, so the callers have one code path. The schemes
are explicit (`SCHEMES`, and `file://` for reading): any other `scheme://` is a ConfigError,
never a local folder named `scheme:`.

Endpoint and credentials come from the standard AWS and Google environment of each process,
never from a config file (docs/cluster.md, "Object storage", lists the variables). What this
module adds: the endpoint variables passed to pyarrow as `endpoint_override` (pyarrow before 26
ignores them, apache/arrow#49643), the bucket's region asked when none is set
(`pyarrow.fs.resolve_s3_region`), a 60 s S3 request timeout (`S3_REQUEST_TIMEOUT_S`) instead of the SDK's
3 s, which a busy endpoint exceeds while a large checkpoint part is written, and
`STORAGE_EMULATOR_HOST` honoured for a GCS emulator as Google's own clients do. The filesystem
objects carry no keys, so the Ray processes that unpickle them use their node's credentials.

Object stores have no rename and no exclusive create: a file written here appears whole or not
at all (one PUT, or a multipart upload completed on close), which is what the checkpoint marker
and the prepared manifest, each written last, rely on. A command that writes many files under a
prefix (prepare, export) writes them through a `WriteLog`, so that a failure deletes exactly
those, never the prefix and never a concurrent writer's objects.

Errors: `check_reachable` says in one line when an endpoint cannot be reached or a bucket does
not exist, naming the key and the URI, so that a run fails before it starts; `check_writable_dir`
does the same for a local output directory (a file, under a file, /proc); `errors(...)` turns
pyarrow's OSError into the caller's RaylmError the same way.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import posixpath
import re
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from raylm.errors import ConfigError, RaylmError

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
GCS_EMULATOR_VAR = "STORAGE_EMULATOR_HOST"


SCHEMES = ("s3", "gs")
"""The object stores raylm reads and writes. `file://` is also read (a source path; pyarrow's
local filesystem); every other `scheme://` is refused, never taken for a local folder."""
READ_SCHEMES = (*SCHEMES, "file")
_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def is_uri(path: str | Path | None) -> bool:
    """`scheme://...`: anything else (even with a `://` further in) is a local path."""
    return path is not None and _URI.match(str(path)) is not None


def scheme_of(path: str | Path) -> str | None:
    """The scheme of a URI (lower case), None for a local path."""
    match = _URI.match(str(path))
    return match.group(1).lower() if match else None


def check_scheme(path: str | Path | None, key: str | None = None, schemes: tuple[str, ...] = READ_SCHEMES,
                 error: type[RaylmError] = ConfigError) -> None:
    """One line naming `key` and the value when `path` is a URI of a scheme outside `schemes`."""
    scheme = scheme_of(path) if path is not None else None
    if scheme is None or scheme in schemes:
        return
    named = f"{key}={path}" if key else str(path)
    options = ["a local path", *(f"{s}://" for s in schemes)]
    allowed = ", ".join(options[:-1]) + " or " + options[-1]
    raise error(f"{named}: unsupported storage scheme {scheme}:// here; use {allowed}")


def location(path: str | Path) -> str | Path:
    """A path as raylm keeps it: a URI as a string (Path would fold its `//`), a local path as a
    Path. ConfigError for a URI of a scheme raylm does not know."""
    if is_uri(path):
        check_scheme(path)
        return str(path).rstrip("/")
    return Path(path)


def child(base: str | Path, *names: str) -> str | Path:
    """`base/name/...` for a URI or a local path."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *names])
    return Path(base).joinpath(*names)


def name_of(path: str | Path) -> str:
    return posixpath.basename(str(path).rstrip("/")) if is_uri(path) else Path(path).name


def parent_of(path: str | Path) -> str | Path:
    if is_uri(path):
        scheme, rest = str(path).rstrip("/").split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    return Path(path).parent


def endpoint() -> str | None:
    """The S3 endpoint the environment names (AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL), or None."""
    return next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)


def gcs_emulator() -> str | None:
    """The GCS emulator the environment names (STORAGE_EMULATOR_HOST), or None."""
    return os.environ.get(GCS_EMULATOR_VAR) or None


def resolve(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path or a URI. ConfigError for a scheme pyarrow lacks."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(str(path)))
    uri = str(path)
    check_scheme(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        region = next((os.environ[v] for v in REGION_VARS if os.environ.get(v)), None)
        fs = _s3(parsed.netloc, endpoint(), region)
        return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme == "gs" and gcs_emulator():
        return _gcs_emulated(gcs_emulator()), f"{parsed.netloc}{parsed.path}".rstrip("/")
    try:
        fs, fs_path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise ConfigError(f"{uri}: not a storage URI this pyarrow can open ({_first_line(e)}); "
                          "use a local path, s3:// or gs://") from None
    return fs, fs_path.rstrip("/")


# Seconds an S3 request may go without a byte moving before it is abandoned (and retried). The
# AWS SDK's default is 3 s, which a busy endpoint or a loaded host exceeds while it writes a large
# checkpoint part: a 125m async save to moto_server on a loaded 2-core machine failed with curl's
# "Less than 1 bytes/sec transferred the last 3 seconds".
S3_REQUEST_TIMEOUT_S = 60.0


@functools.lru_cache(maxsize=64)
def _s3(bucket: str, endpoint_url: str | None, region: str | None) -> pafs.FileSystem:
    """One S3FileSystem per (bucket, endpoint, region) in this process (resolving a region is a request)."""
    if endpoint_url:
        parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        return pafs.S3FileSystem(endpoint_override=parsed.netloc + parsed.path.rstrip("/"),
                                 scheme=parsed.scheme or "https", region=region or "us-east-1",
                                 request_timeout=S3_REQUEST_TIMEOUT_S)
    if not region:
        region = pafs.resolve_s3_region(bucket)  # asks the bucket for its region
    return pafs.S3FileSystem(region=region, request_timeout=S3_REQUEST_TIMEOUT_S)


@functools.lru_cache(maxsize=8)
def _gcs_emulated(host: str) -> pafs.FileSystem:
    """A GcsFileSystem on an emulator: anonymous, and giving up after 10 s of retries (not
    pyarrow's 15 minutes) so that one that does not answer is an error, not a hang."""
    parsed = urlparse(host if "://" in host else f"http://{host}")
    return pafs.GcsFileSystem(anonymous=True, scheme=parsed.scheme, endpoint_override=parsed.netloc,
                              retry_time_limit=datetime.timedelta(seconds=10))


def where(path: str | Path) -> str:
    """The endpoint a URI is reached through, for error messages."""
    if is_uri(path) and str(path).startswith("s3://"):
        return endpoint() or "AWS S3"
    if is_uri(path) and str(path).startswith("gs://"):
        return gcs_emulator() or "Google Cloud Storage"
    return urlparse(str(path)).scheme + " storage"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------
# Checks and errors


def check_reachable(path: str | Path | None, key: str, error: type[RaylmError] = ConfigError) -> None:
    """For a URI: fail in one line naming `key` and the URI when its endpoint does not answer or
    its bucket does not exist (one request). Local paths pass: their callers check them."""
    if not is_uri(path):
        return
    fs, fs_path = resolve(path)
    bucket = fs_path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise error(f"{key}={path}: cannot reach the object store at {where(path)} ({_first_line(e)})") from None
    if info.type == pafs.FileType.NotFound:
        raise error(f"{key}={path}: bucket {bucket!r} does not exist at {where(path)}; create it or fix the URI")


def check_writable_dir(path: str | Path, key: str, error: type[RaylmError] = ConfigError) -> None:
    """For a local path: one line naming `key` when `path` is not, and cannot become, a directory
    this process writes in: it is a file, a link to nothing, under a file, or the nearest existing
    directory above it refuses a new entry (read-only, /proc). That last is tried for real (an
    empty directory made and removed at once): permissions alone do not say it, for root least
    of all. URIs pass: `check_reachable` checks them."""
    if is_uri(path):
        return
    target = nearest = Path(path).expanduser().absolute()
    try:
        if target.exists() and not target.is_dir():
            raise error(f"{key}={path}: is a file, not a directory")
        while not nearest.exists():
            if nearest.is_symlink():
                raise error(f"{key}={path}: {nearest} is a link to {os.readlink(nearest)}, which does not exist")
            nearest = nearest.parent
        if not nearest.is_dir():
            raise error(f"{key}={path}: {nearest} is a file, not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".raylm-write-check-", dir=nearest))
    except OSError as e:
        raise error(f"{key}={path}: cannot create a directory in {nearest} ({e.strerror or e})") from None


@contextlib.contextmanager
def errors(path: str | Path, key: str | None, error: type[RaylmError]):
    """Re-raise pyarrow's OSError (not FileNotFoundError) about `path` as one line of `error`."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        at = f" at {where(path)}" if is_uri(path) else ""
        said = {"key": key, "value": path} if key else {"path": path}
        raise error(f"storage error{at} ({_first_line(e)})", **said) from None


# ---------------------------------------------------------------------------------------
# Files


def info(path: str | Path) -> pafs.FileInfo:
    fs, fs_path = resolve(path)
    return fs.get_file_info(fs_path)


def exists(path: str | Path) -> bool:
    """A file, a directory, or (object storage) any object under the prefix."""
    return info(path).type != pafs.FileType.NotFound


def is_file(path: str | Path) -> bool:
    return info(path).type == pafs.FileType.File


def is_dir(path: str | Path) -> bool:
    return info(path).type == pafs.FileType.Directory


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes; FileNotFoundError when there is none."""
    if not is_uri(path):
        return Path(path).read_bytes()
    fs, fs_path = resolve(path)
    with fs.open_input_stream(fs_path) as f:
        return f.read()


def open_input(path: str | Path):
    """A readable binary stream of the file (a context manager); FileNotFoundError when there is none."""
    if not is_uri(path):
        return open(path, "rb")
    fs, fs_path = resolve(path)
    return fs.open_input_stream(fs_path)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write the whole file at once so that a reader sees all of it or nothing: local files via a
    synced temporary file renamed into place, objects by one upload (complete when it closes)."""
    if is_uri(path):
        fs, fs_path = resolve(path)
        with fs.open_output_stream(fs_path) as f:
            f.write(data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_dirs(path: str | Path) -> None:
    """mkdir -p; on object storage nothing is needed (prefixes exist through their objects)."""
    if not is_uri(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def list_dir(path: str | Path) -> list[pafs.FileInfo]:
    """The entries directly in `path` (files and directories); [] when it does not exist."""
    fs, fs_path = resolve(path)
    if isinstance(fs, pafs.GcsFileSystem):
        return _gcs_children(fs, fs_path)
    return fs.get_file_info(pafs.FileSelector(fs_path, allow_not_found=True))


def _gcs_children(fs: pafs.GcsFileSystem, fs_path: str) -> list[pafs.FileInfo]:
    """What a listing of `fs_path` should say on GCS. pyarrow's non-recursive GCS listing drops
    the "directories" that exist only as prefixes of deeper objects (apache/arrow#35993), which
    is every checkpoint directory; so list recursively and fold deeper paths into their first part."""
    entries: dict[str, pafs.FileInfo] = {}
    for entry in fs.get_file_info(pafs.FileSelector(fs_path, recursive=True, allow_not_found=True)):
        head, deeper, _ = entry.path[len(fs_path):].lstrip("/").partition("/")
        if deeper:
            entries.setdefault(head, pafs.FileInfo(f"{fs_path}/{head}", pafs.FileType.Directory))
        elif head:
            entries[head] = entry
    return list(entries.values())


def file_sizes(path: str | Path) -> dict[str, int]:
    """{name: bytes} of the files directly in `path`: one listing, one request on object storage."""
    return {posixpath.basename(i.path): i.size for i in list_dir(path) if i.type == pafs.FileType.File}


def delete_file(path: str | Path) -> None:
    """Remove a file if it is there."""
    fs, fs_path = resolve(path)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(fs_path)


def delete_dir(path: str | Path) -> None:
    """Remove a directory (or every object under a prefix) if it is there."""
    fs, fs_path = resolve(path)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(fs_path)


def holds_files(path: str | Path) -> bool:
    """Whether any file lies at or under `path`. On object storage the empty "directory" markers
    that pyarrow leaves when it deletes a prefix's last object (apache/arrow#36275) do not count,
    so a prefix that a failed command cleaned up may be written again. Stops at the first file."""
    fs, fs_path = resolve(path)
    found = fs.get_file_info(fs_path)
    if found.type != pafs.FileType.Directory:
        return found.type == pafs.FileType.File
    deep = isinstance(fs, pafs.GcsFileSystem)  # its one-level listing misses prefixes (see _gcs_children)
    pending = [fs_path]
    while pending:
        entries = fs.get_file_info(pafs.FileSelector(pending.pop(), recursive=deep, allow_not_found=True))
        if any(e.type == pafs.FileType.File for e in entries):
            return True
        pending += [] if deep else [e.path for e in entries if e.type == pafs.FileType.Directory]
    return False


class WriteLog:
    """The files one command writes under `root` (a directory or a prefix), so that a failed
    command removes exactly those and never a file another writer put beside them. Its errors
    are one line of `error` naming `key`.

    Object stores have no rename and, through pyarrow, no exclusive create, so on a bucket this
    is a best effort with small windows, never a delete of a whole prefix: a file is written
    only while its name is free (one request just before), `check_alone` says before the last
    file (a manifest, config.json) whether anyone else wrote under `root` meanwhile, and
    `remove` deletes a file only while it is still the one written here (same size and
    modification time); a file another writer has replaced since is theirs and is left.
    """

    def __init__(self, root: str | Path, key: str, error: type[RaylmError] = ConfigError):
        self.root, self.key, self.error = location(root), key, error
        self.fs, self._root = resolve(self.root)
        self._files: dict[str, tuple[int, int | None]] = {}  # path on fs -> (size, mtime_ns) as written

    def _claim(self, path: str | Path) -> str:
        fs_path = resolve(path)[1]
        if self.fs.get_file_info(fs_path).type != pafs.FileType.NotFound:
            raise self.error(f"{self.key}={self.root}: {path} appeared while this command was writing there "
                             f"(another writer?); it was left alone; choose another {self.key}")
        return fs_path

    def _record(self, fs_path: str) -> None:
        found = self.fs.get_file_info(fs_path)
        self._files[fs_path] = (found.size, found.mtime_ns)

    def write_bytes(self, path: str | Path, data: bytes) -> None:
        with errors(self.root, self.key, self.error):
            fs_path = self._claim(path)
            write_bytes(path, data)
            self._record(fs_path)

    @contextlib.contextmanager
    def output(self, path: str | Path):
        """A binary output stream to `path`, the file recorded once it is closed."""
        with errors(self.root, self.key, self.error):
            fs_path = self._claim(path)
            try:
                with self.fs.open_output_stream(fs_path) as f:
                    yield f
            finally:
                if self.fs.get_file_info(fs_path).type == pafs.FileType.File:
                    self._record(fs_path)

    def copy_file(self, source: str | Path, path: str | Path) -> None:
        """A local file `source` to `path`, streamed."""
        with errors(self.root, self.key, self.error):
            fs_path = self._claim(path)
            try:
                pafs.copy_files(str(source), fs_path, source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=self.fs)
            finally:
                if self.fs.get_file_info(fs_path).type == pafs.FileType.File:
                    self._record(fs_path)

    def foreign(self) -> list[str]:
        """The files under `root` that this log did not write (paths on its filesystem)."""
        listing = self.fs.get_file_info(pafs.FileSelector(self._root, recursive=True, allow_not_found=True))
        return sorted(e.path for e in listing if e.type == pafs.FileType.File and e.path not in self._files)

    def check_alone(self) -> None:
        """One line when another writer put files under `root` while this command wrote there."""
        with errors(self.root, self.key, self.error):
            found = self.foreign()
        if found:
            example = f"{scheme_of(self.root)}://{found[0]}" if is_uri(self.root) else found[0]
            raise self.error(f"{self.key}={self.root}: {len(found)} file(s) appeared there while this command "
                             f"was writing (another writer? e.g. {example}); they were left alone; choose another "
                             f"{self.key}")

    def remove(self) -> list[str]:
        """Delete the files written here that are unchanged since; return those left (replaced by another writer)."""
        left = []
        for fs_path, stamp in self._files.items():
            try:
                found = self.fs.get_file_info(fs_path)
                if found.type == pafs.FileType.File and (found.size, found.mtime_ns) == stamp:
                    self.fs.delete_file(fs_path)
                elif found.type != pafs.FileType.NotFound:
                    left.append(fs_path)
            except FileNotFoundError:
                pass
            except OSError:  # the store went away: the rest is still tried
                left.append(fs_path)
        self._files.clear()
        return left


def copy_dir(source: str | Path, destination: str | Path) -> None:
    """Copy every file under `source` to the same relative path under `destination` (either may
    be local or a URI); existing files of the same name are replaced, others are kept."""
    src_fs, src = resolve(source)
    dst_fs, dst = resolve(destination)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)



def delete_dir_except(path: str | Path, keep: str) -> None:
    """Remove everything in the directory `path` except its entry named `keep` (a lock held
    while the rest goes); nothing when `path` does not exist."""
    fs, _ = resolve(path)
    for entry in list_dir(path):
        if posixpath.basename(entry.path) == keep:
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.type == pafs.FileType.Directory:
                fs.delete_dir(entry.path)
            else:
                fs.delete_file(entry.path)
