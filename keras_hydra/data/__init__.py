"""Offline-capable data loaders."""

from keras_hydra.data.digits import load_digits_ood

__all__ = ["load_digits_ood"]
