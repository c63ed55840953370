import keras
import numpy as np
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
