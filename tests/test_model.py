import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from scipy.special import log_softmax, softmax

import keras_hydra as kh

from conftest import NUM_MEMBERS, TEMPERATURE, mlp_body


def small_hydra(num_classes=3, num_heads=1, hidden_units=()):
    model = kh.HydraModel(
        mlp_body(8), kh.heads.Categorical(num_classes, hidden_units), num_heads
    )
    model.compile(optimizer="adam", loss=kh.losses.HydraKL(temperature=2.0))
    return model


def random_data(n=64, members=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, 5)).astype("float32"),
        rng.normal(size=(n, members, classes)).astype("float32"),
    )


def test_output_shape(distilled):
    outputs = distilled.hydra.predict(distilled.x[:10], verbose=0)
    assert outputs.shape == (10, NUM_MEMBERS, 6)


def test_add_heads_copies_the_head_then_training_separates_heads(distilled):
    for m in range(NUM_MEMBERS):
        np.testing.assert_allclose(
            distilled.expanded_outputs[:, m], distilled.phase1_outputs[:, 0], atol=1e-5
        )
    outputs = distilled.hydra.predict(distilled.x, verbose=0)
    spread = np.abs(outputs - outputs.mean(axis=1, keepdims=True)).mean()
    assert spread > 0.1
    losses = distilled.phase2_losses
    assert losses[-1] < 0.5 * losses[0]


def test_each_head_is_closest_to_its_own_member(distilled):
    heads = log_softmax(
        distilled.hydra.predict(distilled.x, verbose=0) / TEMPERATURE, -1
    )
    members = log_softmax(distilled.targets / TEMPERATURE, -1)
    # kl[m, s]: mean KL(member m || head s).
    kl = np.einsum(
        "nmk,nmsk->ms",
        np.exp(members),
        members[:, :, None, :] - heads[:, None, :, :],
    ) / len(distilled.x)
    own = np.argmin(kl, axis=0) == np.arange(NUM_MEMBERS)
    assert own.mean() >= 0.75, kl


