"""Execution-environment pool: warm reuse per function under reserved and account concurrency.

State only: the pool hands out environments and counts concurrency; it never runs anything.
Concurrency is the number of in-flight invocations (as on Lambda); idle environments hold no
concurrency and are reaped after a configurable idle time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from lambda_runtime.errors import ConfigError, TooManyRequestsException


class PooledEnvironment(Protocol):
    """What the pool needs of an environment."""

    env_id: str
    closed: bool
    last_used: float

    def close(self) -> None: ...


E = TypeVar("E", bound=PooledEnvironment)

RESERVED_REASON = "ReservedFunctionConcurrentInvocationLimitExceeded"
ACCOUNT_REASON = "ConcurrentInvocationLimitExceeded"


class Throttled(TooManyRequestsException):
    """No concurrency left for this function (HTTP 429)."""

    def __init__(self, reason: str) -> None:
        super().__init__("Rate Exceeded.", Reason=reason)
        self.reason = reason


@dataclass
class _FunctionState(Generic[E]):
    reserved: int | None
    idle: list[E] = field(default_factory=list)  # most recently used last: reused first
    busy: set[str] = field(default_factory=set)
    leased: dict[str, E] = field(default_factory=dict)  # busy environments by id
    created: int = 0


class EnvironmentPool(Generic[E]):
    """Hands out warm idle environments of the same function, or makes new ones, within limits."""

    def __init__(
        self,
        factory: Callable[[str], E],
        account_limit: int,
        unreserved_min: int = 0,
    ) -> None:
        self._factory = factory
        self.account_limit = account_limit
        self.unreserved_min = unreserved_min
        self._functions: dict[str, _FunctionState[E]] = {}
        self._cond = threading.Condition()
        self._unreserved_busy = 0
        self._closed = False

    # ---- configuration ----------------------------------------------------------------------
    def add_function(self, name: str, reserved: int | None) -> None:
        """Register a function; its reserved concurrency must leave the account's minimum free."""
        with self._cond:
            others = sum(s.reserved or 0 for n, s in self._functions.items() if n != name)
            if (
                reserved is not None
                and others + reserved > self.account_limit - self.unreserved_min
            ):
                raise ConfigError(
                    "reserved_concurrency",
                    f"{reserved} would leave {self.account_limit - others - reserved} of the "
                    "account's "
                    f"{self.account_limit} unreserved; at least {self.unreserved_min} must stay "
                    "unreserved",
                )
            old = self._functions.get(name)
            state: _FunctionState[E] = _FunctionState(reserved=reserved)
            if old is not None:
                state.idle, state.busy, state.created = old.idle, old.busy, old.created
            self._functions[name] = state

    def _unreserved_capacity(self) -> int:
        return self.account_limit - sum(s.reserved or 0 for s in self._functions.values())

    def _has_slot(self, state: _FunctionState[E]) -> bool:
        if state.reserved is not None:
            return len(state.busy) < state.reserved
        return self._unreserved_busy < self._unreserved_capacity()

    # ---- hand-out and return ----------------------------------------------------------------
    def try_acquire(self, name: str) -> E | None:
        """An environment for one invocation, or None when the function has no concurrency left."""
        with self._cond:
            state = self._state(name)
            if not self._has_slot(state):
                return None
            self._take_slot(name, state)
            while state.idle:
                env = state.idle.pop()
                if not env.closed:
                    state.busy.add(env.env_id)
                    state.leased[env.env_id] = env
                    return env
            placeholder = f"creating-{state.created}"
            state.created += 1
            state.busy.add(placeholder)
        try:
            env = self._factory(name)
        except BaseException:
            with self._cond:
                state.busy.discard(placeholder)
                self._give_slot(state)
                self._cond.notify_all()
            raise
        with self._cond:
            state.busy.discard(placeholder)
            state.busy.add(env.env_id)
            state.leased[env.env_id] = env
        return env

    def acquire(self, name: str) -> E:
        """Like try_acquire, but a 429 when the limit is reached (sync invokes)."""
        env = self.try_acquire(name)
        if env is None:
            state = self._state(name)
            raise Throttled(RESERVED_REASON if state.reserved is not None else ACCOUNT_REASON)
        return env

    def release(self, name: str, env: E) -> None:
        """Return an environment after its invocation; it becomes the first candidate for reuse."""
        with self._cond:
            state = self._state(name)
            state.busy.discard(env.env_id)
            state.leased.pop(env.env_id, None)
            self._give_slot(state)
            if not env.closed and not self._closed:
                state.idle.append(env)
            self._cond.notify_all()
        if self._closed and not env.closed:
            env.close()

    def _take_slot(self, name: str, state: _FunctionState[E]) -> None:
        if state.reserved is None:
            self._unreserved_busy += 1

    def _give_slot(self, state: _FunctionState[E]) -> None:
        if state.reserved is None:
            self._unreserved_busy -= 1

    def wait_for_slot(self, timeout_s: float) -> None:
        """Block until some invocation finishes (or the timeout passes)."""
        with self._cond:
            self._cond.wait(timeout_s)

    def _state(self, name: str) -> _FunctionState[E]:
        try:
            return self._functions[name]
        except KeyError:
            raise KeyError(f"function {name!r} is not registered with the pool") from None

    # ---- housekeeping -----------------------------------------------------------------------
    def reap(self, idle_timeout_s: float, now: float | None = None) -> int:
        """Close environments idle longer than idle_timeout_s; returns how many were closed."""
        now = time.time() if now is None else now
        victims: list[E] = []
        with self._cond:
            for state in self._functions.values():
                keep: list[E] = []
                for env in state.idle:
                    (
                        victims if now - env.last_used >= idle_timeout_s or env.closed else keep
                    ).append(env)
                state.idle = keep
        for env in victims:
            env.close()
        return len(victims)

    def stats(self, name: str) -> dict[str, int]:
        """Idle and busy environment counts of one function."""
        with self._cond:
            state = self._state(name)
            return {"idle": len(state.idle), "busy": len(state.busy)}

    def idle_environments(self, name: str) -> list[E]:
        with self._cond:
            return list(self._state(name).idle)

    def busy_environments(self) -> list[E]:
        """Environments running an invocation right now."""
        with self._cond:
            return [env for s in self._functions.values() for env in s.leased.values()]

    def busy_total(self) -> int:
        with self._cond:
            return sum(len(s.busy) for s in self._functions.values())

    def close(self) -> None:
        """Close every idle environment; busy ones close when they are released."""
        with self._cond:
            self._closed = True
            victims = [env for s in self._functions.values() for env in s.idle]
            for s in self._functions.values():
                s.idle = []
            self._cond.notify_all()
        for env in victims:
            env.close()
