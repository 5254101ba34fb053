"""Sharded aggregation through the protocol: a directory as EFS, an in-memory Invoker.

Two oracles. Bit for bit: an in-process loop that aggregates exactly as the sharded protocol
does (``partial_sums`` per shard, then the ordinary combine over the partials, both in id order),
built from the pure pieces, never from the protocol. Within a stated tolerance: the single
combiner (the in-process reference of tests/test_protocol.py, itself bit-equal to the protocol's
single-combiner run), since sharding adds the same terms in a different association.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.aggregate import (
    combine_gradient_averaging,
    combine_model_averaging,
    partial_sums,
    shard_of,
)
from simulator.algorithms import SGDConfig, gradient_contribution, local_sgd_contribution
from simulator.data import batches, get_dataset, shard_indices
from simulator.handler import parse_event
from simulator.models import get_model
from simulator.protocol import (
    EventError,
    InjectedFault,
    TrainingConfig,
    Workspace,
    check_stalled,
)

from .test_protocol import (
    SMALL,
    Recorder,
    _age,
    _drop_failures,
    assert_same,
    deliver,
    drain,
    final_weights,
    start_event,
    summary_of,
    tree,
)
from .test_protocol import reference as single_reference

ROOT = Path(__file__).resolve().parent.parent
SHARDED = {**SMALL, "aggregation": "sharded"}
# 8 workers over 160 samples: shards of 20 = 5 batches of 4; 2 per round: 3 rounds per epoch.
EIGHT = {**SHARDED, "dataset": "synthetic:160", "max_rounds": 4}


@lru_cache(maxsize=32)
def _sharded_reference(config_json: str, workers: int, shards: int) -> tuple[np.ndarray, ...]:
    cfg = json.loads(config_json)
    ds = get_dataset(cfg["dataset"])
    model = get_model(
        cfg.get("model", "softmax"),
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
        **cfg.get("model_kwargs", {}),
    )
    algorithm = cfg.get("algorithm", "gradient_averaging")
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
            if algorithm == "gradient_averaging":
                contribs.append(gradient_contribution(model, w, it, i))
            else:
                contribs.append(local_sgd_contribution(model, w, it, sgd, i))
        # Each aggregator sees only its own shard's contributions, as in the protocol.
        partials = []
        for k in range(shards):
            mine = [c for c in contribs if shard_of(c.worker, shards) == k]
            partials.extend(partial_sums(mine, shards, algorithm))
        if algorithm == "gradient_averaging":
            w, v, _ = combine_gradient_averaging(w, v, partials, sgd)
        else:
            w, _ = combine_model_averaging(partials, dtype=np.float32)
    return tuple(w)


def sharded_reference(config: dict[str, Any], workers: int, shards: int) -> list[np.ndarray]:
    plain = {k: v for k, v in config.items() if k not in ("aggregation", "shards", "faults")}
    return list(_sharded_reference(json.dumps(plain, sort_keys=True), workers, shards))


def run_to_end(root: Path, config: dict[str, Any], workers: int) -> list[np.ndarray]:
    inv = Recorder()
    deliver(root, start_event(workers, config), inv)
    drain(root, inv)
    return final_weights(root)


def kinds(events: list[dict[str, Any]]) -> Counter[tuple[str, int, int | None]]:
    """(role, round, worker or shard) of each sent event."""
    out: Counter[tuple[str, int, int | None]] = Counter()
    for e in events:
        if "workerno" in e:
            out[("w", e["round"], e["workerno"])] += 1
        elif "aggregate" in e:
            out[("a", e["round"], e["shard"])] += 1
        elif "combine" in e:
            out[("c", e["round"], None)] += 1
    return out


def expected_kinds(rounds: int, workers: int, shards: int) -> Counter[tuple[str, int, int | None]]:
    want: Counter[tuple[str, int, int | None]] = Counter()
    for r in range(rounds):
        want.update({("w", r, i): 1 for i in range(workers)})
        want.update({("a", r, k): 1 for k in range(shards)})
        want[("c", r, None)] = 1
    return want


# ---- config and events ------------------------------------------------------------------------
@pytest.mark.parametrize(("workers", "shards"), [(1, 1), (2, 2), (4, 2), (8, 3), (9, 3), (64, 8)])
def test_default_shard_count_is_ceil_sqrt_n(workers, shards):
    cfg = TrainingConfig.from_mapping({**SHARDED}, workers)
    assert cfg.shards == shards == math.ceil(math.sqrt(workers))
    # Every worker is in exactly one shard, and every shard has at least one worker.
    members = [i for k in range(shards) for i in cfg.shard_workers(k)]
    assert sorted(members) == list(range(workers)) and all(
        cfg.shard_workers(k) for k in range(shards)
    )
    assert TrainingConfig.from_mapping(json.loads(json.dumps(cfg.to_json()))) == cfg


def test_single_aggregation_is_the_default_and_has_no_shards():
    cfg = TrainingConfig.from_mapping(SMALL, 4)
    assert (cfg.aggregation, cfg.shards, cfg.sharded) == ("single", None, False)


@pytest.mark.parametrize(
    ("values", "field", "words"),
    [
        ({"aggregation": "tree"}, "config.aggregation", "'single', 'sharded'"),
        ({"aggregation": None}, "config.aggregation", "'single', 'sharded'"),
        ({"shards": 2}, "config.shards", "only applies when aggregation is 'sharded'"),
        ({"aggregation": "sharded", "shards": 0}, "config.shards", "from 1 to 4"),
        ({"aggregation": "sharded", "shards": 5}, "config.shards", "from 1 to 4"),
        ({"aggregation": "sharded", "shards": 2.0}, "config.shards", "integer"),
        ({"aggregation": "sharded", "shards": True}, "config.shards", "integer"),
    ],
)
def test_bad_aggregation_settings_name_the_field(values, field, words):
    with pytest.raises(EventError) as info:
        TrainingConfig.from_mapping({**SMALL, **values}, 4)
    assert info.value.field == field and words in info.value.message


BAD_AGGREGATE_EVENTS = [
    ({"aggregate": True, "workers": 2, "epochsdone": 0}, "shard"),
    ({"aggregate": True, "shard": 0, "epochsdone": 0}, "workers"),
    ({"aggregate": True, "shard": 0, "workers": 2}, "epochsdone"),
    ({"aggregate": 1, "shard": 0, "workers": 2, "epochsdone": 0}, "aggregate"),
    ({"aggregate": True, "shard": 2, "workers": 2, "epochsdone": 0}, "shard"),
    ({"aggregate": True, "shard": -1, "workers": 2, "epochsdone": 0}, "shard"),
    ({"aggregate": True, "shard": "0", "workers": 2, "epochsdone": 0}, "shard"),
    ({"aggregate": True, "shard": 0, "workers": 2, "epochsdone": 0, "workerno": 0}, "aggregate"),
    ({"aggregate": True, "shard": 0, "workers": 2, "epochsdone": 0, "config": {}}, "config"),
    ({"aggregate": True, "shard": 0, "workers": 2, "epochsdone": 0, "run": "../x"}, "run"),
]


@pytest.mark.parametrize(("event", "field"), BAD_AGGREGATE_EVENTS)
def test_malformed_aggregate_events_name_the_field_and_touch_nothing(tmp_path, event, field):
    before = tree(tmp_path)
    with pytest.raises(EventError) as info:
        deliver(tmp_path, event, Recorder())
    assert info.value.field == field
    assert tree(tmp_path) == before


def test_an_aggregate_event_parses_with_its_shard():
    req = parse_event({"aggregate": True, "shard": 1, "workers": 4, "epochsdone": 0, "round": 0})
    assert (req.role, req.shard, req.workers, req.round) == ("aggregate", 1, 4, 0)


@pytest.mark.parametrize(
    ("config", "event", "field"),
    [
        # A single-combiner run has no aggregators.
        (SMALL, {"shard": 0}, "aggregate"),
        # 3 workers -> 2 shards by default: shard 2 is not one of them.
        (SHARDED, {"shard": 2}, "shard"),
        (SHARDED, {"shard": 0, "workers": 4}, "workers"),
        (SHARDED, {"shard": 0, "round": 1, "epochsdone": 1}, "epochsdone"),
        (SHARDED, {"shard": 0, "round": 2, "epochsdone": 1}, "round"),
    ],
)
def test_aggregate_events_that_contradict_the_run_are_rejected_without_changes(
    tmp_path, config, event, field
):
    inv = Recorder()
    deliver(tmp_path, start_event(3, config), inv)
    inv.take()  # round 0's fan-out
    before = tree(tmp_path)
    full = {"aggregate": True, "workers": 3, "epochsdone": 0, "round": 0, "run": "t", **event}
    with pytest.raises(EventError) as info:
        deliver(tmp_path, full, inv)
    assert info.value.field == field
    assert tree(tmp_path) == before and inv.take() == []


# ---- final weights --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("algorithm", "momentum"), [("gradient_averaging", 0.5), ("model_averaging", 0.0)]
)
@pytest.mark.parametrize(("workers", "shards"), [(3, None), (8, None), (8, 8), (8, 1)])
def test_sharded_final_weights_match_the_single_combiner(
    tmp_path, algorithm, momentum, workers, shards
):
    config = {**EIGHT, "algorithm": algorithm, "momentum": momentum, "shards": shards}
    got = run_to_end(tmp_path, config, workers)
    s = shards or math.ceil(math.sqrt(workers))
    # Exactly what sharded aggregation computes (deterministic whatever the arrival order).
    assert_same(got, sharded_reference(config, workers, s))
    single = single_reference(
        {k: v for k, v in config.items() if k not in ("aggregation", "shards")}, workers
    )
    # Against the single combiner. aggregate.py's bound: per combine the float64 sums differ by
    # at most 2*gamma(N+1)*sum|x_i| (~1e-15 relative here, no cancellation to speak of), so each
    # round's float32 weights are identical or one float32 ulp apart. Over the 4 rounds a one-ulp
    # difference feeds back through the next gradients (scaled by lr times the curvature, < 1
    # here) and the momentum, so allow 4 ulps per round at the weights' scale:
    # 4 rounds * 4 * eps32 * max|w|. A real aggregation bug (a worker or shard lost or counted
    # twice) moves the weights by ~1e-2 and fails this by orders of magnitude.
    for g, w in zip(got, single, strict=True):
        assert g.dtype == w.dtype == np.float32
        atol = 4 * 4 * float(np.finfo(np.float32).eps) * float(np.max(np.abs(w)))
        np.testing.assert_allclose(g, w, rtol=0, atol=atol)
    if workers == s or (s == 1 and algorithm == "gradient_averaging"):
        # One worker per shard: a partial is the worker's own gradient, or n_i * w_i / n_i = w_i
        # (exact in float64 for float32 w_i); one gradient shard adds in the single combiner's
        # order. Either way the same roundings, so bit-identical. (One model-averaging shard is
        # not: its mean is multiplied back by n before the final division.)
        assert_same(got, single)


def test_the_final_combine_reads_only_the_partials(tmp_path, monkeypatch):
    reads: list[tuple[str, int, int]] = []
    real_result, real_partial = Workspace.read_result, Workspace.read_partial

    def read_result(self: Workspace, round: int, worker: int) -> Any:
        reads.append(("result", round, worker))
        return real_result(self, round, worker)

    def read_partial(self: Workspace, round: int, shard: int) -> Any:
        reads.append(("partial", round, shard))
        return real_partial(self, round, shard)

    monkeypatch.setattr(Workspace, "read_result", read_result)
    monkeypatch.setattr(Workspace, "read_partial", read_partial)
    inv = Recorder()
    config = {**EIGHT, "max_rounds": 1}
    deliver(tmp_path, start_event(8, config), inv)
    workers = inv.take()
    for e in workers:
        deliver(tmp_path, e, inv)
    by_shard = {e["shard"]: e for e in inv.take()}
    assert sorted(by_shard) == [0, 1, 2]
    reads.clear()
    deliver(tmp_path, by_shard[1], inv)  # shard 1: workers 1, 4, 7
    assert reads == [("result", 0, w) for w in (1, 4, 7)]
    deliver(tmp_path, by_shard[0], inv)
    deliver(tmp_path, by_shard[2], inv)
    (combine,) = inv.take()
    reads.clear()
    out = deliver(tmp_path, combine, inv)
    assert out["status"] == "finished"
    assert reads == [("partial", 0, s) for s in range(3)]  # and no worker result


# ---- at-least-once delivery -----------------------------------------------------------------
FAULT_POINTS = [
    ("worker", "after_publish"),
    ("worker", "after_arrival"),
    ("aggregate", "start"),
    ("aggregate", "after_publish"),
    ("aggregate", "after_arrival"),
    ("combine", "start"),
    ("combine", "after_publish"),
]


@settings(
    max_examples=25,
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
def test_duplicates_reorderings_and_retries_never_change_the_sharded_final_weights(
    tmp_path_factory, data, algorithm, faults
):
    root = tmp_path_factory.mktemp("efs")
    n, shards = 5, 2  # shard 0: workers 0, 2, 4; shard 1: workers 1, 3
    config = {
        **SHARDED,
        "shards": shards,
        "dataset": "synthetic:80",
        "algorithm": algorithm,
        "momentum": 0.5 if algorithm == "gradient_averaging" else 0.0,
        "faults": [
            # For the aggregate role, "worker" selects the shard.
            {"role": role, "at": at, "round": r, "worker": None if role == "combine" else w % 2}
            for (role, at), r, w in faults
        ],
    }
    inv = Recorder()
    first = start_event(n, config)
    pending = [first, dict(first)]
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
    assert_same(final_weights(root), sharded_reference(config, n, shards))
    # However often events arrived, each round sent N workers, S aggregators and one combine.
    rounds = summary_of(Workspace(root, "t"))["rounds"]
    assert kinds(inv.all) == expected_kinds(rounds, n, shards)


def _race(root: Path, inv: Recorder, events: list[dict[str, Any]], copies: int) -> None:
    """Deliver every event `copies` times, all at once from as many threads."""
    calls = [e for e in events for _ in range(copies)]
    barrier = threading.Barrier(len(calls))

    def one(event: dict[str, Any]) -> None:
        barrier.wait()
        deliver(root, event, inv)

    with ThreadPoolExecutor(len(calls)) as pool:
        for f in [pool.submit(one, e) for e in calls]:
            f.result()


def test_64_racing_workers_trigger_one_aggregation_per_shard_and_one_combine(tmp_path):
    n, shards, rounds = 64, 8, 3
    config = {
        "dataset": "synthetic:640",
        "batch_size": 8,
        "steps": None,
        "max_rounds": rounds,
        "epochs": None,
        "lr": 0.3,
        "aggregation": "sharded",
    }
    inv = Recorder()
    deliver(tmp_path, start_event(n, config), inv)
    workers = inv.take()
    for r in range(rounds):
        assert sorted(e["workerno"] for e in workers) == list(range(n))
        _race(tmp_path, inv, workers, copies=2)  # 128 concurrent worker deliveries
        aggregates = inv.take()
        assert sorted((e["round"], e["shard"]) for e in aggregates) == [
            (r, k) for k in range(shards)
        ]
        _race(tmp_path, inv, aggregates, copies=4)  # 32 concurrent aggregator deliveries
        combines = inv.take()
        assert [(e.get("combine"), e["round"]) for e in combines] == [(True, r)]
        _race(tmp_path, inv, combines, copies=8)
        workers = inv.take()
        assert len(workers) == (n if r < rounds - 1 else 0)
    assert kinds(inv.all) == expected_kinds(rounds, n, shards)
    ws = Workspace(tmp_path, "t")
    assert summary_of(ws)["rounds"] == rounds
    assert_same(final_weights(tmp_path), sharded_reference(config, n, shards))


# ---- liveness -------------------------------------------------------------------------------
@pytest.mark.parametrize("at", ["start", "after_publish"])
def test_a_lost_shard_aggregation_is_rescued_by_the_watchdog(tmp_path, at):
    faults = [{"role": "aggregate", "at": at, "round": 1, "worker": 1}]
    config = {**EIGHT, "stall_after_s": 5, "faults": faults}
    inv = Recorder()
    ws = Workspace(tmp_path, "t")
    deliver(tmp_path, start_event(8, config), inv)
    _drop_failures(tmp_path, inv)  # the crashed aggregator's retries are all spent
    assert ws.final_summary() is None  # stuck without the watchdog
    report = check_stalled(ws, inv)
    assert (report["status"], report["missing"], report["missing_shards"]) == ("running", [], [1])
    _age(ws, 6)
    with ThreadPoolExecutor(8) as pool:
        reports = list(pool.map(lambda _: check_stalled(ws, inv), range(8)))
    statuses = sorted(r["status"] for r in reports)
    assert statuses.count("rescued") == 1 and set(statuses) <= {"rescued", "rescuing", "running"}
    (rescued,) = [r for r in reports if r["status"] == "rescued"]
    assert rescued["reason"] == (
        "round 1: all workers arrived but the aggregation of shard 1 never completed"
    )
    sent = inv.take()
    assert [(e.get("aggregate"), e["round"], e["shard"]) for e in sent] == [(True, 1, 1)]
    inv.sent.extend(sent)
    assert check_stalled(ws, inv)["status"] == "running"  # the rescue restarted the clock
    _drop_failures(tmp_path, inv)
    assert check_stalled(ws, inv)["status"] == "finished"
    assert_same(final_weights(tmp_path), sharded_reference(config, 8, 3))


def test_an_aggregator_lost_after_recording_its_partial_gets_the_combine_rescued(tmp_path):
    # Shard 1 completes last (its last worker, 7, arrives last), records its partial and dies
    # before claiming the combine: the shard stage is done, the combine stage is stuck.
    faults = [{"role": "aggregate", "at": "after_arrival", "round": 1, "worker": 1}]
    config = {**EIGHT, "stall_after_s": 5, "faults": faults}
    inv = Recorder()
    ws = Workspace(tmp_path, "t")
    deliver(tmp_path, start_event(8, config), inv)
    _drop_failures(tmp_path, inv)
    assert ws.partial_arrivals(1).members() == {"0", "1", "2"} and not ws.claimed("combine-1")
    report = check_stalled(ws, inv, now=time.time() + 6)
    assert report["status"] == "rescued" and "missing_shards" not in report
    assert report["reason"] == "round 1: all workers arrived but the combine never completed"
    assert [(e.get("combine"), e["round"]) for e in inv.sent] == [(True, 1)]
    _drop_failures(tmp_path, inv)
    assert_same(final_weights(tmp_path), sharded_reference(config, 8, 3))


def test_a_shard_aggregation_that_never_completes_fails_the_run_with_the_reason(tmp_path):
    faults = [{"role": "aggregate", "at": "start", "round": 0, "worker": 2, "times": 100}]
    config = {**EIGHT, "stall_after_s": 5, "max_rescues": 2, "faults": faults}
    inv = Recorder()
    deliver(tmp_path, start_event(8, config), inv)
    _drop_failures(tmp_path, inv)
    ws = Workspace(tmp_path, "t")
    statuses = []
    for _ in range(4):
        statuses.append(check_stalled(ws, inv, now=time.time() + 6)["status"])
        _drop_failures(tmp_path, inv)
    assert statuses == ["rescued", "rescued", "failed", "failed"]
    assert (
        ws.failure()
        == "round 0: all workers arrived but the aggregation of shard 2 never completed"
    )
    out = deliver(
        tmp_path,
        {"aggregate": True, "shard": 2, "workers": 8, "epochsdone": 0, "round": 0, "run": "t"},
        inv,
    )
    assert out["status"] == "failed" and inv.take() == []


def test_missing_workers_of_a_sharded_round_are_rescued_first(tmp_path):
    faults = [{"role": "worker", "at": "start", "round": 1, "worker": 5}]
    config = {**EIGHT, "stall_after_s": 5, "faults": faults}
    inv = Recorder()
    deliver(tmp_path, start_event(8, config), inv)
    _drop_failures(tmp_path, inv)
    ws = Workspace(tmp_path, "t")
    report = check_stalled(ws, inv, now=time.time() + 6)
    assert report["status"] == "rescued" and report["missing"] == [5]
    assert [e.get("workerno") for e in inv.sent] == [5]
    _drop_failures(tmp_path, inv)
    assert check_stalled(ws, inv)["status"] == "finished"
    assert_same(final_weights(tmp_path), sharded_reference(config, 8, 3))


_CHECK_WITHOUT_TENSORFLOW = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from simulator.protocol import Workspace, check_stalled
sent = []
class Inv:
    def invoke_async(self, fn, event):
        sent.append(event)
report = check_stalled(Workspace(sys.argv[2], "t"), Inv(), now=time.time() + 10)
print(json.dumps({"report": report, "sent": sent,
                  "tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules}))
"""


