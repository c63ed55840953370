import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import entropy
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss

import keras_hydra as kh
from keras_hydra import metrics

NUM_CLASSES = 4
ALL = [
    metrics.NegativeLogLikelihood,
    metrics.BrierScore,
    metrics.Accuracy,
    metrics.ExpectedCalibrationError,
    metrics.MutualInformation,
    metrics.HeadDisagreement,
    metrics.Fidelity,
]


def random_outputs(n=40, heads=3, members=6, seed=0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, heads, NUM_CLASSES)) * 2).astype("float32")
    targets = (rng.normal(size=(n, members, NUM_CLASSES)) * 2).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, size=n)
    return logits, targets, labels


def ece_reference(probs, labels, num_bins):
    confidence, predicted = probs.max(-1), probs.argmax(-1)
    edges = np.linspace(0, 1, num_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            gap = (predicted[in_bin] == labels[in_bin]).mean() - confidence[
                in_bin
            ].mean()
            ece += in_bin.mean() * abs(gap)
    return ece


def references(logits, labels, targets):
    """Numpy values of every metric, keyed by the metric class."""
    head_probs = softmax(logits.astype("float64"), axis=-1)
    probs = head_probs.mean(1)
    teacher = softmax(targets.astype("float64"), axis=-1).mean(1)
    consensus = probs.argmax(-1)
    all_classes = np.arange(NUM_CLASSES)
    return {
        metrics.NegativeLogLikelihood: log_loss(labels, probs, labels=all_classes),
        metrics.BrierScore: brier_score_loss(
            labels, probs, labels=all_classes, scale_by_half=False
        ),
        metrics.Accuracy: accuracy_score(labels, consensus),
        metrics.ExpectedCalibrationError: ece_reference(probs, labels, 15),
        metrics.MutualInformation: np.mean(
            entropy(probs, axis=-1) - entropy(head_probs, axis=-1).mean(1)
        ),
        metrics.HeadDisagreement: np.mean(logits.argmax(-1) != consensus[:, None]),
        metrics.Fidelity: np.mean(np.sum(teacher * np.log(teacher / probs), -1)),
    }


def y_true_for(cls, labels, targets):
    return targets if cls is metrics.Fidelity else labels


@pytest.mark.parametrize("label_shape", [(-1,), (-1, 1)])
def test_metrics_match_numpy_references(label_shape):
    logits, targets, labels = random_outputs()
    for cls, expected in references(logits, labels, targets).items():
        metric = cls()
        y_true = y_true_for(cls, labels.reshape(label_shape), targets)
        metric.update_state(y_true, logits)
        np.testing.assert_allclose(float(metric.result()), expected, rtol=1e-4)


def test_labels_from_teacher_targets_are_the_teacher_mean_argmax():
    logits, targets, _ = random_outputs()
    teacher_labels = softmax(targets, axis=-1).mean(1).argmax(-1)
    for cls in [
        metrics.NegativeLogLikelihood,
        metrics.BrierScore,
        metrics.Accuracy,
        metrics.ExpectedCalibrationError,
    ]:
        from_targets, from_labels = cls(), cls()
        from_targets.update_state(targets, logits)
        from_labels.update_state(teacher_labels, logits)
        np.testing.assert_allclose(
            float(from_targets.result()), float(from_labels.result()), rtol=1e-6
        )


def test_teacher_probabilities_with_from_logits_false():
    logits, targets, _ = random_outputs()
    probs = softmax(targets, axis=-1)
    for cls in [metrics.Accuracy, metrics.Fidelity]:
        from_logits, from_probs = cls(), cls(from_logits=False)
        from_logits.update_state(targets, logits)
        from_probs.update_state(probs, logits)
        np.testing.assert_allclose(
            float(from_probs.result()), float(from_logits.result()), rtol=1e-5
        )


def test_ece_hand_computed():
    # Confidences 0.9, 0.8 (bin (0.75, 1]) and 0.6, 0.55 (bin (0.5, 0.75]),
    # with num_bins=4. Top bin: accuracy 1/2, confidence 0.85; lower bin:
    # accuracy 1, confidence 0.575. ECE = 0.5 * 0.35 + 0.5 * 0.425.
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    labels = np.array([0, 0, 0, 1])
    metric = metrics.ExpectedCalibrationError(num_bins=4)
    metric.update_state(labels, np.log(probs)[:, None, :])
    assert float(metric.result()) == pytest.approx(0.3875, abs=1e-6)


def test_sample_weight():
    logits, targets, labels = random_outputs()
    weights = np.zeros(len(labels))
    weights[:10] = 2.0
    for cls, expected in references(logits[:10], labels[:10], targets[:10]).items():
        metric = cls()
        metric.update_state(y_true_for(cls, labels, targets), logits, weights)
        np.testing.assert_allclose(float(metric.result()), expected, rtol=1e-4)


def test_streaming_equals_one_update_and_reset_state():
    logits, targets, labels = random_outputs(n=50)
    for cls in ALL:
        y_true = y_true_for(cls, labels, targets)
        whole, streamed = cls(), cls()
        whole.update_state(y_true, logits)
        for chunk in np.array_split(np.arange(50), [7, 20, 41]):
            streamed.update_state(y_true[chunk], logits[chunk])
        np.testing.assert_allclose(
            float(streamed.result()), float(whole.result()), rtol=1e-5
        )
        streamed.reset_state()
        assert float(streamed.result()) == 0.0
        streamed.update_state(y_true[:5], logits[:5])
        whole.reset_state()
        whole.update_state(y_true[:5], logits[:5])
        assert float(streamed.result()) == pytest.approx(float(whole.result()))


def test_bad_label_shape_raises():
    logits, _, _ = random_outputs()
    with pytest.raises(ValueError, match=r"\[batch, 1\]"):
        metrics.Accuracy().update_state(np.zeros((40, 4)), logits)
    with pytest.raises(ValueError, match="teacher targets"):
        metrics.Fidelity().update_state(np.zeros(40), logits)


def test_config_round_trip():
    for metric in [
        metrics.ExpectedCalibrationError(num_bins=7, from_logits=False, name="e"),
        metrics.Fidelity(from_logits=False),
        metrics.HeadDisagreement(),
    ]:
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(metric)
        )
        assert type(restored) is type(metric)
        assert restored.get_config() == metric.get_config()


