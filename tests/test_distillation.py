"""`keras_hydra.distillation`: Hydra through `keras.distillation.Distiller`.

The 2-replica runs need logical CPU devices, configured before any TF op,
so they live in `scale_scripts/distillation_runs.py`, started in the
background when this module's tests begin.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import log_softmax, softmax

import keras_hydra as kh
from keras_hydra.distillation import HydraDistillation, HydraDistiller

SCRIPT = Path(__file__).parent / "scale_scripts" / "distillation_runs.py"
NUM_MEMBERS = 4
NUM_CLASSES = 6
TEMPERATURE = 2.0
BATCH = 32


@pytest.fixture(scope="module", autouse=True)
def scripts(request, tmp_path_factory):
    """Starts the 2-replica run if a selected test needs it, in the background."""
    items = [item for item in request.session.items if item.path == request.path]
    if not any("mirrored" in item.fixturenames for item in items):
        yield None
        return
    root = str(Path(__file__).parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": path}
    out = tmp_path_factory.mktemp("mirrored")
    # A file, not a pipe: nobody reads the pipe while the tests run.
    with open(out / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "mirrored", str(out)],
            stderr=stderr,
            env=env,
        )
    yield out, process
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def mirrored(scripts):
    out, process = scripts
    process.wait(timeout=300)
    assert process.returncode == 0, (out / "stderr.txt").read_text()[-3000:]
    return (
        dict(np.load(out / "mirrored.npz")),
        json.loads((out / "mirrored.json").read_text()),
    )


def reference(teacher_logits, student_logits, temperature=TEMPERATURE):
    """`HydraKL`'s batch mean in numpy: T^2 mean_s KL(mean of group s || q_s)."""
    n, members, classes = teacher_logits.shape
    heads = student_logits.shape[1]
    p = softmax(teacher_logits / temperature, axis=-1)
    p = p.reshape(n, heads, members // heads, classes).mean(axis=2)
    log_q = log_softmax(student_logits / temperature, axis=-1)
    kl = np.sum(p * (np.log(p) - log_q), axis=-1)
    return temperature**2 * kl.mean()


@pytest.fixture(scope="module")
def x():
    return kh.data.load_digits_ood()["x_train"][:256]


@pytest.fixture(scope="module")
def teacher(x):
    """A frozen ensemble of untrained MLPs: they disagree, which is enough.

    Their output kernels are wide, so that each member is confident.
    """
    keras.utils.set_random_seed(0)
    members = [
        keras.Sequential(
            [
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(
                    NUM_CLASSES,
                    kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
                ),
            ],
            name=f"member{m}",
        )
        for m in range(NUM_MEMBERS)
    ]
    ensemble = kh.teacher.Ensemble(members)
    ensemble(x[:2])
    return ensemble


def student(seed, regularizer=None):
    keras.utils.set_random_seed(seed)
    body = keras.Sequential(
        [keras.layers.Dense(32, activation="relu", kernel_regularizer=regularizer)],
        name="body",
    )
    return kh.HydraModel(body, kh.heads.Categorical(NUM_CLASSES))


def evaluate(distiller, x):
    return distiller.evaluate(x, batch_size=BATCH, verbose=0, return_dict=True)


@pytest.fixture(scope="module")
def online(x, teacher):
    """Both phases through the distiller, evaluated before and after each."""
    hydra = student(seed=1)
    distiller = HydraDistiller(teacher, hydra, HydraDistillation(TEMPERATURE))
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    fit = {"batch_size": BATCH, "epochs": 3, "verbose": 0}
    targets = teacher.predict(x, verbose=0)
    phases = []
    for phase in (1, 2):
        if phase == 2:
            distiller.add_heads(NUM_MEMBERS)
        before = evaluate(distiller, x), hydra.predict(x, verbose=0)
        history = distiller.fit(x, **fit).history
        after = evaluate(distiller, x), hydra.predict(x, verbose=0)
        phases.append(types.SimpleNamespace(before=before, after=after, fit=history))
    return targets, phases


def test_both_phases_give_hydra_kl_of_the_online_teacher(online):
    targets, phases = online
    for phase, heads in zip(phases, (1, NUM_MEMBERS), strict=True):
        for logs, outputs in (phase.before, phase.after):
            assert outputs.shape == (len(targets), heads, NUM_CLASSES)
            expected = reference(targets, outputs)
            np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)
            np.testing.assert_allclose(logs["distillation_loss"], expected, rtol=1e-5)
            assert logs["student_loss"] == 0.0
        assert phase.after[0]["loss"] < 0.8 * phase.before[0]["loss"]
        assert phase.fit["loss"][-1] < phase.fit["loss"][0]
    # Phase 2 starts from M copies of the phase-1 head. The copies are exact, but
    # M heads run as one wider matmul, which some CPUs round differently (2e-7).
    np.testing.assert_allclose(
        phases[1].before[1],
        np.repeat(phases[0].after[1], NUM_MEMBERS, axis=1),
        rtol=1e-6,
        atol=1e-6,
    )


