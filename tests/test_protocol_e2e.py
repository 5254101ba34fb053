"""The training protocol end to end on the local Lambda service with process environments.

The function is examples/numpy_digits (a re-export of simulator.handler.handler); workers fan
out with plain boto3 against the service's endpoint. Invocations are attributed to roles and
rounds by joining the billing ledger with the `[simulator] {...}` line each invocation logs.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lambda_runtime import FunctionConfig, LambdaService
from lambda_runtime.logs import list_streams, read_stream
from simulator.progress import SqliteProgressTable
from simulator.protocol import Boto3Invoker, Workspace, check_stalled

from .test_protocol import assert_same, reference

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "numpy_digits"
N = 4
# digits: 1,438 training samples; 4 shards of ~360 = 12 batches of 32; 6 per round: 2 rounds
# per epoch, 2 epochs: 4 rounds.
CONFIG: dict[str, Any] = {
    "model": "softmax",
    "dataset": "digits",
    "batch_size": 32,
    "steps": 6,
    "epochs": 2,
    "lr": 0.5,
    "momentum": 0.5,
    "seed": 1,
}
ROUNDS = 4
LOG_LINE = re.compile(r"\[simulator\] (\{.*\})")


def register(svc: LambdaService, efs: Path, **kw: Any) -> None:
    kw.setdefault("timeout_s", 60)
    kw.setdefault("max_retry_attempts", 2)
    svc.register(
        FunctionConfig(
            name="train",
            handler="handler.handler",
            code_dir=EXAMPLE,
            memory_mb=1024,
            efs={"/mnt/efs": efs},
            **kw,
        )
    )


def watchdog(svc: LambdaService) -> Boto3Invoker:
    """What a runner uses to re-invoke: boto3 against the service's Invoke API."""
    return Boto3Invoker(
        endpoint_url=svc.endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )


def train(
    svc: LambdaService, efs: Path, config: dict[str, Any], *, check: bool = False
) -> list[dict[str, Any]]:
    """Start, then wait for the run to end (polling check_stalled like a runner if asked)."""
    result = svc.invoke("train", {"start": True, "workers": N, "run": "e2e", "config": config})
    assert result.function_error is None, result.payload
    assert result.json()["status"] == "started"
    ws = Workspace(efs, "e2e")
    invoker = watchdog(svc)
    reports = []
    deadline = time.monotonic() + 180
    while ws.final_summary() is None and ws.failure() is None:
        assert time.monotonic() < deadline, "the run neither finished nor failed"
        if check:
            reports.append(check_stalled(ws, invoker))
        time.sleep(0.25)
    assert svc.wait_idle(60)
    assert ws.failure() is None
    return reports


def attributed(svc: LambdaService) -> list[tuple[str, int | None, int | None, int, str]]:
    """(role, round, worker, attempt, status) of every ledger record of the function."""
    roles: dict[str, dict[str, Any]] = {}
    for stream in list_streams(svc.run_dir, "train"):
        for match in LOG_LINE.finditer(read_stream(stream)):
            line = json.loads(match.group(1))
            if "role" in line:
                roles[line["request_id"]] = line
    out = []
    for record in svc.ledger.records("train"):
        line = roles[record.request_id]
        out.append((line["role"], line["round"], line["worker"], record.attempt, record.status))
    return out


def check_ledger(rows: list[tuple[str, int | None, int | None, int, str]]) -> None:
    """Exactly one successful invocation per worker per round and one combine per round."""
    ok = Counter((role, rnd, w) for role, rnd, w, _, status in rows if status == "success")
    expected: Counter[tuple[str, int | None, int | None]] = Counter({("start", None, None): 1})
    for r in range(ROUNDS):
        expected[("combine", r, None)] = 1
        for w in range(N):
            expected[("worker", r, w)] = 1
    assert ok == expected


def final(efs: Path) -> list[np.ndarray]:
    return [np.array(a) for a in Workspace(efs, "e2e").final_weights()]


