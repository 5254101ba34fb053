"""The combine role: turn round r's results into weights r+1 once, then fan out or finish once.

Idempotent: if weights r+1 exist it only makes sure the next fan-out (or the finish) happened.
It aggregates sample-weighted, applies the update, publishes the next weights immutably (keeping
the ``history`` newest rounds), evaluates on held-out data, records progress and decides whether
to go on (epochs, max rounds, target loss or accuracy).

Sharded aggregation adds a stage before it, the aggregate role (:func:`run_aggregate`, event
``{"aggregate": true, "shard": s, "workers": N, "epochsdone": e, "round": r}``): aggregator ``s``
reads only its shard's worker results, publishes their partial sum first-wins under
``results/round-<r>/shard-<s>`` (:func:`simulator.aggregate.partial_sums`: a Contribution whose
worker id is ``s``), then adds ``s`` to the round's set of partials; whoever completes that set
(or finds it complete and the combine unclaimed) claims ``combine-<r>`` and invokes the combine,
which then reads the S partials instead of the N results. Each step is idempotent exactly like
the worker's: a duplicate finds the partial published and only re-records the arrival.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from simulator.aggregate import (
    combine_gradient_averaging,
    combine_model_averaging,
    partial_sums,
)
from simulator.algorithms import Contribution
from simulator.invoke import (
    Context,
    Invoker,
    combine_event,
    fan_out,
    inject_fault,
    resolve_round,
    round_gate,
    target_function,
)
from simulator.models import Array
from simulator.progress import ProgressTable
from simulator.run_state import RunState, load_plan, load_run, progress_for
from simulator.training_config import EventError, TrainingConfig
from simulator.workspace import Workspace, finite_or_none


def run_combine(
    ws: Workspace,
    *,
    workers: int,
    epochsdone: int,
    round: int | None,
    ctx: Context,
    invoker: Invoker,
    progress: ProgressTable | None = None,
) -> dict[str, Any]:
    """Combine round r into weights r+1 once, record progress, then fan out or finish once."""
    state = load_run(ws)
    cfg, sched = state.config, state.schedule
    r = resolve_round(sched, workers, round, epochsdone, cfg)
    out: dict[str, Any] = {"role": "combine", "run": ws.run, "round": r}
    failure = ws.failure()
    if failure is not None:
        return {**out, "status": "failed", "reason": failure}
    record = ws.weights_meta(r + 1)  # the record of combining round r, once it exists
    status = "duplicate"
    if record is None:
        if ws.round_done(r):
            return {**out, "status": "stale"}  # weights r+1 already pruned: long done
        if not ws.has_weights(r):
            raise EventError("round", f"round {r} of run {ws.run!r} has not started (no weights)")
        if cfg.sharded:
            members = ws.partial_arrivals(r).members()
            missing = [k for k in range(cfg.shard_count) if str(k) not in members]
            if missing:
                return {**out, "status": "waiting", "missing_shards": missing}
        else:
            members = ws.arrivals(r).members()
            missing = [i for i in range(cfg.workers) if str(i) not in members]
            if missing:
                return {**out, "status": "waiting", "missing": missing}
        inject_fault(ws, cfg, "combine", "start", r, None)
        record = _combine_round(ws, state, r)
        status = "combined"
    table = progress or progress_for(ws, cfg)
    if record["decision"] == "fail":
        fail_run(ws, table, r, str(record["reason"]))
        return {**out, "status": "failed", "reason": record["reason"]}
    inject_fault(ws, cfg, "combine", "after_publish", r, None)

    def record_progress(won: bool, now: float) -> None:
        # Whoever wins the next fan-out also opens the next round's row, in the same transaction.
        table.round_combined(
            ws.run,
            r,
            epoch=sched.epoch(r),
            epochs_done=record["epochs_done"],
            workers=cfg.workers,
            samples=record["samples"],
            train_loss=record["train_loss"],
            loss=record["loss"],
            accuracy=record["accuracy"],
            worker_ms_max=record["worker_ms_max"],
            worker_ms_mean=record["worker_ms_mean"],
            combine_ms=record["combine_ms"],
            combined_at=record["combined_at"],
            note=record["reason"] if record["decision"] != "continue" else None,
            next_round=(r + 1, sched.epoch(r + 1), now) if won else None,
        )

    # Pruning comes after the fan-out, off the next round's critical path: its workers run
    # while old rounds are deleted. Safe at any point after weights r+1 are published (what it
    # deletes is older than what anyone still reads; see Workspace.round_done), and a combine
    # that dies before it leaves the work to the next round's prune, which takes every round
    # below its cutoff.
    if record["decision"] == "continue":
        sent = fan_out(ws, state, r + 1, invoker, f"combine-{r}", record_progress)
        ws.prune(r + 1, cfg.history)
        return {**out, "status": status, "next_round_invoked": sent, "loss": record["loss"]}
    record_progress(False, time.time())
    _finish(ws, state, r, record, table)
    ws.prune(r + 1, cfg.history)
    return {**out, "status": "finished", "reason": record["reason"], "loss": record["loss"]}


def _combine_round(ws: Workspace, state: RunState, r: int) -> dict[str, Any]:
    cfg, sched = state.config, state.schedule
    t0 = time.perf_counter()
    weights, velocity = ws.read_weights(r)
    contribs: list[Contribution] = []
    if cfg.sharded:
        # Only the S partials: the shard aggregators already read the N results.
        metas = []
        for k in range(cfg.shard_count):
            c, meta = ws.read_partial(r, k)
            contribs.append(c)
            metas.append(meta)
        worker_ms_max = max(float(m["worker_ms_max"]) for m in metas)
        worker_ms_mean = sum(float(m["worker_ms_sum"]) for m in metas) / cfg.workers
        zero_sample_workers = sum(int(m["zero_sample_workers"]) for m in metas)
    else:
        worker_ms: list[float] = []
        for i in range(cfg.workers):
            c, meta = ws.read_result(r, i)
            contribs.append(c)
            worker_ms.append(float(meta.get("compute_ms", 0.0)))
        worker_ms_max = max(worker_ms)
        worker_ms_mean = sum(worker_ms) / len(worker_ms)
        zero_sample_workers = sum(1 for c in contribs if c.samples == 0)
    samples = sum(c.samples for c in contribs)
    if samples == 0:
        return {
            "decision": "fail",
            "reason": f"round {r}: no worker processed any sample "
            "(is the timeout shorter than one step plus safety_margin_ms?)",
        }
    new_velocity: list[Array] | None = None
    if cfg.algorithm == "gradient_averaging":
        new_weights, new_velocity, train_loss = combine_gradient_averaging(
            weights, velocity, contribs, cfg.sgd
        )
    else:
        new_weights, train_loss = combine_model_averaging(contribs, dtype=weights[0].dtype)
    decision, reason, loss, accuracy = _decide(state, r, new_weights)
    record = {
        "round": r,
        "epoch": sched.epoch(r),
        "epochs_done": sched.epochs_done_after(r),
        "samples": samples,
        "partial_workers": zero_sample_workers or None,
        "train_loss": finite_or_none(train_loss),
        "loss": finite_or_none(loss),
        "accuracy": accuracy,
        "decision": decision,
        "reason": reason,
        "worker_ms_max": worker_ms_max,
        "worker_ms_mean": worker_ms_mean,
        "combine_ms": (time.perf_counter() - t0) * 1000.0,
        "combined_at": time.time(),
    }
    ws.publish_weights(r + 1, new_weights, new_velocity, record)
    winner = ws.weights_meta(r + 1)
    assert winner is not None
    return winner


def run_aggregate(
    ws: Workspace,
    *,
    shard: int,
    workers: int,
    epochsdone: int,
    round: int | None,
    ctx: Context,
    invoker: Invoker,
) -> dict[str, Any]:
    """Sum shard `shard`'s results of a round into its partial once, record it, maybe combine."""
    plan = load_plan(ws)  # config and schedule only: an aggregator never needs the model
    cfg, sched = plan.config, plan.schedule
    if not cfg.sharded:
        raise EventError(
            "aggregate", f"run {ws.run!r} uses aggregation {cfg.aggregation!r}, not 'sharded'"
        )
    if not 0 <= shard < cfg.shard_count:
        raise EventError("shard", f"must be in 0..{cfg.shard_count - 1}, got {shard}")
    r = resolve_round(sched, workers, round, epochsdone, cfg)
    out: dict[str, Any] = {"role": "aggregate", "run": ws.run, "round": r, "shard": shard}
    gated = round_gate(ws, r, out)
    if gated is not None:
        return gated
    status = "duplicate"
    if not ws.has_partial(r, shard):
        members = ws.shard_arrivals(r, shard).members()
        missing = [i for i in cfg.shard_workers(shard) if str(i) not in members]
        if missing:
            return {**out, "status": "waiting", "missing": missing}
        inject_fault(ws, cfg, "aggregate", "start", r, shard)
        _aggregate_shard(ws, cfg, r, shard)
        status = "aggregated"
    inject_fault(ws, cfg, "aggregate", "after_publish", r, shard)
    added, size = ws.partial_arrivals(r).add(str(shard))
    inject_fault(ws, cfg, "aggregate", "after_arrival", r, shard)
    combine_sent = False
    # Also tried by a duplicate that finds the set complete but unclaimed (see run_worker).
    if size >= cfg.shard_count and ws.claim(f"combine-{r}", f"aggregate-{shard}"):
        invoker.invoke_async(target_function(cfg), combine_event(ws, sched, r))
        combine_sent = True
    return {
        **out,
        "status": status,
        "arrived": added,
        "arrivals": size,
        "combine_invoked": combine_sent,
    }


