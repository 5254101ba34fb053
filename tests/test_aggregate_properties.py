"""Laws of the training math: worker contributions, the SGD step and the combine functions.

Oracles are written here independently: a plain mini-batch gradient-descent loop and a
sequential SGD loop in float64 with PyTorch's update rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from simulator.aggregate import (
    combine_gradient_averaging,
    combine_model_averaging,
    partial_sums,
    shard_of,
    sum_contributions,
)
from simulator.algorithms import (
    ALGORITHMS,
    Contribution,
    SGDConfig,
    SGDConfigError,
    apply_gradient_step,
    gradient_contribution,
    local_sgd_contribution,
)
from simulator.models import Model, get_model

EPS32 = float(np.finfo(np.float32).eps)
U64 = 2.0**-53  # unit roundoff of float64
# Absolute rounding error floor of float32: below 2**-126 its spacing stops shrinking.
TINY32 = float(np.finfo(np.float32).smallest_subnormal)
SHAPES = [(3, 2), (2,)]
FEATURES, CLASSES = 5, 3

finite32 = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False)
data32 = st.floats(-2, 2, width=32)
models = st.sampled_from(
    [
        ("softmax", {}),
        ("mlp", {"hidden": (4,), "activation": "tanh"}),
        ("mlp", {"hidden": (4,), "activation": "relu"}),
    ]
)
# The oracle loops compare a float32 run with a float64 one, so they use smooth models only: a
# ReLU pre-activation within float32 rounding of 0 would legitimately flip its derivative.
smooth_models = st.sampled_from([("softmax", {}), ("mlp", {"hidden": (4,), "activation": "tanh"})])
sgd_configs = st.builds(
    SGDConfig,
    lr=st.floats(0, 0.5),
    momentum=st.one_of(st.just(0.0), st.floats(0, 0.9)),
    weight_decay=st.one_of(st.just(0.0), st.floats(0, 0.1)),
)


def _model(spec: tuple[str, dict[str, Any]]) -> Model:
    name, kwargs = spec
    return get_model(name, input_shape=(FEATURES,), num_classes=CLASSES, **kwargs)


@st.composite
def contributions(
    draw: st.DrawFn, min_workers: int = 1, max_workers: int = 8
) -> list[Contribution]:
    """Contributions of distinct workers with float32 arrays and at least one sample in total."""
    ids = draw(
        st.lists(st.integers(0, 40), min_size=min_workers, max_size=max_workers, unique=True)
    )
    counts = draw(st.lists(st.integers(0, 50), min_size=len(ids), max_size=len(ids)))
    if not any(counts):
        counts[0] = 1
    return [
        Contribution(
            worker=w,
            samples=n,
            arrays=[draw(hnp.arrays(np.float32, shape, elements=finite32)) for shape in SHAPES],
            loss_sum=draw(st.floats(0, 1e3)) if n else 0.0,
        )
        for w, n in zip(ids, counts, strict=True)
    ]


@st.composite
def labelled(
    draw: st.DrawFn, min_size: int = 1, max_size: int = 24
) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(min_size, max_size))
    x = draw(hnp.arrays(np.float32, (n, FEATURES), elements=data32))
    y = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, CLASSES - 1)))
    return x, y


def _gamma(m: int) -> float:
    """Higham's gamma_m = m*u / (1 - m*u): the relative error bound of m float64 roundings."""
    return m * U64 / (1 - m * U64)


def _bits(arrays: Sequence[np.ndarray]) -> list[bytes]:
    return [np.asarray(a).tobytes() for a in arrays]


def _start_weights() -> list[np.ndarray]:
    return [np.linspace(-1, 1, int(np.prod(s)), dtype=np.float32).reshape(s) for s in SHAPES]


# -- determinism ------------------------------------------------------------------------------


