"""Memory and CPU limits of one execution environment, enforced from outside it.

Three backends behind one abstract base:
- ``CgroupV1Limiter`` / ``CgroupV2Limiter``: the kernel enforces the memory limit (the OOM killer
  ends the environment the way Lambda's does) and the CPU share (a CFS quota of vcpus x period).
- ``SamplingLimiter``: for hosts without cgroups or root (macOS, non-root Linux): the tree's
  memory is sampled on every ``poll()`` and the whole tree is SIGKILLed when it exceeds the
  limit; no CPU limit. ``mechanisms`` says so, with the reason.

What ``peak_bytes()`` reports (Lambda's "Max Memory Used"). A memory cgroup charges page cache
too: files written to /tmp (a disk on Lambda, not memory) and files read (imported modules).
Lambda's /tmp does not count against memory, so page cache must not inflate the figure. The
report is the largest of three measurements, all taken since ``reset_peak()``:
1. the largest sampled anonymous + shmem memory of the cgroup (v1 memory.stat total_rss +
   total_shmem; v2 memory.stat anon + shmem), read at every ``poll()``;
2. the kernel's own high-water mark (v1 memory.max_usage_in_bytes, v2 memory.peak) minus the
   largest sampled non-anonymous part of the usage (usage - anon - shmem: page cache, and kernel
   memory, which v1 also charges to usage). This catches a short allocation spike that happened
   between two polls; subtracting the *largest* sampled cache rather than the cache at the end
   keeps a 200 MB file that was written and then deleted from showing up as memory (the price:
   a spike that coincides with a smaller cache than seen elsewhere is under-reported by the
   difference, never over-reported);
3. the sampled memory of the processes themselves: the resident set (RSS, including mapped
   code) of a one-process tree, the sum of proportional set sizes (PSS) of a multi-process tree
   (so pages a forked child shares copy-on-write with its parent count once). This is what makes
   a freshly forked or exec'd environment truthful: its interpreter's pages were charged to the
   parent's cgroup before ``attach()``, so the cgroup alone would say ~2 MB where Lambda reports
   ~30-40 MB for a Python handler.
4. the kernel's peak resident set of the runtime process (VmHWM in /proc/<pid>/status, reset
   through /proc/<pid>/clear_refs at the start of each invocation) when the tree is that one
   process: the kernel tracks it on every page fault, so a spike that came and went between two
   samples still counts. (Summed over a tree it would double-count shared pages, so it is used
   only for a lone process.)
The sampling limiter reports measurements 3 and 4.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import re
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from lambda_runtime.config import Isolation
from lambda_runtime.errors import ConfigError, IsolationUnavailable

PARENT_CGROUP = "lambda_runtime"
CFS_PERIOD_US = 100_000
KILL_WAIT_S = 5.0
SAMPLE_REFRESH_S = 0.25

_ENV_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
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


def _no_cgroup_reason(layout: CgroupLayout | None) -> str | None:
    if not hasattr(os, "geteuid"):
        return "not a POSIX host"
    if layout is None or layout.memory is None:
        return "no memory cgroup controller mounted (see /proc/self/mountinfo)"
    if not layout.memory.is_dir():
        return f"memory controller root {layout.memory} does not exist"
    if os.geteuid() != 0:
        return f"not root (euid {os.geteuid()}): cannot create cgroups under {layout.memory}"
    if not os.access(layout.memory, os.W_OK):
        return f"{layout.memory} is not writable (read-only cgroup file system?)"
    return None


def host_capabilities(mountinfo: str | Path = "/proc/self/mountinfo") -> dict[str, str]:
    """What this host allows, for reports: {"memory": "cgroup-v1", "cpu": ..., "kill": ...}."""
    layout = detect_layout(mountinfo)
    why = _no_cgroup_reason(layout)
    if why is not None or layout is None or layout.memory is None:
        none = f"none ({why})"
        return {"memory": none, "cpu": none, "kill": "signal-loop"}
    name = f"cgroup-{layout.version}"
    if layout.version == "v2":
        kill = "cgroup.kill" if (layout.memory / "cgroup.kill").exists() else "cgroup.freeze"
    else:
        kill = "freezer-v1" if layout.freezer else "signal-loop"
    cpu = name if layout.cpu is not None else f"none ({layout.reason})"
    return {"memory": name, "cpu": cpu, "kill": kill}


# -- reading process memory ---------------------------------------------------------------------


def _process_bytes(pid: int, proportional: bool) -> int:
    """RSS (or PSS when `proportional`) of one process; 0 when it is gone."""
    if proportional:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass  # no smaps_rollup (old kernel) or gone: fall back to RSS
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except FileNotFoundError:
        pass
    except (OSError, ValueError, IndexError):
        return 0
    try:  # no /proc (macOS)
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.Error, OSError):
        return 0


def reset_high_water(pids: Iterable[int]) -> None:
    """Restart each process's peak resident set (VmHWM) — Linux 4.0+ `clear_refs` value 5."""
    for pid in pids:
        with contextlib.suppress(OSError):
            fd = os.open(f"/proc/{pid}/clear_refs", os.O_WRONLY)
            try:
                os.write(fd, b"5")
            finally:
                os.close(fd)


