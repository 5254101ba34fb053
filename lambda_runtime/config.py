"""Typed, validated configuration of a function and of the service (spec §1)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from lambda_runtime import quotas
from lambda_runtime.errors import ConfigError

Architecture = Literal["x86_64", "arm64"]
ClockKind = Literal["lambda", "wall"]
Isolation = Literal["auto", "strict", "portable"]

_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9\-_]{1,64}")
_ENV_KEY = re.compile(r"[a-zA-Z][a-zA-Z0-9_]+")
_HANDLER = re.compile(r"[^\s]+\.[^\s.]+")
_RUNTIME = re.compile(r"python3\.\d+")


def _int_in(name: str, value: object, lo: int, hi: int, unit: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            name, f"must be a whole number of {unit} from {lo} to {hi}, got {value!r}"
        )
    if not lo <= value <= hi:
        raise ConfigError(name, f"must be from {lo} to {hi} {unit}, got {value}")
    return value


@dataclass(frozen=True)
class FunctionConfig:
    """One Lambda function. Every value is checked against Lambda's quotas; nothing is clamped."""

    name: str
    handler: str
    code_dir: str | Path
    memory_mb: int = quotas.MEMORY_DEFAULT_MB
    timeout_s: int = quotas.TIMEOUT_DEFAULT_S
    ephemeral_mb: int = quotas.EPHEMERAL_DEFAULT_MB
    environment: Mapping[str, str] = field(default_factory=dict)
    efs: Mapping[str, str | Path] = field(default_factory=dict)
    reserved_concurrency: int | None = None
    max_retry_attempts: int = quotas.ASYNC_RETRIES_DEFAULT
    max_event_age_s: int = quotas.EVENT_AGE_DEFAULT_S
    architecture: Architecture = "x86_64"
    runtime: str | None = None
    on_failure: str | Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _FUNCTION_NAME.fullmatch(self.name):
            raise ConfigError(
                "name", f"must be 1-64 characters of letters, digits, '-' or '_', got {self.name!r}"
            )
        if not isinstance(self.handler, str) or not _HANDLER.fullmatch(self.handler):
            raise ConfigError(
                "handler", f"must be 'module.function' (e.g. 'handler.main'), got {self.handler!r}"
            )
        code_dir = Path(self.code_dir)
        if not code_dir.is_dir():
            raise ConfigError("code_dir", f"must be an existing directory, got {str(code_dir)!r}")
        object.__setattr__(self, "code_dir", code_dir.resolve())
        _int_in("memory_mb", self.memory_mb, quotas.MEMORY_MIN_MB, quotas.MEMORY_MAX_MB, "MB")
        _int_in("timeout_s", self.timeout_s, quotas.TIMEOUT_MIN_S, quotas.TIMEOUT_MAX_S, "seconds")
        _int_in(
            "ephemeral_mb",
            self.ephemeral_mb,
            quotas.EPHEMERAL_MIN_MB,
            quotas.EPHEMERAL_MAX_MB,
            "MB",
        )
        object.__setattr__(self, "environment", MappingProxyType(self._checked_environment()))
        object.__setattr__(self, "efs", MappingProxyType(self._checked_efs()))
        if self.reserved_concurrency is not None:
            _int_in("reserved_concurrency", self.reserved_concurrency, 0, 1_000_000, "executions")
        _int_in(
            "max_retry_attempts",
            self.max_retry_attempts,
            quotas.ASYNC_RETRIES_MIN,
            quotas.ASYNC_RETRIES_MAX,
            "retries",
        )
        _int_in(
            "max_event_age_s",
            self.max_event_age_s,
            quotas.EVENT_AGE_MIN_S,
            quotas.EVENT_AGE_MAX_S,
            "seconds",
        )
        if self.architecture not in ("x86_64", "arm64"):
            raise ConfigError(
                "architecture", f"must be 'x86_64' or 'arm64', got {self.architecture!r}"
            )
        if self.runtime is not None and not _RUNTIME.fullmatch(self.runtime):
            raise ConfigError(
                "runtime", f"must be a Python runtime like 'python3.11', got {self.runtime!r}"
            )

    def _checked_environment(self) -> dict[str, str]:
        if not isinstance(self.environment, Mapping):
            raise ConfigError("environment", "must be a mapping of names to strings")
        env: dict[str, str] = {}
        for key, value in self.environment.items():
            if not isinstance(key, str) or not _ENV_KEY.fullmatch(key):
                raise ConfigError(
                    f"environment[{key!r}]",
                    "names must start with a letter, have at least 2 characters "
                    "and use only letters, digits and '_'",
                )
            if key in quotas.RESERVED_ENV_VARS:
                raise ConfigError(
                    f"environment[{key!r}]", "is reserved by Lambda and cannot be set"
                )
            if not isinstance(value, str):
                raise ConfigError(f"environment[{key!r}]", f"must be a string, got {value!r}")
            env[key] = value
        measured = json.dumps(env, separators=(",", ":"))
        if len(measured.encode()) > quotas.ENV_VARS_MAX_BYTES:
            raise ConfigError(
                "environment",
                "Lambda was unable to configure your environment variables because the "
                "environment variables you have provided exceeded the 4KB limit. "
                f"String measured: {measured}",
            )
        return env

    def _checked_efs(self) -> dict[str, Path]:
        if not isinstance(self.efs, Mapping):
            raise ConfigError("efs", "must map one mount path '/mnt/<name>' to a host directory")
        if len(self.efs) > quotas.MAX_EFS_MOUNTS:
            raise ConfigError(
                "efs",
                f"at most {quotas.MAX_EFS_MOUNTS} file system per function, got {len(self.efs)}",
            )
        mounts: dict[str, Path] = {}
        for mount, host in self.efs.items():
            if (
                not isinstance(mount, str)
                or not re.fullmatch(quotas.EFS_MOUNT_PATH_PATTERN, mount)
                or len(mount) > quotas.EFS_MOUNT_PATH_MAX_CHARS
            ):
                raise ConfigError(
                    "efs",
                    f"mount path must match /mnt/[a-zA-Z0-9-_.]+ (at most 160 characters), "
                    f"got {mount!r}",
                )
            host_dir = Path(host).resolve()
            host_dir.mkdir(parents=True, exist_ok=True)
            mounts[mount] = host_dir
        return mounts

    @property
    def vcpus(self) -> float:
        """The CPU share this memory size buys on Lambda."""
        return quotas.vcpus_for_memory(self.memory_mb)

    @property
    def runtime_id(self) -> str:
        """`python3.X` of the interpreter that runs the function."""
        if self.runtime is not None:
            return self.runtime
        import sys

        return f"python{sys.version_info.major}.{sys.version_info.minor}"

    def arn(self, region: str, account: str) -> str:
        return f"arn:aws:lambda:{region}:{account}:function:{self.name}"


