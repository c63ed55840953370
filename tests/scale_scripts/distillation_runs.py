"""Runs for `tests/test_distillation.py` that need 2 logical CPU devices.

Logical devices must be configured before any TF op runs, so this lives in
its own interpreter:

    python distillation_runs.py mirrored OUT_DIR

Each run trains from the same initial weights on one device and under a
2-replica `MirroredStrategy`, and writes `OUT_DIR/mirrored.npz` (per-epoch
logs as `<run>_<where>_<log>`, final student weights as
`<run>_<where>_weights`) and `OUT_DIR/mirrored.json` (facts).
"""

from __future__ import annotations

import json
import os
import sys

NUM_MEMBERS = 4
NUM_CLASSES = 3
NUM_FEATURES = 5
GLOBAL_BATCH = 16
TEMPERATURE = 2.0


def data(n=64, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, NUM_FEATURES)).astype("float32")
    labels = rng.normal(size=(n, 1, NUM_CLASSES)).astype("float32")
    return x, labels


def models(seed=0):
    """The teacher (an `Ensemble`) and a regularized Hydra student, built."""
    import keras
    import numpy as np

    import keras_hydra as kh

    keras.utils.set_random_seed(seed)
    members = [
        keras.Sequential([keras.layers.Dense(NUM_CLASSES)], name=f"member{m}")
        for m in range(NUM_MEMBERS)
    ]
    teacher = kh.teacher.Ensemble(members)
    body = keras.Sequential(
        [
            keras.layers.Dense(
                8,
                activation="relu",
                kernel_regularizer=keras.regularizers.L2(1e-2),
            )
        ],
        name="body",
    )
    student = kh.HydraModel(body, kh.heads.Categorical(NUM_CLASSES))
    probe = np.zeros((2, NUM_FEATURES), "float32")
    teacher(probe)
    student(probe)
    return teacher, student


def strategies():
    """Two upstream-style strategies, for the runs that show upstream's scaling."""
    import keras
    from keras import ops

    import keras_hydra as kh

    class LossShare(keras.distillation.DistillationLoss):
        """Returns `HydraKL(...)`: a `Loss`'s replica share, as Keras's own."""

        def __init__(self):
            self.loss = kh.losses.HydraKL(temperature=TEMPERATURE)

        def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
            return self.loss(teacher_outputs, student_outputs)

    class ReplicaMean(LossShare):
        """Returns the replica's batch mean, as upstream's string losses do."""

        def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
            return ops.mean(self.loss.call(teacher_outputs, student_outputs))

    return LossShare, ReplicaMean


def run(name, initial):
    """One configuration `name`, trained from `initial`: logs and weights."""
    import keras
    import numpy as np

    from keras_hydra.distillation import HydraDistillation, HydraDistiller

    teacher, student = models()
    teacher.set_weights(initial[0])
    student.set_weights(initial[1])
    loss_share, replica_mean = strategies()
    x, labels = data()
    optimizer = keras.optimizers.SGD(learning_rate=0.1)
    kwargs = {"batch_size": GLOBAL_BATCH, "epochs": 2, "shuffle": False, "verbose": 0}
    histories = []
    if name == "hydra":  # both phases, no labels
        distiller = HydraDistiller(teacher, student, HydraDistillation(TEMPERATURE))
        distiller.compile(optimizer=optimizer)
        histories.append(distiller.fit(x, **kwargs).history)
        distiller.add_heads(NUM_MEMBERS)
        histories.append(distiller.fit(x, **kwargs).history)
    elif name in ("labels_instance", "labels_string"):
        distiller = HydraDistiller(
            teacher,
            student,
            HydraDistillation(TEMPERATURE),
            student_loss_weight=0.5,
        )
        loss = keras.losses.MeanSquaredError() if name == "labels_instance" else "mse"
        distiller.compile(optimizer=optimizer, loss=loss)
        histories.append(distiller.fit(x, labels, **kwargs).history)
    else:  # upstream Distiller, one phase
        strategy_loss = loss_share() if name == "upstream_share" else replica_mean()
        distiller = keras.distillation.Distiller(
            teacher, student, strategy_loss, student_loss_weight=0.0
        )
        distiller.compile(optimizer=optimizer, loss="mse")
        histories.append(distiller.fit(x, **kwargs).history)
    logs = {k: np.array(sum((h[k] for h in histories), [])) for k in histories[0]}
    logs["weights"] = np.concatenate([w.ravel() for w in student.get_weights()])
    return logs, distiller


def is_mirrored(variable):
    import tensorflow as tf

    return isinstance(
        getattr(variable, "value", variable), tf.distribute.DistributedValues
    )


def mirrored(out):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras
    import numpy as np

    from keras_hydra.distillation import HydraDistillation

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    teacher, student = models()
    initial = teacher.get_weights(), student.get_weights()
    arrays, facts = {}, {"replicas": strategy.num_replicas_in_sync}
    names = ["hydra", "labels_instance", "labels_string"]
    names += ["upstream_share", "upstream_mean"]
    for name in names:
        for where in ("single", "mirrored"):
            if where == "single":
                logs, distiller = run(name, initial)
            else:
                with strategy.scope():
                    logs, distiller = run(name, initial)
            arrays.update({f"{name}_{where}_{k}": v for k, v in logs.items()})
            if name == "hydra" and where == "mirrored":
                heads = distiller.student.heads.weights
                facts["head_shapes"] = [list(v.shape) for v in heads]
                facts["mirrored_heads"] = [is_mirrored(v) for v in heads]

    # HydraDistillation in the upstream Distiller, under 2 replicas.
    with strategy.scope():
        teacher, student = models()
        distiller = keras.distillation.Distiller(
            teacher, student, HydraDistillation(TEMPERATURE), student_loss_weight=0.0
        )
        distiller.compile(optimizer="sgd", loss="mse")
    try:
        distiller.fit(data()[0], batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
        facts["upstream_error"] = None
    except ValueError as error:
        facts["upstream_error"] = str(error)

    np.savez(os.path.join(out, "mirrored.npz"), **arrays)
    with open(os.path.join(out, "mirrored.json"), "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run_name, out_dir = sys.argv[1], sys.argv[2]
    {"mirrored": mirrored}[run_name](out_dir)
    # The results are written and closed. Skip the interpreter's teardown,
    # where TensorFlow now and then segfaults under load (seen as exit code
    # -11 after a complete run; tensorflow/tensorflow#40186).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
