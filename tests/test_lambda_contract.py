"""The Lambda contract (lambda-semantics.md), one test per spec row, over every backend."""

from __future__ import annotations

import base64
import json
import re
import uuid

import pytest

from lambda_runtime import quotas
from lambda_runtime.errors import (
    InvalidRequestContentException,
    RequestTooLargeException,
    ResourceNotFoundException,
    TooManyRequestsException,
)
from lambda_runtime.logs import list_streams, read_stream

from .conftest import BROKEN_DIR, fn

REPORT_RE = re.compile(
    r"REPORT RequestId: (?P<id>[0-9a-f-]{36})\tDuration: (?P<d>\d+\.\d{2}) ms\t"
    r"Billed Duration: (?P<b>\d+) ms\tMemory Size: (?P<m>\d+) MB\tMax Memory Used: (?P<u>\d+) MB\t"
    r"(?:Init Duration: (?P<i>\d+\.\d{2}) ms\t)?(?P<rest>.*)\n"
)


def all_logs(svc, name: str = "fn") -> str:
    return "".join(read_stream(p) for p in list_streams(svc.run_dir, name))


def reports(svc, name: str = "fn") -> list[re.Match[str]]:
    return list(REPORT_RE.finditer(all_logs(svc, name)))


# ---- §2 context object and handler contract ---------------------------------------------------
def test_context_attributes_have_aws_names_and_types(svc):
    svc.register(fn(handler="handler.context_info", memory_mb=3008, timeout_s=30))
    out = svc.invoke("fn", {}).json()
    assert uuid.UUID(out["aws_request_id"]).hex == out["aws_request_id"].replace("-", "")
    assert out["aws_request_id"] == out["aws_request_id"].lower()
    assert out["function_name"] == "fn"
    assert out["function_version"] == "$LATEST"
    assert out["memory_limit_in_mb"] == "3008" and out["memory_type"] == "str"
    assert out["invoked_function_arn"] == "arn:aws:lambda:us-east-1:000000000000:function:fn"
    assert out["log_group_name"] == "/aws/lambda/fn"
    assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/\[\$LATEST\][0-9a-f]{32}", out["log_stream_name"])
    assert out["identity_type"] == "CognitoIdentity" and out["identity"] == [None, None]
    assert out["client_context"] is None
    assert out["remaining_type"] == "int" and out["deadline_type"] == "int"
    assert 25_000 < out["remaining"] <= 30_000


def test_client_context_reaches_the_handler(svc):
    svc.register(fn(handler="handler.context_info"))
    out = svc.invoke("fn", {}, client_context={"custom": {"a": 1}, "env": {"b": "2"}}).json()
    assert out["client_context"] == {"custom": {"a": 1}, "env": {"b": "2"}}


def test_remaining_time_counts_down_and_never_goes_negative(svc):
    svc.register(fn(handler="handler.sleep", timeout_s=2))
    out = svc.invoke("fn", {"seconds": 0.5}).json()
    assert isinstance(out["remaining"], int)
    assert 1_200 <= out["remaining"] <= 1_550


def test_empty_payload_is_delivered_as_empty_object(svc):
    svc.register(fn(handler="handler.echo"))
    assert svc.invoke("fn").json() == {}


def test_none_return_is_json_null_and_bytes_pass_through(svc):
    svc.register(fn(handler="handler.noop"))
    result = svc.invoke("fn", {})
    assert result.payload == b"null" and result.status_code == 200 and result.function_error is None


