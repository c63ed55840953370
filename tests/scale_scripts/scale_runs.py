"""Runs for `tests/test_scale.py` that need a fresh TensorFlow process.

Logical CPU devices and op determinism are process-global and must be set
before any TF op runs, so each run lives in its own interpreter:

    python scale_runs.py mirrored OUT_DIR
    python scale_runs.py determinism OUT_DIR
    python scale_runs.py multi_worker OUT_DIR

`multi_worker` starts two `worker` processes on local ports, runs the
single-process reference meanwhile, and gathers all three into its files.

Each writes `OUT_DIR/<run>.npz` (arrays) and `OUT_DIR/<run>.json` (facts).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
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


def hydra(seed=0, conv=False):
    """A small Hydra; with `conv`, conv heads on a 5x1x4 feature map."""
    import keras

    import keras_hydra as kh

    keras.utils.set_random_seed(seed)
    layers = [keras.layers.Dense(8, activation="relu")]
    if conv:
        layers = [
            keras.layers.Reshape((NUM_FEATURES, 1, 1)),
            keras.layers.Conv2D(4, (3, 1), padding="same", activation="relu"),
        ]
    body = keras.Sequential(layers, name="body")
    head = kh.heads.Categorical(
        NUM_CLASSES, hidden_units=(4,), conv_filters=3 if conv else 0
    )
    model = kh.HydraModel(body, head)
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
    single_conv = hydra(conv=True)
    initial_conv = single_conv.get_weights()
    results["single_conv"] = run(single_conv, initial_conv, x, targets)
    with strategy.scope():
        mirrored_conv = hydra(conv=True)
    results["mirrored_conv"] = run(mirrored_conv, initial_conv, x, targets)
    # The spread, a mirrored weight assigned outside the train step: after
    # more phase-2 epochs, so that the heads differ, both models calibrate to
    # the single model's heads spread twice as far.
    for trained in (single, model):
        trained.fit(x, targets, batch_size=GLOBAL_BATCH, epochs=30, verbose=0)
    raw = single.predict(x, verbose=0)
    mean = raw.mean(axis=1, keepdims=True)
    arrays["wider"] = mean + 2.0 * (raw - mean)
    for name, trained in [("single", single), ("mirrored", model)]:
        facts[f"{name}_spread"] = trained.calibrate_spread(x, arrays["wider"])
        arrays[f"{name}_spread_outputs"] = trained.predict(x, verbose=0)

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

    # A global batch of 15 splits 8 + 7 from the first batch on, which Keras's
    # own first-batch build (a `strategy.reduce` of that batch) cannot add.
    model = in_scope()
    history = model.fit(x, targets, batch_size=15, epochs=1, verbose=0).history
    facts["batch15_loss"] = history["loss"][0]
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

    # Bad data in the third batch (rows 32-47), seen by one replica only:
    # NaN inputs on replica 1 (row 44), NaN targets on replica 0 (row 34,
    # through tf.data, which `fit` checks in the graph only).
    x, targets = data(n=64)
    clean = in_scope()
    clean.set_weights(initial)
    clean.fit(x[:32], targets[:32], batch_size=GLOBAL_BATCH, shuffle=False, verbose=0)
    arrays["guard_clean_weights"] = np.concatenate(
        [w.ravel() for w in clean.get_weights()]
    )
    bad_x, bad_targets = x.copy(), targets.copy()
    bad_x[44, 0] = np.nan
    bad_targets[34, 1, 2] = np.nan
    cases = {
        "x": (bad_x, targets),
        "y": (tf.data.Dataset.from_tensor_slices((x, bad_targets)).batch(16), None),
    }
    for name, (inputs, labels) in cases.items():
        model = in_scope()
        model.set_weights(initial)
        try:
            model.fit(
                inputs,
                labels,
                batch_size=None if labels is None else GLOBAL_BATCH,
                shuffle=False,
                epochs=2,
                verbose=0,
            )
            facts[f"guard_{name}_error"] = None
        except ValueError as error:
            facts[f"guard_{name}_error"] = str(error)
        facts[f"guard_{name}_iterations"] = int(model.optimizer.iterations.numpy())
        arrays[f"guard_{name}_weights"] = np.concatenate(
            [w.ravel() for w in model.get_weights()]
        )

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


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def distributed_fit(model, x, targets):
    """`two_phases` with validation, then predictions: arrays and log shapes."""
    import numpy as np

    kwargs = {"batch_size": GLOBAL_BATCH, "epochs": 2, "verbose": 0}
    kwargs.update(shuffle=False, validation_data=(x[:32], targets[:32]))
    history = [model.fit(x, targets, **kwargs).history]
    model.add_heads(NUM_MEMBERS)
    history.append(model.fit(x, targets, **kwargs).history)
    logs = {k: sum((h[k] for h in history), []) for k in history[0]}
    return {
        "losses": np.array(logs["loss"]),
        "val_losses": np.array(logs["val_loss"]),
        "weights": np.concatenate([w.ravel() for w in model.get_weights()]),
        "outputs": model.predict(x, batch_size=GLOBAL_BATCH, verbose=0),
        "evaluate": np.array(model.evaluate(x, targets, verbose=0)),
    }, {k: [list(np.shape(v)) for v in values] for k, values in logs.items()}


def worker(out, index, ports):
    """One of the two workers of `multi_worker`, each with one CPU replica."""
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports.split(",")]},
            "task": {"type": "worker", "index": int(index)},
        }
    )
    import numpy as np
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = hydra()
    arrays, log_shapes = distributed_fit(model, *data(n=64))
    np.savez(os.path.join(out, f"worker{index}.npz"), **arrays)
    facts = {"replicas": strategy.num_replicas_in_sync, "log_shapes": log_shapes}
    with open(os.path.join(out, f"worker{index}.json"), "w") as f:
        json.dump(facts, f)


def multi_worker(out):
    ports = ",".join(str(p) for p in free_ports(2))
    workers = []
    for index in range(2):
        command = [sys.executable, __file__, "worker", out, str(index), ports]
        with open(os.path.join(out, f"worker{index}.log"), "w") as log:
            workers.append(subprocess.Popen(command, stderr=log))
    import numpy as np

    single, _ = distributed_fit(hydra(), *data(n=64))
    arrays = {f"single_{k}": v for k, v in single.items()}
    facts = {"workers": []}
    for index, process in enumerate(workers):
        try:
            process.wait(timeout=240)
        except subprocess.TimeoutExpired:
            for p in workers:
                p.kill()
                p.wait()
        if process.returncode != 0:
            with open(os.path.join(out, f"worker{index}.log")) as log:
                sys.exit(f"worker {index} failed:\n{log.read()[-3000:]}")
        with np.load(os.path.join(out, f"worker{index}.npz")) as worker:
            arrays.update({f"worker{index}_{k}": worker[k] for k in worker.files})
        with open(os.path.join(out, f"worker{index}.json")) as f:
            facts["workers"].append(json.load(f))
    np.savez(os.path.join(out, "multi_worker.npz"), **arrays)
    with open(os.path.join(out, "multi_worker.json"), "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    runs = {"mirrored": mirrored, "determinism": determinism}
    runs.update(multi_worker=multi_worker, worker=worker)
    runs[sys.argv[1]](*sys.argv[2:])
    # The results are written and closed. Skip the interpreter's teardown,
    # where TensorFlow now and then segfaults under load (seen as exit code
    # -11 after a complete run; tensorflow/tensorflow#40186).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
