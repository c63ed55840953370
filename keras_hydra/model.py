"""`HydraModel`: a shared body with M light heads, distilled from an ensemble."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_hydra.teacher import Ensemble

_SAMPLE_SIZE = 32  # examples run through an online teacher to check its outputs


class _Frozen:
    """Holds a model out of Keras/TF tracking, so it is never saved or trained."""

    __slots__ = ("model",)

    def __init__(self, model):
        self.model = model


@keras.saving.register_keras_serializable(package="keras_hydra")
class HydraModel(keras.Model):
    """A shared body and `num_heads` heads, head `m` distilled from member `m`.

    Training follows the paper's two phases, each a plain `fit`:

    1. With one head and `HydraKL`, the head learns the ensemble's mean
       prediction (Hinton distillation).
    2. `add_heads(M)` copies that head M times; the next `fit` with the same
       loss and targets trains head `m` to mimic member `m`.

    Targets are the teacher's outputs `[batch, M, K]`, computed once with
    `keras_hydra.teacher.predict`, or online inside the train step when
    `teacher` is given (e.g. under data augmentation).

    Args:
        body: Keras model or layer mapping inputs to features `[batch, d]`.
        head: the output family, e.g. `keras_hydra.heads.Categorical(10)`.
        num_heads: int, the number of heads to start with.
        teacher: optional sequence of member models (or a
            `keras_hydra.teacher.Ensemble`) evaluated, frozen, inside each train
            and test step to produce the targets; `y` is then ignored. The
            teacher is never trained and is not part of the saved model.
        **kwargs: base `keras.Model` arguments (`name`, ...).

    Call arguments:
        inputs: the body's inputs.
        training: bool, training mode of the body.

    Returns:
        Head outputs `[batch, num_heads, head.units]` (logits for
        `Categorical`).

    Example:

    >>> import keras_hydra as kh
    >>> x = np.random.rand(64, 8).astype("float32")
    >>> members = [keras.Sequential([keras.layers.Dense(3)]) for _ in range(4)]
    >>> targets = kh.teacher.predict(members, x)
    >>> body = keras.Sequential([keras.layers.Dense(16, activation="relu")])
    >>> hydra = kh.HydraModel(body, kh.heads.Categorical(3))
    >>> hydra.compile(optimizer="adam", loss=kh.losses.HydraKL(temperature=2.0))
    >>> _ = hydra.fit(x, targets, epochs=1, verbose=0)
    >>> hydra.add_heads(4)
    >>> _ = hydra.fit(x, targets, epochs=1, verbose=0)
    >>> hydra.predict_uncertainty(x)["head_probabilities"].shape
    (64, 4, 3)
    """

    def __init__(
        self,
        body: keras.layers.Layer,
        head,
        num_heads: int = 1,
        teacher: Sequence[keras.Model] | Ensemble | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.body = body
        self.head = head
        self.num_heads = int(num_heads)
        self.heads = head.layer(self.num_heads)
        if teacher is not None and not isinstance(teacher, Ensemble):
            teacher = Ensemble(teacher, name="teacher")
        self._teacher = _Frozen(teacher) if teacher is not None else None

    @property
    def teacher(self) -> Ensemble | None:
        """The online teacher, or `None` when targets are given as `y`."""
        return self._teacher.model if self._teacher is not None else None

    def build(self, input_shape):
        if not self.body.built:
            self.body.build(input_shape)
        self.heads.build(self.body.compute_output_shape(input_shape))

    def call(self, inputs, training=None):
        return self.heads(self.body(inputs, training=training))

    def train_step(self, data):
        return super().train_step(self._with_teacher_targets(data))

    def test_step(self, data):
        return super().test_step(self._with_teacher_targets(data))

    def _with_teacher_targets(self, data):
        if self._teacher is None:
            return data
        x, _, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y = ops.stop_gradient(self._teacher.model(x, training=False))
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

    def fit(self, x=None, y=None, *args, **kwargs):
        bound = inspect.signature(super().fit).bind(x, y, *args, **kwargs)
        self._validate_data(x, y)
        validation_data = bound.arguments.get("validation_data")
        if validation_data is not None:
            if isinstance(validation_data, tuple):
                self._validate_data(*validation_data[:2])
            else:
                self._validate_data(validation_data, None)
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        self._validate_data(x, y)
        return super().evaluate(x, y, *args, **kwargs)

    def _validate_data(self, x, y) -> None:
        """Checks a sample of the teacher targets before any training step.

        Only distillation losses (those with `validate_targets`) take teacher
        targets; other losses, e.g. an NLL on labels, are left to Keras.
        """
        if not hasattr(self.loss, "validate_targets"):
            return
        targets = self._sample_targets(x, y)
        if targets is None:
            return
        if not np.all(np.isfinite(targets)):
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(targets))[0])
            raise ValueError(
                f"Teacher targets contain NaN or Inf (first at index {bad}, "
                f"value {targets[bad]})."
            )
        self.head.validate_targets(targets)
        self.loss.validate_targets(targets, self.num_heads)

    def _sample_targets(self, x, y) -> np.ndarray | None:
        if isinstance(x, tf.data.Dataset):
            x, y, _ = keras.utils.unpack_x_y_sample_weight(next(iter(x.take(1))))
        elif self._teacher is not None:
            x = keras.tree.map_structure(lambda a: a[:_SAMPLE_SIZE], x)
        if self._teacher is not None:
            y = self._teacher.model(x, training=False)
        if y is None or not hasattr(y, "shape"):
            return None  # generators and PyDatasets are not inspected
        return np.asarray(ops.convert_to_numpy(y))

    def add_heads(
        self, num_heads: int, noise_stddev: float = 0.0, seed: int | None = None
    ) -> None:
        """Expands the trained single head into `num_heads` copies (phase 2).

        The body is kept; every new head starts as a copy of the trained head,
        optionally perturbed by Gaussian noise. The compiled loss, metrics and
        optimizer carry over: the optimizer's state is kept for the body and
        copied into each head, so the next `fit` continues without
        recompiling.

        Args:
            num_heads: int, the new number of heads, usually the ensemble size.
            noise_stddev: float, standard deviation of noise added to the copies.
            seed: optional int, seed of that noise.

        Raises:
            ValueError: if the model already has several heads, if `num_heads`
                is below the current count, or if the head was never built.
        """
        if self.num_heads != 1:
            raise ValueError(
                "add_heads expands a single trained head, but this model already "
                f"has {self.num_heads} heads."
            )
        if int(num_heads) < self.num_heads:
            raise ValueError(
                f"num_heads={num_heads} is below the current head count "
                f"({self.num_heads})."
            )
        if not self.heads.built:
            raise ValueError(
                "add_heads copies a trained head, but this model was never built: "
                "train it (phase 1) or call it on data first."
            )
        if int(num_heads) == self.num_heads:
            return
        with self.distribute_strategy.scope(), keras.name_scope(self.name):
            heads = self.heads.expand(int(num_heads), noise_stddev, seed)
            # Keras locks a built layer's state; swapping the heads is the one
            # deliberate exception.
            self._tracker.unlock()
            self._tracker.untrack(self.heads)
            self.heads = heads
            self._lock_state()
            self.num_heads = int(num_heads)
            if self.optimizer is not None and self.optimizer.built:
                self.optimizer = _rebuilt_optimizer(
                    self.optimizer, self.trainable_variables
                )
        # The compiled step functions were traced for the old heads.
        self.train_function = self.test_function = self.predict_function = None

    def predict_uncertainty(self, x, batch_size: int | None = None, verbose=0) -> dict:
        """Predicts and splits the uncertainty, as numpy arrays.

        Args:
            x: inputs, as for `predict`.
            batch_size: int, as for `predict`.
            verbose: progress bar setting, as for `predict`.

        Returns:
            For `Categorical` heads, the dict of
            `keras_hydra.uncertainty.categorical`: `probabilities`,
            `head_probabilities`, `predicted_class`, `total_uncertainty`,
            `aleatoric_uncertainty`, `epistemic_uncertainty` (nats).
        """
        outputs = self.predict(x, batch_size=batch_size, verbose=verbose)
        return {
            k: ops.convert_to_numpy(v)
            for k, v in self.head.uncertainty(outputs).items()
        }

    def predict_distribution(self, x, batch_size: int | None = None, verbose=0):
        """The predictive distribution: a uniform mixture over the heads.

        Args:
            x: inputs, as for `predict`.
            batch_size: int, as for `predict`.
            verbose: progress bar setting, as for `predict`.

        Returns:
            A `tfd.MixtureSameFamily` with batch shape `[N]`: of the heads'
            family for `Distribution` heads (event shape `[event_size]`), of
            categoricals for `Categorical` heads.
        """
        outputs = self.predict(x, batch_size=batch_size, verbose=verbose)
        return self.head.distribution(outputs)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "body": keras.saving.serialize_keras_object(self.body),
            "head": keras.saving.serialize_keras_object(self.head),
            "num_heads": self.num_heads,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["body"] = keras.saving.deserialize_keras_object(config["body"])
        config["head"] = keras.saving.deserialize_keras_object(config["head"])
        return cls(**config)


def _rebuilt_optimizer(optimizer, variables):
    """A copy of `optimizer` built for `variables`, with the state carried over.

    Optimizer variables are created in the order of the model's variables,
    and `add_heads` keeps that order, so the old and new lists align one to
    one. A head's slot of leading size 1 is repeated for each new head.
    """
    rebuilt = optimizer.__class__.from_config(optimizer.get_config())
    rebuilt.build(variables)
    if len(rebuilt.variables) != len(optimizer.variables):
        raise RuntimeError(
            f"Cannot carry the state of optimizer {optimizer.name} over "
            "add_heads: its variables do not follow the model's."
        )
    for new, old in zip(rebuilt.variables, optimizer.variables, strict=True):
        value = ops.convert_to_numpy(old)
        if tuple(new.shape) != tuple(old.shape):
            value = np.repeat(value, new.shape[0], axis=0)
        new.assign(value)
    return rebuilt
