"""NumPy reference models with analytic gradients: softmax regression and a small MLP.

Both are dense classifiers ``input -> [hidden -> activation]* -> logits -> softmax`` trained with
cross-entropy. Weights are ``[W1, b1, ..., W_out, b_out]`` with ``W`` of shape (fan_in, fan_out).
Arithmetic runs in the dtype of the weights: float32 in training, float64 when a test checks the
gradients against finite differences. Loss sums are accumulated in float64 whatever that dtype.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from simulator.models import Array

Activation = Literal["relu", "tanh"]
ACTIVATIONS: tuple[Activation, ...] = ("relu", "tanh")
WEIGHT_DTYPE = np.float32
_COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _positive_shape(field: str, value: object) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not value:
        raise ValueError(f"{field}: must be a non-empty tuple of positive ints, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{field}: must be a non-empty tuple of positive ints, got {value!r}")
        out.append(int(v))
    return tuple(out)


def _positive_int(field: str, value: object, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{field}: must be an int >= {lo}, got {value!r}")
    return int(value)


class _DenseClassifier:
    """Shared forward/backward pass of a stack of dense layers under a softmax."""

    name: str

    def __init__(
        self,
        input_shape: Sequence[int] | int,
        num_classes: int,
        hidden: Sequence[int],
        activation: Activation,
    ) -> None:
        self.input_shape = _positive_shape("input_shape", input_shape)
        self.num_classes = _positive_int("num_classes", num_classes, lo=2)
        self.hidden: tuple[int, ...] = (
            () if len(hidden) == 0 else _positive_shape("hidden", tuple(hidden))
        )
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation: Activation = activation
        self.input_size = math.prod(self.input_shape)
        sizes = (self.input_size, *self.hidden, self.num_classes)
        self.weight_shapes: tuple[tuple[int, ...], ...] = tuple(
            shape
            for fan_in, fan_out in itertools.pairwise(sizes)
            for shape in ((fan_in, fan_out), (fan_out,))
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, hidden={self.hidden}, activation={self.activation!r})"
        )

    def init_weights(self, seed: int) -> list[Array]:
        """Trainable weights, float32, the same for the same seed (biases start at zero)."""
        rng = np.random.default_rng(seed)
        weights: list[Array] = []
        n_layers = len(self.weight_shapes) // 2
        for layer in range(n_layers):
            fan_in, fan_out = self.weight_shapes[2 * layer]
            hidden_layer = layer < n_layers - 1
            # He for ReLU layers keeps activations' variance steady; Glorot for tanh and the
            # softmax layer.
            if hidden_layer and self.activation == "relu":
                std = math.sqrt(2.0 / fan_in)
            else:
                std = math.sqrt(2.0 / (fan_in + fan_out))
            weights.append((rng.standard_normal((fan_in, fan_out)) * std).astype(WEIGHT_DTYPE))
            weights.append(np.zeros(fan_out, dtype=WEIGHT_DTYPE))
        return weights

    # -- checks -----------------------------------------------------------------------------

    def _dtype(self, weights: Sequence[Array]) -> np.dtype[Any]:
        if len(weights) != len(self.weight_shapes):
            raise ValueError(
                f"weights: {self!r} has {len(self.weight_shapes)} arrays, got {len(weights)}"
            )
        dtype = np.asarray(weights[0]).dtype
        for i, (w, shape) in enumerate(zip(weights, self.weight_shapes, strict=True)):
            if w.shape != shape:
                raise ValueError(f"weights[{i}]: must have shape {shape}, got {w.shape}")
            if w.dtype != dtype or dtype not in _COMPUTE_DTYPES:
                raise ValueError(
                    f"weights[{i}]: all weights must share one dtype, float32 or float64; "
                    f"got {w.dtype} (weights[0] is {dtype})"
                )
        return dtype

    def _inputs(self, x: Array, dtype: np.dtype[Any]) -> Array:
        x = np.asarray(x)
        if x.shape[1:] != self.input_shape:
            want = ", ".join(map(str, self.input_shape))
            raise ValueError(f"x: must have shape (batch, {want}), got {x.shape}")
        # A reshape of a contiguous array is a view; astype copies only if the dtype differs.
        return x.reshape(x.shape[0], self.input_size).astype(dtype, copy=False)

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
        return y

    # -- passes -----------------------------------------------------------------------------

    def _forward(self, weights: Sequence[Array], h: Array) -> tuple[Array, list[Array]]:
        """Logits and the input of every dense layer (kept for the backward pass)."""
        layer_inputs = [h]
        last = len(weights) - 2
        for i in range(0, last, 2):
            z = h @ weights[i]
            z += weights[i + 1]
            h = np.maximum(z, 0, out=z) if self.activation == "relu" else np.tanh(z, out=z)
            layer_inputs.append(h)
        logits = h @ weights[last]
        logits += weights[last + 1]
        return logits, layer_inputs

    @staticmethod
    def _log_sum_exp(logits: Array) -> Array:
        # Shift by the row maximum so exp never overflows.
        m = logits.max(axis=1)
        shifted = np.exp(logits - m[:, None])
        result: Array = np.log(shifted.sum(axis=1)) + m
        return result

    def loss_and_grad_sum(
        self, weights: Sequence[Array], x: Array, y: Array
    ) -> tuple[float, list[Array]]:
        """Sum of per-sample cross-entropy losses and of their gradients (not the mean)."""
        dtype = self._dtype(weights)
        h = self._inputs(x, dtype)
        batch = h.shape[0]
        y = self._labels(y, batch)
        logits, layer_inputs = self._forward(weights, h)
        lse = self._log_sum_exp(logits)
        rows = np.arange(batch)
        loss_sum = float(np.sum(lse - logits[rows, y], dtype=np.float64))
        # d(loss_i)/d(logits_i) = softmax_i - onehot(y_i).
        delta = np.exp(logits - lse[:, None])
        delta[rows, y] -= 1
        grads: list[Array] = [np.empty(0)] * len(weights)
        for i in range(len(weights) - 2, -1, -2):
            inp = layer_inputs[i // 2]
            grads[i] = inp.T @ delta
            grads[i + 1] = delta.sum(axis=0)
            if i:
                delta = delta @ weights[i].T
                # inp is the activation output: relu'(z) = [z > 0] = [h > 0]; tanh' = 1 - h^2.
                if self.activation == "relu":
                    delta *= inp > 0
                else:
                    delta *= 1 - inp * inp
        return loss_sum, grads

    def predict_proba(self, weights: Sequence[Array], x: Array) -> Array:
        """Class probabilities, shape (batch, num_classes), in the weights' dtype."""
        dtype = self._dtype(weights)
        logits, _ = self._forward(weights, self._inputs(x, dtype))
        proba: Array = np.exp(logits - self._log_sum_exp(logits)[:, None])
        return proba

    def evaluate(
        self, weights: Sequence[Array], x: Array, y: Array, batch_size: int = 1024
    ) -> tuple[float, float]:
        """(mean cross-entropy loss, accuracy) over x, y, in chunks of batch_size samples."""
        dtype = self._dtype(weights)
        batch_size = _positive_int("batch_size", batch_size)
        h_all = self._inputs(x, dtype)
        n = h_all.shape[0]
        if n == 0:
            raise ValueError("x: evaluate needs at least one sample, got 0")
        y_all = self._labels(y, n)
        loss_sum = 0.0
        correct = 0
        for start in range(0, n, batch_size):
            h, yb = h_all[start : start + batch_size], y_all[start : start + batch_size]
            logits, _ = self._forward(weights, h)
            lse = self._log_sum_exp(logits)
            loss_sum += float(np.sum(lse - logits[np.arange(len(yb)), yb], dtype=np.float64))
            correct += int(np.count_nonzero(logits.argmax(axis=1) == yb))
        return loss_sum / n, correct / n


class SoftmaxRegression(_DenseClassifier):
    """Multinomial logistic regression on the flattened input: weights [W (d, k), b (k,)]."""

    name = "softmax"

    def __init__(self, input_shape: Sequence[int] | int, num_classes: int) -> None:
        super().__init__(input_shape, num_classes, hidden=(), activation="relu")


class MLP(_DenseClassifier):
    """Dense network on the flattened input with `hidden` layer widths and one activation."""

    name = "mlp"

    def __init__(
        self,
        input_shape: Sequence[int] | int,
        num_classes: int,
        hidden: Sequence[int] = (64,),
        activation: Activation = "relu",
    ) -> None:
        if isinstance(hidden, int) and not isinstance(hidden, bool):
            hidden = (hidden,)
        if not isinstance(hidden, (tuple, list)) or len(hidden) == 0:
            raise ValueError(
                f"hidden: must be a non-empty tuple of positive ints, got {hidden!r} "
                "(use SoftmaxRegression for no hidden layer)"
            )
        super().__init__(input_shape, num_classes, hidden=hidden, activation=activation)


__all__ = ["ACTIVATIONS", "MLP", "WEIGHT_DTYPE", "SoftmaxRegression"]
