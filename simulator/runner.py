"""Build and run one training run on the local Lambda service, watch it, and collect its report.

A run: an output directory; a :class:`~lambda_runtime.LambdaService` whose run directory is
``<out>/lambda``; the training function registered from the example's code directory with the
settings' memory, timeout, /tmp, retries and an EFS mount of ``<out>/efs``; a start event
(``{"start": true, "workers": N, "run": ..., "config": {...}}``, invoked synchronously on a side
thread so its error, if any, comes back at once). Then the runner polls the progress table, the
billing ledger and the pool until the run finishes or fails, and shows progress through a
:class:`ProgressSink`.

Liveness. On AWS the protocol's watchdog (``check_stalled``) runs on an EventBridge schedule and
rescues a round after its stall period. Locally the runner knows when *nothing* is in flight (no
queued, retrying or running event, and the start returned) while the run is neither finished
nor failed: then nothing can ever move it, so the watchdog is asked at once, as if its stall
period had passed, to rescue the round or, after ``max_rescues``, to fail the run with its
reason. (Anything in flight ends by itself: a running invocation at its timeout, a retry after
its delay, a throttled event when concurrency frees up. The watchdog is not polled while work is
in flight: it loads the run's model, which for a Keras model means TensorFlow in the runner.)
The predictor lays rescues out with the AWS stall period. A run is failed when a round
never completed and its rescues are spent, when the start failed, with ``fail_fast`` at the first
out-of-memory or timed-out invocation, at ``max_wall`` laptop seconds, or on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lambda_runtime import FunctionConfig, LambdaService
from lambda_runtime.billing import LEDGER_FILE, InvocationRecord
from lambda_runtime.errors import ServiceError
from simulator.progress import RoundRow, SqliteProgressTable
from simulator.protocol import Workspace, check_stalled
from simulator.run_setup import (
    FUNCTION,
    HANDLER,
    MOUNT,
    HostCapacityError,
    aws_stall_after,
    capacity_problem,
    code_dir_for,
    default_out_dir,
    host_memory_mb,
    host_notes,
    local_stall_after,
    oversubscription,
    rounds_planned,
    stage_dataset,
    thread_environment,
    training_config,
)
from simulator.settings import RunSettings, SettingsError, check_runnable

POLL_S = 0.2
IDLE_GRACE_S = 0.5


@dataclass
class Snapshot:
    """What the live display shows."""

    elapsed_s: float = 0.0
    phase: str = "starting"
    round: int | None = None
    rounds_done: int = 0
    rounds_planned: int | None = None
    epoch: int | None = None
    epochs_done: float = 0.0
    loss: float | None = None
    accuracy: float | None = None
    active_envs: int = 0
    environments: int = 0
    invocations: int = 0
    cold: int = 0
    failed: int = 0
    timeouts: int = 0
    ooms: int = 0
    retries: int = 0
    throttled: int = 0
    rescues: int = 0
    lambda_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dict(self.__dict__)


class ProgressSink(Protocol):
    """Receives progress while a run goes on (rich display, JSON lines, nothing)."""

    def update(self, snap: Snapshot) -> None:
        """The current state (called every poll)."""

    def round_done(self, row: RoundRow, snap: Snapshot) -> None:
        """A round was combined."""

    def note(self, text: str) -> None:
        """Something worth a line (a rescue, a failure)."""

    def close(self) -> None:
        """The run is over."""


class NullSink:
    """Shows nothing."""

    def update(self, snap: Snapshot) -> None:
        """Nothing."""

    def round_done(self, row: RoundRow, snap: Snapshot) -> None:
        """Nothing."""

    def note(self, text: str) -> None:
        """Nothing."""

    def close(self) -> None:
        """Nothing."""


@dataclass
class RunResult:
    """How a run ended, where its files are, and its report."""

    status: str
    reason: str | None
    out_dir: Path
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The run finished."""
        return self.status == "finished"


def _shards_of(ws: Workspace) -> int:
    """Shard aggregators per round of the run on EFS (0: the single combiner)."""
    cfg = ws.config_or_none()
    if cfg is None or cfg.aggregation != "sharded" or cfg.shards is None:
        return 0
    return int(cfg.shards)


class _ServiceInvoker:
    """The protocol's Invoker for the runner's own watchdog calls: async invokes in-process."""

    def __init__(self, svc: LambdaService) -> None:
        self.svc = svc

    def invoke_async(self, function_name: str, event: Mapping[str, Any]) -> None:
        """Queue an Event invocation."""
        result = self.svc.invoke(function_name, dict(event), invocation_type="Event")
        if result.status_code != 202:
            raise RuntimeError(f"invoke {function_name}: expected 202, got {result.status_code}")


