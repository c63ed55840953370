"""Uncertainty decompositions of a Hydra's heads or of a raw ensemble."""

from __future__ import annotations

from keras import ops

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
        (int64), and the three uncertainties `[batch]`.

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
        "predicted_class": ops.cast(ops.argmax(probs, axis=-1), "int64"),
        "total_uncertainty": total,
        "aleatoric_uncertainty": aleatoric,
        # Clipped at zero: MI is non-negative, float error is not.
        "epistemic_uncertainty": ops.maximum(total - aleatoric, 0.0),
    }