def test_predict_uncertainty_matches_numpy(distilled):
    u = distilled.hydra.predict_uncertainty(distilled.x[:50])
    probs = softmax(distilled.hydra.predict(distilled.x[:50], verbose=0), axis=-1)
    np.testing.assert_allclose(u["probabilities"], probs.mean(1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(u["head_probabilities"], probs, rtol=1e-4, atol=1e-6)
    assert all(isinstance(v, np.ndarray) for v in u.values())


def test_keras_round_trip_before_and_after_add_heads(tmp_path):
    x, targets = random_data()
    model = small_hydra(hidden_units=(4,))
    model.fit(x, targets, epochs=1, verbose=0)
    for stage in ["one_head", "four_heads"]:
        path = str(tmp_path / f"{stage}.keras")
        model.save(path)
        restored = keras.saving.load_model(path)
        assert type(restored) is kh.HydraModel
        assert restored.num_heads == model.num_heads
        np.testing.assert_array_equal(
            restored.predict(x, verbose=0), model.predict(x, verbose=0)
        )
        for a, b in zip(
            restored.optimizer.variables, model.optimizer.variables, strict=True
        ):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert restored.loss.get_config() == model.loss.get_config()
        if stage == "one_head":
            model.add_heads(4)
            model.fit(x, targets, epochs=1, verbose=0)
    # The restored model trains on.
    restored.fit(x, targets, epochs=1, verbose=0)


def test_add_heads_carries_optimizer_state():
    x, targets = random_data()
    model = small_hydra(hidden_units=(4,))
    model.fit(x, targets, epochs=2, verbose=0)
    before = {v.path: v.numpy() for v in model.optimizer.variables}
    model.add_heads(4, noise_stddev=0.01, seed=0)
    after = model.optimizer.variables
    assert len(after) == len(before)
    for new, old in zip(after, before.values(), strict=True):
        if new.shape == old.shape:
            np.testing.assert_array_equal(new.numpy(), old)
        else:
            assert new.shape[0] == 4 and old.shape[0] == 1
            np.testing.assert_array_equal(new.numpy(), np.repeat(old, 4, axis=0))
    iterations = int(model.optimizer.iterations.numpy())
    history = model.fit(x, targets, epochs=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == iterations + 4
    assert np.all(np.isfinite(history.history["loss"]))


def test_add_heads_fresh_keeps_the_body_and_draws_new_heads():
    x, targets = random_data()
    model = small_hydra(hidden_units=(4,))
    model.fit(x, targets, epochs=2, verbose=0)
    body = [w.numpy() for w in model.body.weights]
    head = [k.numpy() for k in model.heads.kernels]
    slots = {v.path: v.numpy() for v in model.optimizer.variables}
    model.add_heads(4, copy_head=False)
    for new, old in zip(model.body.weights, body, strict=True):
        np.testing.assert_array_equal(new.numpy(), old)
    for kernel, old in zip(model.heads.kernels, head, strict=True):
        kernel = kernel.numpy()
        # Glorot-uniform draws, one per head, none of them the trained head.
        assert kernel.shape[0] == 4
        assert np.abs(kernel).max() <= np.sqrt(6 / sum(kernel.shape[1:]))
        assert not np.allclose(kernel[0], kernel[1])
        assert not np.allclose(kernel[0], old[0])
    for new, old in zip(model.optimizer.variables, slots.values(), strict=True):
        if new.shape == old.shape:
            np.testing.assert_array_equal(new.numpy(), old)
        else:
            assert not np.any(new.numpy())  # fresh heads, fresh state
    history = model.fit(x, targets, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_add_heads_fresh_refuses_noise():
    x, targets = random_data()
    model = small_hydra()
    model.fit(x, targets, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="noise_stddev=0.1"):
        model.add_heads(4, noise_stddev=0.1, copy_head=False)
    assert model.num_heads == 1


def test_add_heads_misuse():
    with pytest.raises(ValueError, match="never built"):
        small_hydra().add_heads(4)
    x, targets = random_data()
    model = small_hydra()
    model.fit(x, targets, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="num_heads must be a positive integer, got 0"):
        model.add_heads(0)
    model.add_heads(4)
    with pytest.raises(ValueError, match="already has 4 heads"):
        model.add_heads(8)


BAD_TARGETS = {
    "class count": (
        np.zeros((64, 4, 5), "float32"),
        "have 5 classes .* num_classes=3",
    ),
    "rank": (np.zeros((64, 3), "float32"), r"rank 3\). Received shape \((64|16), 3\)"),
    "nan": (
        np.where(np.arange(64 * 4 * 3).reshape(64, 4, 3) == 7, np.nan, 0.0),
        r"NaN or Inf \(first at index \(0, 2, 1\)",
    ),
    "member count": (np.zeros((64, 5, 3), "float32"), "Cannot assign 5 teacher"),
}


@pytest.mark.parametrize("case", sorted(BAD_TARGETS))
@pytest.mark.parametrize("as_dataset", [False, True])
def test_bad_targets_raise_before_training(case, as_dataset):
    targets, message = BAD_TARGETS[case]
    x, _ = random_data()
    model = small_hydra(num_heads=2)
    model.build((None, 5))
    weights = [w.numpy() for w in model.weights]
    data = {"x": x, "y": targets}
    if as_dataset:
        data = {"x": tf.data.Dataset.from_tensor_slices((x, targets)).batch(16)}
    with pytest.raises(ValueError, match=message):
        model.fit(**data, epochs=1, verbose=0)
    assert model.optimizer.iterations.numpy() == 0
    for before, after in zip(weights, model.weights, strict=True):
        np.testing.assert_array_equal(before, after.numpy())


def test_probabilities_must_sum_to_one():
    x, _ = random_data()
    probs = np.full((64, 4, 3), 1 / 3, "float32")
    model = kh.HydraModel(mlp_body(8), kh.heads.Categorical(3))
    model.compile(optimizer="adam", loss=kh.losses.HydraKL(from_logits=False))
    model.fit(x, probs, epochs=1, verbose=0)
    probs[3, 2] = [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"row \(3, 2\) .* sums to 1.5"):
        model.fit(x, probs, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="validation|sums to 1.5"):
        model.fit(x, np.full_like(probs, 1 / 3), validation_data=(x, probs), verbose=0)


def test_fit_on_tf_data_matches_numpy():
    x, targets = random_data(seed=3)
    results = []
    for as_dataset in [False, True]:
        keras.utils.set_random_seed(0)
        model = small_hydra(num_heads=4)
        if as_dataset:
            data = tf.data.Dataset.from_tensor_slices((x, targets)).batch(16)
            model.fit(data, epochs=2, verbose=0)
        else:
            model.fit(x, targets, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append(model.predict(x, verbose=0))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_fit_on_tfds_pipeline():
    with tfds.testing.mock_data(num_examples=96):
        images = tfds.load("mnist", split="train", as_supervised=True)
    images = images.map(
        lambda image, _: tf.reshape(tf.cast(image, "float32"), [-1]) / 255
    )
    members = [keras.Sequential([keras.layers.Dense(10)]) for _ in range(2)]
    targets = kh.teacher.predict(members, images.batch(32))
    assert targets.shape == (96, 2, 10)
    data = tf.data.Dataset.zip(images, tf.data.Dataset.from_tensor_slices(targets))
    model = kh.HydraModel(mlp_body(8), kh.heads.Categorical(10))
    model.compile(optimizer="adam", loss=kh.losses.HydraKL())
    history = model.fit(data.batch(32), epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    model.add_heads(2)
    model.fit(data.batch(32), epochs=1, verbose=0)
    assert model.evaluate(data.batch(32), verbose=0) > 0


def test_standard_callbacks(tmp_path):
    x, targets = random_data()
    model = small_hydra(num_heads=4)
    checkpoint = str(tmp_path / "best.keras")
    history = model.fit(
        x,
        targets,
        validation_data=(x, targets),
        epochs=30,
        verbose=0,
        callbacks=[
            keras.callbacks.ModelCheckpoint(checkpoint, save_best_only=True),
            keras.callbacks.EarlyStopping(patience=0, min_delta=10.0),
            keras.callbacks.TensorBoard(str(tmp_path / "logs")),
        ],
    )
    assert len(history.history["loss"]) == 2  # stopped by EarlyStopping
    restored = keras.saving.load_model(checkpoint)
    assert restored.num_heads == 4
    assert list((tmp_path / "logs" / "train").glob("events.out.tfevents.*"))


def mean_mi(logits):
    probs = softmax(logits.astype("float64"), axis=-1)
    mean = probs.mean(axis=1)
    entropy = -(mean * np.log(mean)).sum(-1)
    return (entropy + (probs * np.log(probs)).sum(-1).mean(-1)).mean()


def test_calibrate_spread_matches_the_teachers_mutual_information(distilled):
    hydra, x = distilled.hydra, distilled.x
    raw = hydra.predict(x, verbose=0)
    try:
        factor = hydra.calibrate_spread(x, distilled.targets)
        assert float(hydra.spread) == pytest.approx(factor)
        mean = raw.mean(axis=1, keepdims=True)
        expected = mean + factor * (raw - mean)
        outputs = hydra.predict(x, verbose=0)
        np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            mean_mi(outputs), mean_mi(distilled.targets), rtol=1e-4
        )
        assert abs(factor - 1) > 0.01
        # Training steps see the heads unscaled.
        np.testing.assert_allclose(hydra(x, training=True), raw, rtol=1e-5, atol=1e-5)
        # Calibrating again starts from the current spread and finds it.
        assert hydra.calibrate_spread(x, distilled.targets) == pytest.approx(factor)
    finally:
        hydra.spread.assign(1.0)


def test_calibrate_spread_reads_probability_targets():
    x, logits = random_data(seed=5)
    factors = []
    for from_logits, targets in [(True, logits), (False, softmax(logits, -1))]:
        keras.utils.set_random_seed(0)
        model = kh.HydraModel(mlp_body(8), kh.heads.Categorical(3), 4)
        model.compile(optimizer="adam", loss=kh.losses.HydraKL(from_logits=from_logits))
        model.fit(x, targets, epochs=2, verbose=0)
        factors.append(model.calibrate_spread(x, targets))
    assert factors[0] == pytest.approx(factors[1], rel=1e-4)


def test_calibrate_spread_errors_leave_the_spread():
    x, targets = random_data()
    with pytest.raises(ValueError, match="has one head: call add_heads"):
        small_hydra().calibrate_spread(x, targets)
    model = small_hydra(num_heads=4)
    model.fit(x, targets, epochs=1, verbose=0)
    model.spread.assign(1.3)
    nan = np.where(np.arange(targets.size).reshape(targets.shape) == 4, np.nan, targets)
    cases = {
        "pass them as `y`": (x, None),
        "pass them as `y` .* dataset": (
            tf.data.Dataset.from_tensor_slices(x).batch(8),
            None,
        ),
        r"shape \(32, 4, 3\) .* \(64, 4, 3\)": (x, targets[:32]),
        "have 5 classes": (x, np.zeros((64, 4, 5), "float32")),
        "Cannot assign 6 teacher members to 4 heads": (x, np.zeros((64, 6, 3))),
        r"NaN or Inf \(first at index \(0, 1, 1\)": (x, nan),
        # Members that agree everywhere leave no disagreement to match.
        "cannot match .* ranges from": (x, np.repeat(targets[:, :1], 4, axis=1)),
    }
    for message, (inputs, y) in cases.items():
        with pytest.raises(ValueError, match=message):
            model.calibrate_spread(inputs, y)
    assert float(model.spread) == pytest.approx(1.3)


def test_calibrate_spread_takes_a_dataset_in_any_order():
    x, targets = random_data(seed=2)
    model = small_hydra(num_heads=4)
    model.fit(x, targets, epochs=3, verbose=0)
    factor = model.calibrate_spread(x, targets)
    model.spread.assign(1.0)
    # Only the means are matched, so a shuffled dataset gives the same factor.
    data = tf.data.Dataset.from_tensor_slices((x, targets)).shuffle(64, seed=0)
    assert model.calibrate_spread(data.batch(16)) == pytest.approx(factor, rel=1e-5)


def test_calibrate_spread_with_fewer_heads_matches_the_whole_teacher():
    x, targets = random_data(seed=4)
    model = small_hydra(num_heads=2)  # 4 members: head s matches 2 of them
    model.fit(x, targets, epochs=3, verbose=0)
    model.calibrate_spread(x, targets)
    np.testing.assert_allclose(
        mean_mi(model.predict(x, verbose=0)), mean_mi(targets), rtol=1e-4
    )


def test_calibrated_spread_is_saved_and_loaded(tmp_path):
    x, targets = random_data()
    model = small_hydra(num_heads=4)
    model.fit(x, targets, epochs=2, verbose=0)
    factor = model.calibrate_spread(x, targets)
    assert abs(factor - 1) > 0.01  # else an unsaved spread would go unnoticed
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "hydra.keras")
    restored = keras.saving.load_model(tmp_path / "hydra.keras")
    assert float(restored.spread) == pytest.approx(factor)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), expected)
    model.save_weights(tmp_path / "hydra.weights.h5")
    fresh = kh.HydraModel(mlp_body(8), kh.heads.Categorical(3), 4)
    fresh.build((None, 5))
    fresh.load_weights(tmp_path / "hydra.weights.h5")
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), expected)


