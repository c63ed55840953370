import keras
import numpy as np
import tensorflow as tf

import keras_hydra as kh

from conftest import mlp_body


def members(count=3, classes=4):
    return [
        keras.Sequential(
            [keras.layers.Dense(6, activation="relu"), keras.layers.Dense(classes)]
        )
        for _ in range(count)
    ]


def test_predict_stacks_member_outputs():
    teacher = members()
    x = np.random.default_rng(0).normal(size=(70, 5)).astype("float32")
    targets = kh.teacher.predict(teacher, x, batch_size=32)
    expected = np.stack([m.predict(x, verbose=0) for m in teacher], axis=1)
    assert targets.shape == (70, 3, 4) and targets.dtype == np.float32
    np.testing.assert_allclose(targets, expected, rtol=1e-5, atol=1e-6)
    half = kh.teacher.predict(
        teacher, tf.data.Dataset.from_tensor_slices(x).batch(8), dtype="float16"
    )
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, expected, rtol=1e-2, atol=1e-3)


def test_online_teacher_equals_cached_targets_and_stays_frozen(tmp_path):
    teacher = members()
    x = np.random.default_rng(1).normal(size=(64, 5)).astype("float32")
    targets = kh.teacher.predict(teacher, x)
    teacher_weights = [w.numpy() for m in teacher for w in m.weights]

    runs = []
    for online in [False, True]:
        keras.utils.set_random_seed(0)
        model = kh.HydraModel(
            mlp_body(8),
            kh.heads.Categorical(4),
            num_heads=3,
            teacher=teacher if online else None,
        )
        model.compile(optimizer="adam", loss=kh.losses.HydraKL(temperature=2.0))
        y = None if online else targets
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        runs.append((model, history.history["loss"]))
    (offline, offline_loss), (online, online_loss) = runs
    np.testing.assert_allclose(online_loss, offline_loss, rtol=1e-5)
    np.testing.assert_allclose(
        online.evaluate(x, verbose=0),
        offline.evaluate(x, targets, verbose=0),
        rtol=1e-5,
    )
    for before, after in zip(
        teacher_weights, [w for m in teacher for w in m.weights], strict=True
    ):
        np.testing.assert_array_equal(before, after.numpy())

    assert len(online.weights) == len(offline.weights)
    path = str(tmp_path / "online.keras")
    online.save(path)
    restored = keras.saving.load_model(path)
    assert restored.teacher is None and online.teacher is not None
    np.testing.assert_array_equal(
        restored.predict(x, verbose=0), online.predict(x, verbose=0)
    )


def test_online_teacher_outputs_are_checked():
    x = np.zeros((40, 5), "float32")
    model = kh.HydraModel(
        mlp_body(8), kh.heads.Categorical(3), teacher=members(classes=4)
    )
    model.compile(optimizer="adam", loss=kh.losses.HydraKL())
    try:
        model.fit(x, epochs=1, verbose=0)
    except ValueError as error:
        assert "have 4 classes" in str(error)
    else:
        raise AssertionError("expected a ValueError")


def test_ensemble_passes_training_to_its_members():
    x = np.ones((256, 5), "float32")
    dropout = keras.Sequential([keras.layers.Dropout(0.5, seed=0)])
    ensemble = kh.teacher.Ensemble([dropout])
    # Inference mode keeps the inputs; training mode drops about half of
    # them and scales the rest by 2.
    np.testing.assert_array_equal(ensemble(x, training=False)[:, 0], x)
    dropped = np.asarray(ensemble(x, training=True)[:, 0])
    assert set(np.unique(dropped)) == {0.0, 2.0}
    assert 0.4 < np.mean(dropped == 0.0) < 0.6
    # Trained through `Ensemble.fit`, a BatchNormalization member updates its
    # moving statistics (it would not in inference mode) towards the data's.
    keras.utils.set_random_seed(0)
    data = np.random.default_rng(0).normal(3.0, 2.0, (512, 5)).astype("float32")
    member = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.BatchNormalization(momentum=0.5),
            keras.layers.Dense(2),
        ]
    )
    trained = kh.teacher.Ensemble([member])
    trained.compile("sgd", "mse")
    trained.fit(
        data, np.zeros((512, 1, 2), "float32"), batch_size=64, epochs=2, verbose=0
    )
    moving_mean = np.asarray(member.layers[0].moving_mean)
    np.testing.assert_allclose(moving_mean, data.mean(axis=0), atol=0.5)
