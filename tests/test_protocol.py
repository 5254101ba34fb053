"""The training protocol without Lambda: a directory as EFS, an in-memory Invoker, a scheduler.

The oracle for final weights is an in-process loop built from the pure pieces (sharding,
batches, worker contributions, combine), never from the protocol; equality is bit for bit
because both sides run the same float operations in the same order.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.aggregate import combine_gradient_averaging, combine_model_averaging
from simulator.algorithms import SGDConfig, gradient_contribution, local_sgd_contribution
from simulator.data import batches, get_dataset, shard_indices
from simulator.handler import handle, parse_event
from simulator.models import get_model
from simulator.progress import (
    RUN_ITEM_ROUND,
    DynamoProgressTable,
    RoundRow,
    RunRow,
    SqliteProgressTable,
    from_dynamo_item,
    to_dynamo_item,
)
from simulator.protocol import (
    Deadline,
    EventError,
    InjectedFault,
    Schedule,
    TrainingConfig,
    Workspace,
    check_stalled,
)

FN = "train"


class Ctx:
    """A Lambda context stand-in; `remaining` may be a callable for a clock that runs out."""

    def __init__(self, remaining: int | Callable[[], int] = 60_000, function_name: str = FN):
        self.aws_request_id = str(uuid.uuid4())
        self.function_name = function_name
        self._remaining = remaining

    def get_remaining_time_in_millis(self) -> int:
        r = self._remaining
        return r() if callable(r) else r


class Recorder:
    """An Invoker that records what would be sent (thread-safe)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.all: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def invoke_async(self, function_name: str, event: Any) -> None:
        assert function_name == FN
        copy = json.loads(json.dumps(event))  # what Lambda would deliver: JSON, no sharing
        with self._lock:
            self.sent.append(copy)
            self.all.append(copy)

    def take(self) -> list[dict[str, Any]]:
        with self._lock:
            out, self.sent = self.sent, []
            return out


def deliver(root: Path, event: dict[str, Any], inv: Recorder, ctx: Ctx | None = None) -> Any:
    return handle(event, ctx or Ctx(), efs_root=root, invoker=inv)


def drain(root: Path, inv: Recorder, retry_faults: bool = True, limit: int = 5000) -> int:
    """Deliver everything sent, in order, until quiet; an injected crash is retried (Lambda)."""
    pending = inv.take()
    n = 0
    while pending:
        n += 1
        assert n < limit
        event = pending.pop(0)
        try:
            deliver(root, event, inv)
        except InjectedFault:
            if retry_faults:
                pending.insert(0, event)
        pending.extend(inv.take())
    return n


def start_event(workers: int, config: dict[str, Any], run: str = "t") -> dict[str, Any]:
    return {"start": True, "workers": workers, "run": run, "config": config}


def summary_of(ws: Workspace) -> dict[str, Any]:
    summary = ws.final_summary()
    assert summary is not None, "the run has not finished"
    return summary


def run_row(table: SqliteProgressTable | DynamoProgressTable, run: str) -> RunRow:
    row = table.get_run(run)
    assert row is not None
    return row


def final_weights(root: Path, run: str = "t") -> list[np.ndarray]:
    return [np.array(a) for a in Workspace(root, run).final_weights()]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and mtime: 'nothing changed' is equality."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = p.stat()
            out[str(p.relative_to(root))] = (st_.st_size, st_.st_mtime_ns)
    return out


@lru_cache(maxsize=32)
def _reference(config_json: str, workers: int) -> tuple[np.ndarray, ...]:
    cfg = json.loads(config_json)
    ds = get_dataset(cfg["dataset"])
    model = get_model(
        cfg.get("model", "softmax"),
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
        **cfg.get("model_kwargs", {}),
    )
    sgd = SGDConfig(cfg.get("lr", 0.1), cfg.get("momentum", 0.0), cfg.get("weight_decay", 0.0))
    seed, bs, n = cfg.get("seed", 0), cfg.get("batch_size", 32), len(ds.y_train)
    per_shard = math.ceil(math.ceil(n / workers) / bs)
    steps = min(cfg.get("steps") or per_shard, per_shard)
    rounds_per_epoch = math.ceil(per_shard / steps)
    limits = []
    if cfg.get("max_rounds") is not None:
        limits.append(cfg["max_rounds"])
    if cfg.get("epochs", 1) is not None:
        limits.append(cfg.get("epochs", 1) * rounds_per_epoch)
    w = model.init_weights(seed)
    v = None
    for r in range(min(limits)):
        epoch, start = divmod(r, rounds_per_epoch)
        contribs = []
        for i in range(workers):
            idx = shard_indices(n, seed, epoch, workers, i)
            it = batches(ds.x_train, ds.y_train, idx, bs, model.input_shape, start * steps, steps)
            if cfg.get("algorithm", "gradient_averaging") == "gradient_averaging":
                contribs.append(gradient_contribution(model, w, it, i))
            else:
                contribs.append(local_sgd_contribution(model, w, it, sgd, i))
        if cfg.get("algorithm", "gradient_averaging") == "gradient_averaging":
            w, v, _ = combine_gradient_averaging(w, v, contribs, sgd)
        else:
            w, _ = combine_model_averaging(contribs, dtype=np.float32)
    return tuple(w)


