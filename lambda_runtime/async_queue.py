"""Lambda's internal queue for asynchronous (Event) invocations.

Events wait here until their function has concurrency; a failed event is retried after
1 and 2 minutes up to the function's MaximumRetryAttempts; an event older than
MaximumEventAgeInSeconds is dropped. `time_scale` multiplies both timings (retry delays and
maximum age), so tests see Lambda's async behaviour in milliseconds. Both outcomes are
written to the function's
on-failure destination (a JSON-lines file) in Lambda's destination record format.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lambda_runtime import logs, quotas

log = logging.getLogger(__name__)


@dataclass(order=True)
class QueuedEvent:
    """One async event; `attempt` counts deliveries so far plus one."""

    not_before: float
    seq: int
    function: str = field(compare=False)
    request_id: str = field(compare=False)
    payload: bytes = field(compare=False)
    enqueued: float = field(compare=False)
    attempt: int = field(compare=False, default=1)


# run(event) -> (status, function_error, payload) or None when no concurrency was available
Runner = Callable[[QueuedEvent], "tuple[str, str | None, bytes] | None"]


class AsyncQueue:
    """Dispatches queued events to a runner as concurrency allows; retries and expires them."""

    def __init__(
        self,
        runner: Runner,
        policy: Callable[[str], tuple[int, int, Path, str]],
        wait_for_slot: Callable[[float], None],
        time_scale: float = 1.0,
        max_threads: int = 256,
    ) -> None:
        self._runner = runner
        self._policy = policy  # function -> (max retries, max age s, destination file, arn)
        self._wait_for_slot = wait_for_slot
        self.time_scale = time_scale
        self._heap: list[QueuedEvent] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self._executor = ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix="lambda-async"
        )
        self._dest_lock = threading.Lock()
        # Distinct (request id, attempt) deliveries that found no concurrency and waited.
        self._throttled: set[tuple[str, int]] = set()
        self._counts = {"retries": 0, "expired": 0, "exhausted": 0}
        self._thread = threading.Thread(
            target=self._dispatch, name="lambda-async-dispatch", daemon=True
        )
        self._thread.start()

    def put(self, function: str, request_id: str, payload: bytes) -> None:
        now = time.time()
        self._push(QueuedEvent(now, next(self._seq), function, request_id, payload, now))

    def _push(self, event: QueuedEvent) -> None:
        with self._cond:
            heapq.heappush(self._heap, event)
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        """Queue counters: events waiting or running, deliveries that waited for concurrency
        (throttled), retries scheduled, events dropped for age (expired) or after their last
        retry (exhausted)."""
        with self._cond:
            return {
                "pending": len(self._heap) + self._in_flight,
                "throttled": len(self._throttled),
                **self._counts,
            }

    def pending(self) -> int:
        """Events queued or running."""
        with self._cond:
            return len(self._heap) + self._in_flight

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until no event is queued or running; False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._heap or self._in_flight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.05 if left is None else min(left, 0.05))
        return True

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (
                    not self._heap or self._heap[0].not_before > time.time()
                ):
                    wait = (
                        0.05
                        if not self._heap
                        else min(0.05, self._heap[0].not_before - time.time())
                    )
                    self._cond.wait(max(wait, 0.001))
                if self._closed:
                    return
                ready: list[QueuedEvent] = []
                now = time.time()
                while self._heap and self._heap[0].not_before <= now:
                    ready.append(heapq.heappop(self._heap))
                self._in_flight += len(ready)
            for event in ready:
                _, max_age, dest, arn = self._policy(event.function)
                if time.time() - event.enqueued > max_age * self.time_scale:
                    self._destination(dest, arn, event, "EventAgeExceeded", None)
                    self._done()
                    continue
                self._executor.submit(self._run, event)

    def _run(self, event: QueuedEvent) -> None:
        try:
            result = self._runner(event)
            if result is None:  # no concurrency: back in the queue, try again shortly
                with self._cond:
                    self._throttled.add((event.request_id, event.attempt))
                self._wait_for_slot(0.02)
                event.not_before = time.time()
                self._push(event)
                return
            status, function_error, payload = result
            if status != "success":
                max_retries, _, dest, arn = self._policy(event.function)
                if event.attempt <= max_retries:
                    with self._cond:
                        self._counts["retries"] += 1
                    delay = quotas.ASYNC_RETRY_DELAYS_S[min(event.attempt - 1, 1)] * self.time_scale
                    event.attempt += 1
                    event.not_before = time.time() + delay
                    self._push(event)
                    return
                self._destination(dest, arn, event, "RetriesExhausted", (function_error, payload))
        except Exception:
            log.exception("async event %s failed in the service", event.request_id)
        finally:
            self._done()

    def _done(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def _destination(
        self,
        dest: Path,
        arn: str,
        event: QueuedEvent,
        condition: str,
        response: tuple[str | None, bytes] | None,
    ) -> None:
        """Append Lambda's on-failure destination record for a dropped event."""
        try:
            request_payload: Any = json.loads(event.payload) if event.payload else {}
        except ValueError:
            request_payload = event.payload.decode("utf-8", "replace")
        record: dict[str, Any] = {
            "version": "1.0",
            "timestamp": logs.format_timestamp(time.time()),
            "requestContext": {
                "requestId": event.request_id,
                "functionArn": f"{arn}:{quotas.FUNCTION_VERSION}",
                "condition": condition,
                "approximateInvokeCount": event.attempt
                if response is not None
                else event.attempt - 1,
            },
            "requestPayload": request_payload,
        }
        if response is not None:
            function_error, payload = response
            record["responseContext"] = {
                "statusCode": 200,
                "executedVersion": quotas.FUNCTION_VERSION,
                "functionError": function_error,
            }
            try:
                record["responsePayload"] = json.loads(payload) if payload else None
            except ValueError:
                record["responsePayload"] = payload.decode("utf-8", "replace")
        with self._cond:
            self._counts["expired" if condition == "EventAgeExceeded" else "exhausted"] += 1
        line = (json.dumps(record) + "\n").encode()
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._dest_lock:
            fd = os.open(dest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=2.0)
        self._executor.shutdown(wait=True, cancel_futures=True)
