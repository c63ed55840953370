"""Scale: MirroredStrategy, XLA, mixed precision and determinism.

Logical CPU devices and op determinism are process-global, so those runs live
in `scale_scripts/scale_runs.py`, each in a fresh interpreter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from scipy.special import log_softmax, softmax

import keras_hydra as kh

SCRIPT = Path(__file__).parent / "scale_scripts" / "scale_runs.py"
NUM_MEMBERS = 4


@pytest.fixture(scope="module", autouse=True)
def scripts(request, tmp_path_factory):
    """Starts the subprocess runs the selected tests need, in the background.

    The in-process tests run meanwhile; `script_result` waits for a run.
    """
    root = str(Path(__file__).parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": path}
    runs = {}
    items = [item for item in request.session.items if item.path == request.path]
    needed = {name for item in items for name in item.fixturenames}
    for name in sorted(needed & {"mirrored", "determinism", "multi_worker"}):
        out = tmp_path_factory.mktemp(name)
        command = [sys.executable, str(SCRIPT), name, str(out)]
        # A file, not a pipe: nobody reads the pipe while the tests run.
        with open(out / "stderr.txt", "w") as stderr:
            process = subprocess.Popen(command, stderr=stderr, env=env)
        runs[name] = out, process
    yield runs
    for _, process in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def script_result(scripts, name):
    """`(arrays, facts)` written by the run `name`, once it has finished."""
    out, process = scripts[name]
    process.wait(timeout=300)
    assert process.returncode == 0, (out / "stderr.txt").read_text()[-3000:]
    facts = out / f"{name}.json"
    return (
        dict(np.load(out / f"{name}.npz")),
        json.loads(facts.read_text()) if facts.exists() else {},
    )


@pytest.fixture(scope="module")
def mirrored(scripts):
    return script_result(scripts, "mirrored")


@pytest.fixture(scope="module")
def determinism(scripts):
    return script_result(scripts, "determinism")


@pytest.fixture(scope="module")
def multi_worker(scripts):
    return script_result(scripts, "multi_worker")


def random_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, 5)).astype("float32"),
        rng.normal(size=(n, NUM_MEMBERS, 3)).astype("float32"),
    )


def small_hydra(seed=0, **compile_kwargs):
    keras.utils.set_random_seed(seed)
    body = keras.Sequential([keras.layers.Dense(8, activation="relu")])
    model = kh.HydraModel(body, kh.heads.Categorical(3, hidden_units=(4,)))
    model.compile(
        optimizer="adam", loss=kh.losses.HydraKL(temperature=2.0), **compile_kwargs
    )
    return model


def both_phases(model, x, targets, epochs=2):
    kwargs = {"batch_size": 16, "epochs": epochs, "shuffle": False, "verbose": 0}
    losses = model.fit(x, targets, **kwargs).history["loss"]
    model.add_heads(NUM_MEMBERS)
    return losses + model.fit(x, targets, **kwargs).history["loss"]


def assert_same_run(arrays, a, b, **tolerance):
    for part in ["losses", "weights", "state"]:
        np.testing.assert_allclose(
            arrays[f"{a}_{part}"], arrays[f"{b}_{part}"], err_msg=part, **tolerance
        )


def test_xla_matches_no_xla():
    x, targets = random_data()
    runs = []
    for jit_compile in [False, True]:
        model = small_hydra(jit_compile=jit_compile)
        losses = both_phases(model, x, targets)
        assert model.jit_compile is jit_compile  # add_heads keeps the setting
        state = [v.numpy() for v in model.optimizer.variables]
        runs.append((losses, model.predict(x, verbose=0), model.weights + state))
    (losses, outputs, variables), (xla_losses, xla_outputs, xla_variables) = runs
    assert xla_outputs.shape == (64, NUM_MEMBERS, 3)
    np.testing.assert_allclose(xla_losses, losses, rtol=1e-5)
    np.testing.assert_allclose(xla_outputs, outputs, rtol=1e-5, atol=1e-5)
    for a, b in zip(xla_variables, variables, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.fixture(params=["mixed_bfloat16", "mixed_float16"])
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy("float32")


def reference_kl(targets, logits, temperature):
    log_p = log_softmax(targets.astype("float64") / temperature, axis=-1)
    log_q = log_softmax(logits.astype("float64") / temperature, axis=-1)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean(-1)
    return kl.mean() * temperature**2


def test_mixed_precision_trains_both_phases(policy):
    compute_dtype = policy.removeprefix("mixed_")
    x, targets = random_data()
    model = small_hydra()
    losses = model.fit(x, targets, batch_size=16, epochs=2, verbose=0)
    assert model.predict(x[:4], verbose=0).dtype == compute_dtype
    assert all(w.dtype == "float32" for w in model.weights)

    state = [v.numpy() for v in model.optimizer.variables]
    optimizer_type = type(model.optimizer)
    model.add_heads(NUM_MEMBERS)
    # add_heads rebuilds the optimizer (a LossScaleOptimizer under float16)
    # with every variable carried over, the head's slots once per head.
    assert type(model.optimizer) is optimizer_type
    assert (optimizer_type is keras.optimizers.LossScaleOptimizer) == (
        policy == "mixed_float16"
    )
    assert len(model.optimizer.variables) == len(state)
    for new, old in zip(model.optimizer.variables, state, strict=True):
        if new.shape == old.shape:
            np.testing.assert_array_equal(new.numpy(), old)
        else:
            np.testing.assert_array_equal(
                new.numpy(), np.repeat(old, NUM_MEMBERS, axis=0)
            )
    losses = losses.history["loss"]
    losses += model.fit(x, targets, batch_size=16, epochs=2, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses))
    assert int(model.optimizer.iterations.numpy()) == 16

    # The training loss is float32 although the heads emit low precision.
    logits = model(x)
    assert keras.backend.standardize_dtype(logits.dtype) == compute_dtype
    loss = model.compute_loss(x=x, y=targets, y_pred=logits)
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"

    u = model.predict_uncertainty(x)
    assert u["head_probabilities"].shape == (64, NUM_MEMBERS, 3)
    for key, value in u.items():
        assert value.dtype == ("int64" if key == "predicted_class" else "float32")
    # Computed in float32 from the low-precision logits.
    probs = softmax(model.predict(x, verbose=0).astype("float64"), axis=-1)
    np.testing.assert_allclose(u["head_probabilities"], probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(u["probabilities"], probs.mean(1), rtol=1e-5, atol=1e-7)


def test_hydra_kl_computes_in_float32_on_low_precision_logits(policy):
    compute_dtype = policy.removeprefix("mixed_")
    _, targets = random_data()
    logits = keras.ops.cast(targets[:, ::-1] * 3.0, compute_dtype)
    loss = kh.losses.HydraKL(temperature=2.0)
    value = loss(targets, logits)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    expected = reference_kl(targets, keras.ops.convert_to_numpy(logits), 2.0)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)


def test_mirrored_two_replicas_match_one_device(mirrored):
    arrays, facts = mirrored
    assert facts["replicas"] == 2
    assert len(arrays["single_losses"]) == 4  # 2 epochs per phase
    # Losses, final weights and the Adam state right after add_heads.
    assert_same_run(arrays, "single", "mirrored", rtol=1e-5, atol=1e-6)


def test_mirrored_conv_heads_match_one_device(mirrored):
    arrays, _ = mirrored
    assert len(arrays["single_conv_losses"]) == 4
    assert_same_run(arrays, "single_conv", "mirrored_conv", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tensor", ["x", "y"], ids=["x-on-replica1", "y-on-replica0"])
def test_mirrored_bad_batch_on_one_replica_stops_both(mirrored, tensor):
    # The third batch is bad on one replica only (see `scale_runs.mirrored`);
    # both skip it, as the flags are summed over replicas, and keep the
    # weights of the two clean steps.
    arrays, facts = mirrored
    name = {"x": "inputs x", "y": "targets y"}[tensor]
    assert "at step 2 (counting" in facts[f"guard_{tensor}_error"]
    assert f"non-finite {name}" in facts[f"guard_{tensor}_error"]
    assert facts[f"guard_{tensor}_iterations"] == 2
    np.testing.assert_allclose(
        arrays[f"guard_{tensor}_weights"], arrays["guard_clean_weights"], atol=1e-7
    )


def test_add_heads_under_mirrored_keeps_variables_mirrored(mirrored):
    _, facts = mirrored
    assert facts["strategy_kept"]
    assert facts["head_shapes"] == [[4, 8, 4], [4, 4], [4, 4, 3], [4, 3]]
    # The new heads, the spread and the optimizer rebuilt by add_heads live
    # on both replicas.
    assert facts["mirrored_weights"] == [True] * 7
    assert facts["mirrored_optimizer"] == [True] * 14


def test_calibrate_spread_under_mirrored_matches_one_device(mirrored):
    arrays, facts = mirrored
    # The targets are the single model's heads spread by 2.
    assert facts["single_spread"] == pytest.approx(2.0, rel=1e-4)
    assert facts["mirrored_spread"] == pytest.approx(2.0, rel=1e-4)
    for name in ["single", "mirrored"]:
        np.testing.assert_allclose(
            arrays[f"{name}_spread_outputs"], arrays["wider"], rtol=1e-4, atol=1e-5
        )


def test_mirrored_uneven_last_batch_weights_replicas_equally(mirrored):
    # 63 examples in batches of 16: the last batch of 15 splits 8 + 7. Keras
    # averages per replica, then over replicas, which a single device
    # reproduces with weights 15/16 and 15/14 on the halves of that batch.
    arrays, _ = mirrored
    for part in ["weights", "state"]:
        np.testing.assert_allclose(
            arrays[f"weighted63_{part}"], arrays[f"mirrored63_{part}"], atol=1e-6
        )
    # Plain single-device training differs by that reweighting, slightly.
    gap = np.abs(arrays["single63_weights"] - arrays["mirrored63_weights"]).max()
    assert 1e-5 < gap < 1e-2
    np.testing.assert_allclose(
        arrays["single63_losses"], arrays["mirrored63_losses"], rtol=1e-3
    )


def test_mirrored_global_batch_not_divisible_by_replicas_trains(mirrored):
    # Replicas get 8 and 7 examples from the first batch on; HydraModel builds
    # from replica 0's part, where Keras's build would fail to add the two.
    _, facts = mirrored
    assert facts["batch15_iterations"] == 5  # ceil(63 / 15)
    assert np.isfinite(facts["batch15_loss"])


def test_model_built_outside_the_scope_cannot_fit_inside(mirrored):
    _, facts = mirrored
    assert facts["outside_error"].startswith(
        "RuntimeError: Mixing different tf.distribute.Strategy objects"
    )
    assert facts["outside_iterations"] == 0


def test_multi_worker_matches_single_process(multi_worker):
    # Two worker processes, one CPU replica each, over both phases: per-epoch
    # losses, validation losses, final weights, predictions and evaluate.
    arrays, facts = multi_worker
    assert [f["replicas"] for f in facts["workers"]] == [2, 2]
    assert len(arrays["single_losses"]) == 4
    single = [k.removeprefix("single_") for k in arrays if k.startswith("single_")]
    for worker in ["worker0", "worker1"]:
        for key in single:
            np.testing.assert_allclose(
                arrays[f"{worker}_{key}"],
                arrays[f"single_{key}"],
                rtol=1e-5,
                atol=1e-6,
                err_msg=key,
            )
    np.testing.assert_array_equal(arrays["worker0_weights"], arrays["worker1_weights"])


def test_multi_worker_logs_are_scalars(multi_worker):
    # Guards the workaround for keras-team/keras#20585 (`_reducible`).
    _, facts = multi_worker
    for f in facts["workers"]:
        assert f["log_shapes"] == {"loss": [[]] * 4, "val_loss": [[]] * 4}


def test_determinism_two_runs_identical(determinism):
    arrays, _ = determinism
    assert len(arrays["losses0"]) == 4
    np.testing.assert_array_equal(arrays["losses0"], arrays["losses1"])
    np.testing.assert_array_equal(arrays["weights0"], arrays["weights1"])
