"""Per-environment /tmp of the configured size and the EFS directory at /mnt/<name>.

Two mechanisms (lambda-semantics.md §1, §6, §9):

* ``loop-ext4`` (root on Linux): the environment process calls :func:`enter` before any user code.
  It unshares a private mount namespace, makes ``/`` recursively private, attaches its own copy of
  an ext4 image through a loop device (``LOOP_CONFIGURE`` with ``LO_FLAGS_AUTOCLEAR``, so the
  device detaches by itself when the namespace's last process is gone) and mounts it at ``/tmp``
  with ``discard``; a small read-only tmpfs at ``/mnt`` carries bind mounts of the EFS host
  directories. A write past the cap fails with ENOSPC inside the handler, as on Lambda. /tmp is a
  disk file system and not tmpfs because tmpfs pages are charged to the writer's memory cgroup and
  would count against the function's memory; the loop device runs with direct I/O where the host
  allows it so the image's pages are not cached twice.
* ``watched-dir`` (non-root, macOS, or isolation "portable"): /tmp is a host directory handed to the
  handler as ``TMPDIR``. Code that writes the literal path ``/tmp`` writes the HOST's /tmp, which
  nothing here can see or limit. The parent measures the directory (:meth:`TmpStore.usage_bytes`)
  and ends the invocation when :meth:`TmpStore.over_limit` says so. EFS: the handler finds the host
  directory in ``LAMBDA_RUNTIME_EFS_<NAME>``; :func:`efs_path` resolves either case.

Sizing: ``statvfs('/tmp').f_bavail * f_frsize`` of a fresh /tmp (what ``shutil.disk_usage`` calls
free) is the configured size plus 64 KiB to 0.1 %: the image has no reserved blocks, no journal,
no resize inode, one inode per 16 KiB, and mkfs is repeated until the kernel's own reservation
(2 % of blocks, at most 4096) is paid for. ``total`` is larger than ``free`` by that reservation.

Measured on the development host (2 vCPUs, kernel 6.18, ext4 host disk, direct-I/O loop):
image preparation, once per size and cached: 9-24 ms (1-3 mke2fs runs plus one debugfs), alike
for 512 and 10,240 MB; per environment: the sparse copy 0.3-0.5 ms, ``enter()`` 6-7.5 ms, and
the loop device is released 0.6-2.4 ms after the environment's process is SIGKILLed.

Integration notes: after ``enter()`` the process sees its own /tmp (and, with EFS, an empty
read-only /mnt holding only the EFS mounts), so anything it needs from host paths under /tmp or
/mnt (handler code, sockets) must be opened or imported before ``enter()`` or live elsewhere.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from lambda_runtime import quotas
from lambda_runtime.errors import ConfigError, IsolationUnavailable
from lambda_runtime.namespace import (  # the environment side, re-exported
    _BLOCK,
    _DIR_NAME,
    _IMAGE_NAME,
    _IMAGE_VERSION,
    _MARGIN_BLOCKS,
    _MKFS_OPTS,
    _MS_PRIVATE,
    _MS_REC,
    _OWNER_SUFFIX,
    _TMP_MOUNT,
    RELEASE_TIMEOUT_S,
    MiB,
    SandboxSpec,
    _mount,
    _unshare_mounts,
    _wait_unattached,
    efs_env_var,
)

# The environment side lives in `namespace` (light imports for cold starts); these names are
# part of this module's interface too.
from lambda_runtime.namespace import EFS_ENV_PREFIX as EFS_ENV_PREFIX
from lambda_runtime.namespace import _attach_loop as _attach_loop
from lambda_runtime.namespace import _backing_loops as _backing_loops
from lambda_runtime.namespace import _libc as _libc
from lambda_runtime.namespace import _oserror as _oserror
from lambda_runtime.namespace import enter as enter


def efs_path(mount_path: str) -> Path:
    """Where handler code finds EFS: the mount itself if mounted, else the host directory."""
    if os.path.ismount(mount_path):
        return Path(mount_path)
    host = os.environ.get(efs_env_var(mount_path))
    if host:
        return Path(host)
    if os.path.isdir(mount_path):  # e.g. on real Lambda behind an unusual mount table
        return Path(mount_path)
    raise FileNotFoundError(
        errno.ENOENT,
        f"EFS {mount_path} is neither mounted nor named by ${efs_env_var(mount_path)}",
        mount_path,
    )


# ---------------------------------------------------------------------------- system calls


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


@functools.cache
def host_supports_namespaces() -> tuple[bool, str]:
    """Can this process create a private mount namespace and mount in it? (ok, reason); cached."""
    if not sys.platform.startswith("linux"):
        return False, f"mount namespaces need Linux; this host is {sys.platform}"
    if os.geteuid() != 0:
        return False, f"mount namespaces need root; running as uid {os.geteuid()}"
    probe = tempfile.mkdtemp(prefix="lambda-ns-probe-")
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # child: never returns into the caller's code
            msg = b""
            try:
                os.close(r)
                _unshare_mounts()
                _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
                _mount("tmpfs", probe, "tmpfs", 0, "size=4k")
            except BaseException as exc:
                msg = str(exc).encode() or b"failed"
            os.write(w, msg)
            os._exit(0)
        os.close(w)
        w = -1
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        os.waitpid(pid, 0)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        os.rmdir(probe)
    failure = b"".join(chunks).decode(errors="replace")
    return (False, failure) if failure else (True, "private mount namespace with tmpfs mount works")


@functools.cache
def _loop_ext4_support() -> tuple[bool, str]:
    ok, reason = host_supports_namespaces()
    if not ok:
        return False, reason
    for tool in ("mke2fs", "debugfs"):
        if _tool(tool) is None:
            return False, f"{tool} (e2fsprogs) is not installed"
    if not (os.path.exists("/dev/loop-control") or os.path.exists("/sys/class/misc/loop-control")):
        return False, "no loop device support (/dev/loop-control missing; modprobe loop)"
    return True, "private mount namespace, loop device, ext4"


# ---------------------------------------------------------------------------- ext4 images


def _superblock(path: str | Path) -> tuple[int, int, int, int]:
    """(block size, blocks, free blocks, blocks statvfs reports available) of an ext4 image."""
    with open(path, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        raise OSError(errno.EINVAL, f"{path} is not an ext4 image")
    blocks, reserved, free = struct.unpack_from("<III", sb, 4)
    incompat = struct.unpack_from("<I", sb, 0x60)[0]
    if incompat & 0x80:  # 64bit: high halves
        hi = struct.unpack_from("<III", sb, 0x150)
        blocks, reserved, free = blocks | hi[0] << 32, reserved | hi[1] << 32, free | hi[2] << 32
    bsize = 1024 << struct.unpack_from("<I", sb, 0x18)[0]
    # The kernel keeps min(2 %, 4096) clusters back for extent splits (ext4_calculate_resv_clusters)
    resv = min(blocks // 50, 4096) if incompat & 0x40 else 0
    return bsize, blocks, free, max(0, free - reserved - resv)


def _mkfs(path: Path, blocks: int) -> None:
    with open(path, "wb") as f:
        f.truncate(blocks * _BLOCK)
    cmd = [_tool("mke2fs") or "mke2fs", *_MKFS_OPTS, str(path), str(blocks)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(errno.EIO, f"mke2fs failed: {done.stderr.strip() or done.stdout.strip()}")


def _build_image(path: Path, mb: int) -> None:
    """mkfs until the free space statvfs will report is mb MiB plus 64 KiB to 0.1 %."""
    target = mb * MiB // _BLOCK + _MARGIN_BLOCKS
    slack = max(_MARGIN_BLOCKS, target // 1000)
    blocks = target * 51 // 49 + target // 60  # + kernel reserve (2 %) + inode tables (1/64)
    for _ in range(8):
        _mkfs(path, blocks)
        avail = _superblock(path)[3]
        if target <= avail <= target + slack:
            break
        # Extra blocks also grow the 2 % reserve and sometimes add a block group's metadata.
        blocks += (target + slack // 2 - avail) * 51 // 50
    else:
        raise OSError(errno.EIO, f"could not size an ext4 image to {mb} MiB free")
    # Lambda's /tmp is an empty, world-writable directory: no lost+found, mode 1777.
    script = "rmdir lost+found\nsif / mode 041777\n"
    done = subprocess.run(
        [_tool("debugfs") or "debugfs", "-w", "-f", "-", str(path)],
        input=script, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise OSError(errno.EIO, f"debugfs failed: {done.stderr.strip()}")


def pristine_image(cache_dir: Path, mb: int) -> Path:
    """The cached empty image for a /tmp of mb MiB, built once (locked against other builders)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"ext4-{mb}MiB-{_IMAGE_VERSION}.img"
    if final.exists():
        return final
    with open(cache_dir / f".ext4-{mb}MiB.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.exists():
            partial = cache_dir / f".ext4-{mb}MiB-{os.getpid()}.partial"
            try:
                _build_image(partial, mb)
                os.replace(partial, final)
            finally:
                partial.unlink(missing_ok=True)
    return final


def _sparse_copy(src: Path, dst: Path) -> None:
    """Copy only the data extents of src (SEEK_DATA/SEEK_HOLE + copy_file_range)."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(sfd).st_size
            os.ftruncate(dfd, size)
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(sfd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # only a hole is left
                        break
                    raise
                end = os.lseek(sfd, start, os.SEEK_HOLE)
                _copy_range(sfd, dfd, start, end)
                pos = end
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _copy_range(sfd: int, dfd: int, start: int, end: int) -> None:
    while start < end:
        try:
            n = os.copy_file_range(sfd, dfd, end - start, start, start)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = 0
        if n == 0:  # no in-kernel copy here: plain reads and writes
            n = os.pwrite(dfd, os.pread(sfd, min(end - start, 4 * MiB), start), start)
        start += n


# ---------------------------------------------------------------------------- loop devices


# ---------------------------------------------------------------------------- parent side


class TmpStore:
    """Parent side of one execution environment's /tmp: creates it, measures it, deletes it."""

    spec: SandboxSpec
    mechanisms: dict[str, str]

    def __init__(
        self,
        env_dir: Path,
        env_id: str,
        ephemeral_mb: int,
        efs: Mapping[str, Path],
        isolation: str,
        cache_dir: Path,
    ) -> None:
        if isinstance(ephemeral_mb, bool) or not isinstance(ephemeral_mb, int):
            raise ConfigError("ephemeral_mb", f"must be a whole number of MB, got {ephemeral_mb!r}")
        if not quotas.EPHEMERAL_MIN_MB <= ephemeral_mb <= quotas.EPHEMERAL_MAX_MB:
            raise ConfigError(
                "ephemeral_mb",
                f"must be from {quotas.EPHEMERAL_MIN_MB} to {quotas.EPHEMERAL_MAX_MB} MB, "
                f"got {ephemeral_mb}",
            )
        if isolation not in ("auto", "strict", "portable"):
            raise ConfigError(
                "isolation", f"must be 'auto', 'strict' or 'portable', got {isolation!r}"
            )
        mounts: dict[str, str] = {}
        for mount, host in efs.items():
            bad = mount.endswith(("/.", "/..")) if isinstance(mount, str) else True
            if bad or not re.fullmatch(quotas.EFS_MOUNT_PATH_PATTERN, mount):
                raise ConfigError("efs", f"mount path must look like /mnt/<name>, got {mount!r}")
            mounts[mount] = str(Path(host).resolve())
        if isolation == "portable":
            ok, reason = False, "isolation='portable'"
        else:
            ok, reason = _loop_ext4_support()
            if not ok and isolation == "strict":
                raise IsolationUnavailable(
                    f"isolation='strict' needs a loop-mounted ext4 /tmp in a private mount "
                    f"namespace, which this host cannot provide: {reason}"
                )
        self.ephemeral_mb = ephemeral_mb
        self.limit_bytes = ephemeral_mb * MiB
        env_dir = Path(env_dir)
        env_dir.mkdir(parents=True, exist_ok=True)
        self._closed = False
        self._peak = 0
        self._owner: tuple[str, int] | None = None
        if ok:
            path = env_dir / _IMAGE_NAME
            # A new inode, never a truncated one: an old loop device may still hold the old file
            # (enter() then waits for it, since sysfs names the same path).
            path.unlink(missing_ok=True)
            _sparse_copy(pristine_image(Path(cache_dir), ephemeral_mb), path)
            self._bsize, _, self._free0, _ = _superblock(path)
            self._alloc0 = os.stat(path).st_blocks * 512
            self.spec = SandboxSpec(env_id, ephemeral_mb, "loop-ext4", str(path), mounts, "bind")
            self.mechanisms = {"tmp": "loop-ext4", "efs": "bind-mount" if mounts else "none"}
        else:
            path = env_dir / _DIR_NAME
            shutil.rmtree(path, ignore_errors=True)  # a new environment starts with an empty /tmp
            path.mkdir(mode=0o700)
            self.spec = SandboxSpec(env_id, ephemeral_mb, "watched-dir", str(path), mounts, "env")
            self.mechanisms = {
                "tmp": "watched-dir",
                "efs": "host-path (LAMBDA_RUNTIME_EFS_*)" if mounts else "none",
                "reason": f"{reason}; /tmp is TMPDIR={path}, measured from outside, and code "
                "that writes the literal path /tmp writes the host's /tmp",
            }

    def _live_statvfs(self) -> os.statvfs_result | None:
        """statvfs of the mounted /tmp through /proc/<pid>/root, if the entering process lives."""
        # The owner file changes only when a new runtime process mounts the image: reuse what
        # it said while its /tmp is still there (this runs at every invocation's start and end).
        for cached in (True, False):
            if cached and self._owner is None:
                continue
            try:
                if not cached:
                    with open(self.spec.tmp_path + _OWNER_SUFFIX) as f:
                        pid, dev = (int(x) for x in f.read().split())
                    self._owner = (f"/proc/{pid}/root{_TMP_MOUNT}", dev)
                assert self._owner is not None
                where, dev = self._owner
                if os.stat(where).st_dev != dev:  # process gone, pid reused, or not yet mounted
                    continue
                return os.statvfs(where)
            except (OSError, ValueError):
                continue
        self._owner = None
        return None

    def usage_bytes(self) -> int:
        """Bytes the environment has put in its /tmp, measured from outside."""
        if self.spec.tmp_mode == "watched-dir":
            return _tree_bytes(self.spec.tmp_path)
        st = self._live_statvfs()
        if st is not None:  # exact, includes data still in the page cache
            return max(0, (self._free0 - st.f_bfree) * st.f_frsize)
        try:  # nothing mounted: what the image holds beyond the pristine copy
            return max(0, os.stat(self.spec.tmp_path).st_blocks * 512 - self._alloc0)
        except FileNotFoundError:
            return 0

    def reset_peak(self) -> None:
        """Start a new peak (per invocation) at the current usage."""
        self._peak = self.usage_bytes()

    def poll(self) -> None:
        """Sample usage for the peak."""
        self._peak = max(self._peak, self.usage_bytes())

    def peak_bytes(self) -> int:
        """Highest usage seen since reset_peak(), including now."""
        self.poll()
        return self._peak

    def over_limit(self) -> bool:
        """watched-dir: usage is past the configured size. loop-ext4: False (kernel enforces)."""
        if self.spec.tmp_mode != "watched-dir":
            return False
        usage = self.usage_bytes()
        self._peak = max(self._peak, usage)
        return usage > self.limit_bytes

    def wait_released(self, timeout_s: float = RELEASE_TIMEOUT_S) -> None:
        """Return once no loop device holds the image (a new process may then enter)."""
        if self.spec.tmp_mode != "loop-ext4" or self._closed:
            return
        fd = os.open(self.spec.tmp_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _wait_unattached(fd, os.path.realpath(self.spec.tmp_path), timeout_s, keep_lock=False)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Delete the image or directory (environment shut down); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.spec.tmp_mode == "loop-ext4":
            # A still-attached loop device keeps the deleted file until it detaches.
            Path(self.spec.tmp_path).unlink(missing_ok=True)
            Path(self.spec.tmp_path + _OWNER_SUFFIX).unlink(missing_ok=True)
        else:
            shutil.rmtree(self.spec.tmp_path, ignore_errors=True)


def _tree_bytes(root: str) -> int:
    """Allocated bytes under root, hard links counted once, files vanishing mid-walk skipped."""
    total, seen, stack = 0, set(), [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


# ---------------------------------------------------------------------------- environment side
