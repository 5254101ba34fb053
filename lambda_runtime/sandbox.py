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

import contextlib
import ctypes
import ctypes.util
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
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lambda_runtime import quotas
from lambda_runtime.errors import ConfigError, IsolationUnavailable

MiB = 1024 * 1024
RELEASE_TIMEOUT_S = 2.0
EFS_ENV_PREFIX = "LAMBDA_RUNTIME_EFS_"
_TMP_MOUNT = "/tmp"
_IMAGE_NAME = "tmp.ext4"
_DIR_NAME = "tmp"
_OWNER_SUFFIX = ".owner"
_BLOCK = 4096
_MARGIN_BLOCKS = 16  # a few blocks for the extent-tree blocks a large file needs
_MKFS_OPTS = (
    "-q", "-F", "-t", "ext4", "-b", str(_BLOCK), "-m", "0", "-I", "256", "-i", "16384",
    "-O", "^has_journal,^resize_inode", "-E", "root_owner=0:0", "-L", "lambda-tmp",
)  # fmt: skip
_IMAGE_VERSION = "v1"
_MOUNT_OPTS = "discard,noinit_itable"  # discard punches freed blocks out of the image file

# Linux constants (linux/sched.h, linux/mount.h, linux/loop.h).
_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_LOOP_SET_FD, _LOOP_CLR_FD, _LOOP_SET_STATUS64 = 0x4C00, 0x4C01, 0x4C04
_LOOP_SET_DIRECT_IO, _LOOP_CONFIGURE, _LOOP_CTL_GET_FREE = 0x4C08, 0x4C0A, 0x4C82
_LO_FLAGS_AUTOCLEAR, _LO_FLAGS_DIRECT_IO = 4, 16
_LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")  # struct loop_info64, 232 bytes
_LOOP_CONFIG = struct.Struct("=II232s64x")  # struct loop_config, 304 bytes


@dataclass(frozen=True)
class SandboxSpec:
    """What the environment process needs to build its /tmp and /mnt; picklable."""

    env_id: str
    ephemeral_mb: int
    tmp_mode: str  # "loop-ext4" | "watched-dir"
    tmp_path: str  # image file (loop-ext4) or directory (watched-dir) on the host
    efs: dict[str, str]  # mount path -> host directory
    efs_mode: str  # "bind" | "env"


def efs_env_var(mount_path: str) -> str:
    """`/mnt/efs` -> `LAMBDA_RUNTIME_EFS_EFS`: mount name upper-cased, non-alphanumerics as '_'."""
    name = mount_path.rstrip("/").rsplit("/", 1)[-1]
    return EFS_ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


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


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    libc.unshare.argtypes = [ctypes.c_int]
    return libc


def _oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def _unshare_mounts() -> None:
    if _libc().unshare(_CLONE_NEWNS) != 0:
        raise _oserror("unshare(CLONE_NEWNS) for a private mount namespace")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    enc = [None if s is None else os.fsencode(s) for s in (src, target, fstype)]
    if _libc().mount(enc[0], enc[1], enc[2], flags, data.encode() or None) != 0:
        raise _oserror(f"mount {src or '(none)'} on {target} ({fstype or 'flags only'})")


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


def _backing_loops(image: str) -> list[str]:
    """Loop devices whose backing file is image (also after the file was deleted)."""
    devs = []
    try:
        names = [n for n in os.listdir("/sys/block") if n.startswith("loop")]
    except FileNotFoundError:
        return []
    for name in names:
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().rstrip("\n")
        except OSError:  # not attached
            continue
        if backing.removesuffix(" (deleted)") == image:
            devs.append(f"/dev/{name}")
    return devs


