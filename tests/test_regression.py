import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats
from sklearn.datasets import load_diabetes

import keras_hydra as kh
from keras_hydra import distributions

from conftest import UCI_DIR, needs_uci

tfd = distributions.tfd


def normal_kl(m1, s1, m2, s2):
    return np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def laplace_kl(m1, b1, m2, b2):
    d = np.abs(m1 - m2)
    return np.log(b2 / b1) + d / b2 + (b1 / b2) * np.exp(-d / b1) - 1


def params(rng, shape, positive_first=False):
    """Random (loc, scale) parameters `[..., 2]`."""
    return np.stack(
        [rng.normal(size=shape), rng.uniform(0.3, 2.0, size=shape)], axis=-1
    ).astype("float32")


@pytest.mark.parametrize(
    "family, closed_form", [("Normal", normal_kl), ("Laplace", laplace_kl)]
)
def test_kl_matches_closed_form(family, closed_form):
    rng = np.random.default_rng(0)
    members, heads = params(rng, (6, 4)), params(rng, (6, 4))
    loss = kh.losses.DistributionKL(family, reduction=None)
    expected = closed_form(
        members[..., 0], members[..., 1], heads[..., 0], heads[..., 1]
    ).mean(axis=1)
    np.testing.assert_allclose(loss(members, heads), expected, rtol=1e-5, atol=1e-6)


def test_kl_without_closed_form_matches_large_sample_estimate():
    rng = np.random.default_rng(1)
    df = rng.uniform(2.5, 6.0, size=(3, 2, 1)).astype("float32")
    members = np.concatenate([df, params(rng, (3, 2, 1)).reshape(3, 2, 2)], axis=-1)
    heads = np.concatenate([df + 1.0, params(rng, (3, 2, 1)).reshape(3, 2, 2)], -1)
    tf.random.set_seed(0)
    loss = kh.losses.DistributionKL("StudentT", num_samples=20000, reduction=None)
    value = np.asarray(loss(members, heads))

    def logpdf(p, x):
        return stats.t.logpdf(x, p[..., 0], loc=p[..., 1], scale=p[..., 2])

    samples = stats.t.rvs(
        members[..., 0],
        loc=members[..., 1],
        scale=members[..., 2],
        size=(200000, 3, 2),
        random_state=2,
    )
    reference = (logpdf(members, samples) - logpdf(heads, samples)).mean(0).mean(1)
    np.testing.assert_allclose(value, reference, atol=0.03)


def test_single_head_moment_matches_the_ensemble_mixture():
    rng = np.random.default_rng(3)
    members = params(rng, (5, 4))
    loc, scale = members[..., 0], members[..., 1]
    mean = loc.mean(1)
    var = (scale**2 + loc**2).mean(1) - mean**2
    loss = kh.losses.DistributionKL("Normal", reduction=None)
    heads = [params(rng, (5, 1)) for _ in range(2)]
    values = [np.asarray(loss(members, h)) for h in heads]
    for h, value in zip(heads, values, strict=True):
        np.testing.assert_allclose(
            value, normal_kl(mean, np.sqrt(var), h[:, 0, 0], h[:, 0, 1]), rtol=1e-5
        )
    # Against KL(mixture || head) by Monte-Carlo: equal up to a constant.
    draws = rng.normal(loc, scale, size=(400000, 5, 4))
    comp = rng.integers(0, 4, size=(400000, 5))
    x = np.take_along_axis(draws, comp[..., None], axis=2)[..., 0]
    log_mix = np.log(stats.norm.pdf(x[..., None], loc, scale).mean(-1))

    def exact(h):
        return (log_mix - stats.norm.logpdf(x, h[:, 0, 0], h[:, 0, 1])).mean(0)

    np.testing.assert_allclose(
        values[0] - values[1], exact(heads[0]) - exact(heads[1]), rtol=0.02, atol=0.02
    )


