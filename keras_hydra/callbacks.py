"""Keras callbacks for distillation runs."""

from __future__ import annotations

import sys
from collections.abc import Callable

import keras
import numpy as np
from keras import ops

from keras_hydra import uncertainty, validation
from keras_hydra.losses import HydraKL
from keras_hydra.metrics import HeadDisagreement


@keras.saving.register_keras_serializable(package="keras_hydra")
class PhaseProgbar(keras.callbacks.Callback):
    """One Keras progress bar per `fit` call, advancing once per epoch.

    Use it with `fit(..., verbose=0)` to keep a log to one line per training
    phase instead of one per batch. On a terminal the bar updates in place; in
    a log file only the final line is written.

    Args:
        label: str, the phase's name, printed before the bar.
        epochs: int, the number of epochs of the phase.

    Example:

    >>> progress = PhaseProgbar("phase 1", epochs=3)
    >>> progress.epochs
    3
    """

    def __init__(self, label: str, epochs: int):
        super().__init__()
        self.label = label
        self.epochs = int(epochs)

    def on_train_begin(self, logs=None):
        interactive = sys.stdout.isatty()
        # Without a terminal the bar prints once, at the end, on this line.
        print(f"{self.label}:", end="\n" if interactive else " ", flush=True)
        self._bar = keras.utils.Progbar(
            self.epochs, verbose=1 if interactive else 2, unit_name="epoch"
        )

    def on_epoch_end(self, epoch, logs=None):
        self._bar.update(epoch + 1, values=list((logs or {}).items()))

    def get_config(self):
        return {"label": self.label, "epochs": self.epochs}


@keras.saving.register_keras_serializable(package="keras_hydra")
class AddHeads(keras.callbacks.Callback):
    """Expands a Hydra's head into `num_heads` heads at an epoch of one `fit`.

    Runs both training phases in a single `fit` call: at the start of epoch
    `at_epoch` (0-based) it calls `model.add_heads(num_heads, ...)` and
    re-makes the compiled train step for the new heads; the optimizer's
    state, its iteration count and the compiled metrics carry over. A model
    that already has `num_heads` heads (e.g. restored from a checkpoint) is
    left alone.

    Args:
        num_heads: int, the number of heads after expansion.
        at_epoch: int, the first epoch trained with `num_heads` heads.
        noise_stddev: float, as for `HydraModel.add_heads`.
        seed: optional int, as for `HydraModel.add_heads`.
        copy_head: bool, as for `HydraModel.add_heads`.

    Example:

    >>> import keras_hydra as kh
    >>> x = np.random.rand(32, 4).astype("float32")
    >>> targets = np.random.rand(32, 3, 2).astype("float32")
    >>> hydra = kh.HydraModel(keras.layers.Dense(8), kh.heads.Categorical(2))
    >>> hydra.compile(optimizer="adam", loss=kh.losses.HydraKL())
    >>> _ = hydra.fit(x, targets, epochs=2, verbose=0, callbacks=[AddHeads(3, 1)])
    >>> hydra.num_heads
    3
    """

    def __init__(
        self,
        num_heads: int,
        at_epoch: int,
        noise_stddev: float = 0.0,
        seed: int | None = None,
        copy_head: bool = True,
    ):
        super().__init__()
        self.num_heads = validation.count(num_heads, "num_heads")
        self.at_epoch = validation.count(at_epoch, "at_epoch", minimum=0)
        self.noise_stddev = validation.non_negative(noise_stddev, "noise_stddev")
        self.seed = seed
        self.copy_head = bool(copy_head)

    def on_train_begin(self, logs=None):
        epochs = self.params.get("epochs")
        if (
            epochs is not None
            and self.at_epoch >= epochs
            and self.model.num_heads != self.num_heads
        ):
            raise ValueError(
                f"AddHeads(at_epoch={self.at_epoch}) would never run: fit trains "
                f"epochs 0 to {epochs - 1} (epochs={epochs}). Lower at_epoch or "
                "raise epochs."
            )

    def on_epoch_begin(self, epoch, logs=None):
        if epoch < self.at_epoch or self.model.num_heads == self.num_heads:
            return
        self.model.add_heads(
            self.num_heads, self.noise_stddev, self.seed, copy_head=self.copy_head
        )
        # `fit` looks `train_function` up at every step but only makes it once,
        # before the first epoch; `evaluate` (validation) re-makes its own.
        self.model.make_train_function(force=True)

    def get_config(self):
        return {
            "num_heads": self.num_heads,
            "at_epoch": self.at_epoch,
            "noise_stddev": self.noise_stddev,
            "seed": self.seed,
            "copy_head": self.copy_head,
        }


