"""Workspace publishes: every file durable before the directory's rename; fsyncs run together."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from simulator.workspace import Workspace


def arrays(count: int) -> list[np.ndarray]:
    return [np.full((3, 2), k, dtype=np.float32) for k in range(count)]


def test_every_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    # More arrays than one batch of concurrent fsyncs: 2 x 20 + meta = 41 files, 3 batches.
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("rename", os.fspath(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    ws = Workspace(tmp_path, "t")
    w = arrays(20)
    assert ws.publish_weights(1, w, w, {"round": 1})
    monkeypatch.undo()

    fsynced = [Path(p).name for kind, p in events if kind == "fsync"]
    expected = {f"array-{k}.npy" for k in range(20)} | {f"velocity-{k}.npy" for k in range(20)}
    assert sorted(fsynced) == sorted(expected | {"meta.json"})
    assert events[-1] == ("rename", str(ws.weights_dir(1)))
    got, velocity = ws.read_weights(1)
    assert velocity is not None
    assert all(np.array_equal(a, b) for a, b in zip(got, w, strict=True))
    assert ws.read_weights(1, with_velocity=False)[1] is None


def test_a_failed_fsync_publishes_nothing(tmp_path, monkeypatch):
    real_fsync = os.fsync
    calls = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ws = Workspace(tmp_path, "t")
    with pytest.raises(OSError, match="Input/output error"):
        ws.publish_weights(0, arrays(3), None, {"round": 0})
    monkeypatch.undo()
    assert not ws.has_weights(0)
    # Neither the final directory nor the private temp directory is left behind.
    assert list((ws.root / "weights").iterdir()) == []
    # The name is still free: a retry publishes.
    assert ws.publish_weights(0, arrays(3), None, {"round": 0})


def _publish_in_child(root: str) -> None:
    ws = Workspace(root, "t")
    assert ws.publish_weights(2, arrays(4), arrays(4), {"round": 2})


def test_publishing_works_in_a_child_forked_after_the_parent_published(tmp_path):
    ws = Workspace(tmp_path, "t")
    for r in range(5):  # the fsync pool now has threads, all idle
        assert ws.publish_weights(10 + r, arrays(4), arrays(4), {"round": r})
    child = multiprocessing.get_context("fork").Process(
        target=_publish_in_child, args=(str(tmp_path),)
    )
    child.start()
    try:
        child.join(30)
        # An executor inherited without its threads would queue the child's fsyncs for idle
        # workers that do not exist in the child, and hang (measured: it does without the reset).
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert ws.has_weights(2)
