"""The Lambda clock through the service: durations as if each invocation had its own Lambda."""

from __future__ import annotations

import os
import statistics
import threading

import pytest

from .conftest import fn

pytestmark = pytest.mark.slow

ITERATIONS = 6_000_000  # ~0.5 s of pure-Python CPU work here


def test_eight_cpu_bound_copies_on_two_cores_see_their_own_lambda(make_service):
    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat"):
        pytest.skip("no per-task schedstat on this host: the Lambda clock falls back to wall time")
    svc = make_service("auto")
    # 1,769 MB buys exactly one vCPU, so the CPU quota never slows a single-threaded copy.
    svc.register(fn(handler="handler.spin", memory_mb=1769, timeout_s=60, reserved_concurrency=8))
    threads = [
        threading.Thread(target=svc.invoke, args=("fn", {"iterations": 1000})) for _ in range(8)
    ]
    for t in threads:  # eight warm environments
        t.start()
    for t in threads:
        t.join()
    alone = []
    for _ in range(3):
        record = svc.invoke("fn", {"iterations": ITERATIONS}).record
        assert record is not None and not record.cold
        alone.append(record.duration_ms)
    baseline = statistics.median(alone)
    results = []
    lock = threading.Lock()

    def run() -> None:
        r = svc.invoke("fn", {"iterations": ITERATIONS})
        with lock:
            results.append((r.record, r.json()["cpu_ms"]))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r.status == "success" for r, _ in results)
    # What a copy would have taken alone on its own core is the CPU time its work took (the
    # handler measures it with process_time): the Lambda clock must give that, within the
    # issue's 15% (it gives it within 5%), while the copy's wall time is far above.
    for record, cpu_ms in results:
        assert abs(record.duration_ms - cpu_ms) <= 0.05 * cpu_ms + 2, (record.duration_ms, cpu_ms)
        assert record.wall_ms >= 2.5 * record.duration_ms  # 8 copies on 2 cores
    # Against runs alone measured at another moment, only loosely: this VM's speed for the same
    # work drifts (a CI run here measured 457 ms alone, then a 365 ms median for the copies).
    durations = [r.duration_ms for r, _ in results]
    assert abs(statistics.median(durations) - baseline) <= 0.35 * baseline, (durations, baseline)
    for record, _ in results:
        assert record.billed_ms <= record.duration_ms + 1
