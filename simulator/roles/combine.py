"""The combine role: turn round r's results into weights r+1 once, then fan out or finish once.

Idempotent: if weights r+1 exist it only makes sure the next fan-out (or the finish) happened.
It aggregates sample-weighted, applies the update, publishes the next weights immutably (keeping
the ``history`` newest rounds), evaluates on held-out data, records progress and decides whether
to go on (epochs, max rounds, target loss or accuracy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from simulator.aggregate import combine_gradient_averaging, combine_model_averaging
from simulator.algorithms import Contribution
from simulator.invoke import Context, Invoker, fan_out, inject_fault, resolve_round
from simulator.models import Array
from simulator.progress import ProgressTable
from simulator.run_state import RunState, load_run, progress_for
from simulator.training_config import EventError
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
    worker_ms: list[float] = []
    for i in range(cfg.workers):
        c, meta = ws.read_result(r, i)
        contribs.append(c)
        worker_ms.append(float(meta.get("compute_ms", 0.0)))
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
        "partial_workers": sum(1 for c in contribs if c.samples == 0) or None,
        "train_loss": finite_or_none(train_loss),
        "loss": finite_or_none(loss),
        "accuracy": accuracy,
        "decision": decision,
        "reason": reason,
        "worker_ms_max": max(worker_ms),
        "worker_ms_mean": sum(worker_ms) / len(worker_ms),
        "combine_ms": (time.perf_counter() - t0) * 1000.0,
        "combined_at": time.time(),
    }
    ws.publish_weights(r + 1, new_weights, new_velocity, record)
    winner = ws.weights_meta(r + 1)
    assert winner is not None
    return winner


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


__all__ = ["evaluate", "fail_run", "run_combine"]
