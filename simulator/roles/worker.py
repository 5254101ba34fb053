"""The worker role: compute a share of the round once, record the arrival, maybe trigger combine.

With sharded aggregation the arrival goes to the worker's shard's set, and the caller that
completes it triggers that shard's aggregator (:func:`simulator.roles.combine.run_aggregate`)
instead of the combine.

A worker reads the round's weights (memory-mapped), takes its deterministic share of the data,
runs its mini-batch steps and publishes the result under a name fixed by (round, worker), so a
duplicate finds it and rewrites nothing. Before its deadline it stops early and publishes what it
has with its sample count (:class:`Deadline`), so no round is lost to Lambda's time limit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from simulator.aggregate import shard_of
from simulator.algorithms import Contribution, gradient_contribution, local_sgd_contribution
from simulator.data import batches
from simulator.invoke import (
    Context,
    Invoker,
    aggregate_event,
    combine_event,
    inject_fault,
    resolve_round,
    round_gate,
    target_function,
)
from simulator.models import Array
from simulator.run_state import RunState, load_run
from simulator.training_config import EventError, ceil_div
from simulator.workspace import Workspace


class Deadline:
    """`should_stop` for a worker: stop when the time left no longer covers a step and a publish.

    The reserve is ``safety_margin_ms + publish estimate + 2 x the longest step so far`` (the
    longest step of this process's previous invocation before the first step is measured).
    """

    def __init__(self, ctx: Context, reserve_ms: float, step_hint_ms: float | None) -> None:
        self.ctx = ctx
        self.reserve_ms = reserve_ms
        self.max_step_ms = step_hint_ms or 0.0
        self.stopped = False
        self._last: float | None = None

    def __call__(self) -> bool:
        """True when the worker must stop and publish now."""
        now = time.perf_counter()
        if self._last is not None:
            self.max_step_ms = max(self.max_step_ms, (now - self._last) * 1000.0)
        self._last = now
        if self.ctx.get_remaining_time_in_millis() < self.reserve_ms + 2.0 * self.max_step_ms:
            self.stopped = True
        return self.stopped


def run_worker(
    ws: Workspace,
    *,
    worker: int,
    workers: int,
    epochsdone: int,
    round: int | None,
    ctx: Context,
    invoker: Invoker,
) -> dict[str, Any]:
    """Compute and publish this worker's result once, record the arrival, maybe trigger combine."""
    state = load_run(ws)
    cfg, sched = state.config, state.schedule
    if not 0 <= worker < cfg.workers:
        raise EventError("workerno", f"must be in 0..{cfg.workers - 1}, got {worker}")
    r = resolve_round(sched, workers, round, epochsdone, cfg)
    out: dict[str, Any] = {"role": "worker", "run": ws.run, "round": r, "worker": worker}
    gated = round_gate(ws, r, out)
    if gated is not None:
        return gated
    computed = None
    ws.record_attempt(r, worker, ctx.aws_request_id)
    if not ws.has_result(r, worker):
        inject_fault(ws, cfg, "worker", "start", r, worker)
        c, info = _compute(ws, state, r, worker, ctx)
        inject_fault(ws, cfg, "worker", "before_publish", r, worker)
        ws.publish_result(r, c, info)
        computed = info
    inject_fault(ws, cfg, "worker", "after_publish", r, worker)
    combine_sent = aggregate_sent = False
    if cfg.sharded:
        # The worker joins its shard's set; whoever completes it triggers that shard's aggregator.
        shard = shard_of(worker, cfg.shard_count)
        added, size = ws.shard_arrivals(r, shard).add(str(worker))
        inject_fault(ws, cfg, "worker", "after_arrival", r, worker)
        need = len(cfg.shard_workers(shard))
        if size >= need and ws.claim(f"aggregate-{r}-{shard}", f"worker-{worker}"):
            invoker.invoke_async(target_function(cfg), aggregate_event(ws, sched, r, shard))
            aggregate_sent = True
    else:
        added, size = ws.arrivals(r).add(str(worker))
        inject_fault(ws, cfg, "worker", "after_arrival", r, worker)
        # Also tried by a duplicate that finds the set complete but unclaimed: the completing
        # caller may have died between its add and its claim.
        if size >= cfg.workers and ws.claim(f"combine-{r}", f"worker-{worker}"):
            invoker.invoke_async(target_function(cfg), combine_event(ws, sched, r))
            combine_sent = True
    result = {
        **out,
        "status": "computed" if computed else "duplicate",
        "samples": None if computed is None else computed["samples_done"],
        "partial": None if computed is None else computed["partial"],
        "arrived": added,
        "arrivals": size,
        "combine_invoked": combine_sent,
    }
    if cfg.sharded:
        result["aggregate_invoked"] = aggregate_sent
    return result


def _compute(
    ws: Workspace, state: RunState, r: int, worker: int, ctx: Context
) -> tuple[Contribution, dict[str, Any]]:
    cfg, sched, model, ds = state.config, state.schedule, state.model, state.dataset
    t0 = time.perf_counter()
    weights, _ = ws.read_weights(r, with_velocity=False)  # the combine applies momentum
    idx = state.shard(sched.epoch(r), worker)
    start = sched.start_step(r)
    planned = max(0, min(sched.steps_per_round, ceil_div(len(idx), cfg.batch_size) - start))
    nbytes = sum(w.nbytes for w in weights)
    publish_ms = 1000.0 * nbytes / (cfg.publish_mb_per_s * 1e6)
    deadline = Deadline(ctx, cfg.safety_margin_ms + publish_ms, state.step_ms)
    done = 0
    mid_round = any(f.role == "worker" and f.at == "mid_round" for f in cfg.faults)

    def counted() -> Iterator[tuple[Array, Array]]:
        nonlocal done
        for batch in batches(
            ds.x_train, ds.y_train, idx, cfg.batch_size, model.input_shape, start, planned
        ):
            if mid_round:
                inject_fault(ws, cfg, "worker", "mid_round", r, worker, step=done)
            done += 1  # counted when handed out: the contribution always uses a batch it gets
            yield batch

    if cfg.algorithm == "gradient_averaging":
        c = gradient_contribution(model, weights, counted(), worker, should_stop=deadline)
    else:
        c = local_sgd_contribution(model, weights, counted(), cfg.sgd, worker, should_stop=deadline)
    compute_ms = (time.perf_counter() - t0) * 1000.0
    if done:
        state.step_ms = deadline.max_step_ms or compute_ms / done
    info = {
        "round": r,
        "samples_done": c.samples,
        "steps": done,
        "steps_planned": planned,
        "partial": done < planned,
        "compute_ms": compute_ms,
        "request_id": ctx.aws_request_id,
    }
    return c, info


__all__ = ["Deadline", "run_worker"]
