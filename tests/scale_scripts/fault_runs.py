"""A Hydra training script for `tests/test_fault_tolerance.py`, killed and resumed.

    python fault_runs.py MODE BACKUP_DIR OUT.npz [--kill EPOCH BATCH]

Trains a small Hydra on fixed data (`shuffle=False`, fixed seed) through
phase 1 (3 epochs, one head) and phase 2 (3 epochs, 4 heads), with
`keras.callbacks.BackupAndRestore(BACKUP_DIR)`. MODE chooses how the heads
are added:

- `between`: `fit`, `add_heads`, `fit`, each `fit` with its own backup
  directory, BACKUP_DIR/phase1 and BACKUP_DIR/phase2. Phase 1 keeps its
  backup (`delete_checkpoint=False`), so that a restart after a kill in
  phase 2 restores the end of phase 1 there and runs no phase-1 epoch, then
  `add_heads` and phase 2's `fit` resumes from its own backup. The script
  deletes BACKUP_DIR/phase1 once phase 2 has finished. (One shared
  directory does not work: phase 2's `fit` would restore the end of phase 1,
  a single-head state, into the expanded model.)
- `callback`: one `fit` of 6 epochs with `kh.callbacks.AddHeads(4, 3)`.

`--kill EPOCH BATCH` (first run only) SIGKILLs the process at the start of
that batch of that global epoch: no Python clean-up runs, as on a preempted
machine. Re-running the same command without `--kill` resumes from the last
backup. On success it writes the final weights, the optimizer's variables
and the head count to OUT.npz.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_hydra as kh  # noqa: E402

NUM_MEMBERS = 4
PHASE1_EPOCHS = 3
PHASE2_EPOCHS = 3
BATCH_SIZE = 16


class KillAt(keras.callbacks.Callback):
    """Records the global epochs run; SIGKILLs the process at `at`.

    `at` is `(epoch, batch)`: the start of that batch of that global epoch,
    or `None` to never kill.
    """

    def __init__(self, at: tuple[int, int] | None):
        super().__init__()
        self.at = at
        self.offset = 0  # added to the epochs `fit` counts
        self.epoch = None
        self.epochs_run = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + self.offset
        self.epochs_run.append(self.epoch)

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def main(mode: str, backup_dir: str, out: str, kill=None) -> None:
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    targets = rng.normal(size=(64, NUM_MEMBERS, 3)).astype("float32")
    body = keras.Sequential([keras.layers.Dense(8, activation="relu")])
    model = kh.HydraModel(body, kh.heads.Categorical(3, hidden_units=(4,)))
    model.compile(optimizer="adam", loss=kh.losses.HydraKL(temperature=2.0))
    model.build((None, 5))  # BackupAndRestore needs a built model

    kill = [KillAt(kill)]
    kwargs = {"batch_size": BATCH_SIZE, "shuffle": False, "verbose": 0}
    if mode == "between":
        phase1, phase2 = (os.path.join(backup_dir, p) for p in ("phase1", "phase2"))
        backup = keras.callbacks.BackupAndRestore(phase1, delete_checkpoint=False)
        model.fit(x, targets, epochs=PHASE1_EPOCHS, callbacks=[backup, *kill], **kwargs)
        model.add_heads(NUM_MEMBERS)
        kill[0].offset = PHASE1_EPOCHS  # phase 2's epochs count from 0 again
        backup = keras.callbacks.BackupAndRestore(phase2)
        model.fit(x, targets, epochs=PHASE2_EPOCHS, callbacks=[backup, *kill], **kwargs)
        shutil.rmtree(phase1)
    elif mode == "callback":
        callbacks = [
            keras.callbacks.BackupAndRestore(backup_dir),
            kh.callbacks.AddHeads(NUM_MEMBERS, at_epoch=PHASE1_EPOCHS),
            *kill,
        ]
        model.fit(
            x,
            targets,
            epochs=PHASE1_EPOCHS + PHASE2_EPOCHS,
            callbacks=callbacks,
            **kwargs,
        )
    else:
        raise ValueError(f"Unknown mode {mode!r}")
    np.savez(
        out,
        weights=np.concatenate([w.ravel() for w in model.get_weights()]),
        optimizer=np.concatenate(
            [np.ravel(v.numpy()) for v in model.optimizer.variables]
        ),
        num_heads=model.num_heads,
        epochs_run=np.array(kill[0].epochs_run, "int64"),
    )


if __name__ == "__main__":
    argv = sys.argv[1:]
    kill = None
    if "--kill" in argv:
        i = argv.index("--kill")
        kill = (int(argv[i + 1]), int(argv[i + 2]))
        del argv[i : i + 3]
    main(*argv, kill=kill)
