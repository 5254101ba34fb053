"""`python -m simulator sweep`: combinations, outcomes, the best setting, the table and plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from simulator.cli import EXIT_FAILED, EXIT_OK, main
from simulator.run_setup import capacity_problem
from simulator.settings import RunSettings
from simulator.sweep import SweepPoint, _outcome, expand, label_of, pick_best

PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_expand_varies_the_first_setting_slowest():
    assert expand({"workers": [1, 2], "memory": [128, 256]}) == [
        {"workers": 1, "memory": 128},
        {"workers": 1, "memory": 256},
        {"workers": 2, "memory": 128},
        {"workers": 2, "memory": 256},
    ]
    assert expand({}) == [{}]
    assert label_of({"workers": 4, "batch_size": 8}) == "workers4-batchsize8"


def point(i: int, outcome: str, t: float | None, cost: float | None = None) -> SweepPoint:
    return SweepPoint(i, f"p{i}", {}, outcome=outcome, predicted_s=t, cost_usd=cost)


def test_the_best_setting_is_the_fastest_finished_one():
    points = [
        point(0, "oom", 1.0),  # faster, but it failed
        point(1, "ok", 5.0, cost=0.1),
        point(2, "ok*", 4.0, cost=0.3),
        point(3, "exceeds-host", None),
        point(4, "ok", 4.0, cost=0.2),
    ]
    assert pick_best(points, "time") == 2  # ties go to the earlier setting
    assert pick_best(points, "cost") == 1
    assert pick_best([point(0, "timeout", 1.0)], "time") is None


def report(status: str, failed: int = 0, oom: int = 0, timeouts: int = 0) -> dict[str, Any]:
    return {
        "run": {"status": status, "reason": None if status == "finished" else "why"},
        "invocations": {"failed": failed, "oom": oom, "timeouts": timeouts},
    }


def test_outcomes():
    assert _outcome(report("finished")) == ("ok", None)
    assert _outcome(report("finished", failed=2, timeouts=2)) == ("ok*", None)
    assert _outcome(report("failed", failed=1, oom=1)) == ("oom", "why")
    assert _outcome(report("failed", failed=3, timeouts=3)) == ("timeout", "why")
    assert _outcome(report("failed", failed=1)) == ("failed", "why")


def test_capacity_counts_every_environment_against_available_memory():
    s = RunSettings(model="mlp", workers=63, memory=1024)
    assert capacity_problem(s, env_mb=100, available_mb=10_000) is None  # 64 x 100 MB
    problem = capacity_problem(s, env_mb=200, available_mb=10_000)
    assert problem is not None and "64 execution environments of about 200 MB" in problem
    # The memory limit caps what one environment can hold.
    assert capacity_problem(s.with_values(memory=128), env_mb=900, available_mb=10_000) is None


@pytest.mark.slow
def test_a_sweep_reports_oom_and_settings_this_machine_cannot_hold(tmp_path: Path) -> None:
    """Memory 128 vs 1024 MB for a 4M-parameter MLP; 1 vs 6,000 workers (not run: reported)."""
    out = tmp_path / "sweep"
    code, stdout, err = run_cli(
        "sweep", "--workers", "1,6000", "--memory", "128,1024",
        "--model", "mlp", "--model-kwargs", '{"hidden": [2048, 2048]}',
        "--rounds", "1", "--epochs", "none", "--steps", "1", "--eval-samples", "64",
        # Sampled RSS kills at the limit at once; a cgroup first reclaims for many seconds.
        "--isolation", "portable", "--out", str(out),
    )  # fmt: skip
    assert code == EXIT_OK, err
    doc = json.loads((out / "sweep.json").read_text())
    got = [(p["values"], p["outcome"]) for p in doc["points"]]
    assert got == [
        ({"workers": 1, "memory": 128}, "oom"),
        ({"workers": 1, "memory": 1024}, "ok"),
        ({"workers": 6000, "memory": 128}, "exceeds-host"),
        ({"workers": 6000, "memory": 1024}, "exceeds-host"),
    ]
    assert doc["best"] == 1 and doc["points"][1]["best"]
    assert doc["swept"] == {"--workers": [1, 6000], "--memory": [128, 1024]}
    oom, ok, host = doc["points"][0], doc["points"][1], doc["points"][2]
    assert "ran out of memory" in oom["reason"] and oom["predicted_s"] is None
    assert ok["predicted_s"] > 0 and ok["cost_usd"] > 0 and ok["final_loss"] is not None
    assert ok["peak_memory_mb"] > 128
    assert "6001 execution environments" in host["reason"] and host["out_dir"] is None
    # Each run that ran has its own full run directory.
    assert (Path(ok["out_dir"]) / "report.json").is_file()
    assert (Path(oom["out_dir"]) / "report.json").is_file()
    assert not (out / host["label"]).exists()
    # The table, as CSV and Markdown, with the best setting starred; the plot.
    with open(out / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["outcome"] for r in rows] == ["oom", "ok", "exceeds-host", "exceeds-host"]
    assert [r["best"] for r in rows] == ["False", "True", "False", "False"]
    table = (out / "sweep.md").read_text()
    assert "| * workers1-memory1024 | ok |" in table and "exceeds-host" in table
    assert (out / "sweep.png").read_bytes().startswith(PNG)
    assert "best by time: workers1-memory1024" in stdout


@pytest.mark.slow
def test_a_sweep_in_json_lines_and_one_where_nothing_finishes(tmp_path: Path) -> None:
    code, stdout, err = run_cli(
        "sweep", "--workers", "1,5000", "--model", "mlp", "--memory", "10240",
        "--rounds", "1", "--epochs", "none", "--out", str(tmp_path / "s"), "--json-lines",
        "--objective", "cost",
    )  # fmt: skip
    assert code == EXIT_OK, err
    events = [json.loads(line) for line in stdout.splitlines()]
    assert [e["event"] for e in events] == ["sweep_point", "sweep_point", "sweep"]
    assert [e["outcome"] for e in events[:2]] == ["ok", "exceeds-host"]
    assert events[-1]["best"] == 0
    code, _, err = run_cli(
        "sweep", "--workers", "5000,6000", "--model", "mlp", "--memory", "10240",
        "--out", str(tmp_path / "none"), "--quiet",
    )  # fmt: skip
    assert code == EXIT_FAILED and "no setting finished" in err


def test_a_config_file_may_list_values_to_sweep(tmp_path: Path) -> None:
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("model: mlp\nmemory: 10240\nworkers: [5000, 6000]\n")
    code, _, err = run_cli("sweep", "--config", str(cfg), "--out", str(tmp_path / "s"), "--quiet")
    assert code == EXIT_FAILED and "no setting finished" in err
    doc = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert doc["swept"] == {"--workers": [5000, 6000]}
    assert [p["outcome"] for p in doc["points"]] == ["exceeds-host", "exceeds-host"]
    assert doc["best"] is None
