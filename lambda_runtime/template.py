"""Functions from a SAM / CloudFormation template: each function resource, as a checked config.

Maps ``AWS::Serverless::Function`` / ``AWS::Lambda::Function`` resources (with SAM Globals and
``AWS::Lambda::EventInvokeConfig``) to validated ``FunctionConfig`` objects, errors naming the
template property. Parsing the template and resolving its intrinsic functions is done by
``lambda_runtime.intrinsics``; the names of it that were importable from here are re-exported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lambda_runtime import quotas
from lambda_runtime.config import FunctionConfig
from lambda_runtime.errors import ConfigError
from lambda_runtime.intrinsics import _MISSING, _cfn_str, _is_intrinsic, _section
from lambda_runtime.intrinsics import DEFAULT_STACK_NAME as DEFAULT_STACK_NAME
from lambda_runtime.intrinsics import EFS_ACCESS_POINT as EFS_ACCESS_POINT
from lambda_runtime.intrinsics import EFS_FILE_SYSTEM as EFS_FILE_SYSTEM
from lambda_runtime.intrinsics import FUNCTION_TYPES as FUNCTION_TYPES
from lambda_runtime.intrinsics import LAMBDA_FUNCTION as LAMBDA_FUNCTION
from lambda_runtime.intrinsics import NO_VALUE as NO_VALUE
from lambda_runtime.intrinsics import SERVERLESS_FUNCTION as SERVERLESS_FUNCTION
from lambda_runtime.intrinsics import Resolver as Resolver
from lambda_runtime.intrinsics import TemplateLoader as TemplateLoader
from lambda_runtime.intrinsics import Unresolved as Unresolved
from lambda_runtime.intrinsics import parse_template as parse_template

log = logging.getLogger(__name__)

EVENT_INVOKE_CONFIG = "AWS::Lambda::EventInvokeConfig"

# FunctionConfig field -> the template property it comes from (for error messages).
_PROPERTY_OF_FIELD = {
    "name": "FunctionName",
    "handler": "Handler",
    "memory_mb": "MemorySize",
    "timeout_s": "Timeout",
    "ephemeral_mb": "EphemeralStorage.Size",
    "environment": "Environment.Variables",
    "efs": "FileSystemConfigs",
    "reserved_concurrency": "ReservedConcurrentExecutions",
    "architecture": "Architectures",
    "runtime": "Runtime",
    "max_retry_attempts": "EventInvokeConfig.MaximumRetryAttempts",
    "max_event_age_s": "EventInvokeConfig.MaximumEventAgeInSeconds",
    "on_failure": "EventInvokeConfig.DestinationConfig.OnFailure.Destination",
}


# -- functions ----------------------------------------------------------------------------------


@dataclass
class _Draft:
    """FunctionConfig arguments read from one resource, and where each one came from."""

    logical_id: str
    kwargs: dict[str, Any]
    origin: dict[str, str]


def load_template(
    path: Path,
    *,
    parameters: Mapping[str, str] = {},
    efs_dirs: Mapping[str, Path] = {},
    region: str = quotas.REGION_DEFAULT,
    account_id: str = quotas.ACCOUNT_ID_DEFAULT,
    cache_dir: Path | None = None,
    destinations_dir: Path | None = None,
    stack_name: str = DEFAULT_STACK_NAME,
) -> list[FunctionConfig]:
    """The Lambda functions of a SAM / CloudFormation template, as validated FunctionConfigs.

    `efs_dirs` maps a LocalMountPath to the host directory that stands in for the file system;
    inline code (ZipFile, InlineCode) and zipped CodeUri are unpacked under `cache_dir`; an
    async OnFailure destination becomes the JSON-lines file `destinations_dir/<its name>.jsonl`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("template", f"cannot read {str(path)!r}: {exc.strerror}") from exc
    template = parse_template(text, str(path))
    if "Resources" not in template:
        raise ConfigError("Resources", f"{path} has no Resources section")
    resolver = Resolver(
        template, parameters=parameters, region=region, account_id=account_id, stack_name=stack_name
    )
    builder = _Builder(
        resolver,
        base_dir=path.resolve().parent,
        efs_dirs={str(k): Path(v) for k, v in efs_dirs.items()},
        cache_dir=cache_dir or Path(tempfile.gettempdir()) / "lambda-runtime-code",
        destinations_dir=(
            destinations_dir or Path(tempfile.gettempdir()) / "lambda-runtime-destinations"
        ),
        function_globals=_function_globals(template),
    )
    return builder.build()


