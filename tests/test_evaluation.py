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
