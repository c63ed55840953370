"""TFP distribution families as flat parameter tensors.

Keras 3 models cannot hold `tfp.layers`, so regression models emit the
constrained parameters of a family as one tensor `[..., num_params *
event_size]`, in the order of the family's `parameter_properties()`, and the
`tfd` distributions are built from it here, in losses, prediction helpers and
the serving function.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

# Degrees of freedom start above 2 so that every head has a finite variance.
_LOWER_BOUNDS = {"df": 2.0}


def resolve(family) -> type:
    """Returns the `tfd` class for a class or a class name such as `"Normal"`.

    Raises:
        ValueError: for an unknown name, or a family whose parameters cannot
            be emitted as a flat tensor.
    """
    if isinstance(family, str):
        resolved = getattr(tfd, family, None)
        if not (isinstance(resolved, type) and issubclass(resolved, tfd.Distribution)):
            raise ValueError(
                f"Unknown distribution family {family!r}: expected the name of a "
                "tfp.distributions class, e.g. 'Normal', 'Laplace', 'StudentT'."
            )
        family = resolved
    if not (isinstance(family, type) and issubclass(family, tfd.Distribution)):
        raise ValueError(
            f"`family` must be a tfp.distributions class or its name. Received: "
            f"{family!r}"
        )
    parameter_names(family)
    return family


def parameter_names(family: type) -> list[str]:
    """The parameters a head emits for `family`, in order.

    Raises:
        ValueError: if the family has no parameter properties, or parameters
            that are not scalars per event dimension.
    """
    try:
        properties = family.parameter_properties()
    except NotImplementedError as error:
        raise ValueError(
            f"{family.__name__} does not declare parameter_properties, so its "
            "parameters cannot be emitted by a head."
        ) from error
    names = []
    for name, prop in properties.items():
        if not prop.is_preferred:
            continue
        if prop.event_ndims != 0 or prop.default_constraining_bijector_fn is None:
            raise ValueError(
                f"{family.__name__} is not supported: its parameter {name!r} is "
                "not an unconstrained-to-constrained scalar. Supported families "
                "have scalar parameters, e.g. Normal, Laplace, StudentT, LogNormal."
            )
        names.append(name)
    if not names:
        raise ValueError(f"{family.__name__} has no parameters to emit.")
    return names


def is_positive(family: type, name: str) -> bool:
    """Whether parameter `name` of `family` must be > 0 (a scale, a rate, df)."""
    bijector = family.parameter_properties()[name].default_constraining_bijector_fn()
    return isinstance(bijector, tfp.bijectors.Softplus)


def constrain(raw, family: type, min_scale: float):
    """Maps unconstrained outputs `[..., P * E]` to valid parameters.

    Each parameter goes through its family's default constraining bijector;
    positive parameters (scales, degrees of freedom) get `softplus` plus
    `min_scale` (and `df` starts at 2).
    """
    raw = tf.cast(raw, tf.float32)
    properties = family.parameter_properties()
    pieces = tf.split(raw, len(parameter_names(family)), axis=-1)
    out = []
    for name, piece in zip(parameter_names(family), pieces, strict=True):
        if is_positive(family, name):
            out.append(
                tf.math.softplus(piece) + min_scale + _LOWER_BOUNDS.get(name, 0.0)
            )
        else:
            bijector = properties[name].default_constraining_bijector_fn()
            out.append(bijector.forward(piece))
    return tf.concat(out, axis=-1)


def split(params, family: type) -> dict:
    """Splits `[..., P * E]` parameters into a dict of `[..., E]` tensors."""
    names = parameter_names(family)
    params = tf.cast(params, tf.float32)
    return dict(zip(names, tf.split(params, len(names), axis=-1), strict=True))


def make(params, family: type):
    """The distribution of `[..., P * E]` parameters, with event shape `[E]`."""
    base = family(**split(params, family), validate_args=False)
    return tfd.Independent(base, reinterpreted_batch_ndims=1)


def mixture(params, family: type):
    """Uniform mixture over axis 1 of `[batch, S, P * E]` parameters."""
    params = tf.cast(params, tf.float32)
    logits = tf.zeros(tf.shape(params)[:-1])
    return tfd.MixtureSameFamily(tfd.Categorical(logits=logits), make(params, family))
