"""The process backend: each execution environment is a runtime process forked from a fork
server, enclosed in cgroups and a private mount namespace where the host allows, or in sampled
limits where it does not (see `limiter` and `sandbox`)."""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lambda_runtime.bootstrap import BootSpec, Channel
from lambda_runtime.clock import InvocationClock
from lambda_runtime.config import FunctionConfig, ServiceSettings
from lambda_runtime.context import CLOCK_PAGE
from lambda_runtime.environment import ExecutionEnvironment, RuntimeGone
from lambda_runtime.limiter import Limiter, make_limiter
from lambda_runtime.sandbox import TmpStore
from lambda_runtime.zygote import ForkedProcess, Zygote


class ClockWriter:
    """Publishes the Lambda clock to the environment (for get_remaining_time_in_millis)."""

    def __init__(self, path: Path) -> None:
        with open(path, "wb") as f:
            f.write(b"\0" * mmap.PAGESIZE)
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, mmap.PAGESIZE)
        finally:
            os.close(fd)
        self._seq = 0

    def publish(self, elapsed_s: float, rate: float) -> None:
        self._seq += 1  # odd: update in progress
        CLOCK_PAGE.pack_into(self._map, 0, self._seq, elapsed_s, time.time(), rate)
        self._seq += 1
        CLOCK_PAGE.pack_into(self._map, 0, self._seq, elapsed_s, time.time(), rate)

    def close(self) -> None:
        self._map.close()


_ZYGOTE: Zygote | None = None
_ZYGOTE_LOCK = threading.Lock()


def _child_pythonpath() -> str:
    """The parent's import path, so the runtime finds this package even from a source tree."""
    return os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))


def _zygote() -> Zygote:
    """The process-wide fork server, started on first use and again if it died."""
    global _ZYGOTE
    with _ZYGOTE_LOCK:
        if _ZYGOTE is None or not _ZYGOTE.alive:
            _ZYGOTE = Zygote(_child_pythonpath())
            atexit.register(_ZYGOTE.close)
        return _ZYGOTE


class ProcessEnvironment(ExecutionEnvironment):
    """A runtime process of its own (new session), limited from outside."""

    backend_name = "process"

    def __init__(
        self, fn: FunctionConfig, settings: ServiceSettings, env_id: str, endpoint: str | None
    ) -> None:
        super().__init__(fn, settings, env_id, endpoint)
        self._proc: ForkedProcess | None = None
        self._conn: Channel | None = None
        try:
            self.limiter: Limiter = make_limiter(env_id, fn.memory_mb, fn.vcpus, settings.isolation)
            self.tmp = TmpStore(
                self.env_dir,
                env_id,
                fn.ephemeral_mb,
                {k: Path(v) for k, v in fn.efs.items()},
                settings.isolation,
                settings.run_dir / "cache",
            )
        except BaseException:
            self.log.close()
            raise
        self.clock = InvocationClock(self.limiter.pids_cached, fn.vcpus, settings.clock)
        self._clock_page = ClockWriter(self.env_dir / "clock.page")
        self.mechanisms = {
            **self.limiter.mechanisms,
            **self.tmp.mechanisms,
            "timeout": "sigkill-tree",
            "clock": self.clock.mechanism,
            "backend": self.backend_name,
        }

    def _spawn(self) -> None:
        self.tmp.wait_released()
        parent, child = socket.socketpair()
        log_fd = os.open(self.log.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            proc = _zygote().spawn(child, log_fd, str(self.fn.code_dir))
        finally:
            os.close(log_fd)
            child.close()
        self._proc, self._conn = proc, Channel(parent)
        self._conn.send(
            BootSpec(
                env_id=self.env_id,
                handler=self.fn.handler,
                task_root=str(self.fn.code_dir),
                environ=self._environ(),
                clock_page=str(self.env_dir / "clock.page"),
                sandbox=self.tmp.spec,
                timeout_ms=self.fn.timeout_s * 1000,
            )
        )
        # The runtime builds its sandbox meanwhile (no user code yet: that waits for "init",
        # which is sent only after this returns), so the kernel's slow cgroup move overlaps it.
        self.limiter.attach(proc.pid)
        try:
            message = self._recv(10.0)
        except RuntimeGone:
            message = None
        if message is None or message[0] != "ready":
            detail = (
                message[1]
                if message is not None and message[0] == "fatal"
                else (f"no answer (exit {proc.poll()})")
            )
            self._kill()
            raise OSError(f"environment {self.env_id} failed to start: {detail}")

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._conn is None:
            raise RuntimeGone("no runtime")
        try:
            self._conn.send(message)
        except OSError as exc:
            raise RuntimeGone(str(exc)) from exc

    def _recv(self, timeout_s: float) -> tuple[Any, ...] | None:
        conn, proc = self._conn, self._proc
        if conn is None or proc is None:
            raise RuntimeGone("no runtime")
        try:
            message: tuple[Any, ...] | None = conn.recv(timeout_s)
        except (EOFError, OSError) as exc:
            raise RuntimeGone(str(exc)) from exc
        if message is None and proc.poll() is not None:
            raise RuntimeGone(f"exit {proc.returncode}")
        return message

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.limiter.kill_all()
        if proc is not None:
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def abort(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.limiter.kill_all()

    def _exitcode(self, wait_s: float = 0.05) -> int | None:
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return None

    def _meters_start(self) -> None:
        self.limiter.reset_peak()
        self.tmp.reset_peak()
        self.clock.start()

    def _meters_poll(self, clock_only: bool = False) -> tuple[float, float]:
        if not clock_only:
            self.limiter.poll()
            self.tmp.poll()
        elapsed = self.clock.sample()
        rate = self.clock.rate()
        self._publish_clock(elapsed, rate)
        return elapsed, rate

    def _publish_clock(self, elapsed_s: float, rate: float) -> None:
        self._clock_page.publish(elapsed_s, rate)

    def _meters_peaks(self) -> tuple[int, int, bool, bool]:
        return (
            self.limiter.peak_bytes(),
            self.tmp.peak_bytes(),
            self.limiter.oom_killed(),
            self.tmp.over_limit(),
        )

    def _release(self) -> None:
        self.limiter.close()
        self.tmp.close()
        self.clock.close()
        self._clock_page.close()
