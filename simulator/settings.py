"""Run settings: one validated, frozen dataclass, merged from a config file and flags (flags win).

Every setting has one name, used as the config-file key, and a flag spelled the same with dashes
(``batch_size`` <-> ``--batch-size``; a file may spell keys either way). Config files are JSON or
YAML (chosen by extension: ``.json``, ``.yaml``/``.yml``). Relative paths in a file (``dataset``,
``code_dir``) are taken relative to the file's directory; on the command line, relative to the
current directory. Every bad value raises :class:`SettingsError`, naming the flag (and the file it
came from) and what is allowed; nothing is clamped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lambda_runtime import quotas
from lambda_runtime.errors import ConfigError

MODELS = ("softmax", "mlp", "cnn", "vgg19")
KERAS_MODELS = ("cnn", "vgg19")
ALGORITHMS = ("gradient_averaging", "model_averaging")
ALGORITHM_ALIASES = {"gradient": "gradient_averaging", "model": "model_averaging"}
AGGREGATIONS = ("single", "sharded")
CLOCKS = ("lambda", "wall")
ISOLATIONS = ("auto", "strict", "portable")
EFS_MODES = ("elastic", "bursting", "bursting-baseline")
ARCHITECTURES = ("x86_64", "arm64")
BUILTIN_DATASETS = "'digits', 'synthetic', 'synthetic:<n>', or the path of CIFAR-10 python batches"
MAX_WORKERS = 10_000
NONE_WORDS = ("none", "null", "")

# Settings a sweep may list ("--workers 1,2,4"); the rest take one value per sweep.
SWEEPABLE = (
    "workers",
    "memory",
    "timeout",
    "ephemeral",
    "steps",
    "batch_size",
    "lr",
    "momentum",
    "algorithm",
    "model",
)


class SettingsError(ConfigError):
    """A bad run setting: `flag` names it (``--memory``), the message says what is allowed."""

    def __init__(self, name: str, message: str, source: str | None = None) -> None:
        self.flag = flag_of(name)
        where = self.flag if source is None else f"{self.flag} (in {source})"
        super().__init__(where, message)
        self.setting = name.replace("-", "_").lstrip("_")
        self.source = source

    def __reduce__(self) -> tuple[Any, ...]:
        return (SettingsError, (self.setting, self.message.split(": ", 1)[-1], self.source))


def flag_of(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.lstrip("-").replace("_", "-")


@dataclass(frozen=True)
class RunSettings:
    """Everything one training run needs. Field names are the config keys; see `HELP` for each."""

    workers: int = 4
    memory: int = 2048
    ephemeral: int = quotas.EPHEMERAL_DEFAULT_MB
    timeout: int = 300
    epochs: int | None = 10
    rounds: int | None = None
    steps: int | None = 3
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    algorithm: str = "gradient_averaging"
    model: str = "cnn"
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    seed: int = 0
    clock: str = "lambda"
    aggregation: str = "single"
    shards: int | None = None
    out: str | None = None
    code_dir: str | None = None
    run_id: str = "train"
    retries: int = quotas.ASYNC_RETRIES_DEFAULT
    time_scale: float = 1.0
    isolation: str = "auto"
    efs_mode: str = "elastic"
    architecture: str = "x86_64"
    concurrency: int | None = None
    target_loss: float | None = None
    target_accuracy: float | None = None
    eval_samples: int | None = None
    stall_after: float | None = None
    max_rescues: int = 2
    max_wall: float | None = None
    fail_fast: bool = False
    keep_efs: bool = False
    faults: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            check = _CHECKS[f.name]
            value = check(f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        if self.epochs is None and self.rounds is None:
            raise SettingsError("epochs", "set --epochs or --rounds (or both) so that the run ends")
        if self.shards is not None:
            if self.aggregation != "sharded":
                raise SettingsError(
                    "shards", f"only applies with --aggregation sharded, got {self.aggregation!r}"
                )
            if self.shards > self.workers:
                raise SettingsError(
                    "shards", f"must be at most --workers ({self.workers}), got {self.shards}"
                )

    @property
    def vcpus(self) -> float:
        """The CPU share the memory size buys on Lambda."""
        return quotas.vcpus_for_memory(self.memory)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; ``from_mapping(to_json())`` gives equal settings."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["model_kwargs"] = dict(self.model_kwargs)
        out["faults"] = [dict(x) for x in self.faults]
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str | None = None) -> RunSettings:
        """Settings from a mapping of names (or dashed names) to values; unknown keys are errors."""
        return cls(**normalise(values, source))

    def with_values(self, **values: Any) -> RunSettings:
        """A copy with some settings replaced (validated again)."""
        return replace(self, **values)


# ---- checks: each returns the canonical value or raises SettingsError ---------------------


def _int(lo: int, hi: int | None, unit: str = "", optional: bool = False) -> Callable[..., Any]:
    def check(name: str, value: Any) -> int | None:
        if value is None and optional:
            return None
        rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        allowed = f"a whole number {rng}{unit}" + (" or 'none'" if optional else "")
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(name, f"must be {allowed}, got {value!r}")
        if value < lo or (hi is not None and value > hi):
            raise SettingsError(name, f"must be {allowed}, got {value}")
        return value

    return check


def _real(
    lo: float, hi: float | None = None, *, open_lo: bool = False, optional: bool = False
) -> Callable[..., Any]:
    def check(name: str, value: Any) -> float | None:
        if value is None and optional:
            return None
        rng = f"{'>' if open_lo else '>='} {lo:g}" + ("" if hi is None else f" and <= {hi:g}")
        allowed = f"a finite number {rng}" + (" or 'none'" if optional else "")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(name, f"must be {allowed}, got {value!r}")
        v = float(value)
        if not math.isfinite(v) or v < lo or (open_lo and v == lo) or (hi is not None and v > hi):
            raise SettingsError(name, f"must be {allowed}, got {value!r}")
        return v

    return check


def _choice(allowed: Sequence[str], aliases: Mapping[str, str] | None = None) -> Callable[..., Any]:
    def check(name: str, value: Any) -> str:
        if isinstance(value, str) and aliases and value in aliases:
            value = aliases[value]
        if not isinstance(value, str) or value not in allowed:
            raise SettingsError(name, f"must be one of {', '.join(allowed)}; got {value!r}")
        return value

    return check


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(name, f"must be true or false, got {value!r}")
    return value


def _model_kwargs(name: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise SettingsError(name, f"must be a JSON object of model arguments, got {value!r}")
    return dict(value)


def _dataset(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise SettingsError(name, f"must be {BUILTIN_DATASETS}; got {value!r}")
    if value in ("digits", "synthetic"):
        return value
    if value.startswith("synthetic:"):
        count = value.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise SettingsError(
                name, f"synthetic:<n> needs a whole number n >= 1 of samples, got {value!r}"
            )
        return value
    path = Path(value).expanduser()
    if not path.exists():
        raise SettingsError(
            name, f"no such file or directory {value!r}; must be {BUILTIN_DATASETS}"
        )
    return str(path.resolve())


def _optional_str(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise SettingsError(name, f"must be a non-empty path, got {value!r}")
    return value


def _code_dir(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not Path(value).expanduser().is_dir():
        raise SettingsError(
            name, f"must be an existing directory holding the handler module, got {value!r}"
        )
    return str(Path(value).expanduser().resolve())


def _run_id(name: str, value: Any) -> str:
    from simulator.training_config import RUN_ID

    if not isinstance(value, str) or not RUN_ID.fullmatch(value) or value in (".", ".."):
        raise SettingsError(
            name,
            "must be 1-128 characters of letters, digits, '_', '.' or '-', not starting with "
            f"'.' or '-', got {value!r}",
        )
    return value


def _faults(name: str, value: Any) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, Mapping) for v in value):
        raise SettingsError(name, f"must be a list of fault objects (tests only), got {value!r}")
    return tuple(dict(v) for v in value)


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "workers": _int(1, MAX_WORKERS),
    "memory": _int(quotas.MEMORY_MIN_MB, quotas.MEMORY_MAX_MB, " (MB)"),
    "ephemeral": _int(quotas.EPHEMERAL_MIN_MB, quotas.EPHEMERAL_MAX_MB, " (MB)"),
    "timeout": _int(quotas.TIMEOUT_MIN_S, quotas.TIMEOUT_MAX_S, " (seconds)"),
    "epochs": _int(1, None, optional=True),
    "rounds": _int(1, None, optional=True),
    "steps": _int(1, None, optional=True),
    "batch_size": _int(1, 1_000_000),
    "lr": _real(0.0),
    "momentum": _real(0.0, 0.999999),
    "weight_decay": _real(0.0),
    "algorithm": _choice(ALGORITHMS, ALGORITHM_ALIASES),
    "model": _choice(MODELS),
    "model_kwargs": _model_kwargs,
    "dataset": _dataset,
    "seed": _int(0, 2**63 - 1),
    "clock": _choice(CLOCKS),
    "aggregation": _choice(AGGREGATIONS),
    "shards": _int(1, MAX_WORKERS, optional=True),
    "out": _optional_str,
    "code_dir": _code_dir,
    "run_id": _run_id,
    "retries": _int(quotas.ASYNC_RETRIES_MIN, quotas.ASYNC_RETRIES_MAX),
    "time_scale": _real(0.0),
    "isolation": _choice(ISOLATIONS),
    "efs_mode": _choice(EFS_MODES),
    "architecture": _choice(ARCHITECTURES),
    "concurrency": _int(1, quotas.ACCOUNT_CONCURRENCY_DEFAULT, optional=True),
    "target_loss": _real(0.0, open_lo=True, optional=True),
    "target_accuracy": _real(0.0, 1.0, optional=True),
    "eval_samples": _int(1, None, optional=True),
    "stall_after": _real(0.0, open_lo=True, optional=True),
    "max_rescues": _int(0, 100),
    "max_wall": _real(0.0, open_lo=True, optional=True),
    "fail_fast": _bool,
    "keep_efs": _bool,
    "faults": _faults,
}

NAMES: tuple[str, ...] = tuple(f.name for f in fields(RunSettings))
# Settings that are paths: a relative one in a config file is relative to the file.
PATH_SETTINGS = ("dataset", "code_dir")

HELP: Mapping[str, str] = {
    "workers": "number of workers N (1-10000)",
    "memory": "function memory in MB (128-10240); 1769 MB buys one vCPU",
    "ephemeral": "/tmp size in MB (512-10240)",
    "timeout": "function timeout in seconds (1-900)",
    "epochs": "stop after this many epochs ('none': only --rounds)",
    "rounds": "stop after this many rounds ('none': only --epochs)",
    "steps": "mini-batches per worker invocation ('none': a whole shard, the thesis's setting)",
    "batch_size": "mini-batch size",
    "lr": "learning rate",
    "momentum": "SGD momentum (0 <= m < 1)",
    "weight_decay": "L2 weight decay",
    "algorithm": "gradient_averaging or model_averaging",
    "model": "softmax, mlp (NumPy), cnn, vgg19 (TensorFlow)",
    "model_kwargs": "JSON object of model arguments, e.g. '{\"hidden\": [128]}'",
    "dataset": f"{BUILTIN_DATASETS} (directory or tarball)",
    "seed": "random seed (initial weights and sharding)",
    "clock": "lambda (what the function would have had on Lambda) or wall",
    "aggregation": "single (the thesis's one combiner) or sharded (per-shard aggregators)",
    "shards": "shard aggregators per round with --aggregation sharded (default: ceil(sqrt(N)))",
    "out": "output directory (default runs/<time>-<model>-<N>w)",
    "code_dir": "function code directory (default examples/numpy_digits)",
    "run_id": "run id on EFS",
    "retries": "async retry attempts of the function (0-2)",
    "time_scale": "multiplies Lambda's async retry delays (1 and 2 min) and event age",
    "isolation": "auto, strict (refuse to degrade) or portable (no root needed)",
    "efs_mode": "EFS throughput mode for prediction and cost: elastic, bursting, bursting-baseline",
    "architecture": "x86_64 or arm64 (price)",
    "concurrency": "reserved concurrency of the function ('none': the account's)",
    "target_loss": "stop when the held-out loss is at most this",
    "target_accuracy": "stop when the held-out accuracy is at least this",
    "eval_samples": "evaluate on the first n held-out samples only",
    "stall_after": "seconds without progress before the watchdog rescues a round",
    "max_rescues": "watchdog rescues per round before the run fails",
    "max_wall": "give up after this many laptop seconds",
    "fail_fast": "stop at the first out-of-memory or timed-out invocation",
    "keep_efs": "keep the EFS directory (dataset copy, weights history) in the output",
    "faults": "injected faults (config file only; for tests)",
}

# Settings with no command-line flag (config file only).
FILE_ONLY = ("faults",)


def normalise(values: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
    """Canonical names for a mapping of settings; an unknown key is a SettingsError."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in NAMES:
            raise SettingsError(
                name, f"is not a setting; allowed: {', '.join(NAMES)}", source=source
            )
        out[name] = value
    return out


