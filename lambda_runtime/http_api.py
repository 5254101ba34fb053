"""The boto3-compatible Invoke HTTP API (spec §5, §7): parses requests, formats responses, no state.

`InvokeApi` turns one parsed HTTP request into one `HttpResponse` and knows nothing about sockets;
`InvokeApiServer` is the standard-library HTTP/1.1 server around it. Everything that decides what an
invocation does lives behind the `InvokeBackend` protocol.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import socket
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from lambda_runtime import quotas
from lambda_runtime.config import FunctionConfig
from lambda_runtime.errors import (
    InvalidParameterValueException,
    InvalidRequestContentException,
    RequestTooLargeException,
    ResourceNotFoundException,
    ServiceError,
)
from lambda_runtime.result import InvokeResult

logger = logging.getLogger(__name__)

INVOCATION_TYPES = ("RequestResponse", "Event", "DryRun")
LOG_TYPES = ("None", "Tail")
FUNCTION_REF_MAX_CHARS = 256
QUALIFIER_MAX_CHARS = 128
LIST_PAGE_DEFAULT = 50  # ListFunctions returns at most 50 functions per call
LIST_PAGE_MAX = 10_000
# Transport guard only: the backend enforces Lambda's payload limits. Bodies past this many bytes
# are drained without being kept, so a runaway client cannot exhaust the server's memory.
BODY_READ_LIMIT_BYTES = 4 * quotas.SYNC_REQUEST_MAX_BYTES
# An idle keep-alive connection is closed after this long, so abandoned clients do not pin threads.
KEEPALIVE_IDLE_S = 300.0

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


class _BodyError(Exception):
    """The request body could not be read; the connection is closed after answering."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(error.message)
        self.error = error


class _RequestHandler(BaseHTTPRequestHandler):
    """Socket I/O only: read one request, hand it to InvokeApi, write the answer."""

    protocol_version = "HTTP/1.1"  # keep-alive, so botocore's connection pool reuses sockets
    server_version = "lambda-runtime"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body are separate writes
    timeout = KEEPALIVE_IDLE_S
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _serve(self) -> None:
        request_id = str(uuid.uuid4())
        try:
            body = self._read_body()
        except _BodyError as exc:
            self.close_connection = True
            self._write(error_response(exc.error, request_id))
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        self._write(self.server.api.handle(self.command, self.path, headers, body))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _serve

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        raw = self.headers.get("Content-Length", "0").strip() or "0"
        if not raw.isdigit():
            raise _BodyError(
                InvalidRequestContentException(
                    f"Content-Length: must be a whole number of bytes, got {_clip(raw)!r}"
                )
            )
        length = int(raw)
        if length > BODY_READ_LIMIT_BYTES:
            self._drain(length)
            raise _BodyError(_too_large())
        return self._read_exact(length)

    def _read_exact(self, length: int) -> bytes:
        data = self.rfile.read(length)
        if len(data) != length:
            raise _BodyError(
                InvalidRequestContentException(
                    f"Request body ended after {len(data)} of {length} bytes"
                )
            )
        return data

    def _drain(self, length: int) -> None:
        # Read and drop, so the client gets the 413 rather than a reset while still sending.
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                return
            length -= len(chunk)

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024).split(b";", 1)[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                raise _BodyError(
                    InvalidRequestContentException("Malformed chunked request body")
                ) from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return b"".join(parts)
            total += size
            if total > BODY_READ_LIMIT_BYTES:
                raise _BodyError(_too_large())
            parts.append(self._read_exact(size))
            self.rfile.readline(3)  # CRLF after each chunk

    def _write(self, response: HttpResponse) -> None:
        try:
            self.send_response(response.status)
            for name, value in response.headers:
                self.send_header(name, value)
            # 204 carries neither a body nor a Content-Length (RFC 9110 §8.6).
            if response.status != 204:
                self.send_header("Content-Length", str(len(response.body)))
            if self.close_connection or self.server.stopping:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if response.status != 204 and self.command != "HEAD":
                self.wfile.write(response.body)
        except OSError as exc:  # the client went away mid-answer
            logger.debug("could not write response: %s", exc)
            self.close_connection = True


def _too_large() -> RequestTooLargeException:
    return RequestTooLargeException(
        f"Request must be smaller than {quotas.SYNC_REQUEST_MAX_BYTES} bytes "
        "for the InvokeFunction operation"
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a 900 s sync invoke must not hold up interpreter exit
    block_on_close = False

    def __init__(self, address: tuple[str, int], api: InvokeApi) -> None:
        self.api = api
        self.stopping = False
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _RequestHandler)

    def track(self, conn: socket.socket) -> None:
        with self._open_lock:
            self._open.add(conn)
            if self.stopping:
                _shut_read(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._open_lock:
            self._open.discard(conn)

    def close_connections(self) -> None:
        """End every keep-alive connection; an answer still being computed is still written."""
        with self._open_lock:
            self.stopping = True
            for conn in self._open:
                _shut_read(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a client hanging up is routine here.
        logger.debug("error serving %s", client_address, exc_info=True)


def _shut_read(conn: socket.socket) -> None:
    # SHUT_RD wakes a handler blocked waiting for the next request (it reads EOF and closes)
    # while leaving the write side open for a handler that is still answering.
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RD)


class InvokeApiServer:
    """The Invoke HTTP API on a local port, one daemon thread per connection."""

    def __init__(self, backend: InvokeBackend, host: str = "127.0.0.1", port: int = 0) -> None:
        self.api = InvokeApi(backend)
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        """`http://host:port` while running; pass it to boto3 as endpoint_url."""
        with self._lock:
            if self._server is None:
                raise RuntimeError("InvokeApiServer is not running; call start() first")
            host, port = self._server.server_address[:2]
            return f"http://{host!s}:{port}"

    def start(self) -> str:
        """Bind and serve in the background; returns the endpoint URL (idempotent)."""
        with self._lock:
            if self._server is None:
                server = _Server((self.host, self.port), self.api)
                thread = threading.Thread(
                    target=server.serve_forever,
                    kwargs={"poll_interval": 0.05},
                    name=f"lambda-http-api:{server.server_address[1]}",
                    daemon=True,
                )
                thread.start()
                self._server, self._thread = server, thread
                logger.debug("Invoke API listening on %s:%s", *server.server_address[:2])
        return self.endpoint

    def stop(self) -> None:
        """Close the port and idle connections; safe to call more than once."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        thread.join()

    def __enter__(self) -> InvokeApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
