"""How a run is set up: output and code directories, the function's configuration, the start
event's training config, the dataset on EFS, stall periods, and what this machine can hold.

Pure helpers of :class:`simulator.runner.Runner`; nothing here starts a service.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from simulator.protocol import RETRY_DELAYS_S, STALL_SLACK_S, EventError, Schedule, TrainingConfig
from simulator.settings import RunSettings, SettingsError

FUNCTION = "train"
HANDLER = "handler.handler"
MOUNT = "/mnt/efs"
PACKAGED_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "numpy_digits"
# Expected peak RSS of one execution environment before any run told us better (MB): a NumPy
# runtime, TensorFlow with a small CNN, TensorFlow with VGG19 at 224x224 (keras_models docstring).
ENV_MB_GUESS = {"softmax": 120, "mlp": 150, "cnn": 900, "vgg19": 1500}
HOST_MEMORY_SHARE = 0.85
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# Settings names of TrainingConfig fields, for errors the protocol's validation raises.
_CONFIG_FLAGS = {
    "max_rounds": "rounds",
    "timeout_s": "timeout",
    "max_retry_attempts": "retries",
    "stall_after_s": "stall_after",
}


class HostCapacityError(RuntimeError):
    """This machine cannot hold the run's execution environments at once."""


def default_out_dir(settings: RunSettings) -> Path:
    """runs/<date-time>-<model>-<N>w under the current directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{settings.model}-{settings.workers}w"


def code_dir_for(settings: RunSettings, out: Path) -> Path:
    """The function's code: the settings' directory, the repository's example, or a shim."""
    if settings.code_dir is not None:
        return Path(settings.code_dir)
    if (PACKAGED_EXAMPLE / "handler.py").is_file():
        return PACKAGED_EXAMPLE
    # Installed without the examples: the handler is the package's, re-exported from a file.
    shim = out / "code"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "handler.py").write_text(
        "from simulator.handler import handler\n\n__all__ = ['handler']\n"
    )
    return shim


def stage_dataset(dataset: str, efs_dir: Path, mechanisms: Mapping[str, str]) -> str:
    """A dataset path as the function sees it, after putting the data on the EFS stand-in.

    As in the thesis, the function reads its dataset from EFS: a host path (CIFAR-10 batches)
    is linked (or copied, across file systems) to ``<efs>/datasets/`` and named by its path
    inside the function: under the mount when EFS is bind-mounted, else the host directory the
    platform names (portable isolation). A built-in name ('digits', 'synthetic') passes through.
    """
    if dataset in ("digits", "synthetic") or dataset.startswith("synthetic:"):
        return dataset
    source = Path(dataset)
    target = efs_dir / "datasets" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_or_copy, dirs_exist_ok=True)
    elif not target.exists():
        _link_or_copy(str(source), str(target))
    bind_mounted = str(mechanisms.get("tmp", "")).startswith("loop-ext4")
    return f"{MOUNT}/datasets/{source.name}" if bind_mounted else str(target.resolve())


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a real copy
        shutil.copy2(src, dst)
    return dst


def oversubscription(settings: RunSettings, cores: int | None = None) -> float:
    """How many times over the run's vCPUs (all workers at once) book this machine's cores."""
    cores = cores or len(os.sched_getaffinity(0)) or 1
    return max(1.0, settings.workers * min(settings.vcpus, 6.0) / cores)


def thread_environment(settings: RunSettings) -> dict[str, str]:
    """BLAS/OpenMP thread counts for the function: the whole vCPUs its memory buys (at least 1).

    NumPy's BLAS otherwise starts one thread per host core in every environment; under a CPU
    quota of one vCPU those threads spin against each other (measured here: two environments of
    2 threads each on 2 cores ran a matmul loop 30x slower than with one thread each).
    """
    threads = str(max(1, int(settings.vcpus)))
    return dict.fromkeys(THREAD_VARIABLES, threads)


def aws_stall_after(settings: RunSettings) -> float:
    """The watchdog's stall period on AWS (the protocol's default rule, or the setting)."""
    if settings.stall_after is not None:
        return settings.stall_after
    return (settings.retries + 1) * settings.timeout + RETRY_DELAYS_S + STALL_SLACK_S


def local_stall_after(settings: RunSettings) -> float:
    """The stall period here: Lambda-clock timeouts take longer on a busy laptop, delays scale."""
    if settings.stall_after is not None:
        return settings.stall_after
    return (
        (settings.retries + 1) * settings.timeout * oversubscription(settings)
        + RETRY_DELAYS_S * settings.time_scale
        + STALL_SLACK_S
    )


