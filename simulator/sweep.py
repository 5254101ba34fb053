"""A sweep: one job run over lists of settings (workers, memory, timeout, ...), compared.

Every combination of the listed values is one run in ``<out>/<label>/`` (a full run directory).
Each setting gets an outcome:

    ok            finished, no invocation failed
    ok*           finished after failed invocations were retried or rescued
    oom           an invocation ran out of memory (the run stops there: fail_fast)
    timeout       an invocation timed out (likewise)
    failed        the run failed for another reason (the reason is in the table)
    exceeds-host  not run: this machine cannot hold its execution environments at once
    error         not run: the settings are invalid together (the message says why)

The best setting is the ``ok``/``ok*`` one with the smallest objective: predicted time on Lambda
(default), cost, or final held-out loss. ``sweep.json``, ``sweep.csv``, ``sweep.md`` and
``sweep.png`` hold the table and plots.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simulator.run_setup import ENV_MB_GUESS, HostCapacityError, capacity_problem
from simulator.runner import NullSink, ProgressSink, Runner
from simulator.settings import SettingsError, flag_of, merge

OBJECTIVES = {"time": "predicted_s", "cost": "cost_usd", "loss": "final_loss"}
OK_OUTCOMES = ("ok", "ok*")


@dataclass
class SweepPoint:
    """One setting of a sweep and how it went."""

    index: int
    label: str
    values: dict[str, Any]
    outcome: str = "pending"
    reason: str | None = None
    out_dir: str | None = None
    predicted_s: float | None = None
    wall_s: float | None = None
    lambda_s: float | None = None
    cost_usd: float | None = None
    final_loss: float | None = None
    final_accuracy: float | None = None
    rounds: int | None = None
    steps_per_round: float | None = None
    peak_memory_mb: float | None = None
    invocations: int | None = None
    timeouts: int | None = None
    ooms: int | None = None
    best: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class SweepResult:
    """All points, the best one, and where the table is."""

    points: list[SweepPoint]
    best: int | None
    out_dir: Path
    objective: str
    files: dict[str, str] = field(default_factory=dict)

    @property
    def any_ok(self) -> bool:
        """At least one setting finished."""
        return any(p.outcome in OK_OUTCOMES for p in self.points)


def expand(lists: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the listed values, the first setting varying slowest."""
    names = list(lists)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*lists.values())]


def label_of(values: Mapping[str, Any]) -> str:
    """``workers=4,memory=2048`` -> ``workers4-memory2048`` (a directory name)."""
    if not values:
        return "base"
    return "-".join(f"{k.replace('_', '')}{v}" for k, v in values.items()).replace("/", "_")


def _outcome(report: Mapping[str, Any]) -> tuple[str, str | None]:
    inv = report["invocations"]
    status, reason = report["run"]["status"], report["run"]["reason"]
    if status == "finished":
        return ("ok" if inv["failed"] == 0 else "ok*"), None
    if inv["oom"]:
        return "oom", reason
    if inv["timeouts"]:
        return "timeout", reason
    return "failed", reason


def _fill(point: SweepPoint, report: Mapping[str, Any]) -> None:
    point.outcome, point.reason = _outcome(report)
    tm, tr, inv = report["time"], report["training"], report["invocations"]
    point.predicted_s = tm["predicted_s"] if tm.get("predicted_finished") else None
    point.wall_s, point.lambda_s = tm["wall_s"], tm["lambda_s"]
    point.cost_usd = report["cost"]["total_usd"]
    point.final_loss, point.final_accuracy = tr["final_loss"], tr["final_accuracy"]
    point.rounds = tr["rounds"]
    st = report["settings"]
    curve = tr["curve"]
    if curve:
        per_round = [
            c["samples"] / (st["workers"] * st["batch_size"]) for c in curve if c["samples"]
        ]
        point.steps_per_round = sum(per_round) / len(per_round) if per_round else 0.0
    res = report["resources"]
    point.peak_memory_mb = max((r["memory_peak_mb"] for r in res.values()), default=None)
    point.invocations, point.timeouts, point.ooms = inv["total"], inv["timeouts"], inv["oom"]


