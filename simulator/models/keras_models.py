"""Keras models behind the Model protocol: a small CNN and VGG19 transfer learning (design §1).

Only the trainable weights travel (through EFS): ``init_weights`` returns them and every call
takes them back. A frozen part (VGG19's convolutional base) is rebuilt identically in every
process, from the same ImageNet file or, without it, from the same seed, and is never shipped.
The Keras model is built on first use and cached in a module global, so a warm Lambda
environment reuses it; gradients come from ``tf.GradientTape`` inside a ``tf.function`` whose
input signature has a free batch dimension, so it is traced once per model.

The head ends in logits; the softmax is applied by ``predict_proba`` and, in the loss, by
``sparse_softmax_cross_entropy_with_logits`` (numerically stable, unlike a softmax output layer
followed by a clipped log). The trainable weights are the same as those of a
``Dense(num_classes, activation="softmax")`` head: its kernel and bias.

No download is ever attempted: the VGG19 base is built with ``weights=None`` and the ImageNet
"notop" file is loaded from the local Keras cache (``$KERAS_HOME/models``, else
``~/.keras/models`` or ``/tmp/.keras/models``) or from ``weights_path``. Without it the base is
random from the constructor's seed (with a warning), identical in every process.

Memory, measured with psutil RSS (sampled every 5 ms) on a 2-core x86-64 Linux box with
TensorFlow 2.21 CPU: importing TensorFlow costs ~0.6 GB; building VGG19 at 224x224 adds ~0.1 GB
(20 M frozen parameters, 80 MB); a loss_and_grad_sum with batch 8 peaks at ~1.0 GB RSS in all and
takes ~1.5 s. The frozen base records nothing on the tape, so only the forward activations of
one batch are live. The thesis saw the same workload fail below ~5 GB on Lambda, where Keras'
fit loop and optimiser state, the libraries loaded from EFS and the runtime add to this; so
~1 GB here is a floor, not a promise. Lambda's memory setting also buys CPU (1,769 MB = 1 vCPU),
so a larger setting is faster as well.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from simulator.models import Array

keras = tf.keras

VGG19_NOTOP_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
"""The file name Keras caches the ImageNet VGG19 base under (keras.applications.VGG19)."""
VGG19_FEATURES = 512
VGG19_MIN_SIZE = 32  # five 2x2 poolings: the smallest input VGG19 accepts
THESIS_INPUT_SIZE = 224


def _positive_int(field_name: str, value: object, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{field_name}: must be an int >= {lo}, got {value!r}")
    return int(value)


def _image_shape(value: object) -> tuple[int, int, int]:
    msg = f"input_shape: must be (height, width, channels) of positive ints, got {value!r}"
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(msg)
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in value):
        raise ValueError(msg)
    return (int(value[0]), int(value[1]), int(value[2]))


def keras_cache_dirs(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where Keras caches downloaded model files: $KERAS_HOME/models, else ~/.keras/models.

    Keras itself falls back to /tmp/.keras when the home directory is not writable (as on
    Lambda), so that directory is searched too.
    """
    env = os.environ if environ is None else environ
    if env.get("KERAS_HOME"):
        return [Path(env["KERAS_HOME"]).expanduser() / "models"]
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return [home / ".keras" / "models", Path("/tmp/.keras/models")]


