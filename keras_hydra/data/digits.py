"""scikit-learn's 8x8 digits, split into in- and out-of-distribution classes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def load_digits_ood(
    in_classes: Sequence[int] = (0, 1, 2, 3, 4, 5),
    test_size: float = 0.3,
    seed: int = 0,
) -> dict:
    """Loads the digits, keeping some classes out as out-of-distribution data.

    The data ships with scikit-learn, so nothing is downloaded. Pixels are
    scaled to [0, 1] and flattened to 64 features; in-distribution labels are
    renumbered `0..len(in_classes)-1` in the order given.

    Args:
        in_classes: the digits the models are trained on; the others are
            out-of-distribution.
        test_size: fraction of the in-distribution examples held out for test.
        seed: int, seed of the stratified train/test split.

    Returns:
        A dict of float32 inputs and int64 labels: `x_train`, `y_train`,
        `x_test`, `y_test`, and `x_ood` (all examples of the other classes).

    Example:

    >>> data = load_digits_ood(in_classes=(0, 1, 2))
    >>> data["x_train"].shape[1], int(data["y_train"].max())
    (64, 2)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    in_classes = [int(c) for c in in_classes]
    if len(set(in_classes)) < 2 or not set(in_classes) <= set(range(10)):
        raise ValueError(
            f"`in_classes` must name at least two distinct digits in 0..9. "
            f"Received: {in_classes}"
        )
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    is_in = np.isin(digits.target, in_classes)
    relabel = {c: i for i, c in enumerate(in_classes)}
    y = np.array([relabel.get(int(t), -1) for t in digits.target], dtype="int64")
    x_train, x_test, y_train, y_test = train_test_split(
        x[is_in], y[is_in], test_size=test_size, random_state=seed, stratify=y[is_in]
    )
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "x_ood": x[~is_in],
    }
