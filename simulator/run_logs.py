"""What a run's Lambda logs say: REPORT lines, and each invocation's role, round and worker.

Every invocation of the training handler logs ``[simulator] {"role": ..., "round": ...,
"worker": ..., "request_id": ...}`` first and, when it succeeds, ``[simulator] {"done": {...}}``
(simulator.handler). Joining those with the billing ledger attributes each invocation record to
what it computed; :func:`check_logs` compares the REPORT lines with the ledger.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lambda_runtime.billing import InvocationRecord
from lambda_runtime.logs import list_streams, read_stream
from simulator.platform import RunShape, estimate_io
from simulator.predict import Invocation

FUNCTION = "train"

REPORT_LINE = re.compile(
    r"REPORT RequestId: (?P<id>\S+)\tDuration: (?P<duration>[\d.]+) ms\t"
    r"Billed Duration: (?P<billed>\d+) ms\tMemory Size: (?P<memory>\d+) MB\t"
    r"Max Memory Used: (?P<max_memory>\d+) MB"
    r"(?:\tInit Duration: (?P<init>[\d.]+) ms)?"
    r"(?:\tStatus: (?P<status>\w+))?(?:\tError Type: (?P<error_type>\S+))?"
)
SIM_LINE = re.compile(r"^\[simulator\] (\{.*\})\s*$", re.MULTILINE)


# ------------------------------------------------------------------------------------------
# Logs


@dataclass(frozen=True)
class ReportLine:
    """One parsed REPORT line."""

    request_id: str
    duration_ms: float
    billed_ms: int
    memory_mb: int
    max_memory_mb: int
    init_ms: float | None
    status: str | None
    error_type: str | None


@dataclass
class LogFacts:
    """What the log streams say: REPORT lines, and each request's role and outcome."""

    reports: list[ReportLine] = field(default_factory=list)
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: dict[str, dict[str, Any]] = field(default_factory=dict)


def parse_report_line(line: str) -> ReportLine | None:
    """A REPORT line's fields, or None if `line` is not one."""
    m = REPORT_LINE.match(line)
    if m is None:
        return None
    init = m.group("init")
    return ReportLine(
        m.group("id"),
        float(m.group("duration")),
        int(m.group("billed")),
        int(m.group("memory")),
        int(m.group("max_memory")),
        None if init is None else float(init),
        m.group("status"),
        m.group("error_type"),
    )


def read_logs(lambda_dir: Path, function: str = FUNCTION) -> LogFacts:
    """Parse every log stream of `function` under the service's run directory."""
    facts = LogFacts()
    for stream in list_streams(lambda_dir, function):
        text = read_stream(stream)
        for line in text.splitlines():
            if line.startswith("REPORT RequestId: "):
                parsed = parse_report_line(line)
                if parsed is not None:
                    facts.reports.append(parsed)
        for m in SIM_LINE.finditer(text):
            try:
                item = json.loads(m.group(1))
            except ValueError:
                continue
            rid = item.get("request_id")
            if not isinstance(rid, str):
                continue
            if "role" in item:
                facts.roles[rid] = item
            elif isinstance(item.get("done"), dict):
                facts.done[rid] = item["done"]
    return facts


def check_logs(records: Sequence[InvocationRecord], facts: LogFacts) -> dict[str, Any]:
    """Do the REPORT lines and the billing ledger tell the same story?"""
    differences: list[str] = []
    by_log: dict[str, list[ReportLine]] = defaultdict(list)
    for line in facts.reports:
        by_log[line.request_id].append(line)
    by_ledger: dict[str, list[InvocationRecord]] = defaultdict(list)
    for r in records:
        by_ledger[r.request_id].append(r)
    for rid in sorted(set(by_log) | set(by_ledger)):
        logged = sorted(x.billed_ms for x in by_log.get(rid, []))
        ledgered = sorted(x.billed_ms for x in by_ledger.get(rid, []))
        if logged != ledgered:
            differences.append(f"{rid}: billed ms in logs {logged}, in ledger {ledgered}")
    billed_logs = sum(x.billed_ms for x in facts.reports)
    billed_ledger = sum(r.billed_ms for r in records)
    return {
        "logs_agree": not differences and len(facts.reports) == len(records),
        "report_lines": len(facts.reports),
        "ledger_records": len(records),
        "billed_ms_logs": billed_logs,
        "billed_ms_ledger": billed_ledger,
        "differences": differences[:20],
    }


# ------------------------------------------------------------------------------------------
# Attribution


@dataclass(frozen=True)
class Attributed:
    """A ledger record with its role, round and worker (from the `[simulator]` log lines)."""

    record: InvocationRecord
    role: str
    round: int | None
    worker: int | None
    done: Mapping[str, Any] | None


def attribute(records: Sequence[InvocationRecord], facts: LogFacts) -> list[Attributed]:
    """Join records with the role line of their request and the done line of its success."""
    out: list[Attributed] = []
    for r in records:
        role_line = facts.roles.get(r.request_id) or {}
        done = facts.done.get(r.request_id) if r.status == "success" else None
        role = str(role_line.get("role", "unknown"))
        rnd = role_line.get("round")
        if rnd is None and facts.done.get(r.request_id):
            rnd = facts.done[r.request_id].get("round")
        # A shard aggregator is keyed by its shard where a worker is keyed by its number.
        worker = role_line.get("shard" if role == "aggregate" else "worker")
        out.append(
            Attributed(
                r,
                role,
                rnd if isinstance(rnd, int) else None,
                worker if isinstance(worker, int) else None,
                done,
            )
        )
    return out


def to_invocations(items: Sequence[Attributed], shape: RunShape, t0: float) -> list[Invocation]:
    """The predictor's view of each attributed record (EFS traffic estimated)."""
    out = []
    for a in items:
        r, done = a.record, a.done or {}
        samples = int(done.get("samples") or 0)
        fanout = 0
        if (a.role == "start" and done.get("status") == "started") or (
            a.role == "combine" and done.get("next_round_invoked")
        ):
            fanout = shape.workers
        elif a.role in ("worker", "aggregate") and (
            done.get("combine_invoked") or done.get("aggregate_invoked")
        ):
            fanout = 1
        io = estimate_io(
            a.role,
            shape,
            cold=r.cold,
            samples=samples,
            fanout_claim=a.role in ("worker", "aggregate") and fanout > 0,
        )
        out.append(
            Invocation(
                request_id=r.request_id,
                attempt=r.attempt,
                role=a.role,
                round=a.round,
                worker=a.worker,
                env_id=r.environment_id,
                cold=r.cold,
                init_ms=r.init_ms or 0.0,
                duration_ms=r.duration_ms,
                status=r.status,
                start_s=r.start_epoch_s - t0,
                end_s=r.end_epoch_s - t0,
                io=io,
                fanout=fanout,
                fixed=r.status != "success" or bool(done.get("partial")),
            )
        )
    return out


__all__ = [
    "FUNCTION",
    "Attributed",
    "LogFacts",
    "ReportLine",
    "attribute",
    "check_logs",
    "parse_report_line",
    "read_logs",
    "to_invocations",
]