@settings(max_examples=150)
@given(contribs=contributions(), data=st.data(), sgd=sgd_configs)
def test_aggregation_is_bit_identical_for_every_arrival_order(contribs, data, sgd):
    arrived = data.draw(st.permutations(contribs), label="arrival order")
    sums_a, n_a, loss_a = sum_contributions(contribs)
    sums_b, n_b, loss_b = sum_contributions(arrived)
    assert _bits(sums_a) == _bits(sums_b) and (n_a, loss_a) == (n_b, loss_b)
    assert all(s.dtype == np.float64 for s in sums_a)

    weights, velocity = _start_weights(), [np.full(s, 0.5, np.float32) for s in SHAPES]
    ga_a = combine_gradient_averaging(weights, velocity, contribs, sgd)
    ga_b = combine_gradient_averaging(weights, velocity, arrived, sgd)
    assert _bits(ga_a[0]) == _bits(ga_b[0]) and ga_a[2] == ga_b[2]
    if ga_a[1] is None:
        assert ga_b[1] is None
    else:
        assert ga_b[1] is not None and _bits(ga_a[1]) == _bits(ga_b[1])

    ma_a, ma_b = combine_model_averaging(contribs), combine_model_averaging(arrived)
    assert _bits(ma_a[0]) == _bits(ma_b[0]) and ma_a[1] == ma_b[1]

    shards = data.draw(st.integers(1, 5), label="shards")
    for algorithm in ALGORITHMS:
        partials = partial_sums(arrived, shards, algorithm)
        assert _bits(sum_contributions(partials)[0]) == _bits(
            sum_contributions(data.draw(st.permutations(partials)))[0]
        )


@settings(max_examples=150)
@given(contribs=contributions(), shards=st.integers(1, 10))
def test_sharded_and_single_combiner_agree_within_the_documented_bound(contribs, shards):
    n_workers = len(contribs)
    n = sum(c.samples for c in contribs)

    # Gradient averaging: the float64 totals differ by at most 2 * _gamma(N - 1) * sum |g_i|.
    partials = partial_sums(contribs, shards, "gradient_averaging")
    assert [p.worker for p in partials] == sorted({shard_of(c.worker, shards) for c in contribs})
    single, n_single, _ = sum_contributions(contribs)
    sharded, n_sharded, _ = sum_contributions(partials)
    assert n_single == n_sharded == n
    for i in range(len(SHAPES)):
        scale = sum(np.abs(c.arrays[i].astype(np.float64)) for c in contribs if c.samples)
        bound = 2 * _gamma(max(n_workers - 1, 0)) * scale
        assert np.all(np.abs(single[i] - sharded[i]) <= bound)

    # After rounding to float32 weights: that bound divided by n, loosened to 4 * gamma(N + 1)
    # for the division's and the step's own float64 roundings, plus one float32 ulp.
    sgd = SGDConfig(lr=1.0)
    w0 = _start_weights()
    w_single, _, loss_single = combine_gradient_averaging(w0, None, contribs, sgd)
    w_sharded, _, loss_sharded = combine_gradient_averaging(w0, None, partials, sgd)
    for i in range(len(SHAPES)):
        scale = sum(np.abs(c.arrays[i].astype(np.float64)) for c in contribs if c.samples)
        allowed = 4 * _gamma(n_workers + 1) * scale / n + np.spacing(
            np.maximum(np.abs(w_single[i]), np.abs(w_sharded[i]))
        )
        assert np.all(np.abs(w_single[i].astype(np.float64) - w_sharded[i]) <= allowed)
    assert loss_single == pytest.approx(loss_sharded, rel=4 * n_workers * U64)

    # Model averaging: N + 1 roundings on the weighted sum (aggregate.py's docstring) and one
    # for the division by n: 2 * _gamma(N + 2) * sum n_i |w_i| / n, then one float32 ulp.
    avg_single, _ = combine_model_averaging(contribs)
    avg_sharded, _ = combine_model_averaging(partial_sums(contribs, shards, "model_averaging"))
    for i in range(len(SHAPES)):
        weighted = sum(c.samples * np.abs(c.arrays[i].astype(np.float64)) for c in contribs)
        allowed = 2 * _gamma(n_workers + 2) * weighted / n + np.spacing(
            np.maximum(np.abs(avg_single[i]), np.abs(avg_sharded[i]))
        )
        assert np.all(np.abs(avg_single[i].astype(np.float64) - avg_sharded[i]) <= allowed)


