"""Execution environments: one OS process tree each, one invocation at a time.

`ExecutionEnvironment` owns the Lambda policy — cold/warm state, init and its 10 s cap, the
deadline on the Lambda clock, memory and /tmp peaks, log lines, billing — and a backend supplies
a few hooks to start, talk to and kill the runtime process. `ProcessEnvironment` is the backend
that forks the runtime from a fork server and encloses it in a cgroup and a private mount
namespace where the host allows, or in sampled limits where it does not.
"""

from __future__ import annotations

import abc
import json
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lambda_runtime import logs, quotas
from lambda_runtime.billing import InvocationRecord
from lambda_runtime.config import FunctionConfig, ServiceSettings

MIB = 1024 * 1024
# Longest the parent sleeps between looks at the clock, the memory and /tmp of a running
# invocation; short enough to stop a runaway /tmp or a missed deadline within a few ms.
POLL_SLICE_S = 0.02

_SIGNAL_NAMES = {
    signal.SIGKILL: "killed",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted",
    signal.SIGTERM: "terminated",
    signal.SIGBUS: "bus error",
    signal.SIGFPE: "floating point exception",
    signal.SIGILL: "illegal instruction",
}

PASSTHROUGH_ENV = (
    "PATH",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "HOME",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "KERAS_HOME",
    "TF_CPP_MIN_LOG_LEVEL",
    "SSL_CERT_FILE",
)


@dataclass(frozen=True)
class InvocationRequest:
    """One invocation as the service hands it to an environment."""

    request_id: str
    payload: bytes
    invocation_type: str = "RequestResponse"
    attempt: int = 1
    client_context: dict[str, Any] | None = None
    invoked_arn: str = ""


@dataclass
class InvocationOutcome:
    """What happened: payload for the caller, error, and the billing record."""

    payload: bytes
    function_error: str | None
    status: str
    error_type: str | None
    record: InvocationRecord
    log_start: int = 0
    content_type: str = "application/json"
    mechanisms: dict[str, str] = field(default_factory=dict)


class RuntimeGone(Exception):
    """The runtime process ended (crash, OOM kill, exit) while we waited for it."""


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None or exitcode == 0:
        return "Runtime exited without providing a reason"
    if exitcode < 0:
        name = _SIGNAL_NAMES.get(signal.Signals(-exitcode), signal.Signals(-exitcode).name.lower())
        return f"Runtime exited with error: signal: {name}"
    return f"Runtime exited with error: exit status {exitcode}"


def _trace_id() -> str:
    root = f"1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]}"
    return f"Root={root};Parent={uuid.uuid4().hex[:16]};Sampled=0"


