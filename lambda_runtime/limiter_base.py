"""The contract every limiter backend implements: ``Limiter``, the abstract base."""

from __future__ import annotations

import abc
import time

from lambda_runtime.procmem import _sigkill

KILL_WAIT_S = 5.0


class Limiter(abc.ABC):
    """Memory and CPU limits of one execution environment's process tree."""

    mechanisms: dict[str, str]

    def __init__(self, env_id: str, memory_mb: int, vcpus: float) -> None:
        self.env_id = env_id
        self.memory_limit_bytes = memory_mb * 1024 * 1024
        self.vcpus = vcpus
        self._tree_peak = 0

    @abc.abstractmethod
    def attach(self, pid: int) -> None:
        """Put this process (and all its future children) under the limits."""

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """Every live process of the environment's tree."""

    def pids_cached(self) -> list[int]:
        """pids(), possibly a few hundred ms old: cheap enough to call on every sample."""
        return self.pids()

    @abc.abstractmethod
    def reset_peak(self) -> None:
        """Start of an invocation: peak and OOM state start afresh."""

    @abc.abstractmethod
    def poll(self) -> None:
        """Sample memory for the peak (and, when sampling, kill the tree past the limit)."""

    @abc.abstractmethod
    def peak_bytes(self) -> int:
        """Peak memory of the whole tree since reset_peak() (Max Memory Used)."""

    @abc.abstractmethod
    def oom_killed(self) -> bool:
        """Did the memory limit kill something since reset_peak()?"""

    @abc.abstractmethod
    def kill_all(self) -> None:
        """SIGKILL every process of the tree and wait (bounded) until they are gone."""

    @abc.abstractmethod
    def close(self) -> None:
        """kill_all() and release what the limiter holds (cgroups); idempotent."""

    def __enter__(self) -> Limiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kill_loop(self, deadline: float) -> None:
        """SIGKILL whatever pids() lists until nothing is left or the deadline passes."""
        while time.monotonic() < deadline:
            live = self.pids()
            if not live:
                return
            _sigkill(live)
            time.sleep(0.005)