def high_water_bytes(pids: Iterable[int]) -> int:
    """Sum of the processes' peak resident sets since reset_high_water (0 without /proc).

    The kernel keeps this peak itself, so an allocation spike between two samples still counts;
    for a tree it over-counts pages the processes share, which is why it is exact for the
    common one-process environment and an upper bound otherwise.
    """
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        at = status.find(b"VmHWM:")
        if at >= 0:
            with contextlib.suppress(ValueError, IndexError):
                total += int(status[at + 6 : status.find(b"\n", at)].split()[0]) * 1024
    return total


def tree_bytes(pids: list[int]) -> int:
    """Memory of a process tree: RSS of a lone process, the sum of PSS of several."""
    return sum(_process_bytes(pid, len(pids) > 1) for pid in pids)


def _is_live(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except (psutil.Error, OSError):
        return False


def _sigkill(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# -- the contract -------------------------------------------------------------------------------


class Limiter(abc.ABC):
    """Memory and CPU limits of one execution environment's process tree."""

    mechanisms: dict[str, str]

    def __init__(self, env_id: str, memory_mb: int, vcpus: float) -> None:
        self.env_id = env_id
        self.memory_limit_bytes = memory_mb * 1024 * 1024
        self.vcpus = vcpus
        self._tree_peak = 0

    @abc.abstractmethod
    def attach(self, pid: int) -> None:
        """Put this process (and all its future children) under the limits."""

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """Every live process of the environment's tree."""

    def pids_cached(self) -> list[int]:
        """pids(), possibly a few hundred ms old: cheap enough to call on every sample."""
        return self.pids()

    @abc.abstractmethod
    def reset_peak(self) -> None:
        """Start of an invocation: peak and OOM state start afresh."""

    @abc.abstractmethod
    def poll(self) -> None:
        """Sample memory for the peak (and, when sampling, kill the tree past the limit)."""

    @abc.abstractmethod
    def peak_bytes(self) -> int:
        """Peak memory of the whole tree since reset_peak() (Max Memory Used)."""

    @abc.abstractmethod
    def oom_killed(self) -> bool:
        """Did the memory limit kill something since reset_peak()?"""

    @abc.abstractmethod
    def kill_all(self) -> None:
        """SIGKILL every process of the tree and wait (bounded) until they are gone."""

    @abc.abstractmethod
    def close(self) -> None:
        """kill_all() and release what the limiter holds (cgroups); idempotent."""

    def __enter__(self) -> Limiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kill_loop(self, deadline: float) -> None:
        """SIGKILL whatever pids() lists until nothing is left or the deadline passes."""
        while time.monotonic() < deadline:
            live = self.pids()
            if not live:
                return
            _sigkill(live)
            time.sleep(0.005)


class SamplingLimiter(Limiter):
    """Portable limiter: sampled memory of the tree, SIGKILL past the limit, no CPU limit."""

    def __init__(self, env_id: str, memory_mb: int, vcpus: float, reason: str = "") -> None:
        super().__init__(env_id, memory_mb, vcpus)
        self.mechanisms = {"memory": "rss-sampling", "cpu": "none", "kill": "signal-loop"}
        if reason:
            self.mechanisms["reason"] = reason
        self._root: int | None = None
        self._sid: int | None = None
        # Every process ever seen in the tree, identity-checked by psutil (create time), so
        # one that left it (e.g. setsid after its parent died) is still the environment's.
        self._known: dict[int, psutil.Process] = {}
        self._oom = False
        self._pids_cache: list[int] | None = None
        self._pids_at = 0.0

    def attach(self, pid: int) -> None:
        """Track this process; its children are found at every poll."""
        self._root = pid
        with contextlib.suppress(OSError):
            # The environment's process is started in its own session; count the session's
            # processes too, so a child that was re-parented to init is still found.
            sid = os.getsid(pid)
            self._sid = sid if sid == pid else None
        self._known = {}
        self._pids_cache = None
        with contextlib.suppress(psutil.Error):
            self._known[pid] = psutil.Process(pid)

    def pids(self) -> list[int]:
        """The root, its descendants, its session's processes, and any member seen before."""
        if self._root is None:
            return []
        self._pids_cache, self._pids_at = self._walk(), time.monotonic()
        return self._pids_cache

    def pids_cached(self) -> list[int]:
        """pids(), reusing a list younger than SAMPLE_REFRESH_S (for the sampling hot path)."""
        if self._root is None:
            return []
        # Walking the process table costs milliseconds; a warm invocation samples a few times.
        now = time.monotonic()
        if self._pids_cache is not None and now - self._pids_at < SAMPLE_REFRESH_S:
            return self._pids_cache
        self._pids_cache, self._pids_at = self._walk(), now
        return self._pids_cache

    def _walk(self) -> list[int]:
        assert self._root is not None
        found: dict[int, psutil.Process] = {}
        try:
            root = self._known.get(self._root) or psutil.Process(self._root)
            found[root.pid] = root
            found.update((c.pid, c) for c in root.children(recursive=True))
        except (psutil.Error, OSError):
            pass
        if self._sid is not None:
            for pid in psutil.pids():
                with contextlib.suppress(OSError, psutil.Error):
                    if pid not in found and os.getsid(pid) == self._sid:
                        found[pid] = psutil.Process(pid)
        for pid, proc in self._known.items():
            if pid not in found and proc.is_running():  # is_running() guards pid reuse
                found[pid] = proc
        self._known = {pid: proc for pid, proc in found.items() if _is_live(pid)}
        return sorted(self._known)

    def reset_peak(self) -> None:
        """Start of an invocation."""
        self._oom = False
        pids = self.pids_cached()
        reset_high_water(pids)
        self._tree_peak = tree_bytes(pids)

    def poll(self) -> None:
        """Sample the tree's memory; SIGKILL the whole tree when it exceeds the limit."""
        used = tree_bytes(self.pids_cached())
        self._tree_peak = max(self._tree_peak, used)
        if used > self.memory_limit_bytes:
            self._oom = True
            self.kill_all()

    def peak_bytes(self) -> int:
        """Largest sampled memory of the tree since reset_peak(), the end included."""
        if self._root is not None:
            pids = self._pids_cache or self.pids_cached()
            self._tree_peak = max(self._tree_peak, tree_bytes(pids), self._hwm(pids))
        return self._tree_peak

    def _hwm(self, pids: list[int]) -> int:
        # Only for a lone process: summed over a tree the peaks double-count shared pages.
        return high_water_bytes(pids) if len(pids) == 1 else 0

    def oom_killed(self) -> bool:
        """True when a poll found the tree past the limit and killed it."""
        return self._oom

    def kill_all(self) -> None:
        """SIGSTOP the tree until it stops growing, then SIGKILL it until none is left.

        Stopping first keeps the tree intact while it is collected: killing a parent first
        would re-parent its children to init, out of reach of the descendant walk.
        """
        deadline = time.monotonic() + KILL_WAIT_S
        stopped: set[int] = set()
        for _ in range(10):
            self._pids_cache = None
            new = [p for p in self.pids() if p not in stopped]
            if not new:
                break
            for pid in new:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGSTOP)
            stopped.update(new)
        _sigkill(stopped)
        self._kill_loop(deadline)

    def close(self) -> None:
        """Kill the tree; nothing else to release."""
        self.kill_all()
        self._root = None


# -- cgroups ------------------------------------------------------------------------------------


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


# -- choosing one -------------------------------------------------------------------------------


def make_limiter(
    env_id: str,
    memory_mb: int,
    vcpus: float,
    isolation: Isolation | str,
    *,
    layout: CgroupLayout | None = None,
) -> Limiter:
    """The best limiter the host allows: cgroups, else (isolation 'auto') sampling.

    `layout` overrides where the controllers are looked for (default: /proc/self/mountinfo).
    With isolation 'strict', a missing memory or cpu controller raises IsolationUnavailable;
    'portable' always samples.
    """
    if not isinstance(env_id, str) or not _ENV_ID.fullmatch(env_id):
        raise ConfigError(
            "env_id", f"must be 1-128 letters, digits, '_', '.', '-' (not leading), got {env_id!r}"
        )
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb <= 0:
        raise ConfigError("memory_mb", f"must be a positive whole number of MB, got {memory_mb!r}")
    if not isinstance(vcpus, (int, float)) or not vcpus > 0:
        raise ConfigError("vcpus", f"must be a number > 0, got {vcpus!r}")
    if isolation not in ("auto", "strict", "portable"):
        raise ConfigError("isolation", f"must be 'auto', 'strict' or 'portable', got {isolation!r}")
    if isolation == "portable":
        return SamplingLimiter(env_id, memory_mb, vcpus, reason="isolation=portable")
    if layout is None:
        layout = detect_layout()
    why = _no_cgroup_reason(layout)
    if why is None and isolation == "strict" and layout is not None and layout.cpu is None:
        why = f"no cpu cgroup controller ({layout.reason})"
    if why is not None or layout is None:
        if isolation == "strict":
            raise IsolationUnavailable(f"isolation=strict needs cgroups: {why}")
        return SamplingLimiter(env_id, memory_mb, vcpus, reason=f"no cgroups: {why}")
    cls = CgroupV1Limiter if layout.version == "v1" else CgroupV2Limiter
    try:
        return cls(env_id, memory_mb, vcpus, layout)
    except IsolationUnavailable as exc:
        if isolation == "strict":
            raise
        return SamplingLimiter(env_id, memory_mb, vcpus, reason=f"no cgroups: {exc}")