# ---- text values (flags) ------------------------------------------------------------------


def parse_text(name: str, text: str) -> Any:
    """The typed value of one flag's text (before range checks); SettingsError if malformed."""
    kind = _TEXT_KINDS.get(name, "str")
    low = text.strip().lower()
    optional = name in _OPTIONAL
    if optional and (low in NONE_WORDS or (name == "steps" and low == "all")):
        return None
    try:
        if kind == "int":
            return int(text.replace("_", ""))
        if kind == "float":
            return float(text)
        if kind == "bool":
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind == "json":
            return json.loads(text)
    except ValueError:
        what = {
            "int": "a whole number",
            "float": "a number",
            "bool": "true or false",
            "json": "a JSON object",
        }[kind]
        none = " or 'none'" if optional else ""
        raise SettingsError(name, f"must be {what}{none}, got {text!r}") from None
    return text


def parse_list(name: str, text: str) -> list[Any]:
    """A comma-separated list of values for a sweep (each checked like the single flag)."""
    if name not in SWEEPABLE:
        raise SettingsError(
            name,
            f"takes one value; settings a sweep can list: {', '.join(map(flag_of, SWEEPABLE))}",
        )
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise SettingsError(name, f"must be a comma-separated list of values, got {text!r}")
    values = [parse_text(name, p) for p in parts]
    for v in values:
        _CHECKS[name](name, v)
    return values


