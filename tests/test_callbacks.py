import keras
import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import entropy, spearmanr

import keras_hydra as kh
from keras_hydra import callbacks, metrics

NUM_MEMBERS = 4


def random_data(n=64, members=NUM_MEMBERS, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype("float32")
    # Members that disagree, as functions of x, so that heads can learn them.
    w = rng.normal(size=(members, 5, classes)) * 2
    return x, np.einsum("nd,mdk->nmk", x, w).astype("float32")


def small_hydra(num_heads=1, optimizer="adam", loss=None, metrics_=()):
    keras.utils.set_random_seed(0)
    model = kh.HydraModel(
        keras.Sequential([keras.layers.Dense(16, activation="relu")]),
        kh.heads.Categorical(3),
        num_heads,
    )
    model.compile(
        optimizer=optimizer,
        loss=loss or kh.losses.HydraKL(temperature=2.0),
        metrics=list(metrics_),
    )
    return model


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.heads, self.iterations = [], []

    def on_epoch_end(self, epoch, logs=None):
        self.heads.append(self.model.num_heads)
        self.iterations.append(int(self.model.optimizer.iterations))


def test_add_heads_mid_fit_keeps_training():
    x, targets = random_data()
    model = small_hydra(
        optimizer=keras.optimizers.Adam(0.01), metrics_=[metrics.HeadDisagreement()]
    )
    recorder = Recorder()
    history = model.fit(
        x,
        targets,
        epochs=12,
        batch_size=16,
        validation_data=(x, targets),
        verbose=0,
        callbacks=[callbacks.AddHeads(NUM_MEMBERS, at_epoch=4), recorder],
    )
    assert recorder.heads == [1] * 4 + [NUM_MEMBERS] * 8
    assert recorder.iterations == [4 * (e + 1) for e in range(12)]
    losses = history.history["loss"]
    assert np.all(np.diff(losses[4:]) < 0)
    assert losses[-1] < 0.7 * losses[4]
    # One head never disagrees with itself; trained heads do.
    assert history.history["head_disagreement"][:4] == [0.0] * 4
    outputs = model.predict(x, verbose=0)
    assert outputs.shape == (64, NUM_MEMBERS, 3)
    assert np.abs(outputs - outputs.mean(1, keepdims=True)).mean() > 0.1
    # Validation ran with the new heads.
    final = model.evaluate(x, targets, verbose=0, return_dict=True)
    assert history.history["val_loss"][-1] == pytest.approx(final["loss"], rel=1e-5)


def test_add_heads_leaves_an_expanded_model_alone():
    x, targets = random_data()
    model = small_hydra(num_heads=NUM_MEMBERS)
    heads = model.heads
    model.fit(
        x, targets, epochs=2, verbose=0, callbacks=[callbacks.AddHeads(NUM_MEMBERS, 0)]
    )
    assert model.heads is heads
    assert model.num_heads == NUM_MEMBERS


def test_temperature_schedule_sets_the_temperature_the_loss_uses():
    x, targets = random_data()
    temperatures = [1.0, 3.0, 0.5]
    model = small_hydra(optimizer=keras.optimizers.SGD(learning_rate=0.0))
    history = model.fit(
        x,
        targets,
        epochs=3,
        batch_size=16,
        verbose=0,
        callbacks=[callbacks.TemperatureSchedule(lambda e: temperatures[e])],
    )
    assert history.history["temperature"] == temperatures
    outputs = model.predict(x, verbose=0)
    for temperature, loss in zip(temperatures, history.history["loss"], strict=True):
        expected = kh.losses.HydraKL(temperature)(targets, outputs)
        assert loss == pytest.approx(float(expected), rel=1e-5)


def test_temperature_schedule_errors():
    x, targets = random_data()
    schedule = callbacks.TemperatureSchedule(lambda e: 0.0)
    with pytest.raises(ValueError, match="schedule"):
        small_hydra().fit(x, targets, epochs=1, verbose=0, callbacks=[schedule])
    model = small_hydra(loss=keras.losses.MeanSquaredError())
    with pytest.raises(ValueError, match="temperature"):
        model.fit(x, targets[:, :1], epochs=1, verbose=0, callbacks=[schedule])


def fidelity_reference(outputs, targets):
    p, q = softmax(targets, axis=-1), softmax(outputs, axis=-1)
    own_kl = np.sum(p * np.log(p / q), axis=-1).mean()
    mi = entropy(q.mean(1), axis=-1) - entropy(q, axis=-1).mean(1)
    teacher_mi = entropy(p.mean(1), axis=-1) - entropy(p, axis=-1).mean(1)
    consensus = q.mean(1).argmax(-1)
    return {
        "fidelity_own_kl": own_kl,
        "fidelity_mi_spearman": spearmanr(mi, teacher_mi).statistic,
        "fidelity_disagreement": np.mean(outputs.argmax(-1) != consensus[:, None]),
    }


def test_fidelity_monitor_matches_numpy():
    x, targets = random_data()
    model = small_hydra(num_heads=NUM_MEMBERS)
    monitor = callbacks.FidelityMonitor(x[:40], targets[:40], batch_size=16)
    history = model.fit(x, targets, epochs=3, verbose=0, callbacks=[monitor])
    expected = fidelity_reference(model.predict(x[:40], verbose=0), targets[:40])
    for name, value in expected.items():
        assert len(history.history[name]) == 3
        assert history.history[name][-1] == pytest.approx(value, rel=1e-4, abs=1e-6)


def test_fidelity_monitor_with_one_head():
    x, targets = random_data()
    model = small_hydra()
    model.fit(x, targets, epochs=1, verbose=0)
    monitor = callbacks.FidelityMonitor(x, targets)
    monitor.set_model(model)
    values = monitor.compute()
    p = softmax(targets, axis=-1).mean(1)
    q = softmax(model.predict(x, verbose=0)[:, 0], axis=-1)
    assert values["fidelity_own_kl"] == pytest.approx(
        np.sum(p * np.log(p / q), -1).mean(), rel=1e-4
    )
    assert np.isnan(values["fidelity_mi_spearman"])
    assert values["fidelity_disagreement"] == 0.0


def test_callback_configs():
    schedule = callbacks.TemperatureSchedule(
        keras.optimizers.schedules.ExponentialDecay(4.0, 1, 0.5)
    )
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(schedule)
    )
    assert float(restored.schedule(2)) == pytest.approx(1.0)
    add = callbacks.AddHeads(4, at_epoch=3, noise_stddev=0.01, seed=2, copy_head=False)
    assert callbacks.AddHeads(**add.get_config()).get_config() == add.get_config()
    x, targets = random_data(n=8)
    monitor = callbacks.FidelityMonitor(x, targets, batch_size=4)
    restored = callbacks.FidelityMonitor(**monitor.get_config())
    np.testing.assert_array_equal(restored.targets, targets)
    assert restored.batch_size == 4
    with pytest.raises(ValueError, match=r"\(8, 3\)"):
        callbacks.FidelityMonitor(x, targets[:, 0])
