"""The watchdog (the ``check`` event): a stalled round is rescued, or the run fails with a reason.

Liveness rule (:func:`check_stalled`, run by the ``check`` event: locally by the runner every
few seconds, on AWS by an EventBridge schedule whose target input is the constant
``{"check": true, "run": "<run>"}``): a round is *stalled* when ``stall_after_s``
(default ``(max_retry_attempts + 1) * timeout_s + 240`` s: every Lambda attempt timed out plus
its 1 and 2 minute retry delays and a minute of slack) has passed since its fan-out or its last
rescue without the next weights appearing. A stalled round is rescued by re-invoking its missing
workers (or its combine, if all arrived; or the combine or start that published weights but
died before fanning out), at most ``max_rescues`` times; after that the run is marked failed
with the reason, e.g. ``round 3: worker 5 never arrived after 3 attempts``, in ``failed.json``
and the progress table.
"""

from __future__ import annotations

import time
from typing import Any

from simulator.invoke import (
    Boto3Invoker,
    Invoker,
    aggregate_event,
    combine_event,
    invoke_all,
    start_event,
    target_function,
    worker_event,
)
from simulator.progress import ProgressTable
from simulator.roles.combine import fail_run
from simulator.run_state import load_plan, progress_for
from simulator.training_config import Schedule, TrainingConfig
from simulator.workspace import Workspace


def _rescue_count(ws: Workspace, target: str) -> tuple[int, float | None]:
    """How many rescues of `target` were made, and when the last one was."""
    k, last = 0, None
    while True:
        t = ws.claim_time(f"rescue-{target}-{k + 1}")
        if t is None:
            return k, last
        k, last = k + 1, t


def check_stalled(
    run: Workspace,
    invoker: Invoker | None = None,
    progress: ProgressTable | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Detect a stalled run and rescue it once per stall period, or fail it (module docstring)."""
    ws = run
    now = time.time() if now is None else now
    cfg = ws.config_or_none()
    out: dict[str, Any] = {"role": "check", "run": ws.run}
    if cfg is None:
        return {**out, "status": "no_run"}
    failure = ws.failure()
    if failure is not None:
        return {**out, "status": "failed", "reason": failure}
    if ws.final_summary() is not None:
        return {**out, "status": "finished"}
    invoker = invoker or Boto3Invoker()
    stall = cfg.stall_after()
    rounds = ws.weight_rounds()
    if not rounds:
        return _rescue(
            ws,
            cfg,
            "start",
            ws.config_path.stat().st_mtime,
            now,
            stall,
            out,
            lambda: invoker.invoke_async(target_function(cfg), start_event(ws, cfg.workers)),
            "start never published the initial weights",
            progress,
            -1,
        )
    r = rounds[-1]
    meta = ws.weights_meta(r) or {}
    if not ws.claimed(f"fanout-{r}") or meta.get("decision") == "stop":
        # Weights r exist but nobody fanned out (or finished): the previous combine (or the
        # start) died after publishing. Re-running it is idempotent.
        since = ws.weights_dir(r).stat().st_mtime
        sched = load_plan(ws).schedule

        def redo() -> None:
            if r == 0:
                invoker.invoke_async(target_function(cfg), start_event(ws, cfg.workers))
            else:
                invoker.invoke_async(target_function(cfg), combine_event(ws, sched, r - 1))

        what = "start" if r == 0 else f"combine of round {r - 1}"
        return _rescue(
            ws,
            cfg,
            f"{r}-next",
            since,
            now,
            stall,
            out,
            redo,
            f"round {r}: {what} never fanned out or finished",
            progress,
            r,
        )
    sched = load_plan(ws).schedule
    arrived = ws.arrived_workers(r, cfg)
    missing = [i for i in range(cfg.workers) if i not in arrived]
    since = ws.claim_time(f"fanout-{r}") or now
    if not missing and cfg.sharded:
        partials = ws.partial_arrivals(r).members()
        shards = [k for k in range(cfg.shard_count) if str(k) not in partials]
        if shards:
            return _rescue_shards(
                ws, cfg, sched, r, shards, since, now, stall, out, invoker, progress
            )

    def rescue() -> None:
        if missing:
            invoke_all(
                invoker,
                target_function(cfg),
                [worker_event(ws, sched, r, i) for i in missing],
            )
        else:
            ws.claim(f"combine-{r}", "watchdog")
            invoker.invoke_async(target_function(cfg), combine_event(ws, sched, r))

    if missing:
        first = missing[0]
        tries = ws.attempts(r, first)
        reason = (
            f"round {r}: worker {first} never arrived after {tries} "
            f"attempt{'' if tries == 1 else 's'}"
        )
        if len(missing) > 1:
            reason += f" (missing workers: {', '.join(map(str, missing))})"
    else:
        reason = f"round {r}: all workers arrived but the combine never completed"
        # The combine's stage starts when its trigger claimed it, not at the fan-out.
        since = max(since, ws.claim_time(f"combine-{r}") or since)
    report = _rescue(ws, cfg, str(r), since, now, stall, out, rescue, reason, progress, r)
    report["missing"] = missing
    return report


def _rescue_shards(
    ws: Workspace,
    cfg: TrainingConfig,
    sched: Schedule,
    r: int,
    shards: list[int],
    fanned_out: float,
    now: float,
    stall: float,
    out: dict[str, Any],
    invoker: Invoker,
    progress: ProgressTable | None,
) -> dict[str, Any]:
    """Re-invoke the aggregators of `shards` (all workers arrived, their partials did not)."""
    # A stage's clock starts when it could start: the last of its workers arrived and claimed
    # the aggregation; the round's own rescues (of workers) restart it too.
    claimed = [ws.claim_time(f"aggregate-{r}-{k}") for k in shards]
    _, last_round_rescue = _rescue_count(ws, str(r))
    since = max([fanned_out, last_round_rescue or fanned_out, *[t for t in claimed if t]])

    def rescue() -> None:
        for k in shards:
            ws.claim(f"aggregate-{r}-{k}", "watchdog")  # so no late worker sends it again
        invoke_all(
            invoker, target_function(cfg), [aggregate_event(ws, sched, r, k) for k in shards]
        )

    reason = (
        f"round {r}: all workers arrived but the aggregation of "
        f"shard{'' if len(shards) == 1 else 's'} {', '.join(map(str, shards))} never completed"
    )
    report = _rescue(ws, cfg, f"{r}-shards", since, now, stall, out, rescue, reason, progress, r)
    report["missing"] = []
    report["missing_shards"] = shards
    return report


def _rescue(
    ws: Workspace,
    cfg: TrainingConfig,
    target: str,
    since: float,
    now: float,
    stall: float,
    out: dict[str, Any],
    action: Any,
    reason: str,
    progress: ProgressTable | None,
    round: int,
) -> dict[str, Any]:
    count, last = _rescue_count(ws, target)
    since = max(since, last or since)
    if now - since < stall:
        return {**out, "status": "running", "round": round, "idle_s": max(0.0, now - since)}
    if count >= cfg.max_rescues:
        table = progress or progress_for(ws, cfg)
        reason = fail_run(ws, table, max(round, 0), reason)
        return {**out, "status": "failed", "round": round, "reason": reason}
    if not ws.claim(f"rescue-{target}-{count + 1}", f"watchdog@{now}"):
        return {**out, "status": "rescuing", "round": round}  # another watchdog just did
    action()
    return {**out, "status": "rescued", "round": round, "rescue": count + 1, "reason": reason}


__all__ = ["check_stalled"]
