"""Fashion-MNIST from local IDX files, with the Keras download as a fallback."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import keras
import numpy as np

ENV_VAR = "KERAS_HYDRA_FASHION_MNIST"
# Where Debian's `dataset-fashion-mnist` package puts the files.
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_DTYPES = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzipped or not.

    The header is two zero bytes, a type code, the number of dimensions, then
    each dimension as a big-endian uint32; the values follow, big-endian.

    Args:
        path: the file; read through gzip when it starts with gzip's magic.

    Returns:
        A numpy array of the file's shape, in native byte order.

    Raises:
        ValueError: if the header is not IDX or the size does not match it.

    Example:

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile(suffix=".idx", delete=False) as f:
    ...     _ = f.write(bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3, *range(6)]))
    >>> read_idx(f.name)
    array([[0, 1, 2],
           [3, 4, 5]], dtype=uint8)
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (header {data[:4]!r}).")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) - offset != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(
            f"{path}: the IDX header says shape {shape} of {dtype}, but the file "
            f"holds {len(data) - offset} bytes of data."
        )
    values = np.frombuffer(data, dtype, offset=offset).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _load_dir(directory: str | os.PathLike) -> tuple | None:
    """The four arrays from `directory`, or `None` if a file is missing."""
    directory = Path(directory)
    paths = [_find(directory, name) for name in FILES]
    if any(p is None for p in paths):
        return None
    x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
    for x, y in [(x_train, y_train), (x_test, y_test)]:
        if x.ndim != 3 or y.shape != x.shape[:1]:
            raise ValueError(
                f"Fashion-MNIST files in {directory} have inconsistent shapes: "
                f"images {x.shape}, labels {y.shape}."
            )
    return (x_train, y_train), (x_test, y_test)


def load_fashion_mnist(path: str | os.PathLike | None = None) -> tuple:
    """Loads Fashion-MNIST (60,000 training and 10,000 test images).

    Looks, in order, in `path`, in the directory named by the environment
    variable `KERAS_HYDRA_FASHION_MNIST`, in `/usr/share/datasets/fashion-mnist`
    (Debian's `dataset-fashion-mnist` package), and finally asks
    `keras.datasets.fashion_mnist.load_data()`, which uses its cache or
    downloads. A directory holds the four original IDX files
    (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
    `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`), each gzipped
    (`.gz`) or not.

    Args:
        path: optional directory of the IDX files. When given (or when the
            environment variable is set), the files must be there: no other
            source is tried.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: uint8 images `[N, 28, 28]`
        and uint8 labels `[N]`, as `keras.datasets.fashion_mnist.load_data()`.

    Raises:
        FileNotFoundError: if the named directory lacks a file, or if no
            source has the data.

    Example:

    >>> (x_train, y_train), (x_test, y_test) = load_fashion_mnist()  # doctest: +SKIP
    >>> x_train.shape, x_test.dtype, int(y_train.max())  # doctest: +SKIP
    ((60000, 28, 28), dtype('uint8'), 9)
    """
    named = [(path, "`path`")] if path is not None else []
    if os.environ.get(ENV_VAR):
        named.append((os.environ[ENV_VAR], f"${ENV_VAR}"))
    if named:
        directory, source = named[0]
        data = _load_dir(directory)
        if data is None:
            raise FileNotFoundError(
                f"Fashion-MNIST not found in {directory} (from {source}): it "
                f"needs the files {', '.join(FILES)} (each may end in .gz)."
            )
        return data
    data = _load_dir(DEFAULT_DIR)
    if data is not None:
        return data
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception as error:
        raise FileNotFoundError(
            f"Fashion-MNIST is neither in {DEFAULT_DIR} nor downloadable "
            f"({type(error).__name__}: {error}). Install it with "
            "`apt-get install dataset-fashion-mnist`, or put the IDX files in a "
            f"directory and set ${ENV_VAR} to it (or pass `path`)."
        ) from error
    return (x_train, y_train.astype("uint8")), (x_test, y_test.astype("uint8"))
