"""Bad data and bad arguments: each gets a clear error, or flagged outputs.

The training cases put the bad value in the seventh batch (row 200, batches
of 32), so the first-batch checks at the API boundary cannot see it: the
in-graph guard must stop `fit` at step 6 with the weights of the six clean
steps before it.
"""

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_hydra as kh
from keras_hydra.guard import DataGuard

N, FEATURES, MEMBERS, CLASSES, BATCH = 256, 8, 4, 3, 32
BAD_ROW, BAD_STEP = 200, 200 // 32


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype("float32")
    logits = rng.normal(size=(N, MEMBERS, CLASSES)).astype("float32")
    return x, logits, np.ones(N, "float32")


def hydra(head=None, loss=None, num_heads=MEMBERS, jit=False, **kwargs):
    keras.utils.set_random_seed(0)
    model = kh.HydraModel(
        keras.layers.Dense(16, activation="relu"),
        head or kh.heads.Categorical(CLASSES),
        num_heads,
        **kwargs,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=loss or kh.losses.HydraKL(),
        jit_compile=jit,
    )
    model.build((None, FEATURES))
    return model


def flat_weights(model):
    return np.concatenate([w.ravel() for w in model.get_weights()])


@pytest.fixture(scope="module")
def clean_weights(data):
    """Weights after the six clean steps before the bad batch, unguarded."""
    x, logits, _ = data
    model = hydra(check_finite=False)
    rows = BAD_STEP * BATCH
    model.fit(x[:rows], logits[:rows], batch_size=BATCH, shuffle=False, verbose=0)
    return flat_weights(model)


class Batches(keras.utils.PyDataset):
    def __init__(self, *arrays):
        super().__init__()
        self.arrays = arrays

    def __len__(self):
        return math.ceil(N / BATCH)

    def __getitem__(self, index):
        rows = slice(index * BATCH, (index + 1) * BATCH)
        return tuple(a[rows] for a in self.arrays)


def fit(model, source, x, y, sample_weight, **kwargs):
    kwargs = {"epochs": 2, "verbose": 0, "shuffle": False, **kwargs}
    if source == "arrays":
        return model.fit(x, y, sample_weight=sample_weight, batch_size=BATCH, **kwargs)
    if source == "dataset":
        dataset = tf.data.Dataset.from_tensor_slices((x, y, sample_weight))
        return model.fit(dataset.batch(BATCH), **kwargs)
    return model.fit(Batches(x, y, sample_weight), **kwargs)


def with_bad(data, tensor, value):
    x, logits, weights = (a.copy() for a in data)
    array = {"x": x, "y": logits, "sample_weight": weights}[tensor]
    array[BAD_ROW] = value
    return x, logits, weights


NAMES = {
    "x": "non-finite inputs x",
    "y": "non-finite targets y",
    "sample_weight": "non-finite sample_weight",
}


@pytest.mark.parametrize("source", ["arrays", "dataset", "pydataset"])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("tensor", ["x", "y", "sample_weight"])
def test_bad_later_batch_stops_fit_with_weights_from_before(
    data, clean_weights, tensor, value, source
):
    model = hydra()
    if tensor == "y" and source == "arrays":
        # Target arrays are checked whole in numpy before training starts.
        with pytest.raises(ValueError, match="Teacher targets contain NaN or Inf"):
            fit(model, source, *with_bad(data, tensor, value))
        assert int(model.optimizer.iterations) == 0
        return
    with pytest.raises(ValueError, match=f"at step {BAD_STEP} .*{NAMES[tensor]}"):
        fit(model, source, *with_bad(data, tensor, value))
    assert int(model.optimizer.iterations) == BAD_STEP
    np.testing.assert_allclose(flat_weights(model), clean_weights, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "tensor, source",
    [("x", "arrays"), ("y", "dataset"), ("sample_weight", "pydataset")],
)
def test_guard_under_jit_compile(data, clean_weights, tensor, source):
    model = hydra(jit=True)
    with pytest.raises(ValueError, match=f"at step {BAD_STEP} .*{NAMES[tensor]}"):
        fit(model, source, *with_bad(data, tensor, np.nan))
    assert int(model.optimizer.iterations) == BAD_STEP
    np.testing.assert_allclose(flat_weights(model), clean_weights, rtol=1e-4, atol=1e-6)


