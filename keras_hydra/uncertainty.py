"""Uncertainty decompositions of a Hydra's heads or of a raw ensemble."""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from keras_hydra import distributions

_EPSILON = 1e-12


def categorical(outputs, from_logits: bool = True) -> dict:
    """Splits the uncertainty of `[batch, M, num_classes]` outputs.

    Works on a Hydra's head outputs and on a raw ensemble's stacked member
    outputs alike. With `p_m` the class probabilities of head (or member) `m`
    and `p = mean_m p_m`, all in nats:

    - `total_uncertainty`: entropy of the mean, `H[p]`.
    - `aleatoric_uncertainty`: mean entropy, `mean_m H[p_m]`.
    - `epistemic_uncertainty`: mutual information, total minus aleatoric.

    Args:
        outputs: tensor `[batch, M, num_classes]`, logits or probabilities.
        from_logits: bool, whether `outputs` are logits.

    Returns:
        A dict of tensors: `probabilities` `[batch, K]` (head average),
        `head_probabilities` `[batch, M, K]`, `predicted_class` `[batch]`
        (int64, -1 where the outputs are NaN), and the three uncertainties `[batch]`.

    Example:

    >>> logits = np.array([[[2.0, 0.0], [0.0, 2.0]]])
    >>> u = categorical(logits)
    >>> float(u["total_uncertainty"][0])  # two confident heads that disagree
    0.693...
    """
    outputs = ops.cast(ops.convert_to_tensor(outputs), "float32")
    if from_logits:
        log_probs = ops.log_softmax(outputs, axis=-1)
    else:
        log_probs = ops.log(ops.maximum(outputs, _EPSILON))
    head_probs = ops.exp(log_probs)
    num_heads = ops.shape(outputs)[1]
    log_mean = ops.logsumexp(log_probs, axis=1) - ops.log(
        ops.cast(num_heads, "float32")
    )
    probs = ops.exp(log_mean)
    total = -ops.sum(probs * log_mean, axis=-1)
    aleatoric = ops.mean(-ops.sum(head_probs * log_probs, axis=-1), axis=1)
    return {
        "probabilities": probs,
        "head_probabilities": head_probs,
        # -1 where the probabilities are NaN (a non-finite input row).
        "predicted_class": ops.where(
            ops.all(ops.isfinite(probs), axis=-1),
            ops.cast(ops.argmax(probs, axis=-1), "int64"),
            -1,
        ),
        "total_uncertainty": total,
        "aleatoric_uncertainty": aleatoric,
        # Clipped at zero: MI is non-negative, float error is not.
        "epistemic_uncertainty": ops.maximum(total - aleatoric, 0.0),
    }


def interval_keys(level: float) -> tuple[str, str]:
    """Output names of a central interval, e.g. `("lower_95", "upper_95")`."""
    tag = f"{100 * level:g}".replace(".", "_")
    return f"lower_{tag}", f"upper_{tag}"


def _mixture_quantile(components, q: float, iterations: int = 40):
    """Quantile of a uniform mixture over axis 1, by bisection on its CDF.

    It lies between the smallest and largest component quantiles.
    """
    quantiles = components.quantile(q)
    low = tf.reduce_min(quantiles, axis=1)
    high = tf.reduce_max(quantiles, axis=1)
    for _ in range(iterations):
        mid = (low + high) / 2
        below = tf.reduce_mean(components.cdf(mid[:, None]), axis=1) < q
        low = tf.where(below, mid, low)
        high = tf.where(below, high, mid)
    return (low + high) / 2


def regression(params, family="Normal", levels=(0.95,)) -> dict:
    """Splits the predictive variance of `[batch, M, P * E]` parameters.

    For a Hydra's heads or a raw ensemble's members, each a distribution
    `p_m` with mean `mu_m` and variance `s_m^2`, the prediction is the uniform
    mixture; by the law of total variance:

    - `mean`: `mean_m mu_m`.
    - `aleatoric_variance`: `mean_m s_m^2`.
    - `epistemic_variance`: `mean_m (mu_m - mean)^2` (heads' disagreement).
    - `variance`: their sum, the mixture's variance.

    Args:
        params: tensor `[batch, M, P * E]` of constrained family parameters.
        family: a `tfp.distributions` class or its name.
        levels: central interval levels; for level 0.95 the outputs hold
            `lower_95` and `upper_95`, the mixture's 2.5 % and 97.5 % quantiles.

    Returns:
        A dict of tensors `[batch, E]` with the keys above, interval bounds,
        and `head_parameters` (`params` as float32).

    Example:

    >>> params = np.array([[[0.0, 1.0], [2.0, 1.0]]])  # two Normal heads
    >>> u = regression(params, "Normal")
    >>> float(u["epistemic_variance"][0, 0]), float(u["variance"][0, 0])
    (1.0, 2.0)
    """
    family = distributions.resolve(family)
    params = tf.cast(params, tf.float32)
    components = family(**distributions.split(params, family))
    means, variances = components.mean(), components.variance()
    mean = tf.reduce_mean(means, axis=1)
    aleatoric = tf.reduce_mean(variances, axis=1)
    epistemic = tf.reduce_mean(tf.square(means - mean[:, None]), axis=1)
    outputs = {
        "mean": mean,
        "variance": aleatoric + epistemic,
        "aleatoric_variance": aleatoric,
        "epistemic_variance": epistemic,
        "head_parameters": params,
    }
    for level in levels:
        lower, upper = interval_keys(level)
        outputs[lower] = _mixture_quantile(components, (1 - level) / 2)
        outputs[upper] = _mixture_quantile(components, (1 + level) / 2)
    return outputs
