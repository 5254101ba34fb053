"""The `context` object a handler receives (spec §2), with AWS's exact attribute names and types."""

from __future__ import annotations

import logging
import mmap
import os
import struct
import sys
import time

TYPE_CHECKING = False  # no `typing` import: this module is on every cold start's path
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# Layout of the shared clock page the parent updates while an invocation runs:
# sequence, Lambda-clock seconds elapsed at the sample, wall time of the sample, Lambda/wall rate.
CLOCK_PAGE = struct.Struct("<Qddd")


class CognitoIdentity:
    """Cognito identity; both ids are None unless the caller sent one."""

    __slots__ = ("cognito_identity_id", "cognito_identity_pool_id")

    def __init__(self, identity_id: str | None = None, pool_id: str | None = None) -> None:
        self.cognito_identity_id = identity_id
        self.cognito_identity_pool_id = pool_id

    def __repr__(self) -> str:
        return (
            f"CognitoIdentity([cognito_identity_id={self.cognito_identity_id},"
            f"cognito_identity_pool_id={self.cognito_identity_pool_id}])"
        )


class Client:
    """The `client` part of a mobile client context."""

    __slots__ = (
        "app_package_name",
        "app_title",
        "app_version_code",
        "app_version_name",
        "installation_id",
    )

    def __init__(self, values: dict[str, Any]) -> None:
        for name in self.__slots__:
            setattr(self, name, values.get(name))


class ClientContext:
    """`context.client_context`: set only for sync invokes with X-Amz-Client-Context."""

    __slots__ = ("client", "custom", "env")

    def __init__(self, values: dict[str, Any]) -> None:
        self.custom = values.get("custom")
        self.env = values.get("env")
        client = values.get("client")
        self.client = Client(client) if isinstance(client, dict) else None


class ClockPage:
    """Reader of the Lambda clock the parent publishes; extrapolates between its samples."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, CLOCK_PAGE.size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def elapsed_s(self) -> float:
        """Lambda-clock seconds elapsed since the invocation started."""
        while True:
            seq, elapsed, at_wall, rate = CLOCK_PAGE.unpack_from(self._map, 0)
            if seq % 2 == 0:  # an odd sequence means the parent is mid-update
                seq2 = CLOCK_PAGE.unpack_from(self._map, 0)[0]
                if seq2 == seq:
                    return float(elapsed + max(0.0, time.time() - at_wall) * rate)


class LambdaContext:
    """Per-invocation context, built from the invoke message as the Runtime API headers would."""

    def __init__(
        self,
        invoke_id: str,
        client_context: dict[str, Any] | None,
        cognito_identity: dict[str, Any] | None,
        epoch_deadline_time_in_ms: int,
        invoked_function_arn: str | None = None,
        tenant_id: str | None = None,
        remaining_ms: Callable[[], int] | None = None,
    ) -> None:
        self.aws_request_id = invoke_id
        self.log_group_name = os.environ.get("AWS_LAMBDA_LOG_GROUP_NAME")
        self.log_stream_name = os.environ.get("AWS_LAMBDA_LOG_STREAM_NAME")
        self.function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME")
        self.memory_limit_in_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
        self.function_version = os.environ.get("AWS_LAMBDA_FUNCTION_VERSION")
        self.invoked_function_arn = invoked_function_arn
        self.tenant_id = tenant_id
        self.client_context = ClientContext(client_context) if client_context is not None else None
        identity = cognito_identity or {}
        self.identity = CognitoIdentity(
            identity.get("cognitoIdentityId"), identity.get("cognitoIdentityPoolId")
        )
        self._epoch_deadline_time_in_ms = epoch_deadline_time_in_ms
        self._remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before the deadline, never below 0 (on the service's clock)."""
        if self._remaining_ms is not None:
            return max(0, self._remaining_ms())
        delta = self._epoch_deadline_time_in_ms - int(time.time() * 1000)
        return delta if delta > 0 else 0

    def log(self, msg: object) -> None:
        """Write `str(msg)` to the function's log, as the AWS runtime does."""
        for handler in logging.getLogger().handlers:
            sink = getattr(handler, "stream", None)
            if sink is not None and getattr(handler, "_lambda_sink", False):
                sink.write(str(msg))
                return
        sys.stdout.write(str(msg))

    def __repr__(self) -> str:
        return (
            f"LambdaContext([aws_request_id={self.aws_request_id},"
            f"log_group_name={self.log_group_name},log_stream_name={self.log_stream_name},"
            f"function_name={self.function_name},memory_limit_in_mb={self.memory_limit_in_mb},"
            f"function_version={self.function_version},"
            f"invoked_function_arn={self.invoked_function_arn},"
            f"client_context={self.client_context},identity={self.identity},"
            f"tenant_id={self.tenant_id}])"
        )
