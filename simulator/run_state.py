"""What the roles keep per process across warm invocations: the run's state and progress table.

A warm Lambda environment serves many invocations; re-reading the config, re-opening the
memory-mapped dataset and rebuilding the model (seconds for a Keras model) on each would dominate
short rounds. :func:`load_run` caches a :class:`RunState` per config file (keyed by inode and
mtime, so a new run under the same name is never served stale state), :func:`progress_for` one
progress table object per table. Roles that only route events (the shard aggregator, the
watchdog) need no model and no data: :func:`load_plan` gives them the config and the schedule
from config.json and the dataset's manifest, without importing a model's framework.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lambda_runtime.efs import CorruptFileError, read_json
from simulator.data import MANIFEST, Dataset, batches, open_from_efs, shard_indices
from simulator.models import Array, Model, get_model
from simulator.progress import ProgressTable, open_progress
from simulator.training_config import EventError, Schedule, TrainingConfig
from simulator.workspace import Workspace


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


@dataclass(frozen=True)
class RunPlan:
    """A run's config and schedule: what routing roles need, without dataset or model."""

    config: TrainingConfig
    schedule: Schedule


_PLANS: dict[tuple[str, int, int], RunPlan] = {}


def load_plan(ws: Workspace) -> RunPlan:
    """The run's config and schedule (from config.json and the dataset manifest), cached.

    Builds no model, so it never imports TensorFlow into a watchdog or an aggregator.
    """
    try:
        st = ws.config_path.stat()
    except FileNotFoundError:
        ws.read_config()  # raises the EventError that names the run
        raise
    key = (str(ws.config_path), st.st_ino, st.st_mtime_ns)
    with _STATES_GUARD:
        state = _STATES.get(key)
        plan = _PLANS.get(key)
    if state is not None:
        return RunPlan(state.config, state.schedule)
    if plan is not None:
        return plan
    cfg = ws.read_config()
    manifest_path = ws.data_dir / MANIFEST
    manifest = read_json(manifest_path)
    try:
        n_train = int(manifest["arrays"]["y_train"]["shape"][0])
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise CorruptFileError(manifest_path, f"malformed manifest ({exc!r})") from exc
    plan = RunPlan(cfg, Schedule(n_train, cfg.workers, cfg.batch_size, cfg.steps))
    with _STATES_GUARD:
        if len(_PLANS) >= 4:
            _PLANS.clear()
        return _PLANS.setdefault(key, plan)


_TABLES: dict[tuple[str, str, str | None], ProgressTable] = {}


def progress_for(ws: Workspace, cfg: TrainingConfig) -> ProgressTable:
    """The progress table the run's config names (one object per process and table)."""
    key = (cfg.progress, str(ws.progress_path), cfg.progress_table)
    table = _TABLES.get(key)
    if table is None:
        # A DynamoDB resource costs ~100 ms to build; warm invocations reuse it.
        table = _TABLES[key] = open_progress(*key)
    return table


__all__ = ["RunPlan", "RunState", "build_model", "load_plan", "load_run", "progress_for"]