# ---- §3 environment variables -----------------------------------------------------------------
def test_environment_variables_match_lambda(svc):
    svc.register(fn(handler="handler.environ", memory_mb=512, environment={"MY_VAR": "x"}))
    env = svc.invoke("fn", {}).json()
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "fn"
    assert env["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "512"
    assert env["AWS_LAMBDA_LOG_GROUP_NAME"] == "/aws/lambda/fn"
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert re.fullmatch(r"AWS_Lambda_python3\.\d+", env["AWS_EXECUTION_ENV"])
    assert env["_HANDLER"] == "handler.environ"
    assert env["AWS_LAMBDA_INITIALIZATION_TYPE"] == "on-demand"
    assert env["TZ"] == ":UTC" and env["LANG"] == "en_US.UTF-8" and env["LC_CTYPE"] == "C.UTF-8"
    assert env["SHLVL"] == "0"
    assert env["MY_VAR"] == "x"
    assert env["_X_AMZN_TRACE_ID"].startswith("Root=1-")
    for key in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "LAMBDA_TASK_ROOT",
        "LAMBDA_RUNTIME_DIR",
        "AWS_LAMBDA_LOG_STREAM_NAME",
    ):
        assert env[key]
    assert env["AWS_ENDPOINT_URL_LAMBDA"] == svc.endpoint


# ---- §6 lifecycle -----------------------------------------------------------------------------
def test_warm_reuse_keeps_globals_and_reports_init_only_when_cold(svc):
    svc.register(fn(handler="handler.counter"))
    first, second = svc.invoke("fn", {}).json(), svc.invoke("fn", {}).json()
    assert (first["count"], second["count"]) == (1, 2)
    assert first["pid"] == second["pid"]
    r = reports(svc)
    assert r[0]["i"] is not None and r[1]["i"] is None
    records = svc.ledger.records("fn")
    assert [rec.cold for rec in records] == [True, False]
    # Billed duration: ceil(init + duration) on the cold start, ceil(duration) warm.
    import math

    assert int(r[0]["b"]) == math.ceil(float(r[0]["i"]) + float(r[0]["d"]) - 1e-9) or int(
        r[0]["b"]
    ) == math.ceil(round(records[0].init_ms + records[0].duration_ms, 6))
    assert int(r[1]["b"]) == max(1, math.ceil(round(records[1].duration_ms, 6)))


def test_timeout_kills_and_reinitialises_but_keeps_tmp(svc):
    svc.register(fn(handler="handler.tmp_state", timeout_s=1))
    first = svc.invoke("fn", {"write": "kept"})
    assert first.json()["count"] == 1
    result = svc.invoke("fn", {"write": "after", "sleep": 5})
    rid = result.request_id
    body = result.json()
    assert body["errorType"] == "Sandbox.Timedout"
    assert re.fullmatch(
        rf"RequestId: {rid} Error: Task timed out after 1\.\d\d seconds", body["errorMessage"]
    )
    assert result.function_error == "Unhandled"
    assert result.record.status == "timeout" and 1000 <= result.record.duration_ms < 1100
    assert result.record.billed_ms >= 1000
    text = all_logs(svc)
    assert re.search(
        rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z {rid} Task timed out after "
        r"1\.\d\d seconds\n",
        text,
    )
    assert re.search(rf"REPORT RequestId: {rid}\t.*\tStatus: timeout\n", text)
    after = svc.invoke("fn", {})
    state = after.json()
    assert state["marker"] == "after"  # /tmp survived the kill
    assert state["count"] == 1  # globals were re-created: the runtime re-initialised
    assert after.record.cold is True
    assert after.record.environment_id == first.record.environment_id


def test_new_environment_starts_with_empty_tmp(svc):
    svc.register(fn(handler="handler.tmp_state"))
    assert svc.invoke("fn", {"write": "x"}).json()["marker"] == "x"
    svc.pool.reap(0)  # shut the idle environment down
    assert svc.invoke("fn", {}).json()["marker"] is None


def test_idle_environments_are_reaped(make_service, backend):
    svc = make_service("portable" if backend == "portable" else "auto", idle_timeout_s=0.2)
    svc.register(fn(handler="handler.counter"))
    first = svc.invoke("fn", {}).json()
    import time

    time.sleep(1.5)
    assert svc.pool.stats("fn") == {"idle": 0, "busy": 0}
    second = svc.invoke("fn", {}).json()
    assert second["count"] == 1 and second["pid"] != first["pid"]


