import keras
import numpy as np
import pytest
from scipy.special import softmax

from keras_hydra import transfer


def linear_members(num_members=3, features=6, classes=4, seed=0, spread=1.0):
    """Linear softmax members: a shared kernel plus `spread` times their own."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(features, classes))
    members = []
    for _ in range(num_members):
        member = keras.Sequential([keras.layers.Dense(classes)])
        member.build((None, features))
        own = rng.normal(size=(features, classes))
        kernel = ((1 - spread) * shared + spread * own).astype("float32")
        member.set_weights([kernel, rng.normal(size=classes).astype("float32")])
        members.append(member)
    return members


def test_mixup_rows_mix_two_rows():
    x = np.eye(6, dtype="float32")
    mixed = transfer.mixup(x, seed=0)
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0, rtol=1e-6)
    assert np.all((mixed > 0).sum(axis=1) <= 2)


def test_cutmix_pastes_one_box_of_one_other_row():
    # Row i is the constant i + 1, so every pixel shows which row it came from.
    n, h, w = 40, 9, 7
    x = np.repeat(np.arange(1, n + 1, dtype="float32"), h * w).reshape(n, h * w)
    mixed = transfer.cutmix(x, image_shape=(h, w), seed=0, batch_size=16)
    assert mixed.shape == x.shape and mixed.dtype == np.float32
    boxes = 0
    for i, row in enumerate(mixed.reshape(n, h, w)):
        pasted = row != i + 1
        sources = np.unique(row[pasted])
        assert len(sources) <= 1
        if not len(sources):
            continue
        boxes += 1
        rows, cols = np.nonzero(pasted)
        # The pasted pixels fill their bounding box: a rectangle.
        area = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        assert pasted.sum() == area
    assert boxes > n // 2
    np.testing.assert_array_equal(
        transfer.cutmix(x, image_shape=(h, w), seed=0, batch_size=16), mixed
    )
    images = transfer.cutmix(x.reshape(n, h, w, 1), seed=0, batch_size=16)
    np.testing.assert_array_equal(images.reshape(n, -1), mixed)


def test_cutmix_rejects_rows_without_image_shape():
    with pytest.raises(ValueError, match=r"received shape \(4, 12\)"):
        transfer.cutmix(np.zeros((4, 12), "float32"))


def test_affine_zoom_out_shrinks_a_square_about_the_centre():
    # Zooming out by f scales the image by 1 / (1 + f) about its centre.
    x = np.ones((3, 28 * 28), "float32")
    shrunk = transfer.affine(
        x, image_shape=(28, 28), zoom=(1.0, 1.0), translation=0.0, rotation=0.0
    )
    box = np.zeros((28, 28), bool)
    box[7:21, 7:21] = True
    for image in shrunk.reshape(3, 28, 28):
        np.testing.assert_array_equal(image > 0.5, box)
        assert image.min() >= 0.0 and image.max() <= 1.0 + 1e-6


def test_affine_shifts_and_turns_rows_independently_and_reproducibly():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (50, 12, 12, 1)).astype("float32")
    still = transfer.affine(x, zoom=(0.0, 0.0), translation=0.0, rotation=0.0)
    np.testing.assert_allclose(still, x, atol=1e-5)
    moved = transfer.affine(x, seed=3, batch_size=16)
    assert moved.shape == x.shape and moved.dtype == np.float32
    # Each row keeps at most its own mass (a zoom-out only shrinks it), and
    # the rows move by different amounts.
    mass = x.sum(axis=(1, 2, 3))
    assert np.all(moved.sum(axis=(1, 2, 3)) <= mass * 1.01)
    assert np.ptp(moved.sum(axis=(1, 2, 3)) / mass) > 0.1
    np.testing.assert_array_equal(transfer.affine(x, seed=3, batch_size=16), moved)
    flat = transfer.affine(
        x.reshape(50, 144), image_shape=(12, 12), seed=3, batch_size=16
    )
    np.testing.assert_array_equal(flat.reshape(moved.shape), moved)


def test_affine_rejects_rows_without_image_shape():
    with pytest.raises(ValueError, match=r"affine expects images .* \(4, 12\)"):
        transfer.affine(np.zeros((4, 12), "float32"))


def test_diversified_matches_numpy_gradient_step():
    members = linear_members()
    x = np.random.default_rng(1).uniform(size=(10, 6)).astype("float32")
    moved = transfer.diversified(members, x, step_size=0.05, seed=3)

    # The same draws as `diversified` (one batch): member, then weights.
    rng = np.random.default_rng(3)
    member = rng.integers(0, 3, 10)
    weights = rng.uniform(-1.0, 1.0, (10, 4))
    expected = np.empty_like(x)
    for i in range(10):
        kernel, bias = (w.astype("float64") for w in members[member[i]].get_weights())
        p = softmax(x[i] @ kernel + bias)
        # d(w . p)/dx = W (p * (w - w . p)) for p = softmax(x W + b).
        grad = kernel @ (p * (weights[i] - weights[i] @ p))
        expected[i] = x[i] + 0.05 * np.sign(grad)
    np.testing.assert_allclose(moved, expected, atol=1e-6)


def test_diversified_ascends_the_chosen_score_and_stays_in_range():
    members = linear_members(num_members=5, seed=2)
    x = np.random.default_rng(4).uniform(size=(200, 6)).astype("float32")
    moved = transfer.diversified(
        members, x, step_size=0.01, clip=(0.0, 1.0), batch_size=64, seed=0
    )
    assert moved.shape == x.shape and moved.dtype == np.float32
    assert moved.min() >= 0.0 and moved.max() <= 1.0
    # Batches of 64 draw their members and weights one batch after the other.
    rng = np.random.default_rng(0)
    gains = []
    for start in range(0, 200, 64):
        rows = slice(start, start + 64)
        member = rng.integers(0, 5, len(x[rows]))
        weights = rng.uniform(-1.0, 1.0, (len(x[rows]), 4))
        for i, m, w in zip(range(start, 200), member, weights, strict=False):
            kernel, bias = members[m].get_weights()
            before = softmax(x[i] @ kernel + bias) @ w
            gains.append(softmax(moved[i] @ kernel + bias) @ w - before)
    # A small signed-gradient step raises each row's score w . p_m.
    assert np.mean(np.array(gains) > 0) > 0.95


def test_augmented_applies_the_layer_batch_by_batch():
    x = np.random.default_rng(0).uniform(0, 1, (40, 36)).astype("float32")
    doubled = transfer.augmented(
        x, keras.layers.Rescaling(2.0), image_shape=(6, 6), batch_size=16
    )
    np.testing.assert_allclose(doubled, 2.0 * x, rtol=1e-6)
    # A random layer draws anew per batch, in row order: the same as calling
    # it on consecutive slices.
    images = x.reshape(40, 6, 6, 1)
    layer = keras.layers.RandomBrightness(0.5, value_range=(0, 1), seed=3)
    expected = np.concatenate(
        [np.asarray(layer(images[i : i + 16], training=True)) for i in (0, 16, 32)]
    )
    layer = keras.layers.RandomBrightness(0.5, value_range=(0, 1), seed=3)
    moved = transfer.augmented(images, layer, batch_size=16)
    np.testing.assert_array_equal(moved, expected)
    with pytest.raises(ValueError, match=r"augmented expects images"):
        transfer.augmented(x, layer)