def reference(config: dict[str, Any], workers: int) -> list[np.ndarray]:
    return list(_reference(json.dumps(config, sort_keys=True), workers))


def assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.array_equal(g, w), np.max(np.abs(g - w))


# 48 samples; 3 workers: shards of 16 = 4 batches of 4, 2 per round: 2 rounds per epoch.
SMALL = {
    "dataset": "synthetic:48",
    "batch_size": 4,
    "steps": 2,
    "max_rounds": 3,
    "epochs": None,
    "lr": 0.3,
}


# ---- events ---------------------------------------------------------------------------------
BAD_EVENTS = [
    ([], "event"),
    ("start", "event"),
    ({}, "event"),
    ({"frobnicate": True}, "event"),
    ({"start": True}, "workers"),
    ({"start": True, "workers": True}, "workers"),
    ({"start": True, "workers": 0}, "workers"),
    ({"start": True, "workers": -3}, "workers"),
    ({"start": True, "workers": "4"}, "workers"),
    ({"start": True, "workers": 2.0}, "workers"),
    ({"start": True, "workers": 10_001}, "workers"),
    ({"start": "yes", "workers": 2}, "start"),
    ({"start": False, "workers": 2}, "start"),
    ({"start": True, "workers": 2, "extra": 1}, "extra"),
    ({"start": True, "workers": 2, "round": 0}, "round"),
    ({"start": True, "workers": 2, "config": [1]}, "config"),
    ({"start": True, "workers": 2, "run": "../escape"}, "run"),
    ({"start": True, "workers": 2, "run": "/abs"}, "run"),
    ({"start": True, "workers": 2, "run": "a/b"}, "run"),
    ({"start": True, "workers": 2, "run": ""}, "run"),
    ({"start": True, "workers": 2, "run": ".."}, "run"),
    ({"start": True, "workers": 2, "run": 7}, "run"),
    ({"start": True, "workers": 2, "mount": "/etc"}, "mount"),
    ({"start": True, "workers": 2, "mount": "/mnt/../etc"}, "mount"),
    ({"workerno": 2, "workers": 2, "epochsdone": 0}, "workerno"),
    ({"workerno": -1, "workers": 2, "epochsdone": 0}, "workerno"),
    ({"workerno": True, "workers": 2, "epochsdone": 0}, "workerno"),
    ({"workerno": 0, "workers": 2}, "epochsdone"),
    ({"workerno": 0, "epochsdone": 0}, "workers"),
    ({"workerno": 0, "workers": 2, "epochsdone": 1.0}, "epochsdone"),
    ({"workerno": 0, "workers": 2, "epochsdone": -1}, "epochsdone"),
    ({"workerno": 0, "workers": 2, "epochsdone": 0, "round": "1"}, "round"),
    ({"workerno": 0, "workers": 2, "epochsdone": 0, "config": {}}, "config"),
    ({"combine": True, "workers": 2}, "epochsdone"),
    ({"combine": 1, "workers": 2, "epochsdone": 0}, "combine"),
    ({"combine": True, "workerno": 0, "workers": 2, "epochsdone": 0}, "combine"),
    ({"start": True, "combine": True, "workers": 2, "epochsdone": 0}, "combine"),
    ({"check": True, "start": True, "workers": 2}, "check"),
]


@pytest.mark.parametrize(("event", "field"), BAD_EVENTS)
def test_malformed_events_name_the_field_and_touch_nothing(tmp_path, event, field):
    efs = tmp_path / "efs"
    efs.mkdir()
    with pytest.raises(EventError) as info:
        deliver(efs, event, Recorder())
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, ValueError)
    assert list(efs.iterdir()) == []


BAD_CONFIGS = [
    ({"lr": -1}, "config.lr"),
    ({"lr": "fast"}, "config.lr"),
    ({"momentum": 1.0}, "config.momentum"),
    ({"algorithm": "adam"}, "config.algorithm"),
    ({"lrr": 0.1}, "config.lrr"),
    ({"epochs": None, "max_rounds": None}, "config.epochs"),
    ({"epochs": 0}, "config.epochs"),
    ({"batch_size": True}, "config.batch_size"),
    ({"steps": 0}, "config.steps"),
    ({"model": "nope"}, "config.model"),
    ({"dataset": "nope"}, "config.dataset"),
    ({"dataset": "/no/such/cifar"}, "config.dataset"),
    ({"model": "mlp", "model_kwargs": {"hidden": "x"}}, "config.model_kwargs"),
    ({"model_kwargs": {"bogus": 1}}, "config.model_kwargs"),
    ({"target_accuracy": 1.5}, "config.target_accuracy"),
    ({"seed": -1}, "config.seed"),
    ({"workers": 3}, "config.workers"),
    ({"mount": "/mnt/other"}, "config.mount"),
    ({"progress": "dynamodb"}, "config.progress_table"),
    ({"progress": "postgres"}, "config.progress"),
    ({"timeout_s": 901}, "config.timeout_s"),
    ({"faults": [{"role": "worker", "at": "nowhere"}]}, "config.faults[0].at"),
    (
        {"faults": [{"role": "worker", "at": "start", "action": "explode"}]},
        "config.faults[0].action",
    ),
]


