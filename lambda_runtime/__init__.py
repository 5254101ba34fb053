"""A local AWS Lambda + EFS: execution environments with Lambda's limits, logs, billing and API."""

from __future__ import annotations

TYPE_CHECKING = False  # not `typing`: the runtime of every cold start imports this package
if TYPE_CHECKING:  # for type checkers only: the names below are what __getattr__ returns
    from typing import Any

    from lambda_runtime.config import (
        FunctionConfig as FunctionConfig,
    )
    from lambda_runtime.config import (
        ServiceSettings as ServiceSettings,
    )
    from lambda_runtime.errors import (
        ConfigError as ConfigError,
    )
    from lambda_runtime.errors import (
        LambdaRuntimeError as LambdaRuntimeError,
    )
    from lambda_runtime.errors import (
        ResourceNotFoundException as ResourceNotFoundException,
    )
    from lambda_runtime.errors import (
        ServiceError as ServiceError,
    )
    from lambda_runtime.errors import (
        TooManyRequestsException as TooManyRequestsException,
    )
    from lambda_runtime.result import InvokeResult as InvokeResult
    from lambda_runtime.service import LambdaService as LambdaService

# Imported on first use: an execution environment's runtime imports this package too, and must
# not pay for the service, the HTTP server and the pool at every cold start.
_EXPORTS = {
    "FunctionConfig": "lambda_runtime.config",
    "ServiceSettings": "lambda_runtime.config",
    "ConfigError": "lambda_runtime.errors",
    "LambdaRuntimeError": "lambda_runtime.errors",
    "ResourceNotFoundException": "lambda_runtime.errors",
    "ServiceError": "lambda_runtime.errors",
    "TooManyRequestsException": "lambda_runtime.errors",
    "InvokeResult": "lambda_runtime.result",
    "LambdaService": "lambda_runtime.service",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lambda_runtime' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
