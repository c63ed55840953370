import keras
import numpy as np
import pytest

import keras_hydra as kh
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


@pytest.mark.parametrize("hidden_units", [(), (6,)])
def test_conv_heads_equal_independent_conv_heads(hidden_units):
    num_heads, filters = 3, 4
    rng = np.random.default_rng(2)
    features = rng.normal(size=(5, 6, 7, 3)).astype("float32")
    heads = HydraHeads(
        num_heads,
        units=2,
        hidden_units=hidden_units,
        conv_filters=filters,
        bias_initializer="random_normal",
    )
    outputs = keras.ops.convert_to_numpy(heads(features))
    assert outputs.shape == (5, num_heads, 2)
    assert heads.conv_kernel.shape == (num_heads, 3, 3, 3, filters)
    for m in range(num_heads):
        head = keras.Sequential(
            [
                keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
                keras.layers.GlobalAveragePooling2D(),
                *[keras.layers.Dense(u, activation="relu") for u in hidden_units],
                keras.layers.Dense(2),
            ]
        )
        head.build((None, 6, 7, 3))
        head.set_weights([w.numpy()[m] for w in heads.weights])
        np.testing.assert_allclose(
            outputs[:, m], head.predict(features, verbose=0), rtol=1e-5, atol=1e-5
        )


def test_expand_copies_a_conv_head():
    head = HydraHeads(1, units=3, conv_filters=4, hidden_units=(5,))
    features = np.random.default_rng(3).normal(size=(2, 4, 4, 6)).astype("float32")
    single = keras.ops.convert_to_numpy(head(features))
    expanded = head.expand(3)
    assert expanded.conv_kernel.shape == (3, 3, 3, 6, 4)
    outputs = keras.ops.convert_to_numpy(expanded(features))
    for m in range(3):
        np.testing.assert_allclose(outputs[:, m], single[:, 0], rtol=1e-6)
    fresh = head.expand(3, copy=False)
    assert fresh.conv_kernel.shape == (3, 3, 3, 6, 4)
    assert not np.allclose(fresh.conv_kernel.numpy()[0], fresh.conv_kernel.numpy()[1])


def test_conv_heads_reject_flat_features_and_bad_filters():
    with pytest.raises(ValueError, match=r"feature map .* received shape \(None, 8\)"):
        HydraHeads(2, units=3, conv_filters=4).build((None, 8))
    with pytest.raises(ValueError, match="or give the heads conv_filters"):
        HydraHeads(2, units=3).build((None, 4, 4, 2))
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(ValueError, match=f"conv_filters must be .*got {bad!r}"):
            HydraHeads(2, units=3, conv_filters=bad)


def test_conv_config_round_trip():
    heads = HydraHeads(3, units=2, conv_filters=8, conv_kernel_size=5, name="h")
    restored = HydraHeads.from_config(heads.get_config())
    assert restored.get_config() == heads.get_config()
    assert (restored.conv_filters, restored.conv_kernel_size) == (8, 5)


@pytest.mark.parametrize("family", ["Categorical", "Distribution"])
def test_head_families_pass_conv_filters_to_their_layer(family):
    head = kh.heads.Categorical(3, conv_filters=4)
    if family == "Distribution":
        head = kh.heads.Distribution("Normal", conv_filters=4)
    restored = type(head).from_config(head.get_config())
    assert restored.get_config() == head.get_config()
    layer = restored.layer(num_heads=2)
    assert layer.conv_filters == 4
    assert tuple(layer(np.zeros((1, 5, 5, 2), "float32")).shape) == (1, 2, head.units)
    with pytest.raises(ValueError, match="conv_filters must be .*got -2"):
        type(head).from_config({**head.get_config(), "conv_filters": -2})
