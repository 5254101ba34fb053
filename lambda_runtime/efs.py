"""Shared-storage helpers a correct protocol on EFS (NFSv4.1, close-to-open) needs.

EFS guarantees little (lambda-semantics.md §9): another client sees data only after the writer's
`close`/`fsync`, directory listings may lag, and locks are advisory POSIX locks. So:
- results are *published*: written to a temp name, fsynced, then renamed onto the final name, so a
  reader opening the final name gets either the old or the new complete file, never a torn one;
- exclusive decisions (who combines a round, who fans out the next) are *claims* made with
  `link(2)`, which exactly one caller wins on a local file system and on NFSv4;
- counters are replaced by an `ArrivalSet` whose membership is read and changed under a lock.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, cast

import numpy as np

from lambda_runtime.errors import LambdaRuntimeError

if os.name == "posix":
    import fcntl


class CorruptFileError(LambdaRuntimeError, OSError):
    """A shared file exists but is not what was expected (truncated, not .npy, not JSON, ...)."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        super().__init__(f"{os.fspath(path)}: {message}")
        self.path = os.fspath(path)
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (CorruptFileError, (self.path, self.message))


class LockTimeout(LambdaRuntimeError, TimeoutError):
    """A `Lock` could not be taken within its timeout; names the lock file."""

    def __init__(self, path: str | os.PathLike[str], timeout: float) -> None:
        super().__init__(f"could not lock {os.fspath(path)} within {timeout:g} s")
        self.path = os.fspath(path)
        self.timeout = timeout

    def __str__(self) -> str:
        return f"could not lock {self.path} within {self.timeout:g} s"

    def __reduce__(self) -> tuple[Any, ...]:
        return (LockTimeout, (self.path, self.timeout))


# --------------------------------------------------------------------------------------------
# Atomic publish


def _temp_name(final: Path) -> Path:
    # Same directory so os.replace is a rename within one file system (atomic); the leading "."
    # and ".tmp" suffix let listings (ArrivalSet, cleanup) skip half-written files.
    return final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")


def _fsync_dir(directory: Path) -> None:
    """Make a rename/link in `directory` durable (NFS commits it anyway; local disks need this)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(final: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a complete, fsynced temp file next to `final` and return its path."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            # fsync before the rename: otherwise a crash (or another NFS client) can see the new
            # name pointing at a file whose data never reached the server.
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _writer(data: bytes) -> Callable[[IO[bytes]], None]:
    def write(fh: IO[bytes]) -> None:
        fh.write(data)

    return write


def _publish(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def publish_bytes(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`: readers see the old or the new file, never a part."""
    _publish(path, _writer(data))


def publish_npy(path: Path, array: np.ndarray) -> None:
    """Atomically publish `array` as a .npy file (no pickle: object arrays are refused)."""
    arr = np.asanyarray(array)
    if arr.dtype.hasobject:
        raise ValueError(
            f"{path}: object arrays cannot be stored without pickle (dtype {arr.dtype})"
        )
    _publish(path, lambda fh: np.save(fh, arr, allow_pickle=False))


def publish_json(path: Path, obj: Any) -> None:
    """Atomically publish `obj` as UTF-8 JSON."""
    data = json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode("utf-8") + b"\n"
    publish_bytes(path, data)


_HEADER_LOCK = threading.Lock()


def _read_npy_from(fh: IO[bytes], path: Path, mmap: bool) -> np.ndarray:
    """Check the header against the file size, then map or read the data from `fh`."""
    try:
        version = np.lib.format.read_magic(fh)
        # NumPy parses the header with ast.literal_eval, which CPython 3.11 cannot run in two
        # threads at once ("SystemError: AST constructor recursion depth mismatch", CPython
        # gh-106905): one header at a time per process.
        with _HEADER_LOCK:
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except (ValueError, EOFError) as exc:
        raise CorruptFileError(path, f"not a .npy array file ({exc})") from exc
    if dtype.hasobject:
        raise CorruptFileError(path, "holds pickled objects (dtype object); refused")
    offset = fh.tell()
    count = int(np.prod(shape, dtype=np.int64))
    expected = offset + count * dtype.itemsize
    size = os.fstat(fh.fileno()).st_size
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise CorruptFileError(
            path, f"{what}: {size} bytes, a {dtype} array of shape {shape} needs {expected}"
        )
    order: Literal["C", "F"] = "F" if fortran else "C"
    try:
        if mmap and count > 0:  # np.memmap cannot map zero bytes
            mapped: np.ndarray = np.memmap(
                cast(Any, fh), dtype=dtype, mode="r", offset=offset, shape=shape, order=order
            )
            return mapped
        data: np.ndarray = np.fromfile(fh, dtype=dtype, count=count)
    except (ValueError, OSError) as exc:
        raise CorruptFileError(path, f"unreadable .npy array ({exc})") from exc
    if data.size != count:
        raise CorruptFileError(path, f"truncated while reading: {data.size} of {count} items")
    return data.reshape(tuple(shape), order=order)