@pytest.mark.parametrize(("config", "field"), BAD_CONFIGS)
def test_malformed_start_configs_name_the_field_and_touch_nothing(tmp_path, config, field):
    efs = tmp_path / "efs"
    efs.mkdir()
    with pytest.raises(EventError) as info:
        deliver(efs, start_event(2, {**SMALL, **config}), Recorder())
    assert info.value.field == field, info.value
    assert list(efs.iterdir()) == []


def test_events_that_contradict_the_run_are_rejected_without_changes(tmp_path):
    inv = Recorder()
    deliver(tmp_path, start_event(2, SMALL), inv)
    before = tree(tmp_path)
    sent = inv.take()
    bad = [
        ({**sent[0], "workers": 3, "workerno": 0}, "workers"),
        ({**sent[0], "epochsdone": 1}, "epochsdone"),  # round 0 is in epoch 0
        ({**sent[0], "round": 2, "epochsdone": 0}, "round"),  # not started
        ({"combine": True, "workers": 2, "epochsdone": 1, "round": 5, "run": "t"}, "round"),
        ({"workerno": 0, "workers": 2, "epochsdone": 0, "run": "other"}, "run"),
        (start_event(2, {**SMALL, "lr": 0.4}), "config"),
        (start_event(3, SMALL), "workers"),
        ({"start": True, "workers": 3, "run": "t"}, "workers"),
    ]
    for event, field in bad:
        with pytest.raises(EventError) as info:
            deliver(tmp_path, event, inv)
        assert info.value.field == field, (event, info.value)
    assert tree(tmp_path) == before
    assert inv.take() == []


def test_thesis_events_parse_and_default():
    req = parse_event({"workerno": 3, "workers": 5, "epochsdone": 6})
    assert (req.role, req.worker, req.workers, req.epochsdone, req.round) == (
        "worker",
        3,
        5,
        6,
        None,
    )
    assert (req.run, req.mount) == ("default", "/mnt/efs")
    assert parse_event({"start": True, "workers": 5}).role == "start"
    assert parse_event({"combine": True, "workers": 5, "epochsdone": 6}).role == "combine"


def test_schedule_maps_rounds_to_epochs():
    s = Schedule(n_train=1437, workers=4, batch_size=32, steps=5)
    # shards of 360/359 samples -> 12 batches; 5 per round -> 3 rounds per epoch (5, 5, 2).
    assert (s.batches_per_shard, s.steps_per_round, s.rounds_per_epoch) == (12, 5, 3)
    assert [s.epoch(r) for r in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    assert [s.start_step(r) for r in range(4)] == [0, 5, 10, 0]
    assert s.epochs_done_after(2) == 1.0
    whole = Schedule(1437, 4, 32, None)
    assert (whole.steps_per_round, whole.rounds_per_epoch, whole.epoch(6)) == (12, 1, 6)
    assert Schedule(10, 4, 32, 100).rounds_per_epoch == 1


def test_thesis_event_without_round_means_first_round_of_the_epoch(tmp_path):
    inv = Recorder()
    config = {**SMALL, "max_rounds": 8}  # 16 samples per shard, 4 batches, 2 per round: R = 2
    deliver(tmp_path, start_event(3, config), inv)
    inv.take()
    out = deliver(tmp_path, {"workerno": 1, "workers": 3, "epochsdone": 0, "run": "t"}, inv)
    assert out["round"] == 0 and out["status"] == "computed"


# ---- the whole protocol ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        {**SMALL, "momentum": 0.9},
        {**SMALL, "algorithm": "model_averaging", "steps": 2},
        {**SMALL, "steps": None, "max_rounds": None, "epochs": 2},
        {**SMALL, "model": "mlp", "model_kwargs": {"hidden": [5]}, "steps": 3, "max_rounds": 5},
    ],
    ids=["ga-momentum", "model-averaging", "full-epochs", "mlp"],
)
def test_run_to_the_end_equals_the_in_process_reference(tmp_path, config):
    inv = Recorder()
    deliver(tmp_path, start_event(3, config), inv)
    drain(tmp_path, inv)
    assert_same(final_weights(tmp_path), reference(config, 3))
    ws = Workspace(tmp_path, "t")
    summary = summary_of(ws)
    table = SqliteProgressTable(ws.progress_path)
    rows = table.rounds("t")
    assert [r.round for r in rows] == list(range(summary["rounds"]))
    assert all(r.status == "combined" and (r.samples or 0) > 0 for r in rows)
    assert rows[-1].note == summary["reason"]
    run = run_row(table, "t")
    assert run.status == "finished" and run.rounds_done == summary["rounds"]
    # Bounded history: only the last `history` (2) rounds of weights stay.
    assert ws.weight_rounds() == [summary["rounds"] - 1, summary["rounds"]]