def test_guard_skips_the_rest_of_an_execution(data, clean_weights):
    # With 4 steps per execution, the error comes after steps 4-7 ran as one
    # call; steps 6 and 7 were both skipped.
    model = hydra()
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=kh.losses.HydraKL(),
        steps_per_execution=4,
    )
    with pytest.raises(ValueError, match=f"at step {BAD_STEP} .*inputs x"):
        fit(model, "arrays", *with_bad(data, "x", np.nan))
    assert int(model.optimizer.iterations) == BAD_STEP
    np.testing.assert_allclose(flat_weights(model), clean_weights, rtol=1e-5, atol=1e-7)


class CountBatches(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


def test_guard_raises_within_its_period_in_a_long_epoch(data, clean_weights):
    # 40 batches in one epoch: the guard, first among the callbacks, raises at
    # its 16th batch end, so the user's callback has seen 15; the steps
    # after the bad one were skipped.
    x, logits, weights = with_bad(data, "x", np.nan)
    x, logits, weights = (np.concatenate([a] * 5) for a in (x, logits, weights))
    counter = CountBatches()
    model = hydra()
    with pytest.raises(ValueError, match=f"at step {BAD_STEP} .*inputs x"):
        fit(model, "arrays", x, logits, weights, epochs=1, callbacks=[counter])
    assert counter.batches == DataGuard(None).every - 1
    assert int(model.optimizer.iterations) == BAD_STEP
    np.testing.assert_allclose(flat_weights(model), clean_weights, rtol=1e-5, atol=1e-7)


def test_guard_resets_for_the_next_fit(data):
    model = hydra()
    with pytest.raises(ValueError, match="inputs x"):
        fit(model, "arrays", *with_bad(data, "x", np.nan))
    history = fit(model, "arrays", *data, epochs=1)
    assert np.isfinite(history.history["loss"][0])
    assert int(model.optimizer.iterations) == BAD_STEP + N // BATCH


def test_check_finite_off_trains_unchecked(data):
    # The documented way out: no guard, so NaN reaches the weights.
    model = hydra(check_finite=False)
    fit(model, "dataset", *with_bad(data, "x", np.nan), epochs=1)
    assert not np.all(np.isfinite(flat_weights(model)))


def test_check_finite_round_trips_through_config():
    for check in (True, False):
        model = hydra(check_finite=check)
        restored = kh.HydraModel.from_config(model.get_config())
        assert restored.check_finite is check


def probabilities(logits):
    return keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))


@pytest.mark.parametrize(
    "corrupt",
    [lambda p: p * 0.5, lambda p: p - p.max()],
    ids=["row-sums-to-half", "negative-probabilities"],
)
def test_invalid_probability_rows_in_a_later_batch(data, corrupt):
    x, logits, weights = data
    probs = probabilities(logits)
    probs[BAD_ROW] = corrupt(probs[BAD_ROW])
    model = hydra(loss=kh.losses.HydraKL(from_logits=False))
    with pytest.raises(ValueError, match=f"at step {BAD_STEP} .*invalid targets y"):
        fit(model, "dataset", x, probs, weights)
    assert int(model.optimizer.iterations) == BAD_STEP


def test_float16_probabilities_are_not_flagged(data):
    # Rounding to float16 moves row sums off 1 by up to ~1e-3.
    x, logits, weights = data
    probs = probabilities(logits).astype("float16")
    model = hydra(loss=kh.losses.HydraKL(from_logits=False))
    fit(model, "dataset", x, probs, weights, epochs=1)
    assert int(model.optimizer.iterations) == N // BATCH


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_non_positive_scale_in_a_later_batch(data, scale):
    x, _, weights = data
    rng = np.random.default_rng(1)
    params = np.concatenate(
        [rng.normal(size=(N, MEMBERS, 1)), rng.uniform(0.5, 2, size=(N, MEMBERS, 1))],
        axis=-1,
    ).astype("float32")
    params[BAD_ROW, 2, 1] = scale
    model = hydra(kh.heads.Distribution("Normal"), kh.losses.DistributionKL("Normal"))
    with pytest.raises(ValueError, match=f"at step {BAD_STEP} .*invalid targets y"):
        fit(model, "pydataset", x, params, weights)
    assert int(model.optimizer.iterations) == BAD_STEP


