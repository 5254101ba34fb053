"""Datasets: CIFAR-10 from its python batches, sklearn's digits, synthetic data; EFS layout, shards.

Nothing here downloads: CIFAR-10 is read from a path the user gives, digits ships inside
scikit-learn. Images are kept as uint8 NHWC (4x smaller than float32 on EFS) and turned into
float32 in [0, 1], resized to the model's input, one mini-batch at a time.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lambda_runtime.efs import (
    CorruptFileError,
    Lock,
    publish_json,
    publish_npy,
    read_json,
    read_npy,
)


class DatasetError(ValueError):
    """A dataset's content is not what its format promises; the message names the file or array."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the few a CIFAR-10 batch needs."""


# ------------------------------------------------------------------------------------------
# Dataset


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test arrays with labels 0..num_classes-1; x is uint8 images or float32 features."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise DatasetError(f"num_classes: must be an integer >= 2, got {self.num_classes!r}")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        for split in ("train", "test"):
            x: np.ndarray = getattr(self, f"x_{split}")
            y: np.ndarray = getattr(self, f"y_{split}")
            if x.dtype not in (np.uint8, np.float32):
                raise DatasetError(f"x_{split}: dtype must be uint8 or float32, got {x.dtype}")
            if x.shape[1:] != self.input_shape:
                raise DatasetError(
                    f"x_{split}: sample shape {x.shape[1:]} differs from input_shape "
                    f"{self.input_shape}"
                )
            if y.dtype != np.int64 or y.ndim != 1:
                raise DatasetError(
                    f"y_{split}: must be a 1-D int64 array, got {y.dtype} of shape {y.shape}"
                )
            if len(x) != len(y):
                raise DatasetError(f"y_{split}: {len(y)} labels for {len(x)} samples in x_{split}")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                bad = int(np.flatnonzero((y < 0) | (y >= self.num_classes))[0])
                raise DatasetError(
                    f"y_{split}: labels must be in 0..{self.num_classes - 1}, "
                    f"found {int(y[bad])} at index {bad}"
                )
        if len(self.x_train) == 0:
            raise DatasetError("x_train: must hold at least one sample")


# ------------------------------------------------------------------------------------------
# CIFAR-10, official "python version"

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_DIRNAME = "cifar-10-batches-py"
_CIFAR_PIXELS = 32 * 32 * 3


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); allow that
    # one use and no other codec.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # numpy's protocol-5 array reconstructor, reimplemented so nothing else of numpy is reachable.
    if order not in ("C", "F"):
        raise UnsafePickleError(f"_frombuffer with order {order!r} is not allowed")
    flat: np.ndarray = np.frombuffer(bytes(buf), dtype=np.dtype(dtype))
    return flat.reshape(tuple(int(d) for d in shape), order="F" if order == "F" else "C")