def _wait_unattached(fd: int, image: str, timeout_s: float, keep_lock: bool) -> None:
    """Wait until no loop device uses image: our flock is free and sysfs names no device.

    The flock is taken on the file description the loop device will hold, so it stays locked for
    as long as that device exists: a second mount of the same image cannot start meanwhile.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        devs = _backing_loops(image)
        if locked and not devs:
            if not keep_lock:
                fcntl.flock(fd, fcntl.LOCK_UN)
            return
        if time.monotonic() >= deadline:
            holder = ", ".join(devs) if devs else "a loop device being set up or torn down"
            raise TimeoutError(
                errno.ETIMEDOUT,
                f"/tmp image {image} is still in use by {holder} after {timeout_s:g} s; "
                "an earlier process of this environment is still alive (kill its whole "
                "process tree) or its loop device was attached without autoclear",
            )
        time.sleep(0.002)


def _open_node(path: str, sysfs_dev: str, char: bool) -> int:
    """Open a device node, creating it from its sysfs major:minor if missing (containers)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        with open(sysfs_dev) as f:
            major, minor = (int(x) for x in f.read().split(":"))
        kind = 0o020000 if char else 0o060000  # S_IFCHR / S_IFBLK
        with contextlib.suppress(FileExistsError):  # another environment raced us
            os.mknod(path, kind | 0o660, os.makedev(major, minor))
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def _configure(loop_fd: int, image_fd: int, image: str) -> None:
    name = os.fsencode(image)[:63]
    for flags in (_LO_FLAGS_AUTOCLEAR | _LO_FLAGS_DIRECT_IO, _LO_FLAGS_AUTOCLEAR):
        info = _LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, name, b"", b"", 0, 0)
        try:
            fcntl.ioctl(loop_fd, _LOOP_CONFIGURE, _LOOP_CONFIG.pack(image_fd, 0, info))
            return
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTTY):
                raise
    # Kernels before 5.8: attach, then set autoclear; direct I/O is optional.
    fcntl.ioctl(loop_fd, _LOOP_SET_FD, image_fd)
    info = _LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, _LO_FLAGS_AUTOCLEAR, name, b"", b"", 0, 0)
    try:
        fcntl.ioctl(loop_fd, _LOOP_SET_STATUS64, info)
    except OSError:
        fcntl.ioctl(loop_fd, _LOOP_CLR_FD, 0)
        raise
    with contextlib.suppress(OSError):
        fcntl.ioctl(loop_fd, _LOOP_SET_DIRECT_IO, 1)


def _attach_loop(image_fd: int, image: str) -> tuple[int, str]:
    """Bind image_fd to a free loop device; returns (open device fd, device path)."""
    ctl = _open_node("/dev/loop-control", "/sys/class/misc/loop-control/dev", char=True)
    try:
        for attempt in range(200):
            n = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
            dev = f"/dev/loop{n}"
            try:
                fd = _open_node(dev, f"/sys/class/block/loop{n}/dev", char=False)
            except FileNotFoundError:  # device removed between GET_FREE and open
                continue
            try:
                _configure(fd, image_fd, image)
                return fd, dev
            except OSError as exc:
                os.close(fd)
                if exc.errno != errno.EBUSY:  # EBUSY: another environment took it first
                    raise OSError(exc.errno, f"attaching {image} to {dev}: {exc.strerror}") from exc
                time.sleep(0.0005 * (attempt % 8))
        raise OSError(errno.EBUSY, f"no free loop device for {image} after 200 attempts")
    finally:
        os.close(ctl)


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
        try:
            with open(self.spec.tmp_path + _OWNER_SUFFIX) as f:
                pid, dev = (int(x) for x in f.read().split())
            where = f"/proc/{pid}/root{_TMP_MOUNT}"
            if os.stat(where).st_dev != dev:  # process gone, pid reused, or not yet mounted
                return None
            return os.statvfs(where)
        except (OSError, ValueError):
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


def enter(spec: SandboxSpec) -> dict[str, str]:
    """Build /tmp and /mnt for this process (run before user code); returns env vars to add.

    The returned variables are also set in os.environ. In loop-ext4 mode TMPDIR/TEMP/TMP are
    removed from os.environ (they would point at the host), and tempfile's cached directory is
    reset either way. Must run while the process has a single thread: a mount namespace belongs
    to the thread that unshares it.
    """
    if spec.tmp_mode not in ("loop-ext4", "watched-dir"):
        raise OSError(
            errno.EINVAL, f"tmp_mode must be 'loop-ext4' or 'watched-dir', got {spec.tmp_mode!r}"
        )
    if spec.efs_mode not in ("bind", "env"):
        raise OSError(errno.EINVAL, f"efs_mode must be 'bind' or 'env', got {spec.efs_mode!r}")
    added: dict[str, str] = {}
    if spec.tmp_mode == "loop-ext4" or (spec.efs and spec.efs_mode == "bind"):
        _enter_namespace(spec)
    if spec.tmp_mode == "watched-dir":
        added["TMPDIR"] = spec.tmp_path
    else:
        for var in ("TMPDIR", "TEMP", "TMP"):
            os.environ.pop(var, None)
    if spec.efs_mode == "env":
        added.update({efs_env_var(m): host for m, host in spec.efs.items()})
    os.environ.update(added)
    tempfile.tempdir = None  # gettempdir() caches; make it look again
    return added