def test_without_augmentation_equals_cached_targets(x, teacher):
    """Same initial weights, batches and optimizer: the same student.

    The body has an L2 regularizer, which the upstream Distiller leaves out
    of the loss and `HydraDistiller` adds, as `HydraModel.fit` does.
    """
    regularizer = keras.regularizers.L2(1e-3)
    cached, online = student(2, regularizer), student(3, regularizer)
    cached.build(x.shape)
    online.build(x.shape)
    online.set_weights(cached.get_weights())
    targets = kh.teacher.predict(teacher, x)
    cached.compile(optimizer="adam", loss=kh.losses.HydraKL(temperature=TEMPERATURE))
    distiller = HydraDistiller(teacher, online, HydraDistillation(TEMPERATURE))
    distiller.compile(optimizer="adam")

    fit = {"batch_size": BATCH, "epochs": 2, "shuffle": False, "verbose": 0}
    losses = {"cached": [], "online": []}
    for phase in (1, 2):
        if phase == 2:
            cached.add_heads(NUM_MEMBERS)
            distiller.add_heads(NUM_MEMBERS)
        losses["cached"] += cached.fit(x, targets, **fit).history["loss"]
        losses["online"] += distiller.fit(x, **fit).history["loss"]
    np.testing.assert_allclose(losses["online"], losses["cached"], rtol=1e-5)
    for a, b in zip(online.get_weights(), cached.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)

    # The upstream loss is the distillation term alone.
    y_pred = distiller(x[:BATCH], training=True)
    ours = distiller.compute_loss(x=x[:BATCH], y_pred=y_pred)
    upstream = keras.distillation.Distiller.compute_loss(
        distiller, x=x[:BATCH], y_pred=y_pred
    )
    penalty = sum(float(loss) for loss in online.losses)
    assert penalty > 1e-3
    np.testing.assert_allclose(float(ours), float(upstream) + penalty, rtol=1e-5)


def augmenting_pipeline(x, seed):
    """A `tf.data` pipeline translating and noising 8x8 digits per batch."""
    translate = keras.layers.RandomTranslation(
        0.25, 0.25, fill_mode="constant", seed=seed
    )
    noise = keras.layers.GaussianNoise(0.1, seed=seed)

    def augment(batch):
        images = tf.reshape(batch, (-1, 8, 8, 1))
        images = noise(translate(images, training=True), training=True)
        return tf.reshape(images, (-1, 64))

    return tf.data.Dataset.from_tensor_slices(x).batch(BATCH).map(augment)


def test_augmented_batch_reaches_teacher_and_student(x, teacher):
    """The reported loss is HydraKL of both models on the augmented batch."""
    hydra = student(seed=4)
    loss = HydraDistillation(TEMPERATURE)
    distiller = HydraDistiller(teacher, hydra, loss)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    # Layers seeded alike draw alike: this is the batch `fit` will see first.
    augmented = next(iter(augmenting_pipeline(x, seed=3))).numpy()
    assert np.abs(augmented - x[:BATCH]).max() > 0.5
    targets = teacher.predict(augmented, verbose=0)
    outputs = hydra.predict(augmented, verbose=0)
    expected = reference(targets, outputs)
    # Had the teacher seen the clean batch, the loss would differ.
    clean = reference(teacher.predict(x[:BATCH], verbose=0), outputs)
    assert abs(clean - expected) > 0.01 * expected

    np.testing.assert_allclose(loss.compute_loss(targets, outputs), expected, rtol=1e-5)
    step_loss = distiller.compute_loss(x=augmented, y_pred=hydra(augmented))
    np.testing.assert_allclose(step_loss, expected, rtol=1e-5)
    first = distiller.fit(
        augmenting_pipeline(x, seed=3).take(1), shuffle=False, verbose=0
    )
    np.testing.assert_allclose(first.history["loss"], [expected], rtol=1e-5)

    # Fresh augmentations every epoch; the loss on the clean data falls.
    clean_before = evaluate(distiller, x)["loss"]
    distiller.fit(augmenting_pipeline(x, seed=5), epochs=4, shuffle=False, verbose=0)
    assert evaluate(distiller, x)["loss"] < 0.8 * clean_before


