"""How the roles reach each other: the events they send, the Invoker that sends them, fan-out.

Every invocation between roles is asynchronous (``InvocationType=Event``), so it may be
delivered more than once and is retried by Lambda; the roles make that harmless (see
:mod:`simulator.roles`). A fan-out sends the N worker events of a round, but only for the caller
that wins the round's ``fanout-<r>`` claim. The test-only ``faults`` of a config are acted out
at named points of the roles by :func:`inject_fault`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from simulator.run_state import RunState
from simulator.training_config import (
    DEFAULT_MOUNT,
    EventError,
    InjectedFault,
    Schedule,
    TrainingConfig,
)
from simulator.workspace import Workspace

FANOUT_THREADS = 16


class FanOutError(RuntimeError):
    """Some invocations of a fan-out failed; the watchdog re-invokes what never arrives."""


class Invoker(Protocol):
    """Sends an asynchronous (Event) invocation."""

    def invoke_async(self, function_name: str, event: Mapping[str, Any]) -> None:
        """Queue `event` for `function_name`; raise if Lambda did not accept it."""
        ...


class Context(Protocol):
    """The parts of Lambda's context object the roles use."""

    @property
    def aws_request_id(self) -> str: ...

    @property
    def function_name(self) -> str | None: ...

    def get_remaining_time_in_millis(self) -> int: ...


class Boto3Invoker:
    """`Invoker` over boto3's Lambda client (the environment supplies endpoint and credentials)."""

    def __init__(self, client: Any = None, **client_kwargs: Any) -> None:
        self._client = client
        self._client_kwargs = client_kwargs
        self._lock = threading.Lock()

    def _get_client(self) -> Any:
        with self._lock:  # boto3 clients are thread-safe once built, but building one is not
            if self._client is None:
                import boto3
                from botocore.config import Config

                kwargs = {"config": Config(retries={"max_attempts": 5, "mode": "standard"})}
                kwargs.update(self._client_kwargs)
                self._client = boto3.client("lambda", **kwargs)
            return self._client

    def invoke_async(self, function_name: str, event: Mapping[str, Any]) -> None:
        """InvocationType=Event; raises unless Lambda answers 202."""
        response = self._get_client().invoke(
            FunctionName=function_name,
            InvocationType="Event",
            Payload=json.dumps(dict(event)).encode(),
        )
        status = response.get("StatusCode")
        if status != 202:
            raise RuntimeError(f"invoke {function_name}: expected status 202, got {status}")


# ------------------------------------------------------------------------------------------
# Events the roles send


def _base(ws: Workspace) -> dict[str, Any]:
    event: dict[str, Any] = {"run": ws.run}
    if ws.mount != DEFAULT_MOUNT:
        event["mount"] = ws.mount
    return event


def worker_event(ws: Workspace, sched: Schedule, round: int, worker: int) -> dict[str, Any]:
    """The event that runs worker `worker` of round `round`."""
    return {
        "workerno": worker,
        "workers": sched.workers,
        "epochsdone": sched.epoch(round),
        "round": round,
        **_base(ws),
    }


def combine_event(ws: Workspace, sched: Schedule, round: int) -> dict[str, Any]:
    """The event that combines round `round`."""
    return {
        "combine": True,
        "workers": sched.workers,
        "epochsdone": sched.epoch(round),
        "round": round,
        **_base(ws),
    }


def aggregate_event(ws: Workspace, sched: Schedule, round: int, shard: int) -> dict[str, Any]:
    """The event that sums shard `shard`'s results of round `round` (sharded aggregation)."""
    return {
        "aggregate": True,
        "shard": shard,
        "workers": sched.workers,
        "epochsdone": sched.epoch(round),
        "round": round,
        **_base(ws),
    }


def start_event(ws: Workspace, workers: int) -> dict[str, Any]:
    """A start event for an existing run (its config is on EFS)."""
    return {"start": True, "workers": workers, **_base(ws)}


