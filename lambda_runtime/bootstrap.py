"""The runtime inside an execution environment: load the handler once, then run invocations.

This module plays the part of AWS's runtime interface client (awslambdaric): it runs in the
environment's own process, talks to the service over a pipe instead of the Runtime API, and
builds every error payload in one place (`make_error`). It is preloaded into the fork server,
so keep its imports light.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import pickle
import resource
import select
import socket
import struct
import sys
import time

from lambda_runtime.context import ClockPage, LambdaContext

TYPE_CHECKING = False  # no `typing` import: this module is on every cold start's path
if TYPE_CHECKING:
    from typing import Any

NOFILE_LIMIT = 1024  # quotas.NOFILE_LIMIT, repeated to keep this module's imports minimal
_HEADER = struct.Struct("<I")
# How long a reader looks for a message before it sleeps (see Channel._fill). The service waits
# for answers that take tens of microseconds; the runtime waits for the next invocation, which a
# busy caller sends within a few hundred microseconds of the last answer.
SERVICE_SPIN_S = 0.0002
RUNTIME_SPIN_S = 0.001


class Channel:
    """Length-prefixed pickle messages over a socket: the service's end and the runtime's end."""

    def __init__(self, sock: socket.socket, spin_s: float = SERVICE_SPIN_S) -> None:
        self.sock = sock
        self.spin_s = spin_s
        self._buf = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.sendall(_HEADER.pack(len(data)) + data)

    def _fill(self, n: int, timeout_s: float | None) -> bool:
        spun = False
        while len(self._buf) < n:
            if not spun:
                # Waking a sleeping process costs ~80 us on a VM (idle CPU states, cross-CPU
                # wake-ups) against ~5 us for a short spin: answers to warm invocations often
                # arrive within it, so look without sleeping first.
                spun = True
                end = time.perf_counter() + self.spin_s
                while True:
                    try:
                        chunk = self.sock.recv(max(65536, n - len(self._buf)), socket.MSG_DONTWAIT)
                        break
                    except BlockingIOError:
                        if time.perf_counter() > end:
                            chunk = None
                            break
                if chunk is not None:
                    if not chunk:
                        raise EOFError("channel closed")
                    self._buf += chunk
                    continue
            if timeout_s is not None:
                ready, _, _ = select.select([self.sock], [], [], timeout_s)
                if not ready:
                    return False
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise EOFError("channel closed")
            self._buf += chunk
        return True

    def recv(self, timeout_s: float | None = None) -> Any:
        """The next message; None when none arrived within timeout_s; EOFError when closed."""
        if not self._fill(_HEADER.size, timeout_s):
            return None
        (size,) = _HEADER.unpack_from(self._buf)
        # Once a header arrived the body follows at once; wait for it without a deadline.
        self._fill(_HEADER.size + size, None)
        data = bytes(self._buf[_HEADER.size : _HEADER.size + size])
        del self._buf[: _HEADER.size + size]
        return pickle.loads(data)

    def close(self) -> None:
        self.sock.close()


UNHANDLED_WARNING = (
    "LAMBDA_WARNING: Unhandled exception. The most likely cause is an issue in the function code. "
    "However, in rare cases, a Lambda runtime update can cause unexpected function behavior. "
    "For functions using managed runtimes, runtime updates can be triggered by a function change, "
    "or can be applied automatically. To determine if the runtime has been updated, check the "
    "runtime version in the INIT_START log entry. If this error correlates with a change in the "
    "runtime version, you may be able to mitigate this error by temporarily rolling back to the "
    "previous runtime version. For more information, see "
    "https://docs.aws.amazon.com/lambda/latest/dg/runtimes-update.html"
)


class BootSpec:
    """What the environment process needs before user code runs; sent once at start."""

    __slots__ = ("clock_page", "env_id", "environ", "handler", "sandbox", "task_root", "timeout_ms")

    def __init__(
        self,
        env_id: str,
        handler: str,
        task_root: str,
        environ: dict[str, str],
        clock_page: str,
        sandbox: Any,  # lambda_runtime.namespace.SandboxSpec, or None for no sandbox
        timeout_ms: int,
    ) -> None:
        self.env_id = env_id
        self.handler = handler
        self.task_root = task_root
        self.environ = environ
        self.clock_page = clock_page
        self.sandbox = sandbox
        self.timeout_ms = timeout_ms

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class FaultError(Exception):
    """A runtime fault with its AWS errorType (Runtime.ImportModuleError, ...)."""

    def __init__(self, error_type: str, message: str, trace: list[str] | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.trace = trace or []


def make_error(
    message: str, error_type: str, stack_trace: list[str] | None, request_id: str | None = None
) -> dict[str, Any]:
    """Lambda's four-key error payload, keys in AWS's order."""
    return {
        "errorMessage": message or "",
        "errorType": error_type or "",
        "requestId": request_id if request_id is not None else "",
        "stackTrace": stack_trace or [],
    }


def _user_frames(tb: Any) -> list[str]:
    """Format a traceback without this module's own frames (AWS drops bootstrap.py frames)."""
    import traceback

    frames = list(traceback.extract_tb(tb))
    me = __file__
    for i, frame in enumerate(frames):
        if frame.filename != me:
            frames = frames[i:]
            break
    return traceback.format_list(frames)


