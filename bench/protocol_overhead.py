"""The protocol's overhead over an in-process training loop (issue 3's performance target).

Target: with one worker and the same model, steps and data, the protocol may add at most 10% to
the loop's time, excluding interpreter and TensorFlow import. Measured in one run, per workload:

  (a) loop      the steps one worker does, in process: per round its shard's mini-batches at
                the round's weights (gradient_contribution) and the combine's update;
  (b) protocol  the same training driven through the roles in process: handle() for start,
                worker and combine, a temporary directory as EFS (on disk, see --efs-dir), an
                in-memory invoker that delivers each event after the previous one returned;
  (c) lambda    the same through the local Lambda service (process environments, async
                invokes over the Invoke API, 1,769 MB = 1 vCPU), unless --no-lambda.

(a) and (b) are interleaved round by round (protocol round r, then loop round r, ...), so that
a change in this machine's load hits both alike; the ratio compares their medians. On a shared
machine the speed of the same compute still drifts by +-10% between rounds, so each protocol
round is also compared with its own worker's compute time (read weights + steps, measured by the
worker and kept in the progress table): "round minus its worker's compute" is the protocol's
fixed cost per round (plus the SGD update, which the loop does too) without that noise. A protocol
round is its critical path: from the start of its worker to the moment the combine invokes the
next round's worker. What the combine does after that (pruning old rounds) runs beside the next
round on Lambda and is shown apart. For (c), a round is the period between two fan-outs in the
progress table (started_at), i.e. with Lambda's invoke latency. The first round (model build,
tracing, cold environments) and the last (final evaluation and model) are one-time costs and
left out. Evaluation runs only at the end (eval_every is larger than the run) in the protocol
and in the loop, so it is not part of a round.

One thread everywhere (BLAS, TensorFlow), so that the three measure the same compute: the loop
and (b) have one core of this machine, each function 1 vCPU. The final weights of (a) and (b)
must be identical bit for bit (same process); (c)'s are compared too.

Run: python bench/protocol_overhead.py [--quick] [--no-lambda] [--workload NAME ...]
     python bench/protocol_overhead.py --profile digits-tiny   # where a round's fixed cost goes
"""

from __future__ import annotations

import os

# Before NumPy and TensorFlow are imported (they read these once).
THREADS_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TF_ENV = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
os.environ.update(THREADS_ENV)
os.environ.update(TF_ENV)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter, deque  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulator.aggregate import combine_gradient_averaging  # noqa: E402
from simulator.algorithms import gradient_contribution  # noqa: E402
from simulator.data import Dataset, batches, get_dataset, shard_indices  # noqa: E402
from simulator.handler import handle  # noqa: E402
from simulator.progress import SqliteProgressTable  # noqa: E402
from simulator.protocol import Schedule, TrainingConfig, Workspace, build_model  # noqa: E402

EXAMPLE = ROOT / "examples" / "numpy_digits"
FN = "train"
T = TypeVar("T")


@dataclass(frozen=True)
class Workload:
    """One model, dataset and round size."""

    name: str
    label: str
    config: dict[str, Any]
    rounds: int
    keras: bool = False


WORKLOADS = [
    Workload(
        "mlp",
        "MLP 64-512-512-10 (300k weights) on synthetic:40000, batch 128, one epoch (313 steps) "
        "per round as in the thesis: a realistic invocation",
        {
            "model": "mlp",
            "model_kwargs": {"hidden": [512, 512]},
            "dataset": "synthetic:40000",
            "batch_size": 128,
            "steps": None,
            "lr": 0.05,
            "momentum": 0.9,
        },
        rounds=8,
    ),
    Workload(
        "cnn",
        "Keras CNN (13k weights, 8 arrays) on synthetic:38400 (8x8x1), batch 128, 150 steps "
        "per round (half an epoch): a realistic invocation with TensorFlow",
        {
            "model": "cnn",
            "dataset": "synthetic:38400",
            "batch_size": 128,
            "steps": 150,
            "lr": 0.05,
            "momentum": 0.9,
        },
        rounds=8,
        keras=True,
    ),
    Workload(
        "digits-tiny",
        "softmax regression on digits, batch 32, 6 steps per round (the tests' tiny round: "
        "under a millisecond of compute, so the fixed per-round cost is all there is)",
        {
            "model": "softmax",
            "dataset": "digits",
            "batch_size": 32,
            "steps": 6,
            "lr": 0.5,
            "momentum": 0.5,
        },
        rounds=30,
    ),
]


def full_config(w: Workload, rounds: int) -> dict[str, Any]:
    """The run's config: one worker, `rounds` rounds, evaluation only at the end."""
    return {
        **w.config,
        "seed": 1,
        "max_rounds": rounds,
        "epochs": None,
        "eval_every": 1_000_000,
        "function_name": FN,
    }


