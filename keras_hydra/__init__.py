"""Hydra ensemble distillation for Keras 3."""

from keras_hydra import (
    callbacks,
    data,
    distillation,
    distributions,
    evaluation,
    export,
    heads,
    layers,
    losses,
    metrics,
    recipes,
    regularizers,
    teacher,
    transfer,
    uncertainty,
)
from keras_hydra.model import HydraModel
from keras_hydra.recipes import HydraRecipe, distill

__version__ = "0.1.0"

__all__ = [
    "HydraModel",
    "HydraRecipe",
    "distill",
    "callbacks",
    "data",
    "distillation",
    "distributions",
    "evaluation",
    "export",
    "heads",
    "layers",
    "losses",
    "metrics",
    "recipes",
    "regularizers",
    "teacher",
    "transfer",
    "uncertainty",
]
