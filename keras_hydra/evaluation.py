"""Out-of-distribution detection scores."""

from __future__ import annotations

import numpy as np


def ood_auroc(in_scores, out_scores) -> dict:
    """How well an uncertainty score separates in- from out-of-distribution.

    Out-of-distribution inputs are the positive class: a good score is higher
    on them. Any per-example score works, e.g. `epistemic_uncertainty` or
    `total_uncertainty` from `keras_hydra.uncertainty`.

    Args:
        in_scores: array `[N_in]`, scores on in-distribution inputs.
        out_scores: array `[N_out]`, scores on out-of-distribution inputs.

    Returns:
        A dict with `auroc`, `aupr` (average precision, OOD positive) and
        `fpr_at_95_tpr` (share of in-distribution inputs flagged when 95 % of
        the OOD inputs are).

    Example:

    >>> ood_auroc([0.1, 0.2, 0.3], [0.25, 0.9])["auroc"]
    0.8333...
    """
    from sklearn import metrics  # here, so `import keras_hydra` stays light

    in_scores = np.asarray(in_scores, dtype="float64").ravel()
    out_scores = np.asarray(out_scores, dtype="float64").ravel()
    if in_scores.size == 0 or out_scores.size == 0:
        raise ValueError(
            "Both score arrays must be non-empty. Received sizes "
            f"{in_scores.size} (in) and {out_scores.size} (out)."
        )
    scores = np.concatenate([in_scores, out_scores])
    if not np.all(np.isfinite(scores)):
        raise ValueError("Scores contain NaN or Inf.")
    labels = np.concatenate([np.zeros(in_scores.size), np.ones(out_scores.size)])
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    return {
        "auroc": float(metrics.roc_auc_score(labels, scores)),
        "aupr": float(metrics.average_precision_score(labels, scores)),
        "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
    }


def _expected_abs(mu, var):
    """E|X| for X ~ N(mu, var)."""
    from scipy import stats

    sigma = np.sqrt(var)
    z = mu / sigma
    return 2 * sigma * stats.norm.pdf(z) + mu * (2 * stats.norm.cdf(z) - 1)


def crps_normal_mixture(y, loc, scale) -> np.ndarray:
    """CRPS of uniform mixtures of Normals, in closed form (Grimit et al., 2006).

    `CRPS = mean_i E|X_i - y| - 1/2 mean_ij E|X_i - X_j|`, lower is better,
    in the units of `y`.

    Args:
        y: array `[N]`, observations.
        loc: array `[N, M]`, component means.
        scale: array `[N, M]`, component standard deviations.

    Returns:
        Array `[N]` of CRPS values.

    Example:

    >>> float(crps_normal_mixture([0.0], [[0.0]], [[1.0]])[0])  # (sqrt2-1)/sqrtpi
    0.2336...
    """
    y = np.asarray(y, dtype="float64")[:, None]
    loc, scale = np.asarray(loc, "float64"), np.asarray(scale, "float64")
    to_y = _expected_abs(y - loc, scale**2).mean(axis=1)
    pairs = _expected_abs(
        loc[:, :, None] - loc[:, None, :],
        scale[:, :, None] ** 2 + scale[:, None, :] ** 2,
    ).mean(axis=(1, 2))
    return to_y - 0.5 * pairs