def steady(times: list[T]) -> list[T]:
    """Per-round times without the first and the last round (one-time costs)."""
    return times[1:-1] if len(times) > 2 else times


# ------------------------------------------------------------------------------------------
# (a) the in-process loop


class Loop:
    """The plain training loop, one round per call (one worker: the whole shard is its own)."""

    def __init__(self, cfg: TrainingConfig, ds: Dataset) -> None:
        self.cfg, self.ds = cfg, ds
        self.model = build_model(cfg, ds.input_shape, ds.num_classes)
        self.sched = Schedule(len(ds.y_train), 1, cfg.batch_size, cfg.steps)
        self.weights = self.model.init_weights(cfg.seed)
        self.velocity: list[np.ndarray] | None = None
        self._shard: tuple[int, np.ndarray] | None = None

    def round(self, r: int, last: bool) -> float:
        """Run round `r`; its seconds."""
        cfg, ds, sched = self.cfg, self.ds, self.sched
        t0 = time.perf_counter()
        epoch = sched.epoch(r)
        if self._shard is None or self._shard[0] != epoch:
            self._shard = (epoch, shard_indices(len(ds.y_train), cfg.seed, epoch, 1, 0))
        it = batches(
            ds.x_train,
            ds.y_train,
            self._shard[1],
            cfg.batch_size,
            self.model.input_shape,
            sched.start_step(r),
            sched.steps_per_round,
        )
        c = gradient_contribution(self.model, self.weights, it, 0)
        self.weights, self.velocity, _ = combine_gradient_averaging(
            self.weights, self.velocity, [c], cfg.sgd
        )
        if last:  # the protocol's combine evaluates the final weights
            n = len(ds.y_test)
            xt, yt = next(batches(ds.x_test, ds.y_test, np.arange(n), n, self.model.input_shape))
            self.model.evaluate(self.weights, xt, yt, batch_size=cfg.eval_batch_size)
        return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------
# (b) the roles in process


class Ctx:
    """A Lambda context with 15 minutes left."""

    function_name = FN

    def __init__(self) -> None:
        self.aws_request_id = str(uuid.uuid4())

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


class QueueInvoker:
    """Queues async invocations as JSON (as Lambda delivers them) and notes when each was sent."""

    def __init__(self) -> None:
        self.queue: deque[tuple[dict[str, Any], float]] = deque()

    def invoke_async(self, function_name: str, event: Any) -> None:
        self.queue.append((json.loads(json.dumps(event)), time.perf_counter()))


@dataclass
class RoundTimes:
    """One protocol round: its critical path, and its parts."""

    critical: float  # worker start to the next round's fan-out (or the end of the last combine)
    worker: float  # the worker invocation
    combine: float  # the combine invocation up to its fan-out
    after: float  # the combine after its fan-out (pruning): beside the next round on Lambda


class Protocol:
    """The roles driven in process, one round per call, over a directory as EFS."""

    def __init__(self, config: dict[str, Any], efs: Path, run: str) -> None:
        self.efs, self.run = efs, run
        self.inv = QueueInvoker()
        start = {"start": True, "workers": 1, "run": run, "config": config}
        self._handle(start)

    def _handle(self, event: dict[str, Any]) -> None:
        handle(event, Ctx(), efs_root=self.efs, invoker=self.inv)

    def round(self, r: int) -> RoundTimes:
        """Deliver round `r`'s worker and combine; their times."""
        worker_event, _ = self.inv.queue.popleft()
        assert worker_event.get("round") == r and "workerno" in worker_event, worker_event
        t0 = time.perf_counter()
        self._handle(worker_event)
        t1 = time.perf_counter()
        combine_event, _ = self.inv.queue.popleft()
        assert combine_event.get("combine") and combine_event["round"] == r, combine_event
        t2 = time.perf_counter()
        self._handle(combine_event)
        t3 = time.perf_counter()
        fanned = t3 if not self.inv.queue else self.inv.queue[0][1]
        return RoundTimes(fanned - t0, t1 - t0, fanned - t2, t3 - fanned)

    def final_weights(self) -> list[np.ndarray]:
        """The run's final model."""
        return [np.array(a) for a in Workspace(self.efs, self.run).final_weights()]

    def compute_s(self) -> list[float]:
        """Per round, the worker's own measure of its compute (progress table, worker_ms_max)."""
        return compute_s(Workspace(self.efs, self.run), self.run)


def compute_s(ws: Workspace, run: str) -> list[float]:
    """Seconds each round's (one) worker spent reading weights and running its steps."""
    return [
        (r.worker_ms_max or 0.0) / 1e3 for r in SqliteProgressTable(ws.progress_path).rounds(run)
    ]


# ------------------------------------------------------------------------------------------
# (c) the local Lambda service


