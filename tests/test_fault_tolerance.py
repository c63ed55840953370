"""Fault tolerance: `BackupAndRestore` across a real kill, and bad backups.

The kill-and-resume runs use `scale_scripts/fault_runs.py`, a training
script SIGKILLed mid-epoch on its first run and then restarted unchanged; the
resumed run must end exactly where an uninterrupted one does.
"""

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_hydra as kh

SCRIPT = Path(__file__).parent / "scale_scripts" / "fault_runs.py"
# (mode, global epoch, batch) of each kill; phase 1 is epochs 0-2, phase 2 3-5.
KILLS = {
    "between_phase1": ("between", 1, 3),
    "between_phase2": ("between", 4, 1),
    "callback_phase2": ("callback", 4, 2),
}


def run_script(mode, backup_dir, out, kill=None):
    root = str(Path(__file__).parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": path}
    command = [sys.executable, str(SCRIPT), mode, str(backup_dir), str(out)]
    if kill:
        command += ["--kill", *map(str, kill)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted runs of both modes, and each kill then restart."""
    root = tmp_path_factory.mktemp("fault")

    def reference(mode):
        result = run_script(mode, root / f"ref_{mode}", root / f"ref_{mode}.npz")
        assert result.returncode == 0, result.stderr[-3000:]
        return dict(np.load(root / f"ref_{mode}.npz"))

    def kill_and_resume(name):
        mode, epoch, batch = KILLS[name]
        backup, out = root / name, root / f"{name}.npz"
        killed = run_script(mode, backup, out, kill=(epoch, batch))
        killed_wrote_output = out.exists()
        # Metadata of every backup left behind by the killed process.
        left = {
            str(p.parent.relative_to(backup)): json.loads(p.read_text())
            for p in backup.rglob("training_metadata.json")
        }
        resumed = run_script(mode, backup, out)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        return {
            "killed_returncode": killed.returncode,
            "killed_wrote_output": killed_wrote_output,
            "backups": left,
            "files_left": [p for p in backup.rglob("*") if p.is_file()],
            **dict(np.load(out)),
        }

    with ThreadPoolExecutor(max_workers=3) as pool:
        refs = {m: pool.submit(reference, m) for m in ["between", "callback"]}
        kills = {name: pool.submit(kill_and_resume, name) for name in KILLS}
        return {m: f.result() for m, f in refs.items()}, {
            n: f.result() for n, f in kills.items()
        }


def test_uninterrupted_modes_agree(runs):
    refs, _ = runs
    # `fit`/`add_heads`/`fit` and one `fit` with AddHeads are the same training.
    assert refs["between"]["num_heads"] == refs["callback"]["num_heads"] == 4
    np.testing.assert_array_equal(
        refs["between"]["weights"], refs["callback"]["weights"]
    )
    assert list(refs["between"]["epochs_run"]) == list(range(6))


@pytest.mark.parametrize("name", sorted(KILLS))
def test_killed_run_resumes_to_the_uninterrupted_weights(runs, name):
    refs, kills = runs
    run = kills[name]
    mode, epoch, _ = KILLS[name]
    assert run["killed_returncode"] == -signal.SIGKILL
    assert not run["killed_wrote_output"]
    # The restart resumed at the killed epoch: the backup of the epoch before.
    assert run["epochs_run"][0] == epoch
    assert list(run["epochs_run"]) == list(range(epoch, 6))
    assert run["files_left"] == []  # every backup is cleaned up at the end
    assert run["num_heads"] == 4
    np.testing.assert_allclose(run["weights"], refs[mode]["weights"], atol=1e-6)
    np.testing.assert_allclose(run["optimizer"], refs[mode]["optimizer"], atol=1e-6)


def test_backups_left_by_the_kills(runs):
    _, kills = runs
    # Keras backs up at epoch ends; the metadata holds the next epoch to run,
    # counted per `fit` (phase 2 of `between` restarts its count at 0).
    assert kills["between_phase1"]["backups"] == {"phase1": {"epoch": 1, "batch": 0}}
    assert kills["between_phase2"]["backups"] == {
        "phase1": {"epoch": 3, "batch": 0},
        "phase2": {"epoch": 1, "batch": 0},
    }
    assert kills["callback_phase2"]["backups"] == {".": {"epoch": 4, "batch": 0}}


# In-process: restoring into a fresh model, and bad backup directories.

X = np.random.default_rng(0).normal(size=(32, 5)).astype("float32")
TARGETS = np.random.default_rng(1).normal(size=(32, 4, 3)).astype("float32")


def compiled_hydra(width=8, num_heads=1, optimizer="adam", seed=0):
    keras.utils.set_random_seed(seed)
    body = keras.Sequential([keras.layers.Dense(width, activation="relu")])
    model = kh.HydraModel(body, kh.heads.Categorical(3), num_heads)
    model.compile(optimizer=optimizer, loss=kh.losses.HydraKL(temperature=2.0))
    model.build((None, 5))
    return model


def write_backup(model, directory, epoch):
    """Writes what `BackupAndRestore` writes at the end of epoch `epoch - 1`."""
    if not model.optimizer.built:  # as after any training step
        model.optimizer.build(model.trainable_variables)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_weights(directory / "latest.weights.h5")
    (directory / "training_metadata.json").write_text(json.dumps({"epoch": epoch}))


def fit(model, directory, epochs=3, **kwargs):
    backup = keras.callbacks.BackupAndRestore(str(directory), **kwargs)
    return model.fit(X, TARGETS, epochs=epochs, verbose=0, callbacks=[backup])


@pytest.fixture(scope="module")
def expanded():
    """A Hydra trained through both phases: its weights and optimizer state."""
    model = compiled_hydra()
    model.fit(X, TARGETS, epochs=1, verbose=0)
    model.add_heads(4)
    model.fit(X, TARGETS, epochs=1, verbose=0)
    return model


def test_load_weights_expands_a_single_head_with_optimizer_state(expanded, tmp_path):
    path = tmp_path / "h.weights.h5"
    expanded.save_weights(path)
    model = compiled_hydra(seed=5)
    model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
    assert model.num_heads == 4
    for a, b in zip(model.weights, expanded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(
        model.optimizer.variables, expanded.optimizer.variables, strict=True
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(
        model.predict(X, verbose=0), expanded.predict(X, verbose=0)
    )


def test_restore_inside_fit_continues_with_the_expanded_heads(expanded, tmp_path):
    write_backup(expanded, tmp_path, epoch=2)
    model = compiled_hydra(seed=5)
    history = fit(model, tmp_path, epochs=3)
    assert model.num_heads == 4
    assert len(history.history["loss"]) == 1  # epochs 0-1 were restored
    # The restored step count (2, one batch per epoch) carries on.
    assert int(model.optimizer.iterations.numpy()) == 3
    assert not tmp_path.exists()  # deleted at the end of the fit


def test_fit_after_a_restored_fit_runs_all_its_epochs(tmp_path):
    # Keras never resets the epoch a restore sets; HydraModel.fit does.
    model = compiled_hydra()
    model.fit(X, TARGETS, epochs=2, verbose=0)
    write_backup(model, tmp_path / "b", epoch=2)
    assert len(fit(model, tmp_path / "b", epochs=3).history["loss"]) == 1
    history = model.fit(X, TARGETS, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2


def test_garbage_weights_file_raises_and_leaves_the_model(tmp_path):
    tmp_path.joinpath("latest.weights.h5").write_bytes(b"\x00garbage" * 100)
    tmp_path.joinpath("training_metadata.json").write_text('{"epoch": 1}')
    model = compiled_hydra()
    before = model.get_weights()
    with pytest.raises(OSError, match="Cannot read the weights file .*latest"):
        fit(model, tmp_path)
    assert int(model.optimizer.iterations.numpy()) == 0
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_truncated_weights_file_falls_back_to_the_previous_backup(expanded, tmp_path):
    # With double_checkpoint=True Keras keeps the previous backup (.bkp) and
    # restores it when the latest cannot be read (our OSError).
    write_backup(expanded, tmp_path, epoch=2)
    latest = tmp_path / "latest.weights.h5"
    (tmp_path / "latest.weights.h5.bkp").write_bytes(latest.read_bytes())
    (tmp_path / "training_metadata.json.bkp").write_text('{"epoch": 2}')
    latest.write_bytes(latest.read_bytes()[:500])  # cut short mid-write
    model = compiled_hydra(seed=5)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path), double_checkpoint=True)
    backup.set_model(model)
    model.optimizer.build(model.trainable_variables)
    backup.on_train_begin()
    assert model.num_heads == 4
    assert model._initial_epoch == 2
    for a, b in zip(model.weights, expanded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_foreign_architecture_raises(tmp_path):
    other = keras.Sequential([keras.layers.Dense(3)])
    other.build((None, 5))
    tmp_path.mkdir(exist_ok=True)
    other.save_weights(tmp_path / "latest.weights.h5")
    (tmp_path / "training_metadata.json").write_text('{"epoch": 1}')
    with pytest.raises(ValueError, match="was not saved from a HydraModel"):
        fit(compiled_hydra(), tmp_path)


def test_hydra_of_another_width_raises(tmp_path):
    write_backup(compiled_hydra(width=16), tmp_path, epoch=1)
    model = compiled_hydra(width=8)
    with pytest.raises(ValueError, match="could not be loaded"):
        fit(model, tmp_path)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_other_head_count_raises(expanded, tmp_path):
    write_backup(expanded, tmp_path, epoch=1)  # 4 heads
    with pytest.raises(ValueError, match="holds 4 heads but this model has 2"):
        fit(compiled_hydra(num_heads=2), tmp_path)


def test_other_optimizer_raises_where_keras_warns(tmp_path):
    trained = compiled_hydra(optimizer="sgd")
    trained.fit(X, TARGETS, epochs=1, verbose=0)
    write_backup(trained, tmp_path, epoch=1)
    with pytest.raises(ValueError, match="holds 2 optimizer variables but"):
        fit(compiled_hydra(optimizer="adam"), tmp_path)


@pytest.mark.parametrize(
    "files, match",
    [
        (
            {"training_metadata.json": '{"epoch": 2}'},
            "has training_metadata.json but no",
        ),
        ({"latest.weights.h5": None}, "has weights but no training_metadata"),
        (
            {"latest.weights.h5": None, "training_metadata.json": "{not json"},
            "unreadable training_metadata.json",
        ),
        (
            {"latest.weights.h5": None, "training_metadata.json": '{"epoch": -1}'},
            "records epoch -1",
        ),
    ],
)
def test_inconsistent_backup_directory_raises(tmp_path, files, match):
    model = compiled_hydra()
    for name, text in files.items():
        if text is None:
            model.save_weights(tmp_path / name)
        else:
            (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        fit(model, tmp_path)
    assert int(model.optimizer.iterations.numpy()) == 0
