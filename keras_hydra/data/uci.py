"""The UCI regression benchmark's standard folder layout."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

_REQUIRED = ("data.txt", "index_features.txt", "index_target.txt", "n_splits.txt")


@dataclass
class UCISplit:
    """One train/test split, standardised with training statistics only.

    `x_*` are float32 `[N, features]`, `y_*` float32 `[N, 1]`, both in
    standard units; `to_original` and `variance_to_original` map predictions
    back to the target's units.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: float
    y_std: float

    def to_original(self, y: np.ndarray) -> np.ndarray:
        """Maps targets, means or interval bounds back to original units."""
        return np.asarray(y) * self.y_std + self.y_mean

    def variance_to_original(self, variance: np.ndarray) -> np.ndarray:
        """Maps variances back to original units."""
        return np.asarray(variance) * self.y_std**2


def _require(root: str, names) -> None:
    missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise FileNotFoundError(
            f"UCI folder {root!r} is missing {', '.join(missing)} (expected the "
            "standard layout: data.txt, index_features.txt, index_target.txt, "
            "n_splits.txt, index_train_<i>.txt, index_test_<i>.txt)."
        )


def _read_indices(root: str, name: str, size: int, what: str) -> np.ndarray:
    values = np.loadtxt(os.path.join(root, name), dtype="float64", ndmin=1)
    if values.size and (
        np.any(values != np.round(values)) or values.min() < 0 or values.max() >= size
    ):
        bad = values[(values != np.round(values)) | (values < 0) | (values >= size)][0]
        raise ValueError(
            f"{os.path.join(root, name)} holds index {bad:g}, outside the {size} "
            f"{what} of data.txt."
        )
    return values.astype("int64")


def _check_split(root, split, data, features, target, train, test) -> None:
    if int(target[0]) in set(features.tolist()):
        raise ValueError(
            f"Column {int(target[0])} is the target ({root}/index_target.txt) "
            f"and also a feature ({root}/index_features.txt)."
        )
    for name, rows in (("train", train), ("test", test)):
        if not rows.size:
            raise ValueError(f"{root}/index_{name}_{split}.txt lists no rows.")
    overlap = np.intersect1d(train, test)
    if overlap.size:
        raise ValueError(
            f"{root}/index_train_{split}.txt and index_test_{split}.txt share "
            f"{overlap.size} rows, e.g. {overlap[:5].tolist()}."
        )
    rows = np.union1d(train, test)
    finite = np.all(np.isfinite(data[rows][:, np.append(features, target)]), axis=1)
    if not finite.all():
        rows = rows[~finite]
        raise ValueError(
            f"{root}/data.txt has non-finite values (NaN or Inf) in {rows.size} "
            f"used rows, e.g. rows {rows[:5].tolist()} (0-based)."
        )


def num_splits(root: str) -> int:
    """The number of splits of the UCI folder `root` (`n_splits.txt`)."""
    return int(np.loadtxt(os.path.join(root, "n_splits.txt")))


def load(root: str, split: int = 0) -> UCISplit:
    """Loads split `split` of a UCI folder in the standard layout.

    The layout (Hernández-Lobato & Adams, 2015): `data.txt` (whitespace
    separated rows), `index_features.txt` and `index_target.txt` (0-based
    columns), `index_train_<i>.txt` and `index_test_<i>.txt` (0-based rows of
    split i) and `n_splits.txt`. Any folder in that layout works.

    Args:
        root: str, the data set's folder.
        split: int, the split to load, `0 <= split < n_splits`.

    Returns:
        A `UCISplit`, standardised with the training part's mean and standard
        deviation.

    Raises:
        FileNotFoundError: if a file of the layout is missing.
        ValueError: for a split out of range, an index file pointing outside
            `data.txt`, an empty train or test index, train and test indices
            that share rows, a target column that is also a feature, or
            NaN or Inf in a used row of `data.txt`; the message names the
            file and the rows.

    Example:

    >>> import tempfile, os
    >>> root = tempfile.mkdtemp()
    >>> files = {"data.txt": "1 2\\n2 4\\n3 6\\n4 8", "index_features.txt": "0",
    ...          "index_target.txt": "1", "n_splits.txt": "1",
    ...          "index_train_0.txt": "0\\n1\\n2", "index_test_0.txt": "3"}
    >>> for name, text in files.items():
    ...     _ = open(os.path.join(root, name), "w").write(text)
    >>> data = load(root, 0)
    >>> data.x_train.shape, float(data.to_original(data.y_test)[0, 0])
    ((3, 1), 8.0)
    """
    root = os.fspath(root)
    _require(root, _REQUIRED)
    splits = num_splits(root)
    if not 0 <= split < splits:
        raise ValueError(
            f"split={split} is out of range: {root!r} has {splits} splits."
        )
    _require(root, (f"index_train_{split}.txt", f"index_test_{split}.txt"))
    data = np.loadtxt(os.path.join(root, "data.txt"), dtype="float64", ndmin=2)
    rows, columns = data.shape
    features = _read_indices(root, "index_features.txt", columns, "columns")
    target = _read_indices(root, "index_target.txt", columns, "columns")
    train = _read_indices(root, f"index_train_{split}.txt", rows, "rows")
    test = _read_indices(root, f"index_test_{split}.txt", rows, "rows")
    if target.size != 1:
        raise ValueError(
            f"index_target.txt must hold one column; it holds {target.size}."
        )
    _check_split(root, split, data, features, target, train, test)

    x, y = data[:, features], data[:, target]
    x_mean, x_std = x[train].mean(axis=0), x[train].std(axis=0)
    x_std[x_std == 0] = 1.0  # constant features stay at zero
    y_mean, y_std = float(y[train].mean()), float(y[train].std()) or 1.0
    x = ((x - x_mean) / x_std).astype("float32")
    y = ((y - y_mean) / y_std).astype("float32")
    return UCISplit(
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        x_mean=x_mean,
        x_std=x_std,
        y_mean=y_mean,
        y_std=y_std,
    )
