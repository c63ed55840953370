"""Checks of backup directories and weights files before Keras reads them."""

from __future__ import annotations

import io
import json
import os
import zipfile

import h5py
import keras

from keras_hydra import _keras_internals


def check_backup(callback: keras.callbacks.BackupAndRestore) -> None:
    """Raises if a backup directory would restore a wrong training state.

    Keras restores the weights and the epoch from two files, written one
    after the other, and reads whichever exists: weights without the epoch
    would re-run every epoch from trained weights, an epoch without weights
    would skip epochs from the initial ones. Both files present, or neither,
    is a consistent state.

    Raises:
        ValueError: naming the directory and the missing or unreadable file.
    """
    weights_path, metadata_path = _keras_internals.backup_paths(callback)
    weights = os.path.exists(weights_path)
    metadata = os.path.exists(metadata_path)
    if weights == metadata:
        if metadata:
            with open(metadata_path) as f:
                text = f.read()
            try:
                epoch = json.loads(text)["epoch"]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(
                    f"The backup directory {callback.backup_dir} has an unreadable "
                    f"training_metadata.json ({text[:80]!r}). Delete the directory "
                    "to train from the start."
                ) from error
            if not isinstance(epoch, int) or epoch < 0:
                raise ValueError(
                    f"The backup directory {callback.backup_dir} records epoch "
                    f"{epoch!r}, not an epoch count."
                )
        return
    present, missing = (
        ("weights", "training_metadata.json")
        if weights
        else ("training_metadata.json", "latest.weights.h5")
    )
    raise ValueError(
        f"The backup directory {callback.backup_dir} has {present} but no "
        f"{missing} (the process may have died while writing the backup): "
        "resuming from it would train the wrong epochs. Delete the directory to "
        "train from the start."
    )


def saved_layout(filepath) -> tuple[int | None, int | None] | None:
    """`(num_heads, num_optimizer_variables)` of a Keras weights file.

    Either is `None` when the file has no such weights. Returns `None` for
    files this does not inspect (sharded `.weights.json`), left to Keras.

    Raises:
        OSError: naming the file if it is not a readable HDF5 file.
    """
    path = os.fspath(filepath)
    try:
        if path.endswith(".weights.h5"):
            with h5py.File(path, "r") as f:
                return _layout_of(f)
        if path.endswith(".keras"):
            with zipfile.ZipFile(path) as archive:
                data = io.BytesIO(archive.read("model.weights.h5"))
            with h5py.File(data, "r") as f:
                return _layout_of(f)
    except (OSError, zipfile.BadZipFile, KeyError) as error:
        raise OSError(
            f"Cannot read the weights file {path}: it is corrupt, truncated or "
            f"not a Keras weights file ({type(error).__name__}: {error})."
        ) from error
    return None


def _layout_of(f: h5py.File) -> tuple[int | None, int | None]:
    kernel = f.get("heads/vars/0")
    optimizer = f.get("optimizer/vars")
    return (
        int(kernel.shape[0]) if isinstance(kernel, h5py.Dataset) else None,
        len(optimizer) if isinstance(optimizer, h5py.Group) else None,
    )


def prepare_load(model, filepath) -> None:
    """Checks a weights file's layout and expands `model`'s head to match it.

    Raises:
        OSError: if the file cannot be read.
        ValueError: if the file holds no Hydra heads, a head count `model`
            cannot reach, or another optimizer's state.
    """
    layout = saved_layout(filepath)
    if layout is None:
        return
    filepath = os.fspath(filepath)
    num_heads, num_optimizer_vars = layout
    if num_heads is None:
        raise ValueError(
            f"The weights file {filepath} was not saved from a HydraModel: it "
            "has no `heads` weights. Is this the right checkpoint or backup "
            "directory?"
        )
    if num_heads != model.num_heads:
        if model.num_heads != 1 or not model.built:
            raise ValueError(
                f"The weights file {filepath} holds {num_heads} heads but this "
                f"model has {model.num_heads}"
                + ("" if model.built else " and is not built")
                + ": only a built single-head model can be expanded to match."
            )
        had_train_function = model.train_function is not None
        model.add_heads(num_heads)
        if had_train_function:  # called inside `fit` (BackupAndRestore)
            model.make_train_function(force=True)
    optimizer = getattr(model, "optimizer", None)
    if (
        num_optimizer_vars is not None
        and optimizer is not None
        and optimizer.built
        and num_optimizer_vars != len(optimizer.variables)
    ):
        raise ValueError(
            f"The weights file {filepath} holds {num_optimizer_vars} optimizer "
            f"variables but optimizer {optimizer.name!r} has "
            f"{len(optimizer.variables)}: it was saved with another "
            "optimizer or model."
        )
