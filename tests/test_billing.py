"""Prices, invocation records and the per-run ledger."""

from __future__ import annotations

import json
import math
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lambda_runtime import billing


def make_record(**overrides: Any) -> billing.InvocationRecord:
    values: dict[str, Any] = {
        "request_id": "8f507cfc-14ac-4a3b-a2a5-0ac5d3d2e5f1",
        "function": "train",
        "environment_id": "env-1",
        "invocation_type": "RequestResponse",
        "attempt": 1,
        "cold": True,
        "start_epoch_s": 1_795_763_037.0,
        "end_epoch_s": 1_795_763_037.2,
        "wall_ms": 200.5,
        "duration_ms": 3.01,
        "init_ms": 110.10,
        "billed_ms": 114,
        "memory_mb": 1024,
        "max_memory_mb": 36,
        "ephemeral_mb": 512,
        "tmp_peak_mb": 0.5,
        "architecture": "x86_64",
        "status": "success",
        "error_type": None,
        "mechanisms": {"memory": "cgroup", "cpu": "cgroup", "tmp": "loop", "timeout": "sigkill"},
    }
    values.update(overrides)
    return billing.InvocationRecord(**values)


def test_gb_seconds_and_ephemeral_part_above_512() -> None:
    assert billing.gb_seconds(1024, 1000) == 1.0
    assert billing.gb_seconds(128, 4) == pytest.approx(0.0005)
    assert billing.ephemeral_gb_seconds(512, 1000) == 0.0
    assert billing.ephemeral_gb_seconds(1536, 2000) == 2.0
    assert billing.ephemeral_gb_seconds(10_240, 1000) == pytest.approx(9.5)


def test_per_ms_price_of_128_mb_matches_spec() -> None:
    # Spec §8: 128 MB on x86 costs $0.0000000021 per ms (rounded to two significant digits).
    per_ms = billing.duration_cost(billing.gb_seconds(128, 1), "x86_64")
    assert per_ms == pytest.approx(0.0000000021, rel=0.01)


def test_duration_cost_first_tier() -> None:
    assert billing.duration_cost(1.0, "x86_64") == pytest.approx(0.0000166667, rel=1e-12)
    assert billing.duration_cost(1.0, "arm64") == pytest.approx(0.0000133334, rel=1e-12)
    assert billing.duration_cost(0.0, "x86_64") == 0.0


def test_duration_cost_crossing_the_6_billion_boundary() -> None:
    # 1e9 GB-s starting 0.5e9 below the x86 tier-1 limit: half at tier 1, half at tier 2.
    cost = billing.duration_cost(1e9, "x86_64", already_used_gb_s=5.5e9)
    assert cost == pytest.approx(0.5e9 * 0.0000166667 + 0.5e9 * 0.000015, rel=1e-12)
    # The same span on arm64 stays in its (wider) tier 1.
    assert billing.duration_cost(1e9, "arm64", already_used_gb_s=5.5e9) == pytest.approx(
        1e9 * 0.0000133334, rel=1e-12
    )


def test_duration_cost_all_three_tiers_and_additivity() -> None:
    whole = billing.duration_cost(20e9, "x86_64")
    expected = 6e9 * 0.0000166667 + 9e9 * 0.000015 + 5e9 * 0.0000133334
    assert whole == pytest.approx(expected, rel=1e-12)
    split = billing.duration_cost(7e9, "x86_64") + billing.duration_cost(
        13e9, "x86_64", already_used_gb_s=7e9
    )
    assert split == pytest.approx(whole, rel=1e-12)
    arm = billing.duration_cost(20e9, "arm64")
    assert arm == pytest.approx(
        7.5e9 * 0.0000133334 + 11.25e9 * 0.0000120001 + 1.25e9 * 0.0000106667, rel=1e-12
    )


def test_duration_cost_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="architecture"):
        billing.duration_cost(1.0, "sparc")
    with pytest.raises(ValueError, match="gb_s"):
        billing.duration_cost(-1.0, "x86_64")
    with pytest.raises(ValueError, match="already_used_gb_s"):
        billing.duration_cost(1.0, "x86_64", already_used_gb_s=math.inf)


def test_record_cost_is_request_plus_duration_plus_ephemeral() -> None:
    r = make_record(memory_mb=2048, billed_ms=1500, ephemeral_mb=1536)
    assert r.gb_s == 3.0
    assert r.ephemeral_gb_s == 1.5
    expected = 0.0000002 + 3.0 * 0.0000166667 + 1.5 * 0.0000000309
    assert r.cost_usd == pytest.approx(expected, rel=1e-12)


def test_record_validates_fields() -> None:
    with pytest.raises(ValueError, match="status"):
        make_record(status="ok")
    with pytest.raises(ValueError, match="invocation_type"):
        make_record(invocation_type="DryRun")
    with pytest.raises(ValueError, match="attempt"):
        make_record(attempt=0)
    with pytest.raises(ValueError, match="billed_ms"):
        make_record(billed_ms=0)
    with pytest.raises(ValueError, match="architecture"):
        make_record(architecture="x86")


def test_record_json_round_trip() -> None:
    r = make_record(status="timeout", error_type="Sandbox.Timedout", init_ms=None, cold=False)
    d = json.loads(json.dumps(r.to_json()))
    assert billing.InvocationRecord.from_json(d) == r
    d["added_later"] = 1  # a newer writer's extra field does not break reading
    assert billing.InvocationRecord.from_json(d) == r
    del d["billed_ms"]
    with pytest.raises(ValueError, match="billed_ms"):
        billing.InvocationRecord.from_json(d)


