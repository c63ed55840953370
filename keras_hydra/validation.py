"""Checks of a Hydra's training data at the API boundary."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

_SAMPLE_SIZE = 32  # examples run through an online teacher to check its outputs


def validate_data(model, x, y) -> None:
    """Checks a sample of the teacher targets before any training step.

    Only distillation losses (those with `validate_targets`) take teacher
    targets; other losses, e.g. an NLL on labels, are left to Keras.

    Raises:
        ValueError: if the sampled targets do not fit the model's heads and
            loss (see `check_targets`).
    """
    if not hasattr(getattr(model, "loss", None), "validate_targets"):
        return
    targets = sample_targets(model, x, y)
    if targets is not None:
        check_targets(model, targets)


def check_targets(model, targets: np.ndarray) -> None:
    """Raises unless `targets` are finite teacher targets for `model`'s heads."""
    if not np.all(np.isfinite(targets)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(targets))[0])
        raise ValueError(
            f"Teacher targets contain NaN or Inf (first at index {bad}, "
            f"value {targets[bad]})."
        )
    model.head.validate_targets(targets)
    loss = getattr(model, "loss", None)
    if hasattr(loss, "validate_targets"):
        loss.validate_targets(targets, model.num_heads)


def sample_targets(model, x, y) -> np.ndarray | None:
    """Targets of a first batch (or of `y`), or `None` where none can be seen."""
    if isinstance(x, tf.data.Dataset):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(next(iter(x.take(1))))
    elif model.teacher is not None:
        x = keras.tree.map_structure(lambda a: a[:_SAMPLE_SIZE], x)
    if model.teacher is not None:
        y = model.teacher(x, training=False)
    if y is None or not hasattr(y, "shape"):
        return None  # generators and PyDatasets are not inspected here
    return np.asarray(ops.convert_to_numpy(y))
