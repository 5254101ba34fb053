"""A local AWS Lambda + EFS: execution environments with Lambda's limits, logs, billing and API."""

from __future__ import annotations

from lambda_runtime.config import FunctionConfig, ServiceSettings
from lambda_runtime.errors import (
    ConfigError,
    LambdaRuntimeError,
    ResourceNotFoundException,
    ServiceError,
    TooManyRequestsException,
)
from lambda_runtime.result import InvokeResult
from lambda_runtime.service import LambdaService

__all__ = [
    "ConfigError",
    "FunctionConfig",
    "InvokeResult",
    "LambdaRuntimeError",
    "LambdaService",
    "ResourceNotFoundException",
    "ServiceError",
    "ServiceSettings",
    "TooManyRequestsException",
]
