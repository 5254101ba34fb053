"""What one worker computes in a round, and the SGD update: pure functions on arrays, no I/O.

Two algorithms (design §2):

* ``gradient_averaging``: every worker starts the round at the same weights ``w`` and returns
  ``g_i = sum of per-sample gradients`` over all the samples it saw, with their count ``n_i``.
  Several mini-batches at the same weights are simply one larger batch. The combine takes ONE step
  with ``g = sum_i g_i / sum_i n_i`` (see :func:`apply_gradient_step`). With one worker this is
  plain mini-batch gradient descent.
* ``model_averaging`` (local SGD): every worker starts from ``w``, takes one SGD step per
  mini-batch (on that batch's mean gradient) and returns its final weights ``w_i`` and ``n_i``; the
  combine averages ``sum_i n_i w_i / sum_i n_i``. With one worker this is sequential SGD.

Weighting by sample count keeps partial work exact: a worker stopped by its deadline returns
fewer samples and counts for exactly that many. A worker with ``n_i = 0`` contributes nothing.

Precision: weights are stored as float32; gradient sums across mini-batches (here) and across
workers (aggregate.py) are accumulated in float64, and the update is computed in float64 and
rounded to the weights' dtype once at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from simulator.models import Array, Model

ALGORITHMS = ("gradient_averaging", "model_averaging")
Batch = tuple[Array, Array]


class SGDConfigError(ValueError):
    """An SGD setting out of range; `field` names it and the message says what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field

    def __reduce__(self) -> tuple[object, ...]:
        return (SGDConfigError, (self.field, str(self).split(": ", 1)[-1]))


