"""Streaming metrics of a classification Hydra's heads.

All metrics take the heads' logits `[batch, S, K]` as `y_pred`, so they can be
passed to `HydraModel.compile(metrics=[...])`. There, `y_true` is the teacher's
targets `[batch, M, K]`. Metrics that need labels (`ExpectedCalibrationError`,
`NegativeLogLikelihood`, `BrierScore`, `Accuracy`) accept either integer
labels `[batch]` or `[batch, 1]`, or teacher targets `[batch, M, K]`, in which
case the label is the class of highest mean teacher probability: they then
score the student against the ensemble's decisions, not the ground truth. To
score against true labels, call them directly (or in a custom loop) with the
labels and `model.predict` outputs.

State lives in metric variables updated with `assign_add`, so Keras sums it
across replicas under `tf.distribute`.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_hydra import uncertainty

_EPSILON = 1e-12


def _mean_log_probs(y_pred):
    """Log of the head-averaged probabilities of logits `[batch, S, K]`."""
    log_probs = ops.log_softmax(ops.cast(y_pred, "float32"), axis=-1)
    num_heads = ops.cast(ops.shape(log_probs)[1], "float32")
    return ops.logsumexp(log_probs, axis=1) - ops.log(num_heads)


def _teacher_log_probs(y_true, from_logits: bool):
    """Log of the teacher's mean probabilities of targets `[batch, M, K]`."""
    y_true = ops.cast(y_true, "float32")
    if from_logits:
        return _mean_log_probs(y_true)
    return ops.log(ops.maximum(ops.mean(y_true, axis=1), _EPSILON))


def _labels(y_true, from_logits: bool):
    """Integer labels `[batch]` from labels or from teacher targets."""
    y_true = ops.convert_to_tensor(y_true)
    shape = tuple(y_true.shape)
    if len(shape) == 3:
        return ops.argmax(_teacher_log_probs(y_true, from_logits), axis=-1)
    if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
        return ops.cast(ops.reshape(y_true, (-1,)), "int32")
    raise ValueError(
        "`y_true` must be integer labels [batch] or [batch, 1], or teacher "
        f"targets [batch, members, classes]. Received shape {shape}."
    )


def _weights(sample_weight, values):
    """Per-example weights `[batch]` (ones when `sample_weight` is `None`)."""
    if sample_weight is None:
        return ops.ones_like(values)
    sample_weight = ops.reshape(ops.cast(sample_weight, values.dtype), (-1,))
    return ops.broadcast_to(sample_weight, ops.shape(values))


class _ExampleMean(keras.metrics.Metric):
    """Weighted mean over examples of a per-example value `[batch]`."""

    def __init__(self, name: str, dtype=None, from_logits: bool = True):
        super().__init__(name=name, dtype=dtype)
        self.from_logits = from_logits
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def values(self, y_true, y_pred):
        """Per-example values `[batch]`."""
        raise NotImplementedError

    def update_state(self, y_true, y_pred, sample_weight=None):
        values = ops.cast(self.values(y_true, y_pred), self.dtype)
        weights = _weights(sample_weight, values)
        self.total.assign_add(ops.sum(values * weights))
        self.count.assign_add(ops.sum(weights))

    def result(self):
        return ops.divide_no_nan(self.total, self.count)

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="keras_hydra")
class NegativeLogLikelihood(_ExampleMean):
    """Mean negative log-likelihood of the head-averaged prediction.

    Args:
        from_logits: bool, whether teacher targets passed as `y_true` are
            logits (`y_pred` is always logits).
        name: name of the metric.
        dtype: dtype of the result.

    Example:

    >>> m = NegativeLogLikelihood()
    >>> m.update_state([0], np.array([[[0.0, 0.0], [0.0, 0.0]]]))
    >>> float(m.result())  # log 2
    0.693...
    """

    def __init__(self, from_logits: bool = True, name: str = "nll", dtype=None):
        super().__init__(name=name, dtype=dtype, from_logits=from_logits)

    def values(self, y_true, y_pred):
        labels = ops.expand_dims(_labels(y_true, self.from_logits), -1)
        log_probs = _mean_log_probs(y_pred)
        return -ops.squeeze(ops.take_along_axis(log_probs, labels, axis=-1), -1)


