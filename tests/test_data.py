"""Datasets: CIFAR-10 batches, restricted unpickling, digits, sharding, EFS layout, batches."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lambda_runtime.efs import CorruptFileError
from simulator.data import (
    CIFAR_TEST_BATCH,
    CIFAR_TRAIN_BATCHES,
    Dataset,
    DatasetError,
    UnsafePickleError,
    batches,
    get_dataset,
    load_cifar10,
    load_digits_dataset,
    open_from_efs,
    prepare_on_efs,
    resize_images,
    restricted_loads,
    shard_indices,
    synthetic_dataset,
)

CTX = mp.get_context("fork")
PER_BATCH = 4  # images per fake batch (the real files hold 10,000)


def _fake_batch(index: int, n: int = PER_BATCH) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(index)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), [
        int(v) for v in rng.integers(0, 10, n)
    ]


def _batch_pickle(index: int, protocol: int = 2, **override: Any) -> bytes:
    data, labels = _fake_batch(index)
    batch = {b"batch_label": b"fake", b"labels": labels, b"data": data, b"filenames": []}
    batch.update({k.encode(): v for k, v in override.items()})
    return pickle.dumps(batch, protocol=protocol)


def _write_cifar_dir(root: Path, protocol: int = 2) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i, name in enumerate((*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)):
        (d / name).write_bytes(_batch_pickle(i, protocol))
    return d


def _write_cifar_tar(path: Path, members: dict[str, bytes] | None = None) -> Path:
    if members is None:
        names = (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)
        members = {name: _batch_pickle(i) for i, name in enumerate(names)}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _expected_cifar() -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([_fake_batch(i)[0] for i in range(5)])
    y = np.concatenate([_fake_batch(i)[1] for i in range(5)])
    return x, np.asarray(y, dtype=np.int64)


# ------------------------------------------------------------------------------ CIFAR-10


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_directory(tmp_path: Path, protocol: int) -> None:
    d = _write_cifar_dir(tmp_path, protocol)
    for path in (d, tmp_path):  # the batches directory or its parent
        ds = load_cifar10(path)
        x, y = _expected_cifar()
        assert ds.x_train.shape == (5 * PER_BATCH, 32, 32, 3) and ds.x_train.dtype == np.uint8
        assert ds.x_test.shape == (PER_BATCH, 32, 32, 3)
        np.testing.assert_array_equal(ds.y_train, y)
        # Pixel (r, c) of channel k comes from offset k*1024 + r*32 + c of the row.
        np.testing.assert_array_equal(ds.x_train[5, 2, 7, 1], x[5, 1024 + 2 * 32 + 7])
        np.testing.assert_array_equal(ds.x_train[:, :, :, 0].reshape(-1, 1024), x[:, :1024])
        assert ds.num_classes == 10 and ds.input_shape == (32, 32, 3)


def _py2_batch_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickle as Python 2's cPickle wrote the official files: protocol 2, str opcodes."""
    rows, cols = data.shape
    raw = data.tobytes()

    def short(s: bytes) -> bytes:  # SHORT_BINSTRING
        return b"U" + bytes([len(s)]) + s

    return (
        b"\x80\x02}(" + short(b"data")
        + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short(b"b")
        + b"\x87R(K\x01M" + struct.pack("<H", rows) + b"M" + struct.pack("<H", cols) + b"\x86"
        + b"cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + short(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
        + b"T" + struct.pack("<I", len(raw)) + raw + b"tb"
        + short(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"eu."
    )  # fmt: skip


def test_cifar_python2_pickles(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i, name in enumerate((*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)):
        (d / name).write_bytes(_py2_batch_pickle(*_fake_batch(i)))
    ds = load_cifar10(d)
    x, y = _expected_cifar()
    np.testing.assert_array_equal(ds.y_train, y)
    np.testing.assert_array_equal(ds.x_train.transpose(0, 3, 1, 2).reshape(-1, 3072), x)


def test_cifar_tarball_without_extraction(tmp_path: Path) -> None:
    tar = _write_cifar_tar(tmp_path / "cifar-10-python.tar.gz")
    ds = load_cifar10(tar)
    np.testing.assert_array_equal(ds.y_train, _expected_cifar()[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]
    assert get_dataset(str(tar)).x_test.shape == (PER_BATCH, 32, 32, 3)


def test_cifar_missing_file_named(tmp_path: Path) -> None:
    d = _write_cifar_dir(tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10(d)
    assert "data_batch_3" in str(info.value)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_cifar10(tmp_path / "nowhere")


def test_cifar_corrupt_pickle_named(tmp_path: Path) -> None:
    d = _write_cifar_dir(tmp_path)
    good = (d / "data_batch_2").read_bytes()
    (d / "data_batch_2").write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match=r"data_batch_2.*not a readable"):
        load_cifar10(d)


def test_cifar_wrong_shape_named(tmp_path: Path) -> None:
    d = _write_cifar_dir(tmp_path)
    bad = pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, 2)
    (d / CIFAR_TEST_BATCH).write_bytes(bad)
    with pytest.raises(DatasetError, match=r"test_batch.*\(N, 3072\)"):
        load_cifar10(d)
    bad = pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, 2)
    (d / CIFAR_TEST_BATCH).write_bytes(bad)
    with pytest.raises(DatasetError, match=r"test_batch.*0\.\.9"):
        load_cifar10(d)


def test_cifar_corrupt_tarball(tmp_path: Path) -> None:
    names = (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)
    members = {name: _batch_pickle(i) for i, name in enumerate(names)}
    members["data_batch_4"] = b"\x80\x02garbage"
    tar = _write_cifar_tar(tmp_path / "c.tar.gz", members)
    with pytest.raises(DatasetError, match=r"c\.tar\.gz:data_batch_4"):
        load_cifar10(tar)
    del members["test_batch"]
    tar = _write_cifar_tar(tmp_path / "d.tar.gz", members)
    with pytest.raises(DatasetError, match="test_batch"):
        load_cifar10(tar)
    (tmp_path / "e.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DatasetError, match=r"e\.tar\.gz"):
        load_cifar10(tmp_path / "e.tar.gz")


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_os_system(tmp_path: Path) -> None:
    evil = pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2)
    assert b"system" in evil
    with pytest.raises(UnsafePickleError, match=r"(posix|os)\.system"):
        restricted_loads(evil)
    d = _write_cifar_dir(tmp_path)
    (d / "data_batch_1").write_bytes(evil)
    with pytest.raises(DatasetError, match=r"data_batch_1.*refused.*system"):
        load_cifar10(d)


def test_restricted_unpickler_refuses_other_codecs() -> None:
    # _codecs.encode is allowed only for the latin1 bytes protocol-2 pickles use.
    sneaky = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R."
    with pytest.raises(UnsafePickleError, match="zlib"):
        restricted_loads(sneaky)
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        restricted_loads(b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.")


# ------------------------------------------------------------------------------ datasets


def test_digits_loads_offline_and_deterministically() -> None:
    ds = load_digits_dataset()
    assert ds.name == "digits" and ds.input_shape == (8, 8, 1) and ds.num_classes == 10
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == round(1797 * 0.2)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.max() == 255 and ds.x_train.min() == 0
    assert set(np.unique(ds.y_train)) == set(range(10))
    again = load_digits_dataset()
    np.testing.assert_array_equal(ds.x_test, again.x_test)
    other = load_digits_dataset(seed=1)
    assert not np.array_equal(ds.y_test, other.y_test)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_dataset(test_fraction=1.0)


def _nearest_mean_accuracy(ds: Dataset) -> float:
    xtr = ds.x_train.reshape(len(ds.x_train), -1).astype(np.float64)
    xte = ds.x_test.reshape(len(ds.x_test), -1).astype(np.float64)
    means = np.stack([xtr[ds.y_train == c].mean(axis=0) for c in range(ds.num_classes)])
    dist = ((xte[:, None, :] - means[None]) ** 2).sum(axis=2)
    return float((dist.argmin(axis=1) == ds.y_test).mean())


def test_synthetic_is_learnable_and_deterministic() -> None:
    ds = synthetic_dataset(500, 200, (6, 6, 3), 5, seed=3)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape == (500, 6, 6, 3)
    assert np.bincount(ds.y_train).tolist() == [100] * 5
    # Nearest class mean from the training split classifies the test split well above 1/5.
    assert _nearest_mean_accuracy(ds) > 0.9
    same = synthetic_dataset(500, 200, (6, 6, 3), 5, seed=3)
    np.testing.assert_array_equal(ds.x_test, same.x_test)
    assert not np.array_equal(ds.x_test, synthetic_dataset(500, 200, (6, 6, 3), 5, 4).x_test)
    with pytest.raises(ValueError, match="n_train"):
        synthetic_dataset(0, 1)


def test_digits_is_learnable() -> None:
    assert _nearest_mean_accuracy(load_digits_dataset()) > 0.8


def test_get_dataset_specs(tmp_path: Path) -> None:
    assert get_dataset("digits").name == "digits"
    assert len(get_dataset("synthetic").x_train) == 2000
    small = get_dataset("synthetic:40")
    assert len(small.x_train) == 40 and len(small.x_test) == 10
    for bad in ("cifar", "synthetic:x", "synthetic:0", "mnist"):
        with pytest.raises(ValueError, match="allowed: 'digits', 'synthetic'"):
            get_dataset(bad)
    with pytest.raises(FileNotFoundError):
        get_dataset(str(tmp_path / "cifar-10-python.tar.gz"))
    _write_cifar_dir(tmp_path)
    assert get_dataset(str(tmp_path)).name == "cifar10"


def test_dataset_validation_names_array() -> None:
    x = np.zeros((3, 2, 2, 1), np.uint8)
    y = np.array([0, 1, 2], np.int64)
    Dataset("ok", x, y, x, y, 3, (2, 2, 1))
    with pytest.raises(DatasetError, match=r"y_test: labels must be in 0\.\.1, found 2 at index 2"):
        Dataset("bad", x, np.array([0, 1, 1]), x, y, 2, (2, 2, 1))
    with pytest.raises(DatasetError, match="y_train: 2 labels for 3 samples"):
        Dataset("bad", x, y[:2], x, y, 3, (2, 2, 1))
    with pytest.raises(DatasetError, match="x_test: dtype"):
        Dataset("bad", x, y, x.astype(np.float64), y, 3, (2, 2, 1))
    with pytest.raises(DatasetError, match="x_train: sample shape"):
        Dataset("bad", x, y, x, y, 3, (4, 1))
    with pytest.raises(DatasetError, match="y_train: must be a 1-D int64"):
        Dataset("bad", x, y.astype(np.int32), x, y, 3, (2, 2, 1))


# ------------------------------------------------------------------------------ sharding


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 500),
    seed=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 1000),
    workers=st.integers(1, 40),
)
def test_shards_are_a_disjoint_cover(n: int, seed: int, epoch: int, workers: int) -> None:
    parts = [shard_indices(n, seed, epoch, workers, w) for w in range(workers)]
    joined = np.concatenate(parts)
    # Disjoint and covering: together exactly a permutation of range(n).
    assert np.array_equal(np.sort(joined), np.arange(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    # Deterministic from (seed, epoch, workers, worker).
    assert all(
        np.array_equal(p, shard_indices(n, seed, epoch, workers, w)) for w, p in enumerate(parts)
    )
    # Contiguous parts of one permutation: independent of how many workers split it.
    assert np.array_equal(joined, shard_indices(n, seed, epoch, 1, 0))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(20, 500), seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 1000))
