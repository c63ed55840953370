import json
import math
import os

import keras
import numpy as np
import pytest

from keras_hydra import cli
from keras_hydra.benchmarks import classification

SCORES = ("accuracy", "nll", "ece", "brier", "params")
SPREAD = "cutmix_affine_x8_shallow_b128_lr2e3_logits_spread"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `--quick` run through the CLI, with an extra OOD set and 3 variants."""
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
            "--variant",
            "cutmix_affine_x8_shallow",
            "--variant",
            "mixup_reset",
            "--variant",
            SPREAD,
            "--kd-epochs",
            "2",
        ]
    )
    with open(out / "results.json") as f:
        return out, json.load(f)


def _in_unit(value):
    return 0.0 <= value <= 1.0


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
        assert set(method["ood_auroc"]) == {"mnist", "uniform"}
        several = name in ("ensemble", "hydra")
        for scores in method["ood_auroc"].values():
            expected = {"entropy", "mutual_information"} if several else {"entropy"}
            assert set(scores) == expected
            assert all(_in_unit(v) for v in scores.values())


def test_quick_params_and_sizes(quick_run):
    _, results = quick_run
    methods = results["methods"]
    member = 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    assert methods["single"]["params"] == member
    assert methods["ensemble"]["params"] == 3 * member
    # Hydra (the first variant): a 784-512 body and 3 heads of a 128-unit
    # hidden layer each; KD: the same body and one linear head; both have
    # the scalar `spread`.
    body = 784 * 512 + 512
    head = 512 * 128 + 128 + 128 * 10 + 10
    assert methods["hydra"]["params"] == body + 3 * head + 1
    assert methods["kd"]["params"] == body + 512 * 10 + 10 + 1
    assert results["config"]["members"] == 3
    assert results["config"]["seeds"] == 1
    assert results["config"]["kd_epochs"] == 2  # the CLI override
    # KD distils on the first variant's transfer set (training, CutMix and
    # affine images), in proportionally fewer epochs.
    assert results["kd_student"] == {
        "augment": ["cutmix", "affine"],
        "copies": 1,
        "epochs": 1,
        "body": [512],
        "batch_size": 256,
        "learning_rate": 0.001,
        "logit_weight": 0.0,
    }


def test_quick_fidelity_keys_and_ranges(quick_run):
    _, results = quick_run
    fid = results["fidelity"]["hydra"]
    assert -1.0 <= fid["mi_spearman"] <= 1.0
    fraction = fid["own_member_fraction"]  # a share of 3 heads
    assert _in_unit(fraction) and math.isclose(fraction * 3, round(fraction * 3))
    assert fid["mean_kl_to_ensemble"] >= 0.0
    for name in ("mnist", "uniform"):
        assert -1.0 <= fid["mi_spearman_ood"][name] <= 1.0
        assert fid["mean_mi_ratio_ood"][name] >= 0.0


def test_quick_seeds_and_variants(quick_run):
    _, results = quick_run
    hydra = results["methods"]["hydra"]
    assert len(hydra["per_seed"]) == 1
    assert hydra["accuracy"] == hydra["per_seed"][0]["accuracy"]
    assert list(results["variants"]) == [
        "cutmix_affine_x8_shallow",
        "mixup_reset",
        SPREAD,
    ]
    # The first variant is the reported Hydra.
    first = results["variants"]["cutmix_affine_x8_shallow"]
    assert first["hydra"]["nll"] == hydra["nll"]
    assert first["variant"]["fresh_heads"] is True
    assert first["variant"]["phase2_multiplier"] == 8.0
    assert first["variant"]["head_hidden"] == [128]
    assert first["variant"]["augment"] == ["cutmix", "affine"]
    mixup = results["variants"]["mixup_reset"]
    assert mixup["variant"]["augment"] == "mixup"
    assert mixup["variant"]["reset_optimizer"] is True
    goals = mixup["goals"]
    assert {"accuracy", "nll", "ece", "mi_spearman", "own_member_fraction"} <= set(
        goals
    )
    assert "uniform/auroc_mi_vs_ensemble" in goals
    for goal in goals.values():
        assert isinstance(goal["met"], bool)
    assert "spread" not in mixup and "uncalibrated" not in mixup


def test_quick_scores_a_calibrated_variant_before_and_after(quick_run):
    out, results = quick_run
    entry = results["variants"][SPREAD]
    assert entry["variant"]["calibrate_spread"] is True
    assert len(entry["spread"]["per_seed"]) == 1
    assert entry["spread"]["mean"] == entry["spread"]["per_seed"][0] > 0
    before = entry["uncalibrated"]
    assert set(before["goals"]) == set(entry["goals"])
    assert before["hydra"]["params"] == entry["hydra"]["params"]
    # The heads' mean logits are kept, so predictions barely move; their
    # disagreement, and so the mutual information, is scaled.
    assert abs(before["hydra"]["accuracy"] - entry["hydra"]["accuracy"]) < 0.01
    # A factor above 1 moves the heads apart and raises their mutual
    # information, below 1 lowers it.
    for name in ("mnist", "uniform"):
        ratio = entry["fidelity"]["mean_mi_ratio_ood"][name]
        change = ratio - before["fidelity"]["mean_mi_ratio_ood"][name]
        assert change * (entry["spread"]["mean"] - 1) > 0, (name, change)
    table = (out / "table.md").read_text()
    assert f"| hydra[{SPREAD} (uncalibrated)] |" in table
    assert "Calibrated spread (mean over seeds): " in table


def test_quick_writes_table_and_plots(quick_run):
    out, results = quick_run
    table = (out / "table.md").read_text()
    assert "| hydra[mixup_reset] |" in table and "AUROC uniform (MI)" in table
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
    # Against a direct computation for one pair.
    p = np.exp(teacher[:, 1]) / np.exp(teacher[:, 1]).sum(-1, keepdims=True)
    q = np.exp(teacher[:, 2]) / np.exp(teacher[:, 2]).sum(-1, keepdims=True)
    expected = np.mean(np.sum(p * np.log(p / q), axis=-1))
    np.testing.assert_allclose(kl[2, 1], expected, rtol=1e-4)


def test_disagreement_weights_follow_mutual_information():
    rng = np.random.default_rng(0)
    teacher = rng.normal(0, 2, (30, 4, 5)).astype("float32")
    p = np.exp(teacher) / np.exp(teacher).sum(-1, keepdims=True)
    mean = p.mean(axis=1)
    info = -np.sum(mean * np.log(mean), -1) + np.mean(np.sum(p * np.log(p), -1), 1)
    expected = 1.0 + 2.0 * info / info.mean()
    weights = classification.disagreement_weights(teacher, 2.0)
    np.testing.assert_allclose(weights, expected / expected.mean(), rtol=1e-4)
    agreeing = np.repeat(teacher[:, :1], 4, axis=1)
    np.testing.assert_allclose(
        classification.disagreement_weights(agreeing, 2.0), 1.0, atol=1e-2
    )


def test_augment_inputs_stay_in_range():
    x = np.random.default_rng(0).uniform(0, 1, (20, 784)).astype("float32")
    variant = classification.Variant()
    members = [keras.Sequential([keras.layers.Dense(10)]) for _ in range(3)]
    for kind in ("mixup", "cutmix", "affine", "noise", "ods", "cutmix_ods"):
        augmented = classification.augment_inputs(x, kind, variant, 0, members)
        assert augmented.shape == x.shape and augmented.dtype == np.float32
        assert augmented.min() >= 0.0 and augmented.max() <= 1.0
        assert not np.allclose(augmented, x)
    # An ODS step from the CutMix image of the same seed: at most one step away.
    mixed = classification.augment_inputs(x, "cutmix", variant, 0)
    moved = classification.augment_inputs(x, "cutmix_ods", variant, 0, members)
    assert np.abs(moved - mixed).max() <= variant.ods_step + 1e-6
    assert not np.allclose(moved, mixed)
    with pytest.raises(ValueError, match="Unknown augmentation 'blur'"):
        classification.augment_inputs(x, "blur", variant, 0)


def test_augmented_copies_are_distinct_draws():
    x = np.random.default_rng(0).uniform(0, 1, (20, 784)).astype("float32")
    variant = classification.Variant(augment="cutmix", copies=3)
    copies = classification.augmented_copies(x, variant, 7)
    assert copies.shape == (60, 784)
    np.testing.assert_array_equal(
        copies[:20], classification.augment_inputs(x, "cutmix", variant, 7)
    )
    np.testing.assert_array_equal(
        copies[40:], classification.augment_inputs(x, "cutmix", variant, 207)
    )
    assert not np.allclose(copies[:20], copies[20:40])
    # Several kinds: one block per kind within each copy, seeds counting on.
    variant = classification.Variant(augment=("cutmix", "affine"), copies=2)
    blocks = classification.augmented_copies(x, variant, 7).reshape(4, 20, 784)
    for j, kind in enumerate(["cutmix", "affine"] * 2):
        np.testing.assert_array_equal(
            blocks[j], classification.augment_inputs(x, kind, variant, 7 + 100 * j)
        )


def test_extra_ood_rejects_bad_files(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 28, 27), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 \[N, 28, 28\]"):
        classification.load_extra_ood(f"bad={tmp_path / 'bad.npz'}")
    with pytest.raises(ValueError, match="NAME=FILE.npz"):
        classification.load_extra_ood(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "good.npz", x=np.full((2, 28, 28), 255, np.uint8))
    name, x = classification.load_extra_ood(f"good={tmp_path / 'good.npz'}")
    assert name == "good" and x.shape == (2, 784) and x.max() == 1.0


def test_unknown_variant_is_rejected(tmp_path):
    config = classification.ClassificationConfig.quick()
    config.variants = ["nope"]
    with pytest.raises(ValueError, match="Unknown variant"):
        classification.run(str(tmp_path), config)


def test_students_use_their_variants_optimizer_settings():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(12, 6)).astype("float32")
    targets = rng.normal(size=(12, 3, 10)).astype("float32")
    config = classification.ClassificationConfig(
        hidden=(8,), phase1_epochs=1, phase2_epochs=2, batch_size=12
    )

    def phase2(**settings):
        variant = classification.Variant(batch_size=4, learning_rate=0.01, **settings)
        hydra = classification.train_hydra(x, targets, variant, config, seed=0)
        step = hydra.optimizer.iterations
        return int(step), float(hydra.optimizer.learning_rate)

    # Batches of 4: 3 steps per epoch, so 3 in phase 1 and 6 in phase 2.
    assert phase2() == (9, pytest.approx(0.01))  # the optimizer carried over
    # The students train under `config.student_dtype`, the expanded heads
    # too, and the global policy is left as it was.
    hydra = classification.train_hydra(x, targets, classification.Variant(), config, 0)
    assert hydra.heads.dtype_policy.name == "mixed_bfloat16"
    assert hydra.heads.kernels[0].shape[0] == 3
    assert keras.config.dtype_policy().name == "float32"
    assert phase2(reset_optimizer=True) == (6, pytest.approx(0.01))
    assert phase2(decay=True) == (6, pytest.approx(0.0, abs=1e-7))  # cosine end
    variant = classification.Variant(batch_size=6, learning_rate=0.02)
    kd = classification.train_kd(x, targets, config, 0, epochs=2, variant=variant)
    assert int(kd.optimizer.iterations) == 4
    assert float(kd.optimizer.learning_rate) == pytest.approx(0.02)
