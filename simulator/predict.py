"""Predicted end-to-end time on real Lambda: every invocation laid out as it would run there.

The local run gives each invocation's duration on the Lambda clock (what the function would have
had with its own vCPU share) and its Init Duration. On a laptop the invocations queue for two
cores; on Lambda each execution environment has its own hardware. So the predictor replays the
run's dependency graph on an idle cloud:

* the runner's start invoke (``sync_invoke_ms``) -> start -> the N workers of round 0, each
  ``async_dispatch_ms`` after the fan-out; the last worker of round r to arrive -> combine r
  (``async_dispatch_ms`` later) -> the N workers of round r+1 -> ... -> the final combine;
* a cold invocation first pays ``cold_start_ms`` (sandbox and network setup, not in Init
  Duration) and its measured Init Duration;
* a failed attempt is retried by Lambda after 60 s, then 120 s (same request id); a new request
  for the same (role, round, worker) after a failure is a watchdog rescue, which on AWS fires
  ``stall_after`` after the fan-out plus up to one schedule period; a request after a success is a
  duplicate and runs beside it;
* each invocation's EFS traffic (:func:`simulator.platform.estimate_io`: weights, the data it
  trains on, gradients, metadata; ``ops`` synchronous NFS operations) is replayed under a
  throughput model of spec §9:
  a per-operation latency, a per-client cap (one NFS client per environment), and a file-system
  cap shared by all transfers in flight (fluid max-min sharing between equal clients). The CPU
  part of an invocation is its measured duration minus what the same traffic cost locally.

The answer is the critical path: the chain of invocations from the start to the final combine
whose delays add up to the end-to-end time, with the time per phase along it.

The platform's timings and the EFS models, with their sources and assumptions, are in
:mod:`simulator.platform`. Known approximations: the lock that serialises arrivals is not
modelled (each arrival's few operations are counted, not their queueing), and invocations a
failed run never reached are not invented.
"""

from __future__ import annotations

import heapq
import itertools
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from simulator.platform import (
    LOCAL_INVOKE_API_MS,
    LOCAL_STORAGE,
    MIB,
    EfsModel,
    Io,
    Platform,
    local_platform,
    solo_rate,
    transfer_ms,
)

FANOUT_THREADS = 16  # simulator.invoke sends fan-outs of more than 4 events on 16 threads
FANOUT_SEQUENTIAL_MAX = 4

PHASES = (
    "invoke latency",
    "cold start",
    "efs read",
    "start compute",
    "worker compute",
    "combine compute",
    "efs write",
    "retries and rescues",
)
"""Phase names of :attr:`Prediction.phases_s` and of critical-path segments."""


# ------------------------------------------------------------------------------------------
# Inputs and outputs


@dataclass(frozen=True)
class Invocation:
    """One recorded invocation, attributed to its role (the runner joins ledger and logs)."""

    request_id: str
    attempt: int
    role: str
    round: int | None
    worker: int | None
    env_id: str
    cold: bool
    init_ms: float
    duration_ms: float
    status: str
    start_s: float
    end_s: float
    io: Io = field(default_factory=Io)
    fanout: int = 0
    """Invoke API calls it made (N for a fan-out, 1 for a worker that invoked the combine)."""
    fixed: bool = False
    """Keep the measured duration (timeouts, early stops): EFS speed would not change it."""

    @property
    def key(self) -> str:
        """Unique per attempt."""
        return f"{self.request_id}#{self.attempt}"

    @property
    def chain(self) -> tuple[str, int | None, int | None]:
        """(role, round, worker): what this invocation computes."""
        return (self.role, self.round, self.worker)


@dataclass(frozen=True)
class Segment:
    """A stretch of the critical path."""

    phase: str
    start_s: float
    end_s: float
    role: str
    round: int | None
    worker: int | None
    attempt: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class Placed:
    """Where the predictor put one invocation, with its phases."""

    key: str
    start_s: float = math.nan
    end_s: float = math.nan
    phases: list[tuple[str, float, float]] = field(default_factory=list)


