"""Offline-capable data loaders."""

from keras_hydra.data import uci
from keras_hydra.data.digits import load_digits_ood
from keras_hydra.data.fashion_mnist import load_fashion_mnist, read_idx
from keras_hydra.data.mnist import load_mnist_5k

__all__ = ["load_digits_ood", "load_fashion_mnist", "load_mnist_5k", "read_idx", "uci"]
