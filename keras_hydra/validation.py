"""Checks of a Hydra's training data at the API boundary."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_hydra import losses

_SAMPLE_SIZE = 32  # examples run through an online teacher to check its outputs


def _is_number(value) -> bool:
    real = (int, float, np.integer, np.floating)
    return (
        isinstance(value, real) and not isinstance(value, bool) and np.isfinite(value)
    )


def count(value, name: str, minimum: int = 1) -> int:
    """`value` as an int, if it is an integer >= `minimum` (`3` or `3.0`, not `2.7`).

    Raises:
        ValueError: naming `name` and `value` otherwise.
    """
    if _is_number(value) and value == int(value) and value >= minimum:
        return int(value)
    kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise ValueError(f"{name} must be {kind}, got {value!r}.")


def non_negative(value, name: str) -> float:
    """`value` as a float, if it is a finite number >= 0.

    Raises:
        ValueError: naming `name` and `value` otherwise.
    """
    if _is_number(value) and value >= 0:
        return float(value)
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")


def check_not_empty(x, what: str = "x") -> None:
    """Raises a `ValueError` if `x` (arrays or a dataset) holds no examples.

    A dataset of unknown size (e.g. after `filter`) is not inspected.
    """
    if isinstance(x, tf.data.Dataset):
        if int(x.cardinality()) == 0:
            raise ValueError(
                f"{what} is an empty tf.data.Dataset: there is nothing to fit."
            )
        return
    for array in keras.tree.flatten(x):
        shape = getattr(array, "shape", None)
        if shape is not None and len(shape) and shape[0] == 0:
            raise ValueError(
                f"{what} holds no examples (an array of shape {tuple(shape)}): "
                "there is nothing to fit."
            )


def check_head_and_loss(model) -> None:
    """Raises a `ValueError` if the compiled loss is for another kind of head.

    A `Distribution` head needs a `DistributionKL` or `DistributionNLL` of
    its family, a `Categorical` head `HydraKL`; a loss of the user's own is
    not checked.
    """
    loss = getattr(model, "loss", None)
    loss_family = getattr(loss, "family", None)
    head_family = getattr(model.head, "family", None)
    if isinstance(loss, losses.HydraKL):
        matches = head_family is None
    elif loss_family is not None:
        matches = loss_family is head_family
    else:
        return  # a loss of the user's own: nothing known to compare
    if matches:
        return
    head = type(model.head).__name__
    if head_family is not None:
        head = f"{head}({head_family.__name__!r})"
    family = f"({loss_family.__name__!r})" if loss_family is not None else ""
    raise ValueError(
        f"The compiled loss {type(loss).__name__}{family} does not match the "
        f"model's {head} head: a Distribution head is trained with "
        "DistributionKL or DistributionNLL of the same family, a Categorical "
        "head with HydraKL."
    )


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