def test_n1_gradient_averaging_equals_plain_minibatch_descent_bit_for_bit(tmp_path):
    # The oracle is the textbook loop: one step per mini-batch on its mean gradient, in float64
    # rounded once to float32 (the precision SGDConfig documents), with the velocity kept in
    # float32. 200 samples / batch 16 = 13 batches per epoch, so 20 rounds cross an epoch.
    config = {
        "dataset": "synthetic:200",
        "batch_size": 16,
        "steps": 1,
        "max_rounds": 20,
        "epochs": None,
        "lr": 0.2,
        "momentum": 0.5,
        "seed": 3,
    }
    inv = Recorder()
    deliver(tmp_path, start_event(1, config), inv)
    drain(tmp_path, inv)
    ds = get_dataset("synthetic:200")
    model = get_model("softmax", input_shape=ds.input_shape, num_classes=ds.num_classes)
    w = model.init_weights(3)
    v = [np.zeros_like(a) for a in w]
    step = 0
    for epoch in range(2):
        idx = shard_indices(len(ds.y_train), 3, epoch, 1, 0)
        for x, y in batches(ds.x_train, ds.y_train, idx, 16, model.input_shape):
            if step == 20:
                break
            _, grads = model.loss_and_grad_sum(w, x, y)
            new_w = []
            for i, (wi, gi) in enumerate(zip(w, grads, strict=True)):
                d = 0.5 * v[i].astype(np.float64) + gi.astype(np.float64) / len(y)
                v[i] = d.astype(np.float32)
                new_w.append((wi.astype(np.float64) - 0.2 * d).astype(np.float32))
            w = new_w
            step += 1
    assert step == 20
    assert_same(final_weights(tmp_path), w)


# ---- at-least-once delivery -----------------------------------------------------------------
def test_a_duplicate_worker_counts_once_and_leaves_the_published_result_alone(tmp_path):
    inv = Recorder()
    deliver(tmp_path, start_event(3, SMALL), inv)
    first, *_ = inv.take()
    assert deliver(tmp_path, first, inv)["status"] == "computed"
    ws = Workspace(tmp_path, "t")
    published = tree(ws.result_dir(0, 0))
    again = deliver(tmp_path, first, inv)
    assert (again["status"], again["arrived"], again["arrivals"]) == ("duplicate", False, 1)
    assert tree(ws.result_dir(0, 0)) == published
    assert ws.arrivals(0).members() == {"0"} and inv.take() == []


FAULT_POINTS = [
    ("worker", "start"),
    ("worker", "mid_round"),
    ("worker", "before_publish"),
    ("worker", "after_publish"),
    ("worker", "after_arrival"),
    ("combine", "start"),
    ("combine", "after_publish"),
]


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    data=st.data(),
    algorithm=st.sampled_from(["gradient_averaging", "model_averaging"]),
    faults=st.lists(
        st.tuples(st.sampled_from(FAULT_POINTS), st.integers(0, 2), st.integers(0, 2)),
        max_size=3,
    ),
)
def test_duplicates_reorderings_and_retries_never_change_the_final_weights(
    tmp_path_factory, data, algorithm, faults
):
    root = tmp_path_factory.mktemp("efs")
    config = {
        **SMALL,
        "algorithm": algorithm,
        "momentum": 0.5 if algorithm == "gradient_averaging" else 0.0,
        "faults": [
            {"role": role, "at": at, "round": r, "worker": None if role == "combine" else w}
            for (role, at), r, w in faults
        ],
    }
    inv = Recorder()
    first = start_event(3, config)
    pending = [first, dict(first)]  # the start itself is duplicated
    deliveries: Counter[str] = Counter()
    while pending:
        i = data.draw(st.integers(0, len(pending) - 1), label="pick")
        event = pending[i]
        key = json.dumps(event, sort_keys=True)
        keep = deliveries[key] < 2 and data.draw(st.booleans(), label="duplicate")
        if not keep:
            pending.pop(i)
        deliveries[key] += 1
        try:
            deliver(root, event, inv)
        except InjectedFault:
            if not keep:
                pending.append(event)  # Lambda's retry of a failed async event
        pending.extend(inv.take())
    assert_same(
        final_weights(root), reference({k: v for k, v in config.items() if k != "faults"}, 3)
    )
    # However often events arrived, each round invoked exactly N workers and one combine.
    sent = Counter((("w" if "workerno" in e else "c"), e["round"]) for e in inv.all)
    rounds = summary_of(Workspace(root, "t"))["rounds"]
    assert sent == Counter(
        {**{("w", r): 3 for r in range(rounds)}, **{("c", r): 1 for r in range(rounds)}}
    )