def test_the_watchdog_never_builds_the_model(tmp_path):
    # A run whose config names the Keras CNN: the watchdog must rescue it without importing
    # TensorFlow. The run is started as softmax (so this test imports no TensorFlow either) and
    # its config then says cnn, which only a model build would notice.
    config = {**EIGHT, "stall_after_s": 5, "faults": [{"role": "worker", "at": "start"}]}
    inv = Recorder()
    deliver(tmp_path, start_event(8, config), inv)
    _drop_failures(tmp_path, inv)
    ws = Workspace(tmp_path, "t")
    data = json.loads(ws.config_path.read_text())
    data["model"] = "cnn"
    ws.config_path.write_text(json.dumps(data))
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK_WITHOUT_TENSORFLOW, str(ROOT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["report"]["status"] == "rescued" and out["report"]["missing"] == [0]
    assert [e["workerno"] for e in out["sent"]] == [0]
    assert out["tensorflow"] is False and out["keras"] is False


# ---- end to end on the local Lambda -----------------------------------------------------------
@pytest.mark.slow
def test_sharded_run_through_the_runner_on_the_local_lambda(tmp_path):
    import io

    from simulator.cli import EXIT_OK, main

    n, rounds = 8, 3
    out = tmp_path / "run"
    argv = [
        "run", "--model", "softmax", "--dataset", "digits", "--workers", str(n),
        "--aggregation", "sharded", "--memory", "512", "--steps", "4", "--rounds", str(rounds),
        "--epochs", "none", "--timeout", "60", "--lr", "0.5", "--momentum", "0.5",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    stdout, stderr = io.StringIO(), io.StringIO()
    code = main(argv, stdout=stdout, stderr=stderr)
    assert code == EXIT_OK, stderr.getvalue()
    report = json.loads((out / "report.json").read_text())
    shards = 3  # ceil(sqrt(8))
    by_role = {r: d["count"] for r, d in report["invocations"]["by_role"].items()}
    assert by_role == {"start": 1, "worker": rounds * n, "aggregate": rounds * shards,
                       "combine": rounds}  # fmt: skip
    assert report["invocations"]["failed"] == 0
    settings_json = json.loads((out / "settings.json").read_text())
    assert settings_json["aggregation"] == "sharded"
    got = [np.load(out / "model" / f"array-{k}.npy") for k in range(2)]
    # The runner's training config, as the reference must see it.
    config = {
        "model": "softmax",
        "dataset": "digits",
        "batch_size": 32,
        "steps": 4,
        "max_rounds": rounds,
        "epochs": None,
        "lr": 0.5,
        "momentum": 0.5,
        "seed": 0,
    }
    assert_same(got, sharded_reference(config, n, shards))