def run_sweep(
    file_values: Mapping[str, Any],
    flag_values: Mapping[str, Any],
    lists: Mapping[str, Sequence[Any]],
    out_dir: Path,
    *,
    objective: str = "time",
    source: str | None = None,
    sink_for: Callable[[SweepPoint], ProgressSink] | None = None,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> SweepResult:
    """Run every combination; write the table and plots into `out_dir`."""
    if objective not in OBJECTIVES:
        raise SettingsError(
            "objective", f"must be one of {', '.join(OBJECTIVES)}, got {objective!r}"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SettingsError("out", f"{str(out_dir)!r} is not empty; choose a new directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    points = [SweepPoint(i, label_of(v), v) for i, v in enumerate(expand(lists))]
    peaks: dict[str, float] = {}  # model -> largest environment seen so far (MB)
    for point in points:
        values = {**flag_values, **point.values}
        values.setdefault("fail_fast", file_values.get("fail_fast", True))
        values["out"] = str(out_dir / point.label)
        try:
            settings = merge(file_values, values, source)
        except SettingsError as exc:
            point.outcome, point.reason = "error", str(exc)
            _done(point, on_point)
            continue
        env_mb = peaks.get(settings.model, ENV_MB_GUESS.get(settings.model))
        problem = capacity_problem(settings, env_mb)
        if problem is not None:
            point.outcome, point.reason = "exceeds-host", problem
            _done(point, on_point)
            continue
        try:
            sink = sink_for(point) if sink_for is not None else NullSink()
            run = Runner(settings, sink, check_capacity=False).run()
        except (SettingsError, HostCapacityError) as exc:
            point.outcome, point.reason = "error", str(exc)
            _done(point, on_point)
            continue
        point.out_dir = str(run.out_dir)
        _fill(point, run.report)
        if point.peak_memory_mb is not None:
            peaks[settings.model] = max(peaks.get(settings.model, 0.0), point.peak_memory_mb)
        _done(point, on_point)
    best = pick_best(points, objective)
    if best is not None:
        points[best].best = True
    result = SweepResult(points, best, out_dir, objective)
    result.files = write_tables(result, lists)
    return result


def _done(point: SweepPoint, on_point: Callable[[SweepPoint], None] | None) -> None:
    if on_point is not None:
        on_point(point)


def pick_best(points: Sequence[SweepPoint], objective: str) -> int | None:
    """Index of the finished point with the smallest objective (ties: the earlier one)."""
    key = OBJECTIVES[objective]
    ok = [p for p in points if p.outcome in OK_OUTCOMES and getattr(p, key) is not None]
    if not ok:
        return None
    return min(ok, key=lambda p: (getattr(p, key), p.index)).index


COLUMNS = (
    ("label", "setting"),
    ("outcome", "outcome"),
    ("predicted_s", "predicted s"),
    ("wall_s", "laptop s"),
    ("cost_usd", "cost $"),
    ("final_loss", "loss"),
    ("final_accuracy", "accuracy"),
    ("rounds", "rounds"),
    ("steps_per_round", "steps/round"),
    ("peak_memory_mb", "peak MB"),
    ("reason", "reason"),
)


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if key == "cost_usd":
            return f"{value:.6f}"
        if key == "final_accuracy":
            return f"{value:.2%}"
        return f"{value:.3f}" if key == "final_loss" else f"{value:.2f}"
    return str(value)


def table_rows(result: SweepResult) -> list[list[str]]:
    """The table as text cells (the best setting's label starred)."""
    rows = []
    for p in result.points:
        cells = []
        for key, _ in COLUMNS:
            cell = _cell(getattr(p, key), key)
            if key == "label" and p.best:
                cell = f"* {cell}"
            cells.append(cell)
        rows.append(cells)
    return rows


def write_tables(result: SweepResult, lists: Mapping[str, Sequence[Any]]) -> dict[str, str]:
    """sweep.json, sweep.csv, sweep.md, sweep.png in the sweep's directory."""
    out = result.out_dir
    doc = {
        "schema": "lambda-efs-sim/sweep",
        "schema_version": 1,
        "objective": result.objective,
        "swept": {flag_of(k): list(v) for k, v in lists.items()},
        "best": result.best,
        "points": [p.to_json() for p in result.points],
    }
    (out / "sweep.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    with open(out / "sweep.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([k for k, _ in COLUMNS] + ["best"])
        for p in result.points:
            writer.writerow(
                [getattr(p, k) if getattr(p, k) is not None else "" for k, _ in COLUMNS] + [p.best]
            )
    header = [name for _, name in COLUMNS]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table_rows(result)]
    md.append("")
    md.append(
        f"`*` best by {result.objective} ({OBJECTIVES[result.objective]}) among finished settings."
    )
    (out / "sweep.md").write_text("\n".join(md) + "\n")
    files = {"json": "sweep.json", "csv": "sweep.csv", "table": "sweep.md"}
    from simulator.plots import plot_sweep

    title = "sweep of " + ", ".join(flag_of(k) for k in lists) + f" (best by {result.objective})"
    try:
        plot_sweep([p.to_json() for p in result.points], result.best, out / "sweep.png", title)
    except ImportError:  # matplotlib draws the plot; the table is complete without it
        return files
    return {**files, "plot": "sweep.png"}


__all__ = [
    "OBJECTIVES",
    "SweepPoint",
    "SweepResult",
    "expand",
    "label_of",
    "pick_best",
    "run_sweep",
    "table_rows",
    "write_tables",
]
