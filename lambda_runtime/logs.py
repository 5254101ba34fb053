"""Lambda's log lines byte for byte (spec §2, §4), and a file-backed CloudWatch log stream.

Every ``format_*`` function is pure and returns one record ending in ``"\\n"``.

Storage layout (one file per execution environment, i.e. per log stream)::

    <run_dir>/logs/<function>/<stream name with "/" replaced by "-">.log

e.g. ``runs/r1/logs/train/2026-11-27-[$LATEST]3893f0c1....log``. The file is opened with
``O_APPEND`` by every writer (the emulator and the environment process's stdout/stderr), so whole
``write`` calls from different writers interleave but never overwrite each other.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType

from lambda_runtime import quotas

# A plausible, fixed runtime build number: real Lambda shows e.g. "python:3.10.v11" (2023); the
# number only changes when AWS patches the runtime, so a constant keeps our lines reproducible.
RUNTIME_VERSION_NUMBER = 60

# RIC bootstrap.py: indentation of stack lines is swapped for NO-BREAK SPACE so that CloudWatch's
# console does not collapse it.
ERROR_LOG_INDENT = "\u00a0"

_RUNTIME_ID = re.compile(r"python(3\.\d+)")
_INIT_PHASES = ("init", "invoke")
_INIT_STATUSES = ("timeout", "error")
# Float noise from subtracting clock readings is far below a nanosecond; rounding to 1e-6 ms
# before ceil keeps 3.0000000001 ms billed as 3 ms, as the caller intended.
_BILLING_ROUND_DIGITS = 6


def _checked_ms(field: str, value: float) -> float:
    """A duration must be a finite, non-negative number; anything else is a caller bug."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{field}: must be finite and >= 0, got {value!r}")
    return float(value)


def _two_decimals(value: float) -> str:
    """Two decimals as Python's format spec does: the exact binary value, ties to even."""
    return f"{value:.2f}"


