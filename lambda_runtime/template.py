"""Functions from a SAM / CloudFormation template: intrinsics resolved locally, values checked."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
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

import yaml

from lambda_runtime import quotas
from lambda_runtime.config import FunctionConfig
from lambda_runtime.errors import ConfigError

log = logging.getLogger(__name__)

SERVERLESS_FUNCTION = "AWS::Serverless::Function"
LAMBDA_FUNCTION = "AWS::Lambda::Function"
EVENT_INVOKE_CONFIG = "AWS::Lambda::EventInvokeConfig"
EFS_ACCESS_POINT = "AWS::EFS::AccessPoint"
EFS_FILE_SYSTEM = "AWS::EFS::FileSystem"
FUNCTION_TYPES = (SERVERLESS_FUNCTION, LAMBDA_FUNCTION)

DEFAULT_STACK_NAME = "local"

# Short-form tag -> long-form key. CloudFormation's own list of YAML short forms.
_TAGS = {
    "Ref": "Ref",
    "Condition": "Condition",
    "GetAtt": "Fn::GetAtt",
    "Sub": "Fn::Sub",
    "Join": "Fn::Join",
    "Select": "Fn::Select",
    "Split": "Fn::Split",
    "If": "Fn::If",
    "Equals": "Fn::Equals",
    "Not": "Fn::Not",
    "And": "Fn::And",
    "Or": "Fn::Or",
    "FindInMap": "Fn::FindInMap",
    "Base64": "Fn::Base64",
    "Cidr": "Fn::Cidr",
    "ImportValue": "Fn::ImportValue",
    "GetAZs": "Fn::GetAZs",
    "Transform": "Fn::Transform",
    "Length": "Fn::Length",
    "ToJsonString": "Fn::ToJsonString",
}

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


class TemplateLoader(yaml.SafeLoader):
    """A SafeLoader that reads CloudFormation's short-form tags (`!Ref`, ...) as long forms."""


# CloudFormation keeps unquoted dates as strings; YAML 1.1 would turn them into datetime.date.
TemplateLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _tag_constructor(key: str) -> Callable[[yaml.SafeLoader, yaml.Node], dict[str, Any]]:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
        value: Any
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            assert isinstance(node, yaml.MappingNode)
            value = loader.construct_mapping(node, deep=True)
        if key == "Fn::GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
        return {key: value}

    return construct


for _short, _long in _TAGS.items():
    TemplateLoader.add_constructor(f"!{_short}", _tag_constructor(_long))


@dataclass(frozen=True)
class Unresolved:
    """An intrinsic that cannot be evaluated locally; kept opaque until a needed field meets it."""

    text: str
    reason: str

    def __str__(self) -> str:
        return self.text


class _NoValue:
    """AWS::NoValue: the property or list item disappears."""


NO_VALUE = _NoValue()
_MISSING = object()