class _LedgerTail:
    """Reads the billing ledger incrementally (whole lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def poll(self) -> list[InvocationRecord]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [
            InvocationRecord.from_json(json.loads(line))
            for line in complete.splitlines()
            if line.strip()
        ]


# ------------------------------------------------------------------------------------------
# The run


class Runner:
    """One run: set up, start, watch, collect. `run()` returns a RunResult (never raises for a
    failed run; bad settings raise SettingsError before anything starts)."""

    def __init__(
        self,
        settings: RunSettings,
        sink: ProgressSink | None = None,
        *,
        check_capacity: bool = True,
        env_mb: float | None = None,
    ) -> None:
        check_runnable(settings)
        self.settings = settings
        self.sink: ProgressSink = sink or NullSink()
        self.config = training_config(settings)
        if check_capacity:
            problem = capacity_problem(settings, env_mb)
            if problem is not None:
                raise HostCapacityError(problem)
        self.out = Path(settings.out) if settings.out else default_out_dir(settings)
        self._start_result: Any = None
        self._start_error: str | None = None
        self._start_done = threading.Event()

    # ---- output directory --------------------------------------------------------------
    def _prepare_out(self) -> None:
        out = self.out
        if (out / "run.json").exists() or (out / "lambda").exists():
            raise SettingsError(
                "out", f"{str(out)!r} already holds a run; choose another directory or remove it"
            )
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(
            json.dumps(self.settings.with_values(out=str(out)).to_json(), indent=1) + "\n"
        )

    # ---- start -------------------------------------------------------------------------
    def _start(self, svc: LambdaService) -> None:
        event = {
            "start": True,
            "workers": self.settings.workers,
            "run": self.settings.run_id,
            "config": self.config,
        }
        try:
            result = svc.invoke(FUNCTION, event)
            self._start_result = result
            if result.function_error is not None:
                try:
                    body = json.loads(result.payload or b"{}")
                except ValueError:
                    body = {}
                self._start_error = (
                    f"the start invocation failed: {body.get('errorType', result.function_error)}: "
                    f"{body.get('errorMessage', '')}".rstrip(": ")
                )
        except ServiceError as exc:
            self._start_error = f"the start invocation was refused: {type(exc).__name__}: {exc}"
        except Exception as exc:  # the runner must end the run, whatever happened
            self._start_error = f"the start invocation failed in the service: {exc!r}"
        finally:
            self._start_done.set()

    # ---- the whole run -----------------------------------------------------------------
    def run(self) -> RunResult:
        """Run to the end and write the report; the result says how it ended."""
        s = self.settings
        t_begin = time.time()
        self._prepare_out()
        out = self.out
        efs_dir, lambda_dir = out / "efs", out / "lambda"
        code_dir = code_dir_for(s, out)
        svc = LambdaService(
            run_dir=lambda_dir,
            clock=s.clock,
            isolation=s.isolation,
            time_scale=s.time_scale,
            idle_timeout_s=600.0,
        )
        status: str = "failed"
        reason: str | None = "the runner stopped before the run ended"
        facts: dict[str, Any] = {}
        watchdog: list[dict[str, Any]] = []
        interrupted = False
        ws = Workspace(efs_dir, s.run_id, MOUNT)
        try:
            svc.register(
                FunctionConfig(
                    name=FUNCTION,
                    handler=HANDLER,
                    code_dir=code_dir,
                    memory_mb=s.memory,
                    timeout_s=s.timeout,
                    ephemeral_mb=s.ephemeral,
                    efs={MOUNT: efs_dir},
                    reserved_concurrency=s.concurrency,
                    max_retry_attempts=s.retries,
                    architecture=s.architecture,  # type: ignore[arg-type]
                    environment=thread_environment(s),
                )
            )
            mechanisms = svc.mechanisms(FUNCTION)
            self.config["dataset"] = stage_dataset(s.dataset, efs_dir, mechanisms)
            start_at = time.time()
            starter = threading.Thread(target=self._start, args=(svc,), name="start", daemon=True)
            starter.start()
            try:
                status, reason = self._watch(svc, ws, start_at, watchdog)
            except KeyboardInterrupt:
                interrupted = True
                status, reason = "failed", "interrupted by the user (Ctrl-C)"
                ws.mark_failed(reason)
            if status == "finished":
                svc.wait_idle(10.0)  # late duplicates finish and are billed
            facts = self._facts(ws, start_at, mechanisms)
        finally:
            self.sink.close()
            svc.close()
        facts.update(
            status=status,
            reason=reason,
            watchdog=watchdog,
            throttled=svc.async_stats()["throttled"],
            runner_wall_s=time.time() - t_begin,
            interrupted=interrupted,
        )
        self._collect(ws, facts)
        from simulator.report import write_report

        report = write_report(out)
        return RunResult(status, reason, out, report)

    def _watch(
        self, svc: LambdaService, ws: Workspace, start_at: float, watchdog: list[dict[str, Any]]
    ) -> tuple[str, str | None]:
        s = self.settings
        table = SqliteProgressTable(ws.progress_path)
        tail = _LedgerTail(svc.run_dir / LEDGER_FILE)
        snap = Snapshot()
        seen_rounds: set[int] = set()
        invoker = _ServiceInvoker(svc)
        idle_since: float | None = None
        planned: int | None = None
        start_noted = False
        while True:
            now = time.time()
            snap.elapsed_s = now - start_at
            for r in tail.poll():
                self._count(snap, r)
                if s.fail_fast and r.status in ("oom", "timeout"):
                    what = "ran out of memory" if r.status == "oom" else "timed out"
                    reason = ws.mark_failed(
                        f"an invocation {what} ({r.error_type}) and fail_fast is on"
                    )
                    return "failed", reason
            stats = svc.pool.stats(FUNCTION)
            snap.active_envs, snap.environments = stats["busy"], stats["busy"] + stats["idle"]
            snap.throttled = svc.async_stats()["throttled"]
            if planned is None:
                planned = self._planned(ws)
                snap.rounds_planned = planned
            rows = table.rounds(s.run_id) if ws.progress_path.exists() else []
            self._apply_rows(snap, rows, seen_rounds)
            self.sink.update(snap)
            if ws.final_summary() is not None:
                return "finished", str(ws.final_summary().get("reason") or "")  # type: ignore[union-attr]
            failure = ws.failure()
            if failure is not None:
                return "failed", failure
            if self._start_done.is_set() and self._start_error is not None:
                if not ws.claimed("fanout-0"):
                    return "failed", ws.mark_failed(self._start_error)
                if not start_noted:  # it failed after claiming the fan-out: the run goes on
                    self.sink.note(self._start_error + " (after claiming round 0's fan-out)")
                    start_noted = True
            if s.max_wall is not None and now - start_at > s.max_wall:
                return "failed", ws.mark_failed(
                    f"gave up after {s.max_wall:g} laptop seconds (--max-wall)"
                )
            idle = (
                self._start_done.is_set()
                and svc.queue.pending() == 0
                and svc.pool.busy_total() == 0
            )
            if idle:
                idle_since = idle_since or now
                if now - idle_since >= IDLE_GRACE_S:
                    # Nothing in flight can move the run: ask the watchdog as if its stall period
                    # had passed (see the module docstring).
                    result = check_stalled(ws, invoker, now=now + local_stall_after(s) + 1.0)
                    watchdog.append({**result, "at": now - start_at, "forced": True})
                    self._note_watchdog(result, snap)
                    idle_since = None
            else:
                idle_since = None
            time.sleep(POLL_S)

    def _note_watchdog(self, result: Mapping[str, Any], snap: Snapshot) -> None:
        if result.get("status") == "rescued":
            snap.rescues += 1
            self.sink.note(f"watchdog: rescued a stalled round ({result.get('reason')})")
        elif result.get("status") == "failed":
            self.sink.note(f"watchdog: the run failed ({result.get('reason')})")

    @staticmethod
    def _count(snap: Snapshot, r: InvocationRecord) -> None:
        snap.invocations += 1
        snap.cold += int(r.cold)
        snap.failed += int(r.status != "success")
        snap.timeouts += int(r.status == "timeout")
        snap.ooms += int(r.status == "oom")
        snap.retries += int(r.attempt > 1)
        snap.lambda_s += ((r.init_ms or 0.0) + r.duration_ms) / 1000.0

    def _apply_rows(self, snap: Snapshot, rows: list[RoundRow], seen: set[int]) -> None:
        if not rows:
            return
        snap.phase = "training"
        current = rows[-1]
        snap.round, snap.epoch = current.round, current.epoch
        combined = [r for r in rows if r.status == "combined"]
        snap.rounds_done = len(combined)
        if combined:
            snap.epochs_done = combined[-1].epochs_done or 0.0
        for r in combined:
            if r.loss is not None:
                snap.loss, snap.accuracy = r.loss, r.accuracy
            if r.round not in seen:
                seen.add(r.round)
                self.sink.round_done(r, snap)

    def _planned(self, ws: Workspace) -> int | None:
        manifest = ws.data_dir / "manifest.json"
        if not manifest.exists():
            return None
        try:
            n_train = int(json.loads(manifest.read_text())["arrays"]["y_train"]["shape"][0])
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        return rounds_planned(self.settings, n_train)

    # ---- collecting --------------------------------------------------------------------
    def _facts(
        self, ws: Workspace, start_at: float, mechanisms: Mapping[str, str]
    ) -> dict[str, Any]:
        """What the report needs from EFS and the runner, read before EFS may be removed."""
        from simulator.platform import RunShape

        s = self.settings
        manifest: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            manifest = json.loads((ws.data_dir / "manifest.json").read_text())
        arrays = manifest.get("arrays", {})

        def nbytes(name: str, rows: int | None = None) -> int:
            spec = arrays.get(name)
            if not spec:
                return 0
            import numpy as np

            shape = spec["shape"]
            count = shape[0] if rows is None else min(rows, shape[0])
            per = int(np.dtype(spec["dtype"]).itemsize)
            for d in shape[1:]:
                per *= int(d)
            return int(count) * per

        n_train = int(arrays.get("y_train", {}).get("shape", [0])[0] or 0)
        sample = (nbytes("x_train") + nbytes("y_train")) // n_train if n_train else 0
        test = nbytes("x_test", s.eval_samples) + nbytes("y_test", s.eval_samples)
        dataset = sum(nbytes(n) for n in ("x_train", "y_train", "x_test", "y_test"))
        weights, n_arrays = _weights_size(ws)
        summary = ws.final_summary()
        final_end = None
        if summary is not None:
            final_end = summary.get("finished_at")
        shape = RunShape(
            workers=s.workers,
            weights_bytes=weights,
            n_arrays=n_arrays,
            velocity=s.momentum > 0 and s.algorithm == "gradient_averaging",
            sample_bytes=sample,
            test_bytes=test,
            dataset_bytes=dataset,
            stored_bytes=_tree_bytes(ws.root),
            shards=_shards_of(ws),
        )
        return {
            "start_invoked_at": start_at,
            "final_end_at": final_end,
            "rounds_planned": rounds_planned(s, n_train) if n_train else None,
            "shape": shape.to_json(),
            "aws_stall_after_s": aws_stall_after(s),
            "local_stall_after_s": local_stall_after(s),
            "host": {
                "cores": len(os.sched_getaffinity(0)),
                "memory_available_mb": host_memory_mb(),
                "mechanisms": dict(mechanisms),
            },
            "host_notes": host_notes(s),
            "oversubscription": oversubscription(s),
        }

    def _collect(self, ws: Workspace, facts: dict[str, Any]) -> None:
        out = self.out
        if ws.progress_path.exists():
            shutil.copy2(ws.progress_path, out / "progress.sqlite")
        if ws.final_dir.is_dir():
            shutil.copytree(ws.final_dir, out / "model", dirs_exist_ok=True)
        start = self._start_result
        if start is not None and start.record is not None:
            facts["start_status"] = start.record.status
        (out / "run.json").write_text(json.dumps(facts, indent=1, default=str) + "\n")
        # Service internals (environment scratch space, the /tmp image cache) are not results.
        for scratch in ("environments", "cache"):
            shutil.rmtree(out / "lambda" / scratch, ignore_errors=True)
        if not self.settings.keep_efs:
            shutil.rmtree(out / "efs", ignore_errors=True)


def _weights_size(ws: Workspace) -> tuple[int, int]:
    """(bytes, arrays) of the model's trainable weights as stored (.npy data, no headers)."""
    import numpy as np

    directory = ws.final_dir if ws.final_dir.is_dir() else None
    if directory is None:
        rounds = ws.weight_rounds()
        if not rounds:
            return 0, 0
        directory = ws.weights_dir(rounds[-1])
    total, count = 0, 0
    for path in sorted(directory.glob("array-*.npy")):
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        total += int(arr.nbytes)
        count += 1
    return total, count


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def run(settings: RunSettings, sink: ProgressSink | None = None) -> RunResult:
    """Run `settings` to the end (see :class:`Runner`)."""
    return Runner(settings, sink).run()


__all__ = [
    "NullSink",
    "ProgressSink",
    "RunResult",
    "Runner",
    "Snapshot",
    "run",
]
