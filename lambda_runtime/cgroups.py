"""The cgroup limiters: finding the controllers, and the v1 and v2 backends.

``CgroupV1Limiter`` / ``CgroupV2Limiter`` let the kernel enforce the memory limit (the OOM killer
ends the environment the way Lambda's does) and the CPU share (a CFS quota of vcpus x period);
``detect_layout`` finds where the controllers are mounted. What ``peak_bytes()`` reports, and
why, is described in ``lambda_runtime.limiter``.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from lambda_runtime.errors import IsolationUnavailable
from lambda_runtime.limiter_base import KILL_WAIT_S, Limiter
from lambda_runtime.procmem import _PAGE, _sigkill, high_water_bytes, reset_high_water, tree_bytes

PARENT_CGROUP = "lambda_runtime"
CFS_PERIOD_US = 100_000
# Creating and removing the shared parent cgroup must not race between environments' threads.
_PARENT_LOCK = threading.Lock()


# -- finding the controllers --------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupLayout:
    """Where the controllers live: a v1 mount per controller, or one v2 unified mount."""

    version: str  # "v1" | "v2"
    memory: Path | None
    cpu: Path | None = None
    freezer: Path | None = None  # v1 only; v2 freezes through cgroup.freeze / cgroup.kill
    reason: str = ""  # why a controller is missing


def _unescape(path: str) -> str:
    """Mountinfo escapes spaces and the like as octal (e.g. \\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def detect_layout(mountinfo: str | Path = "/proc/self/mountinfo") -> CgroupLayout | None:
    """Find the memory, cpu and freezer controllers from mountinfo; None when there is none."""
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return None
    v1: dict[str, Path] = {}
    v2: list[Path] = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        point = Path(_unescape(fields[4]))
        if rfields[0] == "cgroup":
            for opt in rfields[2].split(","):
                if opt in ("memory", "cpu", "freezer"):
                    v1.setdefault(opt, point)
        elif rfields[0] == "cgroup2":
            v2.append(point)
    if "memory" in v1:
        missing = [c for c in ("cpu", "freezer") if c not in v1]
        why = f"no v1 {' or '.join(missing)} controller mounted" if missing else ""
        return CgroupLayout("v1", v1["memory"], v1.get("cpu"), v1.get("freezer"), why)
    for point in v2:
        try:
            controllers = (point / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        if "memory" in controllers:
            cpu = point if "cpu" in controllers else None
            return CgroupLayout("v2", point, cpu, None, "" if cpu else "v2 cpu controller absent")
    return None


# -- the limiters -------------------------------------------------------------------------------


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def _stat_value(stat: bytes, key: bytes) -> int:
    """One "key value" line of a memory.stat text, 0 when absent (read without parsing it all)."""
    at = stat.find(b"\n" + key + b" ")
    if at < 0:
        if not stat.startswith(key + b" "):
            return 0
        at = -1
    end = stat.find(b"\n", at + 1)
    try:
        return int(stat[at + 2 + len(key) : end if end >= 0 else None])
    except ValueError:
        return 0


def _read_kv(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
    return out


def _procs_under(cgroup: Path) -> list[int]:
    """Pids in a cgroup and any cgroup nested under it (the environment may create some)."""
    pids: list[int] = []
    for dirpath, _, files in os.walk(cgroup):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError, ValueError):
                pids.extend(int(x) for x in Path(dirpath, "cgroup.procs").read_text().split())
    return pids


def _rmdir_tree(cgroup: Path, deadline: float) -> None:
    """Remove a cgroup and its nested cgroups; retry while exiting tasks still pin it."""
    while True:
        try:
            for dirpath, _, _ in sorted(os.walk(cgroup), key=lambda t: -len(t[0])):
                os.rmdir(dirpath)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class _CgroupLimiter(Limiter):
    """Shared policy of the v1 and v2 limiters; the subclasses know the file names."""

    version = ""

    def __init__(self, env_id: str, memory_mb: int, vcpus: float, layout: CgroupLayout) -> None:
        super().__init__(env_id, memory_mb, vcpus)
        self.layout = layout
        self._dirs: list[Path] = []  # every cgroup directory we created, memory's first
        self._closed = False
        self._anon_peak = 0
        self._other_max = 0
        self._oom_base = 0
        self._fds: dict[str, int] = {}
        self._paths: dict[str, str] = {}
        self._nested = False
        self._tree_peak = 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        # A quota above the host's cores would not limit anything; cap it there.
        self._quota_us = max(1000, int(min(vcpus, float(cores)) * CFS_PERIOD_US))
        name = f"cgroup-{layout.version}"
        self.mechanisms = {"memory": name, "cpu": "cfs-quota" if layout.cpu else "none"}
        if layout.cpu is None:
            self.mechanisms["reason"] = layout.reason
        try:
            self._create()
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._remove_dirs()
            raise IsolationUnavailable(
                f"cgroup-{layout.version}: cannot set up {exc.filename or 'cgroup'}: "
                f"{exc.strerror or exc}"
            ) from exc

    @abc.abstractmethod
    def _create(self) -> None: ...

    # Hot path: an invocation reads a few of these files at its start and end, so their
    # descriptors stay open and are re-read with pread (a cgroup file re-reads from offset 0).
    def _rd(self, path: Path | str) -> bytes:
        key = str(path)
        fd = self._fds.get(key)
        if fd is None:
            fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC)
            self._fds[key] = fd
        try:
            return os.pread(fd, 65536, 0)
        except OSError:
            self._drop_fd(key)
            raise

    def _drop_fd(self, key: str) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _mp(self, name: str) -> str:
        """Path of a file in the memory cgroup, as a cached string (pathlib is slow here)."""
        key = "p:" + name
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = os.path.join(self._mem, name)
        return path

    def _wr(self, name: str, value: bytes) -> None:
        """Write a memory-cgroup control file through a kept-open descriptor."""
        key = "w:" + name
        fd = self._fds.get(key)
        if fd is None:
            fd = os.open(self._mp(name), os.O_WRONLY | os.O_CLOEXEC)
            self._fds[key] = fd
        os.write(fd, value)

    def _rd_int(self, path: Path | str) -> int:
        return int(self._rd(path).split()[0])

    def _rd_kv(self, path: Path | str) -> dict[str, int]:
        out: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for line in self._rd(path).splitlines():
                key, _, value = line.partition(b" ")
                with contextlib.suppress(ValueError):
                    out[key.decode()] = int(value)
        return out

    @abc.abstractmethod
    def _usage_split(self) -> tuple[int, int]:
        """(anon + shmem, everything else the cgroup charges) right now."""

    @abc.abstractmethod
    def _kernel_peak(self) -> int | None:
        """The kernel's high-water mark of usage since reset_peak(), or None when unknown."""

    @abc.abstractmethod
    def _oom_count(self) -> int: ...

    @property
    def _mem(self) -> Path:
        return self._dirs[0]

    def _make_dir(self, root: Path) -> Path:
        """Create root/lambda_runtime/<env_id> (reusing a stale one after emptying it)."""
        parent = root / PARENT_CGROUP
        with _PARENT_LOCK:
            parent.mkdir(exist_ok=True)
            self._prepare_parent(parent)
            path = parent / self.env_id
            if path.exists():  # left over by a crashed run: empty it and reuse it
                _sigkill(_procs_under(path))
            path.mkdir(exist_ok=True)
        self._dirs.append(path)
        return path

    def _prepare_parent(self, parent: Path) -> None:
        """Hook: v2 enables the controllers for the parent's children."""

    def attach(self, pid: int) -> None:
        """Move the process and any children it already has into every controller's cgroup."""
        members = [pid]
        with contextlib.suppress(psutil.Error):
            members += [c.pid for c in psutil.Process(pid).children(recursive=True)]
        for path in self._dirs:
            for member in members:
                try:
                    _write(path / "cgroup.procs", str(member))
                except ProcessLookupError:
                    pass  # it already exited
                except OSError as exc:
                    if exc.errno != errno.ESRCH:
                        raise

    def pids(self) -> list[int]:
        """Every process in the environment's cgroup (zombies are not listed by the kernel)."""
        if self._closed:
            return []
        if self._nested:  # the environment made cgroups of its own: walk them all
            return sorted(set(_procs_under(self._mem)))
        try:
            # Opened afresh each time: v1 caches a pid list per open file of cgroup.procs.
            fd = os.open(self._mp("cgroup.procs"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.read(fd, 1 << 20)
            finally:
                os.close(fd)
            return [int(x) for x in data.split()]
        except (OSError, ValueError):
            return sorted(set(_procs_under(self._mem)))

    def _tree_bytes(self, pids: list[int]) -> int:
        if len(pids) == 1:  # the common case, on the hot path: one runtime process, RSS
            try:
                return int(self._rd(f"/proc/{pids[0]}/statm").split()[1]) * _PAGE
            except (OSError, ValueError, IndexError):
                self._drop_fd(f"/proc/{pids[0]}/statm")
        return tree_bytes(pids)

    def reset_peak(self) -> None:
        """Restart the kernel's high-water mark and the OOM counter baseline."""
        # A cgroup directory's link count is 2 + its subdirectories: nested cgroups show there.
        self._nested = os.stat(self._mp(".")).st_nlink > 2
        self._oom_base = self._oom_count()
        self._reset_kernel_peak()
        # Samples start at zero: the end-of-invocation sample and the kernel's high-water mark
        # (reset just now) cover an invocation too short to be polled.
        self._anon_peak, self._other_max = 0, 0
        self._tree_peak = 0
        reset_high_water(self.pids())

    @abc.abstractmethod
    def _reset_kernel_peak(self) -> None: ...

    def poll(self) -> None:
        """Sample anon+shmem, the non-anonymous part of usage, and the processes' memory."""
        anon, other = self._usage_split()
        self._anon_peak = max(self._anon_peak, anon)
        self._other_max = max(self._other_max, other)
        self._tree_peak = max(self._tree_peak, self._tree_bytes(self.pids()))

    def peak_bytes(self) -> int:
        """max(sampled anon+shmem, kernel peak - largest sampled cache, sampled tree RSS/PSS)."""
        anon, other = self._usage_split()  # the end of the invocation is a sample too
        anon_peak = max(self._anon_peak, anon)
        other_max = max(self._other_max, other)
        pids = self.pids()
        self._tree_peak = max(self._tree_peak, self._tree_bytes(pids))
        if len(pids) == 1:  # the kernel's own peak RSS of the lone runtime process
            self._tree_peak = max(self._tree_peak, high_water_bytes(pids))
        best = max(anon_peak, self._tree_peak)
        kernel = self._kernel_peak()
        if kernel is not None:
            best = max(best, kernel - other_max)
        return best

    def oom_killed(self) -> bool:
        """The cgroup's OOM-kill counter grew since reset_peak()."""
        return self._oom_count() > self._oom_base

    def close(self) -> None:
        """Kill the tree and remove the environment's cgroups (and the parent when empty)."""
        if self._closed:
            return
        self.kill_all()
        self._closed = True
        self._remove_dirs()

    def _remove_dirs(self) -> None:
        for key in list(self._fds):
            self._drop_fd(key)
        deadline = time.monotonic() + KILL_WAIT_S
        for path in self._dirs:
            _rmdir_tree(path, deadline)
            with _PARENT_LOCK, contextlib.suppress(OSError):
                os.rmdir(path.parent)  # fails while other environments use it: fine
        self._dirs.clear()


class CgroupV1Limiter(_CgroupLimiter):
    """cgroup v1: memory.limit_in_bytes (+memsw), cpu.cfs_quota_us, the freezer to kill."""

    version = "v1"

    def _create(self) -> None:
        assert self.layout.memory is not None
        mem = self._make_dir(self.layout.memory)
        _write(mem / "memory.limit_in_bytes", str(self.memory_limit_bytes))
        if (mem / "memory.memsw.limit_in_bytes").exists():
            # memory+swap at the same limit: swapping out cannot dodge the limit.
            _write(mem / "memory.memsw.limit_in_bytes", str(self.memory_limit_bytes))
        with contextlib.suppress(OSError):
            _write(mem / "memory.swappiness", "0")
        self._has_oom_kill = "oom_kill" in _read_kv(mem / "memory.oom_control")
        if self.layout.cpu is not None:
            cpu = self._make_dir(self.layout.cpu)
            _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(self._quota_us))
        self._freezer: Path | None = None
        if self.layout.freezer is not None:
            self._freezer = self._make_dir(self.layout.freezer)
        self.mechanisms["kill"] = "freezer-v1" if self._freezer else "signal-loop"
        self._failcnt_base = 0
        self._seen: set[int] = set()
        self._vanished = False

    def _usage_split(self) -> tuple[int, int]:
        stat = self._rd(self._mp("memory.stat"))
        anon = _stat_value(stat, b"total_rss") + _stat_value(stat, b"total_shmem")
        try:
            usage = self._rd_int(self._mp("memory.usage_in_bytes"))
        except (OSError, ValueError):
            usage = anon
        return anon, max(0, usage - anon)

    def _kernel_peak(self) -> int | None:
        try:
            return self._rd_int(self._mp("memory.max_usage_in_bytes"))
        except (OSError, ValueError):
            return None

    def _reset_kernel_peak(self) -> None:
        with contextlib.suppress(OSError):
            self._wr("memory.max_usage_in_bytes", b"0")  # resets it to current usage
        with contextlib.suppress(OSError, ValueError):
            self._failcnt_base = self._rd_int(self._mp("memory.failcnt"))
        self._seen = set(self.pids())
        self._vanished = False

    def poll(self) -> None:
        """Sample memory; also note processes that vanished (the old-kernel OOM fallback)."""
        super().poll()
        if not self._has_oom_kill:
            now = set(self.pids())
            self._vanished |= bool(self._seen - now)
            self._seen |= now

    def _oom_count(self) -> int:
        try:
            return _stat_value(self._rd(self._mp("memory.oom_control")), b"oom_kill")
        except OSError:
            return 0

    def oom_killed(self) -> bool:
        """oom_control's oom_kill grew; before Linux 4.13: the limit was hit and a process died."""
        if self._has_oom_kill:
            return super().oom_killed()
        try:
            hit = _read_int(self._mem / "memory.failcnt") > self._failcnt_base
        except (OSError, ValueError):
            hit = False
        return hit and self._vanished

    def kill_all(self) -> None:
        """Freeze the cgroup so nothing can fork, SIGKILL every member, thaw, wait until empty."""
        if self._closed:
            return
        deadline = time.monotonic() + KILL_WAIT_S
        frozen = False
        if self._freezer is not None and self.pids():
            try:
                _write(self._freezer / "freezer.state", "FROZEN")
                frozen = True
                while time.monotonic() < deadline - 1.0:
                    state = (self._freezer / "freezer.state").read_text().strip()
                    if state == "FROZEN":
                        break
                    time.sleep(0.002)
                _sigkill(self.pids())
            except OSError:
                pass
            finally:
                if frozen:
                    with contextlib.suppress(OSError):
                        _write(self._freezer / "freezer.state", "THAWED")
        self._kill_loop(deadline)


class CgroupV2Limiter(_CgroupLimiter):
    """cgroup v2: memory.max (swap.max 0), cpu.max, cgroup.kill (or cgroup.freeze) to kill."""

    version = "v2"

    def _prepare_parent(self, parent: Path) -> None:
        wanted = ["memory"] + (["cpu"] if self.layout.cpu is not None else [])
        for level in (parent.parent, parent):
            enabled = (level / "cgroup.subtree_control").read_text().split()
            missing = [c for c in wanted if c not in enabled]
            if missing:
                _write(level / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))

    def _create(self) -> None:
        assert self.layout.memory is not None
        path = self._make_dir(self.layout.memory)
        _write(path / "memory.max", str(self.memory_limit_bytes))
        if (path / "memory.swap.max").exists():
            _write(path / "memory.swap.max", "0")
        if self.layout.cpu is not None:
            _write(path / "cpu.max", f"{self._quota_us} {CFS_PERIOD_US}")
        self._has_kill = (path / "cgroup.kill").exists()
        self.mechanisms["kill"] = "cgroup.kill" if self._has_kill else "cgroup.freeze"
        self._peak_fd: int | None = None

    def _usage_split(self) -> tuple[int, int]:
        stat = self._rd_kv(self._mp("memory.stat"))
        anon = stat.get("anon", 0) + stat.get("shmem", 0)
        try:
            usage = self._rd_int(self._mp("memory.current"))
        except (OSError, ValueError):
            usage = anon
        return anon, max(0, usage - anon)

    def _reset_kernel_peak(self) -> None:
        # Since Linux 6.12 a write to memory.peak resets the peak seen through that open file
        # only, so the descriptor is kept. Older kernels cannot reset it (the file is
        # read-only): the figure would span earlier invocations, so it is not used then.
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None
        with contextlib.suppress(OSError):
            fd = os.open(self._mem / "memory.peak", os.O_RDWR)
            try:
                os.write(fd, b"reset\n")
            except OSError:
                os.close(fd)
                return
            self._peak_fd = fd

    def _kernel_peak(self) -> int | None:
        if self._peak_fd is None:
            return None
        try:
            return int(os.pread(self._peak_fd, 64, 0).split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _oom_count(self) -> int:
        return self._rd_kv(self._mp("memory.events")).get("oom_kill", 0)

    def kill_all(self) -> None:
        """cgroup.kill where the kernel has it (5.14+); else freeze, SIGKILL all, thaw."""
        if self._closed:
            return
        deadline = time.monotonic() + KILL_WAIT_S
        if self._has_kill:
            with contextlib.suppress(OSError):
                _write(self._mem / "cgroup.kill", "1")
        elif self.pids():
            try:
                _write(self._mem / "cgroup.freeze", "1")
                _sigkill(self.pids())
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    _write(self._mem / "cgroup.freeze", "0")
        self._kill_loop(deadline)

    def close(self) -> None:
        """Also release the memory.peak descriptor."""
        super().close()
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None
