"""Where invocations run: Lambda's platform timings, EFS throughput modes, and EFS traffic.

:class:`Platform` holds what the predictor (:mod:`simulator.predict`) adds around each
invocation's measured Lambda-clock time: invoke latencies, the sandbox cold start before Init,
Lambda's async retry delays, the watchdog's schedule, and an :class:`EfsModel`. :func:`estimate_io`
says what one invocation of a role moves through EFS, from the sizes in a :class:`RunShape`.

EFS numbers (spec §9): ~1 ms per read and ~2.7 ms per write operation; a per-client cap of
1,500 MiB/s (elastic) or 500 MiB/s (bursting); file-system caps of 20 GiB/s read and 1 GiB/s
write (elastic, the low end of the Regions' range) or, bursting, 100 MiB/s metered (reads count a
third) while burst credits last -- "all file systems, regardless of size, can burst up to
100 MiB/s" (AWS knowledge center) -- else the baseline, 50 KiB/s per GiB stored (at least
1 MiB/s). Assumptions not in the spec, as named constants: the Invoke API's latency seen from
inside a function (``AWS_INVOKE_API_MS``), the async queue's dispatch delay
(``AWS_ASYNC_DISPATCH_MS``), the sandbox cold start before INIT_START (``AWS_COLD_START_MS``), and
the EventBridge check period (``WATCHDOG_PERIOD_S``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lambda_runtime import quotas

MIB = 1024 * 1024
GIB = 1024 * MIB
NFS_IO_BYTES = MIB  # rsize/wsize of the EFS mount helper: one operation moves at most 1 MiB
META_BYTES = 4096  # a small file: JSON, an .npy header, a claim, an arrival index

AWS_SYNC_INVOKE_MS = 20.0
AWS_ASYNC_DISPATCH_MS = 50.0
AWS_COLD_START_MS = 150.0
AWS_INVOKE_API_MS = 25.0
LOCAL_INVOKE_API_MS = 2.0
WATCHDOG_PERIOD_S = 60.0

# ------------------------------------------------------------------------------------------
# Platform and EFS models


@dataclass(frozen=True)
class EfsModel:
    """An EFS throughput mode: latency per operation, per-client cap, file-system caps."""

    mode: str
    read_latency_ms: float
    write_latency_ms: float
    per_client_mib_s: float
    read_mib_s: float
    write_mib_s: float
    metered: bool = False
    """True: reads and writes share one metered pool, reads counted at 1/3 (bursting)."""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (infinite rates as null)."""
        return {
            k: (None if isinstance(v, float) and math.isinf(v) else v)
            for k, v in asdict(self).items()
        }


def efs_model(mode: str, stored_bytes: int = 0) -> EfsModel:
    """The throughput model of an EFS mode: elastic, bursting, bursting-baseline or local."""
    if mode == "elastic":
        # Regional, Elastic (spec §9): ~1 / ~2.7 ms, 1,500 MiBps per client, FS 20-60 GiBps read
        # and 1-5 GiBps write; the low end is taken (it depends on the Region).
        return EfsModel(mode, 1.0, 2.7, 1500.0, 20.0 * 1024, 1.0 * 1024)
    if mode in ("bursting", "bursting-baseline"):
        tib = stored_bytes / (1024 * GIB)
        if mode == "bursting":
            # With burst credits: 100 MiB/s metered, or 100 MiB/s per TiB stored if more.
            metered = max(100.0, 100.0 * tib)
        else:
            # Credits spent: baseline 50 KiB/s per GiB stored, at least 1 MiB/s.
            metered = max(1.0, 50.0 / 1024 * stored_bytes / GIB)
        return EfsModel(mode, 1.0, 2.7, 500.0, metered, metered, metered=True)
    if mode == "local":
        return EfsModel(mode, 0.0, 0.0, math.inf, math.inf, math.inf)
    raise ValueError(
        f"efs mode: must be one of elastic, bursting, bursting-baseline, local; got {mode!r}"
    )


LOCAL_STORAGE = efs_model("local")


@dataclass(frozen=True)
class Platform:
    """Where the invocations are laid out: invoke latencies, cold starts, retries, EFS."""

    name: str
    sync_invoke_ms: float
    async_dispatch_ms: float
    cold_start_ms: float
    invoke_api_ms: float
    retry_delays_s: tuple[float, float]
    watchdog_period_s: float
    efs: EfsModel

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = asdict(self)
        out["retry_delays_s"] = list(self.retry_delays_s)
        out["efs"] = self.efs.to_json()
        return out


def aws_platform(efs_mode: str = "elastic", stored_bytes: int = 0) -> Platform:
    """Real Lambda with EFS in `efs_mode` (see the module docstring for the assumed values)."""
    return Platform(
        "aws",
        AWS_SYNC_INVOKE_MS,
        AWS_ASYNC_DISPATCH_MS,
        AWS_COLD_START_MS,
        AWS_INVOKE_API_MS,
        quotas.ASYNC_RETRY_DELAYS_S,
        WATCHDOG_PERIOD_S,
        efs_model(efs_mode, stored_bytes),
    )


