"""Keras models: registry laziness, weights, gradients vs finite differences, learning, VGG19."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the Keras models need TensorFlow (tensorflow-cpu)")

from simulator.algorithms import SGDConfig, apply_gradient_step  # noqa: E402
from simulator.data import batches, synthetic_dataset  # noqa: E402
from simulator.models import Model, get_model  # noqa: E402
from simulator.models import keras_models as km  # noqa: E402

pytestmark = pytest.mark.tensorflow

REPO = Path(__file__).resolve().parent.parent
SMALL = (8, 8, 1)


@pytest.fixture(scope="module")
def cnn() -> km.KerasModel:
    return km.cnn(input_shape=SMALL, num_classes=10)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ds = synthetic_dataset(320, 200, input_shape=SMALL, num_classes=10, seed=3)
    (x_train, y_train), (x_test, y_test) = (
        next(batches(x, y, np.arange(len(y)), len(y), SMALL))
        for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test))
    )
    return x_train, y_train, x_test, y_test


def _no_imagenet(tmp_path: Path) -> dict[str, str]:
    """An environment whose Keras cache is an empty directory."""
    return {"KERAS_HOME": str(tmp_path / "keras-home"), "HOME": str(tmp_path)}


def _sgd(
    model: Model, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, lr: float, steps: int
) -> list[np.ndarray]:
    """`steps` plain SGD steps on the batch's mean gradient."""
    for _ in range(steps):
        _, grads = model.loss_and_grad_sum(weights, x, y)
        weights, _ = apply_gradient_step(weights, [g / len(y) for g in grads], None, SGDConfig(lr))
    return weights


# -- registry ---------------------------------------------------------------------------------