def read_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """Load a .npy array (read-only memory map by default); a missing or torn file raises."""
    path = Path(path)
    # One open for header, size check and data: a concurrent publish replaces the *name*, and
    # the descriptor keeps the version it opened complete (a second open could see another one).
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below; the memmap keeps its own mapping
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT, "No such file (expected a .npy array)", os.fspath(path)
        ) from None
    with fh:
        return _read_npy_from(fh, path, mmap)


def read_json(path: Path) -> Any:
    """Load a JSON file published with `publish_json`; a missing or torn file raises clearly."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT, "No such file (expected a JSON document)", os.fspath(path)
        ) from None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(path, f"not valid JSON ({len(data)} bytes: {exc})") from exc


# --------------------------------------------------------------------------------------------
# Locks


# POSIX record locks belong to the *process*: two threads of one process both "get" the same
# lock, and closing any descriptor of the file drops it. So threads first take an in-process lock
# per lock file; only the winner opens the file and takes the POSIX lock.
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock_for(path: str) -> threading.Lock:
    with _thread_locks_guard:
        lock = _thread_locks.get(path)
        if lock is None:
            lock = _thread_locks[path] = threading.Lock()
        return lock


def _reset_thread_locks_after_fork() -> None:
    # A child forked while a parent thread held one of these would otherwise inherit it locked.
    global _thread_locks, _thread_locks_guard
    _thread_locks = {}
    _thread_locks_guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_thread_locks_after_fork)


class Lock:
    """Advisory whole-file lock shared by threads and processes, with POSIX (`fcntl`) semantics.

    Why `fcntl.lockf` and not `filelock.UnixFileLock`: filelock uses `flock(2)`. Locally flock is a
    separate lock family owned by the open file description, but the Linux NFS client (and so EFS)
    emulates it with a whole-file POSIX lock owned by the process. Taking the POSIX lock directly
    gives the same semantics here as on EFS, so a protocol tested locally behaves the same there.
    The lock file is created on first use and never deleted (deleting it would let a waiter lock
    an unlinked inode while a newcomer locks a fresh one). Do not open the lock file elsewhere in
    the process: closing any descriptor of it releases the process's POSIX lock. Not reentrant.
    """

    def __init__(
        self, path: Path, timeout: float | None = None, poll_interval: float = 0.05
    ) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout: must be >= 0 seconds or None (wait forever), got {timeout}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval: must be > 0 seconds, got {poll_interval}")
        self.path = Path(path)
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._fd: int | None = None
        self._thread_lock = _thread_lock_for(os.path.realpath(self.path))

    @property
    def is_locked(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self, timeout: float | None = -1.0) -> None:
        """Take the lock within `timeout` s (negative: default; None: forever) or LockTimeout."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this Lock is already held (it is not reentrant)")
        limit = self.timeout if timeout is not None and timeout < 0 else timeout
        deadline = None if limit is None else time.monotonic() + limit
        if not self._thread_lock.acquire(timeout=-1 if limit is None else limit):
            raise LockTimeout(self.path, limit if limit is not None else 0.0)
        try:
            self._fd = self._lock_file(deadline, limit)
        except BaseException:
            self._thread_lock.release()
            raise

    def _lock_file(self, deadline: float | None, limit: float | None) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_RDWR: POSIX write locks need a descriptor open for writing.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        delay = 0.001
        try:
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                # Poll rather than block so the timeout holds (a blocking lockf cannot time out).
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise LockTimeout(self.path, limit if limit is not None else 0.0)
                sleep = delay if deadline is None else min(delay, deadline - now)
                time.sleep(max(sleep, 0.0))
                delay = min(delay * 2, self.poll_interval)
        except BaseException:
            os.close(fd)
            raise

    def release(self) -> None:
        """Release the lock (closing the descriptor drops the POSIX lock)."""
        fd = self._fd
        if fd is None:
            raise RuntimeError(f"{self.path}: release of a Lock that is not held")
        self._fd = None
        try:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            self._thread_lock.release()

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lock({os.fspath(self.path)!r}, held={self.is_locked})"


# --------------------------------------------------------------------------------------------
# Exclusive claims


