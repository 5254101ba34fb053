"""Lambda's log lines byte for byte, billed duration, and the file-backed log stream."""

from __future__ import annotations

import base64
import math
import re
import sys
import threading
import traceback
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lambda_runtime import logs, quotas

RID = "8f507cfc-14ac-4a3b-a2a5-0ac5d3d2e5f1"
# 2026-11-27T07:03:57.123Z
WHEN = 1795763037.123


def test_start_and_end_lines() -> None:
    assert logs.format_start(RID) == f"START RequestId: {RID} Version: $LATEST\n"
    assert logs.format_start(RID, "3") == f"START RequestId: {RID} Version: 3\n"
    assert logs.format_end(RID) == f"END RequestId: {RID}\n"


def test_cold_report_matches_spec_example_byte_for_byte() -> None:
    line = logs.format_report(RID, 3.01, 4, 128, 36, 110.10)
    assert line == (
        f"REPORT RequestId: {RID}\tDuration: 3.01 ms\tBilled Duration: 4 ms\t"
        "Memory Size: 128 MB\tMax Memory Used: 36 MB\tInit Duration: 110.10 ms\t\n"
    )


def test_warm_report_has_no_init_duration_and_keeps_trailing_tab() -> None:
    line = logs.format_report(RID, 2.9, 3, 128, 36)
    assert line == (
        f"REPORT RequestId: {RID}\tDuration: 2.90 ms\tBilled Duration: 3 ms\t"
        "Memory Size: 128 MB\tMax Memory Used: 36 MB\t\n"
    )


def test_error_report_appends_status_and_error_type_without_trailing_tab() -> None:
    line = logs.format_report(
        RID, 8948.73, 9444, 2048, 2048, 495.04, status="error", error_type="Runtime.OutOfMemory"
    )
    assert line == (
        f"REPORT RequestId: {RID}\tDuration: 8948.73 ms\tBilled Duration: 9444 ms\t"
        "Memory Size: 2048 MB\tMax Memory Used: 2048 MB\tInit Duration: 495.04 ms\t"
        "Status: error\tError Type: Runtime.OutOfMemory\n"
    )


def test_timeout_report_appends_status_only() -> None:
    line = logs.format_report(RID, 3000.0, 3000, 128, 40, status="timeout")
    assert line == (
        f"REPORT RequestId: {RID}\tDuration: 3000.00 ms\tBilled Duration: 3000 ms\t"
        "Memory Size: 128 MB\tMax Memory Used: 40 MB\tStatus: timeout\n"
    )


def test_report_rejects_error_type_without_status_and_bad_durations() -> None:
    with pytest.raises(ValueError, match="error_type"):
        logs.format_report(RID, 1.0, 1, 128, 30, error_type="Runtime.ExitError")
    with pytest.raises(ValueError, match="duration_ms"):
        logs.format_report(RID, -1.0, 1, 128, 30)
    with pytest.raises(ValueError, match="init_ms"):
        logs.format_report(RID, 1.0, 1, 128, 30, init_ms=math.nan)


def test_durations_print_two_decimals_of_the_exact_binary_value() -> None:
    # 0.125 is exact in binary: a true tie, rounded to even. 2.675 is stored just below .675.
    assert "Duration: 0.12 ms" in logs.format_report(RID, 0.125, 1, 128, 30)
    assert "Duration: 2.67 ms" in logs.format_report(RID, 2.675, 3, 128, 30)
    assert "Duration: 1000.00 ms" in logs.format_report(RID, 999.999, 1000, 128, 30)


def test_init_start_line_shape_and_determinism() -> None:
    line = logs.format_init_start("python3.11", "eu-west-1")
    pattern = (
        r"INIT_START Runtime Version: python:3\.11\.v\d+\t"
        r"Runtime Version ARN: arn:aws:lambda:eu-west-1::runtime:[0-9a-f]{64}\n"
    )
    assert re.fullmatch(pattern, line)
    assert line == logs.format_init_start("python3.11", "eu-west-1")
    other = logs.format_init_start("python3.12", "eu-west-1")
    assert other.split("runtime:")[1] != line.split("runtime:")[1]
    with pytest.raises(ValueError, match="runtime_id"):
        logs.format_init_start("nodejs20.x", "us-east-1")


