"""The Lambda clock: how much time an invocation would have taken on its own Lambda.

A laptop runs many execution environments on few cores, so wall time overstates what each
function would see on Lambda (and fires false timeouts). The kernel's per-task schedstat
(``/proc/<pid>/task/<tid>/schedstat``: "run_ns wait_ns timeslices") says, for every thread, how
long it ran on a CPU and how long it sat runnable waiting for one. Over the invocation so far
(wall length Δ since it started), summed over every task of the tree:

    Δrun = Σ run deltas, Δwait = Σ wait (run_delay) deltas, D = Δrun + Δwait
    W_r  = min(Δ, D)        wall time the tree had something runnable
    p    = D / W_r          runnable parallelism
    s    = vcpus            CPU share bought by the memory size (memory / 1769 MB, at most 6)
    Δλ   = (Δ - W_r) + Δrun / min(p, s)          (Δλ = Δ when D == 0)

Blocked time (sleep, I/O, waiting on the network) passes at wall speed; CPU work takes as long
as it would with min(p, s) CPUs of its own. Time spent waiting for a CPU that other environments
held disappears, and CPU time is scaled to the vCPU share of the memory size.

CFS-quota throttling. Measured on this project's dev host (Linux 6.18, cgroup v1,
cpu.cfs_quota_us=50000 / cfs_period_us=100000, a one-thread busy loop, 2.0 s of wall time):
schedstat run 1.006 s, wait 0.998 s; cpu.stat throttled_time 0.989 s over 20/20 throttled
periods. Throttled time therefore shows up in schedstat's wait (run_delay), so the formula needs
no cgroup input: with s = 0.5 that interval gives D = 2.0, W_r = 2.0, p = 1 and
Δλ = 1.006 / 0.5 = 2.01 s, i.e. the quota's slowdown is counted once (as the vCPU scaling), not
twice. (Had throttled time been invisible to schedstat it would have shown up as blocked time,
Δλ = 1.0 + 2.0 = 3.0 s, and cpu.stat throttled_time would have to be subtracted.)

Why totals since the start and not per sample interval: the kernel adds a wait spell to a task's
run_delay only when the task gets a CPU again, so an interval spent waiting reads as blocked and
the wait shows up in a later interval, where it exceeds that interval's length and would be cut
off by W_r = min(Δ, D). Over the whole invocation a one-thread tree's run + wait never exceeds its
wall time, so the model is exact for it; a wait spell still in progress at a sample is counted
as blocked until it ends (the clock may then step back by that much, which is why `rate()` is
never negative and the service compares deadlines against the latest sample).

Known approximations: D counts thread-seconds, so parallelism p is an average over the
invocation (phases of one and of eight runnable threads average out); a task that exits between
two samples loses the run time it had after its last sample; a task that appears later counts
from 0, i.e. its whole life, so late-found threads lose nothing.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

from lambda_runtime import quotas

_READ_SIZE = 128


def schedstat_available(pid: int | None = None) -> tuple[bool, str]:
    """Can this host's per-task schedstat be read? Returns (ok, reason when not)."""
    pid = os.getpid() if pid is None else pid
    path = f"/proc/{pid}/task/{pid}/schedstat"
    try:
        with open(path, "rb") as f:
            fields = f.read().split()
    except OSError as exc:
        return False, f"{path} not readable ({exc.strerror or exc})"
    if len(fields) < 2 or not all(x.isdigit() for x in fields[:2]):
        return False, f"{path} has an unexpected format"
    return True, ""


def lambda_interval(dt: float, d_run: float, d_wait: float, vcpus: float) -> float:
    """Lambda seconds of one interval of `dt` wall seconds (the model in the module doc)."""
    if dt <= 0:
        return 0.0
    d = d_run + d_wait
    if d <= 0:
        return dt
    w_r = min(dt, d)
    p = d / w_r
    return (dt - w_r) + d_run / min(p, vcpus)