# Prediction: a non-finite input row gets NaN outputs, never a confident answer.


@pytest.fixture(scope="module")
def bad_rows(data):
    x = data[0][:8].copy()
    x[2, 3], x[5, 0] = np.nan, -np.inf
    return x


@pytest.mark.parametrize("num_heads", [1, MEMBERS])
def test_predict_uncertainty_flags_non_finite_rows(data, bad_rows, num_heads):
    model = hydra(num_heads=num_heads)
    good = np.setdiff1d(np.arange(8), [2, 5])
    clean = model.predict_uncertainty(data[0][:8])
    result = model.predict_uncertainty(bad_rows)
    np.testing.assert_array_equal(result["predicted_class"][[2, 5]], [-1, -1])
    for name in ["probabilities", "epistemic_uncertainty", "total_uncertainty"]:
        assert np.all(np.isnan(result[name][[2, 5]])), name
        np.testing.assert_allclose(result[name][good], clean[name][good], rtol=1e-6)


def test_predict_distribution_flags_non_finite_rows(bad_rows):
    model = hydra(kh.heads.Distribution("Normal"), kh.losses.DistributionKL("Normal"))
    mixture = model.predict_distribution(bad_rows)
    mean = keras.ops.convert_to_numpy(mixture.mean())[:, 0]
    variance = keras.ops.convert_to_numpy(mixture.variance())[:, 0]
    assert np.all(np.isnan(mean[[2, 5]])) and np.all(np.isnan(variance[[2, 5]]))
    assert np.all(np.isfinite(np.delete(mean, [2, 5])))


def test_huge_finite_inputs_give_huge_or_infinite_variance(data):
    # Inputs 1e10 times the data's scale give variances about 1e20 times
    # larger; at 1e20 the variance (a square of scales near 1e20) is past
    # float32 and is +inf, documented: never NaN, never a small variance.
    model = hydra(kh.heads.Distribution("Normal"), kh.losses.DistributionKL("Normal"))
    x = data[0][:8]
    result = {s: model.predict_uncertainty(x * s) for s in (1.0, 1e10, 1e20)}
    variance = {s: r["variance"][:, 0] for s, r in result.items()}
    assert np.all(np.isfinite(variance[1e10]))
    assert np.all(variance[1e10] > 1e15 * variance[1.0])
    np.testing.assert_array_equal(variance[1e20], np.inf)
    assert np.all(np.isfinite(result[1e20]["mean"]))
    mixture = model.predict_distribution(x * 1e20)
    mixture_variance = keras.ops.convert_to_numpy(mixture.variance())
    np.testing.assert_array_equal(mixture_variance, np.inf)


def test_saved_model_flags_non_finite_rows(bad_rows, tmp_path):
    model = hydra()
    path = kh.export.saved_model(model, str(tmp_path / "1"))
    serve = tf.saved_model.load(path).signatures["serving_default"]
    result = serve(inputs=tf.constant(bad_rows))
    np.testing.assert_array_equal(result["predicted_class"].numpy()[[2, 5]], [-1, -1])
    assert np.all(np.isnan(result["epistemic_uncertainty"].numpy()[[2, 5]]))
    assert np.all(result["predicted_class"].numpy()[[0, 1, 3]] >= 0)


def test_sequential_body_serves_as_inputs(tmp_path):
    body = keras.Sequential([keras.layers.Dense(4)])
    model = kh.HydraModel(body, kh.heads.Categorical(CLASSES), 2)
    model.build((None, FEATURES))
    path = kh.export.saved_model(model, str(tmp_path / "1"))
    serve = tf.saved_model.load(path).signatures["serving_default"]
    assert list(serve.structured_input_signature[1]) == ["inputs"]