def _function_globals(template: Mapping[str, Any]) -> dict[str, Any]:
    section = _section(template, "Globals").get("Function") or {}
    if not isinstance(section, dict):
        raise ConfigError("Globals.Function", "must be a mapping of function properties")
    return section


def merge_globals(globals_: Any, local: Any) -> Any:
    """SAM's Globals rule: maps merge, lists concatenate, otherwise the function's value wins."""
    if isinstance(globals_, dict) and isinstance(local, dict):
        if _is_intrinsic(globals_) or _is_intrinsic(local):
            return local
        merged = dict(globals_)
        for key, value in local.items():
            merged[key] = merge_globals(globals_[key], value) if key in globals_ else value
        return merged
    if isinstance(globals_, list) and isinstance(local, list):
        return globals_ + local
    return local


class _Builder:
    def __init__(
        self,
        resolver: Resolver,
        *,
        base_dir: Path,
        efs_dirs: Mapping[str, Path],
        cache_dir: Path,
        destinations_dir: Path,
        function_globals: Mapping[str, Any],
    ) -> None:
        self.resolver = resolver
        self.base_dir = base_dir
        self.efs_dirs = efs_dirs
        self.cache_dir = cache_dir
        self.destinations_dir = destinations_dir
        self.function_globals = function_globals

    def build(self) -> list[FunctionConfig]:
        drafts: list[_Draft] = []
        invoke_configs: list[tuple[str, Mapping[str, Any]]] = []
        for logical_id, resource in self.resolver.resources.items():
            if not isinstance(resource, dict):
                raise ConfigError(f"Resources.{logical_id}", "must be a mapping with a Type")
            kind = resource.get("Type")
            if not self._created(logical_id, resource):
                continue
            props = resource.get("Properties") or {}
            if not isinstance(props, dict):
                raise ConfigError(f"Resources.{logical_id}.Properties", "must be a mapping")
            if kind == SERVERLESS_FUNCTION:
                drafts.append(
                    self._draft(logical_id, merge_globals(self.function_globals, props), sam=True)
                )
            elif kind == LAMBDA_FUNCTION:
                drafts.append(self._draft(logical_id, props, sam=False))
            elif kind == EVENT_INVOKE_CONFIG:
                invoke_configs.append((logical_id, props))
            else:
                log.debug("ignoring resource %s of type %s", logical_id, kind)
        for logical_id, props in invoke_configs:
            self._apply_invoke_config(logical_id, props, drafts)
        for draft in drafts:
            if "on_failure" in draft.kwargs:
                draft.kwargs["on_failure"] = self._destination_file(draft.kwargs["on_failure"])
        configs: list[FunctionConfig] = []
        owners: dict[str, str] = {}
        for draft in drafts:
            config = _make_config(draft)
            if config.name in owners:
                raise ConfigError(
                    draft.origin["name"],
                    f"{config.name!r} is already the name of Resources.{owners[config.name]}",
                )
            owners[config.name] = draft.logical_id
            configs.append(config)
        return configs

    def _created(self, logical_id: str, resource: Mapping[str, Any]) -> bool:
        condition = resource.get("Condition")
        if condition is None:
            return True
        truth = self.resolver.condition(condition)
        if isinstance(truth, Unresolved):
            log.warning(
                "Resources.%s: condition %s unknown (%s); keeping it",
                logical_id,
                condition,
                truth.reason,
            )
            return True
        if not truth:
            log.debug("Resources.%s: condition %s is false; skipped", logical_id, condition)
        return truth

    def _draft(self, logical_id: str, props: Mapping[str, Any], *, sam: bool) -> _Draft:
        prefix = f"Resources.{logical_id}.Properties"
        origin = {field: f"{prefix}.{prop}" for field, prop in _PROPERTY_OF_FIELD.items()}
        origin["code_dir"] = f"{prefix}.{'CodeUri' if sam else 'Code'}"
        resolve = self.resolver.resolve

        def get(name: str) -> Any:
            value = resolve(props[name]) if name in props else _MISSING
            return _MISSING if value is NO_VALUE else value

        def need(prop: str, value: Any) -> Any:
            if isinstance(value, Unresolved):
                raise ConfigError(f"{prefix}.{prop}", f"cannot be resolved locally: {value.reason}")
            return value

        package_type = need("PackageType", get("PackageType"))
        if package_type not in (_MISSING, "Zip"):
            raise ConfigError(
                f"{prefix}.PackageType",
                f"must be 'Zip' (container images are not run locally), got {package_type!r}",
            )
        kwargs: dict[str, Any] = {"name": self.resolver.function_name(logical_id)}
        name = get("FunctionName")
        if name is not _MISSING:
            kwargs["name"] = need("FunctionName", name)
        handler = need("Handler", get("Handler"))
        if handler is _MISSING:
            raise ConfigError(
                f"{prefix}.Handler", "is required, e.g. 'app.handler' (module.function)"
            )
        kwargs["handler"] = handler
        kwargs["code_dir"] = self._code_dir(prefix, props, sam=sam, need=need)
        runtime = need("Runtime", get("Runtime"))
        if runtime is not _MISSING:
            if not isinstance(runtime, str) or not re.fullmatch(r"python3\.\d+", runtime):
                raise ConfigError(
                    f"{prefix}.Runtime",
                    f"must be a Python runtime 'python3.x' (e.g. 'python3.12'); "
                    f"only Python functions run locally, got {runtime!r}",
                )
            kwargs["runtime"] = runtime
        for field, prop in (
            ("memory_mb", "MemorySize"),
            ("timeout_s", "Timeout"),
            ("reserved_concurrency", "ReservedConcurrentExecutions"),
        ):
            value = need(prop, get(prop))
            if value is not _MISSING:
                kwargs[field] = _as_int(value)
        storage = need("EphemeralStorage", get("EphemeralStorage"))
        if storage is not _MISSING:
            if not isinstance(storage, dict) or "Size" not in storage:
                raise ConfigError(f"{prefix}.EphemeralStorage", "must be a mapping {Size: MB}")
            kwargs["ephemeral_mb"] = _as_int(need("EphemeralStorage.Size", storage["Size"]))
        environment = need("Environment", get("Environment"))
        if environment is not _MISSING:
            kwargs["environment"] = _environment(prefix, environment)
        filesystems = need("FileSystemConfigs", get("FileSystemConfigs"))
        if filesystems is not _MISSING:
            kwargs["efs"] = self._efs(prefix, filesystems, need)
        architectures = need("Architectures", get("Architectures"))
        if architectures is not _MISSING:
            if not (isinstance(architectures, list) and len(architectures) == 1):
                raise ConfigError(
                    f"{prefix}.Architectures",
                    f"must be a list of exactly one of 'x86_64' or 'arm64', got {architectures!r}",
                )
            kwargs["architecture"] = need("Architectures", architectures[0])
        draft = _Draft(logical_id, kwargs, origin)
        if sam:
            invoke = need("EventInvokeConfig", get("EventInvokeConfig"))
            if invoke is not _MISSING:
                _read_invoke_config(draft, f"{prefix}.EventInvokeConfig", invoke)
        return draft

    def _code_dir(
        self, prefix: str, props: Mapping[str, Any], *, sam: bool, need: Callable[[str, Any], Any]
    ) -> Path:
        resolve = self.resolver.resolve
        if sam and "InlineCode" in props:
            return self._inline(
                f"{prefix}.InlineCode", need("InlineCode", resolve(props["InlineCode"]))
            )
        prop = "CodeUri" if sam else "Code"
        code = need(prop, resolve(props[prop])) if prop in props else ("." if sam else _MISSING)
        if code is _MISSING:
            raise ConfigError(
                f"{prefix}.Code", "is required: {ZipFile: <python source>} or a local path"
            )
        if isinstance(code, dict) and not sam and "ZipFile" in code:
            return self._inline(f"{prefix}.Code.ZipFile", need("Code.ZipFile", code["ZipFile"]))
        if isinstance(code, dict):
            bucket = code.get("Bucket", code.get("S3Bucket"))
            key = code.get("Key", code.get("S3Key"))
            where = (
                f"s3://{bucket}/{key}"
                if bucket is not None
                else f"image {code['ImageUri']}"
                if "ImageUri" in code
                else repr(code)
            )
            raise ConfigError(
                f"{prefix}.{prop}",
                f"{where} is not local code; point it at a directory next to the template",
            )
        if not isinstance(code, str) or not code:
            raise ConfigError(f"{prefix}.{prop}", f"must be a local directory, got {code!r}")
        if code.startswith("s3://"):
            raise ConfigError(
                f"{prefix}.{prop}",
                f"{code} is not local code; point it at a directory next to the template",
            )
        local = (self.base_dir / code).resolve()
        if local.is_file() and zipfile.is_zipfile(local):
            return self._unzip(local)
        if not local.is_dir():
            raise ConfigError(
                f"{prefix}.{prop}",
                f"must be an existing directory (relative to the template's directory), "
                f"got {code!r} -> {str(local)!r}",
            )
        return local

    def _inline(self, field: str, source: Any) -> Path:
        if not isinstance(source, str):
            raise ConfigError(field, f"must be Python source text, got {source!r}")
        # Content-addressed: the same code always lands in the same place, races are harmless.
        target = self.cache_dir / f"inline-{hashlib.sha256(source.encode()).hexdigest()[:16]}"
        index = target / "index.py"  # CloudFormation saves ZipFile code for Python as index.py
        if not index.is_file() or index.read_text(encoding="utf-8") != source:
            target.mkdir(parents=True, exist_ok=True)
            partial = target / f".index.py.{os.getpid()}.tmp"
            partial.write_text(source, encoding="utf-8")
            os.replace(partial, index)
        return target

    def _unzip(self, archive: Path) -> Path:
        target = self.cache_dir / f"zip-{hashlib.sha256(archive.read_bytes()).hexdigest()[:16]}"
        if not target.is_dir():
            partial = Path(tempfile.mkdtemp(prefix=".unzip-", dir=_mkdir(self.cache_dir)))
            with zipfile.ZipFile(archive) as bundle:
                bundle.extractall(partial)  # extractall drops absolute and '..' member paths
            try:
                partial.rename(target)
            except OSError:  # someone else unpacked the same archive first
                shutil.rmtree(partial, ignore_errors=True)
        return target

    def _efs(
        self, prefix: str, filesystems: Any, need: Callable[[str, Any], Any]
    ) -> dict[str, Path]:
        field = f"{prefix}.FileSystemConfigs"
        if not isinstance(filesystems, list):
            raise ConfigError(field, "must be a list of {Arn, LocalMountPath}")
        if len(filesystems) > quotas.MAX_EFS_MOUNTS:
            raise ConfigError(
                field,
                f"at most {quotas.MAX_EFS_MOUNTS} file system per function, got {len(filesystems)}",
            )
        mounts: dict[str, Path] = {}
        for index, entry in enumerate(filesystems):
            item = f"FileSystemConfigs[{index}]"
            if not isinstance(entry, dict) or "Arn" not in entry or "LocalMountPath" not in entry:
                raise ConfigError(f"{prefix}.{item}", "must be a mapping {Arn, LocalMountPath}")
            mount = need(f"{item}.LocalMountPath", entry["LocalMountPath"])
            if (
                not isinstance(mount, str)
                or not re.fullmatch(quotas.EFS_MOUNT_PATH_PATTERN, mount)
                or len(mount) > quotas.EFS_MOUNT_PATH_MAX_CHARS
            ):
                raise ConfigError(
                    f"{prefix}.{item}.LocalMountPath",
                    f"must match /mnt/[a-zA-Z0-9-_.]+ (at most 160 characters), got {mount!r}",
                )
            host = self.efs_dirs.get(mount)
            if host is None:
                raise ConfigError(
                    f"{prefix}.{item}.LocalMountPath",
                    f"{mount} needs a host directory to stand in for EFS; "
                    f"pass --efs {mount}=HOST_DIR",
                )
            mounts[mount] = host
        return mounts

    def _destination_file(self, destination: object) -> Path:
        # Locally every destination (queue, topic, bus, function) is a file of failure records,
        # named after the destination so functions sharing one queue share one file.
        name = re.split(r"[:/]", str(destination))[-1] or "destination"
        path = self.destinations_dir / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.jsonl"
        log.info("async failures for %s are written to %s", destination, path)
        return path

    def _apply_invoke_config(
        self, logical_id: str, props: Mapping[str, Any], drafts: list[_Draft]
    ) -> None:
        prefix = f"Resources.{logical_id}.Properties"
        resolved = self.resolver.resolve(props)
        target = resolved.get("FunctionName")
        for draft in drafts:
            if target in (draft.kwargs["name"], draft.logical_id) or (
                isinstance(target, str) and target.endswith(f":function:{draft.kwargs['name']}")
            ):
                _read_invoke_config(draft, prefix, resolved)
                return
        log.warning(
            "%s.FunctionName: %r is not a function of this template; ignored", prefix, target
        )


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _as_int(value: Any) -> Any:
    """CloudFormation accepts integers written as strings (a Ref to a Number parameter is one)."""
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return value


