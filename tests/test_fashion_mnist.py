import gzip
import os

import keras
import numpy as np
import pytest

from keras_hydra.data import fashion_mnist
from keras_hydra.data.fashion_mnist import ENV_VAR, FILES, load_fashion_mnist, read_idx


def idx_bytes(array, code=0x08):
    header = bytes([0, 0, code, array.ndim])
    dims = np.array(array.shape, dtype=">u4").tobytes()
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_fake(directory, n_train=6, n_test=4, gz=True, value=0):
    """Writes the four Fashion-MNIST IDX files, images filled with `value`."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = [
        np.full((n_train, 28, 28), value, "uint8"),
        np.arange(n_train, dtype="uint8") % 10,
        np.full((n_test, 28, 28), value, "uint8"),
        np.arange(n_test, dtype="uint8") % 10,
    ]
    for name, array in zip(FILES, arrays, strict=True):
        data = idx_bytes(array)
        path = directory / (name + ".gz" if gz else name)
        path.write_bytes(gzip.compress(data) if gz else data)
    return arrays


@pytest.fixture
def no_sources(monkeypatch, tmp_path):
    """No env var, an empty default directory and a failing Keras download."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIR", str(tmp_path / "missing"))

    def offline():
        raise OSError("no network")

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips(tmp_path, gz):
    rng = np.random.default_rng(0)
    for array, code in [
        (rng.integers(0, 256, size=(3, 4, 5)).astype("uint8"), 0x08),
        (rng.integers(-9, 9, size=(7,)).astype("int32"), 0x0C),
        (rng.normal(size=(2, 3)).astype("float32"), 0x0D),
    ]:
        data = idx_bytes(array, code)
        path = tmp_path / f"a{code}.idx"
        path.write_bytes(gzip.compress(data) if gz else data)
        values = read_idx(path)
        assert values.dtype == array.dtype and values.dtype.isnative
        np.testing.assert_array_equal(values, array)


def test_read_idx_rejects_bad_files(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)
    path.write_bytes(idx_bytes(np.zeros((2, 3), "uint8"))[:-1])
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        read_idx(path)


@pytest.mark.parametrize("gz", [True, False])
def test_path_argument(tmp_path, no_sources, gz):
    arrays = write_fake(tmp_path / "fm", gz=gz)
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(tmp_path / "fm")
    for loaded, expected in zip(
        [x_train, y_train, x_test, y_test], arrays, strict=True
    ):
        assert loaded.dtype == np.uint8
        np.testing.assert_array_equal(loaded, expected)


def test_precedence_path_then_env_then_default(tmp_path, monkeypatch, no_sources):
    write_fake(tmp_path / "arg", value=1)
    write_fake(tmp_path / "env", value=2)
    write_fake(tmp_path / "default", value=3)
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIR", str(tmp_path / "default"))
    assert load_fashion_mnist()[0][0].max() == 3
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert load_fashion_mnist()[0][0].max() == 2
    assert load_fashion_mnist(tmp_path / "arg")[0][0].max() == 1


def test_named_directory_without_files_raises(tmp_path, monkeypatch, no_sources):
    with pytest.raises(FileNotFoundError, match="from `path`"):
        load_fashion_mnist(tmp_path)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=ENV_VAR):
        load_fashion_mnist()


def test_keras_fallback(monkeypatch, no_sources):
    x, y = np.zeros((2, 28, 28), "uint8"), np.array([1, 2], "int64")
    monkeypatch.setattr(
        keras.datasets.fashion_mnist, "load_data", lambda: ((x, y), (x, y))
    )
    (_, y_train), _ = load_fashion_mnist()
    assert y_train.dtype == np.uint8


def test_nothing_found_says_how_to_get_the_data(no_sources):
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist()
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert ENV_VAR in message and "no network" in message


@pytest.mark.skipif(
    not os.path.isdir(fashion_mnist.DEFAULT_DIR),
    reason="needs the Debian package dataset-fashion-mnist",
)
def test_debian_package_data(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert x_train.dtype == y_test.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)