@pytest.mark.parametrize("isolation", ["auto", "portable"])
def test_start_rounds_stop_equals_the_in_process_reference(make_service, tmp_path, isolation):
    svc = make_service(isolation)
    efs = tmp_path / "efs"
    register(svc, efs)
    train(svc, efs, CONFIG)
    assert_same(final(efs), reference(CONFIG, N))
    ws = Workspace(efs, "e2e")
    table = SqliteProgressTable(ws.progress_path)
    rows = table.rounds("e2e")
    assert [(r.round, r.status, r.epoch) for r in rows] == [
        (0, "combined", 0),
        (1, "combined", 0),
        (2, "combined", 1),
        (3, "combined", 1),
    ]
    assert [r.epochs_done for r in rows] == [0.5, 1.0, 1.5, 2.0]
    # No worker stopped early: each epoch covers all 1,438 samples (shards 360, 360, 359, 359;
    # 6 batches of 32 = 192 in the first round of an epoch, the rest in the second).
    assert [r.samples for r in rows] == [768, 670, 768, 670]
    # Four large-batch steps: learning, not yet converged.
    first, last = rows[0], rows[-1]
    assert first.loss is not None and last.loss is not None and last.loss < first.loss
    assert first.accuracy is not None and last.accuracy is not None
    assert last.accuracy > first.accuracy
    run = table.get_run("e2e")
    assert run is not None and (run.status, run.rounds_done) == ("finished", ROUNDS)
    summary = ws.final_summary()
    assert summary is not None and summary["reason"] == "epochs reached (2 epochs, 4 rounds)"
    rows_ = attributed(svc)
    assert all(attempt == 1 and status == "success" for *_, attempt, status in rows_)
    check_ledger(rows_)


def test_a_worker_killed_mid_round_is_retried_and_the_result_is_unchanged(make_service, tmp_path):
    svc = make_service("auto")
    efs = tmp_path / "efs"
    register(svc, efs)
    kill = {"role": "worker", "at": "mid_round", "round": 1, "worker": 2, "action": "exit"}
    config = {**CONFIG, "faults": [kill]}
    train(svc, efs, config)
    assert_same(final(efs), reference(CONFIG, N))
    rows = attributed(svc)
    crashed = [(role, r, w, a) for role, r, w, a, status in rows if status != "success"]
    assert crashed == [("worker", 1, 2, 1)]
    # Lambda's own retry (attempt 2) of the same request ran worker 2 of round 1 again.
    assert ("worker", 1, 2, 2, "success") in rows
    check_ledger(rows)
    assert Workspace(efs, "e2e").attempts(1, 2) == 2


@pytest.mark.slow
def test_a_worker_lost_after_its_retries_is_rescued_by_the_watchdog(make_service, tmp_path):
    svc = make_service("auto")
    efs = tmp_path / "efs"
    register(svc, efs, max_retry_attempts=0)  # a crash loses the event: only the watchdog helps
    kill = {"role": "worker", "at": "before_publish", "round": 2, "worker": 0, "action": "exit"}
    config = {**CONFIG, "faults": [kill], "stall_after_s": 2}
    reports = train(svc, efs, config, check=True)
    assert_same(final(efs), reference(CONFIG, N))
    rescues = [r for r in reports if r["status"] == "rescued"]
    assert len(rescues) == 1 and rescues[0]["round"] == 2 and rescues[0]["missing"] == [0]
    rows = attributed(svc)
    assert [(role, r, w) for role, r, w, _, status in rows if status != "success"] == [
        ("worker", 2, 0)
    ]
    check_ledger(rows)


@pytest.mark.slow
def test_a_worker_that_hangs_until_its_timeout_is_retried(make_service, tmp_path):
    svc = make_service("auto")
    efs = tmp_path / "efs"
    register(svc, efs, timeout_s=8)
    hang = {"role": "worker", "at": "after_publish", "round": 0, "worker": 3, "action": "hang"}
    train(svc, efs, {**CONFIG, "faults": [hang]})
    assert_same(final(efs), reference(CONFIG, N))
    rows = attributed(svc)
    assert [(role, r, w, status) for role, r, w, _, status in rows if status != "success"] == [
        ("worker", 0, 3, "timeout")
    ]
    check_ledger(rows)
