"""Hypothesis stateful test of the environment pool against a simple model.

An invocation only ever reuses an idle, warm environment of the same function; never two
invocations in one environment; concurrency limits hold.
"""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from lambda_runtime.pool import EnvironmentPool, Throttled

FUNCTIONS = {"a": None, "b": 2, "c": 1}  # name -> reserved concurrency
ACCOUNT = 5


class FakeEnv:
    ids = itertools.count()

    def __init__(self, function: str) -> None:
        self.function = function
        self.env_id = f"{function}-{next(self.ids)}"
        self.closed = False
        self.last_used = 0.0
        self.running = 0

    def close(self) -> None:
        assert self.running == 0, "closed while running"
        self.closed = True


class PoolMachine(RuleBasedStateMachine):
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.pool: EnvironmentPool[FakeEnv] = EnvironmentPool(FakeEnv, ACCOUNT)
        for name, reserved in FUNCTIONS.items():
            self.pool.add_function(name, reserved)
        self.idle: dict[str, set[str]] = {n: set() for n in FUNCTIONS}
        self.running: dict[str, FakeEnv] = {}
        self.clock = 0.0

    def busy(self, name: str) -> int:
        return sum(1 for e in self.running.values() if e.function == name)

    def limit_reached(self, name: str) -> bool:
        reserved = FUNCTIONS[name]
        if reserved is not None:
            return self.busy(name) >= reserved
        unreserved = ACCOUNT - sum(r or 0 for r in FUNCTIONS.values())
        return sum(self.busy(n) for n, r in FUNCTIONS.items() if r is None) >= unreserved

    @rule(target=leases, name=st.sampled_from(sorted(FUNCTIONS)))
    def acquire(self, name):
        expected_throttle = self.limit_reached(name)
        try:
            env = self.pool.acquire(name)
        except Throttled:
            assert expected_throttle
            return None
        assert not expected_throttle
        assert env.function == name, "reused an environment of another function"
        assert not env.closed
        assert env.env_id not in self.running, "two invocations in one environment"
        if self.idle[name]:
            assert env.env_id in self.idle[name], "made a new environment while a warm one was idle"
            self.idle[name].discard(env.env_id)
        env.running += 1
        self.running[env.env_id] = env
        return env

    @rule(env=consumes(leases))
    def release(self, env):
        if env is None or env.env_id not in self.running:
            return
        env.running -= 1
        del self.running[env.env_id]
        self.clock += 1.0
        env.last_used = self.clock
        self.pool.release(env.function, env)
        self.idle[env.function].add(env.env_id)

    @rule(age=st.floats(min_value=0, max_value=5))
    def reap(self, age):
        self.pool.reap(age, now=self.clock)
        for name in FUNCTIONS:
            alive = {e.env_id for e in self.pool.idle_environments(name)}
            assert alive <= self.idle[name]
            self.idle[name] = alive

    @invariant()
    def counts_match(self):
        for name in FUNCTIONS:
            stats = self.pool.stats(name)
            assert stats["busy"] == self.busy(name)
            assert stats["idle"] == len(self.idle[name])
            if FUNCTIONS[name] is not None:
                assert self.busy(name) <= FUNCTIONS[name]
        assert len(self.running) <= ACCOUNT


TestPool = PoolMachine.TestCase
TestPool.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
