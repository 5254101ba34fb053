"""Cost of InvocationClock.sample() for a one-thread process and a 20-thread one.

Run: PYTHONPATH=. python bench/clock_probe.py
Prints microseconds per sample(), excluding the pids callable.
"""

from __future__ import annotations

import subprocess
import sys
import time

from lambda_runtime.clock import InvocationClock

_CHILD = """
import sys, threading, time
n = int(sys.argv[1])
for _ in range(n - 1):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def probe(threads: int, samples: int = 5000) -> float:
    """Microseconds per sample() for a child process with `threads` threads."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(threads)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()
        pid_list = [child.pid]
        clock = InvocationClock(lambda: pid_list, vcpus=1.0)
        clock.start()
        t0 = time.perf_counter()
        for _ in range(samples):
            clock.sample()
        cost = (time.perf_counter() - t0) / samples * 1e6
        clock.close()
        return cost
    finally:
        child.kill()
        child.wait()


def main() -> int:
    """Print the cost for 1 and 20 threads."""
    for threads in (1, 20):
        print(f"{threads:3d} thread(s): {probe(threads):7.1f} us per sample()")
    return 0


if __name__ == "__main__":
    sys.exit(main())