def _cfn_str(value: object) -> str:
    """A scalar as CloudFormation turns it into a string (booleans lower-case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _is_intrinsic(node: object) -> bool:
    if not isinstance(node, dict) or len(node) != 1:
        return False
    key = next(iter(node))
    return (
        key == "Ref"
        or key.startswith("Fn::")
        or (key == "Condition" and isinstance(node[key], str))
    )


def parse_template(text: str, source: str = "template") -> dict[str, Any]:
    """Parse YAML (with short-form tags) or JSON template text into a mapping."""
    try:
        if text.lstrip().startswith("{"):
            data = json.loads(text)
        else:
            data = yaml.load(
                text, Loader=TemplateLoader
            )  # a SafeLoader subclass: no arbitrary objects
    except json.JSONDecodeError as exc:
        raise ConfigError("template", f"{source} is not valid JSON: {exc}") from exc
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError("template", f"{source} is not valid YAML: {detail}") from exc
    if not isinstance(data, dict):
        raise ConfigError("template", f"{source} must be a mapping with a Resources section")
    return data


class Resolver:
    """Evaluates intrinsic functions against one template's Parameters, Mappings and Conditions."""

    def __init__(
        self,
        template: Mapping[str, Any],
        *,
        parameters: Mapping[str, str] = {},
        region: str = quotas.REGION_DEFAULT,
        account_id: str = quotas.ACCOUNT_ID_DEFAULT,
        stack_name: str = DEFAULT_STACK_NAME,
    ) -> None:
        self.region = region
        self.account_id = account_id
        self.stack_name = stack_name
        self.partition = (
            "aws-cn"
            if region.startswith("cn-")
            else "aws-us-gov"
            if region.startswith("us-gov-")
            else "aws"
        )
        self.resources: Mapping[str, Any] = _section(template, "Resources")
        self.mappings: Mapping[str, Any] = _section(template, "Mappings")
        self.conditions: Mapping[str, Any] = _section(template, "Conditions")
        self.params = _parameter_values(_section(template, "Parameters"), parameters)
        self._condition_cache: dict[str, bool | Unresolved] = {}
        self._active: set[str] = set()
        self._functions: dict[str, Callable[[Any], Any]] = {
            "Fn::GetAtt": self._get_att,
            "Fn::Sub": self._sub,
            "Fn::Join": self._join,
            "Fn::Select": self._select,
            "Fn::Split": self._split,
            "Fn::If": self._if,
            "Fn::Equals": self._equals,
            "Fn::Not": self._not,
            "Fn::And": self._and,
            "Fn::Or": self._or,
            "Fn::FindInMap": self._find_in_map,
            "Fn::Base64": self._base64,
            "Fn::Cidr": self._cidr,
            "Fn::GetAZs": self._get_azs,
            "Fn::Length": self._length,
            "Fn::ToJsonString": self._to_json_string,
        }

    # -- generic walk ---------------------------------------------------------------------------

    def resolve(self, node: Any) -> Any:
        """`node` with every resolvable intrinsic evaluated; AWS::NoValue items dropped."""
        if isinstance(node, dict):
            if _is_intrinsic(node):
                key, arg = next(iter(node.items()))
                return self._call(key, arg)
            out: dict[str, Any] = {}
            for key, value in node.items():
                resolved = self.resolve(value)
                if resolved is not NO_VALUE:
                    out[key] = resolved
            return out
        if isinstance(node, list):
            return [v for v in (self.resolve(item) for item in node) if v is not NO_VALUE]
        return node

    def _call(self, key: str, arg: Any) -> Any:
        if key == "Ref":
            return self.ref(arg if isinstance(arg, str) else self.resolve(arg))
        if key == "Condition":
            return self.condition(arg)
        if key == "Fn::ImportValue":
            name = self.resolve(arg)
            return Unresolved(
                f"<unresolved Fn::ImportValue {name}>",
                f"Fn::ImportValue {name} needs another deployed stack's export",
            )
        function = self._functions.get(key)
        if function is None:
            return Unresolved(f"<unresolved {key}>", f"{key} is not evaluated locally")
        return function(arg)

    # -- Ref, GetAtt, Sub -----------------------------------------------------------------------

    def ref(self, name: object) -> Any:
        """Value of `Ref name`: a parameter, a pseudo parameter or a resource's physical id."""
        if isinstance(name, Unresolved):
            return name
        if not isinstance(name, str):
            return Unresolved(f"<unresolved Ref {name!r}>", f"Ref needs a name, got {name!r}")
        if name in self.params:
            return self.params[name]
        pseudo = self._pseudo(name)
        if pseudo is not _MISSING:
            return pseudo
        resource = self.resources.get(name)
        if isinstance(resource, dict):
            return self._resource_ref(name, resource)
        return Unresolved(f"<unresolved Ref {name}>", f"no parameter or resource named {name!r}")

    def _pseudo(self, name: str) -> Any:
        suffix = "amazonaws.com.cn" if self.partition == "aws-cn" else "amazonaws.com"
        values: dict[str, Any] = {
            "AWS::Region": self.region,
            "AWS::AccountId": self.account_id,
            "AWS::StackName": self.stack_name,
            "AWS::StackId": (
                f"arn:{self.partition}:cloudformation:{self.region}:{self.account_id}:"
                f"stack/{self.stack_name}/00000000-0000-0000-0000-000000000000"
            ),
            "AWS::Partition": self.partition,
            "AWS::URLSuffix": suffix,
            "AWS::NotificationARNs": [],
            "AWS::NoValue": NO_VALUE,
        }
        return values.get(name, _MISSING)

    def _fake_id(self, logical_id: str, length: int = 17) -> str:
        return hashlib.sha256(logical_id.encode()).hexdigest()[:length]

    def _resource_ref(self, logical_id: str, resource: Mapping[str, Any]) -> Any:
        kind = resource.get("Type")
        if kind == EFS_ACCESS_POINT:
            return self._arn("elasticfilesystem", f"access-point/fsap-{self._fake_id(logical_id)}")
        if kind == EFS_FILE_SYSTEM:
            return f"fs-{self._fake_id(logical_id)}"
        if kind in FUNCTION_TYPES:
            return self.function_name(logical_id)
        return logical_id

    def function_name(self, logical_id: str) -> str:
        """A function resource's name: its FunctionName if resolvable, else its logical id."""
        if logical_id in self._active:  # a FunctionName that refers to itself
            return logical_id
        self._active.add(logical_id)
        try:
            props = self.resources[logical_id].get("Properties") or {}
            name = self.resolve(props.get("FunctionName", logical_id))
        finally:
            self._active.discard(logical_id)
        return name if isinstance(name, str) else logical_id

    def _arn(self, service: str, resource: str, *, regional: bool = True) -> str:
        region = self.region if regional else ""
        return f"arn:{self.partition}:{service}:{region}:{self.account_id}:{resource}"

    def _get_att(self, arg: Any) -> Any:
        if isinstance(arg, str):
            arg = arg.split(".", 1)
        parts = self.resolve(arg)
        if (
            not isinstance(parts, list)
            or len(parts) != 2
            or not all(isinstance(p, str) for p in parts)
        ):
            return Unresolved(
                f"<unresolved Fn::GetAtt {parts}>", "Fn::GetAtt needs [resource, attribute]"
            )
        logical_id, attr = parts
        resource = self.resources.get(logical_id)
        if not isinstance(resource, dict):
            return Unresolved(
                f"<unresolved Fn::GetAtt {logical_id}.{attr}>", f"no resource named {logical_id!r}"
            )
        kind = str(resource.get("Type", ""))
        if kind in FUNCTION_TYPES and attr == "Arn":
            return self._arn("lambda", f"function:{self.function_name(logical_id)}")
        if kind == EFS_ACCESS_POINT and attr in ("Arn", "AccessPointId"):
            fsap = f"fsap-{self._fake_id(logical_id)}"
            return (
                fsap
                if attr == "AccessPointId"
                else self._arn("elasticfilesystem", f"access-point/{fsap}")
            )
        if kind == EFS_FILE_SYSTEM and attr in ("Arn", "FileSystemId"):
            fs = f"fs-{self._fake_id(logical_id)}"
            return (
                fs
                if attr == "FileSystemId"
                else self._arn("elasticfilesystem", f"file-system/{fs}")
            )
        service = kind.split("::")[1].lower() if kind.count("::") == 2 else "unknown"
        if attr == "Arn":
            if service == "iam":  # IAM ARNs are global: no region
                return self._arn(
                    "iam", f"{kind.split('::')[2].lower()}/{logical_id}", regional=False
                )
            return self._arn(service, logical_id)
        if attr.endswith("Arn"):
            return self._arn(service, f"{logical_id}/{attr[:-3]}")
        return f"{logical_id}-{attr}"

    _SUB_VAR = re.compile(r"\$\{([^}]*)\}")

    def _sub(self, arg: Any) -> Any:
        if isinstance(arg, str):
            text, variables = arg, {}
        elif (
            isinstance(arg, list)
            and len(arg) == 2
            and isinstance(arg[0], str)
            and isinstance(arg[1], dict)
        ):
            text, variables = arg[0], {k: self.resolve(v) for k, v in arg[1].items()}
        else:
            return Unresolved(
                "<unresolved Fn::Sub>", f"Fn::Sub needs a string or [string, map], got {arg!r}"
            )
        missing: list[Unresolved] = []

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("!"):  # ${!Literal} is written out as ${Literal}
                return "${" + name[1:] + "}"
            name = name.strip()
            if name in variables:
                value = variables[name]
            elif "." in name and name not in self.params:
                value = self._get_att(name.split(".", 1))
            else:
                value = self.ref(name)
            if isinstance(value, (Unresolved, list, dict, _NoValue)):
                missing.append(
                    value
                    if isinstance(value, Unresolved)
                    else Unresolved("", f"${{{name}}} is not a string")
                )
                return "${" + name + "}"
            return _cfn_str(value)

        result = self._SUB_VAR.sub(substitute, text)
        if missing:
            return Unresolved(result, missing[0].reason)
        return result

    # -- list and string functions --------------------------------------------------------------

    def _join(self, arg: Any) -> Any:
        arg = self.resolve(arg)
        if not (isinstance(arg, list) and len(arg) == 2 and isinstance(arg[0], str)):
            return _unresolved_arg("Fn::Join", arg, "[delimiter, list]")
        delimiter, items = arg
        if isinstance(items, Unresolved):
            return items
        if not isinstance(items, list):
            return _unresolved_arg("Fn::Join", arg, "[delimiter, list]")
        text = delimiter.join(
            str(item) if isinstance(item, Unresolved) else _cfn_str(item) for item in items
        )
        for item in items:
            if isinstance(item, Unresolved):
                return Unresolved(text, item.reason)
        return text

    def _select(self, arg: Any) -> Any:
        arg = self.resolve(arg)
        if not (isinstance(arg, list) and len(arg) == 2):
            return _unresolved_arg("Fn::Select", arg, "[index, list]")
        index, items = arg
        for part in (index, items):
            if isinstance(part, Unresolved):
                return part
        try:
            return items[int(index)]
        except (ValueError, TypeError, IndexError, KeyError):
            return _unresolved_arg("Fn::Select", arg, "an index within the list")

    def _split(self, arg: Any) -> Any:
        arg = self.resolve(arg)
        if not (isinstance(arg, list) and len(arg) == 2 and isinstance(arg[0], str) and arg[0]):
            return _unresolved_arg("Fn::Split", arg, "[delimiter, string]")
        if isinstance(arg[1], Unresolved):
            return arg[1]
        if not isinstance(arg[1], str):
            return _unresolved_arg("Fn::Split", arg, "[delimiter, string]")
        return arg[1].split(arg[0])

    def _find_in_map(self, arg: Any) -> Any:
        arg = self.resolve(arg)
        if not (isinstance(arg, list) and len(arg) == 3):
            return _unresolved_arg("Fn::FindInMap", arg, "[map, top-level key, second-level key]")
        for part in arg:
            if isinstance(part, Unresolved):
                return part
        name, top, second = (_cfn_str(part) for part in arg)
        value = self.mappings.get(name, {})
        for key in (top, second):
            value = value.get(key, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            return Unresolved(
                f"<unresolved Fn::FindInMap {name}.{top}.{second}>",
                f"Mappings.{name} has no entry {top}.{second}",
            )
        return self.resolve(value)

    def _base64(self, arg: Any) -> Any:
        value = self.resolve(arg)
        if isinstance(value, Unresolved):
            return value
        return base64.b64encode(_cfn_str(value).encode()).decode()

    def _cidr(self, arg: Any) -> Any:
        arg = self.resolve(arg)
        try:
            block, count, bits = arg
            network = ipaddress.ip_network(str(block), strict=False)
            prefix = network.max_prefixlen - int(bits)
            subnets = network.subnets(new_prefix=prefix)
            return [str(next(subnets)) for _ in range(int(count))]
        except (ValueError, TypeError, StopIteration):
            return _unresolved_arg("Fn::Cidr", arg, "[ipBlock, count, cidrBits]")

    def _get_azs(self, arg: Any) -> Any:
        region = self.resolve(arg)
        if isinstance(region, Unresolved):
            return region
        region = region or self.region
        return [f"{region}{zone}" for zone in "abc"]

    def _length(self, arg: Any) -> Any:
        value = self.resolve(arg)
        return (
            len(value)
            if isinstance(value, list)
            else _unresolved_arg("Fn::Length", value, "a list")
        )

    def _to_json_string(self, arg: Any) -> Any:
        value = self.resolve(arg)
        if _contains_unresolved(value):
            return Unresolved(
                "<unresolved Fn::ToJsonString>", "its argument is not fully resolvable"
            )
        return json.dumps(value, separators=(",", ":"))

    # -- conditions -----------------------------------------------------------------------------

    def condition(self, name: object) -> bool | Unresolved:
        """Truth of the named condition (Unresolved when it depends on something unknown)."""
        if not isinstance(name, str) or name not in self.conditions:
            return Unresolved(f"<unresolved Condition {name}>", f"no condition named {name!r}")
        if name in self._condition_cache:
            return self._condition_cache[name]
        key = f"Conditions.{name}"
        if key in self._active:
            return Unresolved(
                f"<unresolved Condition {name}>", f"condition {name!r} refers to itself"
            )
        self._active.add(key)
        try:
            value = _as_bool(self.resolve(self.conditions[name]))
        finally:
            self._active.discard(key)
        self._condition_cache[name] = value
        return value

    def _if(self, arg: Any) -> Any:
        if not (isinstance(arg, list) and len(arg) == 3):
            return _unresolved_arg("Fn::If", arg, "[condition, value if true, value if false]")
        truth = self.condition(arg[0])
        if isinstance(truth, Unresolved):
            return truth
        return self.resolve(arg[1] if truth else arg[2])

    def _equals(self, arg: Any) -> Any:
        arg = self.resolve(arg)
        if not (isinstance(arg, list) and len(arg) == 2):
            return _unresolved_arg("Fn::Equals", arg, "[value, value]")
        left, right = arg
        for part in (left, right):
            if isinstance(part, Unresolved):
                return part
        if isinstance(left, (list, dict)) or isinstance(right, (list, dict)):
            return left == right
        return _cfn_str(left) == _cfn_str(right)

    def _truths(self, arg: Any, function: str) -> list[bool | Unresolved] | Unresolved:
        if not isinstance(arg, list) or not arg:
            return _unresolved_arg(function, arg, "a list of conditions")
        return [_as_bool(self.resolve(item)) for item in arg]

    def _not(self, arg: Any) -> Any:
        truths = self._truths(arg, "Fn::Not")
        if isinstance(truths, Unresolved) or len(truths) != 1:
            return _unresolved_arg("Fn::Not", arg, "[condition]")
        return truths[0] if isinstance(truths[0], Unresolved) else not truths[0]

    def _and(self, arg: Any) -> Any:
        truths = self._truths(arg, "Fn::And")
        if isinstance(truths, Unresolved):
            return truths
        if False in truths:  # one false operand decides, whatever the unknown ones are
            return False
        return next((t for t in truths if isinstance(t, Unresolved)), True)

    def _or(self, arg: Any) -> Any:
        truths = self._truths(arg, "Fn::Or")
        if isinstance(truths, Unresolved):
            return truths
        if True in truths:
            return True
        return next((t for t in truths if isinstance(t, Unresolved)), False)


def _as_bool(value: object) -> bool | Unresolved:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, Unresolved):
        return value
    return Unresolved(f"<unresolved condition {value!r}>", f"{value!r} is not a condition")