def _race_round(root: Path, inv: Recorder, events: list[dict[str, Any]], copies: int) -> None:
    """Deliver every event `copies` times, all at once from as many threads."""
    calls = [e for e in events for _ in range(copies)]
    barrier = threading.Barrier(len(calls))

    def one(event: dict[str, Any]) -> None:
        barrier.wait()
        deliver(root, event, inv)

    with ThreadPoolExecutor(len(calls)) as pool:
        for f in [pool.submit(one, e) for e in calls]:
            f.result()


def test_64_workers_arriving_at_once_trigger_one_combine_and_one_fanout_per_round(tmp_path):
    n = 64
    config = {
        "dataset": "synthetic:640",
        "batch_size": 8,
        "steps": None,
        "max_rounds": 4,
        "epochs": None,
        "lr": 0.3,
    }
    inv = Recorder()
    deliver(tmp_path, start_event(n, config), inv)
    workers = inv.take()
    for r in range(4):
        assert sorted(e["workerno"] for e in workers) == list(range(n))
        assert all(e["round"] == r for e in workers)
        _race_round(tmp_path, inv, workers, copies=2)  # 128 concurrent worker deliveries
        combines = inv.take()
        assert len(combines) == 1 and combines[0]["combine"] is True and combines[0]["round"] == r
        _race_round(tmp_path, inv, combines, copies=8)  # 8 concurrent duplicate combines
        workers = inv.take()
        if r < 3:
            assert len(workers) == n
    assert workers == []
    assert_same(final_weights(tmp_path), reference(config, n))


def _process_deliver(args: tuple[str, list[dict[str, Any]], str]) -> None:
    root, events, out = args

    class FileRecorder(Recorder):
        def invoke_async(self, function_name: str, event: Any) -> None:
            line = (json.dumps(event) + "\n").encode()
            fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, line)  # one write per line: appends never interleave
            finally:
                os.close(fd)

    for event in events:
        deliver(Path(root), event, FileRecorder())


def test_workers_racing_from_processes_trigger_exactly_one_combine(tmp_path):
    import multiprocessing

    n = 16
    config = {"dataset": "synthetic:160", "batch_size": 8, "max_rounds": 1, "lr": 0.3}
    inv = Recorder()
    deliver(tmp_path, start_event(n, config), inv)
    workers = inv.take()
    out = tmp_path / "sent.jsonl"
    # 8 processes, each delivering every worker event (in a different order): 8 duplicates each.
    jobs = [(str(tmp_path), workers[k:] + workers[:k], str(out)) for k in range(0, n, 2)]
    with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
        pool.map(_process_deliver, jobs)
    sent = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(sent) == 1 and sent[0]["combine"] is True
    assert len(Workspace(tmp_path, "t").arrivals(0).members()) == n


@pytest.mark.parametrize(("role", "at"), FAULT_POINTS)
def test_a_crash_at_any_point_is_rerun_with_an_unchanged_result(tmp_path, role, at):
    config = {
        **SMALL,
        "faults": [{"role": role, "at": at, "round": 1, "worker": 1 if role == "worker" else None}],
    }
    inv = Recorder()
    deliver(tmp_path, start_event(3, config), inv)
    ws = Workspace(tmp_path, "t")
    pending = inv.take()
    crashed = None
    while pending:
        event = pending.pop(0)
        try:
            deliver(tmp_path, event, inv)
        except InjectedFault:
            crashed = event
            # What the crash left behind, before Lambda retries the event:
            if role == "worker":
                assert ws.has_result(1, 1) == (at in ("after_publish", "after_arrival"))
                assert ("1" in ws.arrivals(1).members()) == (at == "after_arrival")
            else:
                assert ws.has_weights(2) == (at == "after_publish")
            pending.append(event)
        pending.extend(inv.take())
    assert crashed is not None and crashed["round"] == 1
    assert_same(final_weights(tmp_path), reference(SMALL, 3))
    # The crashed worker's retry left one attempt marker more than the rest.
    if role == "worker":
        assert ws.attempts(1, 1) == 2 and ws.attempts(1, 0) == 1


def test_early_stop_publishes_partial_work_with_its_sample_count(tmp_path):
    config = {**SMALL, "batch_size": 8, "steps": 5, "max_rounds": 1, "safety_margin_ms": 1000}
    inv = Recorder()
    deliver(tmp_path, start_event(1, config), inv)
    (event,) = inv.take()
    calls = 0

    def clock() -> int:
        nonlocal calls
        calls += 1
        # Plenty of time for the first 3 deadline checks, then less than the safety margin.
        return 30_000 if calls <= 3 else 900

    out = deliver(tmp_path, event, inv, Ctx(remaining=clock))
    assert out["partial"] is True and out["samples"] == 3 * 8
    ws = Workspace(tmp_path, "t")
    c, meta = ws.read_result(0, 0)
    assert (meta["steps"], meta["steps_planned"], meta["partial"]) == (3, 5, True)
    assert c.samples == 24
    ds = get_dataset("synthetic:48")
    model = get_model("softmax", input_shape=ds.input_shape, num_classes=10)
    idx = shard_indices(len(ds.y_train), 0, 0, 1, 0)
    want = gradient_contribution(
        model, model.init_weights(0), batches(ds.x_train, ds.y_train, idx, 8, (8, 8, 1), 0, 3), 0
    )
    assert_same([np.array(a) for a in c.arrays], want.arrays)
    assert c.loss_sum == want.loss_sum
    # The combine uses what was done: one round over 24 samples.
    drain(tmp_path, inv)
    assert SqliteProgressTable(ws.progress_path).rounds("t")[0].samples == 24