def test_shards_differ_across_epochs(n: int, seed: int, epoch: int) -> None:
    # Two permutations of >= 20 items coincide with probability 1/20! (~4e-19).
    a = shard_indices(n, seed, epoch, 1, 0)
    b = shard_indices(n, seed, epoch + 1, 1, 0)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"workers": 0, "worker": 0}, "workers"),
        ({"workers": 3, "worker": 3}, "worker"),
        ({"workers": 3, "worker": -1}, "worker"),
        ({"workers": 1, "worker": 0, "n": -1}, "n"),
        ({"workers": 1, "worker": 0, "epoch": -1}, "epoch"),
    ],
)
def test_shard_arguments_named(kwargs: dict[str, int], field: str) -> None:
    args = {"n": 10, "seed": 0, "epoch": 0, **kwargs}
    with pytest.raises(ValueError, match=rf"^{field}: "):
        shard_indices(**args)


# ------------------------------------------------------------------------------ EFS layout


def test_prepare_and_open_from_efs(tmp_path: Path) -> None:
    ds = synthetic_dataset(50, 10, (4, 4, 3), 3, seed=1)
    data_dir = prepare_on_efs(ds, tmp_path / "data")
    assert sorted(p.name for p in data_dir.iterdir() if not p.name.startswith(".")) == [
        "manifest.json",
        "x_test.npy",
        "x_train.npy",
        "y_test.npy",
        "y_train.npy",
    ]
    opened = open_from_efs(data_dir, verify_hash=True)
    assert isinstance(opened.x_train, np.memmap) and opened.x_train.dtype == np.uint8
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(opened, name), getattr(ds, name))
    assert (opened.name, opened.num_classes, opened.input_shape) == ("synthetic", 3, (4, 4, 3))

    # A second call finds the manifest and rewrites nothing.
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in data_dir.iterdir()}
    assert prepare_on_efs(ds, data_dir) == data_dir
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in data_dir.iterdir()}
    assert before == after
    # ...but it does not pass off another dataset as this one.
    with pytest.raises(DatasetError, match="another dataset"):
        prepare_on_efs(synthetic_dataset(50, 10, (4, 4, 3), 3, seed=2), data_dir)