# ---- §5 outcomes ------------------------------------------------------------------------------
def test_handler_exception_payload(svc):
    svc.register(fn(handler="handler.fail"))
    result = svc.invoke("fn", {})
    body = result.json()
    assert result.status_code == 200 and result.function_error == "Unhandled"
    assert list(body) == ["errorMessage", "errorType", "requestId", "stackTrace"]
    assert body["errorMessage"] == "Handler fails" and body["errorType"] == "Exception"
    assert body["requestId"] == result.request_id
    assert len(body["stackTrace"]) == 1
    assert re.fullmatch(
        r'  File ".*handler\.py", line \d+, in fail\n    raise Exception\("Handler fails"\)\n',
        body["stackTrace"][0],
    )
    text = all_logs(svc)
    assert (
        "[ERROR] Exception: Handler fails\nTraceback (most recent call last):\n\u00a0\u00a0File"
        in text
    )


@pytest.mark.parametrize(
    ("handler", "error_type", "message"),
    [
        (
            "missing_import.handler",
            "Runtime.ImportModuleError",
            "Unable to import module 'missing_import': "
            "No module named 'module_that_does_not_exist'",
        ),
        ("syntax_error.handler", "Runtime.UserCodeSyntaxError", None),
        ("ok.nothere", "Runtime.HandlerNotFound", "Handler 'nothere' missing on module 'ok'"),
        ("raises_at_import.handler", "RuntimeError", "init went wrong"),
        (
            "sys.handler",
            "Runtime.BuiltInModuleConflict",
            "Cannot use built-in module sys as a handler module",
        ),
    ],
)
def test_init_errors(svc, handler, error_type, message):
    svc.register(fn(handler=handler, code_dir=BROKEN_DIR))
    result = svc.invoke("fn", {})
    body = result.json()
    assert result.function_error == "Unhandled"
    assert body["errorType"] == error_type
    assert body["requestId"] == ""
    if message is not None:
        assert body["errorMessage"] == message
    text = all_logs(svc)
    assert f"\tPhase: init\tStatus: error\tError Type: {error_type}\n" in text
    assert f"\tPhase: invoke\tStatus: error\tError Type: {error_type}\n" in text
    assert "LAMBDA_WARNING: Unhandled exception." in text
    assert re.search(
        rf"REPORT RequestId: {result.request_id}\t.*\tStatus: error\t"
        rf"Error Type: {re.escape(error_type)}\n",
        text,
    )


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (0, "Runtime exited without providing a reason"),
        (3, "Runtime exited with error: exit status 3"),
    ],
)
def test_runtime_exit(svc, code, reason):
    svc.register(fn(handler="handler.exit_now"))
    result = svc.invoke("fn", {"code": code})
    assert result.json() == {
        "errorType": "Runtime.ExitError",
        "errorMessage": f"RequestId: {result.request_id} Error: {reason}",
    }
    assert svc.invoke("fn", {"code": code}).record.cold is True  # re-initialised


def test_response_too_large(svc):
    svc.register(fn(handler="handler.big_response", memory_mb=512))
    result = svc.invoke("fn", {"bytes": quotas.SYNC_RESPONSE_MAX_BYTES})  # + 2 quotes
    assert result.function_error == "Unhandled"
    assert result.json() == {
        "errorMessage": "Response payload size exceeded maximum allowed payload size "
        "(6291556 bytes).",
        "errorType": "Function.ResponseSizeTooLarge",
    }
    ok = svc.invoke("fn", {"bytes": quotas.SYNC_RESPONSE_MAX_BYTES - 2})
    assert ok.function_error is None and len(ok.payload) == quotas.SYNC_RESPONSE_MAX_BYTES


def test_request_size_limits(svc):
    svc.register(fn())
    big = {"x": "y" * quotas.SYNC_REQUEST_MAX_BYTES}
    with pytest.raises(
        RequestTooLargeException,
        match="Request must be smaller than 6291456 bytes for the InvokeFunction operation",
    ):
        svc.invoke("fn", big)
    with pytest.raises(
        RequestTooLargeException,
        match=r"byte payload is too large for the Event "
        r"invocation type \(limit 1048576 bytes\)",
    ):
        svc.invoke("fn", {"x": "y" * quotas.ASYNC_REQUEST_MAX_BYTES}, invocation_type="Event")


