"""Memory and CPU limits of one execution environment, enforced from outside it.

Three backends behind one abstract base (``Limiter``, in ``limiter_base``):
- ``CgroupV1Limiter`` / ``CgroupV2Limiter`` (in ``cgroups``): the kernel enforces the memory limit
  (the OOM killer ends the environment the way Lambda's does) and the CPU share (a CFS quota of
  vcpus x period).
- ``SamplingLimiter`` (in ``sampling``): for hosts without cgroups or root (macOS, non-root
  Linux): the tree's memory is sampled on every ``poll()`` and the whole tree is SIGKILLed when it
  exceeds the limit; no CPU limit. ``mechanisms`` says so, with the reason.
This module picks one (``make_limiter``), says what the host allows (``host_capabilities``) and
re-exports the names above, so ``lambda_runtime.limiter`` stays the one place to import from.
Reading a process tree's memory from /proc is in ``procmem``.

What ``peak_bytes()`` reports (Lambda's "Max Memory Used"). A memory cgroup charges page cache
too: files written to /tmp (a disk on Lambda, not memory) and files read (imported modules).
Lambda's /tmp does not count against memory, so page cache must not inflate the figure. The
report is the largest of four measurements, all taken since ``reset_peak()``:
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

import os
import re
from pathlib import Path

from lambda_runtime.cgroups import CFS_PERIOD_US as CFS_PERIOD_US
from lambda_runtime.cgroups import PARENT_CGROUP as PARENT_CGROUP
from lambda_runtime.cgroups import CgroupLayout as CgroupLayout
from lambda_runtime.cgroups import CgroupV1Limiter as CgroupV1Limiter
from lambda_runtime.cgroups import CgroupV2Limiter as CgroupV2Limiter
from lambda_runtime.cgroups import detect_layout as detect_layout
from lambda_runtime.config import Isolation
from lambda_runtime.errors import ConfigError, IsolationUnavailable
from lambda_runtime.limiter_base import KILL_WAIT_S as KILL_WAIT_S
from lambda_runtime.limiter_base import Limiter as Limiter
from lambda_runtime.procmem import high_water_bytes as high_water_bytes
from lambda_runtime.procmem import reset_high_water as reset_high_water
from lambda_runtime.procmem import tree_bytes as tree_bytes
from lambda_runtime.sampling import SAMPLE_REFRESH_S as SAMPLE_REFRESH_S
from lambda_runtime.sampling import SamplingLimiter as SamplingLimiter

_ENV_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


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