def test_weights_saved_before_the_spread_existed_still_load(tmp_path):
    x, targets = random_data()
    model = small_hydra(num_heads=4)
    model.fit(x, targets, epochs=1, verbose=0)
    path = tmp_path / "old.weights.h5"
    model.save_weights(path)
    with h5py.File(path, "r+") as f:
        del f["vars/0"]  # the layout before `spread`: no variables of its own
    restored = kh.HydraModel(mlp_body(8), kh.heads.Categorical(3), 4)
    restored.build((None, 5))
    restored.spread.assign(2.0)
    restored.load_weights(path)
    assert float(restored.spread) == 1.0
    np.testing.assert_array_equal(
        restored.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_calibrate_spread_runs_an_online_teacher():
    x, _ = random_data()
    members = [keras.Sequential([keras.layers.Dense(3)]) for _ in range(4)]
    targets = kh.teacher.predict(members, x)
    model = kh.HydraModel(mlp_body(8), kh.heads.Categorical(3), 4, teacher=members)
    model.compile(optimizer="adam", loss=kh.losses.HydraKL())
    model.fit(x, epochs=1, verbose=0)
    online = model.calibrate_spread(x)
    model.spread.assign(1.0)
    assert model.calibrate_spread(x, targets) == pytest.approx(online, rel=1e-6)
