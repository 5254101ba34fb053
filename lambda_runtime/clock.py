"""The Lambda clock: how much time an invocation would have taken on its own Lambda.

A laptop runs many execution environments on few cores, so wall time overstates what each
function would see on Lambda (and fires false timeouts). The kernel's per-task schedstat
(``/proc/<pid>/task/<tid>/schedstat``: "run_ns wait_ns timeslices") says, for every thread, how
long it ran on a CPU and how long it sat runnable waiting for one. Per sample interval of wall
length Δ, summed over every task of the tree:

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

Known approximations: D counts thread-seconds, so two threads runnable at different moments of
one interval look like one thread runnable throughout (p is a per-interval average); a task that
exits between two samples loses the run time it had after its last sample; a task that appears
later counts from 0, i.e. its whole life, so late-found threads lose nothing.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable

from lambda_runtime import quotas

_READ_SIZE = 128
# How far back late-reported wait may be moved (see InvocationClock._move_back). A wait spell
# lasts a few scheduler slices on a busy host, up to a CFS period (100 ms) when throttled.
LATE_WAIT_HORIZON_S = 0.5


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
        self._debt = 0.0  # Lambda seconds still to take off (see _move_back)
        # (sample time, wall seconds counted as blocked) of recent intervals
        self._blocked: deque[tuple[float, float]] = deque()
        self._started = False

    # -- public API --------------------------------------------------------------------------

    def start(self) -> None:
        """Invocation start: baseline of every task's counters (their descriptors stay open)."""
        now = time.monotonic()
        self._t0 = self._t_last = now
        self._elapsed = 0.0
        self._rate = 1.0
        self._debt = 0.0
        self._blocked.clear()
        self._started = True
        if self.mechanism == "schedstat":
            # Counters read here are the baseline: they contribute nothing themselves.
            self._collect()

    def sample(self) -> float:
        """Integrate since the previous sample; returns Lambda-clock seconds since start()."""
        if not self._started:
            raise RuntimeError("InvocationClock.sample() called before start()")
        now = time.monotonic()
        dt = now - self._t_last
        if self.mechanism != "schedstat":
            self._elapsed = now - self._t0
            self._rate = 1.0
            self._t_last = now
            return self._elapsed
        d_run_ns, d_wait_ns, late_run_ns, late_wait_ns = self._collect(dt)
        # A counter glitch must not make time run wild: a tree cannot run more
        # thread-seconds than the host has cores.
        d_run = min(d_run_ns / 1e9, dt * self._host_cores)
        d_wait = d_wait_ns / 1e9
        moved_run, moved_wait = self._move_back(now, late_run_ns / 1e9, late_wait_ns / 1e9)
        d_run -= moved_run
        d_wait -= moved_wait
        d_lambda = lambda_interval(dt, d_run, d_wait, self._share)
        # The moved thread-seconds replace wall-speed blocked time counted earlier: take that
        # off again, and charge their run part as CPU work of one runnable thread.
        d_lambda += moved_run / min(1.0, self._share) - (moved_run + moved_wait)
        if dt > 0:
            runnable = d_run + d_wait
            blocked = dt - min(dt, runnable) if runnable > 0 else dt
            if blocked > 0:
                self._blocked.append((now, blocked))
        # The clock never runs backwards: a correction larger than this interval is paid off
        # by the following ones.
        d_lambda -= self._debt
        self._debt = max(0.0, -d_lambda)
        d_lambda = max(0.0, d_lambda)
        self._elapsed += d_lambda
        self._rate = d_lambda / dt if dt > 0 else self._rate
        self._t_last = now
        return self._elapsed

    def _move_back(self, now: float, late_run: float, late_wait: float) -> tuple[float, float]:
        """Move late-reported thread-seconds back onto recent blocked time: (run, wait) moved.

        The kernel adds a wait spell to run_delay only when the task gets a CPU again (and a
        running task's run time only at the next tick or switch), so an interval spent waiting
        reads as "nothing runnable" and passes at wall speed; the wait shows up later, as more
        runnable seconds in one task than the interval had (per task, run + wait > dt: the
        "late" part). Without a correction 8 busy copies on 2 cores read ~3x their CPU time.
        The late part is moved back onto blocked time of recent intervals (newest first, at
        most LATE_WAIT_HORIZON_S back), wait first. Because lateness is judged per task, truly
        parallel threads (many runnable seconds, none late) are not affected.
        """
        blocked = self._blocked
        while blocked and blocked[0][0] < now - LATE_WAIT_HORIZON_S:
            blocked.popleft()
        budget = late_run + late_wait
        moved = 0.0
        while budget > moved and blocked:
            t, amount = blocked.pop()
            take = min(amount, budget - moved)
            moved += take
            if amount > take:
                blocked.append((t, amount - take))
        moved_wait = min(moved, late_wait)
        return moved - moved_wait, moved_wait

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

    def _collect(self, dt: float = 0.0) -> tuple[int, int, int, int]:
        """Read every task of the tree: summed run and wait deltas, and their late parts (ns).

        A task's late part is what its run + wait delta exceeds `dt` by, wait first: one task
        cannot be runnable longer than the interval, so the excess happened before it.
        """
        d_run = d_wait = late_run = late_wait = 0
        dt_ns = int(dt * 1e9)
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
                r, w = run - old_run, wait - old_wait
                d_run += r
                d_wait += w
                excess = r + w - dt_ns
                if excess > 0:
                    lw = min(w, excess)
                    late_wait += lw
                    late_run += excess - lw
                tasks[tid] = (fd, run, wait)
                seen.add(tid)
        for tid in [t for t in tasks if t not in seen]:
            os.close(tasks.pop(tid)[0])  # vanished: contributes what it had at its last sample
        return d_run, d_wait, late_run, late_wait

    def _close_fds(self) -> None:
        tasks = getattr(self, "_tasks", {})
        for fd, _, _ in tasks.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        tasks.clear()
