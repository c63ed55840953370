"""Hydra through `keras.distillation`: an online teacher, run at every step.

The default path distils from cached targets (`keras_hydra.teacher.predict`
once, then `HydraModel.fit(x, targets)`). When the teacher must see every
batch as the student does, e.g. under data augmentation, the upstream
`keras.distillation.Distiller` runs both each step; `HydraDistillation` is
its Hydra strategy and `HydraDistiller` the subclass that fixes what the
upstream class gets wrong for it (see `HydraDistiller`).
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence

import keras
import tensorflow as tf
from keras import ops

from keras_hydra import optimizer_state
from keras_hydra.losses import HydraKL, members_per_head
from keras_hydra.teacher import Ensemble

# Set while `HydraDistiller.compute_loss` runs, which scales the total for
# the replicas once; `HydraDistillation` refuses to run under several
# replicas without it. A context variable, not a flag: MirroredStrategy
# traces each replica in its own thread.
_SCALED_BY_DISTILLER = contextvars.ContextVar(
    "keras_hydra_scaled_by_distiller", default=False
)


def _num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


@keras.saving.register_keras_serializable(package="keras_hydra")
class HydraDistillation(keras.distillation.DistillationLoss):
    """Hydra's loss as a `keras.distillation` strategy, for an online teacher.

    The teacher is the ensemble, `keras_hydra.teacher.Ensemble(members)`,
    with outputs `[batch, M, K]`; the student a `keras_hydra.HydraModel`
    with outputs `[batch, S, K]`. The loss is `keras_hydra.losses.HydraKL`
    on those outputs, so `S == 1` is Hinton distillation on the ensemble's
    mean (phase 1) and `S == M` is Hydra, head `m` against member `m`
    (phase 2, after `HydraDistiller.add_heads(M)`).

    `compute_loss` returns the batch mean of `HydraKL`'s per-example loss
    on this replica: the same value on one device and under a
    `tf.distribute` strategy. The upstream `Distiller` logs that value as is
    but also returns it as the step's loss, which under `R` replicas sums
    to `R` times the gradient; use it with `HydraDistiller`, which scales
    the total once. Under several replicas in any other distiller it raises
    rather than train with `R` times the gradient.

    Args:
        temperature: float > 0, `HydraKL`'s temperature `T`. It lives in
            the non-trainable `keras.Variable` `temperature`, which can be
            `assign`ed during `fit` (e.g. from a `LambdaCallback`).
        from_logits: bool, whether the teacher outputs logits (`True`) or
            probabilities. The student always outputs logits.
        logit_weight: float >= 0, `HydraKL`'s logit-matching weight.

    Raises:
        ValueError: from `HydraKL` for a temperature <= 0 or a negative
            `logit_weight`; from `validate_outputs` when the outputs are
            not `[batch, M, K]` and `[batch, S, K]` with `S` dividing `M`;
            from `compute_loss` under several replicas outside a
            `HydraDistiller`.

    Example:

    >>> loss = HydraDistillation(temperature=2.0)
    >>> teacher = np.array([[[2.0, 0.0], [0.0, 2.0]]], "float32")  # M = 2
    >>> student = np.zeros((1, 1, 2), "float32")  # S = 1: the ensemble mean
    >>> round(float(loss.compute_loss(teacher, student)), 6)
    0.0
    """

    def __init__(
        self,
        temperature: float = 1.0,
        from_logits: bool = True,
        logit_weight: float = 0.0,
    ):
        self.loss = HydraKL(
            temperature=temperature, from_logits=from_logits, logit_weight=logit_weight
        )

    @property
    def temperature(self) -> keras.Variable:
        """The temperature, a non-trainable `keras.Variable`."""
        return self.loss.temperature

    def validate_outputs(self, teacher_outputs, student_outputs) -> None:
        """Raises a `ValueError` unless the outputs suit `HydraKL`.

        Args:
            teacher_outputs: tensor `[batch, M, K]`.
            student_outputs: tensor `[batch, S, K]`.
        """
        super().validate_outputs(teacher_outputs, student_outputs)
        teacher_shape = tuple(teacher_outputs.shape)
        student_shape = tuple(student_outputs.shape)
        if (
            len(teacher_shape) != 3
            or len(student_shape) != 3
            or teacher_shape[-1] != student_shape[-1]
        ):
            raise ValueError(
                "HydraDistillation needs teacher outputs [batch, members, "
                "classes] and student outputs [batch, heads, classes]. Received "
                f"teacher {teacher_shape} and student {student_shape}."
            )
        members_per_head(teacher_shape[1], student_shape[1])

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        """The batch mean of `HydraKL(teacher_outputs, student_outputs)`.

        Args:
            teacher_outputs: tensor `[batch, M, K]`.
            student_outputs: tensor `[batch, S, K]`, logits.
            **kwargs: ignored.

        Returns:
            A scalar: the loss on this replica's batch.

        Raises:
            ValueError: under several replicas outside a `HydraDistiller`.
        """
        replicas = _num_replicas()
        if replicas > 1 and not _SCALED_BY_DISTILLER.get():
            raise ValueError(
                f"HydraDistillation under {replicas} replicas needs "
                "keras_hydra.distillation.HydraDistiller: the upstream "
                "keras.distillation.Distiller returns its losses unscaled "
                f"for the replicas, which gives {replicas} times the gradient."
            )
        # `Loss.__call__` returns the replica's share, 1 / replicas of it.
        share = self.loss(teacher_outputs, student_outputs)
        return ops.multiply(share, ops.cast(replicas, share.dtype))

    def get_config(self) -> dict:
        config = self.loss.get_config()
        return {
            "temperature": config["temperature"],
            "from_logits": config["from_logits"],
            "logit_weight": config["logit_weight"],
        }

    @classmethod
    def from_config(cls, config: dict) -> HydraDistillation:
        return cls(**config)


def _no_student_loss(y_true, y_pred):
    """Stands in for the student loss the upstream compile insists on."""
    raise AssertionError("Not called: the student loss weight is 0.")


def _per_replica_mean(loss):
    """Makes a student loss return its batch mean on this replica.

    Upstream applies the student loss as given: a loss function's values
    are averaged by the Distiller (the replica's mean), a `keras.losses.Loss`
    instance returns the replica's share (the mean over the number of
    replicas). This brings both to the first.
    """
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if not isinstance(loss, keras.losses.Loss):
        return loss

    def mean(y_true, y_pred):
        share = loss(y_true, y_pred)
        return ops.multiply(share, ops.cast(_num_replicas(), share.dtype))

    return mean


@keras.saving.register_keras_serializable(package="keras_hydra")
class HydraDistiller(keras.distillation.Distiller):
    """`keras.distillation.Distiller` for a Hydra student, both phases.

    Trains `student` (a `keras_hydra.HydraModel`) from `teacher` (the
    ensemble, run frozen in every train step on the same batch as the
    student) with `HydraDistillation`, through the upstream train step, so
    a `tf.data` pipeline that augments its inputs gives teacher and student
    the same augmented batch. Phase 1 is `fit` with one head; phase 2 is
    `add_heads(M)`, then `fit` again.

    What it changes in the upstream `Distiller` (Keras 3.15), each measured
    here and tested in `tests/test_distillation.py`:

    - Replicas. Upstream returns the sum of its components, as they come,
      as the step's loss. Keras's own `compute_loss` returns each replica's
      share (`Loss.__call__` divides by the number of replicas `R`), sums
      gradients over replicas and multiplies the logged `loss` back. So a
      component that is a replica's mean (a loss function, as upstream's
      string losses give) yields `R` times the gradient and `loss`;
      one that is a `keras.losses.Loss` instance trains right but logs
      `distillation_loss`, `student_loss` and `total_loss` at `1 / R`. With
      `MirroredStrategy` on 2 CPU replicas (SGD, first epoch, the runs of
      `tests/scale_scripts/distillation_runs.py`): a strategy returning
      `HydraKL(...)` (a `Loss`) logged `distillation_loss` 0.1761 against
      0.3522 on one device; one returning the mean of `HydraKL.call`
      logged `loss` 0.5705 against 0.3522 and ended 0.057 away in the
      weights. Here every component is its replica's mean (student `Loss`
      instances are wrapped so) and `compute_loss` divides the total by
      `R` once: loss, logs and weights then equal one device's to 1e-7.
    - Regularization. Upstream leaves the student's `losses` (kernel
      regularizers, `add_loss`) out of the loss; here they are added, as
      `HydraModel.fit` does. `total_loss` stays upstream's (components
      only); `loss` includes them.
    - Heads. After `student.add_heads(M)` the upstream distiller keeps its
      compiled train step, which goes on training the old, detached single
      head (the new heads stay as they were); and its optimizer cannot take
      the new heads ("Unknown variable"). `add_heads` here expands the
      heads, carries the optimizer's state over as `HydraModel.add_heads`
      does and re-traces the step functions; `fit` raises if the student's
      heads were changed behind its back.
    - Labels. The student loss is optional: `student_loss_weight` defaults
      to 0, and `compile` then needs no `loss` (upstream requires one and
      weighs the distillation loss by `1 - student_loss_weight`, 0.5 by
      default, even without labels).

    Sample weights are not supported (upstream ignores them); `fit` raises
    if given some.

    With augmentation off, this equals the cached-targets path,
    `HydraModel.compile(loss=HydraKL(...))` and `fit(x, targets)` with the
    same batches and initial weights (to float32 rounding).

    Args:
        teacher: the ensemble, a `keras_hydra.teacher.Ensemble` (or any
            model with outputs `[batch, M, K]`), or a sequence of member
            models to stack into one. It is frozen.
        student: a `keras_hydra.HydraModel` (or any model with outputs
            `[batch, S, K]` and, for `add_heads`, an `add_heads` method).
        distillation_losses: a `HydraDistillation`, or a list of
            distillation losses whose values are their replica's mean.
        distillation_loss_weights: list of floats, one per distillation
            loss; defaults to 1 each.
        student_loss_weight: float in [0, 1], the weight of the student's
            loss on labels `y`; the distillation losses get `1 - weight`.
        name: name of the model.
        **kwargs: base `keras.Model` arguments.

    Raises:
        ValueError: as the upstream `Distiller` (teacher or student not a
            `keras.Model`, a weight outside [0, 1], ...).

    Example:

    >>> import keras_hydra as kh
    >>> x = np.random.rand(64, 8).astype("float32")
    >>> members = [keras.Sequential([keras.layers.Dense(3)]) for _ in range(4)]
    >>> student = kh.HydraModel(keras.layers.Dense(16), kh.heads.Categorical(3))
    >>> distiller = HydraDistiller(members, student, HydraDistillation(2.0))
    >>> distiller.compile(optimizer="adam")
    >>> _ = distiller.fit(x, epochs=1, batch_size=32, verbose=0)  # phase 1
    >>> distiller.add_heads(4)
    >>> _ = distiller.fit(x, epochs=1, batch_size=32, verbose=0)  # phase 2
    >>> student.predict(x, verbose=0).shape
    (64, 4, 3)
    """

    def __init__(
        self,
        teacher: keras.Model | Sequence[keras.Model],
        student: keras.Model,
        distillation_losses,
        distillation_loss_weights: Sequence[float] | None = None,
        student_loss_weight: float = 0.0,
        name: str = "hydra_distiller",
        **kwargs,
    ):
        if not isinstance(teacher, keras.Model):
            teacher = Ensemble(teacher, name="teacher")
        super().__init__(
            teacher,
            student,
            distillation_losses,
            distillation_loss_weights=distillation_loss_weights,
            student_loss_weight=student_loss_weight,
            name=name,
            **kwargs,
        )
        self._heads = self._student_heads()

    def _student_heads(self) -> int | None:
        return getattr(self.student, "num_heads", None)

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs) -> None:
        """Configures training, as `Distiller.compile`.

        Args:
            optimizer: the optimizer of the student.
            loss: the student's loss on labels `y`; only with
                `student_loss_weight > 0`.
            metrics: list of metrics on `y` and the student's outputs.
            **kwargs: base `keras.Model.compile` arguments.

        Raises:
            ValueError: if `student_loss_weight > 0` and `loss` is `None`.
        """
        if loss is None:
            if self.student_loss_weight > 0:
                raise ValueError(
                    f"student_loss_weight={self.student_loss_weight} needs a "
                    "student `loss` on the labels."
                )
            loss = _no_student_loss
        loss = keras.tree.map_structure(_per_replica_mean, loss)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
        self._heads = self._student_heads()

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The upstream loss plus the student's regularization, per replica.

        Returns:
            A scalar: this replica's share of the step's loss (the total
            over the number of replicas), as Keras's `compute_loss`.

        Raises:
            ValueError: if `sample_weight` is given.
        """
        if sample_weight is not None:
            raise ValueError(
                "HydraDistiller does not support sample weights (the upstream "
                "Distiller ignores them)."
            )
        token = _SCALED_BY_DISTILLER.set(True)
        try:
            loss = super().compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=None, training=training
            )
        finally:
            _SCALED_BY_DISTILLER.reset(token)
        loss = ops.cast(loss, "float32")
        for regularization in self.student.losses:
            loss = loss + ops.cast(regularization, "float32")
        return ops.divide(loss, ops.cast(_num_replicas(), "float32"))

    def add_heads(
        self,
        num_heads: int,
        noise_stddev: float = 0.0,
        seed: int | None = None,
        copy_head: bool = True,
    ) -> None:
        """Expands the student's head into `num_heads` copies (phase 2).

        Calls `student.add_heads` with these arguments, carries the
        distiller's optimizer state over to the new heads (repeated for
        copies, fresh for `copy_head=False`), and drops the compiled step
        functions so that the next `fit` traces them for the new heads.

        Args:
            num_heads: int, the new number of heads, usually the ensemble size.
            noise_stddev: float, standard deviation of noise added to copies.
            seed: optional int, seed of that noise.
            copy_head: bool, whether the new heads copy the trained head.

        Raises:
            ValueError: from `HydraModel.add_heads`.
        """
        self.student.add_heads(
            num_heads, noise_stddev=noise_stddev, seed=seed, copy_head=copy_head
        )
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer = optimizer_state.expanded(
                    optimizer, self.trainable_variables, copy_head
                )
        self._reset_step_functions()
        self._heads = self._student_heads()

    def _reset_step_functions(self) -> None:
        self.train_function = self.test_function = self.predict_function = None

    def _check_heads(self, training: bool) -> None:
        if self._student_heads() == self._heads:
            return
        optimizer = getattr(self, "optimizer", None)
        if training and optimizer is not None and optimizer.built:
            raise ValueError(
                f"The student now has {self._student_heads()} heads, but this "
                f"distiller was trained with {self._heads}: its optimizer holds "
                "the old heads. Expand with `distiller.add_heads(...)` instead "
                "of `student.add_heads(...)`, or `compile` the distiller again "
                "for a fresh optimizer."
            )
        self._reset_step_functions()
        if training:
            self._heads = self._student_heads()

    def fit(self, *args, **kwargs):
        self._check_heads(training=True)
        return super().fit(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        self._check_heads(training=False)
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        self._check_heads(training=False)
        return super().predict(*args, **kwargs)
