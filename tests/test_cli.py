"""The command line through cli.main(argv): parsing, settings files, errors and exit codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main, resolve_settings
from simulator.settings import RunSettings, SettingsError

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# ---- bad values name the flag and what is allowed -------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--memory", "100"], "--memory: must be a whole number from 128 to 10240 (MB), got 100"),
        (["--memory", "lots"], "--memory: must be a whole number, got 'lots'"),
        (["--timeout", "901"], "--timeout: must be a whole number from 1 to 900 (seconds)"),
        (["--ephemeral", "256"], "--ephemeral: must be a whole number from 512 to 10240"),
        (["--workers", "0"], "--workers: must be a whole number from 1 to 10000"),
        (
            ["--algorithm", "adam"],
            "--algorithm: must be one of gradient_averaging, model_averaging",
        ),
        (["--model", "resnet"], "--model: must be one of softmax, mlp, cnn, vgg19"),
        (["--clock", "cpu"], "--clock: must be one of lambda, wall"),
        (["--aggregation", "tree"], "--aggregation: must be one of single, sharded"),
        (["--lr", "-1"], "--lr: must be a finite number >= 0"),
        (["--lr", "nan"], "--lr: must be a finite number >= 0"),
        (["--dataset", "/no/such/cifar"], "--dataset: no such file or directory"),
        (["--dataset", "synthetic:zero"], "--dataset: synthetic:<n> needs a whole number"),
        (["--epochs", "none"], "--epochs: set --epochs or --rounds"),
        (["--model-kwargs", "[1"], "--model-kwargs: must be a JSON object"),
        (["--retries", "3"], "--retries: must be a whole number from 0 to 2"),
        (["--fail-fast", "maybe"], "--fail-fast: must be true or false"),
        (["--run-id", "../x"], "--run-id: must be 1-128 characters"),
    ],
)
def test_a_bad_flag_names_itself_and_what_is_allowed(argv, expected):
    code, out, err = run_cli("run", *argv)
    assert code == EXIT_USAGE
    assert expected in err, err
    assert out == ""


def test_a_value_only_the_protocol_checks_still_names_the_setting(tmp_path):
    # Faults (tests only, config file only) are validated by the protocol's TrainingConfig.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: mlp\nfaults: [{role: worker, at: nowhere}]\n")
    code, _, err = run_cli("run", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == EXIT_USAGE
    assert "--faults: " in err and "'nowhere'" in err
    assert not (tmp_path / "o").exists()


def test_unknown_flags_and_missing_subcommands_are_usage_errors():
    code, _, err = run_cli("run", "--frobnicate", "3")
    assert code == EXIT_USAGE and "unrecognized arguments: --frobnicate" in err
    code, _, err = run_cli()
    assert code == EXIT_USAGE and "command" in err
    code, _, err = run_cli("run", "--quiet", "--json-lines")
    assert code == EXIT_USAGE and "not allowed with" in err


# ---- settings from files and flags ----------------------------------------------------------


def test_flags_override_the_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workers: 3\nmemory: 1024\nmodel: mlp\nbatch-size: 16\nsteps: null\n")
    s = resolve_settings(["--config", str(cfg), "--memory", "3008"])
    assert (s.workers, s.memory, s.model, s.batch_size, s.steps) == (3, 3008, "mlp", 16, None)
    # Everything not given keeps its default.
    assert s.timeout == RunSettings().timeout


def test_json_config_and_relative_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cifar-10-python.tar.gz").write_bytes(b"")
    sub = tmp_path / "configs"
    sub.mkdir()
    cfg = sub / "c.json"
    cfg.write_text(json.dumps({"dataset": "../data/cifar-10-python.tar.gz", "epochs": 2}))
    s = resolve_settings(["--config", str(cfg)])
    assert s.dataset == str((tmp_path / "data" / "cifar-10-python.tar.gz").resolve())
    assert s.epochs == 2


def test_a_bad_value_in_a_file_names_the_flag_and_the_file(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"memory": 99999}))
    code, _, err = run_cli("run", "--config", str(cfg))
    assert code == EXIT_USAGE
    assert f"--memory (in {cfg}): must be a whole number from 128 to 10240" in err
    # Overridden by a flag, the file's bad value is never used.
    assert resolve_settings(["--config", str(cfg), "--memory", "512"]).memory == 512


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("c.yaml", "memroy: 1024\n", "--memroy (in {path}): is not a setting; allowed: workers"),
        ("c.yaml", "workers: [1\n", "is not valid YAML"),
        ("c.json", "{", "is not valid JSON"),
        ("c.toml", "workers = 1", "must end in .json, .yaml or .yml"),
        ("c.yaml", "- 1\n- 2\n", "must hold a mapping of settings"),
    ],
)
def test_bad_config_files_are_named(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    code, _, err = run_cli("run", "--config", str(path))
    assert code == EXIT_USAGE
    assert expected.format(path=path) in err, err


def test_a_missing_config_file_is_named(tmp_path):
    code, _, err = run_cli("run", "--config", str(tmp_path / "nope.yaml"))
    assert code == EXIT_USAGE and "--config: cannot read" in err and "nope.yaml" in err


def test_optional_settings_take_none_and_steps_take_all():
    s = resolve_settings(["--steps", "all", "--rounds", "5", "--epochs", "none"])
    assert (s.steps, s.rounds, s.epochs) == (None, 5, None)
    assert resolve_settings(["--algorithm", "model"]).algorithm == "model_averaging"


def test_settings_round_trip_through_json():
    s = RunSettings(
        workers=7,
        model="mlp",
        model_kwargs={"hidden": [8]},
        faults=({"role": "worker", "at": "start"},),
    )
    assert RunSettings.from_mapping(json.loads(json.dumps(s.to_json()))) == s
    with pytest.raises(SettingsError) as info:
        RunSettings.from_mapping({"gpus": 1})
    assert info.value.flag == "--gpus" and isinstance(info.value, ValueError)


def test_the_example_configs_resolve(tmp_path):
    for name in ("default.yaml", "numpy.yaml"):
        s = resolve_settings(["--config", str(ROOT / "examples" / name)])
        assert s.dataset == "digits"
    assert resolve_settings(["--config", str(ROOT / "examples" / "default.yaml")]) == RunSettings()
    tarball = tmp_path / "cifar-10-python.tar.gz"
    tarball.write_bytes(b"")
    thesis = resolve_settings(
        ["--config", str(ROOT / "examples" / "thesis_vgg19.yaml"), "--dataset", str(tarball)]
    )
    assert (thesis.model, thesis.batch_size, thesis.steps) == ("vgg19", 8, 20)
    assert (thesis.memory, thesis.timeout, thesis.workers) == (10240, 900, 5)
    assert thesis.model_kwargs == {"input_size": 224} and thesis.dataset == str(tarball)
    # Without a CIFAR path the thesis config says what to pass.
    code, _, err = run_cli("run", "--config", str(ROOT / "examples" / "thesis_vgg19.yaml"))
    assert code == EXIT_USAGE and "--dataset (in" in err and "no such file" in err


# ---- other commands and refusals ------------------------------------------------------------


def test_report_of_a_directory_that_is_not_a_run(tmp_path):
    code, _, err = run_cli("report", str(tmp_path))
    assert code == EXIT_USAGE and "not a run directory" in err


def test_an_output_directory_holding_a_run_is_refused(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text("{}")
    code, _, err = run_cli("run", "--model", "mlp", "--out", str(out), "--quiet")
    assert code == EXIT_USAGE and "--out: " in err and "already holds a run" in err


def test_a_run_this_machine_cannot_hold_is_refused_before_it_starts(tmp_path):
    code, _, err = run_cli(
        "run", "--model", "mlp", "--workers", "10000", "--out", str(tmp_path / "o")
    )
    assert code == EXIT_USAGE
    assert "this machine cannot hold the run: 10001 execution environments" in err
    assert not (tmp_path / "o").exists()


def test_sweep_lists_only_sweepable_settings(tmp_path):
    code, _, err = run_cli("sweep", "--seed", "1,2", "--out", str(tmp_path / "s"))
    assert code == EXIT_USAGE
    assert "--seed: takes one value; settings a sweep can list: --workers, --memory" in err
    code, _, err = run_cli("sweep", "--memory", "1024,64", "--out", str(tmp_path / "s"))
    assert code == EXIT_USAGE and "--memory: must be a whole number from 128 to 10240" in err


@pytest.mark.slow
def test_a_failed_training_exits_nonzero_with_the_reason_on_stderr(tmp_path):
    # A 1 s timeout leaves a worker no time for one step before its safety margin: the round
    # has no samples and the combine fails the run (or the start itself times out).
    code, out, err = run_cli(
        "run",
        "--model",
        "softmax",
        "--workers",
        "1",
        "--timeout",
        "1",
        "--epochs",
        "1",
        "--retries",
        "0",
        "--max-rescues",
        "0",
        "--time-scale",
        "0.001",
        "--out",
        str(tmp_path / "o"),
        "--quiet",
    )
    assert code == EXIT_FAILED
    assert out == ""
    assert err.startswith("training failed: ")
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["run"]["status"] == "failed"
    assert report["run"]["reason"] in err


def test_python_dash_m_simulator_is_a_thin_main():
    proc = subprocess.run(
        [sys.executable, "-m", "simulator", "run", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EXIT_OK
    for flag in (
        "--workers",
        "--memory",
        "--ephemeral",
        "--timeout",
        "--epochs",
        "--rounds",
        "--steps",
        "--batch-size",
        "--lr",
        "--algorithm",
        "--model",
        "--dataset",
        "--seed",
        "--clock",
        "--aggregation",
        "--out",
        "--config",
        "--quiet",
        "--json-lines",
    ):
        assert flag in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "simulator", "run", "--memory", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EXIT_USAGE and "--memory" in proc.stderr


def test_the_live_panel_and_json_lines_show_progress():
    from rich.console import Console

    from simulator.live import JsonLinesSink, RichSink
    from simulator.runner import Snapshot

    snap = Snapshot(
        elapsed_s=3.2, phase="training", round=4, rounds_done=4, rounds_planned=10, epoch=1,
        epochs_done=1.0, loss=0.5, accuracy=0.8, active_envs=3, environments=5, invocations=20,
        cold=5, failed=1, timeouts=1, retries=1, throttled=2,
    )  # fmt: skip
    buf = io.StringIO()
    sink = RichSink("title", console=Console(file=buf, width=110))
    sink.update(snap)
    sink.note("watchdog: rescued a stalled round")
    sink.close()
    text = buf.getvalue()
    for part in (
        "4 / 10",
        "0.5000",
        "80.00%",
        "3 active / 5",
        "20 (5 cold)",
        "1 (1 timeouts, 0 OOM)",
        "watchdog: rescued a stalled round",
    ):
        assert part in text, part
    lines = io.StringIO()
    js = JsonLinesSink(lines, every_s=0.0)
    js.update(snap)
    js.update(snap)  # nothing changed: no second line
    js.note("hello")
    events = [json.loads(x) for x in lines.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["progress", "note"]
    assert events[0]["rounds_done"] == 4 and events[0]["throttled"] == 2
