"""The local Lambda service: functions, environment pools, sync and async invokes, billing.

State and behaviour live here; `http_api` only parses and formats HTTP around `invoke_raw`.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lambda_runtime import quotas
from lambda_runtime.async_queue import AsyncQueue, QueuedEvent
from lambda_runtime.backends import BACKENDS
from lambda_runtime.billing import Ledger
from lambda_runtime.config import FunctionConfig, ServiceSettings
from lambda_runtime.environment import ExecutionEnvironment, InvocationRequest
from lambda_runtime.errors import (
    ConfigError,
    InvalidParameterValueException,
    InvalidRequestContentException,
    RequestTooLargeException,
    ResourceNotFoundException,
)
from lambda_runtime.pool import EnvironmentPool
from lambda_runtime.result import InvokeResult

log = logging.getLogger(__name__)

INVOCATION_TYPES = ("RequestResponse", "Event", "DryRun")
LOG_TYPES = ("None", "Tail")


class LambdaService:
    """A Lambda service on this machine: register functions, invoke them, read the bill."""

    def __init__(
        self,
        run_dir: str | Path = "runs/local",
        *,
        settings: ServiceSettings | None = None,
        http: bool = True,
        unreserved_concurrency_min: int | None = None,
        **knobs: Any,
    ) -> None:
        if settings is None:
            settings = ServiceSettings.from_mapping({"run_dir": Path(run_dir), **knobs})
        elif knobs:
            raise ConfigError(
                next(iter(knobs)), "pass either settings= or keyword settings, not both"
            )
        if settings.backend not in BACKENDS:
            raise ConfigError(
                "backend", f"must be one of {sorted(BACKENDS)}, got {settings.backend!r}"
            )
        self.settings = settings
        self.run_dir = settings.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._functions: dict[str, FunctionConfig] = {}
        self._ids = itertools.count(1)
        if unreserved_concurrency_min is None:
            # Lambda keeps 100 unreserved; a smaller test account keeps none.
            unreserved_concurrency_min = (
                min(quotas.UNRESERVED_CONCURRENCY_MIN, settings.account_concurrency)
                if settings.account_concurrency >= quotas.ACCOUNT_CONCURRENCY_DEFAULT
                else 0
            )
        self.pool: EnvironmentPool[ExecutionEnvironment] = EnvironmentPool(
            self._new_environment, settings.account_concurrency, unreserved_concurrency_min
        )
        self.ledger = Ledger(self.run_dir)
        self._closed = False
        self._http: Any = None
        self._http_address: tuple[str, int] = (settings.host, settings.port)
        self.endpoint: str | None = None
        if http:
            self.start_http(settings.host, settings.port)
        self.queue = AsyncQueue(
            self._run_async, self._async_policy, self.pool.wait_for_slot, settings.time_scale
        )
        self._reaper_stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="lambda-reaper", daemon=True)
        self._reaper.start()

    # ---- functions --------------------------------------------------------------------------
    def register(self, cfg: FunctionConfig) -> None:
        """Add (or replace) a function."""
        self.pool.add_function(cfg.name, cfg.reserved_concurrency)
        self._functions[cfg.name] = cfg

    def function_configs(self) -> list[FunctionConfig]:
        return list(self._functions.values())

    def function_arn(self, name: str) -> str:
        return self._config(name).arn(self.settings.region, self.settings.account_id)

    def _config(self, name: str, qualifier: str | None = None) -> FunctionConfig:
        cfg = self._functions.get(name)
        if cfg is None or qualifier not in (None, quotas.FUNCTION_VERSION):
            arn = (
                f"arn:aws:lambda:{self.settings.region}:{self.settings.account_id}:function:"
                f"{name}:{qualifier or quotas.FUNCTION_VERSION}"
            )
            raise ResourceNotFoundException(f"Function not found: {arn}")
        return cfg

    def mechanisms(self, name: str) -> dict[str, str]:
        """The enforcement mechanisms an environment of this function gets on this host."""
        for env in self.pool.idle_environments(name):
            return dict(env.mechanisms)
        from lambda_runtime.limiter import host_capabilities
        from lambda_runtime.sandbox import host_supports_namespaces

        ok, reason = host_supports_namespaces()
        caps = dict(host_capabilities())
        caps["tmp"] = (
            "loop-ext4"
            if ok and self.settings.isolation != "portable"
            else f"watched-dir ({reason or 'portable'})"
        )
        caps["clock"] = self.settings.clock
        return caps

    def _new_environment(self, name: str) -> ExecutionEnvironment:
        cfg = self._functions[name]
        backend = BACKENDS[self.settings.backend]
        env_id = f"{next(self._ids):04d}{uuid.uuid4().hex[:8]}"
        return backend(cfg, self.settings, env_id, self.endpoint)

    # ---- invoke -----------------------------------------------------------------------------
    def invoke(
        self,
        function_name: str,
        event: Any = None,
        *,
        invocation_type: str = "RequestResponse",
        log_type: str = "None",
        client_context: Mapping[str, Any] | None = None,
        qualifier: str | None = None,
    ) -> InvokeResult:
        """Invoke with a JSON-serialisable event (None sends an empty body, delivered as {})."""
        payload = b"" if event is None else json.dumps(event).encode()
        cc = None
        if client_context is not None:
            cc = base64.b64encode(json.dumps(dict(client_context)).encode()).decode()
        return self.invoke_raw(
            function_name,
            payload,
            invocation_type=invocation_type,
            log_type=log_type,
            client_context=cc,
            qualifier=qualifier,
        )

    def invoke_raw(
        self,
        function_name: str,
        payload: bytes,
        *,
        invocation_type: str = "RequestResponse",
        log_type: str = "None",
        client_context: str | None = None,
        qualifier: str | None = None,
    ) -> InvokeResult:
        """The Invoke API: raises ServiceError subclasses for API errors (no function ran)."""
        if invocation_type not in INVOCATION_TYPES:
            raise InvalidParameterValueException(
                f"InvocationType: must be one of {', '.join(INVOCATION_TYPES)}, "
                f"got {invocation_type!r}"
            )
        if log_type not in LOG_TYPES:
            raise InvalidParameterValueException(
                f"LogType: must be one of {', '.join(LOG_TYPES)}, got {log_type!r}"
            )
        cfg = self._config(function_name, qualifier)
        request_id = str(uuid.uuid4())
        if invocation_type == "DryRun":
            return InvokeResult(204, b"", request_id, executed_version=None)
        if invocation_type == "Event":
            if len(payload) > quotas.ASYNC_REQUEST_MAX_BYTES:
                raise RequestTooLargeException(
                    f"{len(payload)} byte payload is too large for the Event invocation type "
                    f"(limit {quotas.ASYNC_REQUEST_MAX_BYTES} bytes)"
                )
        elif len(payload) > quotas.SYNC_REQUEST_MAX_BYTES:
            raise RequestTooLargeException(
                f"Request must be smaller than {quotas.SYNC_REQUEST_MAX_BYTES} bytes for the "
                "InvokeFunction operation"
            )
        if payload:
            try:
                json.loads(payload)
            except ValueError as exc:
                raise InvalidRequestContentException(
                    "Could not parse request body into json: Could not parse payload into json: "
                    f"{exc}"
                ) from None
        if invocation_type == "Event":
            self.queue.put(cfg.name, request_id, payload)
            return InvokeResult(202, b"", request_id, executed_version=None)
        context = self._client_context(client_context)
        env = self.pool.acquire(cfg.name)
        try:
            outcome = env.invoke(
                InvocationRequest(
                    request_id,
                    payload,
                    "RequestResponse",
                    1,
                    context,
                    self.function_arn(cfg.name)
                    if qualifier is None
                    else f"{self.function_arn(cfg.name)}:{qualifier}",
                )
            )
            # Recorded before the environment goes back: close() waits for busy environments
            # only, and then closes the ledger and the log streams.
            self.ledger.append(outcome.record)
            tail = env.log.tail_base64(outcome.log_start) if log_type == "Tail" else None
        finally:
            self.pool.release(cfg.name, env)
        return InvokeResult(
            200,
            outcome.payload,
            request_id,
            outcome.function_error,
            tail,
            quotas.FUNCTION_VERSION,
            outcome.record,
        )

    @staticmethod
    def _client_context(raw: str | None) -> dict[str, Any] | None:
        if raw is None:
            return None
        try:
            value = json.loads(base64.b64decode(raw, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidRequestContentException(
                "X-Amz-Client-Context must be a base64-encoded JSON object"
            ) from None
        if not isinstance(value, dict):
            raise InvalidRequestContentException("X-Amz-Client-Context must be a JSON object")
        return value

    def _run_async(self, event: QueuedEvent) -> tuple[str, str | None, bytes] | None:
        env = self.pool.try_acquire(event.function)
        if env is None:
            return None
        try:
            cfg = self._functions[event.function]
            outcome = env.invoke(
                InvocationRequest(
                    event.request_id,
                    event.payload,
                    "Event",
                    event.attempt,
                    None,
                    cfg.arn(self.settings.region, self.settings.account_id),
                )
            )
            self.ledger.append(outcome.record)  # before release: see invoke_raw
        finally:
            self.pool.release(event.function, env)
        return outcome.status, outcome.function_error, outcome.payload

    def _async_policy(self, name: str) -> tuple[int, int, Path, str]:
        cfg = self._functions[name]
        dest = (
            Path(cfg.on_failure)
            if cfg.on_failure
            else (self.run_dir / "destinations" / f"{name}.on-failure.jsonl")
        )
        return cfg.max_retry_attempts, cfg.max_event_age_s, dest, self.function_arn(name)

    # ---- lifecycle --------------------------------------------------------------------------
    def start_http(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve the Invoke API (boto3-compatible) on host:port; returns the endpoint URL."""
        if (
            self._http is not None
            and (host, port) != (self._http_address[0], self._http_address[1])
            and port != 0
        ):
            self._http.stop()  # asked for a specific address: move there
            self._http = None
        if self._http is None:
            from lambda_runtime.http_api import InvokeApiServer

            self._http_address = (host, port)

            self._http = InvokeApiServer(self, host=host, port=port)
            self.endpoint = self._http.start()
        assert self.endpoint is not None
        return self.endpoint

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until no async event is queued or running."""
        return self.queue.wait_idle(timeout_s)

    def _reap_loop(self) -> None:
        period = min(1.0, self.settings.idle_timeout_s / 4)
        while not self._reaper_stop.wait(period):
            try:
                self.pool.reap(self.settings.idle_timeout_s)
            except Exception:
                log.exception("reaping idle environments failed")

    def async_stats(self) -> dict[str, int]:
        """The async queue's counters (see AsyncQueue.stats): throttled, retries, expired, ..."""
        return self.queue.stats()

    def billing_summary(self, function: str | None = None) -> Any:
        """Billed ms, GB-s and dollars of every invocation so far."""
        return self.ledger.summary(function)

    def close(self) -> None:
        """Stop the HTTP server, the async queue and every environment."""
        if self._closed:
            return
        self._closed = True
        self._reaper_stop.set()
        if self._http is not None:
            self._http.stop()
        # Running invocations end now (as crashes in their records), not at their timeouts.
        for env in self.pool.busy_environments():
            env.abort()
        self.queue.close()
        self.pool.close()
        deadline = time.monotonic() + 5
        while self.pool.busy_total() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.ledger.close()

    def __enter__(self) -> LambdaService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