_RECONSTRUCT = np.ndarray(0).__reduce__()[0]  # numpy's own _reconstruct, whatever its module path
_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 1 and Python 2 pickles
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the numpy array reconstruction globals; refuse everything else."""
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"global {module}.{name} is not allowed in a dataset pickle"
            ) from None


def restricted_loads(data: bytes) -> Any:
    """Unpickle `data` with `RestrictedUnpickler`; Python 2 strings become bytes, as CIFAR needs."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _decode_cifar_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch pickle -> (uint8 NHWC images, int64 labels); errors name `source`."""
    try:
        batch = restricted_loads(raw)
    except UnsafePickleError as exc:
        raise DatasetError(f"{source}: refused: {exc}") from exc
    except Exception as exc:  # a corrupt pickle can raise almost anything
        raise DatasetError(f"{source}: not a readable CIFAR-10 batch pickle ({exc!r})") from exc
    if not isinstance(batch, dict):
        raise DatasetError(f"{source}: expected a dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or labels is None:
        raise DatasetError(f"{source}: expected keys b'data' (array) and b'labels' (list)")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise DatasetError(
            f"{source}: b'data' must be uint8 of shape (N, {_CIFAR_PIXELS}), "
            f"got {data.dtype} {data.shape}"
        )
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{source}: b'labels' must be a list of integers ({exc})") from exc
    if y.shape != (len(data),):
        raise DatasetError(f"{source}: {y.size} labels for {len(data)} images")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DatasetError(f"{source}: labels must be in 0..9, got {y.min()}..{y.max()}")
    # Rows are channel-major (1024 R, 1024 G, 1024 B), each plane row-major 32x32.
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, y


def _cifar_members_from_tar(path: Path) -> dict[str, bytes]:
    wanted = {*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if base in wanted and member.isfile():
                    fh = tar.extractfile(member)
                    if fh is not None:
                        found[base] = fh.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise DatasetError(f"{path}: not a readable CIFAR-10 tarball ({exc})") from exc
    missing = sorted(wanted - found.keys())
    if missing:
        raise DatasetError(f"{path}: tarball lacks CIFAR-10 batches {missing}")
    return found


def _cifar_members_from_dir(path: Path) -> dict[str, bytes]:
    if (path / CIFAR_DIRNAME).is_dir():
        path = path / CIFAR_DIRNAME
    found: dict[str, bytes] = {}
    for name in (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH):
        try:
            found[name] = (path / name).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                2, "No such file (expected a CIFAR-10 python batch)", str(path / name)
            ) from None
    return found


def load_cifar10(path: Path) -> Dataset:
    """Load CIFAR-10 from its python batches: a directory or cifar-10-python.tar.gz. No download."""
    path = Path(path)
    if path.is_dir():
        raw = _cifar_members_from_dir(path)
        base = path / CIFAR_DIRNAME if (path / CIFAR_DIRNAME).is_dir() else path
        prefix = f"{base}/"
    elif path.exists():
        raw = _cifar_members_from_tar(path)
        prefix = f"{path}:"  # errors name the member inside the tarball
    else:
        raise FileNotFoundError(
            2,
            "No such file or directory (expected CIFAR-10 python batches: a directory with "
            "data_batch_1..5 and test_batch, or cifar-10-python.tar.gz; nothing is downloaded)",
            str(path),
        )
    parts = [_decode_cifar_batch(raw[name], prefix + name) for name in CIFAR_TRAIN_BATCHES]
    x_test, y_test = _decode_cifar_batch(raw[CIFAR_TEST_BATCH], prefix + CIFAR_TEST_BATCH)
    return Dataset(
        name="cifar10",
        x_train=np.concatenate([p[0] for p in parts]),
        y_train=np.concatenate([p[1] for p in parts]),
        x_test=x_test,
        y_test=y_test,
        num_classes=10,
        input_shape=(32, 32, 3),
    )


# ------------------------------------------------------------------------------------------
# Embedded and synthetic data


def _split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def load_digits_dataset(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's digits (1,797 8x8 images, 16 grey levels) as uint8 0..255, shape (8, 8, 1)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # an optional dependency: say what to install
        raise ImportError(
            "dataset 'digits' needs scikit-learn (pip install scikit-learn); it ships the data"
        ) from exc
    digits = load_digits()
    # Grey levels 0..16 -> 0..255 so digits look like any other uint8 image dataset.
    x = np.rint(np.asarray(digits.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    x = x[..., np.newaxis]
    y = np.asarray(digits.target, dtype=np.int64)
    train, test = _split(len(x), test_fraction, seed)
    return Dataset("digits", x[train], y[train], x[test], y[test], 10, (8, 8, 1))


def synthetic_dataset(
    n_train: int,
    n_test: int,
    input_shape: tuple[int, ...] = (8, 8, 1),
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """Learnable synthetic uint8 data: a random mean image per class plus Gaussian noise."""
    for field, value, low in (("n_train", n_train, 1), ("n_test", n_test, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{field}: must be an integer >= {low}, got {value!r}")
    if not input_shape or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"input_shape: must be positive dimensions, got {input_shape!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes: must be >= 2, got {num_classes}")
    rng = np.random.default_rng(seed)
    means = rng.uniform(40.0, 215.0, size=(num_classes, *input_shape))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        # Balanced labels in random order, so every class appears in any large enough split.
        y = rng.permutation(np.arange(n, dtype=np.int64) % num_classes)
        noise = rng.normal(0.0, 30.0, size=(n, *input_shape))
        x = np.clip(np.rint(means[y] + noise), 0, 255).astype(np.uint8)
        return x, y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    shape = tuple(int(d) for d in input_shape)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, num_classes, shape)


SYNTHETIC_DEFAULT_TRAIN = 2000


def get_dataset(spec: str) -> Dataset:
    """'digits' | 'synthetic' | 'synthetic:<n>' | a CIFAR-10 path (directory or tarball)."""
    allowed = (
        "'digits', 'synthetic', 'synthetic:<n>' (n >= 1 training samples), or the path of "
        "CIFAR-10 python batches (a directory or cifar-10-python.tar.gz)"
    )
    if spec == "digits":
        return load_digits_dataset()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        count = spec.partition(":")[2] or str(SYNTHETIC_DEFAULT_TRAIN)
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"dataset: bad sample count in {spec!r}; allowed: {allowed}")
        n = int(count)
        return synthetic_dataset(n, max(1, n // 4))
    if os.path.exists(spec) or "/" in spec or spec.endswith((".tar.gz", ".tgz", ".tar")):
        return load_cifar10(Path(spec))  # a path: a missing one raises FileNotFoundError
    raise ValueError(f"dataset: unknown {spec!r}; allowed: {allowed}")


# ------------------------------------------------------------------------------------------
# EFS layout

MANIFEST = "manifest.json"
_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
_FORMAT = 1


def _sha256(array: np.ndarray) -> str:
    h = hashlib.sha256()
    raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    step = 1 << 24  # hash in 16 MiB slices so a memory map is not read in one piece
    for start in range(0, raw.size, step):
        h.update(raw[start : start + step].data)
    return h.hexdigest()


def _describe(dataset: Dataset) -> dict[str, Any]:
    arrays = {}
    for name in _ARRAYS:
        a: np.ndarray = getattr(dataset, name)
        arrays[name] = {
            "file": f"{name}.npy",
            "shape": list(a.shape),
            "dtype": a.dtype.str,
            "sha256": _sha256(a),
        }
    return {
        "format": _FORMAT,
        "name": dataset.name,
        "num_classes": dataset.num_classes,
        "input_shape": list(dataset.input_shape),
        "arrays": arrays,
    }


def _same_content(found: Any, wanted: dict[str, Any], manifest: Path) -> None:
    if found != wanted:
        name = found.get("name") if isinstance(found, dict) else None
        raise DatasetError(
            f"{manifest}: the directory already holds another dataset ({name!r}); "
            f"use a fresh data_dir for {wanted['name']!r}"
        )


def prepare_on_efs(dataset: Dataset, data_dir: Path) -> Path:
    """Publish the dataset as .npy files plus manifest.json; idempotent and safe to race."""
    data_dir = Path(data_dir)
    manifest = data_dir / MANIFEST
    wanted = _describe(dataset)
    # The manifest is published last, so its presence means every array is complete.
    if manifest.exists():
        _same_content(read_json(manifest), wanted, manifest)
        return data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    with Lock(data_dir / ".prepare.lock", timeout=600):
        if manifest.exists():  # another process finished while we waited
            _same_content(read_json(manifest), wanted, manifest)
            return data_dir
        for name in _ARRAYS:
            publish_npy(data_dir / f"{name}.npy", getattr(dataset, name))
        publish_json(manifest, wanted)
    return data_dir


def open_from_efs(data_dir: Path, verify_hash: bool = False) -> Dataset:
    """Memory-map a prepared dataset and check it against its manifest.

    Shapes, dtypes and file sizes are always checked (catches missing and truncated files);
    sha256 only with `verify_hash`, since it reads every byte and defeats the memory map.
    """
    data_dir = Path(data_dir)
    manifest_path = data_dir / MANIFEST
    try:
        manifest = read_json(manifest_path)
    except FileNotFoundError:
        raise FileNotFoundError(
            2, "No such file (expected the manifest written by prepare_on_efs)", str(manifest_path)
        ) from None
    try:
        specs = manifest["arrays"]
        arrays: dict[str, np.ndarray] = {}
        for name in _ARRAYS:
            spec = specs[name]
            path = data_dir / spec["file"]
            arr = read_npy(path, mmap=True)  # raises on missing or truncated files
            if list(arr.shape) != spec["shape"] or arr.dtype.str != spec["dtype"]:
                raise CorruptFileError(
                    path,
                    f"holds {arr.dtype.str} {list(arr.shape)}, manifest says "
                    f"{spec['dtype']} {spec['shape']}",
                )
            if verify_hash and _sha256(arr) != spec["sha256"]:
                raise CorruptFileError(path, "sha256 differs from the manifest")
            arrays[name] = arr
        return Dataset(
            name=str(manifest["name"]),
            x_train=arrays["x_train"],
            y_train=arrays["y_train"],
            x_test=arrays["x_test"],
            y_test=arrays["y_test"],
            num_classes=int(manifest["num_classes"]),
            input_shape=tuple(manifest["input_shape"]),
        )
    except (KeyError, TypeError) as exc:
        raise CorruptFileError(manifest_path, f"malformed manifest ({exc!r})") from exc


# ------------------------------------------------------------------------------------------
# Sharding and batches


def shard_indices(n: int, seed: int, epoch: int, workers: int, worker: int) -> np.ndarray:
    """Worker `worker`'s contiguous part of a permutation of range(n) fixed by (seed, epoch)."""
    for field, value, low in (("n", n, 0), ("seed", seed, 0), ("epoch", epoch, 0)):
        if value < low:
            raise ValueError(f"{field}: must be >= {low}, got {value}")
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    if not 0 <= worker < workers:
        raise ValueError(f"worker: must be in 0..{workers - 1}, got {worker}")
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    # The first n % workers parts get one extra sample (numpy.array_split's rule).
    base, extra = divmod(n, workers)
    start = worker * base + min(worker, extra)
    stop = start + base + (1 if worker < extra else 0)
    return perm[start:stop].astype(np.int64)


def resize_images(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of NHWC images to `size` (h, w) as float32, values kept in the input's scale.

    Half-pixel centres (as tf.image.resize's bilinear without antialias), so the same size is
    the identity and corners are not stretched.
    """
    if x.ndim != 4:
        raise ValueError(f"x: must be NHWC (4-D), got shape {x.shape}")
    out_h, out_w = (int(size[0]), int(size[1]))
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size: must be positive (h, w), got {size}")
    src = x.astype(np.float32, copy=False)
    in_h, in_w = src.shape[1], src.shape[2]
    if (in_h, in_w) == (out_h, out_w):
        return src.copy() if src is x else src

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        pos = np.clip(pos, 0.0, n_in - 1)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = axis(in_h, out_h)
    x0, x1, fx = axis(in_w, out_w)
    # Separable: interpolate along rows, then along columns. The lerp form a + (b - a) * f keeps
    # constant regions exact.
    top = src[:, y0]
    rows = top + (src[:, y1] - top) * fy[None, :, None, None]
    left = rows[:, :, x0]
    out = left + (rows[:, :, x1] - left) * fx[None, None, :, None]
    result: np.ndarray = out.astype(np.float32, copy=False)
    return result


def _to_model_input(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    if x.dtype == np.uint8:
        out = x.astype(np.float32) * np.float32(1.0 / 255.0)
    else:
        out = x.astype(np.float32, copy=False)
    target = tuple(input_shape)
    if out.shape[1:] == target:
        return out
    if out.ndim == 4 and len(target) == 3:
        if out.shape[1:3] != target[:2]:
            out = resize_images(out, (target[0], target[1]))
            if x.dtype == np.uint8:
                np.clip(out, 0.0, 1.0, out=out)  # float32 rounding can overshoot 1.0 by an ulp
        if out.shape[3] == 1 and target[2] == 3:
            out = np.repeat(out, 3, axis=3)  # grey -> RGB for models with ImageNet inputs
        if out.shape[1:] == target:
            return out
    raise ValueError(f"input_shape: cannot turn samples of shape {x.shape[1:]} into {target}")


def batches(
    ds_x: np.ndarray,
    ds_y: np.ndarray,
    indices: np.ndarray,
    batch_size: int,
    input_shape: tuple[int, ...],
    start_step: int = 0,
    steps: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (x float32 in [0, 1] shaped to input_shape, y) for consecutive mini-batches of indices.

    `start_step` skips that many batches (resume after partial work); at most `steps` batches
    are yielded, fewer if the indices run out; the last batch may be short.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if start_step < 0:
        raise ValueError(f"start_step: must be >= 0, got {start_step}")
    if steps is not None and steps < 0:
        raise ValueError(f"steps: must be >= 0 or None, got {steps}")
    if len(ds_x) != len(ds_y):
        raise ValueError(f"ds_y: {len(ds_y)} labels for {len(ds_x)} samples in ds_x")
    idx = np.asarray(indices, dtype=np.int64)
    total = -(-len(idx) // batch_size)
    stop = total if steps is None else min(total, start_step + steps)
    for step in range(start_step, stop):
        part = idx[step * batch_size : (step + 1) * batch_size]
        # Gathering in sorted order reads a memory-mapped file sequentially; then restore order.
        order = np.argsort(part, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        xb = np.asarray(ds_x[part[order]])[inverse]
        yb = np.asarray(ds_y[part[order]], dtype=np.int64)[inverse]
        yield _to_model_input(xb, input_shape), yb
