import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_hydra as kh

from conftest import mlp_body

# Runs in a fresh process where keras_hydra and TFP cannot be imported.
SERVE_SCRIPT = """
import sys
sys.modules["keras_hydra"] = None
sys.modules["tensorflow_probability"] = None
import numpy as np, tensorflow as tf
path, inputs, out = sys.argv[1:]
loaded = tf.saved_model.load(path)
outputs = loaded.signatures["serving_default"](x=tf.constant(np.load(inputs)))
np.savez(out, **{k: v.numpy() for k, v in outputs.items()})
print(len(loaded.variables))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    targets = rng.normal(size=(64, 3, 4)).astype("float32")
    teacher = [keras.Sequential([keras.layers.Dense(4)]) for _ in range(3)]
    body = keras.Sequential([keras.Input((5,), name="x"), *mlp_body(8).layers])
    model = kh.HydraModel(body, kh.heads.Categorical(4), teacher=teacher)
    model.compile(optimizer="adam", loss=kh.losses.HydraKL(temperature=3.0))
    model.fit(x, targets, epochs=1, verbose=0)
    model.add_heads(3, noise_stddev=0.3, seed=0)
    model.fit(x, targets, epochs=1, verbose=0)
    model.calibrate_spread(x)  # on the online teacher's outputs
    path = str(tmp_path_factory.mktemp("export") / "hydra" / "1")
    kh.export.saved_model(model, path)
    return model, x, path


def serve_in_fresh_process(path, x, tmp_path):
    """Runs SERVE_SCRIPT; returns its outputs and the loaded variable count."""
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SERVE_SCRIPT,
            path,
            str(tmp_path / "x.npy"),
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    return dict(np.load(tmp_path / "out.npz")), int(result.stdout.split()[-1])


def assert_same_outputs(served, expected):
    assert set(served) == set(expected)
    for key, value in expected.items():
        assert served[key].dtype == value.dtype, key
        assert served[key].shape == value.shape, key
        np.testing.assert_allclose(served[key], value, rtol=1e-5, atol=1e-5)


def show_all(path):
    return subprocess.run(
        ["saved_model_cli", "show", "--dir", path, "--all"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    ).stdout


def test_serves_predict_uncertainty_without_the_package(exported, tmp_path):
    model, x, path = exported
    served, num_variables = serve_in_fresh_process(path, x[:7], tmp_path)
    # The online teacher's variables are not in the SavedModel.
    assert num_variables == len(model.weights)
    # The served heads are spread as `predict`'s are.
    assert abs(float(model.spread) - 1.0) > 0.01
    assert_same_outputs(served, model.predict_uncertainty(x[:7]))
    assert served["predicted_class"].dtype == np.int64
    assert served["probabilities"].dtype == np.float32


def test_saved_model_cli_show_and_run(exported):
    _, x, path = exported
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    shown = show_all(path)
    assert "signature_def['serving_default']" in shown
    assert "signature_def['head_outputs']" in shown
    for name in [
        "x",
        "probabilities",
        "head_probabilities",
        "predicted_class",
        "total_uncertainty",
        "aleatoric_uncertainty",
        "epistemic_uncertainty",
    ]:
        assert f"outputs['{name}']" in shown or f"inputs['{name}']" in shown, name
    ran = subprocess.run(
        [
            "saved_model_cli",
            "run",
            "--dir",
            path,
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--input_exprs",
            f"x={json.dumps(x[:2].tolist())}",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    for name in ["probabilities", "predicted_class", "epistemic_uncertainty"]:
        assert name in ran


REGRESSION_OUTPUTS = {
    # name: shape for 7 examples, 3 heads, event size 1
    "mean": (7, 1),
    "variance": (7, 1),
    "aleatoric_variance": (7, 1),
    "epistemic_variance": (7, 1),
    "head_parameters": (7, 3, 2),
    "lower_80": (7, 1),
    "upper_80": (7, 1),
    "lower_97_5": (7, 1),
    "upper_97_5": (7, 1),
}


@pytest.fixture(scope="module")
def exported_regression(tmp_path_factory):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = (x[:, :1] + 0.3 * rng.normal(size=(64, 1))).astype("float32")
    members = []
    for _ in range(3):
        member = keras.Sequential(
            [
                keras.layers.Dense(8, activation="relu"),
                keras.layers.Dense(2),
                kh.layers.DistributionParameters("Normal"),
            ]
        )
        member.compile(optimizer="adam", loss=kh.losses.DistributionNLL("Normal"))
        member.fit(x, y, epochs=2, verbose=0)
        members.append(member)
    targets = kh.teacher.predict(members, x)
    body = keras.Sequential([keras.Input((5,), name="x"), *mlp_body(8).layers])
    model = kh.HydraModel(body, kh.heads.Distribution("Normal", levels=(0.8, 0.975)))
    model.compile(optimizer="adam", loss=kh.losses.DistributionKL("Normal"))
    model.fit(x, targets, epochs=1, verbose=0)
    model.add_heads(3, noise_stddev=0.1, seed=0)
    model.fit(x, targets, epochs=2, verbose=0)
    path = str(tmp_path_factory.mktemp("export") / "regression" / "1")
    kh.export.saved_model(model, path)
    return model, x, path


def test_serves_regression_uncertainty_without_the_package(
    exported_regression, tmp_path
):
    model, x, path = exported_regression
    served, num_variables = serve_in_fresh_process(path, x[:7], tmp_path)
    assert num_variables == len(model.weights)
    expected = model.predict_uncertainty(x[:7])
    assert {k: v.shape for k, v in expected.items()} == REGRESSION_OUTPUTS
    assert_same_outputs(served, expected)
    assert all(v.dtype == np.float32 for v in served.values())
    # The heads disagree after the noisy expansion, and the bounds nest.
    assert np.all(served["epistemic_variance"] > 0)
    np.testing.assert_allclose(
        served["variance"],
        served["aleatoric_variance"] + served["epistemic_variance"],
        rtol=1e-6,
    )
    assert np.all(served["lower_97_5"] < served["lower_80"])
    assert np.all(served["lower_80"] < served["mean"])
    assert np.all(served["mean"] < served["upper_80"])
    assert np.all(served["upper_80"] < served["upper_97_5"])


def test_saved_model_cli_shows_regression_outputs(exported_regression):
    _, _, path = exported_regression
    shown = show_all(path)
    serving = shown.split("signature_def['serving_default']")[1]
    assert "inputs['x']" in serving
    for name in REGRESSION_OUTPUTS:
        assert f"outputs['{name}']" in serving, name
    assert "probabilities" not in serving


def test_refuses_unbuilt_model_and_non_empty_path(tmp_path):
    unbuilt = kh.HydraModel(mlp_body(8), kh.heads.Categorical(3))
    with pytest.raises(ValueError, match="never been built"):
        kh.export.saved_model(unbuilt, str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()

    model = kh.HydraModel(mlp_body(8), kh.heads.Categorical(3))
    model.build((None, 5))
    target = tmp_path / "b"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="exists and is not empty.*overwrite=True"):
        kh.export.saved_model(model, str(target))
    assert (target / "keep.txt").read_text() == "user data"
    kh.export.saved_model(model, str(target), overwrite=True)
    assert (target / "saved_model.pb").exists() and not (target / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export-")] == []


def test_conv_heads_train_save_and_serve(tmp_path):
    """Heads with `conv_filters` on a CNN's feature map, through every format."""
    rng = np.random.default_rng(4)
    x = rng.uniform(size=(32, 8, 8, 1)).astype("float32")
    targets = rng.normal(size=(32, 3, 4)).astype("float32")
    body = keras.Sequential(
        [keras.Input((8, 8, 1), name="x"), keras.layers.Conv2D(4, 3, activation="relu")]
    )
    model = kh.HydraModel(body, kh.heads.Categorical(4, conv_filters=5))
    model.compile(optimizer="adam", loss=kh.losses.HydraKL())
    model.fit(x, targets.mean(1, keepdims=True), epochs=1, verbose=0)
    model.add_heads(3, noise_stddev=0.1, seed=0)
    model.fit(x, targets, epochs=1, verbose=0)
    assert model.heads.conv_kernel.shape == (3, 3, 3, 4, 5)
    expected = model.predict(x, verbose=0)
    assert np.ptp(expected, axis=1).max() > 1e-3  # the heads differ

    model.save(tmp_path / "hydra.keras")
    loaded = keras.saving.load_model(tmp_path / "hydra.keras")
    assert loaded.head.conv_filters == 5
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=1e-6)

    path = str(tmp_path / "serving" / "1")
    kh.export.saved_model(model, path)
    served, _ = serve_in_fresh_process(path, x[:7], tmp_path)
    assert_same_outputs(served, model.predict_uncertainty(x[:7]))
