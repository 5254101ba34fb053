"""What each invocation would cost on Lambda in us-east-1 (spec §8), and a per-run ledger of them.

The ledger is ``<run_dir>/invocations.jsonl``: one compact JSON object per line, appended with a
single ``os.write`` on an ``O_APPEND`` descriptor so concurrent writers (threads or processes)
never interleave inside a line and a reader sees at most one unfinished line, the last.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import Any

from lambda_runtime import quotas

# --- us-east-1 price table (spec §8) ---------------------------------------------------------
REQUEST_PRICE_USD = 0.20 / 1_000_000  # $0.20 per 1M requests, both architectures

# Duration tiers: (upper bound of monthly GB-s for this tier, USD per GB-s). Tiers are counted per
# architecture over the aggregate monthly duration.
X86_TIER1_GB_S = 6_000_000_000.0
X86_TIER2_GB_S = 15_000_000_000.0
X86_TIER1_USD_PER_GB_S = 0.0000166667
X86_TIER2_USD_PER_GB_S = 0.000015
X86_TIER3_USD_PER_GB_S = 0.0000133334
ARM_TIER1_GB_S = 7_500_000_000.0
ARM_TIER2_GB_S = 18_750_000_000.0
ARM_TIER1_USD_PER_GB_S = 0.0000133334
ARM_TIER2_USD_PER_GB_S = 0.0000120001
ARM_TIER3_USD_PER_GB_S = 0.0000106667  # unconfirmed (spec §8)

DURATION_TIERS: Mapping[str, tuple[tuple[float, float], ...]] = {
    "x86_64": (
        (X86_TIER1_GB_S, X86_TIER1_USD_PER_GB_S),
        (X86_TIER2_GB_S, X86_TIER2_USD_PER_GB_S),
        (math.inf, X86_TIER3_USD_PER_GB_S),
    ),
    "arm64": (
        (ARM_TIER1_GB_S, ARM_TIER1_USD_PER_GB_S),
        (ARM_TIER2_GB_S, ARM_TIER2_USD_PER_GB_S),
        (math.inf, ARM_TIER3_USD_PER_GB_S),
    ),
}

EPHEMERAL_USD_PER_GB_S = 0.0000000309  # only the part of /tmp above the free 512 MB

EFS_STANDARD_USD_PER_GB_MONTH = 0.30
EFS_ELASTIC_READ_USD_PER_GB = 0.03
EFS_ELASTIC_WRITE_USD_PER_GB = 0.06

FREE_TIER_REQUESTS = 1_000_000
FREE_TIER_GB_S = 400_000.0  # shared by both architectures

INVOCATION_TYPES = ("RequestResponse", "Event")
STATUSES = ("success", "error", "timeout", "oom", "crash")
LEDGER_FILE = "invocations.jsonl"


def _check_architecture(architecture: str) -> None:
    if architecture not in DURATION_TIERS:
        raise ValueError(
            f"architecture: must be one of {tuple(DURATION_TIERS)}, got {architecture!r}"
        )


def gb_seconds(memory_mb: int, billed_ms: int) -> float:
    """GB-s of one invocation: (memory MB / 1024) x billed seconds."""
    return memory_mb / 1024 * billed_ms / 1000


def ephemeral_gb_seconds(ephemeral_mb: int, billed_ms: int) -> float:
    """Billable /tmp GB-s: only the MB above the free 512 count."""
    extra_mb = max(0, ephemeral_mb - quotas.EPHEMERAL_MIN_MB)
    return extra_mb / 1024 * billed_ms / 1000


def duration_cost(gb_s: float, architecture: str, already_used_gb_s: float = 0.0) -> float:
    """USD for ``gb_s`` of duration when ``already_used_gb_s`` of the month's tiers are used up."""
    _check_architecture(architecture)
    if not (math.isfinite(gb_s) and gb_s >= 0):
        raise ValueError(f"gb_s: must be finite and >= 0, got {gb_s!r}")
    if not (math.isfinite(already_used_gb_s) and already_used_gb_s >= 0):
        raise ValueError(f"already_used_gb_s: must be finite and >= 0, got {already_used_gb_s!r}")
    start, end = already_used_gb_s, already_used_gb_s + gb_s
    cost = 0.0
    lower = 0.0
    for upper, price in DURATION_TIERS[architecture]:
        overlap = min(end, upper) - max(start, lower)
        if overlap > 0:
            cost += overlap * price
        lower = upper
    return cost


