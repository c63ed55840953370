"""`HydraModel`: a shared body with M light heads, distilled from an ensemble."""

from __future__ import annotations

import functools
import inspect
import io
import json
import os
import zipfile
from collections.abc import Sequence

import h5py
import keras
import numpy as np
import tensorflow as tf
from keras import ops
from scipy import optimize

from keras_hydra.teacher import Ensemble
from keras_hydra.teacher import predict as predict_targets

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
        if training or self.num_heads == 1:
            return outputs

        def spread():
            wide = self.head.spread(ops.cast(outputs, "float32"), self.spread)
            return ops.cast(wide, outputs.dtype)

        # Skipped at run time while the spread is 1: an uncalibrated Hydra
        # pays nothing for it, a calibrated one about 5 % of a batch-1024
        # forward pass (M = 10 or 50 linear heads, measured on CPU).
        return ops.cond(ops.equal(self.spread, 1.0), lambda: outputs, spread)

    def train_step(self, data):
        logs = super().train_step(self._with_teacher_targets(data))
        return self._reducible(logs)

    def test_step(self, data):
        logs = super().test_step(self._with_teacher_targets(data))
        return self._reducible(logs)

    def _reducible(self, logs: dict) -> dict:
        """Gives scalar logs a batch axis of 1 under multi-worker training.

        Keras (keras-team/keras#20585) reduces each log of a multi-worker
        step with `strategy.reduce("MEAN", value, axis=0)`, which rejects
        scalars. With an axis of length 1 that reduction is the mean over
        replicas, what Keras computes for `MirroredStrategy`. Should Keras
        switch to `axis=None`, logs would come back with shape `[1]`, which
        `tests/test_scale.py::test_multi_worker_logs_are_scalars` catches.
        """
        if not _is_multi_worker(self.distribute_strategy):
            return logs
        return keras.tree.map_structure(
            lambda v: ops.reshape(v, (1,)) if len(v.shape) == 0 else v, logs
        )

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras builds from the first batch averaged over replicas by
        # `strategy.reduce` (keras-team/keras#20585), which fails under
        # multi-worker collectives and when replicas hold unequal parts of a
        # batch. Only shapes matter for that build: replica 0's part will do.
        if iterator is not None and self._distribute_strategy is not None:
            local = self._distribute_strategy.experimental_local_results
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(
                    lambda v: local(v)[0], next(batches), none_is_leaf=False
                )
                break
            iterator = None
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

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
        for callback in bound.arguments.get("callbacks") or ():
            if isinstance(callback, keras.callbacks.BackupAndRestore):
                _check_backup(callback)
        # Keras never resets `_initial_epoch`, which `BackupAndRestore` sets
        # when it restores: without this, a later `fit` in the same process
        # (e.g. phase 2 after a restored phase 1) would silently skip epochs.
        self._initial_epoch = None
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
        if targets is not None:
            self._check_targets(targets)

    def _check_targets(self, targets: np.ndarray) -> None:
        """Raises unless `targets` are finite teacher targets for these heads."""
        if not np.all(np.isfinite(targets)):
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(targets))[0])
            raise ValueError(
                f"Teacher targets contain NaN or Inf (first at index {bad}, "
                f"value {targets[bad]})."
            )
        self.head.validate_targets(targets)
        loss = getattr(self, "loss", None)
        if hasattr(loss, "validate_targets"):
            loss.validate_targets(targets, self.num_heads)

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
        (`keras-hydra benchmark classification` measures both).

        Args:
            num_heads: int, the new number of heads, usually the ensemble size.
            noise_stddev: float, standard deviation of noise added to the copies.
            seed: optional int, seed of that noise.
            copy_head: bool, whether the new heads copy the trained head.

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
            heads = self.heads.expand(
                int(num_heads), noise_stddev, seed, copy=copy_head
            )
            # Keras locks a built layer's state; swapping the heads is the one
            # deliberate exception.
            self._tracker.unlock()
            self._tracker.untrack(self.heads)
            self.heads = heads
            self._lock_state()
            self.num_heads = int(num_heads)
            # An uncompiled model has no `optimizer` attribute at all.
            optimizer = getattr(self, "optimizer", None)
            if optimizer is not None and optimizer.built:
                self.optimizer = _rebuilt_optimizer(
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
        of the members'. In `keras-hydra benchmark classification` the heads
        keep about 0.91 of the members' mutual information on their own
        transfer inputs and 0.75-0.77 on MNIST; calibrated on the transfer
        inputs (a factor of 1.04-1.05) they keep 0.82-0.85 on MNIST, with
        the same accuracy and NLL. Like temperature scaling, it is one scalar
        fitted after training. The heads' mean logits (or mean `loc`) stay
        as they are; the averaged probabilities move little. `x` is best the
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
        if self.num_heads == 1:
            raise ValueError(
                "calibrate_spread scales the disagreement between heads, but this "
                "model has one head: call add_heads first."
            )
        if y is None and self._teacher is not None:
            y = predict_targets(self._teacher.model, x, batch_size=batch_size or 256)
        elif y is None and isinstance(x, tf.data.Dataset):
            y = [keras.utils.unpack_x_y_sample_weight(batch)[1] for batch in x]
            y = None if any(b is None for b in y) else np.concatenate(y)
        if y is None:
            raise ValueError(
                "calibrate_spread needs the teacher's targets for `x`: pass them "
                "as `y` (or in a dataset of `(x, y)` batches), or build the model "
                "with an online `teacher`."
            )
        targets = np.asarray(ops.convert_to_numpy(y), "float32")
        self._check_targets(targets)
        if not getattr(getattr(self, "loss", None), "from_logits", True):
            targets = np.log(np.maximum(targets, 1e-12))  # probabilities as logits
        outputs = ops.cast(
            self.predict(x, batch_size=batch_size, verbose=verbose), "float32"
        )
        if outputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"The targets have shape {targets.shape} but the model's outputs "
                f"on `x` have shape {tuple(outputs.shape)}: they must cover the "
                "same examples."
            )
        # Only means are compared, so the examples need not be in the same order.
        goal = float(ops.mean(self.head.epistemic(targets)))

        @functools.cache  # brentq evaluates the bounds checked below again
        def excess(log_factor):
            spread = self.head.spread(outputs, float(np.exp(log_factor)))
            return float(ops.mean(self.head.epistemic(spread))) - goal

        bounds = (-np.log(64.0), np.log(64.0))
        low, high = (excess(b) for b in bounds)
        if not (goal > 0 and low <= 0 <= high):
            raise ValueError(
                "calibrate_spread cannot match the teacher's mean epistemic "
                f"uncertainty on `x` ({goal:.6g}): with the spread scaled by 1/64 "
                f"to 64 the Hydra's ranges from {low + goal:.6g} to "
                f"{high + goal:.6g}."
            )
        # To 1e-6 relative: the float32 means are no finer.
        log_factor = optimize.brentq(excess, *bounds, xtol=1e-6)
        factor = float(ops.convert_to_numpy(self.spread)) * float(np.exp(log_factor))
        self.spread.assign(factor)
        return factor

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
        saved = _saved_layout(filepath)
        if saved is not None:
            self._prepare_load(os.fspath(filepath), *saved)
        super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)

    def load_own_variables(self, store):
        # Files saved before `spread` existed hold no variables of the model's
        # own; they load with the heads as trained (a spread of 1).
        if not len(store.keys()):
            self.spread.assign(1.0)
            return
        super().load_own_variables(store)

    def _prepare_load(self, filepath: str, num_heads, num_optimizer_vars) -> None:
        """Checks a weights file's layout and expands the head to match it."""
        if num_heads is None:
            raise ValueError(
                f"The weights file {filepath} was not saved from a HydraModel: it "
                "has no `heads` weights. Is this the right checkpoint or backup "
                "directory?"
            )
        if num_heads != self.num_heads:
            if self.num_heads != 1 or not self.built:
                raise ValueError(
                    f"The weights file {filepath} holds {num_heads} heads but this "
                    f"model has {self.num_heads}"
                    + ("" if self.built else " and is not built")
                    + ": only a built single-head model can be expanded to match."
                )
            had_train_function = self.train_function is not None
            self.add_heads(num_heads)
            if had_train_function:  # called inside `fit` (BackupAndRestore)
                self.make_train_function(force=True)
        optimizer = getattr(self, "optimizer", None)
        if (
            num_optimizer_vars is not None
            and optimizer is not None
            and optimizer.built
            and num_optimizer_vars != len(optimizer.variables)
        ):
            raise ValueError(
                f"The weights file {filepath} holds {num_optimizer_vars} optimizer "
                f"variables but optimizer {optimizer.name!r} has "
                f"{len(optimizer.variables)}: it was saved with another "
                "optimizer or model."
            )

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