def _unresolved_arg(function: str, arg: object, expected: str) -> Unresolved:
    if isinstance(arg, Unresolved):
        return arg
    return Unresolved(f"<unresolved {function}>", f"{function} needs {expected}, got {arg!r}")


def _contains_unresolved(value: object) -> bool:
    if isinstance(value, Unresolved):
        return True
    if isinstance(value, dict):
        return any(_contains_unresolved(v) for v in value.values())
    if isinstance(value, list):
        return any(_contains_unresolved(v) for v in value)
    return False


def _section(template: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = template.get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(name, f"must be a mapping, got {type(section).__name__}")
    return section


def _parameter_values(specs: Mapping[str, Any], overrides: Mapping[str, str]) -> dict[str, Any]:
    """Every parameter's value (a string, a list for list types, or Unresolved), checked."""
    unknown = sorted(set(overrides) - set(specs))
    if unknown:
        known = ", ".join(specs) or "none"
        raise ConfigError(
            f"Parameters.{unknown[0]}",
            f"is not a parameter of the template (its parameters: {known})",
        )
    values: dict[str, Any] = {}
    for name, spec in specs.items():
        spec = spec if isinstance(spec, dict) else {}
        kind = str(spec.get("Type", "String"))
        if name in overrides:
            raw: Any = overrides[name]
        elif "Default" in spec:
            raw = spec["Default"]
        else:
            values[name] = Unresolved(
                f"<unresolved Ref {name}>",
                f"parameter {name!r} has no Default; pass --parameter-overrides {name}=VALUE",
            )
            continue
        if kind.startswith("AWS::SSM::Parameter::Value") and name not in overrides:
            values[name] = Unresolved(
                f"<unresolved Ref {name}>",
                f"parameter {name!r} is read from SSM; pass --parameter-overrides {name}=VALUE",
            )
            continue
        if kind == "CommaDelimitedList" or kind.startswith("List<"):
            items = raw if isinstance(raw, list) else _cfn_str(raw).split(",")
            values[name] = [_cfn_str(item).strip() for item in items]
            continue
        value = _cfn_str(raw)
        _check_parameter(name, spec, kind, value)
        values[name] = value
    return values


def _check_parameter(name: str, spec: Mapping[str, Any], kind: str, value: str) -> None:
    field = f"Parameters.{name}"
    allowed = spec.get("AllowedValues")
    if isinstance(allowed, list) and value not in [_cfn_str(v) for v in allowed]:
        choices = ", ".join(repr(_cfn_str(v)) for v in allowed)
        raise ConfigError(field, f"must be one of {choices}, got {value!r}")
    pattern = spec.get("AllowedPattern")
    if isinstance(pattern, str) and not re.fullmatch(pattern, value):
        raise ConfigError(field, f"must match {pattern!r}, got {value!r}")
    if kind == "Number":
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(field, f"must be a number, got {value!r}") from None
        low, high = spec.get("MinValue"), spec.get("MaxValue")
        if (low is not None and number < float(low)) or (high is not None and number > float(high)):
            raise ConfigError(field, f"must be from {low} to {high}, got {value}")


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
