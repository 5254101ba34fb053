"""Memory and CPU limits of an execution environment, enforced from outside its process tree."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lambda_runtime.errors import ConfigError, IsolationUnavailable
from lambda_runtime.limiter import (
    PARENT_CGROUP,
    CgroupLayout,
    Limiter,
    detect_layout,
    host_capabilities,
    make_limiter,
)

MiB = 1024 * 1024
_CAPS = host_capabilities()
needs_cgroups = pytest.mark.skipif(
    _CAPS["memory"].startswith("none"), reason=f"host has no usable cgroups: {_CAPS['memory']}"
)

# Each child waits for a line on stdin before every step, so the limiter is attached before the
# child does anything, and the test decides when it goes on.
_ALLOC = """
import sys
sys.stdin.readline()
block = b"\\x01" * (int(sys.argv[1]) * 1024 * 1024)  # written, so every page is resident
print("allocated", flush=True)
sys.stdin.readline()
"""
_WRITE_FILE = """
import os, sys
sys.stdin.readline()
with open(sys.argv[1], "wb") as f:
    chunk = os.urandom(1024 * 1024)
    for _ in range(int(sys.argv[2])):
        f.write(chunk)
    f.flush()
    os.fsync(f.fileno())
print("written", flush=True)
sys.stdin.readline()
"""
_SPAWN = """
import os, subprocess, sys, time
sys.stdin.readline()
sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
kids = [subprocess.Popen(sleeper), subprocess.Popen(sleeper, start_new_session=True)]
pids = [k.pid for k in kids]
r, w = os.pipe()
if os.fork() == 0:  # double fork: the grandchild is re-parented to init
    if os.fork() == 0:
        os.write(w, str(os.getpid()).encode())
        time.sleep(120)
    os._exit(0)
pids.append(int(os.read(r, 32)))
print(" ".join(map(str, pids)), flush=True)
sys.stdin.readline()
"""
_BUSY = """
import sys, time
sys.stdin.readline()
t0, c0 = time.monotonic(), time.process_time()
while time.monotonic() - t0 < 1.0:
    pass
print((time.process_time() - c0) / (time.monotonic() - t0), flush=True)
sys.stdin.readline()
"""


class Child:
    """A child process in its own session, stepped through stdin lines."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def step(self) -> str:
        """Let the child go on; return the line it prints (empty when it died)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return ""
        return self.proc.stdout.readline().strip()

    def go_polling(self, limiter: Limiter, timeout: float = 20.0) -> int | None:
        """Let the child go on and poll the limiter until it exits or the timeout passes."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            limiter.poll()
            time.sleep(0.005)
        return self.proc.poll()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _env_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["cgroup", "sampling"])
def kind(request: pytest.FixtureRequest) -> str:
    """Run a test against the cgroup limiter and against the sampling limiter."""
    if request.param == "cgroup" and _CAPS["memory"].startswith("none"):
        pytest.skip(f"host has no usable cgroups: {_CAPS['memory']}")
    return str(request.param)


def _limiter(kind: str, memory_mb: int = 256, vcpus: float = 2.0) -> Limiter:
    limiter = make_limiter(
        _env_id(), memory_mb, vcpus, "strict" if kind == "cgroup" else "portable"
    )
    expected = "rss-sampling" if kind == "sampling" else _CAPS["memory"]
    assert limiter.mechanisms["memory"] == expected
    return limiter


@pytest.fixture
def cleanup() -> Iterator[list[object]]:
    """Children and limiters to tear down whatever a test's assertions did."""
    things: list[object] = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, Child):
            thing.stop()
        elif isinstance(thing, Limiter):
            thing.close()


def test_allocating_past_the_limit_is_killed_as_oom(kind: str, cleanup: list[object]) -> None:
    limiter = _limiter(kind, memory_mb=128)
    child = Child(_ALLOC, "400")
    cleanup += [limiter, child]
    limiter.attach(child.pid)
    limiter.reset_peak()
    assert not limiter.oom_killed()
    rc = child.go_polling(limiter)
    assert rc == -9  # SIGKILL, as Lambda's runtime sees it
    assert limiter.oom_killed()
    limiter.reset_peak()
    assert not limiter.oom_killed()  # a new invocation starts clean


