"""Per-environment /tmp and EFS mounts (lambda_runtime.sandbox), seen from inside and outside."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from lambda_runtime import sandbox
from lambda_runtime.errors import ConfigError, IsolationUnavailable

MiB = 1024 * 1024
_CTX = multiprocessing.get_context("fork")
_LOOP_OK, _LOOP_WHY = sandbox._loop_ext4_support()
# Skipped only where the host truly lacks root, mount namespaces, loop devices or e2fsprogs.
needs_loop = pytest.mark.skipif(not _LOOP_OK, reason=f"no loop-ext4 /tmp on this host: {_LOOP_WHY}")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ext4-cache")


@pytest.fixture
def make_store(tmp_path: Path, cache_dir: Path) -> Iterator[Callable[..., sandbox.TmpStore]]:
    stores: list[sandbox.TmpStore] = []

    def make(
        mb: int = 512, efs: dict[str, Path] | None = None, isolation: str = "strict"
    ) -> sandbox.TmpStore:
        env_id = f"env{len(stores)}"
        store = sandbox.TmpStore(tmp_path / env_id, env_id, mb, efs or {}, isolation, cache_dir)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


# ---------------------------------------------------------------------------- child processes


def _child_main(conn: Connection, spec: sandbox.SandboxSpec, body: Callable[..., Any]) -> None:
    try:
        started = time.perf_counter()
        env = sandbox.enter(spec)
        conn.send(("entered", env, time.perf_counter() - started))
        body(conn)
    except BaseException as exc:
        conn.send(("error", type(exc).__name__, getattr(exc, "errno", None), str(exc)))
    finally:
        conn.close()
        os._exit(0)  # skip pytest's atexit machinery inherited through fork


class Env:
    """One environment process: enter(spec), then run body(conn) inside."""

    def __init__(self, spec: sandbox.SandboxSpec, body: Callable[[Connection], None]) -> None:
        self.conn, child = _CTX.Pipe()
        self.proc = _CTX.Process(target=_child_main, args=(child, spec, body))
        self.proc.start()
        child.close()

    def recv(self, timeout: float = 30.0) -> Any:
        assert self.conn.poll(timeout), "environment process did not answer"
        msg = self.conn.recv()
        if isinstance(msg, tuple) and msg and msg[0] == "error":
            raise AssertionError(f"environment process failed: {msg}")
        return msg

    def entered(self) -> tuple[dict[str, str], float]:
        tag, env, seconds = self.recv()
        assert tag == "entered"
        return env, seconds

    def send(self, msg: Any) -> None:
        self.conn.send(msg)

    def join(self, timeout: float = 30.0) -> None:
        self.proc.join(timeout)
        assert self.proc.exitcode is not None, "environment process did not exit"


def _tmp_mount_line() -> str:
    with open("/proc/self/mountinfo") as f:
        lines = [line for line in f if line.split()[4] == "/tmp"]
    return lines[-1] if lines else ""


def _describe_tmp(conn: Connection) -> None:
    st = os.statvfs("/tmp")
    conn.send(
        {
            "free": st.f_bavail * st.f_frsize,
            "dev": os.stat("/tmp").st_dev,
            "mount": _tmp_mount_line(),
            "mode": os.stat("/tmp").st_mode & 0o7777,
            "files": sorted(os.listdir("/tmp")),
            "tmpdir_env": os.environ.get("TMPDIR"),
            "gettempdir": tempfile.gettempdir(),
        }
    )


# ---------------------------------------------------------------------------- loop-ext4


@pytest.mark.root
@needs_loop
@pytest.mark.parametrize("mb", [512, 2048])
def test_fresh_tmp_is_a_private_mount_of_the_configured_size(make_store: Any, mb: int) -> None:
    store = make_store(mb)
    assert store.mechanisms == {"tmp": "loop-ext4", "efs": "none"}
    env = Env(store.spec, _describe_tmp)
    added, _ = env.entered()
    inside = env.recv()
    env.join()
    assert added == {}
    assert inside["dev"] != os.stat("/").st_dev
    assert " ext4 /dev/loop" in inside["mount"] and "discard" in inside["mount"]
    # free space a handler sees (shutil.disk_usage().free) is the configured size, at most 1 % more
    assert mb * MiB <= inside["free"] <= mb * MiB * 1.01
    assert inside["files"] == []  # no lost+found, as on Lambda
    assert inside["mode"] == 0o1777
    assert inside["tmpdir_env"] is None and inside["gettempdir"] == "/tmp"


def _fill_until_enospc(conn: Connection) -> None:
    marker = conn.recv()
    Path("/tmp", marker).write_text("only in the sandbox")
    cap = os.statvfs("/tmp").f_bavail * os.statvfs("/tmp").f_frsize
    fd = os.open("/tmp/big", os.O_WRONLY | os.O_CREAT)
    os.posix_fallocate(fd, 0, cap - 16 * MiB)  # reach the edge quickly; then real writes
    os.close(fd)
    written, chunk = cap - 16 * MiB, b"x" * (256 * 1024)
    fd = os.open("/tmp/more", os.O_WRONLY | os.O_CREAT)
    try:
        while written < cap + 64 * MiB:
            written += os.write(fd, chunk)
        conn.send(("no error", written))
    except OSError as exc:
        conn.send((errno.errorcode.get(exc.errno or 0, "?"), written))
    finally:
        os.close(fd)


@pytest.mark.root
@needs_loop
def test_write_past_the_cap_raises_enospc_and_host_tmp_is_untouched(make_store: Any) -> None:
    store = make_store(512)
    env = Env(store.spec, _fill_until_enospc)
    env.entered()
    marker = f"lambda-sandbox-marker-{uuid.uuid4().hex}"
    env.send(marker)
    code, written = env.recv(60)
    env.join()
    assert code == "ENOSPC"
    assert written >= 512 * MiB  # the whole configured size was usable
    assert not Path("/tmp", marker).exists()


def _write_state_then_hang(conn: Connection) -> None:
    Path("/tmp/state.txt").write_text("written before the crash")
    Path("/tmp/blob").write_bytes(os.urandom(8 * MiB))
    conn.send("written")
    time.sleep(60)


@pytest.mark.root
@needs_loop
def test_tmp_survives_sigkill_and_a_new_environment_starts_empty(make_store: Any) -> None:
    store = make_store(512)
    crashed = Env(store.spec, _write_state_then_hang)
    crashed.entered()
    assert crashed.recv() == "written"
    assert crashed.proc.pid is not None
    os.kill(crashed.proc.pid, signal.SIGKILL)  # timeout / OOM: the tree is killed
    crashed.join()
    # The re-initialised runtime enters with the SAME spec; enter() waits for the old loop device.
    again = Env(store.spec, _describe_tmp)
    again.entered()
    assert again.recv()["files"] == ["blob", "state.txt"]
    again.join()
    store.wait_released()
    # With nothing mounted, usage is read from the image file: the data reached it at unmount.
    assert 8 * MiB <= store.usage_bytes() <= 9 * MiB
    fresh = make_store(512)
    new_env = Env(fresh.spec, _describe_tmp)
    new_env.entered()
    assert new_env.recv()["files"] == []
    new_env.join()


def _write_then_delete(conn: Connection) -> None:
    assert conn.recv() == "write"
    with open("/tmp/data", "wb") as f:  # no fsync: much of it is still in the page cache
        for _ in range(100):
            f.write(b"\1" * MiB)
    conn.send("written")
    assert conn.recv() == "delete"
    os.unlink("/tmp/data")
    conn.send("deleted")
    assert conn.recv() == "exit"


@pytest.mark.root
@needs_loop
def test_usage_and_peak_seen_from_the_parent(make_store: Any) -> None:
    store = make_store(512)
    env = Env(store.spec, _write_then_delete)
    env.entered()
    store.reset_peak()
    assert store.usage_bytes() < 64 * 1024
    env.send("write")
    assert env.recv() == "written"
    store.poll()
    assert 100 * MiB <= store.usage_bytes() <= 101 * MiB
    env.send("delete")
    assert env.recv() == "deleted"
    assert store.usage_bytes() < MiB
    assert 100 * MiB <= store.peak_bytes() <= 101 * MiB
    assert store.over_limit() is False  # the kernel enforces the cap in this mode
    env.send("exit")
    env.join()
    store.wait_released()
    assert store.usage_bytes() < MiB  # discard punched the freed blocks out of the image


def _use_efs(conn: Connection) -> None:
    seen = sorted(os.listdir("/mnt/efs"))
    Path("/mnt/efs/from-env.txt").write_text("written inside")
    try:
        Path("/mnt/other").write_text("x")
        mnt_writable = True
    except OSError:
        mnt_writable = False
    conn.send((seen, str(sandbox.efs_path("/mnt/efs")), mnt_writable, sorted(os.listdir("/mnt"))))


@pytest.mark.root
@needs_loop
def test_efs_host_directory_is_bind_mounted(make_store: Any, tmp_path: Path) -> None:
    host = tmp_path / "efs-host"  # under the host's /tmp, which the environment's /tmp covers
    host.mkdir()
    (host / "dataset.npy").write_bytes(b"abc")
    store = make_store(512, efs={"/mnt/efs": host})
    assert store.mechanisms["efs"] == "bind-mount"
    env = Env(store.spec, _use_efs)
    added, _ = env.entered()
    seen, resolved, mnt_writable, mnt_entries = env.recv()
    env.join()
    assert added == {}
    assert seen == ["dataset.npy"]
    assert resolved == "/mnt/efs"
    assert not mnt_writable and mnt_entries == ["efs"]
    assert (host / "from-env.txt").read_text() == "written inside"
    with open("/proc/self/mountinfo") as f:  # nothing leaked into the host's mount table
        assert not [line for line in f if "/mnt/efs" in line.split()[4]]


def _concurrent_body(barrier: Any) -> Callable[[Connection], None]:
    def body(conn: Connection) -> None:
        me = f"env-{os.getpid()}"
        Path("/tmp", me).write_text(me)
        barrier.wait(30)  # every environment is mounted at the same time
        st = os.statvfs("/tmp")
        conn.send((me, os.stat("/tmp").st_dev, sorted(os.listdir("/tmp")), st.f_bavail))
        barrier.wait(30)

    return body


@pytest.mark.root
@needs_loop
def test_twenty_environments_enter_concurrently(make_store: Any) -> None:
    stores = [make_store(512) for _ in range(20)]
    barrier = _CTX.Barrier(20)
    envs = [Env(store.spec, _concurrent_body(barrier)) for store in stores]
    for env in envs:
        env.entered()
    reports = [env.recv() for env in envs]
    for env in envs:
        env.join()
    assert len({dev for _, dev, _, _ in reports}) == 20
    for me, _, files, free_blocks in reports:
        assert files == [me]
        assert free_blocks * 4096 >= 511 * MiB
    for store in stores:
        store.close()
    deadline = time.monotonic() + 5
    images = [os.path.realpath(s.spec.tmp_path) for s in stores]
    while any(sandbox._backing_loops(i) for i in images) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(sandbox._backing_loops(i) for i in images)
    assert not any(Path(i).exists() for i in images)


def _wait_for_exit(conn: Connection) -> None:
    conn.send("up")
    conn.recv()


@pytest.mark.root
@needs_loop
def test_an_image_is_never_mounted_twice(make_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store(512)
    first = Env(store.spec, _wait_for_exit)
    first.entered()
    assert first.recv() == "up"
    monkeypatch.setattr(sandbox, "RELEASE_TIMEOUT_S", 0.3)
    second = Env(store.spec, _describe_tmp)
    with pytest.raises(AssertionError, match=r"TimeoutError.*still in use by /dev/loop"):
        second.recv()
    second.join()
    with pytest.raises(TimeoutError, match="still in use"):
        store.wait_released(0.1)
    first.send("exit")
    first.join()
    store.wait_released()
    third = Env(store.spec, _describe_tmp)
    third.entered()
    assert third.recv()["files"] == []
    third.join()


def _enter_without_dev_nodes(conn: Connection, spec: sandbox.SandboxSpec) -> None:
    try:
        sandbox._unshare_mounts()
        sandbox._mount(None, "/", None, sandbox._MS_REC | sandbox._MS_PRIVATE)
        sandbox._mount("tmpfs", "/dev", "tmpfs", 0, "mode=755")  # a container's bare /dev
        sandbox.enter(spec)
        conn.send((sorted(os.listdir("/dev")), _tmp_mount_line()))
    except BaseException as exc:
        conn.send(repr(exc))
    finally:
        os._exit(0)


@pytest.mark.root
@needs_loop
def test_missing_loop_device_nodes_are_created(make_store: Any) -> None:
    store = make_store(512)
    parent, child = _CTX.Pipe()
    proc = _CTX.Process(target=_enter_without_dev_nodes, args=(child, store.spec))
    proc.start()
    assert parent.poll(30)
    result = parent.recv()
    proc.join(30)
    assert isinstance(result, tuple), result
    nodes, mount = result
    assert "loop-control" in nodes and any(n.startswith("loop") and n[4:].isdigit() for n in nodes)
    assert " ext4 /dev/loop" in mount


@pytest.mark.root
@needs_loop
def test_environment_ready_within_60_ms(make_store: Any, cache_dir: Path) -> None:
    sandbox.pristine_image(cache_dir, 512)  # built once per size; not part of a cold start
    best = float("inf")
    for _ in range(3):  # best of three: other tests may share the two CPUs
        started = time.perf_counter()
        store = make_store(512)
        created = time.perf_counter() - started
        env = Env(store.spec, _describe_tmp)
        _, entered = env.entered()
        env.recv()
        env.join()
        best = min(best, created + entered)
    assert best <= 0.060


@pytest.mark.root
@needs_loop
def test_pristine_image_is_cached_and_close_is_idempotent(make_store: Any, cache_dir: Path) -> None:
    image = sandbox.pristine_image(cache_dir, 1024)
    mtime = image.stat().st_mtime_ns
    assert sandbox.pristine_image(cache_dir, 1024) == image
    assert image.stat().st_mtime_ns == mtime
    store = make_store(1024)
    # the copy is sparse: only the metadata blocks of an empty file system are allocated
    assert os.stat(store.spec.tmp_path).st_blocks * 512 < 4 * MiB
    store.close()
    store.close()
    assert not Path(store.spec.tmp_path).exists()


# ---------------------------------------------------------------------------- watched-dir


def _portable_body(conn: Connection) -> None:
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(b"y" * MiB)
    conn.send((tempfile.gettempdir(), f.name, str(sandbox.efs_path("/mnt/efs"))))


def test_portable_mode_gives_tmpdir_and_efs_variable(make_store: Any, tmp_path: Path) -> None:
    host = tmp_path / "efs-host"
    host.mkdir()
    store = make_store(512, efs={"/mnt/efs": host}, isolation="portable")
    assert store.mechanisms["tmp"] == "watched-dir"
    assert store.mechanisms["efs"] == "host-path (LAMBDA_RUNTIME_EFS_*)"
    assert "isolation='portable'" in store.mechanisms["reason"]
    assert "host's /tmp" in store.mechanisms["reason"]
    env = Env(store.spec, _portable_body)
    added, _ = env.entered()
    tmpdir, written, efs = env.recv()
    env.join()
    assert added == {"TMPDIR": store.spec.tmp_path, "LAMBDA_RUNTIME_EFS_EFS": str(host)}
    assert tmpdir == store.spec.tmp_path and Path(written).parent == Path(tmpdir)
    assert efs == str(host)
    store.reset_peak()
    assert MiB <= store.usage_bytes() <= MiB + 64 * 1024
    assert store.over_limit() is False
    with open(Path(tmpdir, "huge"), "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 513 * MiB)
    assert store.over_limit() is True
    os.unlink(Path(tmpdir, "huge"))
    assert store.usage_bytes() <= MiB + 64 * 1024
    assert store.peak_bytes() >= 513 * MiB
    store.close()
    store.close()
    assert not Path(tmpdir).exists()


def test_usage_counts_hard_links_once_and_nested_dirs(make_store: Any) -> None:
    store = make_store(512, isolation="portable")
    root = Path(store.spec.tmp_path)
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"z" * (2 * MiB))
    os.link(root / "a" / "b" / "f", root / "g")
    assert 2 * MiB <= store.usage_bytes() <= 2 * MiB + 64 * 1024


def test_auto_degrades_visibly_and_strict_refuses(
    make_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        sandbox, "_loop_ext4_support", lambda: (False, "mount namespaces need root")
    )
    store = make_store(512, isolation="auto")
    assert store.spec.tmp_mode == "watched-dir" and store.spec.efs_mode == "env"
    assert store.mechanisms["tmp"] == "watched-dir"
    assert "mount namespaces need root" in store.mechanisms["reason"]
    with pytest.raises(IsolationUnavailable, match=r"isolation='strict'.*need root"):
        make_store(512, isolation="strict")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mb": 511}, "ephemeral_mb"),
        ({"mb": 10_241}, "ephemeral_mb"),
        ({"isolation": "none"}, "isolation"),
        ({"efs": {"/mnt/..": Path("/")}}, "efs"),
        ({"efs": {"/data": Path("/")}}, "efs"),
    ],
)
def test_bad_settings_name_the_field(make_store: Any, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_store(**{"isolation": "portable", **kwargs})
    assert info.value.field == field


def test_efs_variable_names_and_lookup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert sandbox.efs_env_var("/mnt/efs") == "LAMBDA_RUNTIME_EFS_EFS"
    assert sandbox.efs_env_var("/mnt/my-data.v2") == "LAMBDA_RUNTIME_EFS_MY_DATA_V2"
    monkeypatch.setenv("LAMBDA_RUNTIME_EFS_NOWHERE_X", str(tmp_path))
    assert sandbox.efs_path("/mnt/nowhere-x") == tmp_path
    monkeypatch.delenv("LAMBDA_RUNTIME_EFS_NOWHERE_X")
    with pytest.raises(FileNotFoundError, match="LAMBDA_RUNTIME_EFS_NOWHERE_X"):
        sandbox.efs_path("/mnt/nowhere-x")


def test_namespace_probe_reports_a_reason() -> None:
    ok, reason = sandbox.host_supports_namespaces()
    assert isinstance(ok, bool) and reason
    assert sandbox.host_supports_namespaces() == (ok, reason)  # cached


def _enter_with_a_thread(conn: Connection, spec: sandbox.SandboxSpec) -> None:
    import threading

    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()
    try:
        sandbox.enter(spec)
        conn.send("entered")
    except OSError as exc:
        conn.send(str(exc))
    finally:
        stop.set()
        os._exit(0)


@pytest.mark.root
@needs_loop
def test_enter_refuses_a_threaded_process(make_store: Any) -> None:
    store = make_store(512)
    parent, child = _CTX.Pipe()
    proc = _CTX.Process(target=_enter_with_a_thread, args=(child, store.spec))
    proc.start()
    assert parent.poll(30)
    assert "before the process starts threads" in parent.recv()
    proc.join(30)


@pytest.mark.root
@needs_loop
def test_mount_command_is_the_fallback_when_loop_ioctls_fail(
    make_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_ioctls(image_fd: int, image: str) -> tuple[int, str]:
        raise OSError(errno.ENOTTY, "loop ioctls unavailable (test)")

    monkeypatch.setattr(sandbox, "_attach_loop", no_ioctls)  # inherited by the forked child
    store = make_store(512)
    env = Env(store.spec, _describe_tmp)
    env.entered()
    inside = env.recv()
    env.join()
    assert " ext4 /dev/loop" in inside["mount"]
    assert 512 * MiB <= inside["free"] <= 512 * MiB * 1.01
    store.wait_released()  # util-linux sets autoclear for -o loop, so the device went away