@dataclass(frozen=True)
class ServiceSettings:
    """Knobs of the local service. `time_scale` multiplies Lambda's async timings (retry delays
    and maximum event age); `idle_timeout_s` is how long an idle environment lives."""

    run_dir: Path
    account_concurrency: int = quotas.ACCOUNT_CONCURRENCY_DEFAULT
    idle_timeout_s: float = 300.0
    time_scale: float = 1.0
    clock: ClockKind = "lambda"
    isolation: Isolation = "auto"
    backend: str = "process"
    region: str = quotas.REGION_DEFAULT
    account_id: str = quotas.ACCOUNT_ID_DEFAULT
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir).resolve())
        _int_in("account_concurrency", self.account_concurrency, 1, 1_000_000, "executions")
        if not isinstance(self.idle_timeout_s, (int, float)) or not (
            self.idle_timeout_s > 0 and math.isfinite(self.idle_timeout_s)
        ):
            raise ConfigError(
                "idle_timeout_s", f"must be a positive number, got {self.idle_timeout_s!r}"
            )
        if not isinstance(self.time_scale, (int, float)) or not (
            self.time_scale >= 0 and math.isfinite(self.time_scale)
        ):
            raise ConfigError("time_scale", f"must be a number >= 0, got {self.time_scale!r}")
        if self.clock not in ("lambda", "wall"):
            raise ConfigError("clock", f"must be 'lambda' or 'wall', got {self.clock!r}")
        if self.isolation not in ("auto", "strict", "portable"):
            raise ConfigError(
                "isolation", f"must be 'auto', 'strict' or 'portable', got {self.isolation!r}"
            )
        _int_in("port", self.port, 0, 65535, "port number")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ServiceSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(unknown[0], f"is not a setting; allowed: {', '.join(sorted(known))}")
        return cls(**dict(values))