def _error_log_lines(error: dict[str, Any]) -> str:
    """The unhandled-error log record: `[ERROR] Type: msg` then the traceback, NBSP-indented."""
    head = "[ERROR]"
    if error.get("errorType"):
        head += " " + error["errorType"]
    if error.get("errorMessage"):
        head += (":" if error.get("errorType") else "") + " " + error["errorMessage"]
    lines = [head]
    stack = error.get("stackTrace")
    if stack is not None:
        lines.append("Traceback (most recent call last):")
        for element in stack:
            for line in element.splitlines() or [""]:
                stripped = line.lstrip(" ")
                lines.append("\u00a0" * (len(line) - len(stripped)) + stripped)
    return "\n".join(lines) + "\n"


def load_handler(handler: str) -> Any:
    """Import `module.function` as the AWS runtime does, raising FaultError with its errorType."""
    try:
        modname, fname = handler.rsplit(".", 1)
    except ValueError as exc:
        raise FaultError(
            "Runtime.MalformedHandlerName", f"Bad handler '{handler}': {exc}"
        ) from None
    if modname.split(".")[0] in sys.builtin_module_names:
        raise FaultError(
            "Runtime.BuiltInModuleConflict",
            f"Cannot use built-in module {modname} as a handler module",
        )
    try:
        module = importlib.import_module(modname.replace("/", "."))
    except ImportError as exc:
        raise FaultError(
            "Runtime.ImportModuleError", f"Unable to import module '{modname}': {exc}"
        ) from None
    except SyntaxError as exc:
        trace = [f'  File "{exc.filename}" Line {exc.lineno}\n    {exc.text}']
        raise FaultError(
            "Runtime.UserCodeSyntaxError", f"Syntax error in module '{modname}': {exc}", trace
        ) from None
    try:
        return getattr(module, fname)
    except AttributeError:
        raise FaultError(
            "Runtime.HandlerNotFound", f"Handler '{fname}' missing on module '{modname}'"
        ) from None


class _LambdaJSONEncoder(json.JSONEncoder):
    def default(self, o: Any) -> Any:
        decimal = sys.modules.get("decimal")  # a Decimal exists only if its module was imported
        if decimal is not None and isinstance(o, decimal.Decimal):
            return float(o) if o != o.to_integral_value() else int(o)
        return super().default(o)


