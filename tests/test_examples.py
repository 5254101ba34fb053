"""The shipped SAM template is the one the local Lambda serves: it loads into a valid function."""

from __future__ import annotations

from pathlib import Path

from lambda_runtime.template import load_template

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_training_template_maps_to_the_function_we_run_locally(tmp_path):
    (cfg,) = load_template(EXAMPLES / "template.yaml", efs_dirs={"/mnt/efs": tmp_path / "efs"})
    assert cfg.name == "train"
    assert cfg.handler == "handler.handler"
    assert cfg.code_dir == (EXAMPLES / "numpy_digits").resolve()
    assert (cfg.memory_mb, cfg.timeout_s, cfg.ephemeral_mb) == (2048, 900, 512)
    assert cfg.efs["/mnt/efs"] == (tmp_path / "efs").resolve()
    assert cfg.environment["PROGRESS_TABLE"] == "local-progress"
    assert (cfg.max_retry_attempts, cfg.max_event_age_s) == (2, 21600)
    assert cfg.runtime == "python3.11" and cfg.architecture == "x86_64"


def test_the_memory_parameter_overrides(tmp_path):
    (cfg,) = load_template(
        EXAMPLES / "template.yaml",
        parameters={"MemorySize": "4096"},
        efs_dirs={"/mnt/efs": tmp_path},
    )
    assert cfg.memory_mb == 4096


def test_serving_the_template_trains_through_unmodified_boto3(tmp_path):
    """`python -m lambda_runtime serve --template examples/template.yaml`, then a start event."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    efs = tmp_path / "efs"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lambda_runtime",
            "serve",
            "--template",
            str(EXAMPLES / "template.yaml"),
            "--efs",
            f"/mnt/efs={efs}",
            "--port",
            str(port),
            "--run-dir",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"Lambda endpoint: http://127.0.0.1:{port}\n"
        client = boto3.client(
            "lambda",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
        )
        config = {"model": "softmax", "dataset": "digits", "epochs": 1, "steps": None, "lr": 0.5}
        response = client.invoke(
            FunctionName="train",
            InvocationType="Event",
            Payload=json.dumps(
                {"start": True, "workers": 2, "run": "sam", "config": config}
            ).encode(),
        )
        assert response["StatusCode"] == 202
        summary = efs / "runs" / "sam" / "final" / "summary.json"
        deadline = time.monotonic() + 120
        while not summary.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        assert summary.exists(), "training did not finish"
        assert json.loads(summary.read_text())  # written whole (published atomically)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
