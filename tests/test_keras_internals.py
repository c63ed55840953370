"""Fails when a Keras or TensorFlow upgrade removes a private internal we use."""

import inspect

import keras
import pytest

import keras_hydra as kh
from keras_hydra import _keras_internals


def _owner(name, tmp_path):
    if name == "keras.Model":
        model = kh.HydraModel(keras.layers.Dense(4), kh.heads.Categorical(2))
        model.build((None, 3))
        return model
    if name == "keras.callbacks.BackupAndRestore":
        return keras.callbacks.BackupAndRestore(str(tmp_path))
    raise AssertionError(name)


@pytest.mark.parametrize(
    "owner, attribute", [(o, a) for o, a, _ in _keras_internals.TOUCHED]
)
def test_each_private_internal_still_exists(owner, attribute, tmp_path):
    if owner.startswith("tf.distribute"):
        # The extended class's method: a strategy here would start collectives.
        from tensorflow.python.distribute import collective_all_reduce_strategy

        cls = collective_all_reduce_strategy.CollectiveAllReduceExtended
        assert callable(getattr(cls, attribute))
        return
    assert hasattr(_owner(owner, tmp_path), attribute)


def test_symbolic_build_signature_is_the_one_overridden():
    parameters = list(inspect.signature(keras.Model._maybe_symbolic_build).parameters)
    assert parameters == ["self", "iterator", "data_batch"]


def test_replace_layer_tracks_the_new_layer_only():
    model = kh.HydraModel(keras.layers.Dense(4), kh.heads.Categorical(2))
    model.build((None, 3))
    old = model.heads
    new = kh.heads.Categorical(2).layer(3)
    new.build((None, 4))
    _keras_internals.replace_layer(model, "heads", new)
    ids = {id(v) for v in model.weights}
    assert all(id(v) in ids for v in new.weights)
    assert not any(id(v) in ids for v in old.weights)
    with pytest.raises(ValueError):  # the state is locked again
        model.extra = keras.layers.Dense(2)


def test_backup_paths_are_in_the_backup_directory(tmp_path):
    weights, metadata = _keras_internals.backup_paths(
        keras.callbacks.BackupAndRestore(str(tmp_path))
    )
    assert weights == str(tmp_path / "latest.weights.h5")
    assert metadata == str(tmp_path / "training_metadata.json")
