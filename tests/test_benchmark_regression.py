import argparse
import json

import numpy as np
import pytest
from test_regression import write_uci

import keras_hydra as kh
from keras_hydra.benchmarks import regression

# Short students: 2 epochs per phase.
SHORT = {"phase1_epochs": 2, "phase2_epochs": 2}


def test_regression_benchmark_writes_every_metric(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2))
    data = np.column_stack([x, x @ [1.0, -2.0] + rng.normal(0, 0.3, 60)])
    write_uci(tmp_path / "data" / "toy", data, train=range(45), test=range(45, 60))
    config = regression.RegressionConfig(
        members=2,
        epochs=4,
        recipes=("tabular_regression", "paper"),
        recipe_changes=SHORT,
    )
    results = regression.run(
        str(tmp_path / "data"), ["toy"], str(tmp_path / "out"), config=config
    )
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    methods = written["datasets"]["toy"]["methods"]
    for method in regression.METHODS:
        for metric in regression.METRICS:
            entry = methods[method][metric]
            assert np.isfinite(entry["mean"]) and len(entry["per_split"]) == 1
        assert 0.0 <= methods[method]["coverage_95"]["mean"] <= 1.0
    assert methods["kd"]["epistemic_share"]["mean"] == 0.0
    assert methods["ensemble"]["epistemic_share"]["mean"] > 0.0
    # The first recipe fills `methods`; each recipe has its own students.
    students = written["datasets"]["toy"]["recipes"]
    assert list(students) == ["tabular_regression", "paper"]
    assert students["tabular_regression"]["hydra"] == methods["hydra"]
    assert students["paper"]["hydra"] != methods["hydra"]
    table = (tmp_path / "out" / "table.md").read_text()
    labels = ["ensemble", "hydra (tabular_regression)", "kd (paper)"]
    assert all(f"| toy | {label} |" in table for label in labels)


def test_unknown_recipe_is_refused():
    with pytest.raises(ValueError, match=r"Unknown recipe\(s\) \['big'\]"):
        regression.RegressionConfig(recipes=("paper", "big"))


def test_large_tables_scale_the_recipe():
    config = regression.RegressionConfig()
    small = config.recipe("tabular_regression", 2000)
    assert small == kh.HydraRecipe.get("tabular_regression")
    large = config.recipe("tabular_regression", 2001)
    assert large.batch_size == 128
    assert large.phase1_epochs == round(0.4 * small.phase1_epochs)
    assert large.transforms == small.transforms


def test_clipnorm_reaches_the_students(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2))
    data = np.column_stack([x, x @ [1.0, -2.0] + rng.normal(0, 0.3, 40)])
    write_uci(tmp_path / "toy", data, train=range(30), test=range(30, 40))

    def students(**changes):
        config = regression.RegressionConfig(
            members=2, epochs=3, recipe_changes={**SHORT, **changes}
        )
        return regression.run_split(str(tmp_path / "toy"), 0, config)[
            "tabular_regression"
        ]

    # Same seed, same initial weights: runs repeat exactly unless clipped.
    plain = students()
    assert students() == plain
    clipped = students(clipnorm=1e-6)
    for method in ("hydra", "kd"):
        assert clipped[method]["nll"] != plain[method]["nll"]


def test_saved_splits_are_reused_and_split_ranges_fill_them(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2))
    data = np.column_stack([x, x @ [1.0, -2.0] + rng.normal(0, 0.3, 40)])
    root = tmp_path / "data" / "toy"
    write_uci(root, data, train=range(30), test=range(30, 40), splits="3")
    for split in (1, 2):
        order = rng.permutation(40)
        (root / f"index_train_{split}.txt").write_text("\n".join(map(str, order[:30])))
        (root / f"index_test_{split}.txt").write_text("\n".join(map(str, order[30:])))
    config = regression.RegressionConfig(members=2, epochs=3, recipe_changes=SHORT)
    args = (str(tmp_path / "data"), ["toy"], str(tmp_path / "out"))
    ran = []
    run_split = regression.run_split

    def counted(root, index, config):
        ran.append(index)
        return run_split(root, index, config)

    monkeypatch.setattr(regression, "run_split", counted)
    assert regression.run(*args, config=config, split_range=(1, 5)) is None
    assert ran == [1, 2] and not (tmp_path / "out" / "results.json").exists()
    results = regression.run(*args, config=config)
    assert ran == [1, 2, 0]
    # The same call again runs nothing and gives the same results.
    again = regression.run(*args, config=config)
    for entry in (again, results):
        del entry["datasets"]["toy"]["seconds"]
    assert again == results
    assert ran == [1, 2, 0]
    per_split = results["datasets"]["toy"]["methods"]["hydra"]["nll"]["per_split"]
    assert len(per_split) == 3
    # Saved splits match a fresh run of the same split.
    fresh = run_split(str(root), 2, config)
    assert per_split[2] == fresh["tabular_regression"]["hydra"]["nll"]
    # Another config runs every split again.
    regression.run(
        *args,
        config=regression.RegressionConfig(members=2, epochs=2, recipe_changes=SHORT),
    )
    assert ran == [1, 2, 0, 0, 1, 2]
    with pytest.raises(ValueError, match=r"split_range.*Received: \(3, 3\)"):
        regression.run(*args, config=config, split_range=(3, 3))


def test_split_range_argument(capsys):
    parser = argparse.ArgumentParser()
    regression.add_arguments(parser)
    base = ["--data-dir", "d", "--dataset", "toy", "--out", "o"]
    assert parser.parse_args(base).split_range is None
    assert parser.parse_args([*base, "--split-range", "10:20"]).split_range == (10, 20)
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--split-range", "10"])
    assert "expected START:STOP, e.g. 0:10; received '10'" in capsys.readouterr().err
