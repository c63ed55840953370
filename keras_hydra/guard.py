"""In-graph checks that stop training on bad data before any weight moves.

`HydraModel(check_finite=True)` (the default) runs `problems` on every
training batch, inside the compiled train step. A batch with a problem is
skipped as a whole (no weight, optimizer slot or metric is updated), the
first such step is recorded in a small variable, every later step of the
same `fit` is skipped too, and `DataGuard` raises a `ValueError` naming the
step and the tensor within `DataGuard.every` batches and at the end of each
epoch. `tf.debugging` assertions are not used: XLA drops them, so they would
not work under `jit_compile`.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

# The checks, in the order of the recorded flags.
CHECKS = (
    "non-finite inputs x",
    "non-finite targets y",
    "non-finite sample_weight",
    "invalid targets y",
)


def _floats(structure) -> list:
    """The floating tensors of `structure`; integers (token ids, ...) are finite."""
    return [
        t
        for t in keras.tree.flatten(structure)
        if t is not None and t.dtype.is_floating
    ]


def _any_non_finite(structure) -> tf.Tensor:
    flags = [ops.logical_not(ops.all(ops.isfinite(t))) for t in _floats(structure)]
    if not flags:
        return ops.convert_to_tensor(False)
    return ops.any(ops.stack(flags))


def problems(model, x, y, sample_weight) -> tf.Tensor:
    """Float32 flags `[len(CHECKS)]`: 1 where the batch fails that check.

    Invalid targets are what the compiled loss's `invalid_targets` (if it
    has one) detects cheaply in the graph: probability rows that are negative
    or do not sum to 1 (`HydraKL(from_logits=False)`), non-positive scales
    (`DistributionKL`).
    """
    check = getattr(getattr(model, "loss", None), "invalid_targets", None)
    invalid = ops.convert_to_tensor(False)
    if y is not None and check is not None:
        invalid = check(y)
    flags = [
        _any_non_finite(x),
        _any_non_finite(y),
        _any_non_finite(sample_weight),
        invalid,
    ]
    return ops.cast(ops.stack(flags), "float32")


def nan_where_non_finite(inputs, outputs):
    """`outputs` with every example whose inputs are not all finite set to NaN.

    What `HydraModel` returns outside training, so that a NaN or Inf input
    row never gets a confident answer with zero uncertainty (a network can
    map NaN to finite logits, e.g. through `relu`). Integer inputs (token
    ids, ...) are taken as finite.
    """
    tensors = _floats(inputs)
    if not tensors:
        return outputs
    finite = [
        ops.all(ops.isfinite(t), axis=tuple(range(1, len(t.shape))))
        if len(t.shape) > 1
        else ops.isfinite(t)
        for t in tensors
    ]
    finite = ops.all(ops.stack(finite, axis=-1), axis=-1)
    finite = ops.reshape(finite, (-1,) + (1,) * (len(outputs.shape) - 1))
    return ops.where(finite, outputs, ops.cast(float("nan"), outputs.dtype))


class Record:
    """The first bad step of a `fit` and its flags, out of Keras tracking.

    `values` is int64 `[1 + len(CHECKS)]`: the step (`-1` while no batch was
    bad) and the flags of that step.
    """

    def __init__(self):
        self.values = tf.Variable(
            tf.constant([-1] + [0] * len(CHECKS), tf.int64),
            trainable=False,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            name="guard_record",
        )

    def reset(self) -> None:
        self.values.assign([-1] + [0] * len(CHECKS))

    def clean(self) -> tf.Tensor:
        return ops.less(self.values[0], 0)

    def note(self, step, flags) -> None:
        self.values.assign(
            ops.concatenate([ops.reshape(step, (1,)), ops.cast(flags > 0, "int64")])
        )

    def error(self) -> ValueError | None:
        """The error for the recorded step, or `None` if every step was clean."""
        values = self.values.numpy()
        if values[0] < 0:
            return None
        found = [name for name, bad in zip(CHECKS, values[1:], strict=True) if bad]
        return ValueError(
            f"Bad training data at step {int(values[0])} (counting the "
            f"optimizer's steps from 0): {', '.join(found)}. The step and every "
            "later one were skipped, so the weights are those from before it. "
            "Clean the data, or pass check_finite=False to HydraModel to train "
            "unchecked."
        )


def guarded_step(model, step_fn, data):
    """Runs `step_fn(data)` only if the batch and all earlier ones are clean.

    Under a `tf.distribute` strategy the flags are summed over replicas, so
    every replica takes the same branch. Strategies whose updates synchronise
    through `merge_call` (Mirrored, MultiWorkerMirrored) cannot do so inside
    a `cond` in a replica context; there the `cond` runs in the cross-replica
    context and the step in each replica, the pattern of Keras's own
    `LossScaleOptimizer`.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    flags = problems(model, x, y, sample_weight)
    record = model._record

    def skip():
        def note():
            record.note(ops.cast(model.optimizer.iterations, "int64"), flags)

        tf.cond(record.clean(), note, lambda: None)

    def train():
        step_fn(data)

    if not tf.distribute.has_strategy():
        ok = ops.logical_and(ops.all(flags == 0), record.clean())

        def skipped():
            skip()
            return model.get_metrics_result()

        return ops.cond(ok, lambda: step_fn(data), skipped)

    context = tf.distribute.get_replica_context()
    flags = context.all_reduce(tf.distribute.ReduceOp.SUM, flags)
    ok = ops.logical_and(ops.all(flags == 0), record.clean())
    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(ok, train, skip)
        return model.get_metrics_result()

    def cross_replica(strategy, ok, data):
        def train_each():
            strategy.extended.call_for_each_replica(step_fn, args=(data,))

        tf.cond(strategy.experimental_local_results(ok)[0], train_each, skip)

    context.merge_call(cross_replica, args=(ok, data))
    return model.get_metrics_result()


class DataGuard(keras.callbacks.Callback):
    """Raises the guard's error within `every` batches of the bad step.

    `HydraModel.fit` adds it, first, when `check_finite` is on; users never
    need to. Steps after the bad one are skipped, so raising a few batches
    later changes no weight, and it spares the other batches a host round
    trip to read the record (about 0.5 % of a step in the speed benchmark).
    """

    def __init__(self, record: Record, every: int = 16):
        super().__init__()
        self._record = record
        self.every = every
        self._batches = 0

    def on_train_begin(self, logs=None):
        self._record.reset()
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self._batches % self.every == 0:
            self._raise()

    def on_epoch_end(self, epoch, logs=None):
        self._raise()

    def _raise(self):
        error = self._record.error()
        if error is not None:
            raise error