def _is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def _check_backup(callback: keras.callbacks.BackupAndRestore) -> None:
    """Raises if a backup directory would restore a wrong training state.

    Keras restores the weights and the epoch from two files, written one
    after the other, and reads whichever exists: weights without the epoch
    would re-run every epoch from trained weights, an epoch without weights
    would skip epochs from the initial ones. Both files present, or neither,
    is a consistent state.
    """
    weights = os.path.exists(callback._weights_path)
    metadata = os.path.exists(callback._training_metadata_path)
    if weights == metadata:
        if metadata:
            with open(callback._training_metadata_path) as f:
                text = f.read()
            try:
                epoch = json.loads(text)["epoch"]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(
                    f"The backup directory {callback.backup_dir} has an unreadable "
                    f"training_metadata.json ({text[:80]!r}). Delete the directory "
                    "to train from the start."
                ) from error
            if not isinstance(epoch, int) or epoch < 0:
                raise ValueError(
                    f"The backup directory {callback.backup_dir} records epoch "
                    f"{epoch!r}, not an epoch count."
                )
        return
    present, missing = (
        ("weights", "training_metadata.json")
        if weights
        else ("training_metadata.json", "latest.weights.h5")
    )
    raise ValueError(
        f"The backup directory {callback.backup_dir} has {present} but no "
        f"{missing} (the process may have died while writing the backup): "
        "resuming from it would train the wrong epochs. Delete the directory to "
        "train from the start."
    )