def format_timestamp(when_epoch_s: float) -> str:
    """UTC ``YYYY-MM-DDTHH:MM:SS.mmmZ``; milliseconds truncated like Python logging's ``msecs``."""
    # Go via whole microseconds first so 1.123 s (stored as 1.12299999...) shows .123, not .122.
    micros = round(when_epoch_s * 1_000_000)
    seconds, rest_us = divmod(micros, 1_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{stamp}.{rest_us // 1000:03d}Z"


def runtime_version_arn(runtime_id: str, region: str) -> str:
    """A deterministic ``arn:aws:lambda:<region>::runtime:<64 hex>`` for a runtime id."""
    digest = hashlib.sha256(f"{runtime_id}.v{RUNTIME_VERSION_NUMBER}".encode()).hexdigest()
    return f"arn:aws:lambda:{region}::runtime:{digest}"


def format_init_start(runtime_id: str, region: str) -> str:
    """``INIT_START Runtime Version: python:3.11.vN\\tRuntime Version ARN: arn:…\\n``."""
    match = _RUNTIME_ID.fullmatch(runtime_id)
    if match is None:
        raise ValueError(f"runtime_id: must look like 'python3.11', got {runtime_id!r}")
    version = f"python:{match.group(1)}.v{RUNTIME_VERSION_NUMBER}"
    arn = runtime_version_arn(runtime_id, region)
    return f"INIT_START Runtime Version: {version}\tRuntime Version ARN: {arn}\n"


def format_start(request_id: str, version: str = quotas.FUNCTION_VERSION) -> str:
    """``START RequestId: <id> Version: $LATEST\\n``."""
    return f"START RequestId: {request_id} Version: {version}\n"


def format_end(request_id: str) -> str:
    """``END RequestId: <id>\\n``."""
    return f"END RequestId: {request_id}\n"


def format_report(
    request_id: str,
    duration_ms: float,
    billed_ms: int,
    memory_mb: int,
    max_memory_mb: int,
    init_ms: float | None = None,
    status: str | None = None,
    error_type: str | None = None,
) -> str:
    """The REPORT line; fields tab-separated, trailing tab only on a successful invoke.

    Layout (spec §4, and REPORT lines recorded from real AWS)::

        REPORT RequestId: <id>\\tDuration: 3.01 ms\\tBilled Duration: 4 ms\\tMemory Size: 128 MB\\t
            Max Memory Used: 36 MB\\t[Init Duration: 110.10 ms\\t]\\n                  (success)
        REPORT RequestId: <id>\\tDuration: …\\tMax Memory Used: 128 MB\\t[Init Duration: … ms\\t]
            Status: timeout\\n                                                  (status only)
        REPORT RequestId: <id>\\t…\\tStatus: error\\tError Type: Runtime.OutOfMemory\\n

    i.e. ``"\\t".join(fields)`` followed by ``"\\t\\n"`` on success; a failed outcome appends
    ``"\\tStatus: <s>"`` and ``"\\tError Type: <t>"`` to the joined fields instead, with no trailing
    tab (recorded failure lines end ``…MB\\tStatus: timeout\\n``). Durations are printed with two
    decimals rounding the exact binary value half-to-even; sizes are integers.
    """
    fields = [
        f"REPORT RequestId: {request_id}",
        f"Duration: {_two_decimals(_checked_ms('duration_ms', duration_ms))} ms",
        f"Billed Duration: {int(billed_ms)} ms",
        f"Memory Size: {int(memory_mb)} MB",
        f"Max Memory Used: {int(max_memory_mb)} MB",
    ]
    if init_ms is not None:
        fields.append(f"Init Duration: {_two_decimals(_checked_ms('init_ms', init_ms))} ms")
    if status is None:
        if error_type is not None:
            raise ValueError("error_type: only allowed together with a status")
        return "\t".join(fields) + "\t\n"
    fields.append(f"Status: {status}")
    if error_type is not None:
        fields.append(f"Error Type: {error_type}")
    return "\t".join(fields) + "\n"


def format_init_report(init_ms: float, phase: str, status: str, error_type: str | None) -> str:
    """``INIT_REPORT Init Duration: <x> ms\\tPhase: <p>\\tStatus: <s>[\\tError Type: <t>]\\n``."""
    if phase not in _INIT_PHASES:
        raise ValueError(f"phase: must be one of {_INIT_PHASES}, got {phase!r}")
    if status not in _INIT_STATUSES:
        raise ValueError(f"status: must be one of {_INIT_STATUSES}, got {status!r}")
    line = (
        f"INIT_REPORT Init Duration: {_two_decimals(_checked_ms('init_ms', init_ms))} ms"
        f"\tPhase: {phase}\tStatus: {status}"
    )
    if error_type is not None:
        line += f"\tError Type: {error_type}"
    return line + "\n"


def timeout_error_message(request_id: str, elapsed_s: float) -> str:
    """The timeout errorMessage: ``RequestId: <id> Error: Task timed out after 1.00 seconds``."""
    elapsed = _two_decimals(_checked_ms("elapsed_s", elapsed_s))
    return f"RequestId: {request_id} Error: Task timed out after {elapsed} seconds"


def format_timeout_line(when_epoch_s: float, request_id: str, elapsed_s: float) -> str:
    """``<ISO8601 ms Z> <id> Task timed out after N.NN seconds\\n``; N.NN is the measured time."""
    elapsed = _two_decimals(_checked_ms("elapsed_s", elapsed_s))
    stamp = format_timestamp(when_epoch_s)
    return f"{stamp} {request_id} Task timed out after {elapsed} seconds\n"


def format_log_record(level: str, when_epoch_s: float, request_id: str, message: str) -> str:
    """The runtime's logging record: ``[LEVEL]\\t<timestamp>\\t<request_id>\\t<message>\\n``."""
    return f"[{level}]\t{format_timestamp(when_epoch_s)}\t{request_id}\t{message}\n"


def _indent_to_nbsp(line: str) -> str:
    stripped = line.lstrip(" ")
    return ERROR_LOG_INDENT * (len(line) - len(stripped)) + stripped


def format_error_log(
    error_type: str, message: str, stack_trace: list[str], separator: str = "\n"
) -> str:
    """The unhandled-exception record as the RIC's text-format ``log_error`` writes it.

    Header ``[ERROR]``, then `` <Type>`` if a type is given, ``:`` if both type and message are
    given, `` <msg>`` if a message is given. Then ``Traceback (most recent call last):`` (the RIC
    always has a list, so the header appears even for an empty trace), then every line of every
    ``stack_trace`` element (as from ``traceback.format_list``) with its leading spaces replaced
    one for one by U+00A0; an empty element stays an empty line. Lines are joined with
    ``separator``: ``"\\n"`` as the telemetry sink (what CloudWatch shows) does, ``"\\r"`` as the
    RIC's plain-stdout sink does. The record ends with one ``"\\n"``.
    """
    header = "[ERROR]"
    if error_type:
        header += " " + error_type
    if message:
        if error_type:
            header += ":"
        header += " " + message
    lines = [header, "Traceback (most recent call last):"]
    for element in stack_trace:
        if element == "":
            lines.append("")
            continue
        lines.extend(_indent_to_nbsp(line) for line in element.splitlines())
    return separator.join(lines) + "\n"


def billed_duration_ms(duration_ms: float, init_ms: float | None) -> int:
    """Billed ms, at least 1: ceil(init + duration) cold (since Aug 2025), ceil(duration) warm."""
    total = _checked_ms("duration_ms", duration_ms)
    if init_ms is not None:
        total += _checked_ms("init_ms", init_ms)
    return max(1, math.ceil(round(total, _BILLING_ROUND_DIGITS)))


def log_group_name(function: str) -> str:
    """``/aws/lambda/<function>``."""
    return f"/aws/lambda/{function}"


def new_log_stream_name(when_epoch_s: float, version: str = quotas.FUNCTION_VERSION) -> str:
    """A fresh ``YYYY/MM/DD/[<version>]<32 lowercase hex>`` stream name (UTC date)."""
    day = time.strftime("%Y/%m/%d", time.gmtime(math.floor(when_epoch_s)))
    return f"{day}/[{version}]{uuid.uuid4().hex}"


def stream_file_name(stream_name: str) -> str:
    """The file name a log stream is stored under: ``/`` becomes ``-``, plus ``.log``."""
    return stream_name.replace("/", "-") + ".log"


class LogStream:
    """One execution environment's log stream, stored as an append-only file (see module doc)."""

    def __init__(self, run_dir: Path, function: str, stream_name: str) -> None:
        self.function = function
        self.stream_name = stream_name
        directory = Path(run_dir) / "logs" / function
        directory.mkdir(parents=True, exist_ok=True)
        self._path = directory / stream_file_name(stream_name)
        # O_APPEND: every write lands at the current end even when the environment process
        # appends to the same file through its own descriptor.
        self._fd: int | None = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """The file backing this stream (hand it to the environment for stdout/stderr)."""
        return self._path

    def write(self, text: str) -> None:
        """Append ``text`` with one unbuffered write; safe to call from several threads."""
        data = text.encode("utf-8")
        with self._lock:
            if self._fd is None:
                raise ValueError(f"log stream {self.stream_name!r} is closed")
            view = memoryview(data)
            # A regular file takes the whole buffer in one write; the loop only matters on a
            # short write (e.g. a signal), where finishing the record beats losing its tail.
            while view:
                written = os.write(self._fd, view)
                view = view[written:]

    def offset(self) -> int:
        """Current size in bytes: remember it before an invoke to read that invoke's log later."""
        return self._path.stat().st_size

    def read_from(self, offset: int) -> bytes:
        """Everything written at or after byte ``offset``."""
        if offset < 0:
            raise ValueError(f"offset: must be >= 0, got {offset}")
        with open(self._path, "rb") as f:
            f.seek(offset)
            return f.read()

    def tail_base64(self, offset: int, limit: int = quotas.LOG_TAIL_BYTES) -> str:
        """Base64 of the last ``limit`` bytes since ``offset``: Invoke's X-Amz-Log-Result."""
        if limit < 0:
            raise ValueError(f"limit: must be >= 0, got {limit}")
        data = self.read_from(offset)
        tail = data[len(data) - limit :] if len(data) > limit else data
        return base64.b64encode(tail).decode("ascii")

    def close(self) -> None:
        """Close the descriptor; further writes raise. Calling it twice is harmless."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> LogStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_stream(path: str | Path) -> str:
    """A stored stream's text; undecodable bytes (a cut multi-byte char) become U+FFFD."""
    return Path(path).read_bytes().decode("utf-8", errors="replace")


def list_streams(run_dir: str | Path, function: str) -> list[Path]:
    """The stream files of one function, sorted by name (hence by creation date); [] if none."""
    directory = Path(run_dir) / "logs" / function
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix == ".log" and p.is_file())