_INT_NAMES = (
    "workers",
    "memory",
    "ephemeral",
    "timeout",
    "epochs",
    "rounds",
    "steps",
    "batch_size",
    "seed",
    "retries",
    "concurrency",
    "eval_samples",
    "max_rescues",
    "shards",
)
_FLOAT_NAMES = (
    "lr",
    "momentum",
    "weight_decay",
    "time_scale",
    "target_loss",
    "target_accuracy",
    "stall_after",
    "max_wall",
)
_TEXT_KINDS: dict[str, str] = {
    **{n: "int" for n in _INT_NAMES},
    **{n: "float" for n in _FLOAT_NAMES},
    "fail_fast": "bool",
    "keep_efs": "bool",
    "model_kwargs": "json",
}
_OPTIONAL = (
    "epochs",
    "rounds",
    "steps",
    "concurrency",
    "target_loss",
    "target_accuracy",
    "eval_samples",
    "stall_after",
    "max_wall",
    "out",
    "code_dir",
    "shards",
)


# ---- config files ------------------------------------------------------------------------


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config file's settings (canonical names, relative paths resolved against the file)."""
    p = Path(path).expanduser()
    source = str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError("config", f"cannot read {source!r}: {exc.strerror or exc}") from None
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SettingsError("config", f"{source!r} is not valid JSON: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:  # its message gives line and column
            raise SettingsError("config", f"{source!r} is not valid YAML: {exc}") from None
    else:
        raise SettingsError(
            "config", f"{source!r}: must end in .json, .yaml or .yml, got {suffix or 'none'!r}"
        )
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SettingsError("config", f"{source!r} must hold a mapping of settings, got {data!r}")
    values = normalise(data, source)
    base = p.resolve().parent
    for name in PATH_SETTINGS:
        value = values.get(name)
        if isinstance(value, str) and _looks_like_path(name, value):
            candidate = Path(value).expanduser()
            if not candidate.is_absolute():
                values[name] = str(base / candidate)
    return values


def _looks_like_path(name: str, value: str) -> bool:
    if name != "dataset":
        return True
    return value not in ("digits", "synthetic") and not value.startswith("synthetic:")


def merge(
    file_values: Mapping[str, Any],
    flag_values: Mapping[str, Any],
    source: str | None = None,
) -> RunSettings:
    """Settings from the defaults, then the file, then the flags (flags win)."""
    merged = dict(file_values)
    merged.update(flag_values)
    try:
        return RunSettings(**merged)
    except SettingsError as exc:
        if source is not None and exc.setting in file_values and exc.setting not in flag_values:
            raise SettingsError(exc.setting, exc.message.split(": ", 1)[-1], source) from None
        raise


def check_runnable(settings: RunSettings) -> None:
    """Checks that need the installed packages: TensorFlow for Keras models."""
    if settings.model in KERAS_MODELS:
        import importlib.util

        if importlib.util.find_spec("tensorflow") is None:
            raise SettingsError(
                "model",
                f"{settings.model!r} needs TensorFlow (pip install '.[tensorflow]'); "
                "the NumPy models softmax and mlp need nothing more",
            )


__all__ = [
    "AGGREGATIONS",
    "ALGORITHMS",
    "EFS_MODES",
    "HELP",
    "MODELS",
    "NAMES",
    "SWEEPABLE",
    "RunSettings",
    "SettingsError",
    "check_runnable",
    "flag_of",
    "load_config_file",
    "merge",
    "normalise",
    "parse_list",
    "parse_text",
]
