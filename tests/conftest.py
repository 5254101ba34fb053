"""Shared fixtures: a Lambda service per test, parametrized over environment backends."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lambda_runtime import FunctionConfig, LambdaService

FIXTURES = Path(__file__).parent / "fixtures"
FN_DIR = FIXTURES / "fn"
BROKEN_DIR = FIXTURES / "broken"

# "process": the strongest isolation the host allows (cgroups, mount namespace, loop /tmp).
# "portable": what a user without root gets (sampled RSS, watched /tmp directory).
BACKENDS = ["process", "portable"]


def is_root_linux() -> bool:
    return os.name == "posix" and os.geteuid() == 0 and os.path.isdir("/proc/self")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "process" and not is_root_linux():
        pytest.skip("the 'process' isolation needs root on Linux (cgroups, mount namespaces)")
    return str(request.param)


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator:
    services: list[LambdaService] = []

    def make(isolation: str = "auto", **knobs) -> LambdaService:
        knobs.setdefault("time_scale", 0.001)
        svc = LambdaService(run_dir=tmp_path / f"run{len(services)}", isolation=isolation, **knobs)
        services.append(svc)
        return svc

    yield make
    for svc in services:
        svc.close()


@pytest.fixture
def svc(make_service, backend: str) -> LambdaService:
    return make_service("portable" if backend == "portable" else "auto")


def fn(name: str = "fn", handler: str = "handler.echo", **kw) -> FunctionConfig:
    kw.setdefault("code_dir", FN_DIR)
    return FunctionConfig(name=name, handler=handler, **kw)
