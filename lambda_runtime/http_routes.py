"""Routes of the boto3-compatible Invoke HTTP API (spec §5, §7): parses requests, formats responses.

`InvokeApi` turns one parsed HTTP request into one `HttpResponse`, holds no state and knows nothing
about sockets (the server around it is in `http_server`). Everything that decides what an
invocation does lives behind the `InvokeBackend` protocol.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from lambda_runtime import quotas
from lambda_runtime.config import FunctionConfig
from lambda_runtime.errors import (
    InvalidParameterValueException,
    ResourceNotFoundException,
    ServiceError,
)
from lambda_runtime.result import InvokeResult

# The HTTP layer logs under one name, whichever module the record comes from (filters and tests
# select lambda_runtime.http_api).
logger = logging.getLogger("lambda_runtime.http_api")

INVOCATION_TYPES = ("RequestResponse", "Event", "DryRun")
LOG_TYPES = ("None", "Tail")
FUNCTION_REF_MAX_CHARS = 256
QUALIFIER_MAX_CHARS = 128
LIST_PAGE_DEFAULT = 50  # ListFunctions returns at most 50 functions per call
LIST_PAGE_MAX = 10_000

# botocore's NamespacedFunctionName pattern (service-2.json), with the parts named.
_FUNCTION_REF = re.compile(
    r"(?:arn:(?:aws[a-zA-Z-]*)?:lambda:)?"
    r"(?:(?:eusc-)?[a-z]{2}(?:-gov|-iso[a-z]?)?-[a-z]+-\d:)?"
    r"(?:\d{12}:)?"
    r"(?:function:)?"
    r"(?P<name>[a-zA-Z0-9\-_.]+)"
    r"(?::(?P<qualifier>\$LATEST(?:\.PUBLISHED)?|[a-zA-Z0-9\-_]+))?"
)
_QUALIFIER = re.compile(r"[a-zA-Z0-9$_\-]{1,128}")


class InvokeBackend(Protocol):
    """What the HTTP layer needs from the local Lambda service."""

    def invoke_raw(
        self,
        function_name: str,
        payload: bytes,
        *,
        invocation_type: str = "RequestResponse",
        log_type: str = "None",
        client_context: str | None = None,
        qualifier: str | None = None,
    ) -> InvokeResult:
        """Run (or queue) one invocation; raise ServiceError subclasses for API errors."""
        ...

    def function_configs(self) -> list[FunctionConfig]:
        """Every registered function."""
        ...

    def function_arn(self, name: str) -> str:
        """The unqualified ARN of a function."""
        ...


class UnknownOperationException(ServiceError):
    """No Lambda operation matches the request's method and path."""

    code = "UnknownOperationException"
    http_status = 404
    error_kind = "User"


