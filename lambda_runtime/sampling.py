"""``SamplingLimiter``: the portable limiter, for hosts without cgroups or root.

The tree's memory is sampled on every ``poll()`` and the whole tree is SIGKILLed when it exceeds
the limit; there is no CPU limit. It reports the sampled RSS/PSS of the tree and, for a lone
process, the kernel's peak resident set (measurements 3 and 4 in ``lambda_runtime.limiter``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil

from lambda_runtime.limiter_base import KILL_WAIT_S, Limiter
from lambda_runtime.procmem import (
    _is_live,
    _sigkill,
    high_water_bytes,
    reset_high_water,
    tree_bytes,
)

SAMPLE_REFRESH_S = 0.25


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
