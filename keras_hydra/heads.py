"""Output families of a Hydra's heads."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from keras_hydra import distributions, uncertainty, validation
from keras_hydra.layers import DistributionHeads, HydraHeads

tfd = distributions.tfd


def _spread(values, factor):
    """`mean + factor * (values - mean)`, the mean taken over heads (axis 1)."""
    return factor * values + (1 - factor) * ops.mean(values, axis=1, keepdims=True)


def _check_rank(shape, what: str) -> None:
    if len(shape) != 3:
        raise ValueError(
            f"Teacher targets must have shape [batch, members, {what}] (rank 3). "
            f"Received shape {tuple(shape)}."
        )


@keras.saving.register_keras_serializable(package="keras_hydra")
class Categorical:
    """Classification heads: each head emits `num_classes` logits.

    Args:
        num_classes: int, the number of classes.
        hidden_units: sequence of ints, hidden layer sizes inside each head
            (empty for linear heads, as in the paper).
        activation: activation of the hidden layers.
        conv_filters: int, filters of a convolution that starts each head,
            for a body that ends in a feature map `[batch, h, w, c]` (see
            `keras_hydra.layers.HydraHeads`); 0 for flat features.

    Example:

    >>> head = Categorical(10, hidden_units=(64,))
    >>> head.layer(num_heads=5).units
    10
    """

    def __init__(
        self,
        num_classes: int,
        hidden_units: Sequence[int] = (),
        activation="relu",
        conv_filters: int = 0,
    ):
        if int(num_classes) < 2:
            raise ValueError(f"`num_classes` must be >= 2. Received: {num_classes}")
        self.num_classes = int(num_classes)
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.activation = activation
        self.conv_filters = validation.count(conv_filters, "conv_filters", minimum=0)

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
            conv_filters=self.conv_filters,
            name=name,
        )

    def validate_targets(self, targets: np.ndarray) -> None:
        """Raises if teacher targets (logits or probabilities) do not fit."""
        shape = targets.shape
        _check_rank(shape, "num_classes")
        if shape[-1] != self.num_classes:
            raise ValueError(
                f"Teacher targets have {shape[-1]} classes (shape {tuple(shape)}) "
                f"but the heads have num_classes={self.num_classes}."
            )

    def uncertainty(self, outputs) -> dict:
        """Uncertainty decomposition of head logits `[batch, heads, classes]`."""
        return uncertainty.categorical(outputs, from_logits=True)

    def spread(self, outputs, factor):
        """Scales each head's logits' deviation from the heads' mean logits.

        `mean_s z_s + factor * (z_s - mean_s z_s)`: a factor above 1 moves
        the heads apart, 0 makes them all predict their mean logits.

        Example:

        >>> logits = np.array([[[1.0, 0.0], [3.0, 0.0]]])
        >>> np.asarray(Categorical(2).spread(logits, 2.0)).tolist()
        [[[0.0, 0.0], [4.0, 0.0]]]
        """
        return _spread(outputs, factor)

    def epistemic(self, outputs):
        """Per-example mutual information `[batch]` of head logits, in nats."""
        return self.uncertainty(outputs)["epistemic_uncertainty"]

    def distribution(self, outputs):
        """The uniform mixture over heads of the heads' categoricals."""
        logits = keras.ops.cast(outputs, "float32")
        return tfd.MixtureSameFamily(
            tfd.Categorical(logits=keras.ops.zeros(keras.ops.shape(logits)[:-1])),
            tfd.Categorical(logits=logits),
        )

    def get_config(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "hidden_units": list(self.hidden_units),
            "activation": keras.activations.serialize(
                keras.activations.get(self.activation)
            ),
            "conv_filters": self.conv_filters,
        }

    @classmethod
    def from_config(cls, config: dict) -> Categorical:
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_hydra")
class Distribution:
    """Regression heads: each head emits the parameters of a TFP family.

    Head outputs are `[batch, heads, P * event_size]`, the constrained
    parameters in the order of the family's `parameter_properties()` (Normal:
    `loc, scale`; StudentT: `df, loc, scale`). Scales get `softplus` plus
    `min_scale`; StudentT's `df` is kept above 2 so variances are finite.
    Teacher members emit the same layout (end them with
    `keras_hydra.layers.DistributionParameters`).

    Args:
        family: a `tfp.distributions` class or its name: `"Normal"`,
            `"Laplace"`, `"StudentT"`, `"LogNormal"`, or any family whose
            parameters are scalars.
        event_size: int, dimensions of the target.
        hidden_units: sequence of ints, hidden layer sizes inside each head.
        activation: activation of the hidden layers.
        min_scale: float, floor of positive parameters.
        levels: central prediction interval levels reported by
            `uncertainty` (and the serving signature).
        conv_filters: int, filters of a convolution that starts each head,
            for a body that ends in a feature map; 0 for flat features.

    Example:

    >>> head = Distribution("Normal")
    >>> head.units
    2
    """

    def __init__(
        self,
        family="Normal",
        event_size: int = 1,
        hidden_units: Sequence[int] = (),
        activation="relu",
        min_scale: float = 1e-3,
        levels: Sequence[float] = (0.5, 0.9, 0.95),
        conv_filters: int = 0,
    ):
        self.family = distributions.resolve(family)
        if int(event_size) < 1:
            raise ValueError(f"`event_size` must be >= 1. Received: {event_size}")
        self.event_size = int(event_size)
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.activation = activation
        self.min_scale = float(min_scale)
        self.levels = tuple(float(level) for level in levels)
        for level in self.levels:
            if not 0.0 < level < 1.0:
                raise ValueError(
                    f"Interval levels must be in (0, 1). Received: {level}"
                )
        self.parameter_names = distributions.parameter_names(self.family)
        self.conv_filters = validation.count(conv_filters, "conv_filters", minimum=0)

    @property
    def units(self) -> int:
        """Number of outputs of one head."""
        return len(self.parameter_names) * self.event_size

    def layer(self, num_heads: int, name: str = "heads") -> DistributionHeads:
        """Returns the `DistributionHeads` layer for `num_heads` heads."""
        return DistributionHeads(
            num_heads,
            self.family,
            event_size=self.event_size,
            min_scale=self.min_scale,
            hidden_units=self.hidden_units,
            activation=self.activation,
            conv_filters=self.conv_filters,
            name=name,
        )

    def validate_targets(self, targets: np.ndarray) -> None:
        """Raises if teacher targets are not valid parameters of the family."""
        shape = targets.shape
        _check_rank(shape, "num_params * event_size")
        if shape[-1] != self.units:
            raise ValueError(
                f"Teacher targets have {shape[-1]} parameters per member (shape "
                f"{tuple(shape)}) but {self.family.__name__} with event_size="
                f"{self.event_size} needs {self.units} "
                f"({', '.join(self.parameter_names)})."
            )
        pieces = np.split(np.asarray(targets), len(self.parameter_names), axis=-1)
        for name, values in zip(self.parameter_names, pieces, strict=True):
            if distributions.is_positive(self.family, name):
                bad = ~(values > 0)
                if bad.any():
                    index = tuple(int(i) for i in np.argwhere(bad)[0][:2])
                    raise ValueError(
                        f"Teacher targets must have {name} > 0, but (example, "
                        f"member) {index} has {name}="
                        f"{float(values[bad][0]):g}."
                    )

    def uncertainty(self, outputs) -> dict:
        """Mixture moments, variance split and intervals of head parameters."""
        return uncertainty.regression(outputs, self.family, self.levels)

    def spread(self, outputs, factor):
        """Scales each head's `loc` deviation from the heads' mean `loc`.

        The other parameters are left as they are, so for a family whose
        mean is its `loc` (Normal, Laplace, StudentT) the epistemic variance
        scales by `factor**2` and the aleatoric variance stays. A family
        without a `loc` parameter is returned unchanged.

        Example:

        >>> params = np.array([[[1.0, 0.5], [3.0, 2.0]]])  # Normal loc, scale
        >>> np.asarray(Distribution("Normal").spread(params, 2.0)).tolist()
        [[[0.0, 0.5], [4.0, 2.0]]]
        """
        if "loc" not in self.parameter_names:
            return outputs
        pieces = ops.split(outputs, len(self.parameter_names), axis=-1)
        index = self.parameter_names.index("loc")
        pieces[index] = _spread(pieces[index], factor)
        return ops.concatenate(pieces, axis=-1)

    def epistemic(self, outputs):
        """Per-example epistemic variance `[batch]`, summed over event dims."""
        variance = uncertainty.regression(outputs, self.family, levels=())
        return ops.sum(variance["epistemic_variance"], axis=-1)

    def distribution(self, outputs):
        """The uniform mixture over heads, a `tfd.MixtureSameFamily`."""
        return distributions.mixture(outputs, self.family)

    def get_config(self) -> dict:
        return {
            "family": self.family.__name__,
            "event_size": self.event_size,
            "hidden_units": list(self.hidden_units),
            "activation": keras.activations.serialize(
                keras.activations.get(self.activation)
            ),
            "min_scale": self.min_scale,
            "levels": list(self.levels),
            "conv_filters": self.conv_filters,
        }

    @classmethod
    def from_config(cls, config: dict) -> Distribution:
        return cls(**config)