class ExecutionEnvironment(abc.ABC):
    """Lambda's lifecycle and limits around a runtime process that a backend provides."""

    backend_name = "abstract"

    def __init__(
        self,
        fn: FunctionConfig,
        settings: ServiceSettings,
        env_id: str,
        endpoint: str | None,
    ) -> None:
        self.fn = fn
        self.settings = settings
        self.env_id = env_id
        self.endpoint = endpoint
        self.created = time.time()
        self.last_used = self.created
        self.invocations = 0
        self.closed = False
        self._lock = threading.Lock()  # one invocation at a time, enforced, not assumed
        self.env_dir = settings.run_dir / "environments" / f"{fn.name}-{env_id}"
        self.env_dir.mkdir(parents=True, exist_ok=True)
        self.stream_name = logs.new_log_stream_name(self.created)
        self.log = logs.LogStream(settings.run_dir, fn.name, self.stream_name)
        self.runtime_ready = False
        self.mechanisms: dict[str, str] = {}

    # ---- hooks a backend implements -------------------------------------------------------
    @abc.abstractmethod
    def _spawn(self) -> None:
        """Start a runtime process (sandboxed, limited) that waits for "init"."""

    @abc.abstractmethod
    def _send(self, message: tuple[Any, ...]) -> None: ...

    @abc.abstractmethod
    def _recv(self, timeout_s: float) -> tuple[Any, ...] | None:
        """The runtime's next message, None if none within timeout; RuntimeGone when it died."""

    @abc.abstractmethod
    def _kill(self) -> None:
        """Kill the runtime's whole process tree and wait until it is gone."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Kill the runtime now, from any thread: a running invocation ends as a crash."""

    @abc.abstractmethod
    def _exitcode(self, wait_s: float = 0.05) -> int | None:
        """The runtime's exit status (negative: killed by that signal), None while it runs."""

    @abc.abstractmethod
    def _meters_start(self) -> None:
        """Reset the clock and the memory and /tmp peaks at the start of a phase."""

    @abc.abstractmethod
    def _meters_poll(self, clock_only: bool = False) -> tuple[float, float]:
        """Sample clock, memory and /tmp; return (Lambda-clock s elapsed, rate)."""

    @abc.abstractmethod
    def _meters_peaks(self) -> tuple[int, int, bool, bool]:
        """(peak memory bytes, peak /tmp bytes, oom killed, /tmp over its cap)."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Free everything the backend holds (called once, at close)."""

    # ---- policy -----------------------------------------------------------------------------
    def _environ(self) -> dict[str, str]:
        fn, s = self.fn, self.settings
        env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
        env.update(
            {
                "AWS_LAMBDA_FUNCTION_NAME": fn.name,
                "AWS_LAMBDA_FUNCTION_VERSION": quotas.FUNCTION_VERSION,
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(fn.memory_mb),
                "AWS_LAMBDA_LOG_GROUP_NAME": logs.log_group_name(fn.name),
                "AWS_LAMBDA_LOG_STREAM_NAME": self.stream_name,
                "AWS_REGION": s.region,
                "AWS_DEFAULT_REGION": s.region,
                "AWS_EXECUTION_ENV": f"AWS_Lambda_{fn.runtime_id}",
                "_HANDLER": fn.handler,
                "LAMBDA_TASK_ROOT": str(fn.code_dir),
                "LAMBDA_RUNTIME_DIR": str(Path(__file__).parent),
                "PWD": str(fn.code_dir),
                "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
                "AWS_ACCESS_KEY_ID": "ASIALOCALLAMBDAKEY00",
                "AWS_SECRET_ACCESS_KEY": "local-lambda-secret-access-key",
                "AWS_SESSION_TOKEN": "local-lambda-session-token",
                "TZ": ":UTC",
                "LANG": "en_US.UTF-8",
                "LC_CTYPE": "C.UTF-8",
                "SHLVL": "0",
                "AWS_XRAY_DAEMON_ADDRESS": "169.254.79.129:2000",
                "_AWS_XRAY_DAEMON_ADDRESS": "169.254.79.129",
                "_AWS_XRAY_DAEMON_PORT": "2000",
                "AWS_XRAY_CONTEXT_MISSING": "LOG_ERROR",
            }
        )
        if self.endpoint:
            # AWS_LAMBDA_RUNTIME_API is not set: the runtime talks to the service over a pipe,
            # and no Runtime API is served that a custom runtime could poll.
            env["AWS_ENDPOINT_URL_LAMBDA"] = self.endpoint
        env.update(fn.environment)
        return env

    def _phase_wait(self, limit_s: float) -> tuple[tuple[Any, ...] | None, float, str | None]:
        """Wait for the runtime's answer under a Lambda-clock limit.

        Returns (message, Lambda-clock seconds, failure) where failure is None, "timeout",
        "oom", "tmp" (watched /tmp over its cap) or "crash".
        """
        elapsed, rate = 0.0, 1.0
        while True:
            # Sleep no longer than the Lambda clock could need to reach the limit: it may run
            # faster than wall time (a small memory size scales CPU time up).
            budget = (limit_s - elapsed) / max(rate, 1.0)
            try:
                message = self._recv(min(POLL_SLICE_S, max(budget, 0.0005)))
            except RuntimeGone:
                elapsed, rate = self._meters_poll()
                _, _, oom, _ = self._meters_peaks()
                return None, elapsed, "oom" if oom else "crash"
            # Memory and /tmp are sampled while the invocation runs; its end is sampled by
            # _meters_peaks anyway, so an answer only needs the clock read.
            elapsed, rate = self._meters_poll(clock_only=message is not None)
            if message is not None:
                return message, elapsed, None
            _, _, oom, tmp_over = self._meters_peaks()
            if oom:
                self._kill()
                return None, elapsed, "oom"
            if tmp_over:
                self._kill()
                return None, elapsed, "tmp"
            if elapsed >= limit_s:
                self._kill()
                return None, elapsed, "timeout"

    def _init(self, phase: str, limit_s: float) -> tuple[float, dict[str, Any] | None, str | None]:
        """Start the runtime and import the handler. Returns (init ms, error payload, status)."""
        self.log.write(logs.format_init_start(self.fn.runtime_id, self.settings.region))
        self._meters_start()  # Init Duration covers the runtime's own start, as on Lambda
        self._spawn()
        self._send(("init",))
        message, elapsed, failure = self._phase_wait(limit_s)
        init_ms = elapsed * 1000.0
        if failure is None and message is not None and message[0] == "init_ok":
            self.runtime_ready = True
            return init_ms, None, None
        if failure is None and message is not None and message[0] == "init_error":
            error: dict[str, Any] = message[1]
            status = "error"
        elif failure == "timeout":
            error = {
                "errorType": "Runtime.InitTimeout" if phase == "init" else "Sandbox.Timedout",
                "errorMessage": f"Init phase timed out after {elapsed:.2f} seconds",
            }
            status = "timeout"
        elif failure == "oom":
            error = {
                "errorType": "Runtime.OutOfMemory",
                "errorMessage": "Runtime exited with error: signal: killed",
            }
            status = "error"
        else:
            reason = message[1] if message is not None and message[0] == "fatal" else None
            error = {
                "errorType": "Runtime.ExitError",
                "errorMessage": reason or _exit_reason(self._exitcode(wait_s=1.0)),
            }
            status = "error"
        self._kill()
        self.runtime_ready = False
        # A timed-out init is reported by status alone; a failed one names its error type.
        error_type = None if status == "timeout" else error.get("errorType")
        self.log.write(logs.format_init_report(init_ms, phase, status, error_type))
        return init_ms, error, status

    def invoke(self, req: InvocationRequest) -> InvocationOutcome:
        """Run one invocation, initialising first when the runtime is not up."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"environment {self.env_id} is already running an invocation")
        try:
            return self._invoke_locked(req)
        finally:
            self.last_used = time.time()
            self.invocations += 1
            self._lock.release()

    def _invoke_locked(self, req: InvocationRequest) -> InvocationOutcome:
        fn = self.fn
        start_wall = time.time()
        cold = not self.runtime_ready
        init_ms: float | None = None
        init_error: dict[str, Any] | None = None
        suppressed_ms = 0.0
        if cold:
            init_ms, init_error, _ = self._init("init", quotas.INIT_TIMEOUT_S)
        log_start = self.log.offset()
        self.log.write(logs.format_start(req.request_id))
        if init_error is not None:
            # Lambda retries a failed init inside the invoke, under the function's timeout.
            suppressed_ms, init_error, init_status = self._init("invoke", float(fn.timeout_s))
            if init_error is not None:
                if init_status == "timeout":
                    return self._finish_timeout(
                        req, start_wall, cold, init_ms, suppressed_ms / 1000, log_start
                    )
                payload = dict(init_error)
                payload.setdefault("requestId", "")
                payload.setdefault("stackTrace", [])
                ordered = {
                    k: payload[k] for k in ("errorMessage", "errorType", "requestId", "stackTrace")
                }
                return self._finish(
                    req,
                    start_wall,
                    cold,
                    init_ms,
                    suppressed_ms,
                    json.dumps(ordered).encode(),
                    "error",
                    init_error["errorType"],
                    log_start,
                    report_error=True,
                )
        remaining_s = fn.timeout_s - suppressed_ms / 1000.0
        deadline_ms = int((time.time() + remaining_s) * 1000)
        self._meters_start()
        self._publish_clock(suppressed_ms / 1000.0, 1.0)
        self._send(
            (
                "invoke",
                req.request_id,
                req.payload,
                deadline_ms,
                req.invoked_arn,
                req.client_context,
                _trace_id(),
            )
        )
        message, elapsed, failure = self._phase_wait(remaining_s)
        duration_ms = suppressed_ms + elapsed * 1000.0
        if failure == "timeout":
            return self._finish_timeout(
                req, start_wall, cold, init_ms, duration_ms / 1000, log_start
            )
        if failure is not None:
            self.runtime_ready = False
            exitcode = self._exitcode(wait_s=1.0) if failure == "crash" else None
            self._kill()
            # The caller sees Runtime.ExitError for every way the runtime can die; the REPORT
            # line says Runtime.OutOfMemory for a kill by the memory limit, as Lambda's does.
            if failure == "oom":
                status, report_type, reason = "oom", "Runtime.OutOfMemory", _exit_reason(-9)
            elif failure == "tmp":
                status, report_type = "crash", "Runtime.ExitError"
                reason = (
                    f"/tmp use exceeded the configured ephemeral storage of {fn.ephemeral_mb} MB "
                    "(watched directory; Lambda would have failed the write with ENOSPC)"
                )
            else:
                status, report_type, reason = "crash", "Runtime.ExitError", _exit_reason(exitcode)
            body = {
                "errorType": "Runtime.ExitError",
                "errorMessage": f"RequestId: {req.request_id} Error: {reason}",
            }
            return self._finish(
                req,
                start_wall,
                cold,
                init_ms,
                duration_ms,
                json.dumps(body).encode(),
                status,
                report_type,
                log_start,
                report_error=True,
            )
        assert message is not None
        kind, body_bytes, content_type = message
        if kind == "ok":
            if (
                len(body_bytes) > quotas.SYNC_RESPONSE_MAX_BYTES
                and req.invocation_type == "RequestResponse"
            ):
                body = {
                    "errorMessage": "Response payload size exceeded maximum allowed payload size "
                    f"({quotas.SYNC_RESPONSE_MAX_BYTES} bytes).",
                    "errorType": "Function.ResponseSizeTooLarge",
                }
                return self._finish(
                    req,
                    start_wall,
                    cold,
                    init_ms,
                    duration_ms,
                    json.dumps(body).encode(),
                    "error",
                    "Function.ResponseSizeTooLarge",
                    log_start,
                    report_error=True,
                )
            return self._finish(
                req,
                start_wall,
                cold,
                init_ms,
                duration_ms,
                body_bytes,
                "success",
                None,
                log_start,
                content_type=content_type,
            )
        error_type = json.loads(body_bytes).get("errorType") or "Unhandled"
        return self._finish(
            req, start_wall, cold, init_ms, duration_ms, body_bytes, "error", error_type, log_start
        )

    def _finish_timeout(
        self,
        req: InvocationRequest,
        start_wall: float,
        cold: bool,
        init_ms: float | None,
        elapsed_s: float,
        log_start: int,
    ) -> InvocationOutcome:
        self.runtime_ready = False
        self._kill()
        self.log.write(logs.format_timeout_line(time.time(), req.request_id, elapsed_s))
        body = {
            "errorType": "Sandbox.Timedout",
            "errorMessage": logs.timeout_error_message(req.request_id, elapsed_s),
        }
        return self._finish(
            req,
            start_wall,
            cold,
            init_ms,
            elapsed_s * 1000.0,
            json.dumps(body).encode(),
            "timeout",
            "Sandbox.Timedout",
            log_start,
            report_status="timeout",
        )

    def _finish(
        self,
        req: InvocationRequest,
        start_wall: float,
        cold: bool,
        init_ms: float | None,
        duration_ms: float,
        payload: bytes,
        status: str,
        error_type: str | None,
        log_start: int,
        *,
        report_error: bool = False,
        report_status: str | None = None,
        content_type: str = "application/json",
    ) -> InvocationOutcome:
        fn = self.fn
        peak_mem, peak_tmp, _, _ = self._meters_peaks()
        max_mem_mb = fn.memory_mb if status == "oom" else min(fn.memory_mb, -(-peak_mem // MIB))
        billed = logs.billed_duration_ms(duration_ms, init_ms)
        self.log.write(logs.format_end(req.request_id))
        if report_status is None and report_error:
            report_status = "error"
        self.log.write(
            logs.format_report(
                req.request_id,
                duration_ms,
                billed,
                fn.memory_mb,
                max_mem_mb,
                init_ms,
                report_status,
                error_type if report_status == "error" else None,
            )
        )
        end = time.time()
        record = InvocationRecord(
            request_id=req.request_id,
            function=fn.name,
            environment_id=self.env_id,
            invocation_type=req.invocation_type,
            attempt=req.attempt,
            cold=cold,
            start_epoch_s=start_wall,
            end_epoch_s=end,
            wall_ms=(end - start_wall) * 1000.0,
            duration_ms=duration_ms,
            init_ms=init_ms,
            billed_ms=billed,
            memory_mb=fn.memory_mb,
            max_memory_mb=max_mem_mb,
            ephemeral_mb=fn.ephemeral_mb,
            tmp_peak_mb=peak_tmp / MIB,
            architecture=fn.architecture,
            status=status,
            error_type=error_type,
            mechanisms=dict(self.mechanisms),
        )
        return InvocationOutcome(
            payload=payload,
            function_error=None if status == "success" else "Unhandled",
            status=status,
            error_type=error_type,
            record=record,
            log_start=log_start,
            content_type=content_type,
            mechanisms=dict(self.mechanisms),
        )

    @abc.abstractmethod
    def _publish_clock(self, elapsed_s: float, rate: float) -> None:
        """Tell the runtime the Lambda clock, for get_remaining_time_in_millis()."""

    def close(self) -> None:
        """Shut the environment down: runtime stopped (2 s grace), resources freed."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                if self.runtime_ready:
                    try:
                        self._send(("shutdown",))
                        deadline = time.monotonic() + quotas.SHUTDOWN_TIMEOUT_S
                        while self._exitcode() is None and time.monotonic() < deadline:
                            time.sleep(0.005)
                    except (OSError, RuntimeGone):
                        pass
                self._kill()
            finally:
                self.runtime_ready = False
                self._release()
                self.log.close()