def test_grouped_heads_for_other_families_use_the_group_mixture():
    rng = np.random.default_rng(4)
    members, heads = params(rng, (4, 4)), params(rng, (4, 2))
    tf.random.set_seed(1)
    loss = kh.losses.DistributionKL("Laplace", num_samples=20000, reduction=None)
    value = np.asarray(loss(members, heads))
    loc, b = members[..., 0].reshape(4, 2, 2), members[..., 1].reshape(4, 2, 2)
    n = 200000
    comp = rng.integers(0, 2, size=(n, 4, 2, 1))
    x = np.take_along_axis(rng.laplace(loc, b, size=(n, 4, 2, 2)), comp, -1)[..., 0]
    log_mix = np.log(stats.laplace.pdf(x[..., None], loc, b).mean(-1))
    log_q = stats.laplace.logpdf(x, heads[..., 0], heads[..., 1])
    np.testing.assert_allclose(value, (log_mix - log_q).mean(0).mean(1), atol=0.03)


def test_nll_of_members_and_of_a_mixture():
    rng = np.random.default_rng(5)
    y = rng.normal(size=(6, 1)).astype("float32")
    member = params(rng, (6,))
    nll = kh.losses.DistributionNLL("Normal", reduction=None)
    np.testing.assert_allclose(
        nll(y, member),
        -stats.norm.logpdf(y[:, 0], member[:, 0], member[:, 1]),
        rtol=1e-5,
    )
    heads = params(rng, (6, 3))
    mix = stats.norm.pdf(y, heads[..., 0], heads[..., 1]).mean(1)
    np.testing.assert_allclose(nll(y, heads), -np.log(mix), rtol=1e-5)
    independent = kh.losses.DistributionNLL("Normal", mixture=False, reduction=None)
    np.testing.assert_allclose(
        independent(y, heads),
        -stats.norm.logpdf(y, heads[..., 0], heads[..., 1]).mean(1),
        rtol=1e-5,
    )


@pytest.mark.parametrize("family", ["Normal", "Laplace", "StudentT", "LogNormal"])
def test_mixture_moments_and_intervals(family):
    rng = np.random.default_rng(6)
    head = kh.heads.Distribution(family, levels=(0.9,))
    raw = rng.normal(size=(7, 3, head.units)).astype("float32")
    outputs = np.asarray(kh.layers.DistributionParameters(family)(raw))
    u = {k: np.asarray(v) for k, v in head.uncertainty(outputs).items()}
    components = head.family(**distributions.split(outputs, head.family))
    means, variances = np.asarray(components.mean()), np.asarray(components.variance())
    np.testing.assert_allclose(u["mean"], means.mean(1), rtol=1e-5)
    np.testing.assert_allclose(u["aleatoric_variance"], variances.mean(1), rtol=1e-5)
    np.testing.assert_allclose(u["epistemic_variance"], means.var(1), rtol=1e-4)
    np.testing.assert_allclose(
        u["variance"], np.var(means, 1) + variances.mean(1), rtol=1e-4
    )
    mixture = head.distribution(outputs)
    np.testing.assert_allclose(np.asarray(mixture.mean()), u["mean"], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mixture.variance()), u["variance"], rtol=1e-4)
    cdf = np.asarray(components.cdf(u["lower_90"][:, None])).mean(1)
    np.testing.assert_allclose(cdf, 0.05, atol=1e-4)
    cdf = np.asarray(components.cdf(u["upper_90"][:, None])).mean(1)
    np.testing.assert_allclose(cdf, 0.95, atol=1e-4)


def test_heads_constrain_extreme_inputs():
    layer = kh.layers.DistributionParameters("StudentT", min_scale=1e-3)
    raw = np.array([[-1e4, 1e4, -1e4], [1e4, -1e4, 1e4]], "float32")
    df, loc, scale = np.split(np.asarray(layer(raw)), 3, axis=-1)
    assert np.all(np.isfinite(df)) and np.all(df > 2.0)
    assert np.all(scale >= 1e-3) and np.all(np.isfinite(scale))
    np.testing.assert_array_equal(loc[:, 0], raw[:, 1])
    heads = kh.heads.Distribution("Normal").layer(num_heads=3)
    out = np.asarray(heads(np.full((2, 4), 1e4, "float32")))
    assert out.shape == (2, 3, 2) and np.all(out[..., 1] >= 1e-3)