@settings(max_examples=100)
@given(contribs=contributions(), sgd=sgd_configs)
def test_combines_match_the_sample_weighted_formulas(contribs, sgd):
    n = sum(c.samples for c in contribs)
    counts = np.array([c.samples for c in contribs], dtype=np.float64)
    w0 = _start_weights()
    weights, velocity, loss = combine_gradient_averaging(w0, None, contribs, sgd)
    averaged, avg_loss = combine_model_averaging(contribs)
    assert loss == avg_loss == pytest.approx(sum(c.loss_sum for c in contribs) / n, rel=1e-12)
    for i, shape in enumerate(SHAPES):
        stacked = np.stack([c.arrays[i].astype(np.float64) for c in contribs])
        per_worker = counts.reshape(-1, *[1] * len(shape))
        # Oracles in float64 (NumPy's own summation order). Ours adds in float64 too and rounds
        # once to float32, so half a float32 ulp of the magnitudes involved bounds the gap;
        # EPS32 (a whole ulp) times the sum of magnitudes leaves room for the float64 part.
        g = np.where(per_worker > 0, stacked, 0.0).sum(axis=0) / n
        g_mag = np.abs(np.where(per_worker > 0, stacked, 0.0)).sum(axis=0) / n
        d = g + sgd.weight_decay * w0[i]
        d_mag = g_mag + sgd.weight_decay * np.abs(w0[i])
        expected = w0[i] - sgd.lr * d
        assert np.all(
            np.abs(weights[i] - expected) <= EPS32 * (np.abs(w0[i]) + sgd.lr * d_mag) + TINY32
        )
        if sgd.momentum:
            # First step from zero velocity: v = d (PyTorch's buffer initialisation).
            assert velocity is not None
            assert np.all(np.abs(velocity[i] - d) <= EPS32 * d_mag + TINY32)
        else:
            assert velocity is None
        mean = np.average(stacked, axis=0, weights=counts)
        mean_mag = (per_worker * np.abs(stacked)).sum(axis=0) / n
        assert np.all(np.abs(averaged[i] - mean) <= EPS32 * mean_mag + TINY32)


# -- gradient sums ----------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(spec=models, batch=labelled(), seed=st.integers(0, 2**16), data=st.data())
def test_any_sharding_of_a_batch_sums_to_the_full_batch_gradient(spec, batch, seed, data):
    model = _model(spec)
    x, y = batch
    n = len(y)
    workers = data.draw(st.integers(1, 5), label="workers")
    owner = np.array(data.draw(st.lists(st.integers(0, workers - 1), min_size=n, max_size=n)))
    mini = data.draw(st.integers(1, 4), label="mini-batch size")
    weights = model.init_weights(seed)
    contribs = []
    for w in range(workers):
        idx = np.flatnonzero(owner == w)  # any subset, not only contiguous pieces
        pieces = [(x[idx[i : i + mini]], y[idx[i : i + mini]]) for i in range(0, len(idx), mini)]
        contribs.append(gradient_contribution(model, weights, pieces, worker=w))
    # Sums over mini-batches are kept in float64 (float32 terms convert exactly).
    assert all(a.dtype == np.float64 for c in contribs for a in c.arrays)
    sums, samples, loss_sum = sum_contributions(contribs)
    full_loss, full = model.loss_and_grad_sum(weights, x, y)
    assert samples == n
    # Both sides are float32 evaluations of the same n-term sums; each term carries a few eps32
    # of relative error times a logit scale below ~10 here, and float32 summation adds up to
    # n * eps32. 1e-5 * n (x scale at most 2) leaves more than 10x margin over eps32 = 1.2e-7.
    for s, f in zip(sums, full, strict=True):
        np.testing.assert_allclose(s, f, rtol=1e-5, atol=1e-5 * n)
    assert loss_sum == pytest.approx(full_loss, rel=1e-5, abs=1e-5 * n)


# -- oracles: N = 1 is plain training ---------------------------------------------------------