def _saved_layout(filepath) -> tuple[int | None, int | None] | None:
    """`(num_heads, num_optimizer_variables)` of a Keras weights file.

    Either is `None` when the file has no such weights. Returns `None` for
    files this does not inspect (sharded `.weights.json`), left to Keras.
    Raises `OSError` naming the file if it is not a readable HDF5 file.
    """
    path = os.fspath(filepath)
    try:
        if path.endswith(".weights.h5"):
            with h5py.File(path, "r") as f:
                return _layout_of(f)
        if path.endswith(".keras"):
            with zipfile.ZipFile(path) as archive:
                data = io.BytesIO(archive.read("model.weights.h5"))
            with h5py.File(data, "r") as f:
                return _layout_of(f)
    except (OSError, zipfile.BadZipFile, KeyError) as error:
        raise OSError(
            f"Cannot read the weights file {path}: it is corrupt, truncated or "
            f"not a Keras weights file ({type(error).__name__}: {error})."
        ) from error
    return None


def _layout_of(f: h5py.File) -> tuple[int | None, int | None]:
    kernel = f.get("heads/vars/0")
    optimizer = f.get("optimizer/vars")
    return (
        int(kernel.shape[0]) if isinstance(kernel, h5py.Dataset) else None,
        len(optimizer) if isinstance(optimizer, h5py.Group) else None,
    )


def _rebuilt_optimizer(optimizer, variables, copy_head: bool = True):
    """A copy of `optimizer` built for `variables`, with the state carried over.

    Optimizer variables are created in the order of the model's variables,
    and `add_heads` keeps that order, so the old and new lists align one to
    one. A head's slot of leading size 1 is repeated for each new head, or
    left at its initial value when the heads are fresh (`copy_head=False`).
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
            if not copy_head:
                continue
            value = np.repeat(value, new.shape[0], axis=0)
        new.assign(value)
    return rebuilt