def find_vgg19_weights(
    weights_path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path | None:
    """The ImageNet notop file to load: `weights_path` (must exist) or the Keras cache, or None."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            # Asked for explicitly: falling back to random weights would hide a typo.
            raise FileNotFoundError(
                2, "weights_path: no such file (VGG19 ImageNet weights)", str(path)
            )
        return path
    for directory in keras_cache_dirs(environ):
        candidate = directory / VGG19_NOTOP_FILE
        if candidate.is_file():
            return candidate
    return None


# ------------------------------------------------------------------------------------------
# Architectures: a frozen part built once per process, a trainable part built from a seed


@dataclass(frozen=True)
class _Arch:
    """How to build one model: `key` identifies the built graph in the process cache."""

    key: tuple[Any, ...]
    input_shape: tuple[int, ...]
    # Frozen feature extractor (None: everything is trainable); built under set_random_seed.
    build_base: Callable[[], Any] | None
    # seed -> the trainable part, a keras.Model on the base's output.
    build_trainable: Callable[[int], Any]


def _seeded(kind: str, seed: int, index: int) -> Any:
    # An explicit seed per layer keeps init_weights independent of Keras' global RNG state.
    sub = (seed * 1009 + index) % (2**31 - 1)
    if kind == "glorot":
        return keras.initializers.GlorotUniform(seed=sub)
    return keras.initializers.HeNormal(seed=sub)


def _cnn_trainable(input_shape: tuple[int, ...], num_classes: int) -> Callable[[int], Any]:
    def build(seed: int) -> Any:
        layers = keras.layers
        return keras.Sequential(
            [
                keras.Input(input_shape),
                layers.Conv2D(
                    16,
                    3,
                    padding="same",
                    activation="relu",
                    kernel_initializer=_seeded("he", seed, 0),
                ),
                # "same" pooling lets inputs as small as 1x1 through both blocks.
                layers.MaxPooling2D(2, padding="same"),
                layers.Conv2D(
                    32,
                    3,
                    padding="same",
                    activation="relu",
                    kernel_initializer=_seeded("he", seed, 1),
                ),
                layers.MaxPooling2D(2, padding="same"),
                layers.Flatten(),
                layers.Dense(64, activation="relu", kernel_initializer=_seeded("he", seed, 2)),
                layers.Dense(num_classes, kernel_initializer=_seeded("glorot", seed, 3)),
            ],
            name="cnn",
        )

    return build


def _vgg19_base(input_size: int, weights_file: Path | None) -> Callable[[], Any]:
    def build() -> Any:
        shape = (input_size, input_size, 3)
        # weights=None: Keras would otherwise download the file; we load it ourselves.
        vgg = keras.applications.VGG19(
            include_top=False, weights=None, input_shape=shape, pooling="avg"
        )
        if weights_file is not None:
            try:
                vgg.load_weights(str(weights_file))
            except (ValueError, OSError, KeyError) as exc:
                raise ValueError(
                    f"weights_path: {weights_file} is not VGG19 notop weights ({exc})"
                ) from exc
        vgg.trainable = False
        inputs = keras.Input(shape)
        # Samples arrive in [0, 1]; VGG19 expects 0..255 with ImageNet's "caffe" preprocessing
        # (RGB -> BGR, mean pixel subtracted).
        x = keras.layers.Lambda(
            lambda t: keras.applications.vgg19.preprocess_input(t * 255.0), name="preprocess"
        )(inputs)
        return keras.Model(inputs, vgg(x, training=False), name="vgg19_base")

    return build


def _dense_head(features: int, num_classes: int) -> Callable[[int], Any]:
    def build(seed: int) -> Any:
        return keras.Sequential(
            [
                keras.Input((features,)),
                keras.layers.Dense(num_classes, kernel_initializer=_seeded("glorot", seed, 0)),
            ],
            name="head",
        )

    return build


# ------------------------------------------------------------------------------------------
# The per-process cache of built models


@dataclass
class _Built:
    """A built Keras model, its traced gradient function and what its variables hold now."""

    model: Any
    variables: list[Any]
    grad_fn: Any
    proba_fn: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Copies of the arrays last assigned, per variable; shared by every KerasModel on this
    # graph, so one instance's assign is never mistaken for another's.
    assigned: list[Array | None] = field(default_factory=list)


_CACHE: dict[tuple[Any, ...], _Built] = {}
_CACHE_LOCK = threading.Lock()


def _build(arch: _Arch, seed: int) -> _Built:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(arch.input_shape)
    h = inputs
    if arch.build_base is not None:
        base = arch.build_base()
        base.trainable = False
        h = base(h, training=False)
    logits = arch.build_trainable(seed)(h)
    model = keras.Model(inputs, logits)
    variables = list(model.trainable_variables)

    spec_x = tf.TensorSpec((None, *arch.input_shape), tf.float32)
    spec_y = tf.TensorSpec((None,), tf.int64)

    def loss_and_grads(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            # training=False: the frozen bases here have no BatchNorm or Dropout to switch.
            out = model(x, training=False)
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out)
            total = tf.reduce_sum(losses)
        grads = tape.gradient(total, variables)
        # The reported sum is accumulated in float64, like the NumPy models'.
        return tf.reduce_sum(tf.cast(losses, tf.float64)), grads

    def proba(x: Any) -> Any:
        return tf.nn.softmax(model(x, training=False), axis=-1)

    # A fixed signature with a free batch dimension: traced once, whatever the batch size.
    grad_fn = tf.function(loss_and_grads, input_signature=[spec_x, spec_y])
    proba_fn = tf.function(proba, input_signature=[spec_x])
    return _Built(model, variables, grad_fn, proba_fn, assigned=[None] * len(variables))


def _get_built(arch: _Arch, seed: int) -> _Built:
    with _CACHE_LOCK:
        built = _CACHE.get(arch.key)
        if built is None:
            built = _CACHE[arch.key] = _build(arch, seed)
        return built


def clear_cache() -> None:
    """Forget every built model in this process (tests; a cold start)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# ------------------------------------------------------------------------------------------
# The Model


class KerasModel:
    """A Keras classifier behind the Model protocol; only its trainable weights travel."""

    def __init__(
        self,
        name: str,
        arch: _Arch,
        num_classes: int,
        seed: int,
    ) -> None:
        self.name = name
        self.input_shape: tuple[int, ...] = arch.input_shape
        self.num_classes = num_classes
        self.seed = seed
        self._arch = arch
        # Shapes of the trainable weights, known without building the (maybe slow) model.
        self._shapes: tuple[tuple[int, ...], ...] | None = None

    def __repr__(self) -> str:
        return (
            f"KerasModel(name={self.name!r}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, seed={self.seed})"
        )

    @property
    def keras_model(self) -> Any:
        """The cached tf.keras.Model (built on first use): logits out, frozen parts included."""
        return self._built().model

    def _built(self) -> _Built:
        return _get_built(self._arch, self.seed)

    def weight_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the trainable weights, in the order init_weights returns them."""
        if self._shapes is None:
            self._shapes = tuple(tuple(v.shape) for v in self._built().variables)
        return self._shapes

    def init_weights(self, seed: int) -> list[Array]:
        """Trainable weights only, float32, the same for the same seed."""
        seed = _positive_int("seed", seed, lo=0)
        keras.utils.set_random_seed(seed)
        # A fresh trainable part (the head, or the whole CNN) is cheap; the base is not built.
        part = self._arch.build_trainable(seed)
        weights = [np.asarray(w.numpy(), dtype=np.float32) for w in part.trainable_weights]
        shapes = tuple(w.shape for w in weights)
        if self._shapes is not None and shapes != self._shapes:
            raise AssertionError(f"{self!r}: trainable part {shapes} != model {self._shapes}")
        self._shapes = shapes
        return weights

    # -- checks -----------------------------------------------------------------------------

    def _inputs(self, x: Array) -> Array:
        x = np.asarray(x)
        if x.shape[1:] != self.input_shape:
            want = ", ".join(map(str, self.input_shape))
            raise ValueError(f"x: must have shape (batch, {want}), got {x.shape}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _labels(self, y: Array, batch: int) -> Array:
        y = np.asarray(y)
        if y.shape != (batch,):
            raise ValueError(f"y: must have shape ({batch},) to match x, got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"y: must hold integer class labels, got dtype {y.dtype}")
        if batch and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(
                f"y: labels must be in 0..{self.num_classes - 1}, "
                f"got {int(y.min())}..{int(y.max())}"
            )
        return y.astype(np.int64, copy=False)

    def _assign(self, built: _Built, weights: Sequence[Array]) -> None:
        """Load `weights` into the variables, skipping those that already hold them."""
        if len(weights) != len(built.variables):
            raise ValueError(
                f"weights: {self!r} has {len(built.variables)} trainable arrays, got {len(weights)}"
            )
        for i, (var, w) in enumerate(zip(built.variables, weights, strict=True)):
            w = np.asarray(w)
            if w.shape != tuple(var.shape):
                raise ValueError(f"weights[{i}]: must have shape {tuple(var.shape)}, got {w.shape}")
            if not np.issubdtype(w.dtype, np.floating):
                raise ValueError(f"weights[{i}]: must be a float array, got dtype {w.dtype}")
            w32 = w.astype(np.float32, copy=False)
            last = built.assigned[i]
            # Compare contents, not identity: a caller may update an array in place between
            # calls. A compare reads the array once; an assign copies it into TensorFlow too.
            if last is not None and np.array_equal(last, w32):
                continue
            var.assign(w32)
            built.assigned[i] = np.array(w32, copy=True)

    # -- passes -----------------------------------------------------------------------------

    def loss_and_grad_sum(
        self, weights: Sequence[Array], x: Array, y: Array
    ) -> tuple[float, list[Array]]:
        """Sum of per-sample cross-entropy losses and of their gradients (not the mean)."""
        xb = self._inputs(x)
        yb = self._labels(y, len(xb))
        built = self._built()
        with built.lock:
            self._assign(built, weights)
            if len(xb) == 0:
                return 0.0, [np.zeros(tuple(v.shape), dtype=np.float32) for v in built.variables]
            loss, grads = built.grad_fn(tf.constant(xb), tf.constant(yb))
            return float(loss), [np.asarray(g.numpy(), dtype=np.float32) for g in grads]

    def predict_proba(self, weights: Sequence[Array], x: Array) -> Array:
        """Class probabilities, shape (batch, num_classes), float32."""
        xb = self._inputs(x)
        built = self._built()
        with built.lock:
            self._assign(built, weights)
            proba: Array = built.proba_fn(tf.constant(xb)).numpy()
        return proba

    def evaluate(
        self, weights: Sequence[Array], x: Array, y: Array, batch_size: int = 1024
    ) -> tuple[float, float]:
        """(mean cross-entropy loss, accuracy) over x, y, in chunks of batch_size samples."""
        batch_size = _positive_int("batch_size", batch_size)
        x = np.asarray(x)
        n = len(x)
        if n == 0:
            raise ValueError("x: evaluate needs at least one sample, got 0")
        y_all = self._labels(y, n)
        loss_sum = 0.0
        correct = 0
        for start in range(0, n, batch_size):
            # Chunks keep memory flat (x may be a memory map of the whole test set).
            xb, yb = x[start : start + batch_size], y_all[start : start + batch_size]
            proba = self.predict_proba(weights, xb).astype(np.float64)
            picked = np.maximum(proba[np.arange(len(yb)), yb], np.finfo(np.float64).tiny)
            loss_sum += float(-np.sum(np.log(picked)))
            correct += int(np.count_nonzero(proba.argmax(axis=1) == yb))
        return loss_sum / n, correct / n


# ------------------------------------------------------------------------------------------
# Factories (the registry calls these)


def cnn(
    input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10, seed: int = 0
) -> KerasModel:
    """Two Conv2D+MaxPool blocks and a dense head, for small images such as (32, 32, 3)."""
    shape = _image_shape(input_shape)
    num_classes = _positive_int("num_classes", num_classes, lo=2)
    seed = _positive_int("seed", seed, lo=0)
    # Nothing is frozen, so the seed does not change the graph: one cache entry per shape.
    arch = _Arch(
        key=("cnn", shape, num_classes),
        input_shape=shape,
        build_base=None,
        build_trainable=_cnn_trainable(shape, num_classes),
    )
    return KerasModel("cnn", arch, num_classes, seed)


def vgg19(
    num_classes: int = 10,
    input_size: int = THESIS_INPUT_SIZE,
    weights_path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    environ: Mapping[str, str] | None = None,
) -> KerasModel:
    """VGG19 base (ImageNet weights if found locally, frozen) plus a new trainable softmax head.

    Input is (input_size, input_size, 3) in [0, 1]; 224 as in the thesis, 32 or 64 for tests.
    Without `weights_path` the ImageNet file is looked up in the Keras cache; when it is absent
    the base is random from `seed` (warned). A `weights_path` that does not exist is an error.
    """
    num_classes = _positive_int("num_classes", num_classes, lo=2)
    input_size = _positive_int("input_size", input_size, lo=VGG19_MIN_SIZE)
    seed = _positive_int("seed", seed, lo=0)
    found = find_vgg19_weights(weights_path, environ)
    if found is None:
        where = " or ".join(str(d) for d in keras_cache_dirs(environ))
        warnings.warn(
            f"vgg19: ImageNet weights file {VGG19_NOTOP_FILE} not found in {where} "
            f"(set KERAS_HOME or pass weights_path=); no download is attempted, the frozen "
            f"base gets random initialisation from seed {seed}",
            UserWarning,
            stacklevel=2,
        )
    shape = (input_size, input_size, 3)
    # A random base depends on the seed; a loaded one only on its file (and its contents).
    base_id: tuple[Any, ...] = (
        ("random", seed)
        if found is None
        else ("file", str(found.resolve()), found.stat().st_mtime_ns)
    )
    arch = _Arch(
        key=("vgg19", input_size, num_classes, base_id),
        input_shape=shape,
        build_base=_vgg19_base(input_size, found),
        build_trainable=_dense_head(VGG19_FEATURES, num_classes),
    )
    return KerasModel("vgg19", arch, num_classes, seed)


__all__ = [
    "THESIS_INPUT_SIZE",
    "VGG19_NOTOP_FILE",
    "KerasModel",
    "clear_cache",
    "cnn",
    "find_vgg19_weights",
    "keras_cache_dirs",
    "vgg19",
]