def resolve_round(
    sched: Schedule, workers: int, round: int | None, epochsdone: int, cfg: TrainingConfig
) -> int:
    """Check a worker/aggregate/combine event against the run; the round it means."""
    if workers != cfg.workers:
        raise EventError("workers", f"must be {cfg.workers}, the run's worker count, got {workers}")
    if round is None:
        return epochsdone * sched.rounds_per_epoch
    if sched.epoch(round) != epochsdone:
        raise EventError(
            "epochsdone",
            f"must be {sched.epoch(round)} for round {round} "
            f"({sched.rounds_per_epoch} rounds per epoch), got {epochsdone}",
        )
    return round


def round_gate(ws: Workspace, r: int, out: dict[str, Any]) -> dict[str, Any] | None:
    """The answer of a worker or aggregator that must not compute round r, or None if it may:
    the run failed, or the round was combined already (a late duplicate); a round without
    weights was never started (EventError)."""
    failure = ws.failure()
    if failure is not None:
        return {**out, "status": "failed", "reason": failure}
    if ws.round_done(r):
        return {**out, "status": "stale"}  # round already combined: a late duplicate
    if not ws.has_weights(r):
        raise EventError("round", f"round {r} of run {ws.run!r} has not started (no weights)")
    return None


# ------------------------------------------------------------------------------------------
# Faults (test-only)


def inject_fault(
    ws: Workspace,
    cfg: TrainingConfig,
    role: str,
    at: str,
    round: int,
    worker: int | None,
    step: int | None = None,
) -> None:
    """Raise InjectedFault if a configured fault matches and one of its `times` is unused."""
    for index, f in enumerate(cfg.faults):
        if f.role != role or f.at != at or (step is not None and f.step != step):
            continue
        if (f.round is not None and f.round != round) or (
            f.worker is not None and f.worker != worker
        ):
            continue
        for k in range(f.times):
            if ws.claim(f"fault-{index}-{k}", f"{role}:{round}:{worker}"):
                where = f"{role} {at} round {round}" + (
                    "" if worker is None else f" worker {worker}"
                )
                raise InjectedFault(f.action, where)


# ------------------------------------------------------------------------------------------
# Fan-out


def invoke_all(invoker: Invoker, function: str, events: Sequence[Mapping[str, Any]]) -> None:
    """Send every event (in threads when there are many); FanOutError lists those that failed."""
    errors: list[str] = []

    def send(event: Mapping[str, Any]) -> None:
        try:
            invoker.invoke_async(function, event)
        except Exception as exc:
            errors.append(f"{json.dumps(dict(event))}: {exc!r}")

    if len(events) <= 4:
        for e in events:
            send(e)
    else:
        # A fan-out of 64 sequential invokes costs 64 round trips to the Lambda API.
        with ThreadPoolExecutor(min(FANOUT_THREADS, len(events))) as pool:
            list(pool.map(send, events))
    if errors:
        raise FanOutError(
            f"{len(errors)} of {len(events)} invocations failed: " + "; ".join(errors[:3])
        )


def target_function(cfg: TrainingConfig) -> str:
    """The function the roles invoke: the config's, else EventError naming the field."""
    if not cfg.function_name:
        raise EventError("config.function_name", "is not set and the context had none")
    return cfg.function_name


def fan_out(
    ws: Workspace,
    state: RunState,
    round: int,
    invoker: Invoker,
    owner: str,
    record: Callable[[bool, float], None],
) -> bool:
    """Invoke the N workers of `round` if this caller wins the round's fan-out claim.

    `record(won, now)` writes the progress rows first (one transaction), so a round's row
    exists before any of its workers runs and the combine's update always comes after it.
    """
    cfg, sched = state.config, state.schedule
    won = ws.claim(f"fanout-{round}", owner)
    record(won, time.time())
    if not won:
        return False
    inject_fault(ws, cfg, owner.split("-")[0], "after_fanout_claim", round, None)
    events = [worker_event(ws, sched, round, i) for i in range(cfg.workers)]
    invoke_all(invoker, target_function(cfg), events)
    return True


__all__ = [
    "FANOUT_THREADS",
    "Boto3Invoker",
    "Context",
    "FanOutError",
    "Invoker",
    "aggregate_event",
    "combine_event",
    "fan_out",
    "inject_fault",
    "invoke_all",
    "resolve_round",
    "start_event",
    "target_function",
    "worker_event",
]