class InvocationClock:
    """Lambda-clock seconds of one invocation of one execution environment (see module doc).

    Cost of ``sample()`` on the dev host (2 cores, Linux 6.18, Python 3.11, measured with
    bench/clock_probe.py, excluding the ``pids`` callable): about 8 µs for a one-process,
    one-thread tree and about 55 µs for one process with 20 threads. Open file descriptors to
    every task's schedstat are kept and re-read with pread (≈1 µs each instead of ≈9 µs for
    open+read+close); only the process's task directory is listed each sample, to find new threads.
    """

    mechanism: str
    reason: str

    def __init__(
        self,
        pids: Callable[[], list[int]],
        vcpus: float,
        kind: str = "lambda",
        host_cores: int | None = None,
    ) -> None:
        if kind not in ("lambda", "wall"):
            raise ValueError(f"kind: must be 'lambda' or 'wall', got {kind!r}")
        if not vcpus > 0:
            raise ValueError(f"vcpus: must be > 0, got {vcpus!r}")
        self._pids = pids
        self._share = min(float(vcpus), float(quotas.MAX_VCPUS))
        self._host_cores = host_cores or len(os.sched_getaffinity(0)) or os.cpu_count() or 1
        self.reason = ""
        if kind == "wall":
            self.mechanism = "wall"
        else:
            ok, why = schedstat_available()
            self.mechanism = "schedstat" if ok else "wall-fallback"
            self.reason = why
        # tid -> (fd of its schedstat, run_ns, wait_ns) at the last sample
        self._tasks: dict[int, tuple[int, int, int]] = {}
        self._t0 = 0.0
        self._t_last = 0.0
        self._elapsed = 0.0
        self._rate = 1.0
        self._run_ns = 0  # summed over the tree's tasks since start()
        self._wait_ns = 0
        self._started = False

    # -- public API --------------------------------------------------------------------------

    def start(self) -> None:
        """Invocation start: baseline of every task's counters (their descriptors stay open)."""
        now = time.monotonic()
        self._t0 = self._t_last = now
        self._elapsed = 0.0
        self._rate = 1.0
        self._run_ns = self._wait_ns = 0
        self._started = True
        if self.mechanism == "schedstat":
            # Counters read here are the baseline: they contribute nothing themselves.
            self._collect()

    def sample(self) -> float:
        """Read the counters; returns Lambda-clock seconds since start()."""
        if not self._started:
            raise RuntimeError("InvocationClock.sample() called before start()")
        now = time.monotonic()
        dt = now - self._t_last
        if self.mechanism != "schedstat":
            self._elapsed = now - self._t0
            self._rate = 1.0
            self._t_last = now
            return self._elapsed
        d_run_ns, d_wait_ns = self._collect()
        self._run_ns += d_run_ns
        self._wait_ns += d_wait_ns
        wall = now - self._t0
        # A counter glitch must not make time run wild: a tree cannot run more thread-seconds
        # than the host has cores.
        run = min(self._run_ns / 1e9, wall * self._host_cores)
        elapsed = lambda_interval(wall, run, self._wait_ns / 1e9, self._share)
        if dt > 0:
            self._rate = max(0.0, (elapsed - self._elapsed) / dt)
        self._elapsed = elapsed
        self._t_last = now
        return self._elapsed

    def elapsed(self) -> float:
        """Last sampled Lambda-clock value, without sampling."""
        return self._elapsed

    def rate(self) -> float:
        """Lambda seconds per wall second over the last interval, to extrapolate between samples."""
        return self._rate

    def close(self) -> None:
        """Release the file descriptors kept open between samples."""
        self._close_fds()

    def __del__(self) -> None:
        self._close_fds()

    # -- internals ---------------------------------------------------------------------------

    def _collect(self) -> tuple[int, int]:
        """Read every task of the tree: run and wait (ns) added since the previous read."""
        d_run = d_wait = 0
        seen: set[int] = set()
        tasks = self._tasks
        try:
            pids = self._pids()
        except (OSError, ProcessLookupError):
            pids = []
        for pid in pids:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue  # the process is gone
            for name in tids:
                tid = int(name)
                if tid in seen:
                    continue
                entry = tasks.get(tid)
                if entry is None:
                    try:
                        fd = os.open(f"/proc/{pid}/task/{tid}/schedstat", os.O_RDONLY)
                    except OSError:
                        continue
                    old_run = old_wait = 0  # a task that appears later counts from 0
                else:
                    fd, old_run, old_wait = entry
                try:
                    fields = os.pread(fd, _READ_SIZE, 0).split()
                    run, wait = int(fields[0]), int(fields[1])
                except (OSError, IndexError, ValueError):
                    # The task died after the listing (ESRCH): it keeps what it had at its last
                    # sample.
                    os.close(fd)
                    tasks.pop(tid, None)
                    continue
                if run < old_run or wait < old_wait:
                    old_run = old_wait = 0  # cannot go backwards: a different task
                d_run += run - old_run
                d_wait += wait - old_wait
                tasks[tid] = (fd, run, wait)
                seen.add(tid)
        for tid in [t for t in tasks if t not in seen]:
            os.close(tasks.pop(tid)[0])  # vanished: contributes what it had at its last sample
        return d_run, d_wait

    def _close_fds(self) -> None:
        tasks = getattr(self, "_tasks", {})
        for fd, _, _ in tasks.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        tasks.clear()