def _enter_namespace(spec: SandboxSpec) -> None:
    if not sys.platform.startswith("linux"):
        raise OSError(
            errno.ENOSYS, f"loop-ext4 /tmp and EFS bind mounts need Linux, not {sys.platform}"
        )
    threads = len(os.listdir("/proc/self/task"))
    if threads > 1:
        raise OSError(
            errno.EINVAL,
            f"enter() must run before the process starts threads ({threads} running): the "
            "private mount namespace would cover only the calling thread",
        )
    loop = spec.tmp_mode == "loop-ext4"
    # Open everything before mounting: the image, the EFS directories and the owner file may
    # live under /tmp or /mnt, which the mounts below cover.
    fds: list[int] = []
    try:
        if loop:
            image = os.path.realpath(spec.tmp_path)
            image_fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
            fds.append(image_fd)
            owner_fd = os.open(
                image + _OWNER_SUFFIX, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
            )
            fds.append(owner_fd)
        _unshare_mounts()
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below propagates to the host
        # Bind sources must be opened in this namespace (a mount of another one gives EINVAL).
        efs_fds = {}
        for mount, host in spec.efs.items() if spec.efs_mode == "bind" else ():
            try:
                efs_fds[mount] = os.open(host, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                msg = f"EFS host directory {host} for {mount}: {exc.strerror}"
                raise OSError(exc.errno, msg) from exc
            fds.append(efs_fds[mount])
        if loop:
            _wait_unattached(image_fd, image, RELEASE_TIMEOUT_S, keep_lock=True)
            _mount_tmp(image_fd, image)
            os.write(owner_fd, f"{os.getpid()} {os.stat(_TMP_MOUNT).st_dev}\n".encode())
        if efs_fds:
            _mount_efs(efs_fds)
    finally:
        for fd in fds:
            os.close(fd)  # the loop device keeps its own reference to the image (and its flock)


def _mount_tmp(image_fd: int, image: str) -> None:
    try:
        loop_fd, dev = _attach_loop(image_fd, image)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise
        _mount_with_command(image, exc)
        return
    try:
        _mount(dev, _TMP_MOUNT, "ext4", _MS_NOSUID | _MS_NODEV, _MOUNT_OPTS)
    except OSError as exc:
        raise OSError(exc.errno, f"mounting {image} ({dev}) on /tmp: {exc.strerror}") from exc
    finally:
        os.close(loop_fd)  # the mount holds the device now; autoclear detaches it on unmount


def _mount_with_command(image: str, why: OSError) -> None:
    """Fallback when the loop ioctls fail: util-linux sets autoclear for -o loop itself."""
    mount = _tool("mount")
    if mount is None:
        raise why
    opts = f"loop,nosuid,nodev,{_MOUNT_OPTS}"
    done = subprocess.run(
        [mount, "-t", "ext4", "-o", opts, image, _TMP_MOUNT],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise OSError(why.errno, f"{why}; `mount -o loop` also failed: {done.stderr.strip()}")


def _mount_efs(efs_fds: Mapping[str, int]) -> None:
    os.makedirs("/mnt", exist_ok=True)  # a host without /mnt gets an empty one
    tmpfs_opts = "size=64k,mode=755"
    _mount("tmpfs", "/mnt", "tmpfs", _MS_NOSUID | _MS_NODEV, tmpfs_opts)
    for mount, fd in efs_fds.items():
        os.mkdir(mount, 0o755)
        _mount(f"/proc/self/fd/{fd}", mount, None, _MS_BIND | _MS_REC)
    # /mnt itself read-only, as on Lambda; the bind mounts below it stay writable.
    _mount(None, "/mnt", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