def test_bad_json_and_unknown_function(svc):
    svc.register(fn())
    with pytest.raises(
        InvalidRequestContentException, match="Could not parse request body into json"
    ):
        svc.invoke_raw("fn", b"{not json")
    with pytest.raises(
        ResourceNotFoundException,
        match=r"Function not found: arn:aws:lambda:us-east-1:"
        r"000000000000:function:nope:\$LATEST",
    ):
        svc.invoke("nope", {})


def test_event_and_dry_run_status_codes(svc):
    svc.register(fn())
    assert svc.invoke("fn", {}, invocation_type="Event").status_code == 202
    assert svc.invoke("fn", {}, invocation_type="DryRun").status_code == 204
    assert svc.wait_idle(20)


# ---- §4 logs ----------------------------------------------------------------------------------
def test_log_lines_and_tail(svc):
    svc.register(fn(handler="handler.logs"))
    result = svc.invoke("fn", {}, log_type="Tail")
    tail = base64.b64decode(result.log_result).decode()
    rid = result.request_id
    assert tail.startswith(f"START RequestId: {rid} Version: $LATEST\n")
    assert "hello from print\n" in tail and "hello from stderr\n" in tail
    assert re.search(
        rf"\[WARNING\]\t\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z\t{rid}\thello from logging\n",
        tail,
    )
    assert f"END RequestId: {rid}\n" in tail
    m = REPORT_RE.search(tail)
    assert m and m["id"] == rid and m["rest"] == "" and m["i"] is not None
    text = all_logs(svc)
    assert text.startswith("INIT_START Runtime Version: python:3.")


def test_tail_is_last_4kb(svc):
    svc.register(fn(handler="handler.chatty"))
    result = svc.invoke("fn", {"lines": 500}, log_type="Tail")
    tail = base64.b64decode(result.log_result)
    assert len(tail) == quotas.LOG_TAIL_BYTES
    assert tail.decode().endswith("\t\n") and b"REPORT RequestId" in tail


# ---- §1 limits enforced -----------------------------------------------------------------------
def test_out_of_memory(svc):
    svc.register(fn(handler="handler.allocate", memory_mb=256, timeout_s=30))
    result = svc.invoke("fn", {"mb": 400})
    assert result.json() == {
        "errorType": "Runtime.ExitError",
        "errorMessage": f"RequestId: {result.request_id} Error: Runtime exited with error: "
        "signal: killed",
    }
    m = reports(svc)[-1]
    assert m["u"] == "256" and m["rest"] == "Status: error\tError Type: Runtime.OutOfMemory"
    assert result.record.status == "oom"


def test_max_memory_used_is_measured(svc):
    svc.register(fn(handler="handler.allocate", memory_mb=1024, timeout_s=30))
    small = svc.invoke("fn", {"mb": 1}).record.max_memory_mb
    big = svc.invoke("fn", {"mb": 200}).record.max_memory_mb
    assert 10 <= small < 120
    assert 200 <= big < 330


def test_tmp_is_capped(svc, backend):
    svc.register(fn(handler="handler.write_tmp", ephemeral_mb=512, timeout_s=60, memory_mb=256))
    result = svc.invoke("fn", {"mb": 600})
    if backend == "process":
        out = result.json()
        assert out["errno"] == "ENOSPC" and 500 <= out["written_mb"] <= 512
        # /tmp is disk: filling it is not memory.
        assert result.record.max_memory_mb < 200
        assert result.record.tmp_peak_mb >= 500
    else:
        assert result.function_error == "Unhandled"
        assert "ephemeral storage of 512 MB" in result.json()["errorMessage"]


