"""AWS Lambda quotas and fixed values (lambda-semantics.md §1, §4, §5, §8), as named constants."""

from __future__ import annotations

MEMORY_MIN_MB = 128
MEMORY_MAX_MB = 10_240
MEMORY_DEFAULT_MB = 128

TIMEOUT_MIN_S = 1
TIMEOUT_MAX_S = 900
TIMEOUT_DEFAULT_S = 3

EPHEMERAL_MIN_MB = 512
EPHEMERAL_MAX_MB = 10_240
EPHEMERAL_DEFAULT_MB = 512

ENV_VARS_MAX_BYTES = 4096
MAX_EFS_MOUNTS = 1
EFS_MOUNT_PATH_PATTERN = r"/mnt/[a-zA-Z0-9\-_.]+"
EFS_MOUNT_PATH_MAX_CHARS = 160

ASYNC_RETRIES_MIN = 0
ASYNC_RETRIES_MAX = 2
ASYNC_RETRIES_DEFAULT = 2
ASYNC_RETRY_DELAYS_S = (60.0, 120.0)
EVENT_AGE_MIN_S = 60
EVENT_AGE_MAX_S = 21_600
EVENT_AGE_DEFAULT_S = 21_600

ACCOUNT_CONCURRENCY_DEFAULT = 1000
UNRESERVED_CONCURRENCY_MIN = 100

SYNC_REQUEST_MAX_BYTES = 6 * 1024 * 1024  # 6,291,456
SYNC_RESPONSE_MAX_BYTES = 6 * 1024 * 1024 + 100  # 6,291,556 (RIE interop/model.go)
ASYNC_REQUEST_MAX_BYTES = 1024 * 1024  # 1 MB since Oct 2025 (was 262,144)
LOG_TAIL_BYTES = 4096

INIT_TIMEOUT_S = 10.0
SHUTDOWN_TIMEOUT_S = 2.0

MB_PER_VCPU = 1769
MAX_VCPUS = 6

NOFILE_LIMIT = 1024

REGION_DEFAULT = "us-east-1"
ACCOUNT_ID_DEFAULT = "000000000000"
FUNCTION_VERSION = "$LATEST"

RESERVED_ENV_VARS = frozenset(
    {
        "_HANDLER",
        "_X_AMZN_TRACE_ID",
        "AWS_REGION",
        "AWS_EXECUTION_ENV",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_INITIALIZATION_TYPE",
        "AWS_LAMBDA_LOG_GROUP_NAME",
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "AWS_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_LAMBDA_RUNTIME_API",
        "LAMBDA_TASK_ROOT",
        "LAMBDA_RUNTIME_DIR",
        "TZ",
        "AWS_DEFAULT_REGION",
    }
)


def vcpus_for_memory(memory_mb: int) -> float:
    """CPU share Lambda grants for a memory size: 1,769 MB buys one vCPU; 10,240 MB buys six.

    Linear at 1,769 MB per vCPU up to five vCPUs (8,845 MB); from there AWS's top size still
    gets six, so the last stretch is interpolated to reach 6.0 at 10,240 MB.
    """
    five = 5 * MB_PER_VCPU
    if memory_mb <= five:
        return memory_mb / MB_PER_VCPU
    return min(5.0 + (memory_mb - five) / (MEMORY_MAX_MB - five), float(MAX_VCPUS))
