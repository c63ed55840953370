import keras
import numpy as np
import pytest

import keras_hydra as kh


def reference(kernel, strength):
    mean = kernel.mean(axis=0, keepdims=True)
    cos = (kernel * mean).sum(1) / (
        np.linalg.norm(kernel, axis=1) * np.linalg.norm(mean, axis=1)
    )
    return strength * np.mean((1 + cos) / 2)


def test_head_diversity_matches_numpy():
    kernel = np.random.default_rng(0).normal(size=(5, 7, 3)).astype("float32")
    value = kh.regularizers.HeadDiversity(0.3)(kernel)
    np.testing.assert_allclose(float(value), reference(kernel, 0.3), rtol=1e-5)


def test_head_diversity_round_trips_and_joins_the_loss():
    regularizer = kh.regularizers.HeadDiversity(0.25)
    restored = keras.regularizers.deserialize(keras.regularizers.serialize(regularizer))
    assert isinstance(restored, kh.regularizers.HeadDiversity)
    assert restored.strength == 0.25

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5)).astype("float32")
    targets = rng.normal(size=(32, 4, 3)).astype("float32")
    body = keras.Sequential([keras.layers.Dense(8)])
    model = kh.HydraModel(body, kh.heads.Categorical(3, hidden_units=(6,)))
    model.compile("adam", kh.losses.HydraKL())
    model.fit(x, targets, epochs=1, verbose=0)
    model.add_heads(4, noise_stddev=0.1, seed=0)
    for kernel in model.heads.kernels:
        kernel.regularizer = regularizer
    expected = [reference(k.numpy(), 0.25) for k in model.heads.kernels]
    np.testing.assert_allclose([float(v) for v in model.losses], expected, rtol=1e-5)
    # The training loss is the distillation loss plus the penalties.
    kl = float(model.compute_loss(x=x, y=targets, y_pred=model(x)))
    assert kl == pytest.approx(
        float(kh.losses.HydraKL()(targets, model(x))) + sum(expected), rel=1e-5
    )