def test_compiled_metrics_in_evaluate_match_numpy_on_predict():
    logits, targets, _ = random_outputs(n=48, heads=3, members=6)
    x = np.random.default_rng(1).normal(size=(48, 5)).astype("float32")
    keras.utils.set_random_seed(0)
    hydra = kh.HydraModel(
        keras.Sequential([keras.layers.Dense(8, activation="relu")]),
        kh.heads.Categorical(NUM_CLASSES),
        num_heads=3,
    )
    hydra.compile(
        optimizer="adam",
        loss=kh.losses.HydraKL(),
        metrics=[cls() for cls in ALL],
    )
    results = hydra.evaluate(x, targets, batch_size=16, verbose=0, return_dict=True)
    outputs = hydra.predict(x, verbose=0)
    teacher_labels = softmax(targets, axis=-1).mean(1).argmax(-1)
    for cls, expected in references(outputs, teacher_labels, targets).items():
        name = cls().name
        np.testing.assert_allclose(results[name], expected, rtol=1e-4, err_msg=name)


MIRRORED = """
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
config = tf.config.LogicalDeviceConfiguration()
tf.config.set_logical_device_configuration(cpu, [config, config])
import keras
import keras_hydra as kh
from keras_hydra import metrics
rng = np.random.default_rng(0)
x = rng.normal(size=(48, 5)).astype("float32")
targets = (rng.normal(size=(48, 6, 4)) * 2).astype("float32")
names = sys.argv[1].split(",")
with tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]).scope():
    keras.utils.set_random_seed(0)
    hydra = kh.HydraModel(
        keras.Sequential([keras.layers.Dense(8, activation="relu")]),
        kh.heads.Categorical(4),
        num_heads=3,
    )
    compiled = [getattr(metrics, name)() for name in names]
    hydra.compile(loss=kh.losses.HydraKL(), metrics=compiled)
results = hydra.evaluate(x, targets, batch_size=16, verbose=0, return_dict=True)
np.save(sys.argv[2], hydra.predict(x, verbose=0))
print(json.dumps(results))
"""


def test_metrics_under_mirrored_strategy(tmp_path):
    """Two replicas sum the metric states: values match numpy on all data."""
    out = tmp_path / "outputs.npy"
    names = ",".join(cls.__name__ for cls in ALL)
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED, names, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    rng = np.random.default_rng(0)
    rng.normal(size=(48, 5))
    targets = (rng.normal(size=(48, 6, 4)) * 2).astype("float32")
    teacher_labels = softmax(targets, axis=-1).mean(1).argmax(-1)
    outputs = np.load(out)
    for cls, expected in references(outputs, teacher_labels, targets).items():
        name = cls().name
        np.testing.assert_allclose(results[name], expected, rtol=1e-4, err_msg=name)