def test_family_validation():
    for family in ["Normal", "Laplace", "StudentT", "LogNormal", tfd.Normal]:
        kh.heads.Distribution(family)
    with pytest.raises(ValueError, match="Unknown distribution family 'Gaussian'"):
        kh.heads.Distribution("Gaussian")
    with pytest.raises(ValueError, match="MultivariateNormalDiag is not supported"):
        kh.heads.Distribution("MultivariateNormalDiag")
    with pytest.raises(ValueError, match="must be a tfp.distributions class"):
        kh.heads.Distribution(int)


def regression_hydra(num_heads=1):
    model = kh.HydraModel(
        keras.Sequential([keras.layers.Dense(8, activation="relu")]),
        kh.heads.Distribution("Normal"),
        num_heads,
    )
    model.compile(optimizer="adam", loss=kh.losses.DistributionKL("Normal"))
    return model


def test_bad_regression_targets():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(32, 3)).astype("float32")
    good = params(rng, (32, 4))
    model = regression_hydra(num_heads=2)
    cases = {
        "scale": (
            good * np.array([1, -1], "float32"),
            r"scale > 0, but \(example, member\) \(0, 0\) has scale=-",
        ),
        "count": (
            np.concatenate([good, good], -1),
            "have 4 parameters per member .* needs 2 \\(loc, scale\\)",
        ),
        "nan": (
            np.where(np.arange(good.size).reshape(good.shape) == 5, np.nan, good),
            "NaN or Inf",
        ),
        "members": (params(rng, (32, 3)), "Cannot assign 3 teacher members to 2 heads"),
    }
    for targets, message in cases.values():
        with pytest.raises(ValueError, match=message):
            model.fit(x, targets, epochs=1, verbose=0)
    assert model.optimizer.iterations.numpy() == 0


