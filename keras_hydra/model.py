"""`HydraModel`: a shared body with M light heads, distilled from an ensemble."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import keras
from keras import ops

from keras_hydra import (
    _keras_internals,
    calibration,
    checkpoints,
    guard,
    optimizer_state,
    validation,
)
from keras_hydra.teacher import Ensemble


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
        body: Keras model or layer mapping inputs to features `[batch, d]`
            (or to a feature map, for heads with `conv_filters`).
        head: the output family, e.g. `keras_hydra.heads.Categorical(10)`.
        num_heads: int, the number of heads to start with.
        teacher: optional sequence of member models (or a
            `keras_hydra.teacher.Ensemble`) evaluated, frozen, inside each train
            and test step to produce the targets; `y` is then ignored. The
            teacher is never trained and is not part of the saved model.
        check_finite: bool, whether every training batch is checked in the
            graph for non-finite inputs, targets and sample weights and for
            invalid targets (see `keras_hydra.guard`). A bad batch stops
            `fit` with a `ValueError` naming the step and the tensor, with
            the weights from before that step. Defaults to `True`. Outside
            training, whatever this setting, a row whose inputs are not all
            finite gets NaN outputs (see `keras_hydra.guard`).
        **kwargs: base `keras.Model` arguments (`name`, ...).

    Call arguments:
        inputs: the body's inputs.
        training: bool, training mode of the body. Outside training the
            heads' outputs are spread by the non-trainable weight `spread`
            (1 unless `calibrate_spread` fitted it).

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
        check_finite: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.check_finite = bool(check_finite)
        self._record = guard.Record()
        self.body = body
        self.head = head
        self.num_heads = validation.count(num_heads, "num_heads")
        self.heads = head.layer(self.num_heads)
        if teacher is not None and not isinstance(teacher, Ensemble):
            teacher = Ensemble(teacher, name="teacher")
        self._teacher = _Frozen(teacher) if teacher is not None else None
        # Read in float32 under mixed precision: a bfloat16 factor would be
        # off by up to 0.4 %, a bias that rounding the outputs does not have.
        self.spread = self.add_weight(
            shape=(), initializer="ones", trainable=False, autocast=False, name="spread"
        )

    @property
    def teacher(self) -> Ensemble | None:
        """The online teacher, or `None` when targets are given as `y`."""
        return self._teacher.model if self._teacher is not None else None

    def build(self, input_shape):
        if not self.body.built:
            self.body.build(input_shape)
        self.heads.build(self.body.compute_output_shape(input_shape))

    def call(self, inputs, training=None):
        outputs = self.heads(self.body(inputs, training=training))
        if training:
            return outputs
        outputs = guard.nan_where_non_finite(inputs, outputs)
        if self.num_heads == 1:
            return outputs

        def spread():
            wide = self.head.spread(ops.cast(outputs, "float32"), self.spread)
            return ops.cast(wide, outputs.dtype)

        # Skipped at run time while the spread is 1: an uncalibrated Hydra
        # pays nothing for it, a calibrated one about 5 % of a batch-1024
        # forward pass (M = 10 or 50 linear heads, measured on CPU).
        return ops.cond(ops.equal(self.spread, 1.0), lambda: outputs, spread)

    def train_step(self, data):
        data = self._with_teacher_targets(data)
        if self.check_finite:
            logs = guard.guarded_step(self, super().train_step, data)
        else:
            logs = super().train_step(data)
        return _keras_internals.reducible_logs(logs, self.distribute_strategy)

    def test_step(self, data):
        logs = super().test_step(self._with_teacher_targets(data))
        return _keras_internals.reducible_logs(logs, self.distribute_strategy)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # keras-team/keras#20585; see `_keras_internals.first_replica_batch`.
        first = _keras_internals.first_replica_batch(self, iterator)
        if first is not None:
            iterator, data_batch = None, first
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _with_teacher_targets(self, data):
        if self._teacher is None:
            return data
        x, _, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y = ops.stop_gradient(self._teacher.model(x, training=False))
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

    def fit(self, x=None, y=None, *args, **kwargs):
        bound = inspect.signature(super().fit).bind(x, y, *args, **kwargs)
        validation.check_not_empty(x)
        validation.check_head_and_loss(self)
        validation.validate_data(self, x, y)
        validation_data = bound.arguments.get("validation_data")
        if validation_data is not None:
            if isinstance(validation_data, tuple):
                validation.validate_data(self, *validation_data[:2])
            else:
                validation.validate_data(self, validation_data, None)
        for callback in bound.arguments.get("callbacks") or ():
            if isinstance(callback, keras.callbacks.BackupAndRestore):
                checkpoints.check_backup(callback)
        _keras_internals.forget_restored_epoch(self)
        if self.check_finite:
            callbacks = list(bound.arguments.get("callbacks") or ())
            bound.arguments["callbacks"] = [guard.DataGuard(self._record), *callbacks]
        return super().fit(*bound.args, **bound.kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        validation.check_head_and_loss(self)
        validation.validate_data(self, x, y)
        return super().evaluate(x, y, *args, **kwargs)

    def add_heads(
        self,
        num_heads: int,
        noise_stddev: float = 0.0,
        seed: int | None = None,
        copy_head: bool = True,
    ) -> None:
        """Expands the trained single head into `num_heads` copies (phase 2).

        The body is kept; every new head starts as a copy of the trained head,
        optionally perturbed by Gaussian noise. The compiled loss, metrics and
        optimizer carry over: the optimizer's state is kept for the body and
        copied into each head, so the next `fit` continues without
        recompiling.

        With `copy_head=False` the heads are drawn fresh from the heads'
        initializers instead, with fresh optimizer state. Copies agree
        wherever phase 2's data does not pull them apart; fresh heads differ
        everywhere from the start, as independently trained members do, which
        keeps more disagreement away from the training data
        (the `image_ood` recipe uses fresh heads).

        Args:
            num_heads: int, the new number of heads, usually the ensemble size.
            noise_stddev: float, standard deviation of noise added to the copies.
            seed: optional int, seed of that noise.
            copy_head: bool, whether the new heads copy the trained head.

        Raises:
            ValueError: if `num_heads` is not a positive integer or
                `noise_stddev` not a finite number >= 0, if the model already
                has several heads, if `num_heads` is below the current count,
                or if the head was never built.
        """
        num_heads = validation.count(num_heads, "num_heads")
        noise_stddev = validation.non_negative(noise_stddev, "noise_stddev")
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
            heads = self.heads.expand(
                int(num_heads), noise_stddev, seed, copy=copy_head
            )
            _keras_internals.replace_layer(self, "heads", heads)
            self.num_heads = int(num_heads)
            # An uncompiled model has no `optimizer` attribute at all.
            optimizer = getattr(self, "optimizer", None)
            if optimizer is not None and optimizer.built:
                self.optimizer = optimizer_state.expanded(
                    self.optimizer, self.trainable_variables, copy_head
                )
        # The compiled step functions were traced for the old heads.
        self.train_function = self.test_function = self.predict_function = None

    def calibrate_spread(
        self, x, y=None, batch_size: int | None = None, verbose=0
    ) -> float:
        """Scales the heads' disagreement to the teacher's on `x`, post hoc.

        Fits the one non-trainable weight `spread`, by which each head's
        deviation from the heads' mean is scaled at prediction time (logits
        for `Categorical` heads, `loc` for `Distribution` heads; see
        `head.spread`), so that the Hydra's mean epistemic uncertainty on `x`
        (mutual information, or epistemic variance) equals the teacher's.

        Distilling with KL shrinks the heads towards their mean wherever they
        cannot follow their members exactly: their fitting errors do not
        follow the members' own deviations, so, as in any regression, the
        fitted deviations come out smaller. The per-head KL is then lowest
        near a spread of 1 while the heads' mutual information falls short
        of the members' (RESULTS.md has the measurements). Like temperature
        scaling, it is one scalar fitted after training. The heads' mean
        logits (or mean `loc`) stay as they are; the averaged probabilities
        move little. `x` is best the
        transfer set the heads were distilled on (or held-out inputs), never
        the out-of-distribution data it is meant to flag. With fewer heads
        than members (`S < M`), the level matched is still the whole
        teacher's, so the heads end up further apart than their groups'
        means.

        Calibrate after training: `fit` trains the heads unscaled (the train
        step calls the model with `training=True`), while `predict`,
        `evaluate`, `fit`'s validation metrics, `predict_uncertainty` and the
        exported SavedModel use the spread. It is saved with the weights.
        Under mixed precision the factor is applied in float32 and the
        result rounded to the compute dtype, like the heads' outputs.

        Args:
            x: inputs, as for `predict`, or a `tf.data.Dataset` of `(x, y)`
                batches.
            y: the teacher's targets `[N, M, ...]` for `x`, as given to
                `fit` (probabilities when the compiled loss has
                `from_logits=False`); omit with an online teacher, which is
                then run on `x`, or with a dataset of `(x, y)`.
            batch_size: int, as for `predict`.
            verbose: progress bar setting, as for `predict`.

        Returns:
            The fitted factor, also in `model.spread`.

        Raises:
            ValueError: if the model has one head, if there are no targets,
                if they are not valid targets for the heads (as `fit`
                checks them) or cover another number of examples than `x`,
                or if no factor between 1/64 and 64 times the current spread
                reaches the teacher's level (e.g. the members agree
                everywhere on `x`, or a `Distribution` family has no `loc`).
                `spread` is then left as it was.

        Example:

        >>> import keras_hydra as kh
        >>> x = np.random.rand(64, 8).astype("float32")
        >>> members = [keras.Sequential([keras.layers.Dense(3)]) for _ in range(4)]
        >>> targets = kh.teacher.predict(members, x)
        >>> hydra = kh.HydraModel(keras.layers.Dense(16), kh.heads.Categorical(3), 4)
        >>> hydra.compile(optimizer="adam", loss=kh.losses.HydraKL())
        >>> _ = hydra.fit(x, targets, epochs=2, verbose=0)
        >>> factor = hydra.calibrate_spread(x, targets)
        >>> teacher_mi = kh.uncertainty.categorical(targets)["epistemic_uncertainty"]
        >>> hydra_mi = hydra.predict_uncertainty(x)["epistemic_uncertainty"]
        >>> bool(np.isclose(hydra_mi.mean(), np.mean(teacher_mi), rtol=1e-4))
        True
        """
        return calibration.calibrate_spread(self, x, y, batch_size, verbose)

    def load_weights(self, filepath, skip_mismatch: bool = False, **kwargs) -> None:
        """Loads weights, expanding a single head first if the file has M heads.

        Same as `keras.Model.load_weights`, plus what resuming a Hydra needs:
        when the file was saved after `add_heads(M)` and this model still has
        one head, it calls `add_heads(M)` first, so a restarted script that
        builds the phase-1 model again restores the phase-2 state. This is
        what `keras.callbacks.BackupAndRestore` calls at the start of `fit`
        (on `BACKUP_DIR/latest.weights.h5`); the compiled train step is then
        re-made for the new heads. The optimizer's state is part of such a
        file and is restored too.

        With `BackupAndRestore`, training resumes at the start of the epoch
        after the last backup (Keras restores at epoch granularity). With
        `shuffle=False` and a fixed seed the resumed run ends with the same
        weights as an uninterrupted one. With shuffling it does not: the
        order of each shuffled epoch comes from an RNG whose state is not in
        the backup, so the re-run epochs see other batches (a valid run, but
        not the same one).

        To make both phases resumable, either run them in one `fit` with
        `keras_hydra.callbacks.AddHeads` and one backup directory, or give
        `fit`, `add_heads`, `fit` a backup directory per `fit` and keep phase
        1's (`BackupAndRestore(dir1, delete_checkpoint=False)`, deleted by
        the script once phase 2 is done): after a kill in phase 2, the
        restarted phase 1 restores its final state and runs no epoch, then
        `add_heads` and phase 2 resumes from its own directory. One directory
        shared by both `fit` calls does not work (phase 2 would restore the
        single-head state of phase 1's end into the expanded model).
        `HydraModel.fit` checks each `BackupAndRestore` directory first and
        raises `ValueError` if it holds the weights but not the epoch or the
        reverse (e.g. a process killed between the two writes), and it
        forgets the epoch a previous restore set, which Keras keeps.

        Stricter than Keras, so that a wrong file never loads silently: a
        file whose weights were not saved from a `HydraModel`, or with a
        different head count that cannot be reached by expanding one head,
        raises `ValueError`; a file whose optimizer state does not match this
        (built) optimizer raises `ValueError` where Keras only warns.

        Args:
            filepath: path of a `.weights.h5` (or `.keras`) file, as for
                `keras.Model.load_weights`.
            skip_mismatch: bool, as for `keras.Model.load_weights`.
            **kwargs: other `keras.Model.load_weights` arguments.

        Raises:
            OSError: if the file cannot be read as HDF5 (corrupt or
                truncated). `BackupAndRestore(double_checkpoint=True)` then
                falls back to its previous backup.
            ValueError: if the file does not hold this model's weights.

        Example:

        >>> import tempfile, keras_hydra as kh
        >>> def make():
        ...     model = kh.HydraModel(keras.layers.Dense(8), kh.heads.Categorical(3))
        ...     model.build((None, 5))
        ...     return model
        >>> trained = make()
        >>> trained.add_heads(4)
        >>> path = tempfile.mkdtemp() + "/hydra.weights.h5"
        >>> trained.save_weights(path)
        >>> restored = make()  # one head, as a restarted script builds it
        >>> restored.load_weights(path)
        >>> restored.num_heads
        4
        """
        checkpoints.prepare_load(self, filepath)
        super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)

    def load_own_variables(self, store):
        # Files saved before `spread` existed hold no variables of the model's
        # own; they load with the heads as trained (a spread of 1).
        if not len(store.keys()):
            self.spread.assign(1.0)
            return
        super().load_own_variables(store)

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
            "check_finite": self.check_finite,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["body"] = keras.saving.deserialize_keras_object(config["body"])
        config["head"] = keras.saving.deserialize_keras_object(config["head"])
        return cls(**config)
