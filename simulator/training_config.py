"""A run's training config: validated settings, the round schedule, and the errors bad input raises.

:class:`TrainingConfig` is what a start event's ``config`` (merged over the function's defaults)
becomes; it is stored once as the run's ``config.json``. Every check raises :class:`EventError`
naming the field (``config.<name>``) and what is allowed.

Epoch accounting (:class:`Schedule`): the training set of n samples is split for each epoch ``e``
into N shards by ``shard_indices(n, seed, e, N, i)``. A shard has at most
``B = ceil(ceil(n/N) / batch_size)`` mini-batches. Each worker runs ``S = min(steps, B)`` of them
per round (``steps`` null: ``S = B``, one epoch per round, the thesis's setting), so an epoch
takes ``R = ceil(B / S)`` rounds and round ``r`` belongs to epoch ``r // R`` and starts at
mini-batch ``(r % R) * S`` of the shard. ``epochsdone`` in an event for round ``r`` is ``r // R``,
the epochs completed before it (with ``R = 1``, as in the thesis, it equals the round). A
thesis-style event without ``round`` means the first round of epoch ``epochsdone``. A worker that
stops early skips the rest of its mini-batches for that round; the next round moves on (its
sample count says what was done).

Aggregation (``aggregation``): ``"single"`` is the thesis's one combiner, which reads all N
results; ``"sharded"`` splits the round's workers into ``shards`` groups (default
``ceil(sqrt(N))``; worker ``i`` belongs to shard ``i % shards``), each summed by its own
aggregator, so the final combine reads ``shards`` partials instead of N results
(:mod:`simulator.roles.aggregate`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from simulator.algorithms import ALGORITHMS, SGDConfig, SGDConfigError
from simulator.models import MODEL_NAMES

DEFAULT_RUN = "default"
DEFAULT_MOUNT = "/mnt/efs"
MAX_WORKERS = 10_000
RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MOUNT_PATH = re.compile(r"/mnt/[a-zA-Z0-9\-_.]+")
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9\-_:.$]{1,170}")
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


# ------------------------------------------------------------------------------------------
# Validation helpers (JSON types in, the checked value out)


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
    "aggregate": ("start", "after_publish", "after_arrival"),
    "combine": ("start", "after_publish", "after_fanout_claim"),
}
AGGREGATIONS = ("single", "sharded")
FAULT_ACTIONS = ("raise", "exit", "hang")


@dataclass(frozen=True)
class Fault:
    """Test-only: crash the first `times` invocations of `role` reaching point `at`.

    For the ``aggregate`` role, ``worker`` selects the shard.
    """

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
    aggregation: str = "single"
    shards: int | None = None
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
        workers_n = _int(c + "workers", v.get("workers"), 1, MAX_WORKERS)
        aggregation = _choice(c + "aggregation", v.get("aggregation", "single"), AGGREGATIONS)
        shards = _shards(c + "shards", v.get("shards"), aggregation, workers_n)
        cfg = cls(
            workers=workers_n,
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
            aggregation=aggregation,
            shards=shards,
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
    def sharded(self) -> bool:
        """The round is aggregated by shard aggregators before the final combine."""
        return self.aggregation == "sharded"

    @property
    def shard_count(self) -> int:
        """Aggregators per round: `shards` when sharded, else 1 (the combiner itself)."""
        return self.shards if self.shards is not None else 1

    def shard_workers(self, shard: int) -> range:
        """The worker ids that shard `shard` sums (``aggregate.shard_of`` inverted)."""
        return range(shard, self.workers, self.shard_count)

    @property
    def sgd(self) -> SGDConfig:
        """The SGD settings."""
        return SGDConfig(self.lr, self.momentum, self.weight_decay)

    def stall_after(self) -> float:
        """Seconds without progress after which a round counts as stalled (simulator.watchdog)."""
        if self.stall_after_s is not None:
            return self.stall_after_s
        timeout = self.timeout_s or 900
        return (self.max_retry_attempts + 1) * timeout + RETRY_DELAYS_S + STALL_SLACK_S


def default_shards(workers: int) -> int:
    """ceil(sqrt(workers)): balances N/S results per aggregator against S partials to combine."""
    return math.isqrt(workers - 1) + 1


def _shards(name: str, value: Any, aggregation: str, workers: int) -> int | None:
    """The shard count stored in the config: None for 'single', resolved for 'sharded'."""
    if aggregation != "sharded":
        if value is not None:
            raise EventError(name, f"only applies when aggregation is 'sharded', got {value!r}")
        return None
    if value is None:
        return default_shards(workers)
    # More shards than workers would leave an aggregator with nobody to wait for.
    checked: int = _int(name, value, 1, workers)
    return checked


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for positive integers, without floats."""
    return -(-a // b)


@dataclass(frozen=True)
class Schedule:
    """How rounds map onto epochs and mini-batches (module docstring: 'Epoch accounting')."""

    n_train: int
    workers: int
    batch_size: int
    steps: int | None

    @property
    def batches_per_shard(self) -> int:
        """Mini-batches in the largest shard of an epoch."""
        return max(1, ceil_div(ceil_div(self.n_train, self.workers), self.batch_size))

    @property
    def steps_per_round(self) -> int:
        """Mini-batches each worker runs per round."""
        b = self.batches_per_shard
        return b if self.steps is None else min(self.steps, b)

    @property
    def rounds_per_epoch(self) -> int:
        """Rounds that make one epoch."""
        return ceil_div(self.batches_per_shard, self.steps_per_round)

    def epoch(self, round: int) -> int:
        """The epoch whose shards round `round` uses (= `epochsdone` of its events)."""
        return round // self.rounds_per_epoch

    def start_step(self, round: int) -> int:
        """First mini-batch of the shard that round `round` runs."""
        return (round % self.rounds_per_epoch) * self.steps_per_round

    def epochs_done_after(self, round: int) -> float:
        """Epochs completed once round `round` is combined."""
        return (round + 1) / self.rounds_per_epoch


__all__ = [
    "AGGREGATIONS",
    "DEFAULT_MOUNT",
    "DEFAULT_RUN",
    "FAULT_ACTIONS",
    "FAULT_POINTS",
    "FUNCTION_NAME",
    "MAX_WORKERS",
    "MOUNT_PATH",
    "RETRY_DELAYS_S",
    "RUN_ID",
    "STALL_SLACK_S",
    "EventError",
    "Fault",
    "InjectedFault",
    "Schedule",
    "TrainingConfig",
    "ceil_div",
    "check_mount",
    "check_run_id",
    "default_shards",
]
