import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import softmax

from keras_hydra.losses import HydraKL, members_per_head


def reference_kl(teacher, student, temperature, from_logits=True):
    """Per-example loss, written with explicit loops over heads and members."""
    batch, num_members, _ = teacher.shape
    num_heads = student.shape[1]
    group = num_members // num_heads
    if not from_logits:
        teacher = np.log(teacher)
    p = softmax(teacher / temperature, axis=-1)
    q = softmax(student / temperature, axis=-1)
    out = np.zeros(batch)
    for b in range(batch):
        for s in range(num_heads):
            target = p[b, s * group : (s + 1) * group].mean(axis=0)
            out[b] += np.sum(target * np.log(target / q[b, s])) / num_heads
    return out * temperature**2


@pytest.mark.parametrize("num_heads", [6, 1, 2, 3])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_numpy_reference(num_heads, temperature):
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(5, 6, 4)) * 3
    student = rng.normal(size=(5, num_heads, 4)) * 3
    loss = HydraKL(temperature=temperature, reduction=None)
    expected = reference_kl(teacher, student, temperature)
    np.testing.assert_allclose(loss(teacher, student), expected, rtol=1e-5)


@pytest.mark.parametrize("num_heads", [6, 1, 3])
def test_logit_matching_term(num_heads):
    rng = np.random.default_rng(2)
    teacher = rng.normal(size=(5, 6, 4)) * 3
    student = rng.normal(size=(5, num_heads, 4)) * 3
    # Head s's target logits: the log of its members' mean probabilities at
    # temperature 1, centred, like the head's own logits.
    group = 6 // num_heads
    mean = softmax(teacher, axis=-1).reshape(5, num_heads, group, 4).mean(axis=2)
    target = np.log(mean) - np.log(mean).mean(axis=-1, keepdims=True)
    logits = student - student.mean(axis=-1, keepdims=True)
    mse = ((logits - target) ** 2).mean(axis=(1, 2))
    loss = HydraKL(temperature=2.0, logit_weight=0.3, reduction=None)
    expected = reference_kl(teacher, student, 2.0) + 0.3 * mse
    np.testing.assert_allclose(loss(teacher, student), expected, rtol=1e-5)
    # Shifted logits give the same softmax and the same loss.
    np.testing.assert_allclose(
        loss(teacher + 5.0, student - 2.0), expected, rtol=1e-5, atol=1e-5
    )


def test_reduction_and_sample_weight():
    rng = np.random.default_rng(1)
    teacher, student = rng.normal(size=(4, 2, 3)), rng.normal(size=(4, 2, 3))
    weights = np.array([1.0, 0.0, 2.0, 0.5])
    per_example = reference_kl(teacher, student, 1.0)
    loss = HydraKL()
    np.testing.assert_allclose(loss(teacher, student), per_example.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        loss(teacher, student, sample_weight=weights),
        (per_example * weights).sum() / 4,
        rtol=1e-5,
    )


def test_single_head_is_hinton_kd_on_ensemble_mean():
    rng = np.random.default_rng(2)
    teacher, student = rng.normal(size=(8, 5, 3)), rng.normal(size=(8, 1, 3))
    mean_probs = softmax(teacher / 2.0, axis=-1).mean(axis=1)
    q = softmax(student[:, 0] / 2.0, axis=-1)
    expected = 4.0 * np.sum(mean_probs * np.log(mean_probs / q), axis=-1)
    np.testing.assert_allclose(
        HydraKL(temperature=2.0, reduction=None)(teacher, student),
        expected,
        rtol=1e-5,
        atol=1e-6,
    )


def test_probability_targets_equal_logit_targets():
    rng = np.random.default_rng(3)
    teacher, student = rng.normal(size=(6, 4, 5)), rng.normal(size=(6, 2, 5))
    probs = softmax(teacher, axis=-1)
    from_logits = HydraKL(temperature=3.0, reduction=None)(teacher, student)
    from_probs = HydraKL(temperature=3.0, from_logits=False, reduction=None)(
        probs, student
    )
    np.testing.assert_allclose(from_probs, from_logits, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        from_logits, reference_kl(probs, student, 3.0, from_logits=False), rtol=1e-4
    )


def test_unassignable_member_count_raises():
    with pytest.raises(ValueError, match="Cannot assign 5 teacher members to 2 heads"):
        HydraKL()(np.zeros((2, 5, 3)), np.zeros((2, 2, 3)))
    assert members_per_head(10, 5) == 2


def test_temperature_variable_is_read_by_a_compiled_function():
    rng = np.random.default_rng(4)
    teacher, student = rng.normal(size=(3, 2, 4)), rng.normal(size=(3, 2, 4))
    loss = HydraKL(temperature=1.0)
    compiled = tf.function(lambda t, s: loss(t, s))
    first = float(compiled(teacher, student))
    loss.temperature.assign(4.0)
    np.testing.assert_allclose(
        float(compiled(teacher, student)),
        reference_kl(teacher, student, 4.0).mean(),
        rtol=1e-5,
    )
    assert not np.isclose(first, float(compiled(teacher, student)))


def test_config_round_trip_and_bad_temperature():
    loss = HydraKL(temperature=3.0, from_logits=False, logit_weight=0.1, name="kd")
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, HydraKL)
    assert restored.get_config() == loss.get_config()
    assert float(restored.temperature.numpy()) == 3.0
    with pytest.raises(ValueError, match="temperature.*Received: 0"):
        HydraKL(temperature=0)
    with pytest.raises(ValueError, match="logit_weight.*Received: -1"):
        HydraKL(logit_weight=-1)
