"""The Invoke HTTP API through an unmodified boto3 Lambda client, backed by a fake service."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from lambda_runtime.config import FunctionConfig
from lambda_runtime.errors import (
    InvalidParameterValueException,
    InvalidRequestContentException,
    RequestTooLargeException,
    ResourceNotFoundException,
    TooManyRequestsException,
)
from lambda_runtime.http_api import BODY_READ_LIMIT_BYTES, InvokeApiServer, parse_function_name
from lambda_runtime.result import InvokeResult

ACCOUNT = "123456789012"
REGION = "us-east-1"
SYNC_LIMIT_MESSAGE = "Request must be smaller than 6291456 bytes for the InvokeFunction operation"
PARSE_MESSAGE = (
    "Could not parse request body into json: Could not parse payload into json: "
    "Unexpected character ('n' (code 110)): was expecting comma to separate Object entries"
)


def arn(name: str) -> str:
    return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"


class FakeBackend:
    """Implements InvokeBackend with canned behaviour chosen by function name."""

    def __init__(self, configs: list[FunctionConfig]) -> None:
        self.configs = configs
        self.calls: list[dict[str, Any]] = []
        self.barrier: threading.Barrier | None = None
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def function_configs(self) -> list[FunctionConfig]:
        return list(self.configs)

    def function_arn(self, name: str) -> str:
        return arn(name)

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
        with self._lock:
            self.calls.append(
                {
                    "name": function_name,
                    "payload": payload,
                    "invocation_type": invocation_type,
                    "log_type": log_type,
                    "client_context": client_context,
                    "qualifier": qualifier,
                }
            )
        if function_name not in {c.name for c in self.configs}:
            raise ResourceNotFoundException(
                f"Function not found: {arn(function_name)}:{qualifier or '$LATEST'}"
            )
        if function_name == "throttled":
            raise TooManyRequestsException(
                "Rate Exceeded.",
                Reason="ReservedFunctionConcurrentInvocationLimitExceeded",
                retryAfterSeconds="7",
            )
        if function_name == "buggy":
            raise KeyError("a bug in the service")
        if len(payload) > 6 * 1024 * 1024:
            raise RequestTooLargeException(SYNC_LIMIT_MESSAGE)
        if payload.startswith(b"{bad"):
            raise InvalidRequestContentException(PARSE_MESSAGE)
        if invocation_type == "Event":
            return InvokeResult(202, b"", "req-event", executed_version=None)
        if invocation_type == "DryRun":
            return InvokeResult(204, b"", "req-dry", executed_version=None)
        if function_name == "fails":
            body = b'{"errorMessage": "boom", "errorType": "Exception"}'
            log = base64.b64encode(b"START RequestId: req-fail\nREPORT\n").decode()
            return InvokeResult(
                200,
                body,
                "req-fail",
                function_error="Unhandled",
                log_result=log if log_type == "Tail" else None,
            )
        if function_name == "slow" and self.barrier is not None:
            # Every caller waits here until all have arrived: proves the server runs them at once.
            self.barrier.wait(timeout=10)
        if function_name == "slow" and self.gate is not None:
            self.entered.set()
            self.gate.wait(timeout=10)
        return InvokeResult(200, payload, f"req-{function_name}", executed_version="$LATEST")


@pytest.fixture
def backend(tmp_path: Path) -> FakeBackend:
    code = tmp_path / "code"
    code.mkdir()
    names = ["echo", "fails", "throttled", "buggy", "slow"]
    configs = [FunctionConfig(name=n, handler="handler.main", code_dir=code) for n in names]
    configs.append(
        FunctionConfig(
            name="trainer",
            handler="worker.handler",
            code_dir=code,
            memory_mb=1769,
            timeout_s=900,
            ephemeral_mb=2048,
            environment={"STAGE": "test"},
            efs={"/mnt/shared": tmp_path / "efs"},
            reserved_concurrency=5,
            architecture="arm64",
            runtime="python3.11",
        )
    )
    return FakeBackend(configs)


@pytest.fixture
def server(backend: FakeBackend) -> Iterator[InvokeApiServer]:
    srv = InvokeApiServer(backend)
    srv.start()
    yield srv
    srv.stop()


def make_client(endpoint: str, **config: Any) -> Any:
    return boto3.client(
        "lambda",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        # total_max_attempts, not max_attempts: botocore reads max_attempts=1 as one *retry*.
        config=Config(retries={"total_max_attempts": 1}, **config),
    )


@pytest.fixture
def client(server: InvokeApiServer) -> Any:
    return make_client(server.endpoint)


# ---- parse_function_name -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "qualifier", "expected"),
    [
        ("echo", None, ("echo", None)),
        ("echo", "$LATEST", ("echo", "$LATEST")),
        ("echo:prod", None, ("echo", "prod")),
        ("echo:$LATEST", "$LATEST", ("echo", "$LATEST")),
        (f"{ACCOUNT}:function:echo", None, ("echo", None)),
        (f"{ACCOUNT}:function:echo:7", None, ("echo", "7")),
        (arn("echo"), None, ("echo", None)),
        (arn("echo") + ":live", None, ("echo", "live")),
        (
            "arn:aws-us-gov:lambda:us-gov-west-1:123456789012:function:my-fn_2",
            "1",
            ("my-fn_2", "1"),
        ),
    ],
)
def test_parse_function_name_accepts_every_documented_form(raw, qualifier, expected):
    assert parse_function_name(raw, qualifier) == expected


@pytest.mark.parametrize(
    "raw", ["", "a" * 257, "has space", "echo:prod:extra", "arn:aws:s3:::bucket", "a/b", "ec%ho"]
)
def test_parse_function_name_rejects_garbage_naming_the_field(raw):
    with pytest.raises(InvalidParameterValueException, match=r"^FunctionName: must be"):
        parse_function_name(raw, None)


def test_parse_function_name_rejects_conflicting_and_bad_qualifiers():
    with pytest.raises(InvalidParameterValueException, match="derived qualifier"):
        parse_function_name("echo:1", "2")
    with pytest.raises(InvalidParameterValueException, match=r"^Qualifier: must be"):
        parse_function_name("echo", "bad qualifier")


# ---- Invoke ----------------------------------------------------------------------------------


def test_sync_invoke_round_trips_status_payload_and_version(client, backend):
    response = client.invoke(FunctionName="echo", Payload=b'{"x": 1}')
    assert response["StatusCode"] == 200
    assert response["Payload"].read() == b'{"x": 1}'
    assert response["ExecutedVersion"] == "$LATEST"
    assert "FunctionError" not in response
    assert "LogResult" not in response
    headers = response["ResponseMetadata"]["HTTPHeaders"]
    assert headers["content-type"] == "application/json"
    assert response["ResponseMetadata"]["RequestId"] == "req-echo"
    assert backend.calls[-1]["invocation_type"] == "RequestResponse"
    assert backend.calls[-1]["log_type"] == "None"


def test_function_error_and_log_tail_reach_the_caller_with_status_200(client, backend):
    response = client.invoke(FunctionName="fails", LogType="Tail", Payload=b"{}")
    assert response["StatusCode"] == 200
    assert response["FunctionError"] == "Unhandled"
    assert json.loads(response["Payload"].read()) == {
        "errorMessage": "boom",
        "errorType": "Exception",
    }
    assert base64.b64decode(response["LogResult"]).startswith(b"START RequestId: req-fail")
    assert backend.calls[-1]["log_type"] == "Tail"


def test_event_invoke_is_202_with_empty_payload(client, backend):
    response = client.invoke(FunctionName="echo", InvocationType="Event", Payload=b"{}")
    assert response["StatusCode"] == 202
    assert response["Payload"].read() == b""
    assert "ExecutedVersion" not in response
    assert backend.calls[-1]["invocation_type"] == "Event"


def test_dry_run_is_204(client, backend):
    response = client.invoke(FunctionName="echo", InvocationType="DryRun")
    assert response["StatusCode"] == 204
    assert response["Payload"].read() == b""
    assert backend.calls[-1]["invocation_type"] == "DryRun"


def test_client_context_and_qualifier_are_forwarded(client, backend):
    context = base64.b64encode(json.dumps({"custom": {"k": "v"}}).encode()).decode()
    client.invoke(FunctionName="echo", ClientContext=context, Qualifier="$LATEST", Payload=b"{}")
    call = backend.calls[-1]
    assert call["client_context"] == context
    assert call["qualifier"] == "$LATEST"
    assert call["name"] == "echo"


@pytest.mark.parametrize(
    ("function_name", "qualifier"),
    [
        (arn("echo"), None),
        (arn("echo") + ":live", "live"),
        (f"{ACCOUNT}:function:echo", None),
        ("echo:7", "7"),
    ],
)
def test_arns_and_qualified_names_resolve_to_the_plain_name(
    client, backend, function_name, qualifier
):
    response = client.invoke(FunctionName=function_name, Payload=b"{}")
    assert response["StatusCode"] == 200
    assert (backend.calls[-1]["name"], backend.calls[-1]["qualifier"]) == ("echo", qualifier)


def test_unknown_function_raises_resource_not_found(client):
    with pytest.raises(client.exceptions.ResourceNotFoundException) as info:
        client.invoke(FunctionName="doesnotexist", Payload=b"{}")
    error = info.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert error["Error"]["Code"] == "ResourceNotFoundException"
    assert error["Error"]["Message"] == f"Function not found: {arn('doesnotexist')}:$LATEST"
    assert error["ResponseMetadata"]["RequestId"]


def test_throttle_raises_too_many_requests_with_reason_and_retry_after(client, backend):
    with pytest.raises(client.exceptions.TooManyRequestsException) as info:
        client.invoke(FunctionName="throttled", Payload=b"{}")
    error = info.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert error["Error"]["Message"] == "Rate Exceeded."
    assert error["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    assert error["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "7"
    assert "retryAfterSeconds" not in json.dumps(error["Error"])
    assert [c["name"] for c in backend.calls] == ["throttled"]  # not retried


def test_too_large_payload_raises_request_too_large(client):
    with pytest.raises(client.exceptions.RequestTooLargeException) as info:
        client.invoke(FunctionName="echo", Payload=b"x" * (6 * 1024 * 1024 + 1))
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert info.value.response["Error"]["Message"] == SYNC_LIMIT_MESSAGE


def test_unparseable_payload_raises_invalid_request_content(client):
    with pytest.raises(client.exceptions.InvalidRequestContentException) as info:
        client.invoke(FunctionName="echo", Payload=b"{bad json")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert info.value.response["Error"]["Message"] == PARSE_MESSAGE


def test_unexpected_backend_exception_is_a_500_service_exception(client, backend, caplog):
    with pytest.raises(client.exceptions.ServiceException) as info:
        client.invoke(FunctionName="buggy", Payload=b"{}")
    assert len(backend.calls) == 1
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert "KeyError" in info.value.response["Error"]["Message"]
    assert any(r.exc_info for r in caplog.records if r.name == "lambda_runtime.http_api")
    # The connection survived: the next call on the same client works.
    assert client.invoke(FunctionName="echo", Payload=b"{}")["StatusCode"] == 200


def test_unknown_invocation_and_log_types_name_the_header_and_allowed_values(client, backend):
    with pytest.raises(client.exceptions.InvalidParameterValueException) as info:
        client.invoke(FunctionName="echo", InvocationType="Later")
    assert info.value.response["Error"]["Message"] == (
        "X-Amz-Invocation-Type: must be one of RequestResponse, Event, DryRun "
        "(default RequestResponse), got 'Later'"
    )
    with pytest.raises(client.exceptions.InvalidParameterValueException) as info:
        client.invoke(FunctionName="echo", LogType="Everything")
    assert "X-Amz-Log-Type: must be one of None, Tail" in info.value.response["Error"]["Message"]
    assert backend.calls == []


def test_garbage_function_name_is_invalid_parameter_value(client, backend):
    with pytest.raises(client.exceptions.InvalidParameterValueException) as info:
        client.invoke(FunctionName="not a name!", Payload=b"{}")
    assert info.value.response["Error"]["Message"].startswith("FunctionName: must be")
    assert backend.calls == []


def test_five_megabyte_payload_round_trips(client, backend):
    payload = json.dumps({"data": "y" * (5 * 1024 * 1024)}).encode()
    response = client.invoke(FunctionName="echo", Payload=payload)
    assert response["Payload"].read() == payload
    assert backend.calls[-1]["payload"] == payload


def test_twenty_concurrent_sync_invokes_are_all_answered(server, backend):
    backend.barrier = threading.Barrier(20)
    client = make_client(server.endpoint, max_pool_connections=20)

    def call(i: int) -> tuple[int, bytes]:
        response = client.invoke(FunctionName="slow", Payload=json.dumps({"i": i}).encode())
        return response["StatusCode"], response["Payload"].read()

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(call, range(20)))
    assert results == [(200, json.dumps({"i": i}).encode()) for i in range(20)]
    assert not backend.barrier.broken


def test_legacy_invoke_async_is_202(client, backend):
    response = client.invoke_async(FunctionName="echo", InvokeArgs=b'{"a": 1}')
    assert response["Status"] == 202
    assert backend.calls[-1]["invocation_type"] == "Event"
    assert backend.calls[-1]["payload"] == b'{"a": 1}'


# ---- function metadata ---------------------------------------------------------------------


def test_list_functions_returns_each_configuration(client, backend):
    functions = client.list_functions()["Functions"]
    assert [f["FunctionName"] for f in functions] == [c.name for c in backend.configs]
    trainer = functions[-1]
    assert trainer["FunctionArn"] == arn("trainer")
    assert trainer["Runtime"] == "python3.11"
    assert trainer["Handler"] == "worker.handler"
    assert trainer["MemorySize"] == 1769
    assert trainer["Timeout"] == 900
    assert trainer["EphemeralStorage"] == {"Size": 2048}
    assert trainer["Environment"] == {"Variables": {"STAGE": "test"}}
    assert [fs["LocalMountPath"] for fs in trainer["FileSystemConfigs"]] == ["/mnt/shared"]
    assert trainer["FileSystemConfigs"][0]["Arn"].startswith(
        f"arn:aws:elasticfilesystem:{REGION}:{ACCOUNT}:access-point/fsap-"
    )
    assert trainer["Architectures"] == ["arm64"]
    assert (trainer["Version"], trainer["State"]) == ("$LATEST", "Active")
    assert "Environment" not in functions[0]


def test_list_functions_paginates_with_marker(client, backend):
    first = client.list_functions(MaxItems=4)
    assert len(first["Functions"]) == 4
    rest = client.list_functions(MaxItems=4, Marker=first["NextMarker"])
    assert "NextMarker" not in rest
    names = [f["FunctionName"] for f in first["Functions"] + rest["Functions"]]
    assert names == [c.name for c in backend.configs]
    paged = client.get_paginator("list_functions").paginate(PaginationConfig={"PageSize": 2})
    assert [f["FunctionName"] for page in paged for f in page["Functions"]] == names


def test_get_function_and_configuration(client):
    response = client.get_function(FunctionName=arn("trainer"))
    assert response["Configuration"]["FunctionName"] == "trainer"
    assert response["Configuration"]["MemorySize"] == 1769
    assert response["Code"] == {"RepositoryType": "S3", "Location": ""}
    assert response["Concurrency"] == {"ReservedConcurrentExecutions": 5}
    assert "Concurrency" not in client.get_function(FunctionName="echo")
    config = client.get_function_configuration(FunctionName="trainer", Qualifier="$LATEST")
    assert config["Handler"] == "worker.handler"
    assert config["FunctionArn"] == arn("trainer")


def test_get_function_of_unknown_function_or_version_is_not_found(client):
    with pytest.raises(client.exceptions.ResourceNotFoundException) as info:
        client.get_function(FunctionName="nope")
    assert info.value.response["Error"]["Message"] == f"Function not found: {arn('nope')}"
    with pytest.raises(client.exceptions.ResourceNotFoundException) as info:
        client.get_function_configuration(FunctionName="echo:7")
    assert info.value.response["Error"]["Message"] == f"Function not found: {arn('echo')}:7"


# ---- HTTP plumbing ---------------------------------------------------------------------------


def raw_connection(server: InvokeApiServer) -> http.client.HTTPConnection:
    host, port = server.endpoint.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=5)


def test_unknown_route_is_404_unknown_operation(server):
    conn = raw_connection(server)
    conn.request("DELETE", "/2015-03-31/functions/echo/nothing")
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 404
    assert response.getheader("x-amzn-ErrorType") == "UnknownOperationException"
    assert body["message"] == "Unknown operation: DELETE /2015-03-31/functions/echo/nothing"
    assert response.getheader("x-amzn-RequestId")


def test_keep_alive_with_exact_content_length(server):
    conn = raw_connection(server)
    for i in range(3):
        payload = json.dumps({"i": i}).encode()
        conn.request("POST", "/2015-03-31/functions/echo/invocations", body=payload)
        response = conn.getresponse()
        assert response.getheader("Content-Length") == str(len(payload))
        assert response.read() == payload
        assert not response.will_close
    conn.close()


def test_requests_leave_nothing_on_stderr(client, capfd):
    client.invoke(FunctionName="echo", Payload=b"{}")
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.invoke(FunctionName="missing", Payload=b"{}")
    assert capfd.readouterr().err == ""


def test_stop_closes_the_port_and_idle_connections_promptly(backend):
    server = InvokeApiServer(backend)
    endpoint = server.start()
    assert server.start() == endpoint  # idempotent while running
    idle = raw_connection(server)
    idle.request("POST", "/2015-03-31/functions/echo/invocations", body=b"{}")
    assert idle.getresponse().read() == b"{}"
    port = int(endpoint.rsplit(":", 1)[1])
    began = time.monotonic()
    server.stop()
    server.stop()  # idempotent
    assert time.monotonic() - began < 2
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    assert idle.sock is not None
    idle.sock.settimeout(2)
    assert idle.sock.recv(1) == b""  # the server hung up the kept-alive connection
    with pytest.raises(RuntimeError):
        _ = server.endpoint


def test_stop_is_prompt_and_still_answers_an_invoke_in_flight(backend):
    backend.gate = threading.Event()
    server = InvokeApiServer(backend)
    server.start()
    port = int(server.endpoint.rsplit(":", 1)[1])
    conn = raw_connection(server)
    answers: list[tuple[int, bytes, str | None]] = []

    def call() -> None:
        conn.request("POST", "/2015-03-31/functions/slow/invocations", body=b'{"n": 1}')
        response = conn.getresponse()
        answers.append((response.status, response.read(), response.getheader("Connection")))

    caller = threading.Thread(target=call)
    caller.start()
    assert backend.entered.wait(5)
    began = time.monotonic()
    server.stop()
    assert time.monotonic() - began < 2
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    backend.gate.set()
    caller.join(5)
    assert answers == [(200, b'{"n": 1}', "close")]


def test_chunked_request_body_is_decoded(server, backend):
    conn = raw_connection(server)
    chunks = [b'{"parts": ', b'"a', b'b"}']
    conn.request(
        "POST", "/2015-03-31/functions/echo/invocations", body=iter(chunks), encode_chunked=True
    )
    response = conn.getresponse()
    assert response.read() == b'{"parts": "ab"}'
    assert backend.calls[-1]["payload"] == b'{"parts": "ab"}'


def test_body_past_the_read_limit_is_drained_and_refused_with_413(server, backend):
    conn = raw_connection(server)
    body = b"z" * (BODY_READ_LIMIT_BYTES + 1)
    conn.request("POST", "/2015-03-31/functions/echo/invocations", body=body)
    response = conn.getresponse()
    assert response.status == 413
    assert response.getheader("x-amzn-ErrorType") == "RequestTooLargeException"
    assert json.loads(response.read())["message"] == SYNC_LIMIT_MESSAGE
    assert backend.calls == []


def test_malformed_content_length_is_400_and_closes(server, backend):
    host, port = server.endpoint.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /2015-03-31/functions/echo/invocations HTTP/1.1\r\n"
            b"Host: x\r\nContent-Length: ten\r\n\r\n"
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"x-amzn-ErrorType: InvalidRequestContentException" in head
    assert (
        json.loads(body)["message"] == "Content-Length: must be a whole number of bytes, got 'ten'"
    )
    assert backend.calls == []
