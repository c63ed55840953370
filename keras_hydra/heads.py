"""Output families of a Hydra's heads."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from keras_hydra import uncertainty
from keras_hydra.layers import HydraHeads


@keras.saving.register_keras_serializable(package="keras_hydra")
class Categorical:
    """Classification heads: each head emits `num_classes` logits.

    Args:
        num_classes: int, the number of classes.
        hidden_units: sequence of ints, hidden layer sizes inside each head
            (empty for linear heads, as in the paper).
        activation: activation of the hidden layers.

    Example:

    >>> head = Categorical(10, hidden_units=(64,))
    >>> head.layer(num_heads=5).units
    10
    """

    def __init__(
        self, num_classes: int, hidden_units: Sequence[int] = (), activation="relu"
    ):
        if int(num_classes) < 2:
            raise ValueError(f"`num_classes` must be >= 2. Received: {num_classes}")
        self.num_classes = int(num_classes)
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.activation = activation

    @property
    def units(self) -> int:
        """Number of outputs of one head."""
        return self.num_classes

    def layer(self, num_heads: int, name: str = "heads") -> HydraHeads:
        """Returns the `HydraHeads` layer for `num_heads` heads of this family."""
        return HydraHeads(
            num_heads,
            self.units,
            hidden_units=self.hidden_units,
            activation=self.activation,
            name=name,
        )

    def validate_targets(self, shape) -> None:
        """Raises if teacher targets of `shape` do not fit these heads."""
        if len(shape) != 3:
            raise ValueError(
                "Teacher targets must have shape [batch, members, num_classes] "
                f"(rank 3). Received shape {tuple(shape)}."
            )
        if shape[-1] is not None and shape[-1] != self.num_classes:
            raise ValueError(
                f"Teacher targets have {shape[-1]} classes (shape {tuple(shape)}) "
                f"but the heads have num_classes={self.num_classes}."
            )

    def uncertainty(self, outputs) -> dict:
        """Uncertainty decomposition of head logits `[batch, heads, classes]`."""
        return uncertainty.categorical(outputs, from_logits=True)

    def get_config(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "hidden_units": list(self.hidden_units),
            "activation": keras.activations.serialize(
                keras.activations.get(self.activation)
            ),
        }

    @classmethod
    def from_config(cls, config: dict) -> Categorical:
        return cls(**config)