@dataclass
class Prediction:
    """The laid-out run: end-to-end time, its critical path and the time per phase."""

    platform: Platform
    total_s: float
    finished: bool
    critical_path: list[Segment]
    phases_s: dict[str, float]
    totals_s: dict[str, float]
    placed: dict[str, Placed]
    efs_read_bytes: int
    efs_write_bytes: int
    unplaced: int = 0

    def to_json(self, with_path: bool = True) -> dict[str, Any]:
        """JSON-ready dict (the per-invocation layout is reported with the timeline)."""
        out: dict[str, Any] = {
            "platform": self.platform.to_json(),
            "total_s": self.total_s,
            "finished": self.finished,
            "critical_path_phases_s": self.phases_s,
            "all_invocations_phases_s": self.totals_s,
            "efs_read_bytes": self.efs_read_bytes,
            "efs_write_bytes": self.efs_write_bytes,
            "unplaced_invocations": self.unplaced,
        }
        if with_path:
            out["critical_path"] = _merge_segments(self.critical_path)
        return out


def _merge_segments(segments: Sequence[Segment]) -> list[dict[str, Any]]:
    """The path as one row per (invocation, phase) stretch, in time order."""
    rows: list[dict[str, Any]] = []
    for s in segments:
        if s.end_s <= s.start_s:
            continue
        last = rows[-1] if rows else None
        same = last is not None and all(
            last[k] == v
            for k, v in (
                ("phase", s.phase),
                ("role", s.role),
                ("round", s.round),
                ("worker", s.worker),
                ("attempt", s.attempt),
            )
        )
        if last is not None and same and abs(last["end_s"] - s.start_s) < 1e-9:
            last["end_s"] = s.end_s
        else:
            rows.append(s.to_json())
    return rows


# ------------------------------------------------------------------------------------------
# The fluid simulation of shared EFS throughput


@dataclass
class _Flow:
    kind: str
    remaining: float
    done: Callable[[], None]


class _Engine:
    """Discrete events plus fluid transfers sharing the file system's throughput."""

    def __init__(self, efs: EfsModel) -> None:
        self.efs = efs
        self.t = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._flows: dict[int, _Flow] = {}

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(when, self.t), next(self._seq), fn))

    def transfer(self, kind: str, nbytes: float, done: Callable[[], None]) -> None:
        if nbytes <= 0 or math.isinf(solo_rate(self.efs, kind)):
            self.at(self.t, done)
        else:
            self._flows[next(self._seq)] = _Flow(kind, float(nbytes), done)

    def _rates(self) -> dict[int, float]:
        efs = self.efs
        client = efs.per_client_mib_s * MIB
        if efs.metered:
            share = efs.read_mib_s * MIB / max(1, len(self._flows))
            return {
                i: min(client, share * (3.0 if f.kind == "read" else 1.0))
                for i, f in self._flows.items()
            }
        count: dict[str, int] = defaultdict(int)
        for f in self._flows.values():
            count[f.kind] += 1
        caps = {"read": efs.read_mib_s * MIB, "write": efs.write_mib_s * MIB}
        return {i: min(client, caps[f.kind] / count[f.kind]) for i, f in self._flows.items()}

    def run(self) -> None:
        while self._heap or self._flows:
            rates = self._rates()
            dt_flow = min(
                (f.remaining / rates[i] for i, f in self._flows.items()), default=math.inf
            )
            dt_event = self._heap[0][0] - self.t if self._heap else math.inf
            dt = max(0.0, min(dt_flow, dt_event))
            finished = []
            for i, f in self._flows.items():
                f.remaining -= rates[i] * dt
                if f.remaining <= 1e-9 * max(1.0, rates[i]):
                    finished.append(i)
            self.t += dt
            for i in finished:
                self._flows.pop(i).done()
            while self._heap and self._heap[0][0] <= self.t + 1e-12:
                _, _, fn = heapq.heappop(self._heap)
                fn()


# ------------------------------------------------------------------------------------------
# Laying the run out


@dataclass
class _Chain:
    key: tuple[str, int | None, int | None]
    attempts: list[Invocation]
    trigger_t: float = math.nan
    trigger_from: _Chain | None = None
    arrived_t: float = math.nan
    started: bool = False


def _compute_phase(role: str) -> str:
    phase = {"start": "start compute", "worker": "worker compute", "aggregate": "combine compute"}
    return {**phase, "combine": "combine compute"}.get(role, "worker compute")