def test_init_report_lines() -> None:
    assert logs.format_init_report(0.79, "init", "error", "Runtime.InvalidEntrypoint") == (
        "INIT_REPORT Init Duration: 0.79 ms\tPhase: init\tStatus: error\t"
        "Error Type: Runtime.InvalidEntrypoint\n"
    )
    assert logs.format_init_report(10000.0, "invoke", "timeout", None) == (
        "INIT_REPORT Init Duration: 10000.00 ms\tPhase: invoke\tStatus: timeout\n"
    )
    with pytest.raises(ValueError, match="phase"):
        logs.format_init_report(1.0, "boot", "error", None)
    with pytest.raises(ValueError, match="status"):
        logs.format_init_report(1.0, "init", "success", None)


def test_timestamp_is_utc_with_truncated_milliseconds() -> None:
    assert logs.format_timestamp(WHEN) == "2026-11-27T07:03:57.123Z"
    assert logs.format_timestamp(0.0) == "1970-01-01T00:00:00.000Z"
    assert logs.format_timestamp(1.9999) == "1970-01-01T00:00:01.999Z"


def test_timeout_line_and_message_use_measured_seconds() -> None:
    assert logs.format_timeout_line(WHEN, RID, 3.0071) == (
        f"2026-11-27T07:03:57.123Z {RID} Task timed out after 3.01 seconds\n"
    )
    assert logs.timeout_error_message(RID, 1.0) == (
        f"RequestId: {RID} Error: Task timed out after 1.00 seconds"
    )


def test_log_record_format_matches_runtime_logging_handler() -> None:
    assert logs.format_log_record("INFO", WHEN, RID, "hello") == (
        f"[INFO]\t2026-11-27T07:03:57.123Z\t{RID}\thello\n"
    )


def _real_stack() -> list[str]:
    def inner() -> None:
        raise ValueError("boom")

    try:
        inner()
    except ValueError:
        return traceback.format_list(traceback.extract_tb(sys.exc_info()[2]))
    raise AssertionError("unreachable")


def test_error_log_replaces_leading_spaces_with_nbsp() -> None:
    stack = [
        '  File "/var/task/app.py", line 3, in handler\n    raise ValueError("boom")\n',
    ]
    nb = "\u00a0"
    assert logs.format_error_log("ValueError", "boom", stack) == (
        "[ERROR] ValueError: boom\n"
        "Traceback (most recent call last):\n"
        f'{nb * 2}File "/var/task/app.py", line 3, in handler\n'
        f'{nb * 4}raise ValueError("boom")\n'
    )


def test_error_log_with_a_real_traceback_keeps_inner_spaces() -> None:
    record = logs.format_error_log("ValueError", "boom", _real_stack())
    lines = record.rstrip("\n").split("\n")
    assert lines[:2] == ["[ERROR] ValueError: boom", "Traceback (most recent call last):"]
    assert all(not line.startswith(" ") for line in lines)
    assert any(line.startswith("\u00a0\u00a0File ") and ", line " in line for line in lines)


def test_error_log_header_variants_and_separator() -> None:
    assert logs.format_error_log("Runtime.HandlerNotFound", "", []) == (
        "[ERROR] Runtime.HandlerNotFound\nTraceback (most recent call last):\n"
    )
    assert logs.format_error_log("", "just text", []) == (
        "[ERROR] just text\nTraceback (most recent call last):\n"
    )
    assert logs.format_error_log("E", "m", ["", "  x\n"], separator="\r") == (
        "[ERROR] E: m\rTraceback (most recent call last):\r\r\u00a0\u00a0x\n"
    )


@pytest.mark.parametrize(
    ("duration", "init", "billed"),
    [
        (3.01, None, 4),
        (2.90, None, 3),
        (15.74, 130.49, 147),
        (3.0000000001, None, 3),  # subtraction noise must not buy a whole extra ms
        (3.0, None, 3),
        (0.0, None, 1),  # Lambda never bills less than 1 ms
        (3.01, 110.10, 114),  # cold start: init is billed too (since Aug 2025)
    ],
)
def test_billed_duration_examples(duration: float, init: float | None, billed: int) -> None:
    assert logs.billed_duration_ms(duration, init) == billed