def test_peak_reports_what_the_child_allocated(kind: str, cleanup: list[object]) -> None:
    limiter = _limiter(kind)
    child = Child(_ALLOC, "100")
    cleanup += [limiter, child]
    limiter.attach(child.pid)
    limiter.reset_peak()
    assert child.step() == "allocated"
    limiter.poll()
    # 100 MiB of data plus the interpreter (~10-20 MiB resident); not the 256 MiB limit.
    assert 100 * MiB <= limiter.peak_bytes() <= 140 * MiB, limiter.peak_bytes() / MiB
    assert not limiter.oom_killed()
    assert limiter.pids() == [child.pid]


def test_peak_of_a_short_spike_between_polls_is_seen(cleanup: list[object]) -> None:
    if _CAPS["memory"].startswith("none"):
        pytest.skip(f"host has no usable cgroups: {_CAPS['memory']}")
    limiter = _limiter("cgroup")
    script = _ALLOC.replace('print("allocated", flush=True)', 'del block\nprint("freed", flush=1)')
    child = Child(script, "150")
    cleanup += [limiter, child]
    limiter.attach(child.pid)
    limiter.reset_peak()
    assert child.step() == "freed"  # no poll while the 150 MiB existed
    limiter.poll()
    # The kernel's high-water mark minus the largest cache sampled: a few MiB of slack below.
    assert 145 * MiB <= limiter.peak_bytes() <= 190 * MiB, limiter.peak_bytes() / MiB


def test_file_written_is_not_memory(kind: str, cleanup: list[object], tmp_path: Path) -> None:
    limiter = _limiter(kind)
    target = tmp_path / "big.bin"
    child = Child(_WRITE_FILE, str(target), "200")
    cleanup += [limiter, child]
    limiter.attach(child.pid)
    limiter.reset_peak()
    assert child.proc.stdin is not None
    child.proc.stdin.write("go\n")
    child.proc.stdin.flush()
    while not target.exists() or target.stat().st_size < 200 * MiB:
        limiter.poll()
        time.sleep(0.01)
        assert child.proc.poll() is None, "the writer died"
    assert child.proc.stdout is not None and child.proc.stdout.readline().strip() == "written"
    limiter.poll()
    target.unlink()  # deleting the file drops its page cache: must not expose it either
    limiter.poll()
    assert limiter.peak_bytes() < 60 * MiB, limiter.peak_bytes() / MiB
    assert not limiter.oom_killed()


def test_kill_all_kills_grandchildren(kind: str, cleanup: list[object]) -> None:
    limiter = _limiter(kind)
    child = Child(_SPAWN)
    cleanup += [limiter, child]
    limiter.attach(child.pid)
    limiter.reset_peak()
    grandchildren = [int(p) for p in child.step().split()]
    assert len(grandchildren) == 3
    members = set(limiter.pids())
    assert {child.pid, *grandchildren} <= members
    limiter.kill_all()
    assert limiter.pids() == []
    for pid in grandchildren:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert child.proc.wait(timeout=5) == -9
    assert not limiter.oom_killed()  # we killed it; the memory limit did not


@needs_cgroups
def test_close_removes_the_cgroups_and_is_idempotent(cleanup: list[object]) -> None:
    env_id = _env_id()
    limiter = make_limiter(env_id, 256, 1.0, "strict")
    child = Child(_ALLOC, "1")
    cleanup.append(child)
    limiter.attach(child.pid)
    layout = detect_layout()
    assert layout is not None
    roots = {p for p in (layout.memory, layout.cpu, layout.freezer) if p is not None}
    dirs = [root / PARENT_CGROUP / env_id for root in roots]
    assert all(d.is_dir() for d in dirs)
    limiter.close()
    assert not any(d.exists() for d in dirs)
    assert child.proc.wait(timeout=5) == -9
    limiter.close()
    assert limiter.pids() == []


