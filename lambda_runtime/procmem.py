"""Memory of a process tree read from /proc (RSS, PSS, the kernel's peak), and killing it.

Shared by every limiter backend: the sampling limiter measures only this, the cgroup limiters
use it beside the cgroup's own counters (see ``lambda_runtime.limiter`` for what each counts).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable

import psutil

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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


# A peak this much above the current resident set is an older invocation's, to be reset.
HWM_SLACK_BYTES = 1024 * 1024


def reset_high_water(pids: Iterable[int]) -> None:
    """Restart each process's peak resident set (VmHWM) — Linux 4.0+ `clear_refs` value 5.

    Only where the peak is above the current resident set: the write takes the process's mmap
    lock and costs ~150 us, while a peak equal to the current size needs no reset (the peak of
    the coming invocation is then simply the peak the kernel reports at its end).
    """
    for pid in pids:
        hwm, rss = _status_kb(pid, b"VmHWM:", b"VmRSS:")
        if hwm is not None and rss is not None and hwm * 1024 <= rss * 1024 + HWM_SLACK_BYTES:
            continue
        with contextlib.suppress(OSError):
            fd = os.open(f"/proc/{pid}/clear_refs", os.O_WRONLY)
            try:
                os.write(fd, b"5")
            finally:
                os.close(fd)


def _status_kb(pid: int, *keys: bytes) -> list[int | None]:
    """The "Key: N kB" values of /proc/<pid>/status for each key (None where absent)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
    except OSError:
        return [None] * len(keys)
    values: list[int | None] = []
    for key in keys:
        at = status.find(key)
        if at < 0:
            values.append(None)
            continue
        try:
            values.append(int(status[at + len(key) : status.find(b"\n", at)].split()[0]))
        except (ValueError, IndexError):
            values.append(None)
    return values


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
