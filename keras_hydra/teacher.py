"""The teacher ensemble: its members' outputs, stacked as distillation targets."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="keras_hydra")
class Ensemble(keras.Model):
    """Stacks the outputs of M member models into `[batch, M, ...]`.

    Used to compute a Hydra's targets, offline with `predict` below or online
    inside the train step (`HydraModel(..., teacher=members)`, which calls it
    with `training=False`). `training` is passed through to the members, so
    members with Dropout or BatchNormalization trained together through
    `Ensemble.fit` train in training mode.

    Args:
        members: sequence of Keras models that take the same inputs and return
            outputs of the same shape.
        **kwargs: base model arguments.

    Example:

    >>> members = [keras.Sequential([keras.layers.Dense(3)]) for _ in range(4)]
    >>> tuple(Ensemble(members)(np.zeros((2, 5), "float32")).shape)
    (2, 4, 3)
    """

    def __init__(self, members: Sequence[keras.Model], **kwargs):
        super().__init__(**kwargs)
        members = list(members)
        if not members:
            raise ValueError("The teacher needs at least one member; received none.")
        self.members = members

    def call(self, inputs, training=None):
        return ops.stack([m(inputs, training=training) for m in self.members], axis=1)

    def get_config(self):
        config = super().get_config()
        config["members"] = [
            keras.saving.serialize_keras_object(m) for m in self.members
        ]
        return config

    @classmethod
    def from_config(cls, config):
        members = [keras.saving.deserialize_keras_object(m) for m in config["members"]]
        return cls(members, **{k: v for k, v in config.items() if k != "members"})


def predict(
    members: Sequence[keras.Model] | keras.Model,
    x,
    batch_size: int = 256,
    dtype: str = "float32",
    verbose: int | str = 0,
) -> np.ndarray:
    """Runs the teacher once over `x` and returns its cached targets.

    All members run in one batched pass over the data, so a dataset is read
    once. Store the result and pass it as `y` to every `fit` call: targets are
    computed once, never per epoch.

    Args:
        members: the teacher's member models, or one model whose outputs are
            already stacked `[batch, M, ...]` (an `Ensemble`, or a
            `HydraModel` with M heads).
        x: inputs: a numpy array (or structure of arrays) or a `tf.data.Dataset`
            in a fixed order (do not shuffle it, or targets misalign).
        batch_size: int, examples per batch for array inputs.
        dtype: storage dtype of the targets. `"float16"` halves the
            returned array, but `fit` on numpy arrays casts float inputs to
            `keras.config.floatx()` (float32) when it slices them, so it
            saves nothing during `fit` (the speed benchmark measures this).
        verbose: progress bar setting passed to `keras.Model.predict`.

    Returns:
        Array `[N, M, ...]`: member `m`'s output for example `n` at `[n, m]`.

    Example:

    >>> members = [keras.Sequential([keras.layers.Dense(3)]) for _ in range(4)]
    >>> predict(members, np.zeros((10, 5), "float32"), dtype="float16").shape
    (10, 4, 3)
    """
    ensemble = members if isinstance(members, keras.Model) else Ensemble(members)
    outputs = ensemble.predict(x, batch_size=batch_size, verbose=verbose)
    return outputs.astype(dtype, copy=False)
