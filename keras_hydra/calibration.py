"""Post-hoc calibration of the heads' spread (`HydraModel.calibrate_spread`)."""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_hydra import validation
from keras_hydra.teacher import predict as predict_targets


def calibrate_spread(model, x, y=None, batch_size: int | None = None, verbose=0):
    """Fits `model.spread`; see `HydraModel.calibrate_spread`."""
    from scipy import optimize

    if model.num_heads == 1:
        raise ValueError(
            "calibrate_spread scales the disagreement between heads, but this "
            "model has one head: call add_heads first."
        )
    if y is None and model.teacher is not None:
        y = predict_targets(model.teacher, x, batch_size=batch_size or 256)
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
    validation.check_targets(model, targets)
    if not getattr(getattr(model, "loss", None), "from_logits", True):
        targets = np.log(np.maximum(targets, 1e-12))  # probabilities as logits
    outputs = ops.cast(
        model.predict(x, batch_size=batch_size, verbose=verbose), "float32"
    )
    if outputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"The targets have shape {targets.shape} but the model's outputs "
            f"on `x` have shape {tuple(outputs.shape)}: they must cover the "
            "same examples."
        )
    # Only means are compared, so the examples need not be in the same order.
    goal = float(ops.mean(model.head.epistemic(targets)))

    @functools.cache  # brentq evaluates the bounds checked below again
    def excess(log_factor):
        spread = model.head.spread(outputs, float(np.exp(log_factor)))
        return float(ops.mean(model.head.epistemic(spread))) - goal

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
    factor = float(ops.convert_to_numpy(model.spread)) * float(np.exp(log_factor))
    model.spread.assign(factor)
    return factor