def test_open_from_efs_truncated_and_missing(tmp_path: Path) -> None:
    data_dir = prepare_on_efs(synthetic_dataset(30, 5, (4, 4, 1), 2), tmp_path / "d")
    x = data_dir / "x_train.npy"
    with open(x, "r+b") as fh:
        fh.truncate(x.stat().st_size - 1)
    with pytest.raises(CorruptFileError, match=r"x_train\.npy: truncated"):
        open_from_efs(data_dir)
    (data_dir / "y_test.npy").unlink()
    x.unlink()
    with pytest.raises(FileNotFoundError, match=r"x_train\.npy"):
        open_from_efs(data_dir)
    with pytest.raises(FileNotFoundError, match="prepare_on_efs"):
        open_from_efs(tmp_path / "empty")


def test_open_from_efs_verify_hash_detects_changed_bytes(tmp_path: Path) -> None:
    data_dir = prepare_on_efs(synthetic_dataset(30, 5, (4, 4, 1), 2), tmp_path / "d")
    path = data_dir / "x_test.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    open_from_efs(data_dir)  # same size and header: only the hash can tell
    with pytest.raises(CorruptFileError, match=r"x_test\.npy: sha256"):
        open_from_efs(data_dir, verify_hash=True)


def _prepare_racer(data_dir: Path, barrier: Any, out: Any) -> None:
    ds = synthetic_dataset(400, 100, (8, 8, 3), 10, seed=7)
    barrier.wait(30)
    out.put(str(prepare_on_efs(ds, data_dir)))


