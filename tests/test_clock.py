"""The Lambda clock: contention on the host must not show up as Lambda time."""

from __future__ import annotations

import os
import select
import statistics
import subprocess
import sys
import time

import psutil
import pytest

from lambda_runtime.clock import InvocationClock, lambda_interval, schedstat_available

pytestmark = pytest.mark.skipif(
    not schedstat_available()[0], reason=f"no per-task schedstat: {schedstat_available()[1]}"
)

# The child waits for "go", does its work, prints "done", then waits to be told to exit, so the
# clock sees exactly the work and nothing of the interpreter's start-up.
_BUSY = """
import sys
def work(n):
    x = 0
    for i in range(n):
        x += i
print("ready", flush=True)
sys.stdin.readline()
work(int(sys.argv[1]))
print("done", flush=True)
sys.stdin.readline()
"""
_SLEEP = """
import sys, time
print("ready", flush=True)
sys.stdin.readline()
time.sleep(float(sys.argv[1]))
print("done", flush=True)
sys.stdin.readline()
"""


def _work(n: int) -> None:
    """The same loop as in _BUSY."""
    x = 0
    for i in range(n):
        x += i


def _calibrate(cpu_seconds: float) -> int:
    """Loop iterations that take `cpu_seconds` of CPU in this interpreter."""
    n = 2_000_000
    t0 = time.thread_time()
    _work(n)
    return int(n * cpu_seconds / max(time.thread_time() - t0, 1e-3))


@pytest.fixture(scope="module")
def half_second() -> int:
    """Iterations for ~0.5 s of CPU."""
    return _calibrate(0.5)