def test_efs_mount_is_shared_with_the_host(svc, tmp_path):
    host = tmp_path / "efs"
    svc.register(fn(handler="handler.efs_write", efs={"/mnt/efs": str(host)}))
    listing = svc.invoke("fn", {"name": "a.txt", "text": "hi"}).json()
    assert listing == ["a.txt"] and (host / "a.txt").read_text() == "hi"


def test_reserved_concurrency_throttles_sync(make_service, backend):
    svc = make_service("portable" if backend == "portable" else "auto")
    svc.register(fn(handler="handler.sleep", reserved_concurrency=1, timeout_s=10))
    import threading

    t = threading.Thread(target=svc.invoke, args=("fn", {"seconds": 1.0}))
    t.start()
    import time

    time.sleep(0.3)
    with pytest.raises(TooManyRequestsException) as info:
        svc.invoke("fn", {"seconds": 0})
    assert info.value.extra["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    assert info.value.message == "Rate Exceeded."
    t.join()


# ---- async queue ------------------------------------------------------------------------------
def test_async_retries_then_on_failure_destination(svc, tmp_path):
    marks = tmp_path / "marks"
    svc.register(
        fn(handler="handler.fail_always_async", max_retry_attempts=2, efs={"/mnt/efs": marks})
    )
    result = svc.invoke("fn", {"n": 1}, invocation_type="Event")
    assert svc.wait_idle(30)
    assert len(list(marks.iterdir())) == 3  # first try + 2 retries
    lines = (svc.run_dir / "destinations" / "fn.on-failure.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    assert record["requestContext"] == {
        "requestId": result.request_id,
        "functionArn": "arn:aws:lambda:us-east-1:000000000000:function:fn:$LATEST",
        "condition": "RetriesExhausted",
        "approximateInvokeCount": 3,
    }
    assert record["requestPayload"] == {"n": 1}
    assert record["responseContext"]["functionError"] == "Unhandled"
    assert record["responsePayload"]["errorType"] == "RuntimeError"
    assert [r.attempt for r in svc.ledger.records("fn")] == [1, 2, 3]


def test_async_zero_retries(svc, tmp_path):
    svc.register(
        fn(handler="handler.fail_always_async", max_retry_attempts=0, efs={"/mnt/efs": tmp_path})
    )
    svc.invoke("fn", {}, invocation_type="Event")
    assert svc.wait_idle(30)
    assert len(list(tmp_path.glob("attempt-*"))) == 1


def test_async_events_wait_for_concurrency(svc, tmp_path):
    tmp_path = tmp_path / "efs"
    svc.register(fn(handler="handler.record", reserved_concurrency=2, efs={"/mnt/efs": tmp_path}))
    for i in range(6):
        svc.invoke("fn", {"i": i}, invocation_type="Event")
    assert svc.wait_idle(30)
    done = sorted(int(p.name.split("-")[0]) for p in tmp_path.iterdir())
    assert done == list(range(6))
    assert len({p.name.split("-")[1] for p in tmp_path.iterdir()}) <= 2


# ---- §7 the HTTP API with boto3 ---------------------------------------------------------------
def boto_client(endpoint):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "lambda",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"max_attempts": 1}, read_timeout=120),
    )


def test_boto3_invoke_through_http(svc):
    svc.register(fn(handler="handler.fail"))
    client = boto_client(svc.endpoint)
    r = client.invoke(FunctionName="fn", Payload=b"{}", LogType="Tail")
    assert r["StatusCode"] == 200 and r["FunctionError"] == "Unhandled"
    assert r["ExecutedVersion"] == "$LATEST"
    assert json.loads(r["Payload"].read())["errorMessage"] == "Handler fails"
    assert "END RequestId:" in base64.b64decode(r["LogResult"]).decode()
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.invoke(FunctionName="missing", Payload=b"{}")


def test_handler_fans_out_with_unmodified_boto3(svc, tmp_path):
    svc.register(fn(name="fanner", handler="handler.fan_out", timeout_s=30))
    svc.register(fn(name="target", handler="handler.record", efs={"/mnt/efs": tmp_path / "efs"}))
    out = svc.invoke("fanner", {"n": 3, "target": "target"})
    assert out.function_error is None, out.payload
    assert out.json() == [202, 202, 202]
    assert svc.wait_idle(30)
    assert sorted(int(p.name.split("-")[0]) for p in (tmp_path / "efs").iterdir()) == [0, 1, 2]


