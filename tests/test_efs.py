"""Shared-storage helpers: atomic publish, locks, exclusive claims, arrival sets, safe paths."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lambda_runtime.efs import (
    ArrivalSet,
    CorruptFileError,
    Lock,
    LockTimeout,
    claim,
    claim_owner,
    publish_bytes,
    publish_json,
    publish_npy,
    read_json,
    read_npy,
    safe_join,
)

# fork: children start in milliseconds and inherit the barrier; the project is Linux-only.
CTX = mp.get_context("fork")


def _run_all(procs: list[Any], timeout: float = 60.0) -> None:
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        assert p.exitcode == 0, f"child {p.name} exited with {p.exitcode}"


# ------------------------------------------------------------------------------ publish / read


def test_publish_and_read_roundtrip(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    publish_npy(tmp_path / "sub" / "a.npy", arr)
    got = read_npy(tmp_path / "sub" / "a.npy")
    assert isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, arr)
    np.testing.assert_array_equal(read_npy(tmp_path / "sub" / "a.npy", mmap=False), arr)

    publish_json(tmp_path / "m.json", {"b": [1, 2], "a": "x"})
    assert read_json(tmp_path / "m.json") == {"a": "x", "b": [1, 2]}
    publish_bytes(tmp_path / "raw", b"hello")
    assert (tmp_path / "raw").read_bytes() == b"hello"
    # No temp files are left behind.
    assert not [p for p in tmp_path.rglob(".*.tmp")]


def test_empty_array_roundtrip(tmp_path: Path) -> None:
    publish_npy(tmp_path / "e.npy", np.zeros((0, 3), np.uint8))
    assert read_npy(tmp_path / "e.npy").shape == (0, 3)


def test_publish_npy_refuses_object_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="object"):
        publish_npy(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    assert not list(tmp_path.iterdir())


def test_read_npy_truncated_names_file(tmp_path: Path) -> None:
    path = tmp_path / "w.npy"
    publish_npy(path, np.ones((100, 10), np.float64))
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 8)
    for mmap in (True, False):
        with pytest.raises(CorruptFileError, match="truncated") as info:
            read_npy(path, mmap=mmap)
        assert str(path) in str(info.value)
        assert "(100, 10)" in str(info.value)
    assert isinstance(info.value, OSError)


def test_read_npy_missing_and_not_npy(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        read_npy(tmp_path / "nope.npy")
    assert str(tmp_path / "nope.npy") in str(info.value)
    assert ".npy" in str(info.value)
    (tmp_path / "junk.npy").write_bytes(b"not an array at all")
    with pytest.raises(CorruptFileError, match=r"not a \.npy"):
        read_npy(tmp_path / "junk.npy")
    (tmp_path / "cut.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(CorruptFileError, match=r"cut\.npy"):
        read_npy(tmp_path / "cut.npy")


def test_read_npy_refuses_pickled_objects(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([1, "x"], dtype=object), allow_pickle=True)
    with pytest.raises(CorruptFileError, match="pickled"):
        read_npy(tmp_path / "obj.npy")


def test_read_json_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="JSON"):
        read_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_bytes(b'{"a": ')
    with pytest.raises(CorruptFileError, match=r"bad\.json.*not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_errors_pickle_cleanly(tmp_path: Path) -> None:
    err = pickle.loads(pickle.dumps(CorruptFileError(tmp_path / "x", "truncated")))
    assert isinstance(err, CorruptFileError) and err.path == str(tmp_path / "x")
    assert str(err) == f"{tmp_path / 'x'}: truncated"
    t = pickle.loads(pickle.dumps(LockTimeout(tmp_path / "l", 1.5)))
    assert isinstance(t, TimeoutError) and t.path == str(tmp_path / "l") and t.timeout == 1.5


VERSIONS = [np.full((64, 1024), 1.0), np.arange(100_000, dtype=np.float64), np.full((3, 7), -2.0)]


def _republish(path: Path, stop_at: float) -> None:
    i = 0
    while time.monotonic() < stop_at:
        publish_npy(path, VERSIONS[i % len(VERSIONS)])
        i += 1


def _read_loop(path: Path, stop_at: float, out: Any) -> None:
    reads = 0
    while time.monotonic() < stop_at:
        for mmap in (False, True):
            arr = read_npy(path, mmap=mmap)
            # Every read must be a complete array equal to one published version.
            if not any(arr.shape == v.shape and np.array_equal(arr, v) for v in VERSIONS):
                out.put(("torn", arr.shape))
                return
            reads += 1
    out.put(("ok", reads))


def test_publish_is_atomic_for_concurrent_readers(tmp_path: Path) -> None:
    path = tmp_path / "weights.npy"
    publish_npy(path, VERSIONS[0])
    stop_at = time.monotonic() + 1.5
    out = CTX.Queue()
    procs = [CTX.Process(target=_republish, args=(path, stop_at))] + [
        CTX.Process(target=_read_loop, args=(path, stop_at, out)) for _ in range(2)
    ]
    _run_all(procs)
    results = [out.get(timeout=5) for _ in range(2)]
    assert all(kind == "ok" for kind, _ in results), results
    assert all(n > 20 for _, n in results), results
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------ locks


def _increment_under_lock(lock_path: Path, counter: Path, times: int) -> None:
    for _ in range(times):
        with Lock(lock_path, timeout=30):
            # A deliberately racy read-modify-write: only the lock keeps it exact.
            value = int(counter.read_text())
            time.sleep(0.0005)
            counter.write_text(str(value + 1))


def test_lock_excludes_processes_and_threads(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")
    lock_path = tmp_path / "c.lock"

    def threaded() -> None:
        threads = [
            threading.Thread(target=_increment_under_lock, args=(lock_path, counter, 10))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    procs = [
        CTX.Process(target=_increment_under_lock, args=(lock_path, counter, 10)) for _ in range(4)
    ]
    procs.append(CTX.Process(target=threaded))
    _run_all(procs)
    assert counter.read_text() == str(4 * 10 + 3 * 10)
    assert lock_path.exists()  # never deleted: waiters must share one inode


def _hold_lock(lock_path: Path, held: Any, release: Any) -> None:
    with Lock(lock_path):
        held.set()
        release.wait(30)


def test_lock_timeout_names_lock_file(tmp_path: Path) -> None:
    lock_path = tmp_path / "busy.lock"
    held, release = CTX.Event(), CTX.Event()
    holder = CTX.Process(target=_hold_lock, args=(lock_path, held, release))
    holder.start()
    try:
        assert held.wait(10)
        start = time.monotonic()
        with pytest.raises(LockTimeout) as info:
            Lock(lock_path, timeout=0.3).acquire()
        assert 0.25 <= time.monotonic() - start < 3
        assert str(lock_path) in str(info.value)
        assert isinstance(info.value, TimeoutError)
        with pytest.raises(LockTimeout):
            Lock(lock_path).acquire(timeout=0)
    finally:
        release.set()
        holder.join(10)
    # Released when the holder is done: now it can be taken.
    with Lock(lock_path, timeout=5) as lock:
        assert lock.is_locked
    assert not lock.is_locked


def test_lock_released_when_holder_dies(tmp_path: Path) -> None:
    lock_path = tmp_path / "dead.lock"
    held, release = CTX.Event(), CTX.Event()
    holder = CTX.Process(target=_hold_lock, args=(lock_path, held, release))
    holder.start()
    assert held.wait(10)
    holder.kill()
    holder.join(10)
    # The kernel drops a dead process's POSIX locks (as the NFS server does after lease expiry).
    with Lock(lock_path, timeout=5):
        pass


def test_lock_misuse(tmp_path: Path) -> None:
    lock = Lock(tmp_path / "x.lock", timeout=1)
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()
    with lock, pytest.raises(RuntimeError, match="reentrant"):
        lock.acquire()
    with pytest.raises(ValueError, match="timeout"):
        Lock(tmp_path / "y.lock", timeout=-1)


# ------------------------------------------------------------------------------ claims


def _claim_rounds(directory: Path, me: int, rounds: int, barrier: Any, out: Any) -> None:
    wins = []
    for r in range(rounds):
        barrier.wait(30)  # all racers start each round together
        if claim(directory / f"combine-{r}", owner=f"worker-{me}"):
            wins.append(r)
    out.put((me, wins))


def test_claim_exactly_one_winner_among_16_processes(tmp_path: Path) -> None:
    racers, rounds = 16, 20
    barrier, out = CTX.Barrier(racers), CTX.Queue()
    procs = [
        CTX.Process(target=_claim_rounds, args=(tmp_path, i, rounds, barrier, out))
        for i in range(racers)
    ]
    _run_all(procs)
    results = dict(out.get(timeout=5) for _ in range(racers))
    for r in range(rounds):
        winners = [me for me, wins in results.items() if r in wins]
        assert len(winners) == 1, f"round {r}: winners {winners}"
        assert claim_owner(tmp_path / f"combine-{r}") == f"worker-{winners[0]}"
    assert not list(tmp_path.glob(".*.tmp"))


def test_claim_sequential_and_owner(tmp_path: Path) -> None:
    assert claim_owner(tmp_path / "c") is None
    assert claim(tmp_path / "c", "first") is True
    assert claim(tmp_path / "c", "second") is False
    assert claim_owner(tmp_path / "c") == "first"
    with pytest.raises(ValueError, match="owner"):
        claim(tmp_path / "d", "")


# ------------------------------------------------------------------------------ arrival sets


def _add_twice(directory: Path, member: str, barrier: Any, out: Any) -> None:
    s = ArrivalSet(directory)
    barrier.wait(30)
    first = s.add(member)
    second = s.add(member)  # a duplicated delivery of the same result
    out.put((member, first, second))


def test_arrival_set_32_processes_adding_twice(tmp_path: Path) -> None:
    n = 32
    barrier, out = CTX.Barrier(n), CTX.Queue()
    procs = [
        CTX.Process(target=_add_twice, args=(tmp_path, f"w{i}", barrier, out)) for i in range(n)
    ]
    _run_all(procs)
    results = [out.get(timeout=5) for _ in range(n)]
    new_sizes = []
    for _, (added1, size1), (added2, size2) in results:
        assert added1 is True and added2 is False
        assert 1 <= size1 <= size2 <= n
        new_sizes.append(size1)
    # Serialised adds: each size is seen by exactly one new addition, so exactly one fires at N.
    assert sorted(new_sizes) == list(range(1, n + 1))
    assert [m for m, (_, s1), _ in results if s1 == n].__len__() == 1
    s = ArrivalSet(tmp_path)
    assert s.members() == {f"w{i}" for i in range(n)} and len(s) == n
    # Each member has a complete record file; no temp files remain.
    assert all((tmp_path / f"w{i}").read_text() == f"w{i}" for i in range(n))
    assert not list(tmp_path.glob(".*.tmp"))


def _add_once(directory: Path, member: str, barrier: Any, out: Any) -> None:
    barrier.wait(30)
    out.put((member, ArrivalSet(directory).add(member)))


def test_arrival_set_concurrent_duplicates_count_once(tmp_path: Path) -> None:
    ids, copies = 6, 4  # every id delivered by 4 processes at the same moment
    barrier, out = CTX.Barrier(ids * copies), CTX.Queue()
    procs = [
        CTX.Process(target=_add_once, args=(tmp_path, f"id{i}", barrier, out))
        for i in range(ids)
        for _ in range(copies)
    ]
    _run_all(procs)
    results = [out.get(timeout=5) for _ in range(ids * copies)]
    for i in range(ids):
        assert sum(added for m, (added, _) in results if m == f"id{i}") == 1
    assert sorted(size for _, (added, size) in results if added) == list(range(1, ids + 1))
    assert len(ArrivalSet(tmp_path)) == ids


def test_arrival_set_recovers_from_crashed_add(tmp_path: Path) -> None:
    s = ArrivalSet(tmp_path)
    assert s.add("a") == (True, 1)
    # A crash after the record was published but before the commit leaves a complete record only.
    publish_bytes(tmp_path / "b", b"b")
    assert s.members() == {"a"}
    assert s.add("b") == (True, 2)  # the retried delivery commits it and is the one that sees 2
    assert s.add("b") == (False, 2)
    assert "b" in s and "c" not in s


@pytest.mark.parametrize("bad", ["", ".lock", ".members.json", "a/b", "..", "-x", "a\x00b", 7])
def test_arrival_set_rejects_bad_members(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match="member"):
        ArrivalSet(tmp_path).add(bad)


# ------------------------------------------------------------------------------ safe_join


def test_safe_join_accepts_ids(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "run-1", "round-3") == tmp_path / "run-1" / "round-3"
    assert safe_join(tmp_path, "a/b") == tmp_path / "a" / "b"


@pytest.mark.parametrize(
    ("part", "reason"),
    [
        ("../etc", "'..'"),
        ("a/../../b", "'..'"),
        ("..", "'..'"),
        ("/etc/passwd", "absolute"),
        ("a\x00b", "NUL"),
        ("", "empty"),
    ],
)
def test_safe_join_rejects_traversal(tmp_path: Path, part: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as info:
        safe_join(tmp_path, "ok", part)
    assert repr(part) in str(info.value)


def test_safe_join_rejects_symlink_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "out").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside"):
        safe_join(root, "out", "x")