def run_lambda(
    config: dict[str, Any], tmp: Path, keras: bool
) -> tuple[list[float], list[float], list[Any]]:
    """Per-round periods and worker compute from the progress table, and the final weights."""
    from lambda_runtime import FunctionConfig, LambdaService

    efs = tmp / "efs-lambda"
    env = {**THREADS_ENV, **(TF_ENV if keras else {})}
    with LambdaService(run_dir=tmp / "lambda", time_scale=0.001) as svc:
        svc.register(
            FunctionConfig(
                name=FN,
                handler="handler.handler",
                code_dir=EXAMPLE,
                memory_mb=1769,
                timeout_s=300,
                environment=env,
                efs={"/mnt/efs": efs},
            )
        )
        result = svc.invoke(FN, {"start": True, "workers": 1, "run": "bench", "config": config})
        if result.function_error is not None:
            raise RuntimeError(result.payload)
        ws = Workspace(efs, "bench")
        deadline = time.monotonic() + 1800
        while ws.final_summary() is None and ws.failure() is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the Lambda run did not finish")
            time.sleep(0.05)
        svc.wait_idle(60)
        if ws.failure() is not None:
            raise RuntimeError(ws.failure())
        rows = SqliteProgressTable(ws.progress_path).rounds("bench")
        marks = [float(r.started_at or 0.0) for r in rows] + [float(rows[-1].combined_at or 0.0)]
        periods = [b - a for a, b in itertools.pairwise(marks)]
        return periods, compute_s(ws, "bench"), [np.array(a) for a in ws.final_weights()]


# ------------------------------------------------------------------------------------------
# Report


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


def same(a: list[np.ndarray], b: list[Any]) -> str:
    if len(a) != len(b):
        return "no (different arrays)"
    diff = max(float(np.max(np.abs(x - np.asarray(y)))) for x, y in zip(a, b, strict=True))
    return "yes, bit for bit" if diff == 0 else f"no, max abs difference {diff:.3g}"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The roles' log lines go to /dev/null: written (as on Lambda), not shown."""
    with open(os.devnull, "w") as log, contextlib.redirect_stdout(log):
        yield


def bench(w: Workload, rounds: int, repeat: int, efs_dir: Path | None, with_lambda: bool) -> bool:
    """Measure and print one workload; False if (b)'s final weights differ from (a)'s."""
    config = full_config(w, rounds)
    cfg = TrainingConfig.from_mapping(config, workers=1)
    ds = get_dataset(cfg.dataset)
    print(f"\n== {w.name}: {w.label}")
    print(
        f"   {rounds} rounds x {repeat} runs, 1 worker; rounds 1..{rounds - 2} of each run "
        "compared (a and b interleaved round by round)"
    )
    Loop(cfg, ds).round(0, False)  # warm the model's process cache (Keras: build and trace)
    loop_t: list[float] = []
    prot: list[RoundTimes] = []
    prot_rest: list[float] = []  # per round: the critical path minus the worker's compute
    for k in range(repeat):
        loop = Loop(cfg, ds)
        with tempfile.TemporaryDirectory(dir=efs_dir, prefix="bench-efs-") as d, quiet():
            protocol = Protocol(config, Path(d), f"bench-{k}")
            run_l, run_p = [], []
            for r in range(rounds):
                run_p.append(protocol.round(r))
                run_l.append(loop.round(r, r == rounds - 1))
            prot_w = protocol.final_weights()
            prot_rest += steady(
                [p.critical - c for p, c in zip(run_p, protocol.compute_s(), strict=True)]
            )
        loop_t += steady(run_l)
        prot += steady(run_p)
    rows = [("(a) loop", loop_t), ("(b) protocol, in process", [p.critical for p in prot])]
    lam_w: list[Any] | None = None
    if with_lambda:
        with tempfile.TemporaryDirectory(dir=efs_dir, prefix="bench-lambda-") as d:
            lam_periods, lam_compute, lam_w = run_lambda(config, Path(d), w.keras)
        rows.append(("(c) protocol, local Lambda", steady(lam_periods)))
        lam_rest = [p - c for p, c in zip(lam_periods, lam_compute, strict=True)]
    loop_med = statistics.median(loop_t)
    for name, times in rows:
        med = statistics.median(times)
        extra = (
            ""
            if times is loop_t
            else f"   overhead {100 * (med - loop_med) / loop_med:+7.1f}%"
            f"   fixed {(med - loop_med) * 1e3:+7.1f} ms/round"
        )
        print(
            f"   {name:27s} median {ms(med)}  mean {ms(statistics.fmean(times))}"
            f"  min {ms(min(times))}{extra}"
        )
    parts = {
        "worker": statistics.median(p.worker for p in prot),
        "combine to fan-out": statistics.median(p.combine for p in prot),
        "after fan-out": statistics.median(p.after for p in prot),
    }
    print("   (b) medians: " + ", ".join(f"{k} {ms(v).strip()}" for k, v in parts.items()))
    # The same fixed cost without the loop: each round against its own worker's compute time
    # (read weights + steps), immune to drifts of this machine's speed between measurements.
    for name, rest in [("(b)", prot_rest)] + ([("(c)", steady(lam_rest))] if with_lambda else []):
        med = statistics.median(rest)
        print(
            f"   {name} round minus its worker's compute: median {ms(med).strip()} "
            f"= {100 * med / loop_med:.1f}% of the loop's round"
        )
    equal = same(loop.weights, prot_w)
    print(f"   final weights (b) == (a): {equal}")
    if lam_w is not None:
        print(f"   final weights (c) == (a): {same(loop.weights, lam_w)}")
    return equal.startswith("yes")