class _Layout:
    def __init__(
        self,
        invocations: Sequence[Invocation],
        platform: Platform,
        workers: int,
        stall_after_s: float,
        local_storage: EfsModel,
    ) -> None:
        self.p = platform
        self.workers = workers
        self.stall_after_s = stall_after_s
        self.local = local_storage
        self.engine = _Engine(platform.efs)
        self.placed: dict[str, Placed] = {}
        groups: dict[tuple[str, int | None, int | None], list[Invocation]] = defaultdict(list)
        self.unplaced = 0
        for inv in invocations:
            if inv.role not in ("start", "worker", "aggregate", "combine") or (
                inv.role != "start" and inv.round is None
            ):
                self.unplaced += 1
                continue
            groups[inv.chain].append(inv)
        self.chains = {
            key: _Chain(key, sorted(v, key=lambda i: (i.start_s, i.attempt)))
            for key, v in groups.items()
        }
        self.rounds = sorted({k[1] for k in self.chains if k[0] != "start" and k[1] is not None})
        self.arrived_workers: dict[int, list[_Chain]] = defaultdict(list)
        # Sharded aggregation: worker w of a round feeds shard w % shards; a shard's aggregator
        # starts when its workers arrived, the combine when every shard's partial arrived.
        self.shards = 1 + max(
            (k[2] for k in self.chains if k[0] == "aggregate" and k[2] is not None), default=-1
        )
        self.arrived_by_shard: dict[tuple[int, int], int] = defaultdict(int)
        self.arrived_partials: dict[int, int] = defaultdict(int)
        self.last: _Chain | None = None

    # ---- one invocation ----------------------------------------------------------------
    def _launch(
        self, inv: Invocation, when: float, latency_ms: float, done: Callable[[], None]
    ) -> None:
        placed = Placed(inv.key)
        self.placed[inv.key] = placed
        eng, p = self.engine, self.p
        phases = placed.phases

        def step(name: str, ms: float, nxt: Callable[[], None]) -> None:
            t0 = eng.t

            def end() -> None:
                phases.append((name, t0, eng.t))
                nxt()

            eng.at(t0 + ms / 1000.0, end)

        def flow(name: str, kind: str, nbytes: int, nxt: Callable[[], None]) -> None:
            t0 = eng.t

            def end() -> None:
                if eng.t > t0:
                    phases.append((name, t0, eng.t))
                nxt()

            eng.transfer(kind, nbytes, end)

        extra_api = _fanout_calls(inv.fanout) * max(0.0, p.invoke_api_ms - LOCAL_INVOKE_API_MS)
        local_r, local_w = transfer_ms(inv.io, self.local)
        cpu_ms = max(0.0, inv.duration_ms - local_r - local_w) + extra_api
        init_ms = (p.cold_start_ms + inv.init_ms) if inv.cold else 0.0

        def finish() -> None:
            placed.end_s = eng.t
            done()

        def write() -> None:
            step(
                "efs write",
                inv.io.write_ops * p.efs.write_latency_ms,
                lambda: flow("efs write", "write", inv.io.write_bytes, finish),
            )

        def compute() -> None:
            step(_compute_phase(inv.role), cpu_ms, write)

        def read() -> None:
            step(
                "efs read",
                inv.io.read_ops * p.efs.read_latency_ms,
                lambda: flow("efs read", "read", inv.io.read_bytes, compute),
            )

        def fixed() -> None:
            step(_compute_phase(inv.role), inv.duration_ms + extra_api, finish)

        def begin() -> None:
            placed.start_s = eng.t
            step("cold start", init_ms, fixed if inv.fixed else read)

        def dispatched() -> None:
            begin()

        eng.at(when, lambda: step("invoke latency", latency_ms, dispatched))

    # ---- chains ------------------------------------------------------------------------
    def _trigger(
        self, chain: _Chain, when: float, source: _Chain | None, latency_ms: float
    ) -> None:
        if chain.started:
            return
        chain.started = True
        chain.trigger_t = when
        chain.trigger_from = source
        self._attempt(chain, 0, when, latency_ms, anchor=when)

    def _attempt(
        self, chain: _Chain, index: int, when: float, latency_ms: float, anchor: float
    ) -> None:
        inv = chain.attempts[index]

        def done() -> None:
            end = self.engine.t
            if inv.status == "success" and math.isnan(chain.arrived_t):
                chain.arrived_t = end
                self._arrived(chain)
            if index + 1 >= len(chain.attempts):
                return
            nxt = chain.attempts[index + 1]
            if nxt.request_id == inv.request_id:  # Lambda's own retry of a failed attempt
                delay = self.p.retry_delays_s[min(max(inv.attempt, 1), 2) - 1]
                self._attempt(chain, index + 1, end + delay, self.p.async_dispatch_ms, anchor)
            elif inv.status == "success":
                # A duplicate: it was sent alongside, not because this attempt failed.
                self._attempt(chain, index + 1, chain.trigger_t, self.p.async_dispatch_ms, anchor)
            else:  # a watchdog rescue after the round stalled
                rescue = max(end, anchor + self.stall_after_s + self.p.watchdog_period_s)
                self._attempt(chain, index + 1, rescue, self.p.async_dispatch_ms, rescue)

        self._launch(inv, when, latency_ms, done)

    def _arrived(self, chain: _Chain) -> None:
        role, r, _ = chain.key
        t = chain.arrived_t
        if self.last is None or t >= self.last.arrived_t:
            self.last = chain
        if role == "start":
            self._fan_out(0, t, chain)
        elif role == "worker":
            assert r is not None
            arrived = self.arrived_workers[r]
            arrived.append(chain)
            if self.shards:
                shard = (chain.key[2] or 0) % self.shards
                self.arrived_by_shard[(r, shard)] += 1
                members = len(range(shard, self.workers, self.shards))
                aggregate = self.chains.get(("aggregate", r, shard))
                if self.arrived_by_shard[(r, shard)] >= members and aggregate is not None:
                    self._trigger(aggregate, t, chain, self.p.async_dispatch_ms)
            elif len(arrived) >= self.workers:
                combine = self.chains.get(("combine", r, None))
                if combine is not None:
                    self._trigger(combine, t, chain, self.p.async_dispatch_ms)
        elif role == "aggregate":
            assert r is not None
            self.arrived_partials[r] += 1
            if self.arrived_partials[r] >= self.shards:
                combine = self.chains.get(("combine", r, None))
                if combine is not None:
                    self._trigger(combine, t, chain, self.p.async_dispatch_ms)
        elif role == "combine":
            assert r is not None
            self._fan_out(r + 1, t, chain)

    def _fan_out(self, r: int, when: float, source: _Chain) -> None:
        for key, chain in self.chains.items():
            if key[0] == "worker" and key[1] == r:
                self._trigger(chain, when, source, self.p.async_dispatch_ms)

    def run(self) -> None:
        start = self.chains.get(("start", None, None))
        if start is not None:
            self._trigger(start, 0.0, None, self.p.sync_invoke_ms)
        else:  # no start recorded: begin at round 0's workers
            self._fan_out(
                self.rounds[0] if self.rounds else 0, 0.0, _Chain(("start", None, None), [])
            )
        self.engine.run()