def training_config(settings: RunSettings) -> dict[str, Any]:
    """The start event's training config; validated by the protocol's own TrainingConfig."""
    s = settings
    cfg: dict[str, Any] = {
        "model": s.model,
        "model_kwargs": dict(s.model_kwargs),
        "dataset": s.dataset,
        "algorithm": s.algorithm,
        "lr": s.lr,
        "momentum": s.momentum,
        "weight_decay": s.weight_decay,
        "batch_size": s.batch_size,
        "steps": s.steps,
        "epochs": s.epochs,
        "max_rounds": s.rounds,
        "target_loss": s.target_loss,
        "target_accuracy": s.target_accuracy,
        "seed": s.seed,
        "mount": MOUNT,
        "function_name": FUNCTION,
        "eval_samples": s.eval_samples,
        "timeout_s": s.timeout,
        "max_retry_attempts": s.retries,
        "stall_after_s": local_stall_after(s),
        "max_rescues": s.max_rescues,
        "faults": [dict(f) for f in s.faults],
    }
    if s.aggregation != "single":
        cfg["aggregation"] = s.aggregation
        cfg["shards"] = s.shards  # None: the protocol's default, ceil(sqrt(workers))
    try:
        TrainingConfig.from_mapping(cfg, workers=s.workers)
    except EventError as exc:
        name = exc.field.removeprefix("config.").split(".")[0].split("[")[0]
        raise SettingsError(_CONFIG_FLAGS.get(name, name), exc.message) from None
    return cfg


def host_memory_mb() -> int:
    """Memory this machine can give the run (MemAvailable, or the cgroup's limit if lower)."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) // 1024
    except OSError:
        pass
    if avail is None:
        import psutil

        avail = int(psutil.virtual_memory().available // (1024 * 1024))
    return avail


def capacity_problem(
    settings: RunSettings, env_mb: float | None = None, available_mb: int | None = None
) -> str | None:
    """Why this machine cannot hold the run's environments at once, or None if it can."""
    per_env = env_mb if env_mb is not None else ENV_MB_GUESS.get(settings.model, 500)
    per_env = min(per_env, settings.memory)  # the memory limit caps a well-behaved environment
    envs = settings.workers + 1  # the combine may need an environment of its own
    need = envs * per_env
    available = available_mb if available_mb is not None else host_memory_mb()
    if need > HOST_MEMORY_SHARE * available:
        return (
            f"{envs} execution environments of about {per_env:.0f} MB each need about "
            f"{need / 1024:.1f} GB at once; this machine has {available / 1024:.1f} GB available"
        )
    return None


def host_notes(settings: RunSettings) -> list[str]:
    """Things this machine cannot reproduce faithfully (the run still goes on)."""
    notes = []
    total = host_memory_mb()
    if settings.memory > total:
        notes.append(
            f"the {settings.memory} MB memory limit exceeds this machine's {total} MB available: "
            "an out-of-memory kill at that size cannot happen here"
        )
    over = oversubscription(settings)
    if over > 1:
        notes.append(
            f"the workers' {settings.workers * settings.vcpus:.1f} vCPUs share "
            f"{len(os.sched_getaffinity(0))} cores ({over:.1f}x): laptop time runs about that much "
            "slower than Lambda time; durations and timeouts use the Lambda clock"
        )
    return notes


def rounds_planned(settings: RunSettings, n_train: int) -> int | None:
    """Rounds the run will take if it reaches its epochs or max rounds (no target hit)."""
    sched = Schedule(n_train, settings.workers, settings.batch_size, settings.steps)
    limits = []
    if settings.epochs is not None:
        limits.append(settings.epochs * sched.rounds_per_epoch)
    if settings.rounds is not None:
        limits.append(settings.rounds)
    return min(limits) if limits else None


__all__ = [
    "ENV_MB_GUESS",
    "FUNCTION",
    "HANDLER",
    "MOUNT",
    "HostCapacityError",
    "aws_stall_after",
    "capacity_problem",
    "code_dir_for",
    "default_out_dir",
    "host_memory_mb",
    "host_notes",
    "local_stall_after",
    "oversubscription",
    "rounds_planned",
    "stage_dataset",
    "thread_environment",
    "training_config",
]