@keras.saving.register_keras_serializable(package="keras_hydra")
class TemperatureSchedule(keras.callbacks.Callback):
    """Sets the distillation temperature at the start of each epoch.

    Assigns `schedule(epoch)` to the compiled loss's `temperature` variable
    (e.g. `HydraKL`), which the compiled train step reads at every step, and
    logs the value as `temperature`.

    Args:
        schedule: function of the 0-based epoch index returning the
            temperature, a float > 0, e.g. a
            `keras.optimizers.schedules.LearningRateSchedule` stepped per
            epoch. `get_config` can only restore it when it is serializable
            (a schedule object, or a function registered with
            `keras.saving.register_keras_serializable`).

    Raises:
        ValueError: at the start of training, if the compiled loss has no
            `temperature` variable; at an epoch, if the schedule's value is
            not > 0.

    Example:

    >>> import keras_hydra as kh
    >>> x = np.random.rand(32, 4).astype("float32")
    >>> targets = np.random.rand(32, 1, 2).astype("float32")
    >>> hydra = kh.HydraModel(keras.layers.Dense(8), kh.heads.Categorical(2))
    >>> hydra.compile(optimizer="adam", loss=kh.losses.HydraKL(temperature=4.0))
    >>> schedule = TemperatureSchedule(lambda epoch: 4.0 / (epoch + 1))
    >>> history = hydra.fit(x, targets, epochs=2, verbose=0, callbacks=[schedule])
    >>> history.history["temperature"]
    [4.0, 2.0]
    """

    def __init__(self, schedule: Callable[[int], float]):
        super().__init__()
        self.schedule = schedule

    def on_train_begin(self, logs=None):
        if not isinstance(
            getattr(self.model.loss, "temperature", None), keras.Variable
        ):
            raise ValueError(
                "TemperatureSchedule needs a compiled loss with a `temperature` "
                f"keras.Variable, such as HydraKL. Received: {self.model.loss!r}"
            )

    def on_epoch_begin(self, epoch, logs=None):
        temperature = float(self.schedule(epoch))
        if not temperature > 0:
            raise ValueError(
                f"The temperature must be > 0, but schedule({epoch}) returned "
                f"{temperature}."
            )
        self.model.loss.temperature.assign(temperature)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["temperature"] = float(
                ops.convert_to_numpy(self.model.loss.temperature)
            )

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule)}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["schedule"]))


@keras.saving.register_keras_serializable(package="keras_hydra")
class FidelityMonitor(keras.callbacks.Callback):
    """Logs how faithfully the heads reproduce the teacher, at each epoch end.

    On `(x, targets)` it adds to the epoch's logs (and so to `History`):

    - `fidelity_own_kl`: mean over examples and heads of
      `KL(member group s || head s)` at T = 1, with members grouped as in
      `HydraKL` (with `S == M`, `KL(member m || head m)`).
    - `fidelity_mi_spearman`: Spearman rank correlation between the student's
      and the ensemble's per-example mutual information (epistemic
      uncertainty); NaN while it is constant, e.g. with one head.
    - `fidelity_disagreement`: the student's `HeadDisagreement`.

    Args:
        x: inputs, as for `predict`.
        targets: teacher outputs `[N, M, K]` on `x`.
        batch_size: int, batch size of the predictions.
        from_logits: bool, whether `targets` are logits.

    Example:

    >>> import keras_hydra as kh
    >>> x = np.random.rand(32, 4).astype("float32")
    >>> targets = np.random.rand(32, 2, 3).astype("float32")
    >>> hydra = kh.HydraModel(keras.layers.Dense(8), kh.heads.Categorical(3), 2)
    >>> hydra.compile(optimizer="adam", loss=kh.losses.HydraKL())
    >>> monitor = FidelityMonitor(x, targets)
    >>> history = hydra.fit(x, targets, epochs=1, verbose=0, callbacks=[monitor])
    >>> sorted(k for k in history.history if k.startswith("fidelity"))
    ['fidelity_disagreement', 'fidelity_mi_spearman', 'fidelity_own_kl']
    """

    def __init__(self, x, targets, batch_size: int = 256, from_logits: bool = True):
        super().__init__()
        targets = np.asarray(targets, dtype="float32")
        if targets.ndim != 3:
            raise ValueError(
                "`targets` must be teacher outputs [N, members, classes]. "
                f"Received shape {targets.shape}."
            )
        self.x = x
        self.targets = targets
        self.batch_size = int(batch_size)
        self.from_logits = from_logits
        teacher = uncertainty.categorical(targets, from_logits=from_logits)
        self._teacher_mi = ops.convert_to_numpy(teacher["epistemic_uncertainty"])
        self._own_kl = HydraKL(temperature=1.0, from_logits=from_logits)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs.update(self.compute())

    def compute(self) -> dict:
        """The three fidelity values of the current model, as floats."""
        from scipy import stats

        outputs = self.model.predict(self.x, batch_size=self.batch_size, verbose=0)
        mi = uncertainty.categorical(outputs)["epistemic_uncertainty"]
        disagreement = HeadDisagreement()
        disagreement.update_state(None, outputs)
        if np.ptp(self._teacher_mi) > 0 and np.ptp(ops.convert_to_numpy(mi)) > 0:
            spearman = stats.spearmanr(ops.convert_to_numpy(mi), self._teacher_mi)
            spearman = float(spearman.statistic)
        else:
            spearman = float("nan")
        return {
            "fidelity_own_kl": float(self._own_kl(self.targets, outputs)),
            "fidelity_mi_spearman": spearman,
            "fidelity_disagreement": float(disagreement.result()),
        }

    def get_config(self):
        return {
            "x": self.x,
            "targets": self.targets,
            "batch_size": self.batch_size,
            "from_logits": self.from_logits,
        }