def _aggregate_shard(ws: Workspace, cfg: TrainingConfig, r: int, shard: int) -> None:
    t0 = time.perf_counter()
    contribs: list[Contribution] = []
    worker_ms: list[float] = []
    for i in cfg.shard_workers(shard):
        c, meta = ws.read_result(r, i)
        contribs.append(c)
        worker_ms.append(float(meta.get("compute_ms", 0.0)))
    (partial,) = partial_sums(contribs, cfg.shard_count, cfg.algorithm)
    meta = {
        "round": r,
        "shard": shard,
        "workers": len(contribs),
        "zero_sample_workers": sum(1 for c in contribs if c.samples == 0),
        "worker_ms_max": max(worker_ms),
        "worker_ms_sum": sum(worker_ms),
        "aggregate_ms": (time.perf_counter() - t0) * 1000.0,
    }
    ws.publish_partial(r, partial, meta)  # first wins; a duplicate's bytes would be identical


def _decide(
    state: RunState, r: int, weights: Sequence[Array]
) -> tuple[str, str | None, float | None, float | None]:
    cfg, sched = state.config, state.schedule
    done = r + 1
    reason = None
    if cfg.max_rounds is not None and done >= cfg.max_rounds:
        reason = f"max_rounds reached ({done} rounds)"
    elif cfg.epochs is not None and done >= cfg.epochs * sched.rounds_per_epoch:
        reason = f"epochs reached ({cfg.epochs} epochs, {done} rounds)"
    loss = accuracy = None
    targets = cfg.target_loss is not None or cfg.target_accuracy is not None
    if reason is not None or done % cfg.eval_every == 0 or targets:
        loss, accuracy = evaluate(state, weights)
    if loss is not None and not math.isfinite(loss):
        return "fail", f"round {r}: diverged (held-out loss is {loss})", loss, accuracy
    if (
        reason is None
        and cfg.target_loss is not None
        and loss is not None
        and loss <= cfg.target_loss
    ):
        reason = f"target_loss reached ({loss:.6g} <= {cfg.target_loss})"
    if (
        reason is None
        and cfg.target_accuracy is not None
        and accuracy is not None
        and accuracy >= cfg.target_accuracy
    ):
        reason = f"target_accuracy reached ({accuracy:.6g} >= {cfg.target_accuracy})"
    return ("continue" if reason is None else "stop"), reason, loss, accuracy


