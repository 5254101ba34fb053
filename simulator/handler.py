"""The Lambda handler users deploy: parse and validate the event, then run its role.

``handler(event, context)`` is plain Lambda code: it talks only to the invoke API (boto3; the
local service sets ``AWS_ENDPOINT_URL_LAMBDA``), the EFS mount and the progress table, and never
imports the runner. Every malformed event raises :class:`~simulator.protocol.EventError` (a
``ValueError``) naming the field, before anything on EFS is touched.

Each invocation prints one line ``[simulator] {json}`` with its role, run, round, worker and
request id, so logs and billing records can be attributed to rounds and roles.

Training defaults: ``config.json`` in the function's code directory (``$LAMBDA_TASK_ROOT``), so
the thesis's bare ``{"start": true, "workers": N}`` works; a start event's ``config`` overrides
any of them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator.progress import ProgressTable
from simulator.protocol import (
    DEFAULT_MOUNT,
    DEFAULT_RUN,
    MAX_WORKERS,
    Boto3Invoker,
    Context,
    EventError,
    InjectedFault,
    Invoker,
    Workspace,
    check_mount,
    check_run_id,
    check_stalled,
    run_aggregate,
    run_combine,
    run_start,
    run_worker,
)

ROLE_KEYS: Mapping[str, str] = {
    "start": "start",
    "workerno": "worker",
    "combine": "combine",
    "aggregate": "aggregate",
    "check": "check",
}
_COMMON = ("run", "mount")
FIELDS: Mapping[str, tuple[str, ...]] = {
    "start": ("start", "workers", "config", *_COMMON),
    "worker": ("workerno", "workers", "epochsdone", "round", *_COMMON),
    "combine": ("combine", "workers", "epochsdone", "round", *_COMMON),
    "aggregate": ("aggregate", "shard", "workers", "epochsdone", "round", *_COMMON),
    "check": ("check", "workers", *_COMMON),
}
REQUIRED: Mapping[str, tuple[str, ...]] = {
    "start": ("workers",),
    "worker": ("workers", "epochsdone"),
    "combine": ("workers", "epochsdone"),
    "aggregate": ("shard", "workers", "epochsdone"),
    "check": (),
}
LOG_PREFIX = "[simulator] "


@dataclass(frozen=True)
class Request:
    """A validated event."""

    role: str
    run: str = DEFAULT_RUN
    mount: str = DEFAULT_MOUNT
    workers: int | None = None
    worker: int | None = None
    epochsdone: int | None = None
    round: int | None = None
    config: Mapping[str, Any] | None = None
    shard: int | None = None


def _int_field(event: Mapping[str, Any], name: str, lo: int, hi: int | None = None) -> int:
    value = event[name]
    allowed = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
    # bool is an int subclass in Python, but `true` is not a worker count in JSON.
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventError(name, f"must be {allowed}, got {json.dumps(value)}")
    if value < lo or (hi is not None and value > hi):
        raise EventError(name, f"must be {allowed}, got {value}")
    return value


def parse_event(event: Any) -> Request:
    """Validate an event; EventError names the field and what is allowed."""
    if not isinstance(event, Mapping):
        raise EventError(
            "event", f"must be a JSON object with one of {', '.join(ROLE_KEYS)}, got {event!r}"
        )
    roles = [key for key in ROLE_KEYS if key in event]
    if not roles:
        raise EventError(
            "event",
            f"no role: expected exactly one of {', '.join(map(repr, ROLE_KEYS))}; "
            f"got keys {sorted(map(str, event))}",
        )
    if len(roles) > 1:
        raise EventError(roles[1], f"conflicts with {roles[0]!r}: an event has exactly one role")
    role = ROLE_KEYS[roles[0]]
    allowed = FIELDS[role]
    for key in event:
        if key not in allowed:
            raise EventError(
                str(key), f"unknown field for a {role} event; allowed: {', '.join(allowed)}"
            )
    for key in REQUIRED[role]:
        if key not in event:
            raise EventError(key, f"missing; a {role} event needs {', '.join(REQUIRED[role])}")
    for flag in ("start", "combine", "aggregate", "check"):
        if flag in event and event[flag] is not True:
            raise EventError(flag, f"must be true, got {json.dumps(event[flag])}")
    workers = _int_field(event, "workers", 1, MAX_WORKERS) if "workers" in event else None
    worker = None
    if role == "worker":
        assert workers is not None
        worker = _int_field(event, "workerno", 0, workers - 1)
    shard = None
    if role == "aggregate":
        assert workers is not None
        # A run has at most `workers` shards; the run's own count is checked by the role.
        shard = _int_field(event, "shard", 0, workers - 1)
    epochsdone = _int_field(event, "epochsdone", 0) if "epochsdone" in event else None
    round_ = _int_field(event, "round", 0) if "round" in event else None
    run = check_run_id("run", event.get("run", DEFAULT_RUN))
    mount = check_mount("mount", event.get("mount", DEFAULT_MOUNT))
    config = event.get("config")
    if config is not None and not isinstance(config, Mapping):
        raise EventError("config", f"must be a JSON object of training settings, got {config!r}")
    return Request(role, run, mount, workers, worker, epochsdone, round_, config, shard)


def task_defaults(environ: Mapping[str, str]) -> dict[str, Any]:
    """Training defaults from config.json in the function's code directory, if there is one."""
    root = environ.get("LAMBDA_TASK_ROOT")
    if not root:
        return {}
    path = Path(root) / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EventError("config", f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise EventError("config", f"{path}: must hold a JSON object of training settings")
    return data


_INVOKER: Boto3Invoker | None = None


def default_invoker() -> Invoker:
    """The boto3 invoker, one per process (a boto3 client costs ~100 ms to build)."""
    global _INVOKER
    if _INVOKER is None:
        _INVOKER = Boto3Invoker()
    return _INVOKER


def _log(fields: Mapping[str, Any]) -> None:
    print(LOG_PREFIX + json.dumps(dict(fields), sort_keys=True, default=str), flush=True)


def _act_out(fault: InjectedFault) -> None:
    """Make an injected fault look like the failure it stands for."""
    _log({"fault": fault.action, "where": fault.where})
    if fault.action == "exit":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # a crash: no response, the runtime dies (Runtime.ExitError)
    if fault.action == "hang":
        while True:  # until Lambda's timeout kills the environment
            time.sleep(3600)


def handle(
    event: Any,
    context: Context,
    *,
    efs_root: str | os.PathLike[str] | None = None,
    invoker: Invoker | None = None,
    progress: ProgressTable | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """`handler` with its dependencies injectable (tests: a directory as EFS, a fake invoker)."""
    req = parse_event(event)
    _log(
        {
            "role": req.role,
            "run": req.run,
            "round": req.round,
            "worker": req.worker,
            **({} if req.shard is None else {"shard": req.shard}),
            "request_id": getattr(context, "aws_request_id", None),
        }
    )
    env = os.environ if environ is None else environ
    if efs_root is None:
        from lambda_runtime.sandbox import efs_path

        efs_root = efs_path(req.mount)
    ws = Workspace(efs_root, req.run, req.mount)
    inv = invoker or default_invoker()
    t0 = time.perf_counter()
    try:
        if req.role == "start":
            assert req.workers is not None
            result = run_start(
                ws,
                workers=req.workers,
                config=req.config,
                ctx=context,
                invoker=inv,
                progress=progress,
                defaults=task_defaults(env),
            )
        elif req.role == "worker":
            assert req.workers is not None and req.worker is not None
            assert req.epochsdone is not None
            result = run_worker(
                ws,
                worker=req.worker,
                workers=req.workers,
                epochsdone=req.epochsdone,
                round=req.round,
                ctx=context,
                invoker=inv,
            )
        elif req.role == "combine":
            assert req.workers is not None and req.epochsdone is not None
            result = run_combine(
                ws,
                workers=req.workers,
                epochsdone=req.epochsdone,
                round=req.round,
                ctx=context,
                invoker=inv,
                progress=progress,
            )
        elif req.role == "aggregate":
            assert req.workers is not None and req.shard is not None
            assert req.epochsdone is not None
            result = run_aggregate(
                ws,
                shard=req.shard,
                workers=req.workers,
                epochsdone=req.epochsdone,
                round=req.round,
                ctx=context,
                invoker=inv,
            )
        else:
            result = check_stalled(ws, inv, progress)
    except InjectedFault as fault:
        _act_out(fault)
        raise
    result["ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
    _log({"done": result, "request_id": getattr(context, "aws_request_id", None)})
    return result


def handler(event: Any, context: Context) -> dict[str, Any]:
    """The Lambda entry point (handler setting: `simulator.handler.handler`)."""
    return handle(event, context)


__all__ = ["LOG_PREFIX", "Request", "default_invoker", "handle", "handler", "parse_event"]
