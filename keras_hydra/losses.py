"""Distillation losses: categorical KL, distribution KL, and member NLL."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_hydra import distributions

tfd = distributions.tfd

_EPSILON = 1e-12


def members_per_head(num_members: int, num_heads: int) -> int:
    """How many teacher members each of `num_heads` heads matches.

    The rule: with `M` members and `S` heads, `S` must divide `M`, and head
    `s` matches the average of the contiguous members
    `s * M // S, ..., (s + 1) * M // S - 1`. So `S == M` pairs head `m` with
    member `m`, and `S == 1` matches the whole ensemble's mean.

    Args:
        num_members: int, `M`.
        num_heads: int, `S`.

    Returns:
        `M // S`.

    Raises:
        ValueError: if `S` does not divide `M`.

    Example:

    >>> members_per_head(10, 5)
    2
    """
    if num_heads < 1 or num_members < 1 or num_members % num_heads:
        raise ValueError(
            f"Cannot assign {num_members} teacher members to {num_heads} heads: "
            "the number of heads must divide the number of members (head s "
            "matches members s*M/S to (s+1)*M/S - 1)."
        )
    return num_members // num_heads


@keras.saving.register_keras_serializable(package="keras_hydra")
class HydraKL(keras.losses.Loss):
    """Hydra distillation loss: each head matches its teacher member(s).

    `y_true` holds the teacher members' outputs `[batch, M, K]` and `y_pred`
    the student's heads `[batch, S, K]`. With tempered distributions
    `p_m = softmax(t_m / T)` and `q_s = softmax(z_s / T)`, the per-example loss
    is `T^2 * mean_s KL(pbar_s || q_s)`, where `pbar_s` is the mean of the
    members assigned to head `s` (see `members_per_head`). Hence:

    - `S == M`: Hydra, head `m` mimics member `m`.
    - `S == 1`: Hinton knowledge distillation on the ensemble's mean (the
      phase-1 "Hinton head" and the plain KD student).

    The same loss serves both phases: the shapes say which case applies.

    With `logit_weight = w > 0` the loss adds logit matching (Ba & Caruana,
    2014): `w * mean_s mean_k (z_sk - l_sk)^2`, where `z_s` are head `s`'s
    logits and `l_s = log pbar_s` at temperature 1, both centred on their
    mean over classes (softmax ignores a shift). For `S == M`, `l_m` is member
    `m`'s centred logits.

    Args:
        temperature: float > 0, the softmax temperature `T`. Stored in a
            non-trainable `keras.Variable` (`loss.temperature`) so that a
            callback can `assign` it during `fit`.
        from_logits: bool, whether `y_true` holds logits (`True`) or
            probabilities. `y_pred` is always logits.
        logit_weight: float >= 0, the weight `w` of the logit-matching term.
        reduction: Keras loss reduction over the batch.
        name: name of the loss.

    Example:

    >>> loss = HydraKL(temperature=2.0)
    >>> teacher = np.array([[[2.0, 0.0], [0.0, 2.0]]])
    >>> round(float(loss(teacher, teacher)), 6)  # heads equal their members
    0.0
    """

    def __init__(
        self,
        temperature: float = 1.0,
        from_logits: bool = True,
        logit_weight: float = 0.0,
        reduction: str = "sum_over_batch_size",
        name: str = "hydra_kl",
        **kwargs,
    ):
        super().__init__(name=name, reduction=reduction, **kwargs)
        if not float(temperature) > 0:
            raise ValueError(f"`temperature` must be > 0. Received: {temperature}")
        if not float(logit_weight) >= 0:
            raise ValueError(f"`logit_weight` must be >= 0. Received: {logit_weight}")
        self.from_logits = from_logits
        self.logit_weight = float(logit_weight)
        self.temperature = keras.Variable(
            float(temperature), trainable=False, dtype="float32", name="temperature"
        )

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        temperature = ops.cast(self.temperature, "float32")
        _, num_heads, num_classes = y_pred.shape
        group = members_per_head(y_true.shape[1], num_heads)

        if not self.from_logits:
            y_true = ops.log(ops.maximum(y_true, _EPSILON))

        def log_mean(scaled):
            log_p = ops.log_softmax(scaled, axis=-1)
            if group == 1:
                return log_p
            # Mean of each head's group of members, in log space.
            log_p = ops.reshape(log_p, (-1, num_heads, group, num_classes))
            return ops.logsumexp(log_p, axis=2) - np.log(group).astype("float32")

        log_p = log_mean(y_true / temperature)
        log_q = ops.log_softmax(y_pred / temperature, axis=-1)
        kl = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
        loss = ops.mean(kl, axis=-1) * temperature**2
        if self.logit_weight:
            target = log_mean(y_true)
            target = target - ops.mean(target, axis=-1, keepdims=True)
            logits = y_pred - ops.mean(y_pred, axis=-1, keepdims=True)
            loss += self.logit_weight * ops.mean(
                ops.square(logits - target), axis=(-2, -1)
            )
        return loss

    def validate_targets(self, targets: np.ndarray, num_heads: int) -> None:
        """Raises a `ValueError` if `targets` do not suit this loss.

        Args:
            targets: array `[batch, M, K]` of teacher outputs.
            num_heads: int, the student's head count `S`.
        """
        members_per_head(targets.shape[1], num_heads)
        sums = targets.astype("float64").sum(axis=-1)
        if self.from_logits:
            if (
                targets.size
                and np.all((targets >= 0) & (targets <= 1))
                and np.allclose(sums, 1.0, atol=1e-3)
            ):
                raise ValueError(
                    "The loss has from_logits=True, but the targets look like "
                    "probabilities (every value in [0, 1], every row summing to "
                    "1). Pass HydraKL(from_logits=False), or give logits."
                )
            return
        if np.any(targets < 0):
            raise ValueError(
                "With from_logits=False the targets must be probabilities, but "
                f"some are negative (min {float(targets.min()):g})."
            )
        worst = np.unravel_index(np.argmax(np.abs(sums - 1.0)), sums.shape)
        if abs(sums[worst] - 1.0) > 1e-3:
            raise ValueError(
                "With from_logits=False each target row must sum to 1, but row "
                f"{tuple(int(i) for i in worst)} (example, member) sums to "
                f"{float(sums[worst]):.6g}. Pass logits with from_logits=True."
            )

    def invalid_targets(self, targets):
        """Scalar bool: some probability row is negative or does not sum to 1.

        The in-graph check `keras_hydra.guard` runs on every training batch;
        with `from_logits=True` any finite logits are valid.
        """
        if self.from_logits:
            return ops.convert_to_tensor(False)
        # float16 targets (`teacher.predict(..., dtype="float16")`) round
        # each probability by up to 5e-4.
        tolerance = 1e-3 if targets.dtype in ("float32", "float64") else 1e-2
        targets = ops.cast(targets, "float32")
        off = ops.abs(ops.sum(targets, axis=-1) - 1.0) > tolerance
        return ops.logical_or(ops.any(targets < 0), ops.any(off))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "temperature": float(ops.convert_to_numpy(self.temperature)),
                "from_logits": self.from_logits,
                "logit_weight": self.logit_weight,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_hydra")
class DistributionKL(keras.losses.Loss):
    """Regression distillation loss: `mean_s KL(teacher_s || head_s)`.

    `y_true` holds the members' parameters `[batch, M, P * E]` and `y_pred`
    the heads' `[batch, S, P * E]`, both in the layout of
    `keras_hydra.heads.Distribution`. Members are assigned to heads as in
    `members_per_head`; `teacher_s` is the uniform mixture of head `s`'s
    members (a single member when `S == M`).

    - One member per head: `tfd.kl_divergence` where TFP has the analytic KL
      (Normal, Laplace, LogNormal, ...), otherwise a Monte-Carlo estimate
      with `num_samples` draws from the member.
    - Several members per head (`S == 1` is KD on the ensemble's mixture):
      for Normal heads the mixture is moment matched, which changes the loss
      only by a constant (the student's expected log density under the
      mixture depends on its first two moments alone), so gradients are
      exact; other families use the Monte-Carlo estimate from the mixture.

    Args:
        family: a `tfp.distributions` class or its name.
        num_samples: int, draws per example for Monte-Carlo estimates.
        reduction: Keras loss reduction over the batch.
        name: name of the loss.

    Example:

    >>> loss = DistributionKL("Normal", reduction=None)
    >>> members = np.array([[[0.0, 1.0]]])  # loc, scale
    >>> heads = np.array([[[1.0, 1.0]]])
    >>> float(loss(members, heads)[0])  # KL(N(0, 1) || N(1, 1)) = 1/2
    0.5
    """

    def __init__(
        self,
        family="Normal",
        num_samples: int = 64,
        reduction: str = "sum_over_batch_size",
        name: str = "distribution_kl",
        **kwargs,
    ):
        super().__init__(name=name, reduction=reduction, **kwargs)
        self.family = distributions.resolve(family)
        if int(num_samples) < 1:
            raise ValueError(f"`num_samples` must be >= 1. Received: {num_samples}")
        self.num_samples = int(num_samples)

    def call(self, y_true, y_pred):
        y_true = tf.cast(y_true, tf.float32)
        num_heads, width = y_pred.shape[1], y_pred.shape[2]
        group = members_per_head(y_true.shape[1], num_heads)
        student = distributions.make(y_pred, self.family)
        if group == 1:
            teacher = distributions.make(y_true, self.family)
        elif self.family is tfd.Normal:
            teacher = distributions.make(_moment_match(y_true, num_heads), tfd.Normal)
        else:
            grouped = tf.reshape(y_true, (-1, num_heads, group, width))
            teacher = distributions.mixture(grouped, self.family)
        try:
            kl = tfd.kl_divergence(teacher, student)
        except NotImplementedError:
            samples = tf.stop_gradient(teacher.sample(self.num_samples))
            kl = tf.reduce_mean(
                teacher.log_prob(samples) - student.log_prob(samples), axis=0
            )
        return tf.reduce_mean(kl, axis=-1)

    def validate_targets(self, targets: np.ndarray, num_heads: int) -> None:
        """Raises a `ValueError` if `targets` cannot map onto `num_heads`."""
        members_per_head(targets.shape[1], num_heads)

    def invalid_targets(self, targets):
        """Scalar bool: some positive parameter (a scale, ...) is <= 0.

        The in-graph check `keras_hydra.guard` runs on every training batch.
        """
        names = distributions.parameter_names(self.family)
        pieces = ops.split(ops.cast(targets, "float32"), len(names), axis=-1)
        flags = [
            ops.any(piece <= 0)
            for name, piece in zip(names, pieces, strict=True)
            if distributions.is_positive(self.family, name)
        ]
        return ops.any(ops.stack(flags)) if flags else ops.convert_to_tensor(False)

    def get_config(self):
        config = super().get_config()
        config.update({"family": self.family.__name__, "num_samples": self.num_samples})
        return config


def _moment_match(params, num_heads: int):
    """Normal parameters matching each group's mixture mean and variance."""
    loc, scale = tf.split(params, 2, axis=-1)
    event = loc.shape[-1]
    loc = tf.reshape(loc, (-1, num_heads, loc.shape[1] // num_heads, event))
    scale = tf.reshape(scale, tf.shape(loc))
    mean = tf.reduce_mean(loc, axis=2)
    variance = tf.reduce_mean(tf.square(scale) + tf.square(loc), axis=2) - tf.square(
        mean
    )
    return tf.concat([mean, tf.sqrt(tf.maximum(variance, 1e-12))], axis=-1)


@keras.saving.register_keras_serializable(package="keras_hydra")
class DistributionNLL(keras.losses.Loss):
    """Negative log-likelihood of labels, to train regression members.

    `y_pred` holds one model's parameters `[batch, P * E]` (deep ensembles
    style: each member learns a distribution), or several heads
    `[batch, S, P * E]`: scored by their uniform mixture, or, with
    `mixture=False`, each head on its own (mean of the heads' NLLs), which
    trains S independent members at once.

    Args:
        family: a `tfp.distributions` class or its name.
        mixture: bool, how `[batch, S, P * E]` predictions are scored.
        reduction: Keras loss reduction over the batch.
        name: name of the loss.

    Example:

    >>> nll = DistributionNLL("Normal", reduction=None)
    >>> round(float(nll(np.array([[0.0]]), np.array([[0.0, 1.0]]))[0]), 4)
    0.9189
    """

    def __init__(
        self,
        family="Normal",
        mixture: bool = True,
        reduction: str = "sum_over_batch_size",
        name: str = "distribution_nll",
        **kwargs,
    ):
        super().__init__(name=name, reduction=reduction, **kwargs)
        self.family = distributions.resolve(family)
        self.mixture = mixture

    def call(self, y_true, y_pred):
        y_pred = tf.cast(y_pred, tf.float32)
        y_true = tf.cast(y_true, tf.float32)
        if y_pred.shape.rank == 2:
            dist = distributions.make(y_pred, self.family)
        elif self.mixture:
            dist = distributions.mixture(y_pred, self.family)
        else:
            dist = distributions.make(y_pred, self.family)
            labels = tf.reshape(y_true, tf.shape(dist.mean()[:, 0]))
            return -tf.reduce_mean(dist.log_prob(labels[:, None]), axis=1)
        return -dist.log_prob(tf.reshape(y_true, tf.shape(dist.mean())))

    def get_config(self):
        config = super().get_config()
        config.update({"family": self.family.__name__, "mixture": self.mixture})
        return config
