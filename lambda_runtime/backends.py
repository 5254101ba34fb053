"""The registry of execution-environment backends, by the name `ServiceSettings.backend` uses."""

from __future__ import annotations

from lambda_runtime.environment import ExecutionEnvironment
from lambda_runtime.process_env import ProcessEnvironment

BACKENDS: dict[str, type[ExecutionEnvironment]] = {"process": ProcessEnvironment}