def local_platform(dispatch_ms: float, time_scale: float) -> Platform:
    """This machine as measured in the run itself: its dispatch delay and scaled retry delays.

    Laying a run out on this platform reproduces the run's own critical path from its Lambda-
    clock durations; when the laptop really had a core per environment it equals the wall time.
    """
    d1, d2 = quotas.ASYNC_RETRY_DELAYS_S
    return Platform(
        "local",
        dispatch_ms,
        dispatch_ms,
        0.0,
        LOCAL_INVOKE_API_MS,
        (d1 * time_scale, d2 * time_scale),
        0.0,
        LOCAL_STORAGE,
    )


# ------------------------------------------------------------------------------------------
# What each invocation moves through EFS


@dataclass(frozen=True)
class Io:
    """Bytes and synchronous operations of one invocation on EFS."""

    read_bytes: int = 0
    read_ops: int = 0
    write_bytes: int = 0
    write_ops: int = 0


@dataclass(frozen=True)
class RunShape:
    """The sizes that decide EFS traffic, read from the run's EFS directory."""

    workers: int
    weights_bytes: int
    n_arrays: int
    velocity: bool
    sample_bytes: int
    test_bytes: int
    dataset_bytes: int
    stored_bytes: int
    shards: int = 0  # shard aggregators per round (0: the single combiner reads every result)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _ops(nbytes: int) -> int:
    return -(-nbytes // NFS_IO_BYTES)


def estimate_io(
    role: str, shape: RunShape, *, cold: bool, samples: int = 0, fanout_claim: bool = False
) -> Io:
    """EFS traffic of one invocation of `role` (the protocol's file layout; an estimate)."""
    w, k, meta = shape.weights_bytes, shape.n_arrays, META_BYTES
    state = 2 if shape.velocity else 1  # combine reads and writes velocity beside the weights
    opened = 6 if cold else 0  # a new process opens config.json, the manifest, the four arrays
    if role == "worker":
        data = samples * shape.sample_bytes
        read = w + data + 3 * meta
        write = w + 3 * meta
        return Io(
            read,
            k + 3 + opened + _ops(w) + _ops(data),
            write,
            # arrays, meta.json, rename; arrival: lock, index write, rename; attempt marker; claim
            k + 2 + 3 + 1 + int(fanout_claim) + _ops(w),
        )
    if role == "aggregate":  # reads its shard's results, publishes one partial
        inputs = -(-shape.workers // max(1, shape.shards))
        read = inputs * (w + meta)
        return Io(
            read,
            inputs * (k + 1) + opened + _ops(read),
            w + 2 * meta,
            k + 2 + 3 + 1 + int(fanout_claim) + _ops(w),
        )
    if role == "combine":
        test = shape.test_bytes if cold else 0  # a warm process keeps the held-out set
        # the single combiner reads every worker's result; a sharded one only the partials
        inputs = shape.shards or shape.workers
        read = inputs * (w + meta) + state * w + meta + test
        # pruning deletes the results of an older round: one unlink per file
        prune = shape.workers * (k + 1) + state * k + 2
        write = state * w + 5 * meta
        return Io(
            read,
            inputs * (k + 1) + state * k + 3 + opened + _ops(read),
            write,
            state * k + 2 + 6 + 1 + prune + _ops(write),
        )
    if role == "start":
        write = shape.dataset_bytes + w + 3 * meta
        return Io(2 * meta, 4, write, 5 + k + 2 + 6 + 2 + _ops(write))
    return Io()


def transfer_ms(io: Io, efs: EfsModel) -> tuple[float, float]:
    """(read ms, write ms) of `io` alone on `efs` (no other client in flight)."""
    return (
        io.read_ops * efs.read_latency_ms + 1000.0 * io.read_bytes / solo_rate(efs, "read"),
        io.write_ops * efs.write_latency_ms + 1000.0 * io.write_bytes / solo_rate(efs, "write"),
    )


def solo_rate(efs: EfsModel, kind: str) -> float:
    """Bytes/s of one transfer of `kind` alone on `efs`."""
    cap = efs.read_mib_s if kind == "read" else efs.write_mib_s
    if efs.metered and kind == "read":
        cap *= 3.0
    return min(efs.per_client_mib_s, cap) * MIB


__all__ = [
    "AWS_ASYNC_DISPATCH_MS",
    "AWS_COLD_START_MS",
    "AWS_INVOKE_API_MS",
    "AWS_SYNC_INVOKE_MS",
    "GIB",
    "LOCAL_INVOKE_API_MS",
    "LOCAL_STORAGE",
    "MIB",
    "WATCHDOG_PERIOD_S",
    "EfsModel",
    "Io",
    "Platform",
    "RunShape",
    "aws_platform",
    "efs_model",
    "estimate_io",
    "local_platform",
    "solo_rate",
    "transfer_ms",
]
