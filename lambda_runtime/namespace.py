"""The environment side of the sandbox: what runs inside the environment's process before user
code — a private mount namespace, the /tmp image on a loop device, EFS bind mounts.

Kept apart from `sandbox` (the parent side) and limited to light imports on purpose: every cold
start of an execution environment imports it, and Lambda's Init Duration is what users see.
See `lambda_runtime.sandbox` for the design.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

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


class SandboxSpec:
    """What the environment process needs to build its /tmp and /mnt; picklable."""

    __slots__ = ("efs", "efs_mode", "env_id", "ephemeral_mb", "tmp_mode", "tmp_path")
    env_id: str
    ephemeral_mb: int
    tmp_mode: str
    tmp_path: str
    efs: dict[str, str]
    efs_mode: str

    def __init__(
        self,
        env_id: str,
        ephemeral_mb: int,
        tmp_mode: str,  # "loop-ext4" | "watched-dir"
        tmp_path: str,  # image file (loop-ext4) or directory (watched-dir) on the host
        efs: dict[str, str],  # mount path -> host directory
        efs_mode: str,  # "bind" | "env"
    ) -> None:
        object.__setattr__(self, "env_id", env_id)
        object.__setattr__(self, "ephemeral_mb", ephemeral_mb)
        object.__setattr__(self, "tmp_mode", tmp_mode)
        object.__setattr__(self, "tmp_path", tmp_path)
        object.__setattr__(self, "efs", efs)
        object.__setattr__(self, "efs_mode", efs_mode)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"SandboxSpec is frozen; cannot set {name}")

    def _fields(self) -> tuple[object, ...]:
        return (
            self.env_id,
            self.ephemeral_mb,
            self.tmp_mode,
            self.tmp_path,
            self.efs,
            self.efs_mode,
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (SandboxSpec, self._fields())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SandboxSpec) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((self.env_id, self.tmp_path))

    def __repr__(self) -> str:
        return (
            f"SandboxSpec(env_id={self.env_id!r}, ephemeral_mb={self.ephemeral_mb!r}, "
            f"tmp_mode={self.tmp_mode!r}, tmp_path={self.tmp_path!r}, efs={self.efs!r}, "
            f"efs_mode={self.efs_mode!r})"
        )


def efs_env_var(mount_path: str) -> str:
    """`/mnt/efs` -> `LAMBDA_RUNTIME_EFS_EFS`: mount name upper-cased, non-alphanumerics as '_'."""
    name = mount_path.rstrip("/").rsplit("/", 1)[-1]
    return EFS_ENV_PREFIX + "".join(c if c.isascii() and c.isalnum() else "_" for c in name).upper()


# ---------------------------------------------------------------------------- system calls

_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    # CDLL(None) is the C library the interpreter is linked with; ctypes.util.find_library
    # would spawn compilers and cost tens of milliseconds per cold start.
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        libc.unshare.argtypes = [ctypes.c_int]
        _LIBC = libc
    return _LIBC


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
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        setattr(tempfile, "tempdir", None)  # noqa: B010 - gettempdir() caches; look again
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
    import shutil
    import subprocess

    mount = shutil.which("mount") or shutil.which("mount", path="/usr/sbin:/sbin:/usr/bin:/bin")
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