def test_a_worker_out_of_time_before_its_first_step_publishes_zero_samples(tmp_path):
    inv = Recorder()
    deliver(tmp_path, start_event(2, {**SMALL, "max_rounds": 1}), inv)
    first, second = inv.take()
    out = deliver(tmp_path, first, inv, Ctx(remaining=10))
    assert out["samples"] == 0 and out["partial"] is True
    deliver(tmp_path, second, inv)
    drain(tmp_path, inv)
    assert SqliteProgressTable(Workspace(tmp_path, "t").progress_path).rounds("t")[0].samples == 8


def test_deadline_reserve_grows_with_the_measured_step_time(monkeypatch):
    ticks = iter([0.0, 0.0, 0.3, 0.6])
    remaining = [5000, 5000, 1500, 1500]
    ctx = Ctx(remaining=lambda: remaining.pop(0))
    d = Deadline(ctx, reserve_ms=1000.0, step_hint_ms=None)
    monkeypatch.setattr("simulator.protocol.time.perf_counter", lambda: next(ticks))
    assert d() is False  # no step measured yet: 5000 >= 1000
    assert d() is False  # a 0 ms step
    assert d() is True  # a 300 ms step: 1500 < 1000 + 2 * 300
    monkeypatch.undo()
    assert d.max_step_ms == pytest.approx(300.0)


# ---- liveness -------------------------------------------------------------------------------
def _age(ws: Workspace, seconds: float) -> None:
    """Move every claim's and weights directory's time `seconds` into the past."""
    for top in ("claims", "weights"):
        for dirpath, dirnames, filenames in os.walk(ws.root / top):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st_ = p.stat()
                os.utime(p, (st_.st_atime - seconds, st_.st_mtime - seconds))
    st_ = ws.config_path.stat()
    os.utime(ws.config_path, (st_.st_atime - seconds, st_.st_mtime - seconds))


def _drop_failures(root: Path, inv: Recorder) -> None:
    """Deliver until quiet; a crashed event is dropped (all of Lambda's retries spent)."""
    drain(root, inv, retry_faults=False)


def test_check_before_the_deadline_does_nothing(tmp_path):
    inv = Recorder()
    deliver(tmp_path, start_event(2, {**SMALL, "stall_after_s": 60}), inv)
    inv.take()
    ws = Workspace(tmp_path, "t")
    report = check_stalled(ws, inv)
    assert report["status"] == "running" and report["missing"] == [0, 1]
    assert inv.take() == []


@pytest.mark.parametrize(
    ("role", "at"),
    [
        ("worker", "start"),
        ("worker", "after_publish"),
        ("combine", "start"),
        ("combine", "after_publish"),
        ("combine", "after_fanout_claim"),
        ("start", "after_fanout_claim"),
    ],
)
def test_a_lost_invocation_is_rescued_by_the_watchdog(tmp_path, role, at):
    faults = [{"role": role, "at": at, "round": 1 if role != "start" else 0}]
    config = {**SMALL, "stall_after_s": 5, "faults": faults}
    inv = Recorder()
    ws = Workspace(tmp_path, "t")
    try:
        deliver(tmp_path, start_event(3, config), inv)
    except InjectedFault:
        assert role == "start"
    _drop_failures(tmp_path, inv)
    assert ws.final_summary() is None  # stuck without the watchdog
    assert check_stalled(ws, inv)["status"] == "running"
    _age(ws, 6)  # the round was fanned out (or its weights published) 6 s ago
    # Eight watchdogs at the same moment: one rescues, the others see it done.
    with ThreadPoolExecutor(8) as pool:
        reports = list(pool.map(lambda _: check_stalled(ws, inv), range(8)))
    statuses = sorted(r["status"] for r in reports)
    assert statuses.count("rescued") == 1 and set(statuses) <= {"rescued", "rescuing", "running"}
    # The rescue restarts the clock: no second rescue before another stall period.
    assert check_stalled(ws, inv)["status"] == "running"
    _drop_failures(tmp_path, inv)
    assert check_stalled(ws, inv)["status"] == "finished"
    assert_same(final_weights(tmp_path), reference(SMALL, 3))