def test_async_event_past_its_max_age_is_dropped(svc):
    # Reserved concurrency 0 throttles every delivery; at time_scale 0.001 the 60 s maximum
    # age passes in 60 ms and the event goes to the on-failure destination.
    svc.register(fn(handler="handler.noop", reserved_concurrency=0, max_event_age_s=60))
    result = svc.invoke("fn", {"late": True}, invocation_type="Event")
    assert svc.wait_idle(30)
    record = json.loads((svc.run_dir / "destinations" / "fn.on-failure.jsonl").read_text())
    assert record["requestContext"]["condition"] == "EventAgeExceeded"
    assert record["requestContext"]["requestId"] == result.request_id
    assert record["requestContext"]["approximateInvokeCount"] == 0
    assert record["requestPayload"] == {"late": True}
    assert svc.ledger.records("fn") == []


def test_account_concurrency_limit_throttles_sync(make_service, backend):
    svc = make_service("portable" if backend == "portable" else "auto", account_concurrency=1)
    svc.register(fn(handler="handler.sleep", timeout_s=10))
    import threading
    import time

    t = threading.Thread(target=svc.invoke, args=("fn", {"seconds": 1.0}))
    t.start()
    time.sleep(0.3)
    with pytest.raises(TooManyRequestsException) as info:
        svc.invoke("fn", {"seconds": 0})
    assert info.value.extra["Reason"] == "ConcurrentInvocationLimitExceeded"
    t.join()
    assert svc.invoke("fn", {"seconds": 0}).function_error is None


@pytest.mark.slow
def test_init_phase_is_capped_at_ten_seconds(svc):
    svc.register(fn(handler="slow_init.handler", code_dir=BROKEN_DIR, timeout_s=2))
    result = svc.invoke("fn", {})
    assert result.json()["errorType"] == "Sandbox.Timedout"
    text = all_logs(svc)
    m = re.search(
        r"INIT_REPORT Init Duration: (\d+\.\d\d) ms\tPhase: init\tStatus: timeout\n", text
    )
    assert m and 10_000 <= float(m[1]) < 10_500
    assert re.search(rf"REPORT RequestId: {result.request_id}\t.*\tStatus: timeout\n", text)


def test_async_queue_counts_throttles_retries_and_drops(svc, tmp_path):
    svc.register(fn(name="slow", handler="handler.sleep", reserved_concurrency=1, timeout_s=10))
    svc.register(
        fn(
            name="bad",
            handler="handler.fail_always_async",
            max_retry_attempts=1,
            efs={"/mnt/efs": tmp_path},
        )
    )
    for _ in range(3):
        svc.invoke("slow", {"seconds": 0.2}, invocation_type="Event")
    svc.invoke("bad", {}, invocation_type="Event")
    assert svc.wait_idle(30)
    stats = svc.async_stats()
    assert stats["pending"] == 0
    assert stats["throttled"] >= 2  # two of the three "slow" events waited for the one slot
    assert stats["retries"] == 1 and stats["exhausted"] == 1 and stats["expired"] == 0


def test_close_ends_running_invocations_at_once(make_service, backend):
    import threading
    import time

    svc = make_service("portable" if backend == "portable" else "auto")
    svc.register(fn(handler="handler.sleep", timeout_s=60))
    results = []
    t = threading.Thread(target=lambda: results.append(svc.invoke("fn", {"seconds": 30})))
    t.start()
    svc.invoke("fn", {"seconds": 30}, invocation_type="Event")
    time.sleep(0.5)
    started = time.monotonic()
    svc.close()
    t.join(10)
    assert time.monotonic() - started < 10
    assert results and results[0].function_error == "Unhandled"
    assert results[0].record.status == "crash"