def _fanout_calls(n: int) -> int:
    """Sequential Invoke API round trips of a fan-out of n events (simulator.invoke)."""
    if n <= FANOUT_SEQUENTIAL_MAX:
        return n
    return -(-n // FANOUT_THREADS)


def predict(
    invocations: Sequence[Invocation],
    platform: Platform,
    *,
    workers: int,
    stall_after_s: float,
    local_storage: EfsModel = LOCAL_STORAGE,
) -> Prediction:
    """Lay `invocations` out on `platform`; the critical path and the time per phase."""
    layout = _Layout(invocations, platform, workers, stall_after_s, local_storage)
    layout.run()
    final = _final_chain(layout)
    finished = final is not None
    if final is None:
        total = max(
            (p.end_s for p in layout.placed.values() if not math.isnan(p.end_s)), default=0.0
        )
        path: list[Segment] = []
    else:
        total = final.arrived_t
        path = _critical_path(layout, final)
    phases = dict.fromkeys(PHASES, 0.0)
    for seg in path:
        phases[seg.phase] += seg.end_s - seg.start_s
    totals = dict.fromkeys(PHASES, 0.0)
    for placed in layout.placed.values():
        for name, t0, t1 in placed.phases:
            totals[name] += t1 - t0
    by_key = {inv.key: inv for inv in invocations}
    placed_invs = [by_key[k] for k in layout.placed if k in by_key]
    return Prediction(
        platform=platform,
        total_s=total,
        finished=finished,
        critical_path=path,
        phases_s=phases,
        totals_s=totals,
        placed=layout.placed,
        efs_read_bytes=sum(i.io.read_bytes for i in placed_invs),
        efs_write_bytes=sum(i.io.write_bytes for i in placed_invs),
        unplaced=layout.unplaced,
    )


def _final_chain(layout: _Layout) -> _Chain | None:
    """The chain whose arrival ends the run: the last round's combine, if it arrived."""
    combines = [
        c for k, c in layout.chains.items() if k[0] == "combine" and not math.isnan(c.arrived_t)
    ]
    if not combines or not layout.rounds:
        return None
    last_round = max(layout.rounds)
    final = [c for c in combines if c.key[1] == last_round]
    return final[0] if final else None


def _critical_path(layout: _Layout, final: _Chain) -> list[Segment]:
    chains: list[_Chain] = []
    chain: _Chain | None = final
    while chain is not None and chain.attempts:
        chains.append(chain)
        chain = chain.trigger_from
    segments: list[Segment] = []
    for c in reversed(chains):
        role, r, w = c.key
        cursor = c.trigger_t
        for inv in c.attempts:
            placed = layout.placed.get(inv.key)
            if placed is None or math.isnan(placed.end_s) or placed.end_s > c.arrived_t + 1e-9:
                continue
            if inv.status != "success":
                first = placed.phases[0][1] if placed.phases else placed.start_s
                segments.append(
                    Segment(
                        "retries and rescues", cursor, max(cursor, first), role, r, w, inv.attempt
                    )
                )
                segments.append(
                    Segment("retries and rescues", first, placed.end_s, role, r, w, inv.attempt)
                )
                cursor = placed.end_s
                continue
            if placed.phases and placed.phases[0][1] > cursor:
                segments.append(
                    Segment(
                        "retries and rescues", cursor, placed.phases[0][1], role, r, w, inv.attempt
                    )
                )
            for name, t0, t1 in placed.phases:
                segments.append(Segment(name, t0, t1, role, r, w, inv.attempt))
            break
    return segments


def dispatch_gaps_ms(invocations: Iterable[Invocation], workers: int) -> list[float]:
    """Measured delays between a chain's trigger and its first invocation's start (ms).

    The trigger of round r's workers is the end of combine r-1 (or of the start), that of
    combine r the end of round r's last worker; the fan-out happens just before the trigger's
    end, so a gap may be slightly negative (counted as 0).
    """
    firsts: dict[tuple[str, int | None, int | None], Invocation] = {}
    ends: dict[tuple[str, int | None, int | None], float] = {}
    for inv in sorted(invocations, key=lambda i: i.start_s):
        firsts.setdefault(inv.chain, inv)
        if inv.status == "success":
            ends.setdefault(inv.chain, inv.end_s)
    gaps: list[float] = []
    worker_ends: dict[int | None, list[float]] = defaultdict(list)
    for (role, r, _), end in ends.items():
        if role == "worker":
            worker_ends[r].append(end)
    for (role, r, _w), first in firsts.items():
        trigger: float | None = None
        if role == "worker" and r is not None:
            trigger = (
                ends.get(("start", None, None)) if r == 0 else ends.get(("combine", r - 1, None))
            )
        elif role == "combine" and len(worker_ends.get(r, [])) >= workers:
            trigger = max(worker_ends[r])
        if trigger is not None:
            gaps.append(max(0.0, (first.start_s - trigger) * 1000.0))
    return gaps


def calibrated_local_platform(
    invocations: Sequence[Invocation], workers: int, time_scale: float
) -> Platform:
    """This machine as measured in the run: its dispatch delay (median gap between a trigger and
    the invocation it released) plus the service's own time around an invocation (wall time
    beyond Init and Duration: handing the event over, collecting the result). That excess also
    holds any time the invocation waited for a CPU another process took, so its lower quartile
    stands for the service's part."""
    gaps = dispatch_gaps_ms(invocations, workers)
    around = sorted(
        max(0.0, (i.end_s - i.start_s) * 1000.0 - i.init_ms - i.duration_ms) for i in invocations
    )
    dispatch = (statistics.median(gaps) if gaps else 0.0) + (
        around[len(around) // 4] if around else 0.0
    )
    return local_platform(dispatch, time_scale)


__all__ = [
    "PHASES",
    "Invocation",
    "Placed",
    "Prediction",
    "Segment",
    "calibrated_local_platform",
    "dispatch_gaps_ms",
    "predict",
]