def _environment(prefix: str, environment: Any) -> dict[str, str]:
    if not isinstance(environment, dict):
        raise ConfigError(f"{prefix}.Environment", "must be a mapping {Variables: {NAME: value}}")
    variables = environment.get("Variables", {})
    if not isinstance(variables, dict):
        raise ConfigError(f"{prefix}.Environment.Variables", "must be a mapping of NAME: value")
    env: dict[str, str] = {}
    for key, value in variables.items():
        if isinstance(value, Unresolved):
            # The value only matters if the handler reads it; the placeholder says what is missing.
            log.warning("%s.Environment.Variables.%s: %s", prefix, key, value.reason)
            env[str(key)] = value.text
        elif isinstance(value, (str, int, float, bool)):
            env[str(key)] = _cfn_str(value)
        else:
            raise ConfigError(
                f"{prefix}.Environment.Variables.{key}",
                f"must be a string, number or boolean, got {value!r}",
            )
    return env


def _read_invoke_config(draft: _Draft, prefix: str, config: Any) -> None:
    if not isinstance(config, dict):
        raise ConfigError(
            prefix, "must be a mapping of MaximumRetryAttempts, MaximumEventAgeInSeconds"
        )
    for field, prop in (
        ("max_retry_attempts", "MaximumRetryAttempts"),
        ("max_event_age_s", "MaximumEventAgeInSeconds"),
    ):
        if prop in config:
            draft.kwargs[field] = _as_int(_needed(f"{prefix}.{prop}", config[prop]))
            draft.origin[field] = f"{prefix}.{prop}"
    destinations = config.get("DestinationConfig") or {}
    on_failure = destinations.get("OnFailure") if isinstance(destinations, dict) else None
    if isinstance(on_failure, dict) and "Destination" in on_failure:
        field = f"{prefix}.DestinationConfig.OnFailure.Destination"
        draft.kwargs["on_failure"] = _needed(field, on_failure["Destination"])
        draft.origin["on_failure"] = field
    elif on_failure is not None:
        raise ConfigError(
            f"{prefix}.DestinationConfig.OnFailure",
            "must give a Destination ARN (a function, queue, topic or bus of this template)",
        )


def _needed(field: str, value: Any) -> Any:
    if isinstance(value, Unresolved):
        raise ConfigError(field, f"cannot be resolved locally: {value.reason}")
    return value


def _make_config(draft: _Draft) -> FunctionConfig:
    try:
        return FunctionConfig(**draft.kwargs)
    except ConfigError as exc:
        field = exc.field
        message = (
            exc.message[len(field) + 2 :] if exc.message.startswith(f"{field}: ") else exc.message
        )
        match = re.fullmatch(r"environment\[(.*)\]", field)
        if match:
            key = match.group(1).strip("'\"")
            where = f"{draft.origin['environment']}.{key}"
        else:
            where = draft.origin.get(field, f"Resources.{draft.logical_id}.{field}")
        raise ConfigError(where, message) from exc