def test_ledger_round_trip_and_filter(tmp_path: Path) -> None:
    a = make_record()
    b = make_record(request_id="r2", function="combine", architecture="arm64", attempt=2)
    c = make_record(request_id="r3", invocation_type="Event", status="oom", cold=False)
    with billing.Ledger(tmp_path) as ledger:
        for r in (a, b, c):
            ledger.append(r)
        assert ledger.path == tmp_path / "invocations.jsonl"
        assert ledger.records() == [a, b, c]
        assert ledger.records("train") == [a, c]
        assert ledger.records("nobody") == []
    # A fresh Ledger over the same run reads what the first one wrote.
    assert billing.Ledger(tmp_path).records() == [a, b, c]


def test_ledger_ignores_a_trailing_partial_line(tmp_path: Path) -> None:
    ledger = billing.Ledger(tmp_path)
    ledger.append(make_record())
    with open(ledger.path, "ab") as f:
        f.write(b'{"request_id": "half-writ')
    assert ledger.records() == [make_record()]


def test_ledger_reports_a_corrupt_line(tmp_path: Path) -> None:
    ledger = billing.Ledger(tmp_path)
    with open(ledger.path, "ab") as f:
        f.write(b"not json\n")
    with pytest.raises(ValueError, match="line 1"):
        ledger.records()


def test_summary_sums_billed_ms_counts_and_cost(tmp_path: Path) -> None:
    ledger = billing.Ledger(tmp_path)
    recs = [
        make_record(request_id="1", billed_ms=114, cold=True),
        make_record(request_id="2", billed_ms=4, cold=False, init_ms=None),
        make_record(request_id="3", billed_ms=3000, cold=False, status="timeout"),
        make_record(request_id="4", billed_ms=900, status="oom", ephemeral_mb=2048),
        make_record(request_id="5", billed_ms=10, status="error", function="other"),
    ]
    for r in recs:
        ledger.append(r)
    s = ledger.summary()
    assert s.invocations == 5
    assert s.cold_starts == 3
    assert (s.errors, s.timeouts, s.ooms) == (3, 1, 1)
    assert s.by_status == {"success": 2, "timeout": 1, "oom": 1, "error": 1}
    assert s.billed_ms == 114 + 4 + 3000 + 900 + 10
    assert s.gb_s == pytest.approx(sum(r.gb_s for r in recs))
    assert s.ephemeral_gb_s == pytest.approx(1.5 * 0.9)
    # Far below the first tier boundary, the total equals the sum of per-invocation costs.
    assert s.total_usd == pytest.approx(sum(r.cost_usd for r in recs), rel=1e-12)
    assert s.total_usd == pytest.approx(s.request_usd + s.duration_usd + s.ephemeral_usd)
    only_other = ledger.summary("other")
    assert (only_other.invocations, only_other.billed_ms) == (1, 10)
    assert json.loads(json.dumps(s.to_json()))["billed_ms"] == s.billed_ms


def test_summary_tiers_per_architecture_over_the_total() -> None:
    # One giant synthetic record per arch: 10,240 MB for 7e8 s = 7e9 GB-s each.
    x86 = make_record(memory_mb=10_240, billed_ms=700_000_000_000, architecture="x86_64")
    arm = replace(x86, request_id="r2", architecture="arm64")
    s = billing.summarize([x86, arm])
    expected = (6e9 * 0.0000166667 + 1e9 * 0.000015) + 7e9 * 0.0000133334
    assert s.duration_usd == pytest.approx(expected, rel=1e-12)


def test_free_tier_is_optional_and_subtracts_requests_and_gb_s() -> None:
    recs = [make_record(request_id=str(i), memory_mb=1024, billed_ms=1000) for i in range(10)]
    assert billing.summarize(recs).total_usd > 0
    free = billing.summarize(recs, free_tier=True)
    assert (free.request_usd, free.duration_usd, free.total_usd) == (0.0, 0.0, 0.0)
    # 500,000 GB-s of x86 and 100 of arm: the shared 400,000 free GB-s go to x86 first.
    big = make_record(memory_mb=1024, billed_ms=500_000_000)
    small_arm = make_record(request_id="a", memory_mb=1024, billed_ms=100_000, architecture="arm64")
    s = billing.summarize([big, small_arm], free_tier=True)
    assert s.duration_usd == pytest.approx(100_000 * 0.0000166667 + 100 * 0.0000133334)


def test_concurrent_appends_yield_whole_lines_only(tmp_path: Path) -> None:
    ledger = billing.Ledger(tmp_path)
    per_thread = 200
    stop = threading.Event()
    counts_seen: list[int] = []

    def writer(t: int) -> None:
        for i in range(per_thread):
            ledger.append(make_record(request_id=f"{t}-{i}", environment_id="e" * 500))

    def reader() -> None:
        # Every read while writers run must parse: records() skips at most a trailing fragment.
        while not stop.is_set():
            counts_seen.append(len(ledger.records()))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stop.set()
    watcher.join()
    raw = ledger.path.read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.splitlines()
    assert len(lines) == 4 * per_thread
    ids = {json.loads(line)["request_id"] for line in lines}
    assert ids == {f"{t}-{i}" for t in range(4) for i in range(per_thread)}
    assert counts_seen == sorted(counts_seen)  # counts only grow: no line read twice or torn
