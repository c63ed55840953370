"""Every use of a private Keras or TensorFlow internal, in one place.

Each function names the private attribute it touches and why; `TOUCHED`
lists them all, and `tests/test_keras_internals.py` fails if an upgrade of
Keras or TensorFlow removes or renames one. Check this module first when
upgrading Keras.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

# (owner, private attribute, why), checked by tests/test_keras_internals.py.
TOUCHED = (
    (
        "keras.Model",
        "_maybe_symbolic_build",
        "keras-team/keras#20585: the first-batch build reduces the batch over "
        "replicas, which fails under multi-worker collectives",
    ),
    (
        "tf.distribute.MultiWorkerMirroredStrategy.extended",
        "_in_multi_worker_mode",
        "keras-team/keras#20585: multi-worker logs are reduced with axis=0",
    ),
    (
        "keras.Model",
        "_initial_epoch",
        "BackupAndRestore sets it on restore and Keras never resets it",
    ),
    ("keras.Model", "_tracker", "add_heads swaps a built, locked layer"),
    ("keras.Model", "_lock_state", "add_heads swaps a built, locked layer"),
    (
        "keras.callbacks.BackupAndRestore",
        "_weights_path",
        "fit checks a backup directory before Keras restores from it",
    ),
    (
        "keras.callbacks.BackupAndRestore",
        "_training_metadata_path",
        "fit checks a backup directory before Keras restores from it",
    ),
)


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` runs several workers (`_in_multi_worker_mode`)."""
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def reducible_logs(logs: dict, strategy: tf.distribute.Strategy) -> dict:
    """Gives scalar logs a batch axis of 1 under multi-worker training.

    Keras (keras-team/keras#20585) reduces each log of a multi-worker step
    with `strategy.reduce("MEAN", value, axis=0)`, which rejects scalars.
    With an axis of length 1 that reduction is the mean over replicas, what
    Keras computes for `MirroredStrategy`. Should Keras switch to
    `axis=None`, logs would come back with shape `[1]`, which
    `tests/test_scale.py::test_multi_worker_logs_are_scalars` catches.
    """
    if not is_multi_worker(strategy):
        return logs
    return keras.tree.map_structure(
        lambda v: ops.reshape(v, (1,)) if len(v.shape) == 0 else v, logs
    )


def first_replica_batch(model: keras.Model, iterator):
    """Replica 0's part of the first batch, for `_maybe_symbolic_build`.

    Keras builds from the first batch averaged over replicas by
    `strategy.reduce` (keras-team/keras#20585), which fails under
    multi-worker collectives and when replicas hold unequal parts of a
    batch. Only shapes matter for that build: replica 0's part will do.
    Returns `None` when there is no strategy (Keras then builds as usual).
    """
    strategy = model._distribute_strategy
    if iterator is None or strategy is None:
        return None
    local = strategy.experimental_local_results
    for _, _, batches in iterator:
        return keras.tree.map_structure(
            lambda v: local(v)[0], next(batches), none_is_leaf=False
        )
    return None


def forget_restored_epoch(model: keras.Model) -> None:
    """Clears the epoch `BackupAndRestore` set when it last restored.

    Keras never resets `_initial_epoch`: without this, a later `fit` in the
    same process (e.g. phase 2 after a restored phase 1) would silently
    skip epochs.
    """
    model._initial_epoch = None


def replace_layer(model: keras.Model, name: str, layer: keras.layers.Layer) -> None:
    """Sets `model.<name> = layer` on a built model, whose state Keras locks."""
    model._tracker.unlock()
    model._tracker.untrack(getattr(model, name))
    setattr(model, name, layer)
    model._lock_state()


def backup_paths(callback: keras.callbacks.BackupAndRestore) -> tuple[str, str]:
    """The weights file and the epoch file a `BackupAndRestore` restores from."""
    return callback._weights_path, callback._training_metadata_path
