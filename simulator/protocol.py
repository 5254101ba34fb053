"""The training protocol: one Lambda function, three roles, correct under at-least-once delivery.

Roles and their events (design §1; the thesis's keys plus optional ``run``, ``round``, ``mount``
and, on start, ``config``)::

    {"start": true, "workers": N}                        -> run_start
    {"workerno": i, "workers": N, "epochsdone": e}       -> run_worker
    {"combine": true, "workers": N, "epochsdone": e}     -> run_combine
    {"check": true}                                      -> check_stalled (the watchdog)

Events are parsed in :mod:`simulator.handler`; this module holds the roles, with I/O through
three small interfaces: :class:`Workspace` (the run directory on EFS), an :class:`Invoker`
(``invoke_async``; boto3 by default) and a :class:`~simulator.progress.ProgressTable`.

EFS layout, under ``<mount>/runs/<run>/``::

    config.json                    the TrainingConfig, created once (a link-based claim)
    data/                          the dataset as .npy + manifest (prepare_on_efs)
    weights/round-<r>/             array-<k>.npy [velocity-<k>.npy] meta.json  (immutable)
    results/round-<r>/worker-<i>/  array-<k>.npy meta.json  (immutable)
    arrivals/round-<r>/            ArrivalSet of worker ids
    attempts/round-<r>/worker-<i>/ one marker per worker invocation (for failure reasons)
    claims/combine-<r>, claims/fanout-<r>, claims/rescue-..., claims/fault-...
    progress.sqlite                the progress table (unless config.progress is 'dynamodb')
    final/                         array-<k>.npy summary.json
    failed.json                    why the run failed, if it did

Immutability: weights, results and final are written into a private temp directory and renamed
onto their final name. ``rename(2)`` of a directory onto an existing non-empty one fails, so the
first complete publish wins and later ones are discarded: a reader never sees a mix, and a
duplicate never replaces anything. A duplicate's content would be identical anyway (results are
deterministic given (seed, round, worker)) except after an early stop, whose sample count
depends on timing; first-wins keeps even that case consistent.

Epoch accounting: the training set of n samples is split for each epoch ``e`` into N shards by
``shard_indices(n, seed, e, N, i)``. A shard has at most ``B = ceil(ceil(n/N) / batch_size)``
mini-batches. Each worker runs ``S = min(steps, B)`` of them per round (``steps`` null: ``S = B``,
one epoch per round, the thesis's setting), so an epoch takes ``R = ceil(B / S)`` rounds and
round ``r`` belongs to epoch ``r // R`` and starts at mini-batch ``(r % R) * S`` of the shard.
``epochsdone`` in an event for round ``r`` is ``r // R``, the epochs completed before it (with
``R = 1``, as in the thesis, it equals the round). A thesis-style event without ``round`` means
the first round of epoch ``epochsdone``. A worker that stops early skips the rest of its
mini-batches for that round; the next round moves on (its sample count says what was done).

Triggers: a worker publishes its result, then adds its id to the round's ArrivalSet; whoever
sees the set complete (the completing add, or a later duplicate that still finds the combine
unclaimed) tries ``claim(combine-<r>)``; only the winner invokes the combine. The combine is
idempotent; whoever completes it tries ``claim(fanout-<r+1>)`` and only the winner invokes the
N workers of the next round. The combine of round ``r`` turns weights ``r`` into ``r + 1`` and
then deletes weights and results older than the ``history`` newest rounds; round ``r`` counts as
done while weights ``r + 1`` exist or once ``fanout-<r+1>`` is claimed (pruning comes later), so
a late duplicate of any old round is recognised and ignored.

Liveness rule (:func:`check_stalled`, run by the ``check`` event: locally by the runner every
few seconds, on AWS by an EventBridge schedule whose target input is the constant
``{"check": true, "run": "<run>"}``): a round is *stalled* when ``stall_after_s``
(default ``(max_retry_attempts + 1) * timeout_s + 240`` s: every Lambda attempt timed out plus
its 1 and 2 minute retry delays and a minute of slack) has passed since its fan-out or its last
rescue without the next weights appearing. A stalled round is rescued by re-invoking its missing
workers (or its combine, if all arrived; or the combine or start that published weights but
died before fanning out), at most ``max_rescues`` times; after that the run is marked failed
with the reason, e.g. ``round 3: worker 5 never arrived after 3 attempts``, in ``failed.json``
and the progress table.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lambda_runtime.efs import (
    ArrivalSet,
    claim,
    read_json,
    read_npy,
    safe_join,
)
from simulator.aggregate import combine_gradient_averaging, combine_model_averaging
from simulator.algorithms import (
    ALGORITHMS,
    Contribution,
    SGDConfig,
    SGDConfigError,
    gradient_contribution,
    local_sgd_contribution,
)
from simulator.data import (
    MANIFEST,
    Dataset,
    batches,
    get_dataset,
    open_from_efs,
    prepare_on_efs,
    shard_indices,
)
from simulator.models import MODEL_NAMES, Array, Model, get_model
from simulator.progress import ProgressTable, open_progress

DEFAULT_RUN = "default"
DEFAULT_MOUNT = "/mnt/efs"
MAX_WORKERS = 10_000
RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MOUNT_PATH = re.compile(r"/mnt/[a-zA-Z0-9\-_.]+")
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9\-_:.$]{1,170}")
FANOUT_THREADS = 16
# Lambda's async retry delays (1 and 2 minutes) plus a minute of slack, for the stall deadline.
RETRY_DELAYS_S = 60 + 120
STALL_SLACK_S = 60


class EventError(ValueError):
    """A malformed event or config; `field` names the offender and the message what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (EventError, (self.field, self.message))


class InjectedFault(RuntimeError):
    """A crash the test-only ``faults`` config asked for; the handler acts it out."""

    def __init__(self, action: str, where: str) -> None:
        super().__init__(f"injected fault ({action}) at {where}")
        self.action = action
        self.where = where

    def __reduce__(self) -> tuple[Any, ...]:
        return (InjectedFault, (self.action, self.where))


class FanOutError(RuntimeError):
    """Some invocations of a fan-out failed; the watchdog re-invokes what never arrives."""


# ------------------------------------------------------------------------------------------
# Interfaces


class Invoker(Protocol):
    """Sends an asynchronous (Event) invocation."""

    def invoke_async(self, function_name: str, event: Mapping[str, Any]) -> None:
        """Queue `event` for `function_name`; raise if Lambda did not accept it."""
        ...


class Context(Protocol):
    """The parts of Lambda's context object the roles use."""

    @property
    def aws_request_id(self) -> str: ...

    @property
    def function_name(self) -> str | None: ...

    def get_remaining_time_in_millis(self) -> int: ...


class Boto3Invoker:
    """`Invoker` over boto3's Lambda client (the environment supplies endpoint and credentials)."""

    def __init__(self, client: Any = None, **client_kwargs: Any) -> None:
        self._client = client
        self._client_kwargs = client_kwargs
        self._lock = threading.Lock()

    def _get_client(self) -> Any:
        with self._lock:  # boto3 clients are thread-safe once built, but building one is not
            if self._client is None:
                import boto3
                from botocore.config import Config

                kwargs = {"config": Config(retries={"max_attempts": 5, "mode": "standard"})}
                kwargs.update(self._client_kwargs)
                self._client = boto3.client("lambda", **kwargs)
            return self._client

    def invoke_async(self, function_name: str, event: Mapping[str, Any]) -> None:
        """InvocationType=Event; raises unless Lambda answers 202."""
        response = self._get_client().invoke(
            FunctionName=function_name,
            InvocationType="Event",
            Payload=json.dumps(dict(event)).encode(),
        )
        status = response.get("StatusCode")
        if status != 202:
            raise RuntimeError(f"invoke {function_name}: expected status 202, got {status}")