def claim(path: Path, owner: str) -> bool:
    """Claim `path` for `owner`; among any number of concurrent callers exactly one gets True.

    The owner string is written to a temp file first and then hard-linked onto the claim name:
    `link(2)` fails with EEXIST if the name exists (as exclusive as O_CREAT|O_EXCL, on local file
    systems and NFSv4), and the claim file appears with its content complete, so a reader never
    sees an empty claim. If an NFS retransmission reports EEXIST for our own successful link, the
    temp file's link count of 2 still tells us we won (the check open(2) recommends).
    """
    if not isinstance(owner, str) or not owner:
        raise ValueError(f"owner: must be a non-empty string, got {owner!r}")
    path = Path(path)
    tmp = _write_temp(path, _writer(owner.encode("utf-8")))
    try:
        try:
            os.link(tmp, path)
            won = True
        except FileExistsError:
            won = os.stat(tmp).st_nlink == 2
    finally:
        tmp.unlink(missing_ok=True)
    if won:
        _fsync_dir(path.parent)
    return won


def claim_owner(path: Path) -> str | None:
    """The owner recorded by the winning `claim` of `path`, or None if nobody claimed it."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# Arrival sets

_MEMBER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@+=-]{0,199}")


class ArrivalSet:
    """A set of members (worker ids) on the shared FS; a duplicate add never counts twice.

    Why not count directory entries: on NFS another client's listing may lag (readdir and
    attribute caches), and two workers that finish together both see N entries, so "whoever sees
    N files fires the combine" fires never or twice. Here every add and read takes the set's
    `Lock`, so adds are serialised and each sees all earlier ones. The committed membership is an
    index file (`.members.json`) re-read after taking the lock: under close-to-open consistency a
    regular file opened after the previous holder's close is current, which a directory listing
    is not guaranteed to be. Each member is also a file `<dir>/<member>`, published atomically
    before the index (the commit point): a crashed add leaves nothing or a complete record, and a
    retried add of a recorded-but-uncommitted member commits it then. Because adds are
    serialised and each adds at most one member, the sizes returned with `added=True` are 1, 2, 3,
    ... each exactly once. For a trigger that also survives a crash between commit and action,
    let every caller that sees `size >= N` try `claim()` the next step: exactly one wins.
    """

    INDEX = ".members.json"
    LOCK = ".lock"

    def __init__(self, directory: Path, lock_timeout: float | None = 60.0) -> None:
        self.directory = Path(directory)
        self._lock_timeout = lock_timeout

    def _lock(self) -> Lock:
        return Lock(self.directory / self.LOCK, timeout=self._lock_timeout)

    @staticmethod
    def _check_member(member: str) -> None:
        # Member names become file names; they may not start with "." (reserved for the index,
        # the lock and temp files) nor contain "/" or NUL.
        if not isinstance(member, str) or not _MEMBER.fullmatch(member):
            raise ValueError(
                f"member: {member!r} is not allowed; use 1-200 characters of "
                "[A-Za-z0-9_.:@+=-], not starting with '.' or '-'"
            )

    def _read_index(self) -> set[str]:
        try:
            data = read_json(self.directory / self.INDEX)
        except FileNotFoundError:
            return set()
        if not isinstance(data, list) or not all(isinstance(m, str) for m in data):
            raise CorruptFileError(self.directory / self.INDEX, "expected a JSON list of members")
        return set(data)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock():
            yield

    def add(self, member: str) -> tuple[bool, int]:
        """Add `member`; return (True if it was new, size of the set after this call)."""
        self._check_member(member)
        with self._locked():
            current = self._read_index()
            if member in current:
                return False, len(current)
            publish_bytes(self.directory / member, member.encode("utf-8"))
            current.add(member)
            publish_json(self.directory / self.INDEX, sorted(current))
            return True, len(current)

    def members(self) -> set[str]:
        """The committed members."""
        with self._locked():
            return self._read_index()

    def __len__(self) -> int:
        return len(self.members())

    def __contains__(self, member: object) -> bool:
        return isinstance(member, str) and member in self.members()


# --------------------------------------------------------------------------------------------
# Paths from events


def safe_join(root: Path, *parts: str) -> Path:
    """Join ids (e.g. a run id from an event) under `root`; ValueError names a part that escapes."""
    root = Path(root)
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"path part {part!r}: must be a string")
        if not part:
            raise ValueError("path part '': must not be empty")
        if "\x00" in part:
            raise ValueError(f"path part {part!r}: must not contain a NUL character")
        if part.startswith("/") or os.path.isabs(part):
            raise ValueError(f"path part {part!r}: must be relative, not absolute")
        if ".." in part.split("/"):
            raise ValueError(f"path part {part!r}: must not contain '..'")
    joined = root.joinpath(*parts)
    # Catch escapes through symlinks already present under root.
    real_root = os.path.realpath(root)
    real = os.path.realpath(joined)
    if os.path.commonpath([real_root, real]) != real_root:
        raise ValueError(f"path part(s) {list(parts)!r}: resolve to {real}, outside {real_root}")
    return joined
