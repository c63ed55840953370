"""Hydra ensemble distillation for Keras 3."""

from keras_hydra import export, heads, layers, losses, teacher, uncertainty
from keras_hydra.model import HydraModel

__version__ = "0.1.0"

__all__ = [
    "HydraModel",
    "export",
    "heads",
    "layers",
    "losses",
    "teacher",
    "uncertainty",
]