# ------------------------------------------------------------------------------------------
# Profile


@contextlib.contextmanager
def count_calls(targets: list[tuple[Any, str]]) -> Iterator[Counter[str]]:
    """Count calls of module functions (e.g. os.fsync) while the block runs."""
    counts: Counter[str] = Counter()
    saved = [(obj, name, getattr(obj, name)) for obj, name in targets]

    def wrap(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[key] += 1
            return fn(*args, **kwargs)

        return counted

    for obj, name, fn in saved:
        setattr(obj, name, wrap(f"{getattr(obj, '__name__', obj)}.{name}", fn))
    try:
        yield counts
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def profile(w: Workload, rounds: int, efs_dir: Path | None) -> None:
    """cProfile of the in-process protocol's rounds, and the calls that reach the disk."""
    import sqlite3

    config = full_config(w, rounds)
    targets = [(os, "fsync"), (os, "rename"), (os, "replace"), (os, "link"), (os, "unlink")]
    targets += [(os, "open"), (os, "mkdir"), (os, "stat"), (sqlite3, "connect")]
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory(dir=efs_dir, prefix="bench-efs-") as d, quiet():
        warm = Protocol(config, Path(d), "warm")  # imports, dataset, process caches
        for r in range(rounds):
            warm.round(r)
        protocol = Protocol(config, Path(d), "profiled")
        times = []
        with count_calls(targets) as counts:
            for r in range(rounds):
                prof.enable()
                times.append(protocol.round(r))
                prof.disable()
    total = sum(t.worker + t.combine + t.after for t in times)
    print(f"\n== profile of {w.name}: {rounds} in-process protocol rounds, {total:.3f} s")
    print(f"   median critical path {ms(statistics.median(t.critical for t in times)).strip()}")
    print("   calls per round (Python level; SQLite's own fsyncs are not seen):")
    for key, n in sorted(counts.items()):
        print(f"     {key:22s} {n / rounds:7.1f}")
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(
        r"simulator|lambda_runtime|posix|sqlite3", 40
    )
    print(text.getvalue())


def filesystem_of(path: Path) -> str:
    """The mount point and file system type holding `path` (from /proc/mounts)."""
    best = ("?", "?")
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                _, mnt, fstype, *_ = line.split()
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best[0]):
                    best = (mnt, fstype)
    except OSError:
        pass
    return f"{best[1]} at {best[0]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="fewer rounds, one run")
    ap.add_argument("--no-lambda", action="store_true", help="skip (c), the local Lambda")
    ap.add_argument("--repeat", type=int, default=3, help="runs of (a) and (b) per workload")
    ap.add_argument("--workload", action="append", choices=[w.name for w in WORKLOADS])
    ap.add_argument("--efs-dir", type=Path, default=None, help="where the EFS directories go")
    ap.add_argument("--profile", choices=[w.name for w in WORKLOADS], help="profile (b) only")
    args = ap.parse_args(argv)
    efs_dir = args.efs_dir or Path(tempfile.gettempdir())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"machine: {os.cpu_count()} cores (load average {load}), Python "
        f"{sys.version.split()[0]}; EFS directory on {filesystem_of(efs_dir)}"
    )
    chosen = [w for w in WORKLOADS if args.workload is None or w.name in args.workload]
    keras = [w.keras for w in WORKLOADS if w.name == args.profile] if args.profile else []
    if any(keras) or (not args.profile and any(w.keras for w in chosen)):
        t0 = time.perf_counter()
        import tensorflow  # noqa: F401 - imported here so no measurement includes it

        print(f"TensorFlow import: {time.perf_counter() - t0:.1f} s (not measured below)")
    if args.profile:
        w = next(w for w in WORKLOADS if w.name == args.profile)
        profile(w, max(4, w.rounds // 2) if args.quick else w.rounds, args.efs_dir)
        return 0
    ok = True
    for w in chosen:
        rounds = max(4, w.rounds // 2) if args.quick else w.rounds
        repeat = 1 if args.quick else args.repeat
        ok = bench(w, rounds, repeat, args.efs_dir, not args.no_lambda) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