@keras.saving.register_keras_serializable(package="keras_hydra")
class BrierScore(_ExampleMean):
    """Multi-class Brier score of the head-averaged prediction.

    The per-example score is `sum_k (p_k - 1[k == label])^2`, between 0 and 2
    (sklearn's `brier_score_loss(..., scale_by_half=False)`).

    Args:
        from_logits: bool, whether teacher targets passed as `y_true` are
            logits (`y_pred` is always logits).
        name: name of the metric.
        dtype: dtype of the result.

    Example:

    >>> m = BrierScore()
    >>> m.update_state([0], np.array([[[0.0, 0.0]]]))
    >>> float(m.result())  # (0.5 - 1)^2 + 0.5^2
    0.5
    """

    def __init__(self, from_logits: bool = True, name: str = "brier", dtype=None):
        super().__init__(name=name, dtype=dtype, from_logits=from_logits)

    def values(self, y_true, y_pred):
        probs = ops.exp(_mean_log_probs(y_pred))
        labels = _labels(y_true, self.from_logits)
        one_hot = ops.one_hot(labels, ops.shape(probs)[-1], dtype=probs.dtype)
        return ops.sum(ops.square(probs - one_hot), axis=-1)


@keras.saving.register_keras_serializable(package="keras_hydra")
class Accuracy(_ExampleMean):
    """Accuracy of the head-averaged prediction.

    Args:
        from_logits: bool, whether teacher targets passed as `y_true` are
            logits (`y_pred` is always logits).
        name: name of the metric.
        dtype: dtype of the result.

    Example:

    >>> m = Accuracy()
    >>> m.update_state([0, 1], np.array([[[2.0, 0.0]], [[2.0, 0.0]]]))
    >>> float(m.result())
    0.5
    """

    def __init__(self, from_logits: bool = True, name: str = "accuracy", dtype=None):
        super().__init__(name=name, dtype=dtype, from_logits=from_logits)

    def values(self, y_true, y_pred):
        labels = _labels(y_true, self.from_logits)
        predicted = ops.argmax(_mean_log_probs(y_pred), axis=-1)
        return ops.cast(
            ops.equal(predicted, ops.cast(labels, predicted.dtype)), "float32"
        )


@keras.saving.register_keras_serializable(package="keras_hydra")
class MutualInformation(_ExampleMean):
    """Mean epistemic uncertainty of the heads, in nats.

    The mutual information `H[mean_s p_s] - mean_s H[p_s]` of
    `keras_hydra.uncertainty.categorical`; `y_true` is ignored.

    Args:
        name: name of the metric.
        dtype: dtype of the result.

    Example:

    >>> m = MutualInformation()
    >>> m.update_state(None, np.array([[[9.0, -9.0], [-9.0, 9.0]]]))
    >>> float(m.result())  # two confident heads that disagree
    0.693...
    """

    def __init__(self, name: str = "mutual_information", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def values(self, y_true, y_pred):
        return uncertainty.categorical(y_pred)["epistemic_uncertainty"]

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="keras_hydra")
class HeadDisagreement(_ExampleMean):
    """Fraction of heads whose top class differs from the consensus.

    The consensus is the top class of the head-averaged probabilities; the
    per-example fraction is averaged over examples. `y_true` is ignored.

    Args:
        name: name of the metric.
        dtype: dtype of the result.

    Example:

    >>> m = HeadDisagreement()
    >>> m.update_state(None, np.array([[[2.0, 0.0], [2.0, 0.0], [0.0, 1.0]]]))
    >>> round(float(m.result()), 4)
    0.3333
    """

    def __init__(self, name: str = "head_disagreement", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def values(self, y_true, y_pred):
        consensus = ops.argmax(_mean_log_probs(y_pred), axis=-1)
        votes = ops.argmax(y_pred, axis=-1)
        differs = ops.not_equal(votes, ops.expand_dims(consensus, -1))
        return ops.mean(ops.cast(differs, "float32"), axis=-1)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="keras_hydra")