@given(
    st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.one_of(st.none(), st.floats(min_value=0.0, max_value=1e6, allow_nan=False)),
)
def test_billed_duration_brackets_the_exact_total(duration: float, init: float | None) -> None:
    total = duration + (init or 0.0)
    billed = logs.billed_duration_ms(duration, init)
    assert isinstance(billed, int)
    # Tolerance 1e-6 ms: the deliberate rounding that absorbs float noise before ceil.
    assert billed >= total - 1e-6
    assert billed < total + 1 or billed == 1
    assert billed >= 1


def test_log_group_and_stream_names() -> None:
    assert logs.log_group_name("train") == "/aws/lambda/train"
    name = logs.new_log_stream_name(WHEN)
    assert re.fullmatch(r"2026/11/27/\[\$LATEST\][0-9a-f]{32}", name)
    assert logs.new_log_stream_name(WHEN) != name
    assert logs.new_log_stream_name(WHEN, "7").startswith("2026/11/27/[7]")


def test_log_stream_file_layout_and_reads(tmp_path: Path) -> None:
    name = "2026/11/27/[$LATEST]" + "a" * 32
    with logs.LogStream(tmp_path, "fn", name) as stream:
        assert stream.path == tmp_path / "logs" / "fn" / (
            "2026-11-27-[$LATEST]" + "a" * 32 + ".log"
        )
        stream.write(logs.format_start(RID))
        start = stream.offset()
        assert start == len(logs.format_start(RID))
        stream.write("héllo\n")
        assert stream.read_from(start) == "héllo\n".encode()
        assert stream.offset() == start + len("héllo\n".encode())
    assert logs.read_stream(stream.path) == logs.format_start(RID) + "héllo\n"
    assert logs.list_streams(tmp_path, "fn") == [stream.path]
    assert logs.list_streams(tmp_path, "other") == []
    with pytest.raises(ValueError, match="closed"):
        stream.write("late")
    stream.close()  # idempotent


def test_other_writers_append_to_the_same_file(tmp_path: Path) -> None:
    stream = logs.LogStream(tmp_path, "fn", "s")
    stream.write("a\n")
    # The environment process gets the path and opens it for append on its own.
    with open(stream.path, "ab", buffering=0) as env_stdout:
        env_stdout.write(b"from handler\n")
    stream.write("b\n")
    stream.close()
    assert logs.read_stream(stream.path) == "a\nfrom handler\nb\n"


def test_tail_is_last_4096_bytes_since_offset(tmp_path: Path) -> None:
    stream = logs.LogStream(tmp_path, "fn", "s")
    stream.write("x" * 10_000)
    offset = stream.offset()
    payload = "".join(f"line {i}\n" for i in range(1000)).encode()
    stream.write(payload.decode())
    tail = base64.b64decode(stream.tail_base64(offset), validate=True)
    assert len(tail) == quotas.LOG_TAIL_BYTES
    assert tail == payload[-quotas.LOG_TAIL_BYTES :]
    # Less than the limit since the offset: all of it, and nothing from before the offset.
    offset2 = stream.offset()
    stream.write("END\n")
    assert base64.b64decode(stream.tail_base64(offset2)) == b"END\n"
    assert base64.b64decode(stream.tail_base64(offset2, limit=2)) == b"D\n"
    assert stream.tail_base64(stream.offset()) == ""
    stream.close()


def test_concurrent_writes_are_whole(tmp_path: Path) -> None:
    stream = logs.LogStream(tmp_path, "fn", "s")
    lines = [f"{t}:{i}:" + "z" * 200 + "\n" for t in range(4) for i in range(200)]

    def worker(t: int) -> None:
        for i in range(200):
            stream.write(lines[t * 200 + i])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stream.close()
    written = logs.read_stream(stream.path).splitlines(keepends=True)
    assert sorted(written) == sorted(lines)