def test_a_worker_that_never_arrives_fails_the_run_with_the_reason(tmp_path):
    faults = [{"role": "worker", "at": "start", "round": 1, "worker": 2, "times": 100}]
    config = {**SMALL, "stall_after_s": 5, "max_rescues": 2, "faults": faults}
    inv = Recorder()
    deliver(tmp_path, start_event(3, config), inv)
    _drop_failures(tmp_path, inv)
    ws = Workspace(tmp_path, "t")
    statuses = []
    for _ in range(4):
        statuses.append(check_stalled(ws, inv, now=time.time() + 6)["status"])
        _drop_failures(tmp_path, inv)
    assert statuses == ["rescued", "rescued", "failed", "failed"]
    reason = "round 1: worker 2 never arrived after 3 attempts"
    assert ws.failure() == reason
    table = SqliteProgressTable(ws.progress_path)
    run = run_row(table, "t")
    assert (run.status, run.reason) == ("failed", reason)
    assert table.rounds("t")[1].status == "failed" and table.rounds("t")[1].note == reason
    # Every role now declines politely; nothing is sent.
    out = deliver(
        tmp_path, {"workerno": 2, "workers": 3, "epochsdone": 0, "round": 1, "run": "t"}, inv
    )
    assert out["status"] == "failed" and inv.take() == []


def test_check_role_through_the_handler(tmp_path):
    inv = Recorder()
    assert deliver(tmp_path, {"check": True, "run": "nobody"}, inv)["status"] == "no_run"
    deliver(tmp_path, start_event(2, SMALL), inv)
    assert deliver(tmp_path, {"check": True, "run": "t"}, inv)["status"] == "running"


# ---- progress table -------------------------------------------------------------------------
def test_sqlite_progress_table_upserts_and_reads_while_written(tmp_path):
    table = SqliteProgressTable(tmp_path / "p.sqlite")
    assert table.get_run("r") is None and table.rounds("r") == []
    table.run_started(
        "r",
        workers=4,
        algorithm="gradient_averaging",
        model="softmax",
        dataset="digits",
        started_at=1.0,
    )
    table.round_started("r", 0, epoch=0, workers=4, started_at=2.0)
    reader = SqliteProgressTable(tmp_path / "p.sqlite")
    assert reader.rounds("r") == [
        RoundRow("r", 0, "running", epoch=0, workers=4, started_at=2.0, updated_at=2.0)
    ]
    table.round_combined(
        "r",
        0,
        epoch=0,
        epochs_done=0.5,
        workers=4,
        samples=128,
        train_loss=2.0,
        loss=float("nan"),
        accuracy=0.5,
        worker_ms_max=3.0,
        worker_ms_mean=2.0,
        combine_ms=1.0,
        combined_at=3.0,
    )
    row = reader.rounds("r")[0]
    assert (row.status, row.samples, row.loss, row.started_at) == ("combined", 128, None, 2.0)
    table.run_finished("r", status="finished", reason="done", at=4.0, rounds_done=1)
    run = run_row(reader, "r")
    assert (run.status, run.reason, run.rounds_done, run.started_at) == ("finished", "done", 1, 1.0)
    with pytest.raises(ValueError, match="status"):
        table.run_finished("r", status="weird", reason="", at=5.0)


def test_sqlite_progress_table_survives_concurrent_writers(tmp_path):
    path = tmp_path / "p.sqlite"

    def write(r: int) -> None:
        SqliteProgressTable(path).round_started("r", r, epoch=0, workers=1, started_at=float(r))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write, range(64)))
    assert [row.round for row in SqliteProgressTable(path).rounds("r")] == list(range(64))