class Fidelity(_ExampleMean):
    """Mean KL from the teacher's mean prediction to the student's, at T = 1.

    Per example, `KL(mean_m p_m || mean_s q_s)` in nats, with `p_m` the
    members' probabilities (`y_true`, teacher targets `[batch, M, K]`) and
    `q_s` the heads' (`y_pred`). Zero when the student's averaged prediction
    equals the ensemble's.

    Args:
        from_logits: bool, whether the teacher targets are logits (`y_pred` is
            always logits).
        name: name of the metric.
        dtype: dtype of the result.

    Raises:
        ValueError: in `update_state`, if `y_true` is not of rank 3.

    Example:

    >>> teacher = np.array([[[2.0, 0.0], [0.0, 2.0]]])
    >>> m = Fidelity()
    >>> m.update_state(teacher, teacher[:, ::-1])  # same average, other order
    >>> round(float(m.result()), 6)
    0.0
    """

    def __init__(self, from_logits: bool = True, name: str = "fidelity", dtype=None):
        super().__init__(name=name, dtype=dtype, from_logits=from_logits)

    def values(self, y_true, y_pred):
        y_true = ops.convert_to_tensor(y_true)
        if len(y_true.shape) != 3:
            raise ValueError(
                "Fidelity needs teacher targets [batch, members, classes] as "
                f"`y_true`. Received shape {tuple(y_true.shape)}."
            )
        log_p = _teacher_log_probs(y_true, self.from_logits)
        log_q = _mean_log_probs(y_pred)
        return ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)


@keras.saving.register_keras_serializable(package="keras_hydra")
class ExpectedCalibrationError(keras.metrics.Metric):
    """Expected calibration error of the head-averaged prediction.

    Examples are put in `num_bins` equal-width bins of confidence (the top
    head-averaged probability), bin `b` holding confidences in
    `(b / num_bins, (b + 1) / num_bins]`. The result is
    `sum_b (n_b / N) |accuracy_b - confidence_b|` (Guo et al., 2017).

    Args:
        num_bins: int, the number of confidence bins.
        from_logits: bool, whether teacher targets passed as `y_true` are
            logits (`y_pred` is always logits).
        name: name of the metric.
        dtype: dtype of the result.

    Example:

    >>> logits = np.log(np.array([[[0.9, 0.1]], [[0.6, 0.4]]]))
    >>> m = ExpectedCalibrationError(num_bins=10)
    >>> m.update_state([0, 1], logits)  # (|1 - 0.9| + |0 - 0.6|) / 2
    >>> round(float(m.result()), 4)
    0.35
    """

    def __init__(
        self,
        num_bins: int = 15,
        from_logits: bool = True,
        name: str = "ece",
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        if int(num_bins) < 1:
            raise ValueError(f"`num_bins` must be >= 1. Received: {num_bins}")
        self.num_bins = int(num_bins)
        self.from_logits = from_logits
        shape = (self.num_bins,)
        self.counts = self.add_variable(shape, initializer="zeros", name="counts")
        self.confidences = self.add_variable(
            shape, initializer="zeros", name="confidences"
        )
        self.correct = self.add_variable(shape, initializer="zeros", name="correct")

    def update_state(self, y_true, y_pred, sample_weight=None):
        log_probs = _mean_log_probs(y_pred)
        confidence = ops.cast(ops.exp(ops.max(log_probs, axis=-1)), self.dtype)
        predicted = ops.argmax(log_probs, axis=-1)
        labels = ops.cast(_labels(y_true, self.from_logits), predicted.dtype)
        correct = ops.cast(ops.equal(predicted, labels), self.dtype)
        weights = _weights(sample_weight, confidence)
        # Upper-inclusive bins: ceil(c * B) - 1.
        bins = ops.clip(ops.ceil(confidence * self.num_bins) - 1, 0, self.num_bins - 1)
        one_hot = ops.one_hot(ops.cast(bins, "int32"), self.num_bins, dtype=self.dtype)
        one_hot = one_hot * ops.expand_dims(weights, -1)
        self.counts.assign_add(ops.sum(one_hot, axis=0))
        self.confidences.assign_add(ops.matmul(confidence, one_hot))
        self.correct.assign_add(ops.matmul(correct, one_hot))

    def result(self):
        gaps = ops.sum(ops.abs(self.correct - self.confidences))
        return ops.divide_no_nan(gaps, ops.sum(self.counts))

    def get_config(self):
        return {
            **super().get_config(),
            "num_bins": self.num_bins,
            "from_logits": self.from_logits,
        }