def _run(
    script: str, arg: str, copies: int = 1, vcpus: float = 1.0, kind: str = "lambda"
) -> list[tuple[float, float]]:
    """Start `copies` children at once, each measured by its own clock: [(lambda_s, wall_s)]."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, arg],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        for _ in range(copies)
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        clocks = [InvocationClock([c.pid].copy, vcpus=vcpus, kind=kind) for c in children]
        starts = []
        for child, clock in zip(children, clocks, strict=True):
            assert child.stdin is not None
            clock.start()
            starts.append(time.monotonic())
            child.stdin.write(b"go\n")
            child.stdin.flush()
        results: dict[int, tuple[float, float]] = {}
        fds = {c.stdout.fileno(): i for i, c in enumerate(children) if c.stdout is not None}
        deadline = time.monotonic() + 60
        while len(results) < copies and time.monotonic() < deadline:
            ready, _, _ = select.select(list(fds), [], [], 0.01)
            for i, clock in enumerate(clocks):
                if i not in results:
                    clock.sample()
            for fd in ready:
                i = fds.pop(fd)
                assert os.read(fd, 16).startswith(b"done")  # "\\n" may come in a 2nd write
                results[i] = (clocks[i].sample(), time.monotonic() - starts[i])
        for clock in clocks:
            clock.close()
        assert len(results) == copies, "children did not finish in 60 s"
        return [results[i] for i in range(copies)]
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_cpu_bound_alone_counts_its_cpu_time(half_second: int) -> None:
    ((lam, wall),) = _run(_BUSY, str(half_second))
    # Alone on an idle host the Lambda clock and the wall clock agree; a loaded host can only
    # make wall longer, never the Lambda clock. (No absolute bound: this VM runs the same loop
    # anywhere from 0.35 s to 0.5 s from one minute to the next.)
    assert lam > 0.1
    assert 0.8 * wall <= lam <= wall * 1.05


@pytest.mark.slow
def test_eight_copies_on_two_cores_see_their_own_lambda(half_second: int) -> None:
    # The same loop's CPU time drifts between runs on a VM (frequency, neighbours): the median
    # of three runs alone is the reference.
    alone = statistics.median(_run(_BUSY, str(half_second))[0][0] for _ in range(3))
    copies = _run(_BUSY, str(half_second), copies=8)
    # Loosely against the runs alone: this VM's speed for the same loop drifts by up to ~35%
    # (and by ~30% from one minute to the next)
    # between moments and while both vCPUs are busy, whatever the clock does.
    # tests/test_lambda_clock.py checks each copy against the CPU time it really used (5%).
    assert abs(statistics.median(lam for lam, _ in copies) - alone) <= 0.5 * alone, copies
    for lam, wall in copies:
        # Far from the ~3x that late-reported waits would give if the clock mishandled them.
        assert abs(lam - alone) <= 0.8 * alone, (lam, alone, copies)
        assert wall >= 2.5 * alone, (wall, alone)


def test_sleep_advances_at_wall_speed() -> None:
    ((lam, wall),) = _run(_SLEEP, "0.5")
    assert 0.48 <= lam <= 0.6
    assert abs(lam - wall) < 0.05


def test_half_a_vcpu_makes_cpu_work_count_double(half_second: int) -> None:
    # Two clocks on the very same run (this VM's speed drifts between runs): one of 1 vCPU and
    # one of 0.5 vCPU. The loop is CPU work, so the half-vCPU clock counts it twice.
    child = subprocess.Popen(
        [sys.executable, "-c", _BUSY, str(half_second)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == b"ready\n"
        one = InvocationClock([child.pid].copy, vcpus=1.0)
        half = InvocationClock([child.pid].copy, vcpus=0.5)
        one.start()
        half.start()
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert child.stdout.read(4) == b"done"
        lam_one, lam_half = one.sample(), half.sample()
        cpu = sum(psutil.Process(child.pid).cpu_times()[:2])
        one.close()
        half.close()
    finally:
        child.kill()
        child.wait()
    assert lam_one > 0.2
    # Blocked time counts once on both clocks, CPU work twice at half a vCPU: the difference is
    # the CPU time the loop used. (Not lam_half == 2 * lam_one: time this VM's hypervisor takes
    # away is neither run nor wait in schedstat and shows up as blocked, ~0.4 s once in CI.)
    assert abs((lam_half - lam_one) - cpu) <= 0.10 * cpu + 0.02, (lam_half, lam_one, cpu)


def test_wall_kind_is_wall_time(half_second: int) -> None:
    ((lam, wall),) = _run(_BUSY, str(half_second), copies=3, kind="wall")[:1]
    assert abs(lam - wall) < 0.02


def test_wall_kind_names_its_mechanism() -> None:
    clock = InvocationClock(lambda: [os.getpid()], vcpus=1.0, kind="wall")
    assert clock.mechanism == "wall"
    assert InvocationClock(lambda: [os.getpid()], vcpus=1.0).mechanism == "schedstat"


def test_an_empty_tree_passes_at_wall_speed() -> None:
    clock = InvocationClock(list, vcpus=1.0)
    clock.start()
    time.sleep(0.1)
    assert 0.09 < clock.sample() < 0.2
    assert clock.rate() == pytest.approx(1.0)
    assert clock.elapsed() == clock.elapsed()


def test_sample_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        InvocationClock(list, vcpus=1.0).sample()


@pytest.mark.parametrize(
    ("dt", "run", "wait", "vcpus", "expected"),
    [
        (1.0, 0.0, 0.0, 1.0, 1.0),  # idle: wall speed
        (1.0, 0.25, 0.75, 1.0, 0.25),  # one thread, 3/4 of the time waiting for a CPU
        (1.0, 0.5, 0.0, 1.0, 1.0),  # half busy, half blocked
        (1.0, 0.5, 0.0, 0.5, 1.5),  # the same with half a vCPU: CPU work counts double
        (1.0, 2.0, 2.0, 6.0, 0.5),  # 4 runnable threads, 2 host cores, 6 vCPUs: 2 s over 4 CPUs
        (1.0, 2.0, 0.0, 1.0, 2.0),  # 2 threads fully busy on 1 vCPU take twice as long
        (0.0, 1.0, 1.0, 1.0, 0.0),  # no wall time passed
    ],
)
def test_model_of_one_interval(
    dt: float, run: float, wait: float, vcpus: float, expected: float
) -> None:
    assert lambda_interval(dt, run, wait, vcpus) == pytest.approx(expected)


def test_schedstat_absence_is_reported_with_a_reason() -> None:
    ok, reason = schedstat_available(pid=2**22 + 1)  # above pid_max: no such process
    assert not ok
    assert "schedstat" in reason


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValueError, match="kind"):
        InvocationClock(list, vcpus=1.0, kind="cpu")
    with pytest.raises(ValueError, match="vcpus"):
        InvocationClock(list, vcpus=0)