def test_mirrored_two_replicas_equal_one_device(mirrored):
    arrays, facts = mirrored
    assert facts["replicas"] == 2
    assert facts["head_shapes"] == [[NUM_MEMBERS, 8, 3], [NUM_MEMBERS, 3]]
    assert all(facts["mirrored_heads"])
    logs = ("loss", "distillation_loss", "student_loss", "total_loss")
    for run in ("hydra", "labels_instance", "labels_string"):
        for log in logs:
            np.testing.assert_allclose(
                arrays[f"{run}_mirrored_{log}"],
                arrays[f"{run}_single_{log}"],
                rtol=1e-5,
                atol=1e-7,
                err_msg=f"{run}: {log}",
            )
        np.testing.assert_allclose(
            arrays[f"{run}_mirrored_weights"],
            arrays[f"{run}_single_weights"],
            atol=1e-5,
            err_msg=run,
        )
    assert arrays["hydra_single_loss"].shape == (4,)  # 2 epochs per phase
    # The regularizer counts in `loss`, not in upstream's `total_loss`.
    assert np.all(arrays["hydra_single_loss"] > arrays["hydra_single_total_loss"])


def test_upstream_distiller_still_misscales_replicas(mirrored):
    """Upstream's behaviour `HydraDistiller` corrects (Keras 3.15).

    When this fails, upstream has changed: check `HydraDistiller` against
    the new behaviour, which `test_mirrored_two_replicas_equal_one_device`
    then also checks.
    """
    arrays, facts = mirrored
    share = {
        w: arrays[f"upstream_share_{w}_distillation_loss"]
        for w in ("single", "mirrored")
    }
    # A `Loss` strategy trains right but logs its components at 1/2.
    np.testing.assert_allclose(share["mirrored"], share["single"] / 2, rtol=1e-5)
    np.testing.assert_allclose(
        arrays["upstream_share_mirrored_loss"],
        arrays["upstream_share_single_loss"],
        rtol=1e-5,
    )
    # A replica-mean strategy logs `loss` at 2x and takes 2x the gradient.
    mean = {w: arrays[f"upstream_mean_{w}_loss"] for w in ("single", "mirrored")}
    assert mean["mirrored"][0] > 1.5 * mean["single"][0]
    diff = (
        arrays["upstream_mean_mirrored_weights"]
        - arrays["upstream_mean_single_weights"]
    )
    assert np.abs(diff).max() > 1e-2
    assert "HydraDistiller" in facts["upstream_error"]


def test_student_add_heads_behind_the_distillers_back_raises():
    x = np.random.default_rng(0).normal(size=(32, 5)).astype("float32")
    members = [keras.Sequential([keras.layers.Dense(3)]) for _ in range(2)]
    hydra = kh.HydraModel(keras.layers.Dense(4), kh.heads.Categorical(3))
    distiller = HydraDistiller(members, hydra, HydraDistillation())
    distiller.compile(optimizer="sgd")
    distiller.fit(x, batch_size=16, verbose=0)
    hydra.add_heads(2)
    with pytest.raises(ValueError, match="distiller.add_heads"):
        distiller.fit(x, batch_size=16, verbose=0)
    # Compiling again (a fresh optimizer) trains the new heads.
    distiller.compile(optimizer="sgd")
    heads = [w.copy() for w in hydra.heads.get_weights()]
    distiller.fit(x, batch_size=16, verbose=0)
    assert all(
        np.abs(a - b).min(axis=-1).max() > 0
        for a, b in zip(hydra.heads.get_weights(), heads, strict=True)
    )


def test_config_round_trip_and_validation():
    loss = HydraDistillation(temperature=3.0, from_logits=False, logit_weight=0.5)
    config = {"temperature": 3.0, "from_logits": False, "logit_weight": 0.5}
    assert loss.get_config() == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss)
    )
    assert isinstance(restored, HydraDistillation)
    assert restored.get_config() == config
    rng = np.random.default_rng(0)
    probabilities = softmax(rng.normal(size=(8, 4, 3)), axis=-1).astype("float32")
    logits = rng.normal(size=(8, 2, 3)).astype("float32")
    expected = kh.losses.HydraKL(3.0, from_logits=False, logit_weight=0.5)(
        probabilities, logits
    )
    for strategy in (loss, restored):
        np.testing.assert_allclose(
            strategy.compute_loss(probabilities, logits), expected, rtol=1e-6
        )
    with pytest.raises(ValueError, match="must divide"):
        loss.validate_outputs(probabilities, np.zeros((8, 3, 3), "float32"))
    with pytest.raises(ValueError, match=r"\(8, 4\)"):
        loss.validate_outputs(probabilities[..., 0], logits[..., 0])
    with pytest.raises(ValueError, match="temperature"):
        HydraDistillation(temperature=0.0)