@pytest.fixture(scope="module")
def diabetes_distillation():
    keras.utils.set_random_seed(0)
    x, y = load_diabetes(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype("float32")
    y = ((y - y.mean()) / y.std()).astype("float32")
    members = []
    for _ in range(4):
        member = keras.Sequential(
            [
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(2),
                kh.layers.DistributionParameters("Normal"),
            ]
        )
        member.compile(optimizer="adam", loss=kh.losses.DistributionNLL("Normal"))
        member.fit(x, y, epochs=40, batch_size=32, verbose=0)
        members.append(member)
    targets = kh.teacher.predict(members, x)
    hydra = kh.HydraModel(
        keras.Sequential([keras.layers.Dense(32, activation="relu")]),
        kh.heads.Distribution("Normal"),
    )
    hydra.compile(optimizer="adam", loss=kh.losses.DistributionKL("Normal"))
    hydra.fit(x, targets, epochs=30, batch_size=32, verbose=0)
    hydra.add_heads(4)
    hydra.fit(x, targets, epochs=80, batch_size=32, verbose=0)
    return hydra, x, targets


def test_hydra_epistemic_variance_tracks_the_ensemble(diabetes_distillation):
    hydra, x, targets = diabetes_distillation
    u = hydra.predict_uncertainty(x)
    ensemble = kh.uncertainty.regression(targets, "Normal")
    rho = stats.spearmanr(
        u["epistemic_variance"][:, 0], np.asarray(ensemble["epistemic_variance"])[:, 0]
    ).statistic
    assert rho > 0.2, rho
    np.testing.assert_allclose(
        u["mean"], np.asarray(ensemble["mean"]), atol=0.5 * float(np.std(u["mean"]))
    )


def test_calibrate_spread_scales_the_epistemic_variance(diabetes_distillation):
    hydra, x, targets = diabetes_distillation
    raw = hydra.predict(x, verbose=0)
    try:
        factor = hydra.calibrate_spread(x, targets)
        # Normal heads: the spread scales the loc deviations, so the epistemic
        # variance by factor**2, which then equals the members'.
        expected = np.sqrt(
            targets[..., 0].var(axis=1).mean() / raw[..., 0].var(1).mean()
        )
        assert factor == pytest.approx(expected, rel=1e-4)
        outputs = hydra.predict(x, verbose=0)
        loc = raw[..., 0].mean(axis=1, keepdims=True)
        np.testing.assert_allclose(
            outputs[..., 0], loc + factor * (raw[..., 0] - loc), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_array_equal(outputs[..., 1], raw[..., 1])  # scales kept
    finally:
        hydra.spread.assign(1.0)


def test_regression_round_trip(diabetes_distillation, tmp_path):
    hydra, x, _ = diabetes_distillation
    hydra.save(tmp_path / "reg.keras")
    restored = keras.saving.load_model(tmp_path / "reg.keras")
    assert restored.head.family is tfd.Normal and restored.num_heads == 4
    np.testing.assert_array_equal(
        restored.predict(x, verbose=0), hydra.predict(x, verbose=0)
    )
    dist = restored.predict_distribution(x[:5])
    assert dist.batch_shape == (5,) and dist.event_shape == (1,)


def write_uci(root, data, train, test, features="0\n1", target="2", splits="1"):
    os.makedirs(root, exist_ok=True)
    files = {
        "data.txt": "\n".join(" ".join(repr(float(v)) for v in row) for row in data),
        "index_features.txt": features,
        "index_target.txt": target,
        "n_splits.txt": splits,
        "index_train_0.txt": "\n".join(map(str, train)),
        "index_test_0.txt": "\n".join(map(str, test)),
    }
    for name, text in files.items():
        with open(os.path.join(root, name), "w") as f:
            f.write(text)


def test_uci_loader_standardises_with_training_statistics(tmp_path):
    data = np.random.default_rng(8).normal(5.0, 3.0, size=(10, 3))
    write_uci(tmp_path, data, train=range(7), test=range(7, 10))
    split = kh.data.uci.load(tmp_path, 0)
    x_train = data[:7, :2]
    np.testing.assert_allclose(split.x_mean, x_train.mean(0))
    np.testing.assert_allclose(
        split.x_test, (data[7:, :2] - x_train.mean(0)) / x_train.std(0), rtol=1e-5
    )
    np.testing.assert_allclose(
        split.to_original(split.y_test)[:, 0], data[7:, 2], rtol=1e-5
    )
    np.testing.assert_allclose(
        split.variance_to_original(1.0), data[:7, 2].std() ** 2, rtol=1e-6
    )
    assert split.y_train.shape == (7, 1) and split.x_train.dtype == np.float32


def test_uci_loader_errors(tmp_path):
    data = np.arange(30.0).reshape(10, 3)
    write_uci(tmp_path / "a", data, train=[0, 1, 12], test=[3])
    with pytest.raises(
        ValueError, match="index_train_0.txt holds index 12, outside the 10 rows"
    ):
        kh.data.uci.load(tmp_path / "a", 0)
    write_uci(tmp_path / "b", data, train=[0], test=[1], features="0\n5")
    with pytest.raises(ValueError, match="index 5, outside the 3 columns"):
        kh.data.uci.load(tmp_path / "b", 0)
    os.remove(tmp_path / "b" / "n_splits.txt")
    with pytest.raises(FileNotFoundError, match="missing n_splits.txt"):
        kh.data.uci.load(tmp_path / "b", 0)
    with pytest.raises(ValueError, match="split=1 is out of range"):
        write_uci(tmp_path / "c", data, train=[0], test=[1])
        kh.data.uci.load(tmp_path / "c", 1)


@needs_uci
def test_uci_loader_reads_every_shared_set():
    for name in sorted(os.listdir(UCI_DIR)):
        root = os.path.join(UCI_DIR, name)
        if not os.path.isdir(root):
            continue
        split = kh.data.uci.load(root, kh.data.uci.num_splits(root) - 1)
        assert split.x_train.shape[1] == split.x_test.shape[1]
        np.testing.assert_allclose(split.y_train.mean(), 0.0, atol=1e-4)
