"""Keras callbacks for distillation runs."""

from __future__ import annotations

import sys

import keras


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
