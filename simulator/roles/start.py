"""The start role: create the run (config, dataset, initial weights) once, fan out round 0 once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from simulator.data import MANIFEST, get_dataset, prepare_on_efs
from simulator.invoke import Context, Invoker, fan_out, target_function
from simulator.progress import ProgressTable
from simulator.run_state import build_model, load_run, progress_for
from simulator.training_config import EventError, TrainingConfig
from simulator.workspace import Workspace


def run_start(
    ws: Workspace,
    *,
    workers: int,
    config: Mapping[str, Any] | None,
    ctx: Context,
    invoker: Invoker,
    progress: ProgressTable | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Create the run (config, data, initial weights) once and fan out round 0 once."""
    existing = ws.config_or_none()
    cfg = _resolve_config(existing, workers, config, defaults, ctx)
    if existing is not None and existing != cfg:
        raise EventError(
            "config", f"run {ws.run!r} already exists with another config: {_diff(existing, cfg)}"
        )
    if ws.mount != cfg.mount:
        raise EventError(
            "config.mount", f"must be the event's mount {ws.mount!r}, got {cfg.mount!r}"
        )
    failure = ws.failure()
    if failure is not None:
        return {"role": "start", "status": "failed", "reason": failure}
    dataset = None
    if not (ws.data_dir / MANIFEST).exists():
        try:
            dataset = get_dataset(cfg.dataset)
        except (ValueError, OSError) as exc:
            raise EventError("config.dataset", str(exc)) from exc
        build_model(cfg, dataset.input_shape, dataset.num_classes)  # checks model_kwargs
    # ---- from here on EFS is written; everything above only read and validated.
    won = ws.create_config(cfg)
    if won != cfg:
        raise EventError(
            "config", f"run {ws.run!r} already exists with another config: {_diff(won, cfg)}"
        )
    if dataset is not None:
        prepare_on_efs(dataset, ws.data_dir)
    state = load_run(ws)
    if not ws.has_weights(0) and not ws.claimed("fanout-0"):
        ws.publish_weights(0, state.model.init_weights(cfg.seed), None, {"round": 0, "init": True})
    table = progress or progress_for(ws, cfg)

    def record(won: bool, now: float) -> None:
        if won:
            table.run_started(
                ws.run,
                workers=cfg.workers,
                algorithm=cfg.algorithm,
                model=cfg.model,
                dataset=cfg.dataset,
                started_at=now,
            )
            table.round_started(ws.run, 0, epoch=0, workers=cfg.workers, started_at=now)

    sent = fan_out(ws, state, 0, invoker, "start", record)
    return {"role": "start", "status": "started" if sent else "duplicate", "run": ws.run}


def _diff(a: TrainingConfig, b: TrainingConfig) -> str:
    ja, jb = a.to_json(), b.to_json()
    return ", ".join(f"{k}: {ja[k]!r} != {jb[k]!r}" for k in ja if ja[k] != jb[k])


def _resolve_config(
    existing: TrainingConfig | None,
    workers: int,
    config: Mapping[str, Any] | None,
    defaults: Mapping[str, Any] | None,
    ctx: Context,
) -> TrainingConfig:
    if existing is not None and existing.workers != workers:
        raise EventError(
            "workers", f"must be {existing.workers}, the run's worker count, got {workers}"
        )
    if config is None and existing is not None:
        return existing  # a duplicate thesis-style start: the run's own config
    merged = {**(defaults or {}), **(config or {})}
    cfg = TrainingConfig.from_mapping(merged, workers=workers)
    # Fields the context fills in: taken from the existing run on a duplicate, so it compares equal.
    if cfg.function_name is None:
        name = existing.function_name if existing else getattr(ctx, "function_name", None)
        cfg = replace(cfg, function_name=name)
    if cfg.timeout_s is None:
        if existing is not None:
            cfg = replace(cfg, timeout_s=existing.timeout_s)
        else:
            remaining = ctx.get_remaining_time_in_millis()
            cfg = replace(cfg, timeout_s=max(1, min(900, round(remaining / 1000))))
    target_function(cfg)
    return cfg


__all__ = ["run_start"]