def test_importing_the_registry_does_not_import_tensorflow_until_a_keras_model_is_asked_for():
    code = (
        "import sys\n"
        "from simulator.models import MODEL_NAMES, get_model\n"
        "assert {'cnn', 'vgg19'} <= set(MODEL_NAMES), MODEL_NAMES\n"
        "get_model('mlp', input_shape=(4,), num_classes=3)\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
        "get_model('cnn', input_shape=(8, 8, 1), num_classes=3)\n"
        "assert 'tensorflow' in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_registry_builds_keras_models_that_follow_the_protocol(tmp_path):
    model = get_model("cnn", input_shape=(32, 32, 3), num_classes=10)
    assert isinstance(model, km.KerasModel) and isinstance(model, Model)
    assert (model.name, model.input_shape, model.num_classes) == ("cnn", (32, 32, 3), 10)
    with pytest.warns(UserWarning):
        vgg = get_model("vgg19", input_size=64, environ=_no_imagenet(tmp_path))
    assert (vgg.name, vgg.input_shape, vgg.num_classes) == ("vgg19", (64, 64, 3), 10)
    with pytest.warns(UserWarning):
        thesis = km.vgg19(environ=_no_imagenet(tmp_path))
    assert thesis.input_shape == (224, 224, 3)  # the thesis's size is the default


@pytest.mark.parametrize(
    ("name", "kwargs", "field"),
    [
        ("cnn", {"input_shape": (8, 8)}, "input_shape"),
        ("cnn", {"input_shape": (8, 0, 1)}, "input_shape"),
        ("cnn", {"num_classes": 1}, "num_classes"),
        ("cnn", {"seed": -1}, "seed"),
        ("vgg19", {"input_size": 16}, "input_size"),
        ("vgg19", {"num_classes": True}, "num_classes"),
    ],
)
def test_bad_arguments_name_the_field(name, kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        get_model(name, **kwargs)


def test_a_weights_path_that_does_not_exist_is_an_error_not_a_silent_random_base(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(FileNotFoundError, match="weights_path") as exc:
        km.vgg19(input_size=32, weights_path=missing)
    assert exc.value.filename == str(missing)


def test_bad_weights_and_batches_name_the_field(cnn, data):
    w = cnn.init_weights(0)
    x, y = data[0][:4], data[1][:4]
    with pytest.raises(ValueError, match=r"^weights: .* has 8 trainable arrays, got 7"):
        cnn.loss_and_grad_sum(w[:-1], x, y)
    with pytest.raises(ValueError, match=r"^weights\[7\]: must have shape \(10,\)"):
        cnn.loss_and_grad_sum([*w[:-1], np.zeros(3, np.float32)], x, y)
    with pytest.raises(ValueError, match=r"^x: must have shape \(batch, 8, 8, 1\)"):
        cnn.loss_and_grad_sum(w, x[:, :4], y)
    with pytest.raises(ValueError, match=r"^y: labels must be in 0\.\.9"):
        cnn.loss_and_grad_sum(w, x, y + 10)
    with pytest.raises(ValueError, match=r"^y: must hold integer class labels"):
        cnn.loss_and_grad_sum(w, x, y.astype(np.float32))


# -- weights ----------------------------------------------------------------------------------


def test_init_weights_are_float32_deterministic_per_seed_and_trainable_only(cnn):
    a, b, c = cnn.init_weights(7), cnn.init_weights(7), cnn.init_weights(8)
    assert [w.shape for w in a] == [
        (3, 3, 1, 16),
        (16,),
        (3, 3, 16, 32),
        (32,),
        (2 * 2 * 32, 64),
        (64,),
        (64, 10),
        (10,),
    ]
    assert all(w.dtype == np.float32 for w in a)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    assert [tuple(v.shape) for v in cnn.keras_model.trainable_weights] == [w.shape for w in a]
    assert cnn.keras_model.non_trainable_weights == []


def test_init_weights_do_not_depend_on_what_the_process_did_before(cnn):
    """Workers and the combine run in different processes: init must not hang on RNG state."""
    first = cnn.init_weights(5)
    np.random.seed(123)
    tf.random.uniform((3,))
    again = cnn.init_weights(5)
    assert all(np.array_equal(p, q) for p, q in zip(first, again, strict=True))


# -- gradients --------------------------------------------------------------------------------


def test_cnn_gradients_match_central_finite_differences(cnn, data):
    x, y = data[0][:6], data[1][:6]
    weights = cnn.init_weights(1)
    _, grads = cnn.loss_and_grad_sum(weights, x, y)
    eps = 1e-2
    # The network computes in float32 (relative rounding ~1e-7 of a loss sum of ~15, i.e. ~2e-6
    # absolute, divided by 2*eps gives ~1e-4), and a ReLU kink inside [w-eps, w+eps] or the
    # eps^2 curvature term add a little more: 2% of the gradient plus 2e-3 covers all of it.
    checked = 0
    for layer in (0, 4, 6, 7):  # a conv kernel, the hidden dense kernel, the output layer
        flat = np.argsort(np.abs(grads[layer]).ravel())[-2:]  # the largest, well above noise
        for idx in zip(*np.unravel_index(flat, grads[layer].shape), strict=True):
            plus = [w.copy() for w in weights]
            minus = [w.copy() for w in weights]
            plus[layer][idx] += eps
            minus[layer][idx] -= eps
            # The perturbed coordinate as actually stored in float32, not the intended one.
            step = float(plus[layer][idx]) - float(minus[layer][idx])
            fd = (
                cnn.loss_and_grad_sum(plus, x, y)[0] - cnn.loss_and_grad_sum(minus, x, y)[0]
            ) / step
            analytic = float(grads[layer][idx])
            assert abs(fd - analytic) <= 2e-2 * abs(analytic) + 2e-3, (layer, idx, fd, analytic)
            checked += 1
    assert checked == 8


def test_sums_over_a_split_batch_equal_the_whole_batch(cnn, data):
    x, y = data[0][:10], data[1][:10]
    weights = cnn.init_weights(2)
    loss, grads = cnn.loss_and_grad_sum(weights, x, y)
    loss_a, grads_a = cnn.loss_and_grad_sum(weights, x[:3], y[:3])
    loss_b, grads_b = cnn.loss_and_grad_sum(weights, x[3:], y[3:])
    # Sums, not means: the halves add up. float32 reductions in a different order differ by a
    # few ulps of the largest partial sums, so compare with a relative 1e-5.
    assert loss == pytest.approx(loss_a + loss_b, rel=1e-5)
    assert loss / len(y) > 1.0  # per-sample losses were summed, not averaged
    for g, ga, gb in zip(grads, grads_a, grads_b, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_allclose(ga + gb, g, rtol=1e-4, atol=1e-5 * float(np.abs(g).max()))
    empty_loss, empty_grads = cnn.loss_and_grad_sum(weights, x[:0], y[:0])
    assert empty_loss == 0.0 and all(not g.any() for g in empty_grads)


def test_the_gradient_function_is_traced_once_for_every_batch_size(cnn, data):
    weights = cnn.init_weights(0)
    for n in (1, 3, 8, 17):
        cnn.loss_and_grad_sum(weights, data[0][:n], data[1][:n])
    assert km._CACHE[cnn._arch.key].grad_fn.experimental_get_tracing_count() == 1


def test_weights_changed_in_place_are_seen_and_instances_sharing_a_graph_do_not_mix(cnn, data):
    x, y = data[0][:8], data[1][:8]
    weights = cnn.init_weights(0)
    loss0, _ = cnn.loss_and_grad_sum(weights, x, y)
    weights[6] *= 0  # the same array objects, new contents: must not be skipped as "unchanged"
    weights[7][:] = 0
    loss_zero, _ = cnn.loss_and_grad_sum(weights, x, y)
    assert loss_zero == pytest.approx(len(y) * np.log(10), rel=1e-6)  # uniform probabilities
    other = km.cnn(input_shape=SMALL, num_classes=10, seed=9)  # same graph from the cache
    assert other.keras_model is cnn.keras_model
    assert other.loss_and_grad_sum(other.init_weights(0), x, y)[0] == pytest.approx(loss0, rel=1e-6)
    assert cnn.loss_and_grad_sum(weights, x, y)[0] == pytest.approx(loss_zero, rel=1e-6)


def test_evaluate_and_predict_proba_agree_with_the_loss(cnn, data):
    x, y = data[2][:50], data[3][:50]
    weights = cnn.init_weights(4)
    proba = cnn.predict_proba(weights, x)
    assert proba.shape == (50, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    mean_loss, accuracy = cnn.evaluate(weights, x, y, batch_size=16)
    assert mean_loss == pytest.approx(cnn.loss_and_grad_sum(weights, x, y)[0] / 50, rel=1e-4)
    assert accuracy == np.mean(proba.argmax(axis=1) == y)
    with pytest.raises(ValueError, match=r"^batch_size: "):
        cnn.evaluate(weights, x, y, batch_size=0)


# -- learning ---------------------------------------------------------------------------------


def test_a_gradient_step_reduces_the_loss_and_a_few_dozen_steps_beat_chance(cnn, data):
    x_train, y_train, x_test, y_test = data
    weights = cnn.init_weights(0)
    before = cnn.loss_and_grad_sum(weights, x_train[:32], y_train[:32])[0]
    after = cnn.loss_and_grad_sum(
        _sgd(cnn, weights, x_train[:32], y_train[:32], 0.05, 1), x_train[:32], y_train[:32]
    )[0]
    assert after < before
    for _epoch in range(4):  # 40 mini-batch steps of 32
        for start in range(0, len(y_train), 32):
            xb, yb = x_train[start : start + 32], y_train[start : start + 32]
            weights = _sgd(cnn, weights, xb, yb, 0.1, 1)
    loss, accuracy = cnn.evaluate(weights, x_test, y_test)
    # Chance is 10%; the classes are well separated, so a working gradient gets far above it.
    assert accuracy >= 0.5, (loss, accuracy)


# -- VGG19 ------------------------------------------------------------------------------------


def test_vgg19_without_imagenet_file_warns_freezes_its_base_and_trains_its_head(tmp_path):
    env = _no_imagenet(tmp_path)
    with pytest.warns(UserWarning, match=km.VGG19_NOTOP_FILE) as record:
        model = km.vgg19(input_size=32, num_classes=10, environ=env)
    message = str(record[0].message)
    assert str(tmp_path / "keras-home" / "models") in message and "random" in message
    weights = model.init_weights(0)
    # Exactly the new head travels: kernel (512, 10) and bias (10,), float32.
    assert [(w.shape, w.dtype) for w in weights] == [
        ((512, 10), np.dtype(np.float32)),
        ((10,), np.dtype(np.float32)),
    ]
    keras_model = model.keras_model
    assert [tuple(v.shape) for v in keras_model.trainable_weights] == [(512, 10), (10,)]
    assert len(keras_model.non_trainable_weights) == 32  # 16 conv layers, kernel and bias
    base_before = [v.numpy().copy() for v in keras_model.non_trainable_weights]

    rng = np.random.default_rng(0)
    x = rng.random((16, 32, 32, 3), dtype=np.float32)
    y = np.arange(16) % 10
    loss0, grads = model.loss_and_grad_sum(weights, x, y)
    assert [g.shape for g in grads] == [(512, 10), (10,)] and np.abs(grads[0]).max() > 0
    trained = _sgd(model, weights, x, y, 1e-3, 5)
    loss5 = model.loss_and_grad_sum(trained, x, y)[0]
    assert loss5 < loss0
    # The base stayed where it was built: it is frozen, never assigned, never shipped.
    for before, v in zip(base_before, keras_model.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(before, v.numpy())


def test_vgg19_loads_a_local_imagenet_file_without_downloading_or_warning(tmp_path):
    legacy = pytest.importorskip(
        "keras.src.legacy.saving.legacy_h5_format", reason="needs Keras' legacy .h5 writer"
    )
    import h5py

    # Stand in for the ImageNet file: a VGG19 base of known random weights in Keras' .h5 layout.
    tf.keras.utils.set_random_seed(42)
    reference = tf.keras.applications.VGG19(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    cache = tmp_path / "keras-home" / "models"
    cache.mkdir(parents=True)
    with h5py.File(cache / km.VGG19_NOTOP_FILE, "w") as f, warnings.catch_warnings():
        # Keras' legacy writer calls np.array on tensors the NumPy 2 way it deprecates.
        warnings.simplefilter("ignore", DeprecationWarning)
        legacy.save_weights_to_hdf5_group(f, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning here would mean the file was not found
        model = km.vgg19(input_size=32, environ=_no_imagenet(tmp_path), seed=7)
    loaded = model.keras_model.non_trainable_weights
    assert len(loaded) == len(reference.weights) == 32
    for want, got in zip(reference.weights, loaded, strict=True):
        np.testing.assert_array_equal(want.numpy(), got.numpy())