def evaluate(state: RunState, weights: Sequence[Array]) -> tuple[float | None, float | None]:
    """(mean loss, accuracy) on the held-out set (or its first eval_samples), None if empty."""
    loss_sum = 0.0
    correct = 0
    n = 0
    for xb, yb in state.test_batches():
        k = len(yb)
        loss, acc = state.model.evaluate(weights, xb, yb, batch_size=max(1, k))
        loss_sum += loss * k
        correct += round(acc * k)
        n += k
    if n == 0:
        return None, None
    return loss_sum / n, correct / n


def _finish(
    ws: Workspace, state: RunState, r: int, record: Mapping[str, Any], table: ProgressTable
) -> None:
    cfg = state.config
    if ws.final_summary() is None:
        weights, _ = ws.read_weights(r + 1)
        summary = {
            "run": ws.run,
            "status": "finished",
            "reason": record["reason"],
            "rounds": r + 1,
            "epochs_done": record["epochs_done"],
            "loss": record["loss"],
            "accuracy": record["accuracy"],
            "train_loss": record["train_loss"],
            "workers": cfg.workers,
            "algorithm": cfg.algorithm,
            "model": cfg.model,
            "dataset": cfg.dataset,
            "finished_at": time.time(),
        }
        ws.publish_final(weights, summary)
    final = ws.final_summary()
    assert final is not None
    table.run_finished(
        ws.run,
        status="finished",
        reason=str(final["reason"]),
        at=float(final["finished_at"]),
        rounds_done=int(final["rounds"]),
        epochs_done=final["epochs_done"],
        loss=final["loss"],
        accuracy=final["accuracy"],
    )


def fail_run(ws: Workspace, table: ProgressTable, r: int, reason: str) -> str:
    """Mark the run failed (first reason wins) in failed.json and the progress table."""
    reason = ws.mark_failed(reason)
    now = time.time()
    table.round_failed(ws.run, r, reason=reason, at=now)
    table.run_finished(ws.run, status="failed", reason=reason, at=now)
    return reason


__all__ = ["evaluate", "fail_run", "run_aggregate", "run_combine"]