# Argument errors at the API boundary.

BAD_COUNTS = [2.7, 0, -1, True, float("nan"), "3", None]


@pytest.mark.parametrize("value", BAD_COUNTS, ids=repr)
def test_bad_head_count_for_the_model(value):
    with pytest.raises(
        ValueError, match=f"num_heads must be a positive integer, got {value!r}"
    ):
        kh.HydraModel(keras.layers.Dense(4), kh.heads.Categorical(CLASSES), value)


@pytest.mark.parametrize("value", BAD_COUNTS, ids=repr)
def test_bad_head_count_for_add_heads(value):
    model = hydra(num_heads=1)
    with pytest.raises(
        ValueError, match=f"num_heads must be a positive integer, got {value!r}"
    ):
        model.add_heads(value)
    assert model.num_heads == 1


def test_whole_float_head_count_is_accepted():
    model = hydra(num_heads=1)
    model.add_heads(4.0)
    assert model.num_heads == 4


@pytest.mark.parametrize("value", [float("nan"), -0.1, float("inf"), "0.1"], ids=repr)
def test_bad_noise(value):
    model = hydra(num_heads=1)
    with pytest.raises(
        ValueError, match=f"noise_stddev must be a finite number >= 0, got {value!r}"
    ):
        model.add_heads(4, noise_stddev=value)
    with pytest.raises(ValueError, match="noise_stddev must be a finite number"):
        kh.callbacks.AddHeads(4, at_epoch=1, noise_stddev=value)
    assert model.num_heads == 1


@pytest.mark.parametrize("value", [-1, 1.5, True], ids=repr)
def test_bad_at_epoch(value):
    with pytest.raises(
        ValueError, match=f"at_epoch must be an integer >= 0, got {value!r}"
    ):
        kh.callbacks.AddHeads(4, at_epoch=value)


def test_unreachable_at_epoch_fails_before_training(data):
    x, logits, _ = data
    model = hydra(num_heads=1)
    callback = kh.callbacks.AddHeads(MEMBERS, at_epoch=5)
    with pytest.raises(ValueError, match=r"at_epoch=5\) would never run.*epochs=2"):
        model.fit(x, logits, epochs=2, verbose=0, callbacks=[callback])
    assert int(model.optimizer.iterations) == 0 and model.num_heads == 1


@pytest.mark.parametrize(
    "x, y, message",
    [
        (
            np.zeros((0, FEATURES), "float32"),
            np.zeros((0, MEMBERS, CLASSES), "float32"),
            r"x holds no examples \(an array of shape \(0, 8\)\)",
        ),
        (
            tf.data.Dataset.from_tensor_slices(
                (
                    np.zeros((0, FEATURES), "float32"),
                    np.zeros((0, MEMBERS, CLASSES), "float32"),
                )
            ).batch(4),
            None,
            "x is an empty tf.data.Dataset",
        ),
    ],
    ids=["arrays", "dataset"],
)
def test_empty_data(x, y, message):
    with pytest.raises(ValueError, match=message):
        hydra().fit(x, y, verbose=0)


@pytest.mark.parametrize(
    "head, loss, shown",
    [
        (
            kh.heads.Distribution("Laplace"),
            kh.losses.DistributionKL("Normal"),
            r"DistributionKL\('Normal'\) does not match the model's "
            r"Distribution\('Laplace'\)",
        ),
        (
            kh.heads.Distribution("Normal"),
            kh.losses.DistributionNLL("Laplace"),
            r"DistributionNLL\('Laplace'\) does not match",
        ),
        (
            kh.heads.Distribution("Normal"),
            kh.losses.HydraKL(),
            r"HydraKL does not match the model's Distribution\('Normal'\)",
        ),
        (
            kh.heads.Categorical(CLASSES),
            kh.losses.DistributionKL("Normal"),
            r"DistributionKL\('Normal'\) does not match the model's Categorical head",
        ),
    ],
    ids=[
        "laplace-head-normal-kl",
        "normal-head-laplace-nll",
        "distribution-head-kl",
        "categorical-head-distribution-kl",
    ],
)
def test_head_and_loss_families_must_match(data, head, loss, shown):
    model = hydra(head, loss)
    x, _, _ = data
    targets = np.ones((N, MEMBERS, head.units), "float32")
    with pytest.raises(ValueError, match=shown):
        model.fit(x, targets, verbose=0)
    with pytest.raises(ValueError, match=shown):
        model.evaluate(x, targets, verbose=0)
    assert int(model.optimizer.iterations) == 0


