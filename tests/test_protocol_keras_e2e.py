"""The training protocol end to end on the local Lambda service for a Keras model (the small CNN).

Start -> rounds -> stop with process environments, as in test_protocol_e2e.py, but every
gradient comes from TensorFlow's GradientTape in the function's own processes. The oracle is the
plain loop of test_protocol.reference (sharding, batches, worker contributions, combine; no
protocol, no EFS, no Lambda).

Exactness: TensorFlow on CPU may sum a reduction in a different order when it runs with another
number of threads or other kernels, so the same step in two processes can differ in the last
bits. Measured here (TF 2.21, 2 cores, this config): the reference loop with TensorFlow's
defaults differs from the same loop with one intra-op thread by up to 1.5e-8 after three rounds,
and from one thread plus deterministic ops by up to 6e-8 (so does a Lambda run with the
defaults, against the pinned reference). So the functions and the reference both run with one
intra-op and one inter-op thread and deterministic ops, set through TensorFlow's environment
variables before it is imported. The reference loop runs in a fresh interpreter with exactly
those variables, because the pytest process may have initialised TensorFlow with other settings
in an earlier test (thread counts cannot change after that). With the settings pinned on both
sides the weights are equal bit for bit, which is what the test asserts (tolerance 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lambda_runtime import FunctionConfig, LambdaService
from simulator.progress import SqliteProgressTable
from simulator.protocol import Workspace

from .test_protocol import assert_same
from .test_protocol_e2e import attributed

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "numpy_digits"  # simulator.handler.handler; the config says cnn
N = 2
ROUNDS = 3
# digits: 1,438 training samples, 2 shards of 719 = 23 batches of 32; 4 per round, so the three
# rounds are all in epoch 0 and take batches 0-3, 4-7 and 8-11 of each shard.
CONFIG: dict[str, Any] = {
    "model": "cnn",
    "dataset": "digits",
    "algorithm": "gradient_averaging",
    "batch_size": 32,
    "steps": 4,
    "max_rounds": ROUNDS,
    "epochs": None,
    "lr": 0.1,
    "momentum": 0.5,
    "seed": 3,
}
# Read by TensorFlow when it initialises: the same in the environments and the reference.
TF_ENV = {
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "TF_DETERMINISTIC_OPS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}
# Measured Max Memory Used of every invocation: 615-642 MB (importing TensorFlow is ~0.6 GB of
# it). 1,024 MB leaves a third of headroom; it also buys 0.58 vCPU, enough here.
MEMORY_MB = 1024
# Each environment imports TensorFlow and traces the model on its first invocation: ~8 s of
# Lambda time at 1,024 MB; 120 s keeps any worker far from stopping early (which would change
# the sample counts and so the result).
TIMEOUT_S = 120

REFERENCE = """
import json, sys
import numpy as np
from tests.test_protocol import reference
config, workers, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
np.savez(out, *reference(config, workers))
"""


def start_reference(out: Path) -> subprocess.Popen[bytes]:
    """test_protocol.reference(CONFIG, N) into `out`, in an interpreter whose TF gets TF_ENV."""
    return subprocess.Popen(
        [sys.executable, "-c", REFERENCE, json.dumps(CONFIG), str(N), str(out)],
        cwd=ROOT,
        env={**os.environ, **TF_ENV},
    )


def reference_weights(proc: subprocess.Popen[bytes], out: Path) -> list[np.ndarray]:
    assert proc.wait(timeout=300) == 0
    with np.load(out) as z:
        return [z[f"arr_{k}"] for k in range(len(z.files))]


def train(svc: LambdaService, efs: Path) -> Workspace:
    """Register the function, send the start event and wait until the run finishes."""
    svc.register(
        FunctionConfig(
            name="train",
            handler="handler.handler",
            code_dir=EXAMPLE,
            memory_mb=MEMORY_MB,
            timeout_s=TIMEOUT_S,
            environment=TF_ENV,
            efs={"/mnt/efs": efs},
        )
    )
    result = svc.invoke("train", {"start": True, "workers": N, "run": "keras", "config": CONFIG})
    assert result.function_error is None, result.payload
    assert result.json()["status"] == "started"
    ws = Workspace(efs, "keras")
    deadline = time.monotonic() + 240
    while ws.final_summary() is None and ws.failure() is None:
        assert time.monotonic() < deadline, "the run neither finished nor failed"
        time.sleep(0.25)
    assert svc.wait_idle(60)
    assert ws.failure() is None
    return ws


def test_keras_cnn_start_rounds_stop_equals_the_in_process_reference(make_service, tmp_path):
    pytest.importorskip("tensorflow", reason="the Keras CNN needs TensorFlow (extra 'tensorflow')")
    out = tmp_path / "reference.npz"
    proc = start_reference(out)  # beside the run: its TensorFlow import overlaps the run's
    try:
        svc = make_service("auto")
        ws = train(svc, tmp_path / "efs")
        want = reference_weights(proc, out)
    finally:
        proc.kill()
        proc.wait()

    got = [np.array(a) for a in ws.final_weights()]
    # Conv 3x3x1x16, conv 3x3x16x32 and two dense layers on 8x8 digits: 8 trainable arrays.
    assert [g.shape for g in got] == [
        (3, 3, 1, 16),
        (16,),
        (3, 3, 16, 32),
        (32,),
        (128, 64),
        (64,),
        (64, 10),
        (10,),
    ]
    assert_same(got, want)

    rows = SqliteProgressTable(ws.progress_path).rounds("keras")
    assert [(r.round, r.status, r.epoch) for r in rows] == [(k, "combined", 0) for k in range(3)]
    assert [r.samples for r in rows] == [N * 4 * 32] * ROUNDS  # no worker stopped early
    # Three large-batch steps: learning (measured: loss 2.32 -> 2.19, accuracy 0.12 -> 0.30).
    first, last = rows[0], rows[-1]
    assert first.loss is not None and last.loss is not None and last.loss < first.loss
    assert first.accuracy is not None and last.accuracy is not None
    assert last.accuracy > first.accuracy
    summary = ws.final_summary()
    assert summary is not None and summary["reason"] == f"max_rounds reached ({ROUNDS} rounds)"

    # Exactly one successful invocation per role and round, none failed or retried, and none
    # near its memory limit.
    records = svc.ledger.records("train")
    assert all(r.status == "success" and r.attempt == 1 for r in records)
    assert all(r.max_memory_mb < MEMORY_MB for r in records)
    expected: Counter[tuple[str, int | None, int | None]] = Counter({("start", None, None): 1})
    for k in range(ROUNDS):
        expected[("combine", k, None)] = 1
        for w in range(N):
            expected[("worker", k, w)] = 1
    assert Counter((role, r, w) for role, r, w, _, _ in attributed(svc)) == expected
