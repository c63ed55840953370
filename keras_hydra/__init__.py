"""Hydra ensemble distillation for Keras 3."""

from keras_hydra import (
    callbacks,
    data,
    distributions,
    evaluation,
    export,
    heads,
    layers,
    losses,
    metrics,
    regularizers,
    teacher,
    transfer,
    uncertainty,
)
from keras_hydra.model import HydraModel

__version__ = "0.1.0"

__all__ = [
    "HydraModel",
    "callbacks",
    "data",
    "distributions",
    "evaluation",
    "export",
    "heads",
    "layers",
    "losses",
    "metrics",
    "regularizers",
    "teacher",
    "transfer",
    "uncertainty",
]