def marshal_response(value: Any) -> tuple[bytes, str]:
    """Encode a handler's return value as the runtime does (bytes pass through untouched)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), "application/unknown"
    try:
        return json.dumps(value, cls=_LambdaJSONEncoder).encode(), "application/json"
    except Exception as exc:
        raise FaultError("Runtime.MarshalError", f"Unable to marshal response: {exc}") from None


class _RequestIdFilter(logging.Filter):
    request_id = ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.aws_request_id = _RequestIdFilter.request_id
        return True


def _setup_stdio() -> None:
    # fds 1 and 2 are the log stream (opened O_APPEND by the service).
    # Lambda's stdout and stderr are unbuffered: a print is in the log before the next line runs.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)


def _setup_logging() -> None:
    logging.Formatter.converter = time.gmtime
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler.terminator = ""
    handler._lambda_sink = True  # type: ignore[attr-defined]
    handler.setFormatter(
        logging.Formatter(
            "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s\n",
            "%Y-%m-%dT%H:%M:%S",
        )
    )
    handler.addFilter(_RequestIdFilter())
    root.addHandler(handler)
    level = os.environ.get("AWS_LAMBDA_LOG_LEVEL")
    if level and level.upper() in logging.getLevelNamesMapping():
        root.setLevel(level.upper())


_CLOCK: Any = None


# Paths a sandbox mounts over: the host's /tmp becomes the environment's own /tmp, and /mnt
# holds only the EFS mounts.
_COVERED = ("/tmp/", "/mnt/")


def _pin_covered_paths(paths: list[str]) -> dict[str, int]:
    """Open every directory under a path the sandbox will cover, before it does."""
    pinned: dict[str, int] = {}
    for path in paths:
        if path and (path + "/").startswith(_COVERED) and path not in pinned:
            with contextlib.suppress(OSError):
                pinned[path] = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return pinned


def _reach_through(pinned: dict[str, int], path: str) -> str:
    """`path` if it is still visible, else the magic link of the descriptor opened before.

    /proc/self/fd/N names the directory itself, whatever is mounted over its old path since: a
    virtual environment or handler code under the host's /tmp stays importable.
    """
    fd = pinned.get(path)
    if fd is None or os.path.isdir(path):
        return path
    return f"/proc/self/fd/{fd}"


def _prepare_process(spec: BootSpec) -> None:
    """Everything before the handler module is imported: sandbox, stdio, environment, cwd."""
    extra_env: dict[str, str] = {}
    # Before the sandbox may mount over /tmp: the task root, the import path and the clock page
    # can live there.
    os.chdir(spec.task_root)
    pinned = _pin_covered_paths([spec.task_root, *sys.path])
    global _CLOCK
    _CLOCK = ClockPage(spec.clock_page)
    if spec.sandbox is not None:
        from lambda_runtime import namespace

        extra_env = namespace.enter(spec.sandbox)
    _setup_stdio()
    os.environ.clear()
    os.environ.update(spec.environ)
    os.environ.update(extra_env)
    sys.path[:] = [_reach_through(pinned, p) for p in sys.path]
    sys.path.insert(0, _reach_through(pinned, spec.task_root))
    used = {int(p.rsplit("/", 1)[1]) for p in sys.path if p.startswith("/proc/self/fd/")}
    for fd in set(pinned.values()) - used:
        os.close(fd)
    with contextlib.suppress(ValueError, OSError):  # Lambda's 1,024 open files
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE_LIMIT, NOFILE_LIMIT))


def main(conn: Channel, spec: BootSpec) -> None:
    """Run the runtime: sandbox, init, then invocations until told to stop."""
    try:
        _prepare_process(spec)
    except Exception as exc:
        conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        os._exit(70)
    conn.send(("ready", os.getpid()))
    if conn.recv()[0] != "init":
        os._exit(0)
    _setup_logging()
    try:
        handler = load_handler(spec.handler)
    except Exception as exc:
        if isinstance(exc, FaultError):
            error = make_error(exc.message, exc.error_type, exc.trace)
        else:
            error = make_error(str(exc), type(exc).__name__, _user_frames(exc.__traceback__))
        logging.warning(UNHANDLED_WARNING)
        sys.stdout.write(_error_log_lines(error))
        conn.send(("init_error", error))
        sys.exit(1)
    conn.send(("init_ok", None))
    clock = _CLOCK
    timeout_ms = spec.timeout_ms
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        if message[0] != "invoke":
            break
        _, request_id, payload, deadline_ms, arn, client_context, trace_id = message
        conn.send(
            _invoke(
                handler,
                request_id,
                payload,
                deadline_ms,
                arn,
                client_context,
                trace_id,
                lambda: timeout_ms - int(clock.elapsed_s() * 1000),
            )
        )


def _invoke(
    handler: Any,
    request_id: str,
    payload: bytes,
    deadline_ms: int,
    arn: str,
    client_context: dict[str, Any] | None,
    trace_id: str,
    remaining: Any,
) -> tuple[str, bytes, str]:
    _RequestIdFilter.request_id = request_id
    os.environ["_X_AMZN_TRACE_ID"] = trace_id
    try:
        context = LambdaContext(
            request_id, client_context, None, deadline_ms, arn, None, remaining_ms=remaining
        )
        event = json.loads(payload) if payload else {}
        body, content_type = marshal_response(handler(event, context))
        return ("ok", body, content_type)
    except FaultError as exc:
        error = make_error(exc.message, exc.error_type, exc.trace, request_id)
    except Exception as exc:
        error = make_error(
            str(exc), type(exc).__name__, _user_frames(exc.__traceback__), request_id
        )
    sys.stdout.write(_error_log_lines(error))
    return ("error", json.dumps(error).encode(), "application/json")


def run_on_fd(fd: int) -> None:
    """Run the runtime on a channel descriptor: read the BootSpec, then serve until told to stop."""
    conn = Channel(socket.socket(fileno=fd), RUNTIME_SPIN_S)
    spec = conn.recv()
    main(conn, spec)