@dataclass(frozen=True)
class InvocationRecord:
    """One finished invocation: timing, sizes, outcome, and which enforcement mechanisms applied."""

    request_id: str
    function: str
    environment_id: str
    invocation_type: str
    attempt: int
    cold: bool
    start_epoch_s: float
    end_epoch_s: float
    wall_ms: float
    duration_ms: float
    init_ms: float | None
    billed_ms: int
    memory_mb: int
    max_memory_mb: int
    ephemeral_mb: int
    tmp_peak_mb: float
    architecture: str
    status: str
    error_type: str | None
    mechanisms: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.invocation_type not in INVOCATION_TYPES:
            raise ValueError(
                f"invocation_type: must be one of {INVOCATION_TYPES}, got {self.invocation_type!r}"
            )
        if self.status not in STATUSES:
            raise ValueError(f"status: must be one of {STATUSES}, got {self.status!r}")
        if isinstance(self.attempt, bool) or not isinstance(self.attempt, int) or self.attempt < 1:
            raise ValueError(f"attempt: must be an int >= 1 (1-based), got {self.attempt!r}")
        if isinstance(self.billed_ms, bool) or not isinstance(self.billed_ms, int):
            raise ValueError(f"billed_ms: must be an int, got {self.billed_ms!r}")
        if self.billed_ms < 1:
            raise ValueError(f"billed_ms: Lambda bills at least 1 ms, got {self.billed_ms}")
        _check_architecture(self.architecture)

    @property
    def gb_s(self) -> float:
        """Billed GB-s of duration."""
        return gb_seconds(self.memory_mb, self.billed_ms)

    @property
    def ephemeral_gb_s(self) -> float:
        """Billed GB-s of /tmp above 512 MB."""
        return ephemeral_gb_seconds(self.ephemeral_mb, self.billed_ms)

    @property
    def cost_usd(self) -> float:
        """Request + duration (first tier) + ephemeral storage, no free tier."""
        return (
            REQUEST_PRICE_USD
            + duration_cost(self.gb_s, self.architecture)
            + self.ephemeral_gb_s * EPHEMERAL_USD_PER_GB_S
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        # Not dataclasses.asdict: it deep-copies, and this runs once per invocation.
        out = {name: getattr(self, name) for name in _RECORD_FIELDS}
        out["mechanisms"] = dict(self.mechanisms)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> InvocationRecord:
        """Rebuild from ``to_json`` output; unknown keys are ignored so newer ledgers still load."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in d:
                values[f.name] = d[f.name]
            elif f.name != "mechanisms":
                raise ValueError(f"{f.name}: missing from invocation record")
        values["mechanisms"] = dict(values.get("mechanisms") or {})
        return cls(**values)


_RECORD_FIELDS = tuple(f.name for f in fields(InvocationRecord))


@dataclass
class BillingSummary:
    """Totals over many invocations; ``errors`` counts every non-success, like CloudWatch Errors."""

    invocations: int = 0
    cold_starts: int = 0
    errors: int = 0
    timeouts: int = 0
    ooms: int = 0
    billed_ms: int = 0
    gb_s: float = 0.0
    ephemeral_gb_s: float = 0.0
    request_usd: float = 0.0
    duration_usd: float = 0.0
    ephemeral_usd: float = 0.0
    total_usd: float = 0.0
    by_status: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


def summarize(records: Iterable[InvocationRecord], free_tier: bool = False) -> BillingSummary:
    """Sum records; duration is tiered over each architecture's total.

    With ``free_tier`` the first 1M requests and 400,000 GB-s are free. AWS does not say which
    architecture the shared free GB-s go to; we give them to x86_64 first (the dearer one, i.e.
    the reading most favourable to the customer) and count them toward the first tier.
    """
    s = BillingSummary()
    gb_by_arch: dict[str, float] = {arch: 0.0 for arch in DURATION_TIERS}
    for r in records:
        s.invocations += 1
        s.cold_starts += int(r.cold)
        s.errors += int(r.status != "success")
        s.timeouts += int(r.status == "timeout")
        s.ooms += int(r.status == "oom")
        s.billed_ms += r.billed_ms
        s.gb_s += r.gb_s
        s.ephemeral_gb_s += r.ephemeral_gb_s
        gb_by_arch[r.architecture] += r.gb_s
        s.by_status[r.status] = s.by_status.get(r.status, 0) + 1

    free_requests = FREE_TIER_REQUESTS if free_tier else 0
    free_gb_s = FREE_TIER_GB_S if free_tier else 0.0
    s.request_usd = max(0, s.invocations - free_requests) * REQUEST_PRICE_USD
    for arch in ("x86_64", "arm64"):
        used = gb_by_arch[arch]
        free_here = min(used, free_gb_s)
        free_gb_s -= free_here
        s.duration_usd += duration_cost(used - free_here, arch, already_used_gb_s=free_here)
    s.ephemeral_usd = s.ephemeral_gb_s * EPHEMERAL_USD_PER_GB_S
    s.total_usd = s.request_usd + s.duration_usd + s.ephemeral_usd
    return s


class Ledger:
    """Append-only JSON-lines record of a run's invocations at ``<run_dir>/invocations.jsonl``."""

    def __init__(self, run_dir: str | Path) -> None:
        directory = Path(run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / LEDGER_FILE
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def append(self, record: InvocationRecord) -> None:
        """Append one record as one whole line (a single write, so readers never see half)."""
        line = json.dumps(record.to_json(), separators=(",", ":"), sort_keys=True) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            if self._fd is None:
                raise ValueError(f"ledger {str(self.path)!r} is closed")
            written = os.write(self._fd, data)
        if written != len(data):
            # Retrying would split the line in two writes; better to fail loudly.
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")

    def records(self, function: str | None = None) -> list[InvocationRecord]:
        """Every complete record (optionally of one function), in append order."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        # Everything after the last newline is a line still being written: skip it.
        complete = data[: data.rfind(b"\n") + 1]
        out: list[InvocationRecord] = []
        for number, raw in enumerate(complete.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                record = InvocationRecord.from_json(json.loads(raw))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{self.path}: line {number}: bad invocation record: {e}") from e
            if function is None or record.function == function:
                out.append(record)
        return out

    def summary(self, function: str | None = None, free_tier: bool = False) -> BillingSummary:
        """Totals and cost of the stored records (see ``summarize``)."""
        return summarize(self.records(function), free_tier=free_tier)

    def close(self) -> None:
        """Close the append descriptor; reading still works. Calling it twice is harmless."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