# ------------------------------------------------------------------------------------------
# Training config


def _int(name: str, value: Any, lo: int, hi: int | None = None, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    rng = f">= {lo}" if hi is None else f"from {lo} to {hi}"
    if isinstance(value, bool) or not isinstance(value, int):
        none = " or null" if optional else ""
        raise EventError(name, f"must be an integer {rng}{none}, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise EventError(name, f"must be {rng}, got {value}")
    return value


def _real(
    name: str,
    value: Any,
    lo: float,
    hi: float | None = None,
    *,
    optional: bool = False,
    open_lo: bool = False,
) -> Any:
    if value is None and optional:
        return None
    rng = f"{'>' if open_lo else '>='} {lo}" + ("" if hi is None else f" and <= {hi}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EventError(name, f"must be a number {rng}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < lo or (open_lo and v == lo) or (hi is not None and v > hi):
        raise EventError(name, f"must be a finite number {rng}, got {value!r}")
    return v


def _choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed or not isinstance(value, str):
        raise EventError(name, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def check_mount(name: str, value: Any) -> str:
    """A Lambda EFS mount path, '/mnt/<name>'."""
    if not isinstance(value, str) or not MOUNT_PATH.fullmatch(value) or len(value) > 160:
        raise EventError(name, f"must be an EFS mount path /mnt/[a-zA-Z0-9-_.]+, got {value!r}")
    return value


def check_run_id(name: str, value: Any) -> str:
    """A run id that stays inside <mount>/runs/."""
    if not isinstance(value, str) or not RUN_ID.fullmatch(value) or value in (".", ".."):
        raise EventError(
            name,
            "must be 1-128 characters of letters, digits, '_', '.' or '-', not starting with "
            f"'.' or '-' (it names a directory under <mount>/runs/), got {value!r}",
        )
    return value


FAULT_POINTS: Mapping[str, tuple[str, ...]] = {
    "start": ("after_fanout_claim",),
    "worker": ("start", "mid_round", "before_publish", "after_publish", "after_arrival"),
    "combine": ("start", "after_publish", "after_fanout_claim"),
}
FAULT_ACTIONS = ("raise", "exit", "hang")


@dataclass(frozen=True)
class Fault:
    """Test-only: crash the first `times` invocations of `role` reaching point `at`."""

    role: str
    at: str
    round: int | None = None
    worker: int | None = None
    times: int = 1
    action: str = "raise"
    step: int = 1

    @classmethod
    def from_mapping(cls, name: str, value: Any) -> Fault:
        """Validate one entry of config.faults."""
        if not isinstance(value, Mapping):
            raise EventError(name, f"must be an object, got {value!r}")
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise EventError(f"{name}.{sorted(unknown)[0]}", "unknown fault field")
        role = _choice(f"{name}.role", value.get("role"), tuple(FAULT_POINTS))
        return cls(
            role=role,
            at=_choice(f"{name}.at", value.get("at"), FAULT_POINTS[role]),
            round=_int(f"{name}.round", value.get("round"), 0, optional=True),
            worker=_int(f"{name}.worker", value.get("worker"), 0, optional=True),
            times=_int(f"{name}.times", value.get("times", 1), 1, 1000),
            action=_choice(f"{name}.action", value.get("action", "raise"), FAULT_ACTIONS),
            step=_int(f"{name}.step", value.get("step", 1), 0),
        )


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a run needs, validated; stored as the run's config.json."""

    workers: int
    model: str = "softmax"
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    algorithm: str = "gradient_averaging"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    steps: int | None = None
    epochs: int | None = 1
    max_rounds: int | None = None
    target_loss: float | None = None
    target_accuracy: float | None = None
    seed: int = 0
    mount: str = DEFAULT_MOUNT
    function_name: str | None = None
    history: int = 2
    eval_every: int = 1
    eval_batch_size: int = 512
    eval_samples: int | None = None
    progress: str = "sqlite"
    progress_table: str | None = None
    timeout_s: int | None = None
    max_retry_attempts: int = 2
    stall_after_s: float | None = None
    max_rescues: int = 2
    safety_margin_ms: float = 1000.0
    publish_mb_per_s: float = 50.0
    faults: tuple[Fault, ...] = ()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], workers: int | None = None) -> TrainingConfig:
        """Validate `values` (JSON types); errors name the field as 'config.<name>'."""
        if not isinstance(values, Mapping):
            raise EventError("config", f"must be a JSON object, got {values!r}")
        names = [f.name for f in fields(cls)]
        for key in values:
            if key not in names:
                raise EventError(
                    f"config.{key}", f"unknown setting; allowed: {', '.join(names[1:])}"
                )
        v = dict(values)
        if workers is not None:
            if "workers" in v and v["workers"] != workers:
                raise EventError(
                    "config.workers", f"differs from the event's workers={workers}; omit it"
                )
            v["workers"] = workers
        c = "config."
        model_kwargs = v.get("model_kwargs", {})
        if not isinstance(model_kwargs, Mapping) or not all(
            isinstance(k, str) for k in model_kwargs
        ):
            raise EventError(c + "model_kwargs", f"must be an object, got {model_kwargs!r}")
        dataset = v.get("dataset", "digits")
        if not isinstance(dataset, str) or not dataset:
            raise EventError(c + "dataset", f"must be a non-empty string, got {dataset!r}")
        try:
            sgd = SGDConfig(
                lr=v.get("lr", 0.1),
                momentum=v.get("momentum", 0.0),
                weight_decay=v.get("weight_decay", 0.0),
            )
        except SGDConfigError as exc:
            raise EventError(c + exc.field, str(exc).split(": ", 1)[-1]) from None
        function_name = v.get("function_name")
        if function_name is not None and (
            not isinstance(function_name, str) or not FUNCTION_NAME.fullmatch(function_name)
        ):
            raise EventError(
                c + "function_name", f"must be a Lambda function name or ARN, got {function_name!r}"
            )
        progress = _choice(c + "progress", v.get("progress", "sqlite"), ("sqlite", "dynamodb"))
        table = v.get("progress_table")
        if table is not None and (not isinstance(table, str) or not table):
            raise EventError(c + "progress_table", f"must be a table name, got {table!r}")
        if progress == "dynamodb" and table is None:
            raise EventError(c + "progress_table", "is required when progress is 'dynamodb'")
        raw_faults = v.get("faults", [])
        if not isinstance(raw_faults, (list, tuple)):
            raise EventError(c + "faults", f"must be a list, got {raw_faults!r}")
        cfg = cls(
            workers=_int(c + "workers", v.get("workers"), 1, MAX_WORKERS),
            model=_choice(c + "model", v.get("model", "softmax"), MODEL_NAMES),
            model_kwargs=dict(model_kwargs),
            dataset=dataset,
            algorithm=_choice(c + "algorithm", v.get("algorithm", ALGORITHMS[0]), ALGORITHMS),
            lr=sgd.lr,
            momentum=sgd.momentum,
            weight_decay=sgd.weight_decay,
            batch_size=_int(c + "batch_size", v.get("batch_size", 32), 1, 1_000_000),
            steps=_int(c + "steps", v.get("steps"), 1, optional=True),
            epochs=_int(c + "epochs", v.get("epochs", 1), 1, optional=True),
            max_rounds=_int(c + "max_rounds", v.get("max_rounds"), 1, optional=True),
            target_loss=_real(c + "target_loss", v.get("target_loss"), 0.0, optional=True),
            target_accuracy=_real(
                c + "target_accuracy", v.get("target_accuracy"), 0.0, 1.0, optional=True
            ),
            seed=_int(c + "seed", v.get("seed", 0), 0, 2**63 - 1),
            mount=check_mount(c + "mount", v.get("mount", DEFAULT_MOUNT)),
            function_name=function_name,
            history=_int(c + "history", v.get("history", 2), 1),
            eval_every=_int(c + "eval_every", v.get("eval_every", 1), 1),
            eval_batch_size=_int(c + "eval_batch_size", v.get("eval_batch_size", 512), 1),
            eval_samples=_int(c + "eval_samples", v.get("eval_samples"), 1, optional=True),
            progress=progress,
            progress_table=table,
            timeout_s=_int(c + "timeout_s", v.get("timeout_s"), 1, 900, optional=True),
            max_retry_attempts=_int(c + "max_retry_attempts", v.get("max_retry_attempts", 2), 0, 2),
            stall_after_s=_real(
                c + "stall_after_s", v.get("stall_after_s"), 0.0, optional=True, open_lo=True
            ),
            max_rescues=_int(c + "max_rescues", v.get("max_rescues", 2), 0, 100),
            safety_margin_ms=_real(c + "safety_margin_ms", v.get("safety_margin_ms", 1000.0), 0.0),
            publish_mb_per_s=_real(
                c + "publish_mb_per_s", v.get("publish_mb_per_s", 50.0), 0.0, open_lo=True
            ),
            faults=tuple(
                Fault.from_mapping(f"{c}faults[{i}]", f) for i, f in enumerate(raw_faults)
            ),
        )
        if cfg.epochs is None and cfg.max_rounds is None:
            raise EventError(
                c + "epochs", "set epochs or max_rounds (or both) so that the run ends"
            )
        return cfg

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; `from_mapping(to_json())` gives an equal config."""
        out = asdict(self)
        out["model_kwargs"] = dict(self.model_kwargs)
        out["faults"] = [asdict(f) for f in self.faults]
        return out

    @property
    def sgd(self) -> SGDConfig:
        """The SGD settings."""
        return SGDConfig(self.lr, self.momentum, self.weight_decay)

    def stall_after(self) -> float:
        """Seconds without progress after which a round counts as stalled (module docstring)."""
        if self.stall_after_s is not None:
            return self.stall_after_s
        timeout = self.timeout_s or 900
        return (self.max_retry_attempts + 1) * timeout + RETRY_DELAYS_S + STALL_SLACK_S


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Schedule:
    """How rounds map onto epochs and mini-batches (module docstring, 'Epoch accounting')."""

    n_train: int
    workers: int
    batch_size: int
    steps: int | None

    @property
    def batches_per_shard(self) -> int:
        """Mini-batches in the largest shard of an epoch."""
        return max(1, _ceil_div(_ceil_div(self.n_train, self.workers), self.batch_size))

    @property
    def steps_per_round(self) -> int:
        """Mini-batches each worker runs per round."""
        b = self.batches_per_shard
        return b if self.steps is None else min(self.steps, b)

    @property
    def rounds_per_epoch(self) -> int:
        """Rounds that make one epoch."""
        return _ceil_div(self.batches_per_shard, self.steps_per_round)

    def epoch(self, round: int) -> int:
        """The epoch whose shards round `round` uses (= `epochsdone` of its events)."""
        return round // self.rounds_per_epoch

    def start_step(self, round: int) -> int:
        """First mini-batch of the shard that round `round` runs."""
        return (round % self.rounds_per_epoch) * self.steps_per_round

    def epochs_done_after(self, round: int) -> float:
        """Epochs completed once round `round` is combined."""
        return (round + 1) / self.rounds_per_epoch


# ------------------------------------------------------------------------------------------
# Workspace


def _write_file(path: Path, write: Any) -> None:
    # Inside a private temp directory no rename is needed: the directory's rename commits.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode() + b"\n"


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


class Workspace:
    """One run's directory on EFS, `<efs_root>/runs/<run>`, and every file operation on it."""

    def __init__(self, efs_root: str | os.PathLike[str], run: str, mount: str = DEFAULT_MOUNT):
        check_run_id("run", run)
        self.efs_root = Path(efs_root)
        self.run = run
        self.mount = mount
        self.root = safe_join(self.efs_root, "runs", run)

    # ---- paths -------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        """config.json."""
        return self.root / "config.json"

    @property
    def data_dir(self) -> Path:
        """The prepared dataset."""
        return self.root / "data"

    @property
    def progress_path(self) -> Path:
        """The SQLite progress table."""
        return self.root / "progress.sqlite"

    @property
    def final_dir(self) -> Path:
        """The final model and summary."""
        return self.root / "final"

    def weights_dir(self, round: int) -> Path:
        """Weights (and velocity) at the start of round `round`."""
        return self.root / "weights" / f"round-{round}"

    def result_dir(self, round: int, worker: int) -> Path:
        """Worker `worker`'s result for round `round`."""
        return self.root / "results" / f"round-{round}" / f"worker-{worker}"

    def claim_path(self, name: str) -> Path:
        """A claim file."""
        return self.root / "claims" / name

    # ---- config ------------------------------------------------------------------------
    def read_config(self) -> TrainingConfig:
        """The run's config; EventError('run') if the run was never started."""
        try:
            data = read_json(self.config_path)
        except FileNotFoundError:
            raise EventError(
                "run", f"no run {self.run!r} under {self.mount} (send a start event first)"
            ) from None
        return TrainingConfig.from_mapping(data)

    def config_or_none(self) -> TrainingConfig | None:
        """The run's config, or None if there is none yet."""
        return self.read_config() if self.config_path.exists() else None

    def create_config(self, cfg: TrainingConfig) -> TrainingConfig:
        """Write config.json once; return the one that won (callers compare)."""
        text = _json_bytes(cfg.to_json()).decode()
        self.root.mkdir(parents=True, exist_ok=True)
        claim(self.config_path, text)
        return self.read_config()

    # ---- immutable directories ---------------------------------------------------------
    def _publish_dir(
        self,
        final: Path,
        arrays: Mapping[str, Array],
        meta: Mapping[str, Any],
        meta_name: str = "meta.json",
    ) -> bool:
        """Write a private temp directory, then rename it onto `final`: the first one wins.

        Each file is fsynced (its data is durable before the name can appear). The directories
        are not: the rename is a metadata operation that NFS (EFS) performs synchronously at
        the server, and on a local journaling file system it is committed by the next fsync
        of any file (the arrival set's), before anything that depends on it.
        """
        if (final / meta_name).exists():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        tmp.mkdir()
        won = False
        try:
            for name, arr in arrays.items():
                _write_file(tmp / name, lambda fh, a=arr: np.save(fh, a, allow_pickle=False))
            data = _json_bytes(meta)
            _write_file(tmp / meta_name, lambda fh: fh.write(data))
            try:
                os.rename(tmp, final)
                won = True
            except OSError as exc:
                # A non-empty directory already holds the name: someone else published first.
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        finally:
            if not won:
                shutil.rmtree(tmp, ignore_errors=True)
        return won

    @staticmethod
    def _read_arrays(directory: Path, prefix: str, count: int) -> list[Array]:
        # np.asarray gives plain ndarray views of the read-only memory maps (no copy).
        return [np.asarray(read_npy(directory / f"{prefix}-{k}.npy")) for k in range(count)]

    @staticmethod
    def _meta(directory: Path) -> dict[str, Any] | None:
        try:
            meta: dict[str, Any] = read_json(directory / "meta.json")
        except FileNotFoundError:
            return None
        return meta

    # ---- weights -----------------------------------------------------------------------
    def has_weights(self, round: int) -> bool:
        """Weights of round `round` are published (and not pruned)."""
        return (self.weights_dir(round) / "meta.json").exists()

    def publish_weights(
        self,
        round: int,
        weights: Sequence[Array],
        velocity: Sequence[Array] | None,
        meta: Mapping[str, Any],
    ) -> bool:
        """Publish round `round`'s weights once; False if someone else already did."""
        arrays = {f"array-{k}.npy": w for k, w in enumerate(weights)}
        arrays.update({f"velocity-{k}.npy": v for k, v in enumerate(velocity or ())})
        full = {**meta, "arrays": len(weights), "velocity": velocity is not None}
        return self._publish_dir(self.weights_dir(round), arrays, full)

    def weights_meta(self, round: int) -> dict[str, Any] | None:
        """meta.json of round `round`'s weights, or None."""
        return self._meta(self.weights_dir(round))

    def read_weights(self, round: int) -> tuple[list[Array], list[Array] | None]:
        """(weights, velocity or None), memory-mapped read-only."""
        directory = self.weights_dir(round)
        meta = self._meta(directory)
        if meta is None:
            raise FileNotFoundError(errno.ENOENT, "no weights for this round", str(directory))
        weights = self._read_arrays(directory, "array", int(meta["arrays"]))
        velocity = (
            self._read_arrays(directory, "velocity", len(weights)) if meta["velocity"] else None
        )
        return weights, velocity

    def weight_rounds(self) -> list[int]:
        """Rounds whose weights are on EFS, ascending."""
        try:
            names = os.listdir(self.root / "weights")
        except FileNotFoundError:
            return []
        return sorted(int(n[6:]) for n in names if re.fullmatch(r"round-\d+", n))

    def round_done(self, round: int) -> bool:
        """Round `round` was combined: its next weights exist, or were pruned after fan-out.

        Pruning deletes weights r+1 only when a later round is combined, which needs round r+1
        to have been fanned out; so "weights r+1 or fanout-(r+1)" never misses a done round.
        """
        return self.has_weights(round + 1) or self.claimed(f"fanout-{round + 1}")

    # ---- results -----------------------------------------------------------------------
    def has_result(self, round: int, worker: int) -> bool:
        """Worker `worker`'s result of round `round` is published."""
        return (self.result_dir(round, worker) / "meta.json").exists()

    def publish_result(self, round: int, c: Contribution, meta: Mapping[str, Any]) -> bool:
        """Publish a contribution once; False if the worker's result already existed."""
        arrays = {f"array-{k}.npy": a for k, a in enumerate(c.arrays)}
        full = {
            **meta,
            "worker": c.worker,
            "samples": c.samples,
            "loss_sum": _finite(c.loss_sum),
            "loss_sum_hex": float(c.loss_sum).hex(),  # exact, and survives nan/inf
            "arrays": len(c.arrays),
        }
        return self._publish_dir(self.result_dir(round, c.worker), arrays, full)

    def read_result(self, round: int, worker: int) -> tuple[Contribution, dict[str, Any]]:
        """A published contribution (arrays memory-mapped) and its meta."""
        directory = self.result_dir(round, worker)
        meta = self._meta(directory)
        if meta is None:
            raise FileNotFoundError(errno.ENOENT, "no result for this worker", str(directory))
        arrays = self._read_arrays(directory, "array", int(meta["arrays"]))
        c = Contribution(worker, int(meta["samples"]), arrays, float.fromhex(meta["loss_sum_hex"]))
        return c, meta

    # ---- arrivals, claims, attempts ----------------------------------------------------
    def arrivals(self, round: int) -> ArrivalSet:
        """The set of workers that arrived in round `round`."""
        return ArrivalSet(self.root / "arrivals" / f"round-{round}")

    def claim(self, name: str, owner: str) -> bool:
        """Exactly one caller per name gets True."""
        path = self.claim_path(name)
        if path.exists():  # cheap early exit; claim() itself decides races
            return False
        return claim(path, owner)

    def claimed(self, name: str) -> bool:
        """Someone holds claim `name`."""
        return self.claim_path(name).exists()

    def claim_time(self, name: str) -> float | None:
        """When claim `name` was made (Unix seconds), or None."""
        try:
            return self.claim_path(name).stat().st_mtime
        except FileNotFoundError:
            return None

    def record_attempt(self, round: int, worker: int, request_id: str) -> None:
        """Note that an invocation of worker `worker` of round `round` started its work."""
        directory = self.root / "attempts" / f"round-{round}" / f"worker-{worker}"
        directory.mkdir(parents=True, exist_ok=True)
        # A unique name per invocation: Lambda's retries reuse the request id.
        (directory / f"{uuid.uuid4().hex}").write_text(request_id)

    def attempts(self, round: int, worker: int) -> int:
        """How many invocations of worker `worker` of round `round` started their work."""
        try:
            return len(os.listdir(self.root / "attempts" / f"round-{round}" / f"worker-{worker}"))
        except FileNotFoundError:
            return 0

    # ---- pruning, final, failure -------------------------------------------------------
    def prune(self, newest: int, history: int) -> None:
        """Delete weights older than the `history` newest rounds, and their rounds' results."""
        cutoff = newest - history + 1
        for r in self.weight_rounds():
            if r < cutoff:
                shutil.rmtree(self.weights_dir(r), ignore_errors=True)
        try:
            names = os.listdir(self.root / "results")
        except FileNotFoundError:
            return
        for n in names:
            if re.fullmatch(r"round-\d+", n) and int(n[6:]) < cutoff:
                shutil.rmtree(self.root / "results" / n, ignore_errors=True)

    def publish_final(self, weights: Sequence[Array], summary: Mapping[str, Any]) -> bool:
        """Publish final/ once (array-<k>.npy and summary.json)."""
        arrays = {f"array-{k}.npy": w for k, w in enumerate(weights)}
        full = {**summary, "arrays": len(weights)}
        return self._publish_dir(self.final_dir, arrays, full, meta_name="summary.json")

    def final_summary(self) -> dict[str, Any] | None:
        """final/summary.json, or None while the run is not finished."""
        try:
            summary: dict[str, Any] = read_json(self.final_dir / "summary.json")
            return summary
        except FileNotFoundError:
            return None

    def final_weights(self) -> list[Array]:
        """The final model's weights (memory-mapped)."""
        summary = self.final_summary()
        if summary is None:
            raise FileNotFoundError(
                errno.ENOENT, "the run has no final model yet", str(self.final_dir)
            )
        return self._read_arrays(self.final_dir, "array", int(summary["arrays"]))

    def failure(self) -> str | None:
        """Why the run failed, or None."""
        path = self.root / "failed.json"
        if not path.exists():
            return None
        reason = read_json(path).get("reason")
        return str(reason)

    def mark_failed(self, reason: str) -> str:
        """Record the run's failure once; returns the reason that won."""
        self.root.mkdir(parents=True, exist_ok=True)
        claim(self.root / "failed.json", json.dumps({"reason": reason, "at": time.time()}))
        return self.failure() or reason


# ------------------------------------------------------------------------------------------
# Per-process run state (kept across warm invocations)


@dataclass
class RunState:
    """A run's config, memory-mapped dataset, model and schedule, cached per process."""

    config: TrainingConfig
    dataset: Dataset
    model: Model
    schedule: Schedule
    step_ms: float | None = None
    _shards: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    _test_batches: list[tuple[Array, Array]] | None = None

    def shard(self, epoch: int, worker: int) -> np.ndarray:
        """Worker `worker`'s sample indices for `epoch`."""
        key = (epoch, worker)
        idx = self._shards.get(key)
        if idx is None:
            cfg = self.config
            n = len(self.dataset.y_train)
            idx = shard_indices(n, cfg.seed, epoch, cfg.workers, worker)
            if len(self._shards) > 64:
                self._shards.clear()
            self._shards[key] = idx
        return idx

    def test_batches(self) -> Iterator[tuple[Array, Array]]:
        """The held-out set as model inputs, in eval_batch_size chunks (cached when small)."""
        if self._test_batches is not None:
            yield from self._test_batches
            return
        ds, cfg = self.dataset, self.config
        n = len(ds.y_test) if cfg.eval_samples is None else min(cfg.eval_samples, len(ds.y_test))
        shape = self.model.input_shape
        it = batches(ds.x_test, ds.y_test, np.arange(n), cfg.eval_batch_size, shape)
        if n * math.prod(shape) * 4 <= 64 << 20:  # keep up to 64 MiB of converted inputs
            self._test_batches = list(it)
            yield from self._test_batches
        else:
            yield from it


_STATES: dict[tuple[str, int, int], RunState] = {}
_STATES_GUARD = threading.Lock()


# What each model's constructor takes from the data and the run; the rest is model_kwargs.
# VGG19's input size is its own (model_kwargs.input_size): batches are resized to it.
_MODEL_INPUTS: Mapping[str, tuple[str, ...]] = {
    "softmax": ("input_shape", "num_classes"),
    "mlp": ("input_shape", "num_classes"),
    "cnn": ("input_shape", "num_classes", "seed"),
    "vgg19": ("num_classes", "seed"),
}


def build_model(cfg: TrainingConfig, input_shape: tuple[int, ...], num_classes: int) -> Model:
    """The config's model for data of this shape; bad model_kwargs name the field."""
    known = {"input_shape": input_shape, "num_classes": num_classes, "seed": cfg.seed}
    names = _MODEL_INPUTS.get(cfg.model, ("input_shape", "num_classes"))
    kwargs: dict[str, Any] = {name: known[name] for name in names}
    kwargs.update(cfg.model_kwargs)
    try:
        return get_model(cfg.model, **kwargs)
    except (TypeError, ValueError) as exc:
        raise EventError("config.model_kwargs", f"{cfg.model}: {exc}") from exc


def load_run(ws: Workspace) -> RunState:
    """The run's state, from the per-process cache when config.json has not changed."""
    try:
        st = ws.config_path.stat()
    except FileNotFoundError:
        ws.read_config()  # raises the EventError that names the run
        raise
    key = (str(ws.config_path), st.st_ino, st.st_mtime_ns)
    with _STATES_GUARD:
        state = _STATES.get(key)
    if state is not None:
        return state
    cfg = ws.read_config()
    dataset = open_from_efs(ws.data_dir)
    model = build_model(cfg, dataset.input_shape, dataset.num_classes)
    schedule = Schedule(len(dataset.y_train), cfg.workers, cfg.batch_size, cfg.steps)
    state = RunState(cfg, dataset, model, schedule)
    with _STATES_GUARD:
        if len(_STATES) >= 4:
            _STATES.clear()
        _STATES.setdefault(key, state)
        return _STATES[key]


# ------------------------------------------------------------------------------------------
# Events the roles send


def _base(ws: Workspace) -> dict[str, Any]:
    event: dict[str, Any] = {"run": ws.run}
    if ws.mount != DEFAULT_MOUNT:
        event["mount"] = ws.mount
    return event


def worker_event(ws: Workspace, sched: Schedule, round: int, worker: int) -> dict[str, Any]:
    """The event that runs worker `worker` of round `round`."""
    return {
        "workerno": worker,
        "workers": sched.workers,
        "epochsdone": sched.epoch(round),
        "round": round,
        **_base(ws),
    }


def combine_event(ws: Workspace, sched: Schedule, round: int) -> dict[str, Any]:
    """The event that combines round `round`."""
    return {
        "combine": True,
        "workers": sched.workers,
        "epochsdone": sched.epoch(round),
        "round": round,
        **_base(ws),
    }


def start_event(ws: Workspace, workers: int) -> dict[str, Any]:
    """A start event for an existing run (its config is on EFS)."""
    return {"start": True, "workers": workers, **_base(ws)}


def resolve_round(
    sched: Schedule, workers: int, round: int | None, epochsdone: int, cfg: TrainingConfig
) -> int:
    """Check a worker/combine event against the run; the round it means."""
    if workers != cfg.workers:
        raise EventError("workers", f"must be {cfg.workers}, the run's worker count, got {workers}")
    if round is None:
        return epochsdone * sched.rounds_per_epoch
    if sched.epoch(round) != epochsdone:
        raise EventError(
            "epochsdone",
            f"must be {sched.epoch(round)} for round {round} "
            f"({sched.rounds_per_epoch} rounds per epoch), got {epochsdone}",
        )
    return round


# ------------------------------------------------------------------------------------------
# Faults (test-only)


def _fault(
    ws: Workspace,
    cfg: TrainingConfig,
    role: str,
    at: str,
    round: int,
    worker: int | None,
    step: int | None = None,
) -> None:
    """Raise InjectedFault if a configured fault matches and one of its `times` is unused."""
    for index, f in enumerate(cfg.faults):
        if f.role != role or f.at != at or (step is not None and f.step != step):
            continue
        if (f.round is not None and f.round != round) or (
            f.worker is not None and f.worker != worker
        ):
            continue
        for k in range(f.times):
            if ws.claim(f"fault-{index}-{k}", f"{role}:{round}:{worker}"):
                where = f"{role} {at} round {round}" + (
                    "" if worker is None else f" worker {worker}"
                )
                raise InjectedFault(f.action, where)


# ------------------------------------------------------------------------------------------
# Fan-out


def _invoke_all(invoker: Invoker, function: str, events: Sequence[Mapping[str, Any]]) -> None:
    errors: list[str] = []

    def send(event: Mapping[str, Any]) -> None:
        try:
            invoker.invoke_async(function, event)
        except Exception as exc:
            errors.append(f"{json.dumps(dict(event))}: {exc!r}")

    if len(events) <= 4:
        for e in events:
            send(e)
    else:
        # A fan-out of 64 sequential invokes costs 64 round trips to the Lambda API.
        with ThreadPoolExecutor(min(FANOUT_THREADS, len(events))) as pool:
            list(pool.map(send, events))
    if errors:
        raise FanOutError(
            f"{len(errors)} of {len(events)} invocations failed: " + "; ".join(errors[:3])
        )


def _function(cfg: TrainingConfig) -> str:
    if not cfg.function_name:
        raise EventError("config.function_name", "is not set and the context had none")
    return cfg.function_name


def fan_out(
    ws: Workspace,
    state: RunState,
    round: int,
    invoker: Invoker,
    owner: str,
    record: Callable[[bool, float], None],
) -> bool:
    """Invoke the N workers of `round` if this caller wins the round's fan-out claim.

    `record(won, now)` writes the progress rows first (one transaction), so a round's row
    exists before any of its workers runs and the combine's update always comes after it.
    """
    cfg, sched = state.config, state.schedule
    won = ws.claim(f"fanout-{round}", owner)
    record(won, time.time())
    if not won:
        return False
    _fault(ws, cfg, owner.split("-")[0], "after_fanout_claim", round, None)
    events = [worker_event(ws, sched, round, i) for i in range(cfg.workers)]
    _invoke_all(invoker, _function(cfg), events)
    return True


_TABLES: dict[tuple[str, str, str | None], ProgressTable] = {}


def progress_for(ws: Workspace, cfg: TrainingConfig) -> ProgressTable:
    """The progress table the run's config names (one object per process and table)."""
    key = (cfg.progress, str(ws.progress_path), cfg.progress_table)
    table = _TABLES.get(key)
    if table is None:
        # A DynamoDB resource costs ~100 ms to build; warm invocations reuse it.
        table = _TABLES[key] = open_progress(*key)
    return table


# ------------------------------------------------------------------------------------------
# start


def run_start(
    ws: Workspace,
    *,
    workers: int,
    config: Mapping[str, Any] | None,
    ctx: Context,
    invoker: Invoker,
    progress: ProgressTable | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Create the run (config, data, initial weights) once and fan out round 0 once."""
    existing = ws.config_or_none()
    cfg = _resolve_config(existing, workers, config, defaults, ctx)
    if existing is not None and existing != cfg:
        raise EventError(
            "config", f"run {ws.run!r} already exists with another config: {_diff(existing, cfg)}"
        )
    if ws.mount != cfg.mount:
        raise EventError(
            "config.mount", f"must be the event's mount {ws.mount!r}, got {cfg.mount!r}"
        )
    failure = ws.failure()
    if failure is not None:
        return {"role": "start", "status": "failed", "reason": failure}
    dataset = None
    if not (ws.data_dir / MANIFEST).exists():
        try:
            dataset = get_dataset(cfg.dataset)
        except (ValueError, OSError) as exc:
            raise EventError("config.dataset", str(exc)) from exc
        build_model(cfg, dataset.input_shape, dataset.num_classes)  # checks model_kwargs
    # ---- from here on EFS is written; everything above only read and validated.
    won = ws.create_config(cfg)
    if won != cfg:
        raise EventError(
            "config", f"run {ws.run!r} already exists with another config: {_diff(won, cfg)}"
        )
    if dataset is not None:
        prepare_on_efs(dataset, ws.data_dir)
    state = load_run(ws)
    if not ws.has_weights(0) and not ws.claimed("fanout-0"):
        ws.publish_weights(0, state.model.init_weights(cfg.seed), None, {"round": 0, "init": True})
    table = progress or progress_for(ws, cfg)

    def record(won: bool, now: float) -> None:
        if won:
            table.run_started(
                ws.run,
                workers=cfg.workers,
                algorithm=cfg.algorithm,
                model=cfg.model,
                dataset=cfg.dataset,
                started_at=now,
            )
            table.round_started(ws.run, 0, epoch=0, workers=cfg.workers, started_at=now)

    sent = fan_out(ws, state, 0, invoker, "start", record)
    return {"role": "start", "status": "started" if sent else "duplicate", "run": ws.run}


def _diff(a: TrainingConfig, b: TrainingConfig) -> str:
    ja, jb = a.to_json(), b.to_json()
    return ", ".join(f"{k}: {ja[k]!r} != {jb[k]!r}" for k in ja if ja[k] != jb[k])


def _resolve_config(
    existing: TrainingConfig | None,
    workers: int,
    config: Mapping[str, Any] | None,
    defaults: Mapping[str, Any] | None,
    ctx: Context,
) -> TrainingConfig:
    if existing is not None and existing.workers != workers:
        raise EventError(
            "workers", f"must be {existing.workers}, the run's worker count, got {workers}"
        )
    if config is None and existing is not None:
        return existing  # a duplicate thesis-style start: the run's own config
    merged = {**(defaults or {}), **(config or {})}
    cfg = TrainingConfig.from_mapping(merged, workers=workers)
    # Fields the context fills in: taken from the existing run on a duplicate, so it compares equal.
    if cfg.function_name is None:
        name = existing.function_name if existing else getattr(ctx, "function_name", None)
        cfg = replace(cfg, function_name=name)
    if cfg.timeout_s is None:
        if existing is not None:
            cfg = replace(cfg, timeout_s=existing.timeout_s)
        else:
            remaining = ctx.get_remaining_time_in_millis()
            cfg = replace(cfg, timeout_s=max(1, min(900, round(remaining / 1000))))
    _function(cfg)
    return cfg


# ------------------------------------------------------------------------------------------
# worker


class Deadline:
    """`should_stop` for a worker: stop when the time left no longer covers a step and a publish.

    The reserve is ``safety_margin_ms + publish estimate + 2 x the longest step so far`` (the
    longest step of this process's previous invocation before the first step is measured).
    """

    def __init__(self, ctx: Context, reserve_ms: float, step_hint_ms: float | None) -> None:
        self.ctx = ctx
        self.reserve_ms = reserve_ms
        self.max_step_ms = step_hint_ms or 0.0
        self.stopped = False
        self._last: float | None = None

    def __call__(self) -> bool:
        """True when the worker must stop and publish now."""
        now = time.perf_counter()
        if self._last is not None:
            self.max_step_ms = max(self.max_step_ms, (now - self._last) * 1000.0)
        self._last = now
        if self.ctx.get_remaining_time_in_millis() < self.reserve_ms + 2.0 * self.max_step_ms:
            self.stopped = True
        return self.stopped


def run_worker(
    ws: Workspace,
    *,
    worker: int,
    workers: int,
    epochsdone: int,
    round: int | None,
    ctx: Context,
    invoker: Invoker,
) -> dict[str, Any]:
    """Compute and publish this worker's result once, record the arrival, maybe trigger combine."""
    state = load_run(ws)
    cfg, sched = state.config, state.schedule
    if not 0 <= worker < cfg.workers:
        raise EventError("workerno", f"must be in 0..{cfg.workers - 1}, got {worker}")
    r = resolve_round(sched, workers, round, epochsdone, cfg)
    out: dict[str, Any] = {"role": "worker", "run": ws.run, "round": r, "worker": worker}
    failure = ws.failure()
    if failure is not None:
        return {**out, "status": "failed", "reason": failure}
    if ws.round_done(r):
        return {**out, "status": "stale"}  # round already combined: a late duplicate
    if not ws.has_weights(r):
        raise EventError("round", f"round {r} of run {ws.run!r} has not started (no weights)")
    computed = None
    ws.record_attempt(r, worker, ctx.aws_request_id)
    if not ws.has_result(r, worker):
        _fault(ws, cfg, "worker", "start", r, worker)
        c, info = _compute(ws, state, r, worker, ctx)
        _fault(ws, cfg, "worker", "before_publish", r, worker)
        ws.publish_result(r, c, info)
        computed = info
    _fault(ws, cfg, "worker", "after_publish", r, worker)
    added, size = ws.arrivals(r).add(str(worker))
    _fault(ws, cfg, "worker", "after_arrival", r, worker)
    combine_sent = False
    # Also tried by a duplicate that finds the set complete but unclaimed: the completing
    # caller may have died between its add and its claim.
    if size >= cfg.workers and ws.claim(f"combine-{r}", f"worker-{worker}"):
        invoker.invoke_async(_function(cfg), combine_event(ws, sched, r))
        combine_sent = True
    return {
        **out,
        "status": "computed" if computed else "duplicate",
        "samples": None if computed is None else computed["samples_done"],
        "partial": None if computed is None else computed["partial"],
        "arrived": added,
        "arrivals": size,
        "combine_invoked": combine_sent,
    }


def _compute(
    ws: Workspace, state: RunState, r: int, worker: int, ctx: Context
) -> tuple[Contribution, dict[str, Any]]:
    cfg, sched, model, ds = state.config, state.schedule, state.model, state.dataset
    t0 = time.perf_counter()
    weights, _ = ws.read_weights(r)
    idx = state.shard(sched.epoch(r), worker)
    start = sched.start_step(r)
    planned = max(0, min(sched.steps_per_round, _ceil_div(len(idx), cfg.batch_size) - start))
    nbytes = sum(w.nbytes for w in weights)
    publish_ms = 1000.0 * nbytes / (cfg.publish_mb_per_s * 1e6)
    deadline = Deadline(ctx, cfg.safety_margin_ms + publish_ms, state.step_ms)
    done = 0
    mid_round = any(f.role == "worker" and f.at == "mid_round" for f in cfg.faults)

    def counted() -> Iterator[tuple[Array, Array]]:
        nonlocal done
        for batch in batches(
            ds.x_train, ds.y_train, idx, cfg.batch_size, model.input_shape, start, planned
        ):
            if mid_round:
                _fault(ws, cfg, "worker", "mid_round", r, worker, step=done)
            done += 1  # counted when handed out: the contribution always uses a batch it gets
            yield batch

    if cfg.algorithm == "gradient_averaging":
        c = gradient_contribution(model, weights, counted(), worker, should_stop=deadline)
    else:
        c = local_sgd_contribution(model, weights, counted(), cfg.sgd, worker, should_stop=deadline)
    compute_ms = (time.perf_counter() - t0) * 1000.0
    if done:
        state.step_ms = deadline.max_step_ms or compute_ms / done
    info = {
        "round": r,
        "samples_done": c.samples,
        "steps": done,
        "steps_planned": planned,
        "partial": done < planned,
        "compute_ms": compute_ms,
        "request_id": ctx.aws_request_id,
    }
    return c, info


# ------------------------------------------------------------------------------------------
# combine


def run_combine(
    ws: Workspace,
    *,
    workers: int,
    epochsdone: int,
    round: int | None,
    ctx: Context,
    invoker: Invoker,
    progress: ProgressTable | None = None,
) -> dict[str, Any]:
    """Combine round r into weights r+1 once, record progress, then fan out or finish once."""
    state = load_run(ws)
    cfg, sched = state.config, state.schedule
    r = resolve_round(sched, workers, round, epochsdone, cfg)
    out: dict[str, Any] = {"role": "combine", "run": ws.run, "round": r}
    failure = ws.failure()
    if failure is not None:
        return {**out, "status": "failed", "reason": failure}
    record = ws.weights_meta(r + 1)  # the record of combining round r, once it exists
    status = "duplicate"
    if record is None:
        if ws.round_done(r):
            return {**out, "status": "stale"}  # weights r+1 already pruned: long done
        if not ws.has_weights(r):
            raise EventError("round", f"round {r} of run {ws.run!r} has not started (no weights)")
        members = ws.arrivals(r).members()
        missing = [i for i in range(cfg.workers) if str(i) not in members]
        if missing:
            return {**out, "status": "waiting", "missing": missing}
        _fault(ws, cfg, "combine", "start", r, None)
        record = _combine_round(ws, state, r)
        status = "combined"
    table = progress or progress_for(ws, cfg)
    if record["decision"] == "fail":
        _fail(ws, table, r, str(record["reason"]))
        return {**out, "status": "failed", "reason": record["reason"]}
    _fault(ws, cfg, "combine", "after_publish", r, None)
    ws.prune(r + 1, cfg.history)

    def record_progress(won: bool, now: float) -> None:
        # Whoever wins the next fan-out also opens the next round's row, in the same transaction.
        table.round_combined(
            ws.run,
            r,
            epoch=sched.epoch(r),
            epochs_done=record["epochs_done"],
            workers=cfg.workers,
            samples=record["samples"],
            train_loss=record["train_loss"],
            loss=record["loss"],
            accuracy=record["accuracy"],
            worker_ms_max=record["worker_ms_max"],
            worker_ms_mean=record["worker_ms_mean"],
            combine_ms=record["combine_ms"],
            combined_at=record["combined_at"],
            note=record["reason"] if record["decision"] != "continue" else None,
            next_round=(r + 1, sched.epoch(r + 1), now) if won else None,
        )

    if record["decision"] == "continue":
        sent = fan_out(ws, state, r + 1, invoker, f"combine-{r}", record_progress)
        return {**out, "status": status, "next_round_invoked": sent, "loss": record["loss"]}
    record_progress(False, time.time())
    _finish(ws, state, r, record, table)
    return {**out, "status": "finished", "reason": record["reason"], "loss": record["loss"]}


def _combine_round(ws: Workspace, state: RunState, r: int) -> dict[str, Any]:
    cfg, sched = state.config, state.schedule
    t0 = time.perf_counter()
    weights, velocity = ws.read_weights(r)
    contribs: list[Contribution] = []
    worker_ms: list[float] = []
    for i in range(cfg.workers):
        c, meta = ws.read_result(r, i)
        contribs.append(c)
        worker_ms.append(float(meta.get("compute_ms", 0.0)))
    samples = sum(c.samples for c in contribs)
    if samples == 0:
        return {
            "decision": "fail",
            "reason": f"round {r}: no worker processed any sample "
            "(is the timeout shorter than one step plus safety_margin_ms?)",
        }
    new_velocity: list[Array] | None = None
    if cfg.algorithm == "gradient_averaging":
        new_weights, new_velocity, train_loss = combine_gradient_averaging(
            weights, velocity, contribs, cfg.sgd
        )
    else:
        new_weights, train_loss = combine_model_averaging(contribs, dtype=weights[0].dtype)
    decision, reason, loss, accuracy = _decide(state, r, new_weights)
    record = {
        "round": r,
        "epoch": sched.epoch(r),
        "epochs_done": sched.epochs_done_after(r),
        "samples": samples,
        "partial_workers": sum(1 for c in contribs if c.samples == 0) or None,
        "train_loss": _finite(train_loss),
        "loss": _finite(loss),
        "accuracy": accuracy,
        "decision": decision,
        "reason": reason,
        "worker_ms_max": max(worker_ms),
        "worker_ms_mean": sum(worker_ms) / len(worker_ms),
        "combine_ms": (time.perf_counter() - t0) * 1000.0,
        "combined_at": time.time(),
    }
    ws.publish_weights(r + 1, new_weights, new_velocity, record)
    winner = ws.weights_meta(r + 1)
    assert winner is not None
    return winner


def _decide(
    state: RunState, r: int, weights: Sequence[Array]
) -> tuple[str, str | None, float | None, float | None]:
    cfg, sched = state.config, state.schedule
    done = r + 1
    reason = None
    if cfg.max_rounds is not None and done >= cfg.max_rounds:
        reason = f"max_rounds reached ({done} rounds)"
    elif cfg.epochs is not None and done >= cfg.epochs * sched.rounds_per_epoch:
        reason = f"epochs reached ({cfg.epochs} epochs, {done} rounds)"
    loss = accuracy = None
    targets = cfg.target_loss is not None or cfg.target_accuracy is not None
    if reason is not None or done % cfg.eval_every == 0 or targets:
        loss, accuracy = evaluate(state, weights)
    if loss is not None and not math.isfinite(loss):
        return "fail", f"round {r}: diverged (held-out loss is {loss})", loss, accuracy
    if (
        reason is None
        and cfg.target_loss is not None
        and loss is not None
        and loss <= cfg.target_loss
    ):
        reason = f"target_loss reached ({loss:.6g} <= {cfg.target_loss})"
    if (
        reason is None
        and cfg.target_accuracy is not None
        and accuracy is not None
        and accuracy >= cfg.target_accuracy
    ):
        reason = f"target_accuracy reached ({accuracy:.6g} >= {cfg.target_accuracy})"
    return ("continue" if reason is None else "stop"), reason, loss, accuracy


def evaluate(state: RunState, weights: Sequence[Array]) -> tuple[float | None, float | None]:
    """(mean loss, accuracy) on the held-out set (or its first eval_samples), None if empty."""
    loss_sum = 0.0
    correct = 0
    n = 0
    for xb, yb in state.test_batches():
        k = len(yb)
        loss, acc = state.model.evaluate(weights, xb, yb, batch_size=max(1, k))
        loss_sum += loss * k
        correct += round(acc * k)
        n += k
    if n == 0:
        return None, None
    return loss_sum / n, correct / n


def _finish(
    ws: Workspace, state: RunState, r: int, record: Mapping[str, Any], table: ProgressTable
) -> None:
    cfg = state.config
    if ws.final_summary() is None:
        weights, _ = ws.read_weights(r + 1)
        summary = {
            "run": ws.run,
            "status": "finished",
            "reason": record["reason"],
            "rounds": r + 1,
            "epochs_done": record["epochs_done"],
            "loss": record["loss"],
            "accuracy": record["accuracy"],
            "train_loss": record["train_loss"],
            "workers": cfg.workers,
            "algorithm": cfg.algorithm,
            "model": cfg.model,
            "dataset": cfg.dataset,
            "finished_at": time.time(),
        }
        ws.publish_final(weights, summary)
    final = ws.final_summary()
    assert final is not None
    table.run_finished(
        ws.run,
        status="finished",
        reason=str(final["reason"]),
        at=float(final["finished_at"]),
        rounds_done=int(final["rounds"]),
        epochs_done=final["epochs_done"],
        loss=final["loss"],
        accuracy=final["accuracy"],
    )


def _fail(ws: Workspace, table: ProgressTable, r: int, reason: str) -> str:
    reason = ws.mark_failed(reason)
    now = time.time()
    table.round_failed(ws.run, r, reason=reason, at=now)
    table.run_finished(ws.run, status="failed", reason=reason, at=now)
    return reason


# ------------------------------------------------------------------------------------------
# watchdog


def _rescue_count(ws: Workspace, target: str) -> tuple[int, float | None]:
    """How many rescues of `target` were made, and when the last one was."""
    k, last = 0, None
    while True:
        t = ws.claim_time(f"rescue-{target}-{k + 1}")
        if t is None:
            return k, last
        k, last = k + 1, t


def check_stalled(
    run: Workspace,
    invoker: Invoker | None = None,
    progress: ProgressTable | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Detect a stalled run and rescue it once per stall period, or fail it (module docstring)."""
    ws = run
    now = time.time() if now is None else now
    cfg = ws.config_or_none()
    out: dict[str, Any] = {"role": "check", "run": ws.run}
    if cfg is None:
        return {**out, "status": "no_run"}
    failure = ws.failure()
    if failure is not None:
        return {**out, "status": "failed", "reason": failure}
    if ws.final_summary() is not None:
        return {**out, "status": "finished"}
    invoker = invoker or Boto3Invoker()
    stall = cfg.stall_after()
    rounds = ws.weight_rounds()
    if not rounds:
        return _rescue(
            ws,
            cfg,
            "start",
            ws.config_path.stat().st_mtime,
            now,
            stall,
            out,
            lambda: invoker.invoke_async(_function(cfg), start_event(ws, cfg.workers)),
            "start never published the initial weights",
            progress,
            -1,
        )
    r = rounds[-1]
    meta = ws.weights_meta(r) or {}
    if not ws.claimed(f"fanout-{r}") or meta.get("decision") == "stop":
        # Weights r exist but nobody fanned out (or finished): the previous combine (or the
        # start) died after publishing. Re-running it is idempotent.
        since = ws.weights_dir(r).stat().st_mtime
        state = load_run(ws)

        def redo() -> None:
            if r == 0:
                invoker.invoke_async(_function(cfg), start_event(ws, cfg.workers))
            else:
                invoker.invoke_async(_function(cfg), combine_event(ws, state.schedule, r - 1))

        what = "start" if r == 0 else f"combine of round {r - 1}"
        return _rescue(
            ws,
            cfg,
            f"{r}-next",
            since,
            now,
            stall,
            out,
            redo,
            f"round {r}: {what} never fanned out or finished",
            progress,
            r,
        )
    state = load_run(ws)
    members = ws.arrivals(r).members()
    missing = [i for i in range(cfg.workers) if str(i) not in members]
    since = ws.claim_time(f"fanout-{r}") or now

    def rescue() -> None:
        if missing:
            _invoke_all(
                invoker, _function(cfg), [worker_event(ws, state.schedule, r, i) for i in missing]
            )
        else:
            ws.claim(f"combine-{r}", "watchdog")
            invoker.invoke_async(_function(cfg), combine_event(ws, state.schedule, r))

    if missing:
        first = missing[0]
        tries = ws.attempts(r, first)
        reason = (
            f"round {r}: worker {first} never arrived after {tries} "
            f"attempt{'' if tries == 1 else 's'}"
        )
        if len(missing) > 1:
            reason += f" (missing workers: {', '.join(map(str, missing))})"
    else:
        reason = f"round {r}: all workers arrived but the combine never completed"
    report = _rescue(ws, cfg, str(r), since, now, stall, out, rescue, reason, progress, r)
    report["missing"] = missing
    return report


def _rescue(
    ws: Workspace,
    cfg: TrainingConfig,
    target: str,
    since: float,
    now: float,
    stall: float,
    out: dict[str, Any],
    action: Any,
    reason: str,
    progress: ProgressTable | None,
    round: int,
) -> dict[str, Any]:
    count, last = _rescue_count(ws, target)
    since = max(since, last or since)
    if now - since < stall:
        return {**out, "status": "running", "round": round, "idle_s": max(0.0, now - since)}
    if count >= cfg.max_rescues:
        table = progress or progress_for(ws, cfg)
        reason = _fail(ws, table, max(round, 0), reason)
        return {**out, "status": "failed", "round": round, "reason": reason}
    if not ws.claim(f"rescue-{target}-{count + 1}", f"watchdog@{now}"):
        return {**out, "status": "rescuing", "round": round}  # another watchdog just did
    action()
    return {**out, "status": "rescued", "round": round, "rescue": count + 1, "reason": reason}


__all__ = [
    "DEFAULT_MOUNT",
    "DEFAULT_RUN",
    "Boto3Invoker",
    "Context",
    "Deadline",
    "EventError",
    "FanOutError",
    "Fault",
    "InjectedFault",
    "Invoker",
    "RunState",
    "Schedule",
    "TrainingConfig",
    "Workspace",
    "check_stalled",
    "combine_event",
    "evaluate",
    "fan_out",
    "load_run",
    "run_combine",
    "run_start",
    "run_worker",
    "worker_event",
]