@dataclass(frozen=True)
class HttpResponse:
    """Status, headers and exact body bytes of one response."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


def parse_function_name(raw: str, qualifier: str | None) -> tuple[str, str | None]:
    """Split a FunctionName (name, name:qualifier, partial or full ARN) into name and qualifier."""
    if qualifier is not None and not _QUALIFIER.fullmatch(qualifier):
        raise InvalidParameterValueException(
            f"Qualifier: must be 1 to {QUALIFIER_MAX_CHARS} characters of letters, digits, "
            f"'$', '_' or '-', got {_clip(qualifier)!r}"
        )
    match = _FUNCTION_REF.fullmatch(raw)
    if not 1 <= len(raw) <= FUNCTION_REF_MAX_CHARS or match is None:
        raise InvalidParameterValueException(
            "FunctionName: must be a function name, 'name:qualifier', a partial ARN "
            "'123456789012:function:name' or a full ARN "
            "'arn:aws:lambda:<region>:123456789012:function:name[:qualifier]', "
            f"1 to {FUNCTION_REF_MAX_CHARS} characters; got {_clip(raw)!r}"
        )
    derived = match.group("qualifier")
    if derived is not None and qualifier is not None and derived != qualifier:
        # Lambda's own wording for `name:1` combined with `?Qualifier=2`.
        raise InvalidParameterValueException(
            "The derived qualifier from the function name does not match the specified qualifier."
        )
    return match.group("name"), derived if derived is not None else qualifier


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def error_response(error: ServiceError, request_id: str) -> HttpResponse:
    """The HTTP form of an API error: status, `x-amzn-ErrorType` (read by botocore), JSON body."""
    body = error.to_body()
    headers = [
        ("x-amzn-RequestId", request_id),
        ("x-amzn-ErrorType", error.code),
        ("Content-Type", "application/json"),
    ]
    # The model puts TooManyRequestsException.retryAfterSeconds in the Retry-After header.
    retry_after = body.pop("retryAfterSeconds", None)
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    return HttpResponse(error.http_status, _json_bytes(body), tuple(headers))


def _region_account(function_arn: str) -> tuple[str, str]:
    parts = function_arn.split(":")
    if len(parts) >= 5 and parts[0] == "arn":
        return parts[3], parts[4]
    return quotas.REGION_DEFAULT, quotas.ACCOUNT_ID_DEFAULT


def function_configuration(config: FunctionConfig, function_arn: str) -> dict[str, Any]:
    """A FunctionConfiguration shape (GetFunctionConfiguration, ListFunctions) for one function."""
    out: dict[str, Any] = {
        "FunctionName": config.name,
        "FunctionArn": function_arn,
        "Runtime": config.runtime_id,
        "Handler": config.handler,
        "MemorySize": config.memory_mb,
        "Timeout": config.timeout_s,
        "EphemeralStorage": {"Size": config.ephemeral_mb},
        "Architectures": [config.architecture],
        "Version": quotas.FUNCTION_VERSION,
        "PackageType": "Zip",
        "State": "Active",
        "LastUpdateStatus": "Successful",
    }
    # Like Lambda, Environment and FileSystemConfigs appear only when the function has them.
    if config.environment:
        out["Environment"] = {"Variables": dict(config.environment)}
    if config.efs:
        region, account = _region_account(function_arn)
        out["FileSystemConfigs"] = [
            {
                # A stable stand-in access-point ARN: the local "file system" is a host directory.
                "Arn": f"arn:aws:elasticfilesystem:{region}:{account}:access-point/fsap-"
                + hashlib.sha256(str(host).encode()).hexdigest()[:17],
                "LocalMountPath": mount,
            }
            for mount, host in config.efs.items()
        ]
    return out


_Handler = Callable[["InvokeApi", "_Request"], HttpResponse]


@dataclass(frozen=True)
class _Request:
    method: str
    path_args: tuple[str, ...]
    query: Mapping[str, str]
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    request_id: str


class InvokeApi:
    """Routes one parsed request to the backend and formats the answer; holds no state."""

    _ROUTES: ClassVar[list[tuple[str, re.Pattern[str], str]]] = [
        ("POST", re.compile(r"/2015-03-31/functions/([^/]+)/invocations/?"), "_invoke"),
        ("POST", re.compile(r"/2014-11-13/functions/([^/]+)/invoke-async/?"), "_invoke_async"),
        ("GET", re.compile(r"/2015-03-31/functions/?"), "_list_functions"),
        ("GET", re.compile(r"/2015-03-31/functions/([^/]+)/?"), "_get_function"),
        ("GET", re.compile(r"/2015-03-31/functions/([^/]+)/configuration/?"), "_get_configuration"),
    ]

    def __init__(self, backend: InvokeBackend) -> None:
        self.backend = backend

    def handle(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> HttpResponse:
        """Answer one request; `target` is the raw request path with its query string."""
        request_id = str(uuid.uuid4())
        try:
            return self._route(method, target, headers, body, request_id)
        except ServiceError as exc:
            logger.debug("%s %s -> %s: %s", method, target, exc.code, exc.message)
            return error_response(exc, request_id)
        except Exception as exc:
            # A bug below us must still produce an answer botocore understands, never a dropped
            # connection; the traceback goes to the log.
            logger.exception("internal error answering %s %s", method, target)
            error = ServiceError(
                f"Internal error in the local Lambda service: {type(exc).__name__}: {exc}"
            )
            return error_response(error, request_id)

    def _route(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes, request_id: str
    ) -> HttpResponse:
        split = urlsplit(target)
        for route_method, pattern, handler_name in self._ROUTES:
            match = pattern.fullmatch(split.path)
            if match is None or route_method != method:
                continue
            # Split first, decode second: an encoded '/' stays inside the name and is rejected.
            path_args = tuple(unquote(arg) for arg in match.groups())
            query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
            request = _Request(method, path_args, query, headers, body, request_id)
            handler: _Handler = getattr(type(self), handler_name)
            return handler(self, request)
        raise UnknownOperationException(f"Unknown operation: {method} {_clip(split.path)}")

    @staticmethod
    def _qualifier(request: _Request) -> str | None:
        # An empty ?Qualifier= means "none" (the model's pattern allows the empty string).
        return request.query.get("Qualifier") or None

    @staticmethod
    def _choice(headers: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
        value = headers.get(name.lower(), allowed[0])
        if value not in allowed:
            raise InvalidParameterValueException(
                f"{name}: must be one of {', '.join(allowed)} (default {allowed[0]}), "
                f"got {_clip(value)!r}"
            )
        return value

    def _invoke(self, request: _Request) -> HttpResponse:
        name, qualifier = parse_function_name(request.path_args[0], self._qualifier(request))
        invocation_type = self._choice(request.headers, "X-Amz-Invocation-Type", INVOCATION_TYPES)
        log_type = self._choice(request.headers, "X-Amz-Log-Type", LOG_TYPES)
        result = self.backend.invoke_raw(
            name,
            request.body,
            invocation_type=invocation_type,
            log_type=log_type,
            client_context=request.headers.get("x-amz-client-context"),
            qualifier=qualifier,
        )
        headers = [("x-amzn-RequestId", result.request_id), ("Content-Type", "application/json")]
        if invocation_type == "RequestResponse" and result.executed_version is not None:
            headers.append(("X-Amz-Executed-Version", result.executed_version))
        if result.function_error is not None:
            headers.append(("X-Amz-Function-Error", result.function_error))
        if result.log_result is not None:
            headers.append(("X-Amz-Log-Result", result.log_result))
        return HttpResponse(result.status_code, result.payload, tuple(headers))

    def _invoke_async(self, request: _Request) -> HttpResponse:
        name, qualifier = parse_function_name(request.path_args[0], None)
        result = self.backend.invoke_raw(
            name, request.body, invocation_type="Event", qualifier=qualifier
        )
        headers = (("x-amzn-RequestId", result.request_id), ("Content-Type", "application/json"))
        return HttpResponse(202, _json_bytes({"Status": 202}), headers)

    def _ok(self, request: _Request, value: Any) -> HttpResponse:
        headers = (("x-amzn-RequestId", request.request_id), ("Content-Type", "application/json"))
        return HttpResponse(200, _json_bytes(value), headers)

    def _find(self, request: _Request) -> FunctionConfig:
        name, qualifier = parse_function_name(request.path_args[0], self._qualifier(request))
        for config in self.backend.function_configs():
            if config.name == name and qualifier in (None, quotas.FUNCTION_VERSION):
                return config
        arn = self.backend.function_arn(name)
        suffix = f":{qualifier}" if qualifier is not None else ""
        raise ResourceNotFoundException(f"Function not found: {arn}{suffix}")

    def _get_function(self, request: _Request) -> HttpResponse:
        config = self._find(request)
        out: dict[str, Any] = {
            "Configuration": function_configuration(config, self.backend.function_arn(config.name)),
            "Code": {"RepositoryType": "S3", "Location": ""},
        }
        if config.reserved_concurrency is not None:
            out["Concurrency"] = {"ReservedConcurrentExecutions": config.reserved_concurrency}
        return self._ok(request, out)

    def _get_configuration(self, request: _Request) -> HttpResponse:
        config = self._find(request)
        arn = self.backend.function_arn(config.name)
        return self._ok(request, function_configuration(config, arn))

    def _list_functions(self, request: _Request) -> HttpResponse:
        page = _int_param(request.query, "MaxItems", LIST_PAGE_DEFAULT, 1, LIST_PAGE_MAX)
        configs = self.backend.function_configs()
        start = _int_param(request.query, "Marker", 0, 0, len(configs))
        chosen = configs[start : start + page]
        out: dict[str, Any] = {
            "Functions": [
                function_configuration(c, self.backend.function_arn(c.name)) for c in chosen
            ]
        }
        if start + page < len(configs):
            out["NextMarker"] = str(start + page)
        return self._ok(request, out)


def _int_param(query: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        what = "a marker returned as NextMarker" if name == "Marker" else "a whole number"
        raise InvalidParameterValueException(
            f"{name}: must be {what} from {lo} to {hi}, got {_clip(raw)!r}"
        )
    return int(raw)
