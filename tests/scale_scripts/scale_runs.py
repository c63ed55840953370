"""Runs for `tests/test_scale.py` that need a fresh TensorFlow process.

Logical CPU devices and op determinism are process-global and must be set
before any TF op runs, so each run lives in its own interpreter:

    python scale_runs.py mirrored OUT_DIR
    python scale_runs.py determinism OUT_DIR

Each writes `OUT_DIR/<run>.npz` (arrays) and `OUT_DIR/<run>.json` (facts).
"""

from __future__ import annotations

import json
import os
import sys

NUM_MEMBERS = 4
NUM_CLASSES = 3
NUM_FEATURES = 5
GLOBAL_BATCH = 16


def data(n=64, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, NUM_FEATURES)).astype("float32")
    targets = rng.normal(size=(n, NUM_MEMBERS, NUM_CLASSES)).astype("float32")
    return x, targets


def hydra(seed=0):
    import keras

    import keras_hydra as kh

    keras.utils.set_random_seed(seed)
    body = keras.Sequential([keras.layers.Dense(8, activation="relu")], name="body")
    model = kh.HydraModel(body, kh.heads.Categorical(NUM_CLASSES, hidden_units=(4,)))
    model.compile(optimizer="adam", loss=kh.losses.HydraKL(temperature=2.0))
    model.build((None, NUM_FEATURES))
    return model


def two_phases(model, x, targets, phases=2, shuffle=False, sample_weight=None):
    """Phase 1, add_heads, phase 2 (2 epochs each, batches of 16).

    Returns the per-epoch losses and the optimizer state after `add_heads`
    (after phase 1 when `phases == 1`).
    """
    import numpy as np

    kwargs = {"batch_size": GLOBAL_BATCH, "epochs": 2, "verbose": 0}
    kwargs.update(shuffle=shuffle, sample_weight=sample_weight)
    losses = model.fit(x, targets, **kwargs).history["loss"]
    if phases == 2:
        model.add_heads(NUM_MEMBERS)
    state = [np.array(v.numpy()) for v in model.optimizer.variables]
    if phases == 2:
        losses += model.fit(x, targets, **kwargs).history["loss"]
    return losses, state


def is_mirrored(variable):
    import tensorflow as tf

    return isinstance(
        getattr(variable, "value", variable), tf.distribute.DistributedValues
    )


def run(model, initial, x, targets, **kwargs):
    """`two_phases` from the weights `initial`: losses, weights, Adam state."""
    import numpy as np

    model.set_weights(initial)
    losses, state = two_phases(model, x, targets, **kwargs)
    return {
        "losses": np.array(losses),
        "weights": np.concatenate([w.ravel() for w in model.get_weights()]),
        "state": np.concatenate([s.ravel() for s in state]),
    }


def mirrored(out):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import numpy as np

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    arrays, facts = {}, {"replicas": strategy.num_replicas_in_sync}

    def in_scope():
        with strategy.scope():
            return hydra()

    single = hydra()
    initial = single.get_weights()
    results = {}
    x, targets = data(n=64)  # 4 batches of 16: 8 examples per replica
    results["single"] = run(single, initial, x, targets)
    model = in_scope()
    results["mirrored"] = run(model, initial, x, targets)
    facts["strategy_kept"] = model.distribute_strategy is strategy
    facts["mirrored_weights"] = [is_mirrored(v) for v in model.weights]
    facts["mirrored_optimizer"] = [is_mirrored(v) for v in model.optimizer.variables]
    facts["head_shapes"] = [list(v.shape) for v in model.heads.weights]

    # 63 examples: the last batch of 15 splits 8 + 7 over the replicas. Each
    # replica averages its share and Keras averages the replicas, so that step
    # equals a single-device step weighting the halves by 15/16 and 15/14.
    x, targets = data(n=63)
    weights = np.ones(63, "float32")
    weights[48:56], weights[56:] = 15 / 16, 15 / 14
    kwargs = {"phases": 1}  # phase 1 only, to save time
    results["single63"] = run(hydra(), initial, x, targets, **kwargs)
    results["weighted63"] = run(
        hydra(), initial, x, targets, sample_weight=weights, **kwargs
    )
    results["mirrored63"] = run(in_scope(), initial, x, targets, **kwargs)

    # A global batch of 15 splits 8 + 7 from the first batch on: Keras's
    # first-batch build (`strategy.reduce` of that batch) cannot add the halves.
    model = in_scope()
    try:
        model.fit(x, targets, batch_size=15, epochs=1, verbose=0)
        facts["batch15_error"] = None
    except Exception as error:  # noqa: BLE001 - recorded for the test to check
        facts["batch15_error"] = f"{type(error).__name__}: {error}"
    facts["batch15_iterations"] = int(model.optimizer.iterations.numpy())

    # Built outside the scope, then fit inside it.
    outside = hydra()
    try:
        with strategy.scope():
            outside.fit(x, targets, epochs=1, verbose=0)
        facts["outside_error"] = None
    except Exception as error:  # noqa: BLE001 - recorded for the test to check
        facts["outside_error"] = f"{type(error).__name__}: {error}"
    facts["outside_iterations"] = int(outside.optimizer.iterations.numpy())

    for name, result in results.items():
        arrays.update({f"{name}_{k}": v for k, v in result.items()})
    np.savez(os.path.join(out, "mirrored.npz"), **arrays)
    with open(os.path.join(out, "mirrored.json"), "w") as f:
        json.dump(facts, f)


def determinism(out):
    import numpy as np
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    x, targets = data()
    arrays = {}
    for i in range(2):
        model = hydra(seed=7)
        # Shuffled batches: the seed fixes their order too.
        arrays[f"losses{i}"], _ = two_phases(model, x, targets, shuffle=True)
        arrays[f"weights{i}"] = np.concatenate([w.ravel() for w in model.get_weights()])
    np.savez(os.path.join(out, "determinism.npz"), **arrays)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    {"mirrored": mirrored, "determinism": determinism}[sys.argv[1]](sys.argv[2])
