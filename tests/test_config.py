"""Function config limits (spec §1): a bad value names the field and the allowed range."""

from __future__ import annotations

import pytest

from lambda_runtime import FunctionConfig, ServiceSettings, quotas
from lambda_runtime.errors import ConfigError

from .conftest import FN_DIR


def make(**kw):
    kw.setdefault("name", "f")
    kw.setdefault("handler", "handler.echo")
    kw.setdefault("code_dir", FN_DIR)
    return FunctionConfig(**kw)


def test_defaults_are_lambdas():
    cfg = make()
    assert (cfg.memory_mb, cfg.timeout_s, cfg.ephemeral_mb) == (128, 3, 512)
    assert (cfg.max_retry_attempts, cfg.max_event_age_s) == (2, 21_600)


@pytest.mark.parametrize(
    ("field", "bad", "good", "pattern"),
    [
        ("memory_mb", 127, 128, "memory_mb: must be from 128 to 10240 MB, got 127"),
        ("memory_mb", 10_241, 10_240, "memory_mb: must be from 128 to 10240 MB, got 10241"),
        ("timeout_s", 0, 1, "timeout_s: must be from 1 to 900 seconds, got 0"),
        ("timeout_s", 901, 900, "timeout_s: must be from 1 to 900 seconds, got 901"),
        ("ephemeral_mb", 511, 512, "ephemeral_mb: must be from 512 to 10240 MB, got 511"),
        ("ephemeral_mb", 10_241, 10_240, "ephemeral_mb: must be from 512 to 10240 MB, got 10241"),
        ("max_retry_attempts", 3, 2, "max_retry_attempts: must be from 0 to 2 retries, got 3"),
        ("max_event_age_s", 59, 60, "max_event_age_s: must be from 60 to 21600 seconds, got 59"),
        ("max_event_age_s", 21_601, 21_600, "max_event_age_s: must be from 60 to 21600 seconds"),
    ],
)
def test_ranges(field, bad, good, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        make(**{field: bad})
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    assert getattr(make(**{field: good}), field) == good


def test_non_integers_rejected_not_rounded():
    with pytest.raises(ConfigError, match="memory_mb: must be a whole number"):
        make(memory_mb=1024.5)
    with pytest.raises(ConfigError, match="timeout_s: must be a whole number"):
        make(timeout_s=True)


def test_reserved_and_malformed_env_vars():
    with pytest.raises(ConfigError, match=r"environment\['AWS_REGION'\]: is reserved"):
        make(environment={"AWS_REGION": "x"})
    with pytest.raises(ConfigError, match=r"environment\['1X'\]"):
        make(environment={"1X": "x"})
    with pytest.raises(ConfigError, match="must be a string"):
        make(environment={"AB": 1})


def test_env_vars_4kb_total():
    ok = {"K": "v" * 10}
    make(environment={"KEY": "v" * (quotas.ENV_VARS_MAX_BYTES - len('{"KEY":""}'))})
    with pytest.raises(ConfigError, match=r"exceeded the 4KB limit\. String measured: "):
        make(environment={"KEY": "v" * (quotas.ENV_VARS_MAX_BYTES - len('{"KEY":""}') + 1)})
    assert make(environment={"KK": ok["K"]}).environment["KK"] == ok["K"]


def test_efs_mount_rules(tmp_path):
    cfg = make(efs={"/mnt/efs": tmp_path / "d"})
    assert cfg.efs["/mnt/efs"] == (tmp_path / "d").resolve()
    with pytest.raises(ConfigError, match=r"efs: mount path must match /mnt/"):
        make(efs={"/data": tmp_path})
    with pytest.raises(ConfigError, match="at most 1 file system"):
        make(efs={"/mnt/a": tmp_path, "/mnt/b": tmp_path})


def test_other_fields(tmp_path):
    with pytest.raises(ConfigError, match="code_dir: must be an existing directory"):
        make(code_dir=tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"handler: must be 'module\.function'"):
        make(handler="nodot")
    with pytest.raises(ConfigError, match="name: must be 1-64"):
        make(name="bad name")
    with pytest.raises(ConfigError, match="architecture: must be 'x86_64' or 'arm64'"):
        make(architecture="sparc")
    with pytest.raises(ConfigError, match="reserved_concurrency"):
        make(reserved_concurrency=-1)


def test_vcpu_share():
    assert make(memory_mb=1769).vcpus == pytest.approx(1.0)
    assert make(memory_mb=10_240).vcpus == 6.0
    assert make(memory_mb=128).vcpus == pytest.approx(128 / 1769)


def test_service_settings(tmp_path):
    with pytest.raises(ConfigError, match="clock: must be 'lambda' or 'wall'"):
        ServiceSettings(run_dir=tmp_path, clock="cpu")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="isolation"):
        ServiceSettings(run_dir=tmp_path, isolation="none")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="account_concurrency"):
        ServiceSettings(run_dir=tmp_path, account_concurrency=0)
    with pytest.raises(ConfigError, match="bogus: is not a setting"):
        ServiceSettings.from_mapping({"run_dir": tmp_path, "bogus": 1})