class FakeDynamoTable:
    """The slice of boto3's Table resource DynamoProgressTable uses."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, int], dict[str, Any]] = {}
        self.puts = 0

    def get_item(self, Key: dict[str, Any], ConsistentRead: bool = False) -> dict[str, Any]:
        item = self.items.get((Key["run_id"], Key["round"]))
        return {} if item is None else {"Item": dict(item)}

    def put_item(self, Item: dict[str, Any]) -> None:
        for value in Item.values():
            assert not isinstance(value, float), "boto3 refuses floats; use Decimal"
        self.puts += 1
        self.items[(Item["run_id"], Item["round"])] = dict(Item)

    def query(
        self,
        KeyConditionExpression: Any,
        ConsistentRead: bool = False,
        ExclusiveStartKey: Any = None,
    ) -> dict[str, Any]:
        # Evaluate Key("run_id").eq(x) & Key("round").gte(y) from boto3's condition objects.
        expr = KeyConditionExpression.get_expression()
        assert expr["operator"] == "AND"
        eq, gte = (c.get_expression() for c in expr["values"])
        run = eq["values"][1]
        low = gte["values"][1]
        items = [dict(v) for (r, k), v in sorted(self.items.items()) if r == run and k >= low]
        # Two pages, to exercise pagination.
        if ExclusiveStartKey is None and len(items) > 1:
            return {
                "Items": items[:1],
                "LastEvaluatedKey": {"run_id": run, "round": items[0]["round"]},
            }
        if ExclusiveStartKey is not None:
            items = [i for i in items if i["round"] > ExclusiveStartKey["round"]]
        return {"Items": items}


def test_dynamo_item_mapping_round_trips():
    item = to_dynamo_item(
        "r",
        3,
        "round",
        {
            "status": "combined",
            "samples": 12,
            "loss": 0.1,
            "accuracy": None,
            "train_loss": float("inf"),
        },
    )
    assert item == {
        "run_id": "r",
        "round": 3,
        "item": "round",
        "status": "combined",
        "samples": 12,
        "loss": Decimal("0.1"),
    }
    row = from_dynamo_item(item)
    assert row == RoundRow("r", 3, "combined", samples=12, loss=0.1)
    assert isinstance(row.samples, int) and isinstance(row.loss, float)
    run = from_dynamo_item(
        {
            "run_id": "r",
            "round": RUN_ITEM_ROUND,
            "item": "run",
            "status": "running",
            "workers": Decimal(4),
            "epochs_done": Decimal("1.5"),
        }
    )
    assert run == RunRow("r", "running", workers=4, epochs_done=1.5)
    with pytest.raises(TypeError, match="samples"):
        to_dynamo_item("r", 0, "round", {"samples": [1]})
    with pytest.raises(ValueError, match="item"):
        from_dynamo_item({"run_id": "r", "round": 0})


def test_dynamo_progress_table_keeps_the_same_interface():
    fake = FakeDynamoTable()
    table = DynamoProgressTable(table=fake)
    table.run_started(
        "r", workers=2, algorithm="model_averaging", model="mlp", dataset="digits", started_at=1.0
    )
    for r in range(3):
        table.round_started("r", r, epoch=r, workers=2, started_at=10.0 + r)
        table.round_combined(
            "r",
            r,
            epoch=r,
            epochs_done=r + 1.0,
            workers=2,
            samples=7,
            train_loss=1.5,
            loss=1.25,
            accuracy=0.75,
            worker_ms_max=2.0,
            worker_ms_mean=1.0,
            combine_ms=0.5,
            combined_at=20.0 + r,
        )
    table.run_finished("r", status="finished", reason="epochs", at=30.0, rounds_done=3)
    rows = table.rounds("r")
    assert [r.round for r in rows] == [0, 1, 2]
    assert rows[2] == RoundRow(
        "r",
        2,
        "combined",
        epoch=2,
        epochs_done=3.0,
        workers=2,
        samples=7,
        train_loss=1.5,
        loss=1.25,
        accuracy=0.75,
        worker_ms_max=2.0,
        worker_ms_mean=1.0,
        combine_ms=0.5,
        started_at=12.0,
        combined_at=22.0,
        updated_at=22.0,
    )
    run = run_row(table, "r")
    assert (run.status, run.rounds_done, run.loss, run.started_at) == ("finished", 3, 1.25, 1.0)
    assert fake.items[("r", RUN_ITEM_ROUND)]["item"] == "run"
    assert DynamoProgressTable(table=FakeDynamoTable()).get_run("x") is None


def test_config_round_trips_through_json():
    cfg = TrainingConfig.from_mapping({**SMALL, "faults": [{"role": "worker", "at": "start"}]}, 4)
    again = TrainingConfig.from_mapping(json.loads(json.dumps(cfg.to_json())))
    assert again == cfg
    # (1 + 2 retries) x 900 s timeout + 1 and 2 minute retry delays + 1 minute of slack.
    assert cfg.stall_after() == 3 * 900 + 180 + 60
    assert TrainingConfig.from_mapping({**SMALL, "timeout_s": 10}, 4).stall_after() == 270


def test_a_bare_thesis_start_takes_the_code_directory_defaults(tmp_path):
    example = Path(__file__).resolve().parent.parent / "examples" / "numpy_digits"
    inv = Recorder()
    out = handle(
        {"start": True, "workers": 2},
        Ctx(),
        efs_root=tmp_path,
        invoker=inv,
        environ={"LAMBDA_TASK_ROOT": str(example)},
    )
    assert out["status"] == "started" and out["run"] == "default"
    cfg = Workspace(tmp_path, "default").read_config()
    defaults = json.loads((example / "config.json").read_text())
    assert (cfg.model, cfg.dataset, cfg.lr, cfg.epochs) == (
        defaults["model"],
        defaults["dataset"],
        defaults["lr"],
        defaults["epochs"],
    )
    assert (cfg.workers, cfg.function_name, cfg.timeout_s) == (2, FN, 60)
    assert [e["workerno"] for e in inv.take()] == [0, 1]
    # The same bare start again (at-least-once) changes nothing and fans out nothing.
    again = handle(
        {"start": True, "workers": 2},
        Ctx(),
        efs_root=tmp_path,
        invoker=inv,
        environ={"LAMBDA_TASK_ROOT": str(example)},
    )
    assert again["status"] == "duplicate" and inv.take() == []
