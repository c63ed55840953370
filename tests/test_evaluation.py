import numpy as np
import pytest

from keras_hydra.evaluation import ood_auroc


def test_ood_auroc_against_pair_counting():
    rng = np.random.default_rng(0)
    in_scores, out_scores = rng.normal(size=200), rng.normal(1.0, size=150)
    pairs = (out_scores[:, None] > in_scores[None, :]).mean()
    result = ood_auroc(in_scores, out_scores)
    np.testing.assert_allclose(result["auroc"], pairs, rtol=1e-9)
    threshold = np.quantile(out_scores, 0.05)
    np.testing.assert_allclose(
        result["fpr_at_95_tpr"], (in_scores >= threshold).mean(), atol=1 / 200
    )
    assert 0.5 < result["aupr"] <= 1.0


def test_ood_auroc_hand_case_and_errors():
    result = ood_auroc([0.1, 0.2, 0.3], [0.25, 0.9])
    assert result["auroc"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="non-empty"):
        ood_auroc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        ood_auroc([np.nan], [1.0])


def test_crps_normal_mixture_against_numerical_integration():
    from scipy import integrate, stats

    from keras_hydra.evaluation import crps_normal_mixture

    rng = np.random.default_rng(1)
    loc, scale = rng.normal(size=(3, 4)), rng.uniform(0.3, 1.5, size=(3, 4))
    y = rng.normal(size=3)
    expected = []
    for i in range(3):

        def integrand(x, i=i):
            cdf = stats.norm.cdf(x, loc[i], scale[i]).mean()
            return (cdf - (x >= y[i])) ** 2

        expected.append(
            integrate.quad(integrand, -20, y[i])[0]
            + integrate.quad(integrand, y[i], 20)[0]
        )
    np.testing.assert_allclose(crps_normal_mixture(y, loc, scale), expected, rtol=1e-6)
