import keras
import numpy as np
import pytest

from keras_hydra.layers import HydraHeads


@pytest.mark.parametrize("hidden_units", [(), (8,), (8, 5)])
def test_equals_independent_dense_heads(hidden_units):
    num_heads, features = 3, np.random.default_rng(0).normal(size=(7, 4))
    heads = HydraHeads(num_heads, units=2, hidden_units=hidden_units)
    outputs = keras.ops.convert_to_numpy(heads(features.astype("float32")))
    assert outputs.shape == (7, num_heads, 2)
    for m in range(num_heads):
        dense = keras.Sequential(
            [keras.layers.Dense(u, activation="relu") for u in hidden_units]
            + [keras.layers.Dense(2)]
        )
        dense.build((None, 4))
        dense.set_weights([w.numpy()[m] for w in heads.weights])
        np.testing.assert_allclose(
            outputs[:, m], dense.predict(features, verbose=0), rtol=1e-5, atol=1e-6
        )


def test_heads_are_initialized_independently_with_per_head_fans():
    heads = HydraHeads(50, units=10)
    heads.build((None, 100))
    kernel = heads.kernels[0].numpy()
    assert not np.allclose(kernel[0], kernel[1])
    # Glorot uniform for a 100x10 kernel: limit sqrt(6 / 110).
    limit = np.sqrt(6 / 110)
    assert kernel.max() <= limit and kernel.max() > 0.9 * limit


def test_expand_copies_the_head():
    head = HydraHeads(1, units=3, hidden_units=(4,))
    features = np.random.default_rng(1).normal(size=(5, 6)).astype("float32")
    single = keras.ops.convert_to_numpy(head(features))
    expanded = head.expand(4)
    outputs = keras.ops.convert_to_numpy(expanded(features))
    assert expanded.num_heads == 4
    for m in range(4):
        np.testing.assert_allclose(outputs[:, m], single[:, 0], rtol=1e-6)

    noisy = head.expand(4, noise_stddev=0.1, seed=0)
    delta = noisy.kernels[0].numpy() - expanded.kernels[0].numpy()
    assert 0.07 < delta.std() < 0.13
    with pytest.raises(ValueError, match="already has 4 heads"):
        expanded.expand(8)


def test_rejects_unflattened_features():
    with pytest.raises(ValueError, match=r"received shape \(None, 4, 4\)"):
        HydraHeads(2, units=3).build((None, 4, 4))


def test_config_round_trip():
    heads = HydraHeads(3, units=2, hidden_units=(8,), activation="tanh", name="h")
    restored = HydraHeads.from_config(heads.get_config())
    assert restored.get_config() == heads.get_config()
