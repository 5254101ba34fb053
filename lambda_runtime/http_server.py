"""The standard-library HTTP/1.1 server of the Invoke API: socket I/O only, a thread per connection.

`InvokeApiServer` binds a local port; its request handler reads one request (body limits, chunked
encoding), hands it to `InvokeApi` (in `http_routes`) and writes the answer back.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lambda_runtime import quotas
from lambda_runtime.errors import (
    InvalidRequestContentException,
    RequestTooLargeException,
    ServiceError,
)
from lambda_runtime.http_routes import (
    HttpResponse,
    InvokeApi,
    InvokeBackend,
    _clip,
    error_response,
)

# The HTTP layer logs under one name, whichever module the record comes from (filters and tests
# select lambda_runtime.http_api).
logger = logging.getLogger("lambda_runtime.http_api")

# Transport guard only: the backend enforces Lambda's payload limits. Bodies past this many bytes
# are drained without being kept, so a runaway client cannot exhaust the server's memory.
BODY_READ_LIMIT_BYTES = 4 * quotas.SYNC_REQUEST_MAX_BYTES
# An idle keep-alive connection is closed after this long, so abandoned clients do not pin threads.
KEEPALIVE_IDLE_S = 300.0


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