def test_probabilities_given_as_logits(data):
    x, logits, _ = data
    model = hydra()
    with pytest.raises(ValueError, match="look like probabilities.*from_logits=False"):
        model.fit(x, probabilities(logits), verbose=0)
    assert int(model.optimizer.iterations) == 0


# data.uci.load


def uci_folder(
    root, data_txt=None, train="0\n1\n2", test="3", target="1", features="0"
):
    files = {
        "data.txt": data_txt or "1 2\n2 4\n3 6\n4 8",
        "index_features.txt": features,
        "index_target.txt": target,
        "n_splits.txt": "1",
        "index_train_0.txt": train,
        "index_test_0.txt": test,
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return str(root)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"data_txt": "1 2\n2 nan\n3 6\n4 8"},
            r"data.txt has non-finite values .* rows \[1\]",
        ),
        (
            {"data_txt": "1 2\n2 4\n3 6\ninf 8"},
            r"data.txt has non-finite values .* rows \[3\]",
        ),
        ({"train": ""}, r"index_train_0.txt lists no rows"),
        ({"test": ""}, r"index_test_0.txt lists no rows"),
        ({"test": "2\n3"}, r"share 1 rows, e.g. \[2\]"),
        ({"features": "0\n1"}, r"Column 1 is the target .* and also a feature"),
    ],
    ids=["nan", "inf", "empty-train", "empty-test", "overlap", "target-as-feature"],
)
def test_uci_load_refuses_bad_folders(tmp_path, changes, message):
    root = uci_folder(tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as error:
        kh.data.uci.load(root)
    assert os.fspath(tmp_path) in str(error.value)


def test_uci_load_ignores_non_finite_unused_rows(tmp_path):
    root = uci_folder(tmp_path, data_txt="1 2\n2 4\n3 6\n4 8\nnan 1")
    split = kh.data.uci.load(root)
    assert split.x_train.shape == (3, 1) and np.all(np.isfinite(split.x_train))


@pytest.mark.parametrize("tensor", ["x", "y"])
def test_conv_heads_bad_later_batch_stops_fit_with_weights_from_before(tensor):
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(64, 8, 8, 1)).astype("float32")
    targets = rng.normal(size=(64, 3, 4)).astype("float32")

    def conv_hydra():
        keras.utils.set_random_seed(0)
        body = keras.Sequential(
            [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu")]
        )
        head = kh.heads.Categorical(4, conv_filters=5)
        model = kh.HydraModel(body, head, num_heads=3)
        model.compile("adam", kh.losses.HydraKL())
        return model

    # The reference: the same model trained on the three good batches only.
    clean = conv_hydra()
    clean.fit(x[:48], targets[:48], batch_size=16, shuffle=False, verbose=0)
    bad_x, bad_targets = x.copy(), targets.copy()
    if tensor == "x":
        bad_x[50, 3, 3, 0] = np.nan
    else:
        bad_targets[50, 1, 2] = np.inf
    model = conv_hydra()
    data = tf.data.Dataset.from_tensor_slices((bad_x, bad_targets)).batch(16)
    name = "inputs x" if tensor == "x" else "targets y"
    with pytest.raises(ValueError, match=f"step 3 .*non-finite {name}"):
        model.fit(data, verbose=0)
    for got, want in zip(model.get_weights(), clean.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
