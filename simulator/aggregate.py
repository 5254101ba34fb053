"""Combine workers' contributions into the next weights: pure functions, no I/O.

Determinism: float addition is not associative, so the order of the additions is fixed by the
data, never by arrival: contributions are sorted by worker id and added in that order, in
float64 (float32 inputs convert to float64 exactly; only the additions round). The same set of
contributions therefore gives bit-identical results however they arrived. Two contributions with
the same worker id are an error (at-least-once delivery must be deduplicated before this point).
Contributions with ``samples == 0`` are validated and then skipped: they add nothing, not even a
signed zero. A round in which every contribution has zero samples cannot be combined.

Sharded aggregation (:func:`partial_sums`): aggregator ``s`` of ``S`` sums the workers with
``worker % S == s`` in worker order and publishes the result as a Contribution of "virtual
worker" ``s`` -- a gradient sum for gradient averaging, the sample-weighted mean of its workers'
weights for model averaging -- so the final combine is the ordinary combine over the partials,
added in shard order. Sharded results are themselves deterministic, but they add the same terms
in a different association than the single combiner, so the two may differ in the last bits:

* In float64, each scheme is within ``gamma(m) * sum_i |x_i|`` of the exact sum, elementwise,
  where ``gamma(m) = m*u / (1 - m*u)``, ``u = 2**-53`` and ``m`` bounds the roundings on any
  term's path: ``N - 1`` for gradient sums (``x_i = g_i``), ``N + 1`` for model averaging
  (``x_i = n_i * w_i``; the partial's divide by ``n_s`` and the final multiply by ``n_s`` add
  two). So they differ by at most ``2 * gamma(m) * sum_i |x_i|`` before the division by ``n``.
* The weights are then rounded to float32, whose spacing is ``2**29`` times coarser than ``u``.
  Unless the sum cancels catastrophically (the bound above exceeds half a float32 ulp of the
  result), the float32 weights are identical or differ by one ulp, the latter only where the
  exact value lies within that tiny distance of a float32 rounding boundary.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from simulator.algorithms import ALGORITHMS, Contribution, SGDConfig, apply_gradient_step
from simulator.models import Array


def _ordered(contribs: Iterable[Contribution]) -> list[Contribution]:
    """Contributions sorted by worker id, checked for duplicates and matching shapes."""
    ordered = sorted(contribs, key=lambda c: c.worker)
    if not ordered:
        raise ValueError("contribs: need at least one contribution, got none")
    first = ordered[0]
    shapes = [np.shape(a) for a in first.arrays]
    for prev, c in itertools.pairwise(ordered):
        if c.worker == prev.worker:
            raise ValueError(f"contribs: duplicate worker id {c.worker}; each worker counts once")
    for c in ordered[1:]:
        if [np.shape(a) for a in c.arrays] != shapes:
            raise ValueError(
                f"contribs: worker {c.worker} has arrays of shapes "
                f"{[np.shape(a) for a in c.arrays]}, worker {first.worker} has {shapes}"
            )
    return ordered


def _sum_ordered(
    ordered: Sequence[Contribution], weight_by_samples: bool
) -> tuple[list[Array], int, float]:
    sums: list[Array] | None = None
    samples = 0
    loss_sum = 0.0
    for c in ordered:
        if c.samples == 0:
            continue
        # n_i * w_i is exact in float64 for float32 w_i and n_i < 2**29: only additions round.
        terms = [
            np.multiply(a, float(c.samples), dtype=np.float64)
            if weight_by_samples
            else np.asarray(a, dtype=np.float64)
            for a in c.arrays
        ]
        if sums is None:
            # Start from the first term itself (a copy), not from +0.0, so -0.0 survives.
            sums = [np.array(t, dtype=np.float64, copy=True) for t in terms]
        else:
            for acc, t in zip(sums, terms, strict=True):
                acc += t
        samples += c.samples
        loss_sum += c.loss_sum
    if sums is None:
        sums = [np.zeros(np.shape(a), dtype=np.float64) for a in ordered[0].arrays]
    return sums, samples, loss_sum


def sum_contributions(
    contribs: Iterable[Contribution], *, weight_by_samples: bool = False
) -> tuple[list[Array], int, float]:
    """(float64 sum of arrays, total samples, total loss), added in worker-id order.

    With ``weight_by_samples`` each contribution's arrays are multiplied by its sample count
    first (model averaging). Zero-sample contributions are skipped; if all are, the sums are zeros.
    """
    return _sum_ordered(_ordered(contribs), weight_by_samples)


def _require_samples(samples: int, count: int) -> None:
    if samples == 0:
        raise ValueError(
            f"contribs: all {count} contributions report samples=0; a round needs at least one "
            "sample to combine"
        )


def combine_gradient_averaging(
    weights: Sequence[Array],
    velocity: Sequence[Array] | None,
    contribs: Iterable[Contribution],
    sgd: SGDConfig,
) -> tuple[list[Array], list[Array] | None, float]:
    """One SGD step on sum(g_i) / sum(n_i): (new weights, new velocity, mean train loss at w)."""
    ordered = _ordered(contribs)
    sums, samples, loss_sum = _sum_ordered(ordered, weight_by_samples=False)
    _require_samples(samples, len(ordered))
    grad_mean = [s / samples for s in sums]
    new_weights, new_velocity = apply_gradient_step(weights, grad_mean, velocity, sgd)
    return new_weights, new_velocity, loss_sum / samples


def combine_model_averaging(
    contribs: Iterable[Contribution], *, dtype: npt.DTypeLike = np.float32
) -> tuple[list[Array], float]:
    """Sample-weighted mean of the workers' weights, in `dtype`: (new weights, mean train loss)."""
    ordered = _ordered(contribs)
    sums, samples, loss_sum = _sum_ordered(ordered, weight_by_samples=True)
    _require_samples(samples, len(ordered))
    return [(s / samples).astype(dtype) for s in sums], loss_sum / samples


def shard_of(worker: int, shards: int) -> int:
    """The aggregator (0..shards-1) that sums `worker`'s contribution."""
    return worker % shards


def partial_sums(
    contribs: Iterable[Contribution], shards: int, algorithm: str = "gradient_averaging"
) -> list[Contribution]:
    """One partial Contribution per non-empty shard, in shard order, with worker = shard id.

    Feed the partials (from any aggregators, in any order) to the same combine function as
    worker contributions. An aggregator that holds only its own workers' contributions can call
    this with them and take the single result.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards: must be an int >= 1, got {shards!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: must be one of {ALGORITHMS}, got {algorithm!r}")
    ordered = _ordered(contribs)
    groups: dict[int, list[Contribution]] = {}
    for c in ordered:
        groups.setdefault(shard_of(c.worker, shards), []).append(c)
    partials = []
    for shard in sorted(groups):
        model_avg = algorithm == "model_averaging"
        sums, samples, loss_sum = _sum_ordered(groups[shard], weight_by_samples=model_avg)
        arrays: list[Array] = sums
        if model_avg and samples:
            # A weighted mean with weight n_s is what a single worker of n_s samples returns.
            arrays = [s / samples for s in sums]
        partials.append(Contribution(shard, samples, arrays, loss_sum))
    return partials


__all__ = [
    "combine_gradient_averaging",
    "combine_model_averaging",
    "partial_sums",
    "shard_of",
    "sum_contributions",
]
