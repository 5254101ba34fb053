"""Invoke latency of the local Lambda against baselines measured in the same run.

Prints, for this machine:
  - the floor: a raw multiprocessing pipe round trip to an echo process;
  - warm sync invoke of a no-op handler (library call), median and its ratio to the floor;
  - new environment + trivial init (cold invoke), median;
  - 64 async invokes of a trivial handler on 64 environments: time until all are done;
  - 8 invocations of ~1 s of CPU each on this machine's cores: total against the ideal.

Run: python bench/invoke_latency.py [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lambda_runtime import FunctionConfig, LambdaService  # noqa: E402

FN_DIR = ROOT / "tests" / "fixtures" / "fn"


def _echo(conn: multiprocessing.connection.Connection) -> None:
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(msg)


def pipe_round_trip(n: int) -> float:
    """Median seconds of a multiprocessing Pipe round trip with a small message."""
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_echo, args=(child,))
    proc.start()
    times = []
    msg = ("invoke", "00000000-0000-0000-0000-000000000000", b"{}")
    for _ in range(n):
        t = time.perf_counter()
        parent.send(msg)
        parent.recv()
        times.append(time.perf_counter() - t)
    parent.send(None)
    proc.join()
    return statistics.median(times)


def warm_invoke(svc: LambdaService, n: int) -> float:
    """Median seconds of a warm sync invoke of a no-op handler."""
    svc.register(
        FunctionConfig(name="noop", handler="handler.noop", code_dir=FN_DIR, memory_mb=1769)
    )
    for _ in range(20):
        svc.invoke("noop", {})
    times = []
    for _ in range(n):
        t = time.perf_counter()
        svc.invoke("noop", {})
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(svc: LambdaService, n: int, blocks: int = 5) -> tuple[float, float]:
    """(pipe round trip, warm invoke) medians over alternating blocks.

    This VM's wake-up latency drifts by several times within minutes; alternating the two
    measurements keeps their ratio honest.
    """
    pipes, warms = [], []
    for _ in range(blocks):
        pipes.append(pipe_round_trip(n // blocks))
        warms.append(warm_invoke(svc, n // blocks))
    return statistics.median(pipes), statistics.median(warms)


def cold_invoke(svc: LambdaService, n: int) -> tuple[float, float]:
    svc.register(
        FunctionConfig(name="cold", handler="handler.noop", code_dir=FN_DIR, memory_mb=1769)
    )
    svc.invoke("cold", {})  # first-time setup (e.g. the pristine /tmp image) is not per environment
    svc.pool.reap(0)
    times, inits = [], []
    for _ in range(n):
        t = time.perf_counter()
        r = svc.invoke("cold", {})
        times.append(time.perf_counter() - t)
        assert r.record is not None and r.record.cold
        inits.append(r.record.init_ms or 0.0)
        svc.pool.reap(0)
    return statistics.median(times), statistics.median(inits)


def async_fanout(svc: LambdaService, n: int) -> float:
    svc.register(FunctionConfig(name="fan", handler="handler.noop", code_dir=FN_DIR, memory_mb=128))
    svc.invoke("fan", {})
    svc.pool.reap(0)
    t = time.perf_counter()
    for i in range(n):
        svc.invoke("fan", {"i": i}, invocation_type="Event")
    assert svc.wait_idle(120)
    elapsed = time.perf_counter() - t
    records = svc.ledger.records("fan")
    envs = {r.environment_id for r in records[1:]}
    print(f"  ({len(records) - 1} invocations on {len(envs)} environments)")
    return elapsed


def _spin(iterations: int) -> None:
    x = 0
    for i in range(iterations):
        x += i * i


def plain_processes(copies: int, iterations: int) -> float:
    """Wall seconds for `copies` plain processes doing the same work at once (no Lambda)."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_spin, args=(iterations,)) for _ in range(copies)]
    t = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return time.perf_counter() - t


def cpu_batch(svc: LambdaService, copies: int, iterations: int) -> tuple[float, float]:
    """(wall s of one warm invocation alone, wall s of `copies` at once on warm environments)."""
    svc.register(
        FunctionConfig(
            name="spin", handler="handler.spin", code_dir=FN_DIR, memory_mb=1769, timeout_s=120
        )
    )

    def together(n: int, work: int) -> float:
        threads = [
            threading.Thread(target=svc.invoke, args=("spin", {"iterations": work}))
            for _ in range(n)
        ]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return time.perf_counter() - t

    together(copies, 1000)  # `copies` warm environments: cold starts are measured elsewhere
    alone = statistics.median(together(1, iterations) for _ in range(3))
    return alone, together(copies, iterations)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 200 if args.quick else 2000
    cores = os.cpu_count() or 1
    print(f"machine: {cores} cores, Python {sys.version.split()[0]}, {sys.platform}")
    with (
        tempfile.TemporaryDirectory(dir=ROOT) as d,
        LambdaService(run_dir=d, time_scale=0.001) as svc,
    ):
        floor, warm = interleaved(svc, n)
        print(f"raw multiprocessing pipe round trip: median {floor * 1e6:.0f} us")
        print(
            f"warm sync invoke (no-op): median {warm * 1e6:.0f} us = {warm / floor:.1f}x the pipe "
            f"round trip [target <= 1000 us and <= 5x]"
        )
        cold, init = cold_invoke(svc, 20 if args.quick else 50)
        print(
            f"new environment + trivial init: median {cold * 1e3:.1f} ms (Init Duration median "
            f"{init:.1f} ms) [target <= 60 ms]"
        )
        fan = async_fanout(svc, 64)
        print(f"64 async invokes on 64 environments: all done in {fan:.2f} s [target <= 3 s]")
        iterations = 3_000_000 if args.quick else 12_000_000  # ~1 s of CPU each when not quick
        alone, total = cpu_batch(svc, 8, iterations)
        plain = plain_processes(8, iterations)
        ideal = alone * 8 / cores
        print(
            f"8 CPU-bound invocations ({alone:.2f} s alone): {total:.2f} s total = "
            f"{total / ideal:.2f}x the ideal {ideal:.2f} s [target <= 1.1x]; 8 plain processes "
            f"doing the same work take {plain:.2f} s here ({total / plain:.2f}x)"
        )
        print(f"active mechanisms: {svc.mechanisms('noop')}")


if __name__ == "__main__":
    main()
