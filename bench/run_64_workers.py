"""64 workers x 5 rounds of the NumPy model through the whole runner, against an in-process loop.

The run is `python -m simulator run` with 64 workers (64 execution environments, each a process
tree with its limits, 64 cold starts, 5 fan-outs of 64 async invokes, 5 combines reading 64
gradients from EFS). The baseline, measured in the same process right after, computes the same
5 rounds of the same algorithm on the same shards in one loop (no Lambda, no EFS), so the
difference is the cost of emulating Lambda. Goal (issue 4): the run finishes in <= 60 s here.

Run: python bench/run_64_workers.py [--workers 64] [--rounds 5] [--keep DIR]
Exit status 1 if the run failed or took longer than --limit seconds.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulator.aggregate import combine_gradient_averaging  # noqa: E402
from simulator.algorithms import SGDConfig, gradient_contribution  # noqa: E402
from simulator.data import batches, get_dataset, shard_indices  # noqa: E402
from simulator.models import get_model  # noqa: E402
from simulator.runner import Runner  # noqa: E402
from simulator.settings import RunSettings  # noqa: E402


def baseline(settings: RunSettings) -> float:
    """Seconds for the same rounds in one process: shards, gradients, combine, evaluation."""
    t0 = time.perf_counter()
    ds = get_dataset(settings.dataset)
    model = get_model(settings.model, input_shape=ds.input_shape, num_classes=ds.num_classes)
    sgd = SGDConfig(settings.lr, settings.momentum, settings.weight_decay)
    n, bs, workers = len(ds.y_train), settings.batch_size, settings.workers
    per_shard = math.ceil(math.ceil(n / workers) / bs)
    steps = min(settings.steps or per_shard, per_shard)
    rounds_per_epoch = math.ceil(per_shard / steps)
    weights, velocity = model.init_weights(settings.seed), None
    assert settings.rounds is not None
    for r in range(settings.rounds):
        epoch, start = divmod(r, rounds_per_epoch)
        contribs = []
        for i in range(workers):
            idx = shard_indices(n, settings.seed, epoch, workers, i)
            it = batches(ds.x_train, ds.y_train, idx, bs, model.input_shape, start * steps, steps)
            contribs.append(gradient_contribution(model, weights, it, i))
        weights, velocity, _ = combine_gradient_averaging(weights, velocity, contribs, sgd)
        xt, yt = next(
            batches(
                ds.x_test, ds.y_test, np.arange(len(ds.y_test)), len(ds.y_test), model.input_shape
            )
        )
        model.evaluate(weights, xt, yt)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--limit", type=float, default=60.0, help="seconds allowed (default 60)")
    parser.add_argument("--keep", metavar="DIR", help="keep the run's output in DIR")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench64-"))
    out = Path(args.keep) if args.keep else tmp / "run"
    settings = RunSettings(
        model="mlp",
        dataset="digits",
        workers=args.workers,
        rounds=args.rounds,
        epochs=None,
        steps=None,
        memory=1769,
        timeout=300,
        lr=0.5,
        momentum=0.9,
        out=str(out),
    )
    try:
        t0 = time.perf_counter()
        result = Runner(settings).run()
        total = time.perf_counter() - t0
        base = baseline(settings)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    rep = result.report
    inv, tm = rep["invocations"], rep["time"]
    print(f"{args.workers} workers x {args.rounds} rounds, NumPy MLP on digits ({result.status})")
    print(f"  whole command (set-up, run, report)  {total:8.2f} s   limit {args.limit:g} s")
    print(f"  training (start invoke to last combine) {tm['wall_s']:6.2f} s")
    print(f"  in-process baseline, same rounds     {base:8.3f} s   ({total / base:,.0f}x)")
    print(
        f"  invocations {inv['total']} ({inv['cold']} cold); Lambda time {tm['lambda_s']:.1f} s; "
        f"predicted on Lambda {tm['predicted_s']:.2f} s"
    )
    ok = result.ok and total <= args.limit
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
