"""CloudFormation intrinsic functions, evaluated locally against one template.

The YAML loader that reads the short-form tags (``!Ref``, ``!Sub``, ``!GetAtt``, ...) as their
long forms (``parse_template``), and ``Resolver``: ``Ref`` (parameters, pseudo parameters, the
physical ids of resources), ``Fn::GetAtt``, ``Fn::Sub``, the list and string functions, mappings
(``Fn::FindInMap``) and conditions. What cannot be known locally (an import from another stack,
a parameter without a value) becomes an ``Unresolved`` placeholder rather than an error.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from lambda_runtime import quotas
from lambda_runtime.errors import ConfigError

SERVERLESS_FUNCTION = "AWS::Serverless::Function"
LAMBDA_FUNCTION = "AWS::Lambda::Function"
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
