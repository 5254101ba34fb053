"""End to end: `python -m simulator run` on the embedded digits, checked against its own logs.

The report's numbers are recomputed here independently: REPORT lines are parsed from the Lambda
log streams with a regex of this file, billed milliseconds summed, invocations counted, and the
cost taken from the price table of spec §8.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lambda_runtime import billing
from simulator.cli import EXIT_FAILED, EXIT_OK, main

N = 2
# digits: 1,438 training samples; 2 shards of 719 = 23 batches of 32; 8 per invocation: 3 rounds
# per epoch; 2 epochs: 6 rounds.
ROUNDS = 6
ARGS = [
    "--model", "mlp", "--dataset", "digits", "--workers", str(N), "--memory", "1024",
    "--steps", "8", "--epochs", "2", "--lr", "0.5", "--momentum", "0.5", "--timeout", "60",
]  # fmt: skip
REPORT = re.compile(
    r"^REPORT RequestId: (\S+)\tDuration: ([\d.]+) ms\tBilled Duration: (\d+) ms"
    r"\tMemory Size: (\d+) MB\tMax Memory Used: (\d+) MB",
    re.MULTILINE,
)
PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("e2e") / "run"
    code, stdout, stderr = run_cli("run", *ARGS, "--out", str(out), "--json-lines")
    assert code == EXIT_OK, stderr
    return {"out": out, "stdout": stdout, "report": json.loads((out / "report.json").read_text())}


def report_lines(out: Path) -> list[tuple[str, float, int, int, int]]:
    lines = []
    for log in sorted((out / "lambda" / "logs" / "train").glob("*.log")):
        for m in REPORT.finditer(log.read_text(encoding="utf-8", errors="replace")):
            lines.append((m[1], float(m[2]), int(m[3]), int(m[4]), int(m[5])))
    return lines


@pytest.mark.slow
def test_the_reports_numbers_agree_with_the_logs(small_run):
    out, rep = small_run["out"], small_run["report"]
    lines = report_lines(out)
    inv = rep["invocations"]
    assert inv["total"] == len(lines) == 1 + ROUNDS * N + ROUNDS
    assert {r: d["count"] for r, d in inv["by_role"].items()} == {
        "start": 1, "worker": ROUNDS * N, "combine": ROUNDS,
    }  # fmt: skip
    assert inv["failed"] == inv["retried"] == inv["throttled"] == 0
    assert inv["cold"] + inv["warm"] == inv["total"] and inv["cold"] >= 1
    billed = sum(b for _, _, b, _, _ in lines)
    lam = rep["cost"]["lambda"]
    assert lam["billed_ms"] == billed
    # GB-s and dollars from the price table (us-east-1, x86_64, first tier; no free tier).
    gb_s = sum(mem / 1024 * b / 1000 for _, _, b, mem, _ in lines)
    assert lam["gb_s"] == pytest.approx(gb_s, rel=1e-12)
    assert lam["duration_usd"] == pytest.approx(gb_s * 0.0000166667, rel=1e-9)
    assert lam["requests"] == len(lines)
    assert lam["request_usd"] == pytest.approx(len(lines) * 0.20 / 1_000_000, rel=1e-12)
    assert lam["ephemeral_usd"] == 0.0  # 512 MB of /tmp is free
    total = lam["duration_usd"] + lam["request_usd"] + rep["cost"]["efs"]["total_usd"]
    assert rep["cost"]["total_usd"] == pytest.approx(total, rel=1e-12)
    assert rep["checks"]["logs_agree"] and rep["checks"]["report_lines"] == len(lines)
    # Peak memory per role is the largest Max Memory Used of that role's REPORT lines.
    peaks: dict[str, int] = {}
    roles = {t["request_id"]: t["role"] for t in rep["timeline"]}
    for rid, _, _, _, used in lines:
        peaks[roles[rid]] = max(peaks.get(roles[rid], 0), used)
    assert {r: d["memory_peak_mb"] for r, d in rep["resources"].items()} == peaks
    assert all(d["memory_limit_mb"] == 1024 for d in rep["resources"].values())
    # Lambda time is the sum of Init + Duration of every invocation.
    with billing.Ledger(out / "lambda") as ledger:
        records = ledger.records()
    lambda_s = sum((r.init_ms or 0.0) + r.duration_ms for r in records) / 1000
    assert rep["time"]["lambda_s"] == pytest.approx(lambda_s)


@pytest.mark.slow
def test_training_progress_and_files(small_run):
    out, rep = small_run["out"], small_run["report"]
    tr = rep["training"]
    assert rep["run"]["status"] == "finished"
    assert tr["rounds"] == tr["rounds_planned"] == ROUNDS and tr["epochs_done"] == 2.0
    assert tr["final_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert rep["schema"] == "lambda-efs-sim/report" and rep["schema_version"] == 1
    for key in (
        "run",
        "settings",
        "training",
        "time",
        "invocations",
        "phases",
        "prediction",
        "cost",
        "resources",
        "warnings",
        "timeline",
        "checks",
        "host",
        "files",
    ):
        assert key in rep
    assert rep["time"]["predicted_s"] > 0 and rep["time"]["wall_s"] > 0
    phases = {p["phase"] for p in rep["phases"]}
    assert {
        "invoke latency",
        "cold start",
        "efs read",
        "efs write",
        "worker compute",
        "combine compute",
    } <= phases
    # The progress table, the logs, the final model, the plots.
    with sqlite3.connect(out / "progress.sqlite") as db:
        rows = db.execute('SELECT "round", status FROM rounds ORDER BY "round"').fetchall()
    assert rows == [(r, "combined") for r in range(ROUNDS)]
    assert list((out / "lambda" / "logs" / "train").glob("*.log"))
    arrays = sorted((out / "model").glob("array-*.npy"))
    assert len(arrays) == 4  # MLP: two weight matrices, two biases
    assert all(np.isfinite(np.load(a)).all() for a in arrays)
    for png in ("curves.png", "timeline.png"):
        assert (out / png).read_bytes().startswith(PNG)
    summary = (out / "summary.txt").read_text()
    for text in (
        "laptop wall time",
        "predicted end-to-end on Lambda",
        "GB-s",
        "peak memory",
        f"rounds {ROUNDS} of {ROUNDS}",
    ):
        assert text in summary
    # EFS scratch is removed after the model and the table are copied out.
    assert not (out / "efs").exists() and not (out / "lambda" / "environments").exists()


@pytest.mark.slow
def test_json_lines_mode(small_run):
    lines = [json.loads(x) for x in small_run["stdout"].splitlines()]
    kinds = [x["event"] for x in lines]
    assert kinds.count("round") == ROUNDS
    assert kinds[0] == "start" and "progress" in kinds and kinds[-1] == "summary"
    assert lines[0]["settings"]["workers"] == N and lines[0]["out_dir"] == str(small_run["out"])
    rounds = [x for x in lines if x["event"] == "round"]
    assert [x["round"] for x in rounds] == list(range(ROUNDS))
    assert all(x["loss"] is not None for x in rounds)
    assert lines[-1]["status"] == "finished" and lines[-1]["out_dir"] == str(small_run["out"])


@pytest.mark.slow
def test_report_re_renders_a_finished_run(small_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_run["out"], copy)
    for name in ("report.json", "summary.txt", "curves.png", "timeline.png"):
        (copy / name).unlink()
    code, stdout, _ = run_cli("report", str(copy))
    assert code == EXIT_OK
    again = json.loads((copy / "report.json").read_text())
    before = small_run["report"]
    for key in ("invocations", "cost", "training", "resources", "checks"):
        assert again[key] == before[key]
    assert again["time"]["predicted_s"] == pytest.approx(before["time"]["predicted_s"])
    assert (copy / "timeline.png").read_bytes().startswith(PNG)
    assert "laptop wall time" in stdout
    code, stdout, _ = run_cli("report", str(copy), "--json")
    assert code == EXIT_OK and json.loads(stdout)["schema_version"] == 1


@pytest.mark.slow
def test_retries_throttles_and_crashes_are_counted_and_marked(tmp_path):
    # Worker 1 of round 0 crashes once (Lambda retries it); one unit of concurrency makes the
    # second worker wait for the first (a throttle).
    cfg = tmp_path / "faults.yaml"
    cfg.write_text("faults: [{role: worker, at: start, round: 0, worker: 1, action: exit}]\n")
    out = tmp_path / "run"
    code, _, err = run_cli(
        "run", *ARGS, "--rounds", "2", "--config", str(cfg), "--concurrency", "1",
        "--time-scale", "0.001", "--out", str(out), "--quiet",
    )  # fmt: skip
    assert code == EXIT_OK, err
    rep = json.loads((out / "report.json").read_text())
    inv = rep["invocations"]
    assert inv["crashes"] == 1 and inv["failed"] == 1 and inv["retried"] == 1
    assert inv["throttled"] >= 1
    crashed = [t for t in rep["timeline"] if t["status"] == "crash"]
    assert [(t["role"], t["round"], t["worker"], t["attempt"]) for t in crashed] == [
        ("worker", 0, 1, 1)
    ]
    retried = [t for t in rep["timeline"] if t["attempt"] > 1]
    assert [(t["role"], t["round"], t["worker"], t["status"]) for t in retried] == [
        ("worker", 0, 1, "success")
    ]
    assert rep["training"]["rounds"] == 2
    summary = (out / "summary.txt").read_text()
    assert "1 failed (0 timeouts, 0 out of memory, 1 crashes" in summary and "1 retries" in summary


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs TensorFlow")
def test_the_defaults_train_the_embedded_dataset_in_about_a_minute(tmp_path):
    code, _, err = run_cli("run", "--out", str(tmp_path / "run"), "--quiet")
    assert code == EXIT_OK, err
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["settings"]["dataset"] == "digits" and rep["settings"]["model"] == "cnn"
    assert rep["training"]["final_accuracy"] > 0.6  # chance is 0.1
    assert rep["time"]["runner_wall_s"] < 120  # about a minute on a 2-core machine


@pytest.mark.slow
@pytest.mark.tensorflow
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs TensorFlow")
def test_the_thesis_config_runs_given_a_cifar_path(tmp_path):
    from tests.test_data import _write_cifar_tar

    tarball = _write_cifar_tar(tmp_path / "cifar-10-python.tar.gz")
    root = Path(__file__).resolve().parent.parent
    # The thesis settings, shrunk to fit a test: 32x32 inputs, 2 workers, 1 round, 2 steps.
    code, _, err = run_cli(
        "run", "--config", str(root / "examples" / "thesis_vgg19.yaml"), "--dataset", str(tarball),
        "--model-kwargs", '{"input_size": 32}', "--workers", "2", "--rounds", "1",
        "--steps", "2", "--memory", "3008", "--eval-samples", "16", "--out", str(tmp_path / "run"),
        "--quiet",
    )  # fmt: skip
    assert code == EXIT_OK, err
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["settings"]["model"] == "vgg19" and rep["settings"]["batch_size"] == 8
    assert rep["training"]["rounds"] == 1
    # The fake CIFAR-10 has 20 training images: 2 shards of 10, fewer than 2 steps of 8 each.
    assert rep["training"]["curve"][0]["samples"] == 20


@pytest.mark.slow
def test_a_round_that_never_completes_fails_the_run_after_retries_and_rescues(tmp_path):
    # Worker 0 of round 0 crashes every time: Lambda retries it once, the watchdog rescues it
    # once (a new request, retried once too), then the run fails with the reason.
    cfg = tmp_path / "faults.yaml"
    cfg.write_text(
        "faults: [{role: worker, at: start, round: 0, worker: 0, action: exit, times: 100}]\n"
    )
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        "run", *ARGS, "--config", str(cfg), "--retries", "1", "--max-rescues", "1",
        "--time-scale", "0.001", "--out", str(out), "--quiet",
    )  # fmt: skip
    assert code == EXIT_FAILED and stdout == ""
    assert err == "training failed: round 0: worker 0 never arrived after 4 attempts\n"
    rep = json.loads((out / "report.json").read_text())
    assert rep["run"]["status"] == "failed"
    inv = rep["invocations"]
    assert (inv["crashes"], inv["retried"], inv["rescues"]) == (4, 2, 1)
    lost = [t for t in rep["timeline"] if (t["role"], t["worker"]) == ("worker", 0)]
    assert [(t["attempt"], t["rescue"], t["status"]) for t in lost] == [
        (1, False, "crash"), (2, False, "crash"), (1, True, "crash"), (2, False, "crash"),
    ]  # fmt: skip
    assert rep["training"]["rounds"] == 0 and not rep["time"]["predicted_finished"]
