"""The model contract every training role relies on, and the name-to-model registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy.typing as npt

Array = npt.NDArray[Any]
"""Any NumPy array; weights are float32 in training and float64 on the gradient-check path."""


@runtime_checkable
class Model(Protocol):
    """A classifier with explicit weights: the roles pass weights in and get arrays back."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int

    def init_weights(self, seed: int) -> list[Array]:
        """Trainable weights only, float32, the same for the same seed."""
        ...

    def loss_and_grad_sum(
        self, weights: Sequence[Array], x: Array, y: Array
    ) -> tuple[float, list[Array]]:
        """Sum over the batch of per-sample cross-entropy losses and of their gradients."""
        ...

    def predict_proba(self, weights: Sequence[Array], x: Array) -> Array:
        """Class probabilities, shape (batch, num_classes)."""
        ...

    def evaluate(
        self, weights: Sequence[Array], x: Array, y: Array, batch_size: int = 1024
    ) -> tuple[float, float]:
        """(mean cross-entropy loss, accuracy) over the whole of x, y."""
        ...


def _softmax(**kwargs: Any) -> Model:
    # Imported on use so that a registry of heavy backends (TensorFlow) costs nothing until asked.
    from simulator.models.numpy_models import SoftmaxRegression

    return SoftmaxRegression(**kwargs)


def _mlp(**kwargs: Any) -> Model:
    from simulator.models.numpy_models import MLP

    return MLP(**kwargs)


def _cnn(**kwargs: Any) -> Model:
    # TensorFlow is imported here, on the first Keras model, never by the registry itself.
    from simulator.models.keras_models import cnn

    return cnn(**kwargs)


def _vgg19(**kwargs: Any) -> Model:
    from simulator.models.keras_models import vgg19

    return vgg19(**kwargs)


_REGISTRY: dict[str, Callable[..., Model]] = {
    "softmax": _softmax,
    "mlp": _mlp,
    "cnn": _cnn,
    "vgg19": _vgg19,
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)
"""Names get_model accepts."""


def get_model(name: str, **kwargs: Any) -> Model:
    """Build the model registered under `name`; kwargs go to its constructor."""
    try:
        factory = _REGISTRY[name]
    except (KeyError, TypeError):
        allowed = ", ".join(repr(n) for n in MODEL_NAMES)
        raise ValueError(f"model: must be one of {allowed}, got {name!r}") from None
    return factory(**kwargs)


__all__ = ["MODEL_NAMES", "Array", "Model", "get_model"]
