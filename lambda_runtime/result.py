"""What an Invoke call returns to its caller (spec §5, §7)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lambda_runtime.billing import InvocationRecord


@dataclass(frozen=True)
class InvokeResult:
    """Status code, payload bytes and headers of one Invoke, plus the billing record when it ran."""

    status_code: int
    payload: bytes
    request_id: str
    function_error: str | None = None
    log_result: str | None = None
    executed_version: str | None = "$LATEST"
    record: InvocationRecord | None = None

    def json(self) -> Any:
        """The payload decoded as JSON (None for the empty body of 202/204)."""
        return json.loads(self.payload) if self.payload else None
