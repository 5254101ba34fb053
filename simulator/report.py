"""The run report: numbers from the ledger, the logs and the progress table; summary and files.

:func:`build_report` reads a finished run's output directory and returns the ``report.json``
document; :func:`write_report` writes it with ``summary.txt`` and the plots. Both work on any
finished run (``python -m simulator report DIR``): everything is recomputed from the artifacts.

Output directory::

    settings.json          the resolved RunSettings
    run.json               what only the runner saw (times, throttles, rescues, host, EFS sizes)
    lambda/invocations.jsonl   one billing record per invocation (lambda_runtime's ledger)
    lambda/logs/train/*.log    the Lambda log streams, one per execution environment
    progress.sqlite        the progress table (schema in simulator.progress)
    model/                 the final model: array-<k>.npy and summary.json
    report.json            this document
    summary.txt            the summary as printed
    curves.png, timeline.png

``report.json`` schema (``schema_version`` 1; times in seconds, sizes in MB unless named)::

    schema, schema_version
    run:          id, status ('finished'|'failed'), reason, out_dir, function, started_at (Unix s)
    settings:     the RunSettings
    training:     rounds (combined), rounds_planned, epochs_done, final_loss, final_accuracy,
                  final_train_loss, curve: [{round, epoch, epochs_done, samples, train_loss, loss,
                  accuracy, worker_ms_max, combine_ms, t_s}]
    time:         wall_s (laptop: start invoke to the final combine's end), runner_wall_s,
                  lambda_s (sum of Init + Duration on the Lambda clock), predicted_s (real
                  Lambda, critical path), predicted_local_s (same layout on this machine's
                  measured overheads), efs_mode
    invocations:  total, cold, warm, failed, retried, throttled, timeouts, oom, crashes, errors,
                  rescues, unattributed, by_role: {role: {count, cold, failed, retried,
                  lambda_s, billed_ms}}
    phases:       [{phase, critical_path_s, all_invocations_s}]  (predicted on real Lambda)
    prediction:   aws: {platform, total_s, finished, critical_path_phases_s,
                  all_invocations_phases_s, efs_read_bytes, efs_write_bytes, critical_path},
                  local: {...same without critical_path}
    cost:         lambda: {requests, request_usd, billed_ms, gb_s, duration_usd, ephemeral_gb_s,
                  ephemeral_usd, total_usd, architecture}, efs: {mode, stored_gb, storage_usd,
                  read_gb, write_gb, transfer_usd, total_usd}, total_usd   (us-east-1, no free
                  tier; EFS storage prorated over the predicted run time)
    resources:    {role: {memory_peak_mb, memory_limit_mb, memory_fraction, tmp_peak_mb,
                  tmp_limit_mb, tmp_fraction}}
    warnings:     [text]       e.g. a role within 10% of its memory or /tmp limit
    timeline:     [{request_id, attempt, role, round, worker, env, cold, status, error_type,
                  start_s, end_s, init_ms, duration_ms, billed_ms, max_memory_mb, tmp_peak_mb,
                  predicted_start_s, predicted_end_s, rescue}]  (start_s: laptop seconds since
                  the start invoke; rescue: a watchdog's new request after a failed one)
    checks:       {logs_agree, report_lines, ledger_records, billed_ms_logs, billed_ms_ledger,
                  differences: [text]}
    host:         cores, memory_mb, mechanisms
    files:        {name: relative path}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lambda_runtime import billing
from lambda_runtime.billing import InvocationRecord
from simulator.platform import GIB, RunShape, aws_platform
from simulator.predict import Invocation, Prediction, calibrated_local_platform, predict
from simulator.run_logs import (
    FUNCTION,
    Attributed,
    attribute,
    check_logs,
    read_logs,
    to_invocations,
)

SCHEMA = "lambda-efs-sim/report"
SCHEMA_VERSION = 1
LIMIT_WARNING_FRACTION = 0.9
CONTENTION_WARNING_FRACTION = 0.25
HOURS_PER_MONTH = 730.0  # AWS prorates GB-month charges over 730 hours
ROLES = ("start", "worker", "combine")

# ------------------------------------------------------------------------------------------
# The report


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def _progress_rows(out: Path, run_id: str) -> list[Any]:
    from simulator.progress import SqliteProgressTable

    path = out / "progress.sqlite"
    if not path.exists():
        return []
    return SqliteProgressTable(path).rounds(run_id)


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def build_report(out_dir: str | Path) -> dict[str, Any]:
    """The report.json document of the run in `out_dir` (recomputed from its artifacts)."""
    out = Path(out_dir)
    settings = _read_json(out / "settings.json")
    run = _read_json(out / "run.json")
    if not settings or not run:
        raise FileNotFoundError(
            f"{out}: not a finished run directory (settings.json and run.json are written by "
            "'python -m simulator run')"
        )
    lambda_dir = out / "lambda"
    with billing.Ledger(lambda_dir) as ledger:
        recs = ledger.records(FUNCTION)
    facts = read_logs(lambda_dir)
    items = attribute(recs, facts)
    t0 = float(run.get("start_invoked_at") or (min((r.start_epoch_s for r in recs), default=0.0)))
    shape = RunShape(**run["shape"]) if run.get("shape") else _empty_shape(int(settings["workers"]))
    invs = to_invocations(items, shape, t0)
    stall = float(run.get("aws_stall_after_s") or 0.0)
    aws = predict(
        invs,
        aws_platform(str(settings.get("efs_mode", "elastic")), shape.stored_bytes),
        workers=shape.workers,
        stall_after_s=stall,
    )
    local_platform = calibrated_local_platform(
        invs, shape.workers, float(settings.get("time_scale", 1.0))
    )
    local = predict(
        invs,
        local_platform,
        workers=shape.workers,
        stall_after_s=float(run.get("local_stall_after_s") or 0.0),
    )
    rows = _progress_rows(out, str(settings.get("run_id", "train")))
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "run": {
            "id": settings.get("run_id"),
            "status": run.get("status"),
            "reason": run.get("reason"),
            "out_dir": str(out.resolve()),
            "function": FUNCTION,
            "started_at": run.get("start_invoked_at"),
        },
        "settings": settings,
        "training": _training(rows, run, t0),
        "time": _time(run, items, aws, local, t0, settings),
        "invocations": _invocations(items, run),
        "phases": [
            {"phase": p, "critical_path_s": aws.phases_s[p], "all_invocations_s": aws.totals_s[p]}
            for p in aws.phases_s
        ],
        "prediction": {"aws": aws.to_json(), "local": local.to_json(with_path=False)},
        "cost": _cost(recs, aws, shape, settings),
        "resources": _resources(items, settings),
        "warnings": [],
        "timeline": _timeline(items, invs, aws),
        "checks": check_logs(recs, facts),
        "host": run.get("host", {}),
        "files": {
            "settings": "settings.json",
            "run": "run.json",
            "ledger": f"lambda/{billing.LEDGER_FILE}",
            "logs": f"lambda/logs/{FUNCTION}",
            "progress": "progress.sqlite",
            "model": "model",
            "curves": "curves.png",
            "timeline": "timeline.png",
            "summary": "summary.txt",
        },
    }
    report["warnings"] = _warnings(report, run)
    return report


def _empty_shape(workers: int) -> RunShape:
    return RunShape(workers, 0, 0, False, 0, 0, 0, 0)


def _training(rows: Sequence[Any], run: Mapping[str, Any], t0: float) -> dict[str, Any]:
    combined = [r for r in rows if r.status == "combined"]
    evaluated = [r for r in combined if r.loss is not None]
    last = evaluated[-1] if evaluated else None
    return {
        "rounds": len(combined),
        "rounds_planned": run.get("rounds_planned"),
        "epochs_done": combined[-1].epochs_done if combined else 0.0,
        "final_loss": _finite(last.loss) if last else None,
        "final_accuracy": last.accuracy if last else None,
        "final_train_loss": _finite(combined[-1].train_loss) if combined else None,
        "curve": [
            {
                "round": r.round,
                "epoch": r.epoch,
                "epochs_done": r.epochs_done,
                "samples": r.samples,
                "train_loss": _finite(r.train_loss),
                "loss": _finite(r.loss),
                "accuracy": r.accuracy,
                "worker_ms_max": r.worker_ms_max,
                "combine_ms": r.combine_ms,
                "t_s": None if r.combined_at is None else r.combined_at - t0,
            }
            for r in combined
        ],
    }


def _time(
    run: Mapping[str, Any],
    items: Sequence[Attributed],
    aws: Prediction,
    local: Prediction,
    t0: float,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    ends = [a.record.end_epoch_s for a in items]
    final_end = run.get("final_end_at")
    end = float(final_end) if final_end else (max(ends) if ends else t0)
    return {
        "wall_s": max(0.0, end - t0),
        "runner_wall_s": run.get("runner_wall_s"),
        "lambda_s": sum(((a.record.init_ms or 0.0) + a.record.duration_ms) for a in items) / 1000.0,
        "predicted_s": aws.total_s,
        "predicted_finished": aws.finished,
        "predicted_local_s": local.total_s,
        "efs_mode": settings.get("efs_mode", "elastic"),
    }


def _invocations(items: Sequence[Attributed], run: Mapping[str, Any]) -> dict[str, Any]:
    recs = [a.record for a in items]
    by_role: dict[str, dict[str, Any]] = {}
    for role in sorted({a.role for a in items}):
        rs = [a.record for a in items if a.role == role]
        by_role[role] = {
            "count": len(rs),
            "cold": sum(r.cold for r in rs),
            "failed": sum(r.status != "success" for r in rs),
            "retried": sum(r.attempt > 1 for r in rs),
            "lambda_s": sum((r.init_ms or 0.0) + r.duration_ms for r in rs) / 1000.0,
            "billed_ms": sum(r.billed_ms for r in rs),
        }
    return {
        "total": len(recs),
        "cold": sum(r.cold for r in recs),
        "warm": sum(not r.cold for r in recs),
        "failed": sum(r.status != "success" for r in recs),
        "retried": sum(r.attempt > 1 for r in recs),
        "throttled": int(run.get("throttled", 0)),
        "timeouts": sum(r.status == "timeout" for r in recs),
        "oom": sum(r.status == "oom" for r in recs),
        "crashes": sum(r.status == "crash" for r in recs),
        "errors": sum(r.status == "error" for r in recs),
        "rescues": len([x for x in run.get("watchdog", []) if x.get("status") == "rescued"]),
        "unattributed": sum(a.role == "unknown" for a in items),
        "by_role": by_role,
    }


def _cost(
    recs: Sequence[InvocationRecord], aws: Prediction, shape: RunShape, settings: Mapping[str, Any]
) -> dict[str, Any]:
    s = billing.summarize(recs)
    mode = str(settings.get("efs_mode", "elastic"))
    stored_gb = shape.stored_bytes / GIB
    storage = (
        stored_gb * billing.EFS_STANDARD_USD_PER_GB_MONTH * aws.total_s / (HOURS_PER_MONTH * 3600)
    )
    read_gb, write_gb = aws.efs_read_bytes / GIB, aws.efs_write_bytes / GIB
    transfer = 0.0
    if mode == "elastic":  # bursting has no transfer charge (spec §8)
        transfer = (
            read_gb * billing.EFS_ELASTIC_READ_USD_PER_GB
            + write_gb * billing.EFS_ELASTIC_WRITE_USD_PER_GB
        )
    lam = {
        "requests": s.invocations,
        "request_usd": s.request_usd,
        "billed_ms": s.billed_ms,
        "gb_s": s.gb_s,
        "duration_usd": s.duration_usd,
        "ephemeral_gb_s": s.ephemeral_gb_s,
        "ephemeral_usd": s.ephemeral_usd,
        "total_usd": s.total_usd,
        "architecture": settings.get("architecture", "x86_64"),
    }
    efs = {
        "mode": mode,
        "stored_gb": stored_gb,
        "storage_usd": storage,
        "read_gb": read_gb,
        "write_gb": write_gb,
        "transfer_usd": transfer,
        "total_usd": storage + transfer,
    }
    return {"lambda": lam, "efs": efs, "total_usd": s.total_usd + storage + transfer}


def _resources(items: Sequence[Attributed], settings: Mapping[str, Any]) -> dict[str, Any]:
    memory = int(settings.get("memory", 0)) or 1
    tmp = int(settings.get("ephemeral", 512)) or 1
    out: dict[str, Any] = {}
    for role in sorted({a.role for a in items}):
        rs = [a.record for a in items if a.role == role]
        peak_mem = max(r.max_memory_mb for r in rs)
        peak_tmp = max(r.tmp_peak_mb for r in rs)
        out[role] = {
            "memory_peak_mb": peak_mem,
            "memory_limit_mb": memory,
            "memory_fraction": peak_mem / memory,
            "tmp_peak_mb": peak_tmp,
            "tmp_limit_mb": tmp,
            "tmp_fraction": peak_tmp / tmp,
        }
    return out


def _warnings(report: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    warnings: list[str] = []
    for role, res in report["resources"].items():
        for what, key, unit in (("memory", "memory", "MB"), ("/tmp", "tmp", "MB")):
            frac = res[f"{key}_fraction"]
            if frac >= LIMIT_WARNING_FRACTION:
                warnings.append(
                    f"{role}: peak {what} {res[f'{key}_peak_mb']:.0f} {unit} is within 10% of the "
                    f"configured {res[f'{key}_limit_mb']} {unit} ({frac:.0%})"
                )
    inv = report["invocations"]
    if inv["unattributed"]:
        warnings.append(
            f"{inv['unattributed']} invocation(s) left no [simulator] role line in the logs "
            "(failed before the handler ran); they are counted but not laid out"
        )
    if not report["checks"]["logs_agree"]:
        warnings.append("the REPORT lines in the logs and the billing ledger differ (see checks)")
    notes = [str(w) for w in run.get("host_notes", [])]
    warnings.extend(notes)
    wall = sum(max(0.0, t["end_s"] - t["start_s"]) for t in report["timeline"])
    lam = sum(((t["init_ms"] or 0.0) + t["duration_ms"]) / 1000.0 for t in report["timeline"])
    shared = float(run.get("oversubscription") or 1.0) > 1.0  # then the waits are expected
    if not shared and wall > 0 and 1.0 - lam / wall > CONTENTION_WARNING_FRACTION:
        warnings.append(
            f"invocations spent {1.0 - lam / wall:.0%} of their laptop time outside the Lambda "
            "clock (waiting for a CPU that another process on this machine held, or service "
            "overhead): the laptop wall time overstates this run"
        )
    return warnings


def _timeline(
    items: Sequence[Attributed], invs: Sequence[Invocation], aws: Prediction
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for a, inv in zip(items, invs, strict=True):
        r = a.record
        placed = aws.placed.get(inv.key)
        rows.append(
            {
                "request_id": r.request_id,
                "attempt": r.attempt,
                "role": a.role,
                "round": a.round,
                "worker": a.worker,
                "env": r.environment_id,
                "cold": r.cold,
                "status": r.status,
                "error_type": r.error_type,
                "start_s": inv.start_s,
                "end_s": inv.end_s,
                "init_ms": r.init_ms,
                "duration_ms": r.duration_ms,
                "billed_ms": r.billed_ms,
                "max_memory_mb": r.max_memory_mb,
                "tmp_peak_mb": r.tmp_peak_mb,
                "predicted_start_s": None if placed is None else _finite(placed.start_s),
                "predicted_end_s": None if placed is None else _finite(placed.end_s),
            }
        )
    rows.sort(key=lambda x: float(x["start_s"]))
    # A new request for what a failed earlier one computed is a watchdog rescue (Lambda's own
    # retries keep the request id).
    failed_before: dict[tuple[Any, ...], bool] = {}
    for row in rows:
        chain = (row["role"], row["round"], row["worker"])
        row["rescue"] = row["attempt"] == 1 and failed_before.get(chain, False)
        if row["status"] != "success" and row["role"] != "unknown":
            failed_before[chain] = True
    return rows


# ------------------------------------------------------------------------------------------
# Summary text


def _fmt_s(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if x >= 3600:
        return f"{x / 3600:.2f} h"
    if x >= 120:
        return f"{x / 60:.1f} min"
    return f"{x:.2f} s"


def _fmt_usd(x: float) -> str:
    return f"${x:.6f}" if x < 0.01 else f"${x:.4f}"


def _fmt_num(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def format_summary(report: Mapping[str, Any]) -> str:
    """The final summary as plain text (also written to summary.txt)."""
    run, tr, tm, inv = report["run"], report["training"], report["time"], report["invocations"]
    st, cost = report["settings"], report["cost"]
    predicted_label = f"predicted end-to-end on Lambda ({tm['efs_mode']} EFS)"
    lines = [
        f"run {run['id']}: {run['status']}" + (f" ({run['reason']})" if run.get("reason") else ""),
        f"  {st['workers']} workers x {st['memory']} MB, timeout {st['timeout']} s, "
        f"/tmp {st['ephemeral']} MB; model {st['model']} on {st['dataset']}, {st['algorithm']}",
        "",
        "time",
        f"  {'laptop wall time (start to last combine)':<48} {_fmt_s(tm['wall_s']):>10}",
        f"  {'Lambda time (all invocations, Lambda clock)':<48} {_fmt_s(tm['lambda_s']):>10}",
        f"  {predicted_label:<48} {_fmt_s(tm['predicted_s']):>10}"
        + ("" if tm.get("predicted_finished", True) else "  (the run did not finish)"),
        f"  {'same layout with this machine overheads':<48} {_fmt_s(tm['predicted_local_s']):>10}",
        "",
        "training",
        f"  rounds {tr['rounds']}"
        + (f" of {tr['rounds_planned']}" if tr.get("rounds_planned") else "")
        + f", epochs {tr['epochs_done'] or 0:g}",
        f"  final held-out loss {_fmt_num(tr['final_loss'])}, accuracy "
        f"{_fmt_num(tr['final_accuracy'], '.2%')}",
        "",
        "invocations",
        f"  {inv['total']} total: {inv['cold']} cold, {inv['warm']} warm, {inv['failed']} failed "
        f"({inv['timeouts']} timeouts, {inv['oom']} out of memory, {inv['crashes']} crashes, "
        f"{inv['errors']} errors), {inv['retried']} retries, {inv['throttled']} throttled, "
        f"{inv['rescues']} watchdog rescues",
    ]
    for role, d in inv["by_role"].items():
        lines.append(
            f"  {role:<8} {d['count']:>5} invocations, {d['cold']} cold, {d['failed']} failed, "
            f"{_fmt_s(d['lambda_s'])} Lambda time"
        )
    lines += ["", "time per phase (predicted on Lambda)     critical path   all invocations"]
    for p in report["phases"]:
        lines.append(
            f"  {p['phase']:<28} {_fmt_s(p['critical_path_s']):>16}"
            f" {_fmt_s(p['all_invocations_s']):>17}"
        )
    lam, efs = cost["lambda"], cost["efs"]
    lines += [
        "",
        "cost (us-east-1, no free tier)",
        f"  Lambda duration  {lam['gb_s']:.3f} GB-s  {_fmt_usd(lam['duration_usd'])}"
        f"   (/tmp {lam['ephemeral_gb_s']:.3f} GB-s {_fmt_usd(lam['ephemeral_usd'])})",
        f"  requests         {lam['requests']}  {_fmt_usd(lam['request_usd'])}",
        f"  EFS ({efs['mode']})  {efs['read_gb'] * 1024:.1f} MiB read, {efs['write_gb'] * 1024:.1f}"
        f" MiB written, {efs['stored_gb'] * 1024:.1f} MiB stored  {_fmt_usd(efs['total_usd'])}",
        f"  total            {_fmt_usd(cost['total_usd'])}",
        "",
        "peak memory and /tmp per role",
    ]
    for role, res in report["resources"].items():
        lines.append(
            f"  {role:<8} memory {res['memory_peak_mb']:.0f} / {res['memory_limit_mb']} MB "
            f"({res['memory_fraction']:.0%}), /tmp {res['tmp_peak_mb']:.1f} / "
            f"{res['tmp_limit_mb']} MB ({res['tmp_fraction']:.0%})"
        )
    if report["warnings"]:
        lines += ["", "warnings"] + [f"  ! {w}" for w in report["warnings"]]
    lines += ["", f"output: {run['out_dir']}"]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, report: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write report.json, summary.txt and the plots into `out_dir`; returns the report."""
    out = Path(out_dir)
    doc: dict[str, Any] = json_safe(dict(report) if report is not None else build_report(out))
    (out / "report.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    (out / "summary.txt").write_text(format_summary(doc))
    try:
        from simulator.plots import plot_curves, plot_timeline

        plot_curves(doc, out / "curves.png")
        plot_timeline(doc, out / "timeline.png")
    except ImportError as exc:  # matplotlib is what draws them
        doc["warnings"].append(f"no plots: {exc} (pip install matplotlib)")
        (out / "report.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return doc


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def load_report(out_dir: str | Path) -> dict[str, Any]:
    """report.json of a run directory."""
    path = Path(out_dir) / "report.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} document")
    return data


__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "build_report",
    "format_summary",
    "json_safe",
    "load_report",
    "write_report",
]