def _real(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SGDConfigError(field, f"must be a real number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise SGDConfigError(field, f"must be finite, got {value!r}")
    return out


@dataclass(frozen=True)
class SGDConfig:
    """SGD hyper-parameters, PyTorch conventions (no dampening, no Nesterov).

    With gradient ``g``: ``d = g + weight_decay * w``; with momentum ``v <- momentum * v + d`` and
    ``w <- w - lr * v`` (``v`` starts at zero, so the first step is ``w - lr * d``); without
    momentum ``w <- w - lr * d``. Note the PyTorch form folds ``lr`` outside the velocity, so
    changing ``lr`` mid-run does not rescale the accumulated velocity.
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        lr = _real("lr", self.lr)
        if lr < 0:
            raise SGDConfigError("lr", f"must be >= 0, got {self.lr!r}")
        momentum = _real("momentum", self.momentum)
        if not 0 <= momentum < 1:
            raise SGDConfigError("momentum", f"must be in [0, 1), got {self.momentum!r}")
        weight_decay = _real("weight_decay", self.weight_decay)
        if weight_decay < 0:
            raise SGDConfigError("weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "momentum", momentum)
        object.__setattr__(self, "weight_decay", weight_decay)


@dataclass
class Contribution:
    """One worker's result for a round.

    ``arrays`` are gradient sums (gradient averaging) or final weights (model averaging);
    ``samples`` is how many samples produced them; ``loss_sum`` is the sum of their per-sample
    losses (for model averaging, each taken at the weights of the step that used the sample).
    """

    worker: int
    samples: int
    arrays: list[Array]
    loss_sum: float

    def __post_init__(self) -> None:
        for field in ("worker", "samples"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{field}: must be an int >= 0, got {value!r}")
            setattr(self, field, int(value))
        self.loss_sum = float(self.loss_sum)
        if self.samples == 0 and self.loss_sum != 0:
            # A worker with no samples has no loss either; anything else is a corrupt result.
            raise ValueError(f"loss_sum: must be 0 when samples is 0, got {self.loss_sum!r}")


def _check_like(what: str, arrays: Sequence[Array], weights: Sequence[Array]) -> None:
    if len(arrays) != len(weights):
        raise ValueError(
            f"{what}: expected {len(weights)} arrays like the weights, got {len(arrays)}"
        )
    for i, (a, w) in enumerate(zip(arrays, weights, strict=True)):
        if np.shape(a) != np.shape(w):
            raise ValueError(f"{what}[{i}]: must have shape {np.shape(w)}, got {np.shape(a)}")


def apply_gradient_step(
    weights: Sequence[Array],
    grad_mean: Sequence[Array],
    velocity: Sequence[Array] | None,
    sgd: SGDConfig,
) -> tuple[list[Array], list[Array] | None]:
    """One SGD step (see SGDConfig); returns new weights and velocity, never mutates its inputs.

    The step is computed in float64 and rounded once to each weight's dtype; the velocity is kept
    in the weights' dtype too (it is stored beside them). ``velocity=None`` means zero. Without
    momentum the returned velocity is None. With ``lr == 0`` the weights come back bit-identical.
    """
    _check_like("grad_mean", grad_mean, weights)
    if velocity is not None:
        _check_like("velocity", velocity, weights)
    new_weights: list[Array] = []
    new_velocity: list[Array] | None = [] if sgd.momentum > 0 else None
    for i, (w, g) in enumerate(zip(weights, grad_mean, strict=True)):
        w = np.asarray(w)
        w64 = w.astype(np.float64)
        d = np.asarray(g, dtype=np.float64)
        if sgd.weight_decay:
            d = d + sgd.weight_decay * w64
        if new_velocity is not None:
            if velocity is not None:
                d = sgd.momentum * np.asarray(velocity[i], dtype=np.float64) + d
            new_velocity.append(d.astype(w.dtype))
        new_weights.append((w64 - sgd.lr * d).astype(w.dtype))
    return new_weights, new_velocity


def _next_batch(batches: Iterable[Batch], should_stop: Callable[[], bool]) -> Iterable[Batch]:
    # Ask before pulling each batch, so a stopped worker never loads a batch it will not use.
    it = iter(batches)
    while not should_stop():
        try:
            yield next(it)
        except StopIteration:
            return


def gradient_contribution(
    model: Model,
    weights: Sequence[Array],
    batches: Iterable[Batch],
    worker: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> Contribution:
    """Gradient averaging worker: sum of per-sample gradients at `weights` over the batches.

    ``should_stop`` is asked before each batch; when it says True the worker returns what it has
    (possibly zero samples, then all-zero sums). Sums are accumulated in float64.
    """
    sums = [np.zeros(np.shape(w), dtype=np.float64) for w in weights]
    samples = 0
    loss_sum = 0.0
    for x, y in _next_batch(batches, should_stop):
        loss, grads = model.loss_and_grad_sum(weights, x, y)
        for acc, g in zip(sums, grads, strict=True):
            acc += g
        samples += len(y)
        loss_sum += loss
    return Contribution(worker=worker, samples=samples, arrays=sums, loss_sum=loss_sum)


def local_sgd_contribution(
    model: Model,
    weights: Sequence[Array],
    batches: Iterable[Batch],
    sgd: SGDConfig,
    worker: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> Contribution:
    """Model averaging worker: one SGD step per non-empty batch from `weights`; final weights.

    The momentum velocity is local to the round: it starts at zero and is not returned, because
    the combine averages weights only. ``should_stop`` is asked before each batch.
    """
    current = [np.array(w, copy=True) for w in weights]
    velocity: list[Array] | None = None
    samples = 0
    loss_sum = 0.0
    for x, y in _next_batch(batches, should_stop):
        n = len(y)
        if n == 0:
            continue  # the mean gradient of no samples is undefined; an empty batch is no step
        loss, grads = model.loss_and_grad_sum(current, x, y)
        mean = [np.asarray(g, dtype=np.float64) / n for g in grads]
        current, velocity = apply_gradient_step(current, mean, velocity, sgd)
        samples += n
        loss_sum += loss
    return Contribution(worker=worker, samples=samples, arrays=current, loss_sum=loss_sum)


__all__ = [
    "ALGORITHMS",
    "Batch",
    "Contribution",
    "SGDConfig",
    "SGDConfigError",
    "apply_gradient_step",
    "gradient_contribution",
    "local_sgd_contribution",
]