def _oracle_step(
    params: list[np.ndarray],
    grad: list[np.ndarray],
    buf: list[np.ndarray] | None,
    sgd: SGDConfig,
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """PyTorch SGD (no dampening, no Nesterov) in float64, written out longhand."""
    out, new_buf = [], []
    for k, (p, g) in enumerate(zip(params, grad, strict=True)):
        d = g + sgd.weight_decay * p
        if sgd.momentum:
            d = d if buf is None else sgd.momentum * buf[k] + d
            new_buf.append(d)
        out.append(p - sgd.lr * d)
    return out, (new_buf if sgd.momentum else None)


# float32 weights/velocity are rounded every step (rel 6e-8) and the float32 forward pass adds a
# few eps32; over <= 6 steps with lr <= 0.5 and momentum <= 0.9 (velocity gain <= 10) the drift
# from the float64 oracle stays below ~1e-5; the tolerances give a further margin.
ORACLE_RTOL, ORACLE_ATOL = 1e-4, 5e-5


@settings(max_examples=60, deadline=None)
@given(
    spec=smooth_models,
    rounds=st.integers(1, 5),
    sgd=sgd_configs,
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_one_worker_gradient_averaging_is_plain_minibatch_gradient_descent(
    spec, rounds, sgd, seed, data
):
    model = _model(spec)
    per_round = [data.draw(labelled(1, 6), label=f"round {r}") for r in range(rounds)]

    weights, velocity = model.init_weights(seed), None
    losses = []
    for xb, yb in per_round:
        # Split the round's batch into two mini-batches at the same weights: one larger batch.
        half = len(yb) // 2
        pieces = [(xb[:half], yb[:half]), (xb[half:], yb[half:])]
        c = gradient_contribution(model, weights, pieces, worker=0)
        weights, velocity, loss = combine_gradient_averaging(weights, velocity, [c], sgd)
        losses.append(loss)

    params = [w.astype(np.float64) for w in model.init_weights(seed)]
    buf = None
    for (xb, yb), loss in zip(per_round, losses, strict=True):
        oracle_loss, g = model.loss_and_grad_sum(params, xb.astype(np.float64), yb)
        assert loss == pytest.approx(oracle_loss / len(yb), rel=ORACLE_RTOL, abs=ORACLE_ATOL)
        params, buf = _oracle_step(params, [gi / len(yb) for gi in g], buf, sgd)
    for w, p in zip(weights, params, strict=True):
        assert w.dtype == np.float32
        np.testing.assert_allclose(w, p, rtol=ORACLE_RTOL, atol=ORACLE_ATOL)
    assert (velocity is None) == (sgd.momentum == 0)


@settings(max_examples=60, deadline=None)
@given(
    spec=smooth_models,
    sgd=sgd_configs,
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_one_worker_model_averaging_is_sequential_sgd(spec, sgd, seed, data):
    model = _model(spec)
    batches = data.draw(st.lists(labelled(1, 6), min_size=1, max_size=5), label="batches")
    start = model.init_weights(seed)
    c = local_sgd_contribution(model, start, batches, sgd, worker=3)
    averaged, mean_loss = combine_model_averaging([c])
    # n * w is exact in float64 for float32 w, and so is (n * w) / n: averaging one is identity.
    assert _bits(averaged) == _bits(c.arrays)
    assert c.samples == sum(len(yb) for _, yb in batches)

    params, buf, loss_sum = [w.astype(np.float64) for w in start], None, 0.0
    for xb, yb in batches:
        loss, g = model.loss_and_grad_sum(params, xb.astype(np.float64), yb)
        loss_sum += loss
        params, buf = _oracle_step(params, [gi / len(yb) for gi in g], buf, sgd)
    for w, p in zip(averaged, params, strict=True):
        np.testing.assert_allclose(w, p, rtol=ORACLE_RTOL, atol=ORACLE_ATOL)
    assert mean_loss == pytest.approx(loss_sum / c.samples, rel=ORACLE_RTOL, abs=ORACLE_ATOL)
    assert all(np.array_equal(a, b) for a, b in zip(start, model.init_weights(seed), strict=True))


@settings(max_examples=40, deadline=None)
@given(
    spec=models,
    workers=st.integers(2, 6),
    sgd=sgd_configs,
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_identical_workers_average_to_exactly_one_of_them(spec, workers, sgd, seed, data):
    model = _model(spec)
    batches = data.draw(st.lists(labelled(1, 6), min_size=1, max_size=3))
    start = model.init_weights(seed)
    contribs = [local_sgd_contribution(model, start, batches, sgd, w) for w in range(workers)]
    averaged, _ = combine_model_averaging(contribs)
    # Exact: sum_i n * w over identical float32 w is a small integer multiple of w, which
    # float64 represents exactly, and dividing by N * n then gives w back.
    assert _bits(averaged) == _bits(contribs[0].arrays)


# -- special values ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    spec=models,
    momentum=st.floats(0, 0.99),
    weight_decay=st.floats(0, 1),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_lr_zero_leaves_weights_bit_identical(spec, momentum, weight_decay, seed, data):
    model = _model(spec)
    sgd = SGDConfig(lr=0.0, momentum=momentum, weight_decay=weight_decay)
    start = model.init_weights(seed)
    rounds = [data.draw(st.lists(labelled(1, 6), min_size=1, max_size=3)) for _ in range(3)]

    weights, velocity = start, None
    for per_worker in rounds:
        contribs = [
            gradient_contribution(model, weights, [b], worker=w) for w, b in enumerate(per_worker)
        ]
        weights, velocity, _ = combine_gradient_averaging(weights, velocity, contribs, sgd)
    assert _bits(weights) == _bits(start)

    weights = start
    for per_worker in rounds:
        contribs = [
            local_sgd_contribution(model, weights, [b, b], sgd, worker=w)
            for w, b in enumerate(per_worker)
        ]
        weights, _ = combine_model_averaging(contribs)
    assert _bits(weights) == _bits(start)


@settings(max_examples=60, deadline=None)
@given(contribs=contributions(min_workers=1, max_workers=5), sgd=sgd_configs, data=st.data())
def test_a_worker_with_no_samples_contributes_nothing(contribs, sgd, data):
    used = max(c.worker for c in contribs) + 1
    junk = [data.draw(hnp.arrays(np.float32, s, elements=finite32)) for s in SHAPES]
    idle = Contribution(worker=used, samples=0, arrays=junk, loss_sum=0.0)
    w0 = _start_weights()
    with_idle = combine_gradient_averaging(w0, None, [*contribs, idle], sgd)
    without = combine_gradient_averaging(w0, None, contribs, sgd)
    assert _bits(with_idle[0]) == _bits(without[0]) and with_idle[2] == without[2]
    assert _bits(combine_model_averaging([idle, *contribs])[0]) == _bits(
        combine_model_averaging(contribs)[0]
    )


def test_a_stopped_worker_returns_exactly_the_batches_it_finished():
    model = _model(("mlp", {"hidden": (4,), "activation": "relu"}))
    rng = np.random.default_rng(0)
    batches = [
        (rng.normal(size=(4, FEATURES)).astype(np.float32), rng.integers(0, CLASSES, 4))
        for _ in range(5)
    ]
    weights, sgd = model.init_weights(0), SGDConfig(lr=0.1, momentum=0.9)
    for done in range(6):
        calls = iter(range(100))
        stop = lambda done=done, calls=calls: next(calls) >= done  # noqa: E731
        partial = gradient_contribution(model, weights, batches, 2, should_stop=stop)
        assert partial.samples == 4 * done
        assert _bits(partial.arrays) == _bits(
            gradient_contribution(model, weights, batches[:done], 2).arrays
        )
        calls = iter(range(100))
        stop = lambda done=done, calls=calls: next(calls) >= done  # noqa: E731
        local = local_sgd_contribution(model, weights, batches, sgd, 2, should_stop=stop)
        assert local.samples == 4 * done
        assert _bits(local.arrays) == _bits(
            local_sgd_contribution(model, weights, batches[:done], sgd, 2).arrays
        )
    stopped = gradient_contribution(model, weights, batches, 0, should_stop=lambda: True)
    assert stopped.samples == 0 and stopped.loss_sum == 0.0
    assert all(not a.any() for a in stopped.arrays)


def test_apply_gradient_step_is_pure_and_follows_the_pytorch_momentum_convention():
    w = [np.array([1.0, -2.0], np.float32)]
    g = [np.array([0.5, 0.25])]
    v = [np.array([1.0, 1.0], np.float32)]
    sgd = SGDConfig(lr=0.1, momentum=0.9, weight_decay=0.01)
    new_w, new_v = apply_gradient_step(w, g, v, sgd)
    assert new_v is not None
    # v <- 0.9 * v + (g + 0.01 * w);  w <- w - 0.1 * v
    expected_v = 0.9 * np.array([1.0, 1.0]) + np.array([0.5, 0.25]) + 0.01 * np.array([1.0, -2.0])
    np.testing.assert_allclose(new_v[0], expected_v, rtol=1e-7)
    np.testing.assert_allclose(new_w[0], np.array([1.0, -2.0]) - 0.1 * expected_v, rtol=1e-7)
    assert new_w[0].dtype == new_v[0].dtype == np.float32
    assert w[0].tolist() == [1.0, -2.0] and v[0].tolist() == [1.0, 1.0]  # inputs untouched
    # First step with no velocity equals the step from a zero velocity; no momentum -> None.
    assert _bits(apply_gradient_step(w, g, None, sgd)[0]) == _bits(
        apply_gradient_step(w, g, [np.zeros(2, np.float32)], sgd)[0]
    )
    assert apply_gradient_step(w, g, v, SGDConfig(lr=0.1))[1] is None


# -- rejected input ---------------------------------------------------------------------------


def test_duplicate_worker_ids_are_rejected():
    a = Contribution(worker=3, samples=2, arrays=[np.ones(2, np.float32)], loss_sum=1.0)
    b = Contribution(worker=3, samples=5, arrays=[np.ones(2, np.float32)], loss_sum=1.0)
    for call in (
        lambda: sum_contributions([a, b]),
        lambda: combine_model_averaging([b, a]),
        lambda: combine_gradient_averaging([np.ones(2, np.float32)], None, [a, b], SGDConfig(1)),
        lambda: partial_sums([a, b], 2),
    ):
        with pytest.raises(ValueError, match="duplicate worker id 3"):
            call()


def test_zero_total_samples_and_empty_or_mismatched_rounds_are_rejected():
    zeros = [
        Contribution(worker=w, samples=0, arrays=[np.ones(2, np.float32)], loss_sum=0.0)
        for w in range(3)
    ]
    with pytest.raises(ValueError, match="all 3 contributions report samples=0"):
        combine_gradient_averaging([np.ones(2, np.float32)], None, zeros, SGDConfig(lr=0.1))
    with pytest.raises(ValueError, match="all 3 contributions report samples=0"):
        combine_model_averaging(zeros)
    sums, n, loss = sum_contributions(zeros)
    assert n == 0 and loss == 0.0 and not sums[0].any()
    with pytest.raises(ValueError, match="at least one contribution"):
        combine_model_averaging([])
    odd = Contribution(worker=9, samples=1, arrays=[np.ones(3, np.float32)], loss_sum=0.0)
    with pytest.raises(ValueError, match="worker 9 has arrays of shapes"):
        sum_contributions([*zeros, odd])
    good = Contribution(worker=0, samples=1, arrays=[np.ones(3, np.float32)], loss_sum=0.0)
    with pytest.raises(ValueError, match=r"^grad_mean\[0\]: must have shape"):
        combine_gradient_averaging([np.ones(2, np.float32)], None, [good], SGDConfig(lr=0.1))
    with pytest.raises(ValueError, match=r"^samples: must be an int >= 0"):
        Contribution(worker=0, samples=-1, arrays=[], loss_sum=0.0)
    with pytest.raises(ValueError, match=r"^loss_sum: must be 0 when samples is 0"):
        Contribution(worker=0, samples=0, arrays=[], loss_sum=2.0)
    with pytest.raises(ValueError, match=r"^shards: "):
        partial_sums([good], 0)
    with pytest.raises(ValueError, match=r"^algorithm: "):
        partial_sums([good], 1, "federated")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"lr": "0.1"}, "lr"),
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "momentum": -0.5}, "momentum"),
        ({"lr": 0.1, "momentum": float("nan")}, "momentum"),
        ({"lr": 0.1, "weight_decay": -1e-4}, "weight_decay"),
        ({"lr": 0.1, "weight_decay": float("inf")}, "weight_decay"),
    ],
)
def test_bad_sgd_config_values_name_the_field(kwargs, field):
    with pytest.raises(SGDConfigError) as exc:
        SGDConfig(**kwargs)
    assert isinstance(exc.value, ValueError)
    assert exc.value.field == field
    assert str(exc.value).startswith(f"{field}: ")


def test_sgd_config_accepts_the_edges_of_its_ranges():
    cfg = SGDConfig(lr=0, momentum=0.0, weight_decay=0)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay) == (0.0, 0.0, 0.0)
    assert SGDConfig(lr=np.float32(0.5), momentum=0.999).lr == 0.5  # type: ignore[arg-type]
