"""NumPy reference models: registry, gradients vs finite differences, evaluation, learning."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from simulator.aggregate import combine_gradient_averaging
from simulator.algorithms import SGDConfig, gradient_contribution
from simulator.models import MODEL_NAMES, Model, get_model
from simulator.models.numpy_models import MLP, SoftmaxRegression


def _float64_point(model: Model, seed: int) -> list[np.ndarray]:
    """Weights in float64 away from init: random biases keep ReLU pre-activations off the kink."""
    rng = np.random.default_rng(seed + 1)
    return [w.astype(np.float64) + rng.normal(0.0, 0.5, w.shape) for w in model.init_weights(seed)]


MODELS = st.sampled_from(
    [
        ("softmax", {}),
        ("mlp", {"hidden": (4,), "activation": "relu"}),
        ("mlp", {"hidden": (4,), "activation": "tanh"}),
        ("mlp", {"hidden": (3, 4), "activation": "tanh"}),
        ("mlp", {"hidden": (3, 4), "activation": "relu"}),
    ]
)


# -- registry ---------------------------------------------------------------------------------


def test_registry_builds_each_name_and_rejects_unknown_names_listing_allowed_ones():
    assert set(MODEL_NAMES) == {"softmax", "mlp", "cnn", "vgg19"}
    softmax = get_model("softmax", input_shape=(64,), num_classes=10)
    mlp = get_model("mlp", input_shape=(8, 8), num_classes=10, hidden=(32, 16))
    assert isinstance(softmax, SoftmaxRegression) and isinstance(softmax, Model)
    assert isinstance(mlp, MLP) and isinstance(mlp, Model)
    assert (softmax.name, mlp.name) == ("softmax", "mlp")
    assert mlp.input_shape == (8, 8) and mlp.num_classes == 10
    with pytest.raises(ValueError, match="'softmax', 'mlp'") as exc:
        get_model("resnet")
    assert "vgg19" in str(exc.value) and "softmax" in str(exc.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"input_shape": (), "num_classes": 3}, "input_shape"),
        ({"input_shape": (0, 3), "num_classes": 3}, "input_shape"),
        ({"input_shape": (4,), "num_classes": 1}, "num_classes"),
        ({"input_shape": (4,), "num_classes": 3, "hidden": ()}, "hidden"),
        ({"input_shape": (4,), "num_classes": 3, "hidden": (4, -1)}, "hidden"),
        ({"input_shape": (4,), "num_classes": 3, "activation": "gelu"}, "activation"),
    ],
)
def test_bad_model_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        get_model("mlp", **kwargs)


def test_init_weights_are_float32_deterministic_per_seed_and_trainable_only():
    model = MLP((2, 3), 4, hidden=(5,))
    a, b, c = model.init_weights(7), model.init_weights(7), model.init_weights(8)
    assert [w.shape for w in a] == [(6, 5), (5,), (5, 4), (4,)]
    assert all(w.dtype == np.float32 for w in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    softmax = SoftmaxRegression((6,), 3).init_weights(0)
    assert [w.shape for w in softmax] == [(6, 3), (3,)]


# -- gradients --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    spec=MODELS,
    input_shape=st.sampled_from([(5,), (2, 3)]),
    num_classes=st.integers(2, 4),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_analytic_gradient_matches_central_finite_differences(
    spec, input_shape, num_classes, seed, data
):
    name, kwargs = spec
    model = get_model(name, input_shape=input_shape, num_classes=num_classes, **kwargs)
    batch = data.draw(st.integers(1, 6), label="batch")
    x = data.draw(
        hnp.arrays(np.float64, (batch, *input_shape), elements=st.floats(-3, 3)), label="x"
    )
    y = data.draw(hnp.arrays(np.int64, (batch,), elements=st.integers(0, num_classes - 1)))
    weights = _float64_point(model, seed)
    if kwargs.get("activation") == "relu":
        # Central differences are wrong within h of a ReLU kink; stay 1e-3 (>> h * |x|) away.
        h_in = x.reshape(batch, -1)
        for i in range(0, len(weights) - 2, 2):
            z = h_in @ weights[i] + weights[i + 1]
            assume(np.min(np.abs(z)) > 1e-3)
            h_in = np.maximum(z, 0)

    loss, grads = model.loss_and_grad_sum(weights, x, y)
    assert all(g.dtype == np.float64 for g in grads)
    step = 1e-6
    for w, g in zip(weights, grads, strict=True):
        numeric = np.empty_like(w)
        for idx in np.ndindex(w.shape):
            saved = w[idx]
            w[idx] = saved + step
            up, _ = model.loss_and_grad_sum(weights, x, y)
            w[idx] = saved - step
            down, _ = model.loss_and_grad_sum(weights, x, y)
            w[idx] = saved
            numeric[idx] = (up - down) / (2 * step)
        # float64 central differences: truncation O(h^2) ~ 1e-12 and cancellation
        # ~ eps64 * |loss| / h ~ 2e-10 * |loss|; the tolerance leaves a ~5000x margin.
        np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-6 * (1 + abs(loss)))


@settings(max_examples=40, deadline=None)
@given(spec=MODELS, seed=st.integers(0, 2**16), data=st.data())
def test_loss_is_the_sum_of_per_sample_cross_entropies(spec, seed, data):
    name, kwargs = spec
    model = get_model(name, input_shape=(4,), num_classes=3, **kwargs)
    batch = data.draw(st.integers(1, 8))
    x = data.draw(hnp.arrays(np.float64, (batch, 4), elements=st.floats(-3, 3)))
    y = data.draw(hnp.arrays(np.int64, (batch,), elements=st.integers(0, 2)))
    weights = _float64_point(model, seed)
    proba = model.predict_proba(weights, x)
    loss, _ = model.loss_and_grad_sum(weights, x, y)
    # Oracle: -log p_y from predict_proba; float64, so only last-bit differences are expected.
    np.testing.assert_allclose(loss, -np.log(proba[np.arange(batch), y]).sum(), rtol=1e-9)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)


def test_float32_weights_give_float32_gradients_and_an_empty_batch_gives_zeros():
    model = MLP((4,), 3, hidden=(5,))
    w = model.init_weights(0)
    x = np.ones((2, 4), np.float32)
    loss, grads = model.loss_and_grad_sum(w, x, np.array([0, 2]))
    assert isinstance(loss, float) and loss > 0
    assert [g.dtype for g in grads] == [np.float32] * 4
    assert [g.shape for g in grads] == [a.shape for a in w]
    loss0, grads0 = model.loss_and_grad_sum(w, x[:0], np.array([], np.int64))
    assert loss0 == 0.0 and all(not g.any() for g in grads0)


@pytest.mark.parametrize(
    ("x", "y", "field"),
    [
        (np.zeros((2, 5), np.float32), np.array([0, 1]), "x"),
        (np.zeros((2, 4), np.float32), np.array([0, 1, 2]), "y"),
        (np.zeros((2, 4), np.float32), np.array([0, 3]), "y"),
        (np.zeros((2, 4), np.float32), np.array([0.0, 1.0]), "y"),
    ],
)
def test_bad_batches_name_the_argument(x, y, field):
    model = SoftmaxRegression((4,), 3)
    with pytest.raises(ValueError, match=f"^{field}: "):
        model.loss_and_grad_sum(model.init_weights(0), x, y)


def test_weights_of_the_wrong_shape_or_mixed_dtype_are_rejected():
    model = SoftmaxRegression((4,), 3)
    w = model.init_weights(0)
    x, y = np.zeros((1, 4), np.float32), np.array([0])
    with pytest.raises(ValueError, match=r"^weights\[0\]: must have shape \(4, 3\)"):
        model.loss_and_grad_sum([w[0].T, w[1]], x, y)
    with pytest.raises(ValueError, match=r"^weights\[1\]: all weights must share one dtype"):
        model.loss_and_grad_sum([w[0], w[1].astype(np.float64)], x, y)
    with pytest.raises(ValueError, match=r"^weights: "):
        model.loss_and_grad_sum(w[:1], x, y)


# -- evaluation -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 7, 1024])
def test_evaluate_is_mean_loss_and_accuracy_whatever_the_chunking(batch_size):
    rng = np.random.default_rng(3)
    model = MLP((6,), 4, hidden=(8,))
    w = model.init_weights(1)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    y = rng.integers(0, 4, 50)
    loss, acc = model.evaluate(w, x, y, batch_size=batch_size)
    loss_sum, _ = model.loss_and_grad_sum(w, x, y)
    expected_acc = np.mean(model.predict_proba(w, x).argmax(axis=1) == y)
    # Chunked float32 forward passes agree with one pass to float32 rounding (~1e-7 relative).
    assert loss == pytest.approx(loss_sum / 50, rel=1e-6)
    assert acc == expected_acc
    with pytest.raises(ValueError, match=r"^x: "):
        model.evaluate(w, x[:0], y[:0])
    with pytest.raises(ValueError, match=r"^batch_size: "):
        model.evaluate(w, x, y, batch_size=0)


# -- learning and speed -----------------------------------------------------------------------


def _blobs(
    rng: np.random.Generator, n: int, dims: int, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(0.0, 4.0, (classes, dims))
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(0.0, 1.0, (n, dims))).astype(np.float32), y


@pytest.mark.parametrize("workers", [1, 4])
def test_softmax_regression_learns_a_separable_problem_in_200_steps(workers):
    rng = np.random.default_rng(0)
    x, y = _blobs(rng, 1200, 8, 3)
    x_train, y_train, x_test, y_test = x[:1000], y[:1000], x[1000:], y[1000:]
    model = SoftmaxRegression((8,), 3)
    weights, velocity = model.init_weights(0), None
    sgd = SGDConfig(lr=0.1, momentum=0.5)
    _, acc_before = model.evaluate(weights, x_test, y_test)
    for _ in range(200):
        idx = rng.choice(1000, 32, replace=False)
        pieces = np.array_split(idx, workers)
        contribs = [
            gradient_contribution(model, weights, [(x_train[p], y_train[p])], worker=i)
            for i, p in enumerate(pieces)
        ]
        weights, velocity, _ = combine_gradient_averaging(weights, velocity, contribs, sgd)
    loss, acc = model.evaluate(weights, x_test, y_test)
    assert acc > 0.9, (acc_before, acc, loss)
    assert all(w.dtype == np.float32 for w in weights)


def test_mlp_learns_what_softmax_regression_cannot():
    # XOR-like quadrants: no linear classifier beats ~50-75%; a hidden layer gets > 90%.
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (1200, 2)).astype(np.float32)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(np.int64)
    sgd = SGDConfig(lr=0.2, momentum=0.9)
    results = {}
    for model in (SoftmaxRegression((2,), 2), MLP((2,), 2, hidden=(16,), activation="tanh")):
        weights, velocity = model.init_weights(0), None
        for _ in range(600):
            idx = rng.choice(1000, 32, replace=False)
            c = gradient_contribution(model, weights, [(x[idx], y[idx])], worker=0)
            weights, velocity, _ = combine_gradient_averaging(weights, velocity, [c], sgd)
        results[model.name] = model.evaluate(weights, x[1000:], y[1000:])[1]
    assert results["mlp"] > 0.9 and results["softmax"] < 0.8, results