@needs_cgroups
def test_half_a_vcpu_halves_a_busy_loop(cleanup: list[object]) -> None:
    env_id = _env_id()
    limited = make_limiter(env_id, 1024, 0.5, "strict")
    free = make_limiter(_env_id(), 1024, 4.0, "strict")  # quota capped at the host's cores
    busy, control = Child(_BUSY), Child(_BUSY)
    cleanup += [limited, free, busy, control]
    assert limited.mechanisms["cpu"] == "cfs-quota"
    limited.attach(busy.pid)
    free.attach(control.pid)
    for child in (busy, control):  # both loops run at the same time, under the same load
        assert child.proc.stdin is not None
        child.proc.stdin.write("go\n")
        child.proc.stdin.flush()
    rates = []
    for child in (busy, control):
        assert child.proc.stdout is not None
        rates.append(float(child.proc.stdout.readline()))
    rate, control_rate = rates
    # The quota is 50 ms per 100 ms period: at most 0.5 CPU-seconds per second (+ slack for
    # the period boundaries), whatever else the host runs.
    assert rate <= 0.6, rates
    layout = detect_layout()
    assert layout is not None and layout.cpu is not None
    stat = (layout.cpu / PARENT_CGROUP / env_id / "cpu.stat").read_text()
    throttled = int(stat.split("nr_throttled")[1].split()[0])
    assert throttled >= 1, stat  # the quota cut periods short (fewer when the host is busy)
    if control_rate >= 0.8:  # a host busy with other work starves both: no halving to see
        assert rate >= 0.35, rates


def test_strict_without_cgroups_names_what_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-controller"
    layout = CgroupLayout("v1", memory=missing, cpu=missing)
    with pytest.raises(IsolationUnavailable, match="no-such-controller"):
        make_limiter(_env_id(), 256, 1.0, "strict", layout=layout)
    with pytest.raises(IsolationUnavailable, match="memory"):
        make_limiter(_env_id(), 256, 1.0, "strict", layout=CgroupLayout("v2", memory=None))


def test_auto_without_cgroups_falls_back_and_says_why(tmp_path: Path) -> None:
    layout = CgroupLayout("v1", memory=tmp_path / "no-such-controller")
    limiter = make_limiter(_env_id(), 256, 1.0, "auto", layout=layout)
    assert limiter.mechanisms["memory"] == "rss-sampling"
    assert limiter.mechanisms["cpu"] == "none"
    assert "no-such-controller" in limiter.mechanisms["reason"]
    limiter.close()


def test_portable_always_samples() -> None:
    limiter = make_limiter(_env_id(), 256, 1.0, "portable")
    assert limiter.mechanisms["memory"] == "rss-sampling"
    assert limiter.pids() == []
    limiter.close()


def test_layout_from_mountinfo(tmp_path: Path) -> None:
    combined = tmp_path / "mountinfo-v1"
    combined.write_text(
        "30 23 0:27 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
        "32 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "35 30 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "37 30 0:34 / /sys/fs/cgroup/free\\040zer rw - cgroup cgroup rw,freezer\n"
    )
    layout = detect_layout(combined)
    assert layout == CgroupLayout(
        "v1",
        Path("/sys/fs/cgroup/memory"),
        Path("/sys/fs/cgroup/cpu,cpuacct"),
        Path("/sys/fs/cgroup/free zer"),
    )
    unified = tmp_path / "cg2"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    v2 = tmp_path / "mountinfo-v2"
    v2.write_text(f"29 23 0:26 / {unified} rw - cgroup2 cgroup2 rw,nsdelegate\n")
    assert detect_layout(v2) == CgroupLayout("v2", unified, unified, None)
    none = tmp_path / "mountinfo-none"
    none.write_text("22 1 8:1 / / rw - ext4 /dev/vda rw\n")
    assert detect_layout(none) is None
    caps = host_capabilities(none)
    assert caps["memory"].startswith("none (") and "memory" in caps["memory"]


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ConfigError, match="env_id"):
        make_limiter("../escape", 256, 1.0, "auto")
    with pytest.raises(ConfigError, match="isolation"):
        make_limiter(_env_id(), 256, 1.0, "paranoid")
    with pytest.raises(ConfigError, match="memory_mb"):
        make_limiter(_env_id(), 0, 1.0, "auto")
    with pytest.raises(ConfigError, match="vcpus"):
        make_limiter(_env_id(), 256, 0.0, "auto")


def test_no_cgroup_directories_left_behind() -> None:
    """Runs last in this file: every limiter above was closed."""
    layout = detect_layout()
    if layout is None or layout.memory is None:
        pytest.skip("no cgroups")
    for root in {layout.memory, layout.cpu, layout.freezer} - {None}:
        assert root is not None
        leftovers = [p.name for p in (root / PARENT_CGROUP).glob("test-*")]
        assert leftovers == [], (root, leftovers)
    portable = make_limiter(_env_id(), 256, 1.0, "portable")
    assert os.getpid() not in portable.pids()
    portable.close()