def test_prepare_on_efs_concurrent(tmp_path: Path) -> None:
    racers = 8
    barrier, out = CTX.Barrier(racers), CTX.Queue()
    procs = [
        CTX.Process(target=_prepare_racer, args=(tmp_path / "d", barrier, out))
        for _ in range(racers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * racers
    assert {out.get(timeout=5) for _ in range(racers)} == {str(tmp_path / "d")}
    opened = open_from_efs(tmp_path / "d", verify_hash=True)
    np.testing.assert_array_equal(
        opened.x_train, synthetic_dataset(400, 100, (8, 8, 3), 10, seed=7).x_train
    )
    assert not list((tmp_path / "d").glob(".*.tmp"))


# ------------------------------------------------------------------------------ resize, batches


def _resize_reference(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Slow per-pixel bilinear with half-pixel centres: the oracle."""
    n, in_h, in_w, c = img.shape
    out = np.zeros((n, h, w, c), np.float64)
    for i in range(h):
        sy = min(max((i + 0.5) * in_h / h - 0.5, 0.0), in_h - 1)
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, in_h - 1), sy - y0
        for j in range(w):
            sx = min(max((j + 0.5) * in_w / w - 0.5, 0.0), in_w - 1)
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, in_w - 1), sx - x0
            top = img[:, y0, x0] * (1 - fx) + img[:, y0, x1] * fx
            bottom = img[:, y1, x0] * (1 - fx) + img[:, y1, x1] * fx
            out[:, i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize(("h", "w"), [(224, 224), (16, 12), (5, 7), (1, 1), (32, 32)])
def test_resize_shapes_and_reference(h: int, w: int) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    out = resize_images(x, (h, w))
    assert out.shape == (3, h, w, 3) and out.dtype == np.float32
    # float32 arithmetic vs a float64 oracle on values up to 255: 1e-3 absolute is ample.
    np.testing.assert_allclose(out, _resize_reference(x.astype(np.float64), h, w), atol=1e-3)
    # Bilinear never leaves the input's range (up to float32 rounding, hence the 1e-3).
    assert out.min() >= -1e-3 and out.max() <= 255 + 1e-3


def test_resize_same_size_is_identity() -> None:
    x = np.random.default_rng(1).integers(0, 256, size=(2, 9, 11, 1), dtype=np.uint8)
    np.testing.assert_array_equal(resize_images(x, (9, 11)), x.astype(np.float32))
    f = x.astype(np.float32)
    out = resize_images(f, (9, 11))
    np.testing.assert_array_equal(out, f)
    assert out is not f
    with pytest.raises(ValueError, match="NHWC"):
        resize_images(x[0], (4, 4))


def test_resize_constant_image_stays_constant() -> None:
    x = np.full((1, 32, 32, 3), 77, np.uint8)
    np.testing.assert_allclose(resize_images(x, (224, 224)), 77.0, rtol=0, atol=1e-4)


def test_batches_order_scale_resize_and_resume() -> None:
    ds = synthetic_dataset(23, 1, (32, 32, 3), 4, seed=0)
    idx = shard_indices(23, 0, 0, 1, 0)
    got = list(batches(ds.x_train, ds.y_train, idx, 8, (32, 32, 3)))
    assert [len(y) for _, y in got] == [8, 8, 7]
    x0, y0 = got[0]
    assert x0.dtype == np.float32 and x0.min() >= 0.0 and x0.max() <= 1.0
    np.testing.assert_array_equal(y0, ds.y_train[idx[:8]])
    np.testing.assert_allclose(x0 * 255.0, ds.x_train[idx[:8]].astype(np.float32), atol=1e-3)
    # Resuming at step 1 for 1 step gives exactly the second batch, resized on the fly.
    (xr, yr), *rest = list(batches(ds.x_train, ds.y_train, idx, 8, (64, 48, 3), 1, 1))
    assert rest == [] and xr.shape == (8, 64, 48, 3)
    np.testing.assert_array_equal(yr, got[1][1])
    np.testing.assert_allclose(xr, resize_images(got[1][0], (64, 48)), atol=1e-6)
    assert list(batches(ds.x_train, ds.y_train, idx, 8, (32, 32, 3), 3)) == []


def test_batches_grey_to_rgb_and_errors() -> None:
    ds = load_digits_dataset()
    ((x, _),) = list(batches(ds.x_train, ds.y_train, np.arange(4), 4, (16, 16, 3), steps=1))
    assert x.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    with pytest.raises(ValueError, match="input_shape"):
        next(batches(ds.x_train, ds.y_train, np.arange(4), 4, (8, 8, 2)))
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(ds.x_train, ds.y_train, np.arange(4), 0, (8, 8, 1)))


def test_batches_from_memory_mapped_efs(tmp_path: Path) -> None:
    ds = synthetic_dataset(40, 4, (8, 8, 1), 2, seed=5)
    opened = open_from_efs(prepare_on_efs(ds, tmp_path / "d"))
    idx = shard_indices(40, 1, 2, 3, 1)
    a = list(batches(opened.x_train, opened.y_train, idx, 5, (8, 8, 1)))
    b = list(batches(ds.x_train, ds.y_train, idx, 5, (8, 8, 1)))
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
