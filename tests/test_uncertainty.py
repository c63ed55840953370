import numpy as np
from scipy.special import softmax
from scipy.stats import entropy

from keras_hydra import uncertainty


def test_categorical_matches_scipy():
    logits = np.random.default_rng(0).normal(size=(20, 5, 4)) * 3
    u = {k: np.asarray(v) for k, v in uncertainty.categorical(logits).items()}
    probs = softmax(logits, axis=-1)
    mean = probs.mean(axis=1)
    total = entropy(mean, axis=-1)
    aleatoric = entropy(probs, axis=-1).mean(axis=1)
    np.testing.assert_allclose(u["probabilities"], mean, rtol=1e-5)
    np.testing.assert_allclose(u["head_probabilities"], probs, rtol=1e-5)
    np.testing.assert_array_equal(u["predicted_class"], mean.argmax(-1))
    assert u["predicted_class"].dtype == np.int64
    np.testing.assert_allclose(u["total_uncertainty"], total, rtol=1e-5)
    np.testing.assert_allclose(u["aleatoric_uncertainty"], aleatoric, rtol=1e-5)
    np.testing.assert_allclose(
        u["epistemic_uncertainty"], total - aleatoric, rtol=1e-4, atol=1e-6
    )
    assert set(u) == {
        "probabilities",
        "head_probabilities",
        "predicted_class",
        "total_uncertainty",
        "aleatoric_uncertainty",
        "epistemic_uncertainty",
    }


def test_probabilities_input_and_agreeing_heads():
    logits = np.random.default_rng(1).normal(size=(6, 1, 3))
    agreeing = np.repeat(logits, 4, axis=1)
    u = uncertainty.categorical(softmax(agreeing, axis=-1), from_logits=False)
    np.testing.assert_allclose(u["epistemic_uncertainty"], 0.0, atol=1e-6)
    np.testing.assert_allclose(
        u["total_uncertainty"], entropy(softmax(logits[:, 0], -1), axis=-1), rtol=1e-5
    )
