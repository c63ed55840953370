import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_hydra as kh

from conftest import mlp_body

QUICK = {"phase1_epochs": 1, "phase2_epochs": 2, "batch_size": 64}


def quick(name, **changes):
    return kh.HydraRecipe.get(name).replace(**{**QUICK, **changes})


def weights_of(model):
    return [np.asarray(w) for w in model.get_weights()]


@pytest.fixture(scope="module")
def members(distilled):
    return distilled.members


@pytest.fixture(scope="module")
def image_ood(digits, members):
    """`image_ood` (quick epochs) on 8x8 digits through `distill`."""
    recipe = quick("image_ood")
    keras.utils.set_random_seed(0)
    hydra = kh.distill(
        members,
        mlp_body(),
        kh.heads.Categorical(6),
        digits["x_train"],
        recipe,
        image_shape=(8, 8),
        seed=3,
        verbose=0,
    )
    transfer = kh.recipes.transfer_set(
        members, digits["x_train"], recipe, image_shape=(8, 8), seed=3
    )
    return hydra, recipe, transfer


def test_presets_round_trip_through_config():
    for name, recipe in kh.recipes.PRESETS.items():
        config = json.loads(json.dumps(recipe.get_config()))
        restored = kh.HydraRecipe.from_config(config)
        assert restored.get_config() == recipe.get_config(), name
        assert [type(t) for t in restored.transforms] == [
            type(t) for t in recipe.transforms
        ]
    assert kh.HydraRecipe.get("paper") == kh.HydraRecipe()
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(kh.HydraRecipe.get("image_ood"))
    )
    assert restored.get_config() == kh.HydraRecipe.get("image_ood").get_config()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"phase1_epochs": 0}, r"phase1_epochs must be >= 1\. Received: 0"),
        ({"phase2_epochs": 2.5}, r"phase2_epochs must be an int\. Received: 2\.5"),
        ({"batch_size": True}, r"batch_size must be an int"),
        ({"learning_rate": float("nan")}, r"learning_rate must be > 0"),
        ({"temperature": 0.0}, r"temperature must be > 0"),
        ({"logit_weight": -1.0}, r"logit_weight must be >= 0"),
        ({"expansion_noise": float("nan")}, r"expansion_noise must be >= 0"),
        ({"schedule": "linear"}, r"schedule must be 'constant' or 'cosine'"),
        ({"clipnorm": 0.0}, r"clipnorm must be None or > 0"),
        ({"transforms": (3,)}, r"transforms must hold callables"),
    ],
)
def test_bad_recipe_fields_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        kh.HydraRecipe(**changes)


def test_unknown_preset_names_the_presets():
    with pytest.raises(ValueError, match=r"Unknown recipe 'fast'; the presets are"):
        kh.HydraRecipe.get("fast")


def test_kd_recipe_is_one_head_for_the_same_epochs():
    kd = kh.HydraRecipe.get("image_ood").kd()
    assert (kd.phase1_epochs, kd.phase2_epochs) == (22, 0)
    assert kd.head_hidden_units == () and not kd.calibrate_spread
    assert kd.transforms == kh.HydraRecipe.get("image_ood").transforms


def test_paper_recipe_equals_the_manual_two_phases(digits, members, distilled):
    """`distill` with `paper` is phase 1, `add_heads`, phase 2, written out."""
    x = digits["x_train"]
    recipe = kh.HydraRecipe(phase1_epochs=2, phase2_epochs=2, batch_size=len(x))
    keras.utils.set_random_seed(5)
    hydra = kh.distill(
        members, mlp_body(), kh.heads.Categorical(6), x, recipe, verbose=0
    )
    keras.utils.set_random_seed(5)
    manual = kh.HydraModel(mlp_body(), kh.heads.Categorical(6))
    manual.compile(keras.optimizers.Adam(1e-3), kh.losses.HydraKL(temperature=2.0))
    # One batch per epoch, so shuffling cannot make the runs differ.
    manual.fit(x, distilled.targets, epochs=2, batch_size=len(x), verbose=0)
    manual.add_heads(len(members))
    manual.fit(x, distilled.targets, epochs=2, batch_size=len(x), verbose=0)
    assert hydra.num_heads == len(members)
    for a, b in zip(weights_of(hydra), weights_of(manual), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_image_ood_runs_every_step(digits, members, image_ood):
    hydra, recipe, (inputs, targets) = image_ood
    x = digits["x_train"]
    # The transfer set: the images, then one CutMix and one affine copy.
    assert inputs.shape == (3 * len(x), 64)
    np.testing.assert_array_equal(inputs[: len(x)], x)
    np.testing.assert_array_equal(
        inputs[len(x) : 2 * len(x)],
        kh.transfer.cutmix(x, image_shape=(8, 8), seed=3),
    )
    np.testing.assert_array_equal(
        inputs[2 * len(x) :],
        kh.transfer.affine(x, image_shape=(8, 8), zoom=(0.0, 0.6), seed=103),
    )
    np.testing.assert_allclose(
        targets, kh.teacher.predict(members, inputs), rtol=1e-5, atol=1e-5
    )
    # Fresh heads with the recipe's hidden layer; a fresh optimizer for
    # phase 2 took phase 2's steps only.
    assert hydra.num_heads == len(members)
    assert hydra.head.hidden_units == (128,)
    steps = -(-len(inputs) // recipe.batch_size)
    assert int(hydra.optimizer.iterations) == recipe.phase2_epochs * steps
    assert hydra.loss.logit_weight == 0.05
    # Calibrated: the Hydra's mean MI on the transfer set is the teacher's.
    teacher_mi = kh.uncertainty.categorical(targets)["epistemic_uncertainty"]
    hydra_mi = hydra.predict_uncertainty(inputs)["epistemic_uncertainty"]
    np.testing.assert_allclose(hydra_mi.mean(), np.mean(teacher_mi), rtol=1e-3)
    assert float(hydra.spread) != 1.0


def test_distilled_model_saves_and_loads(tmp_path, digits, image_ood):
    hydra = image_ood[0]
    path = tmp_path / "hydra.keras"
    hydra.save(path)
    loaded = keras.saving.load_model(path)
    x = digits["x_test"]
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), hydra.predict(x, verbose=0), atol=1e-6
    )


def test_dataset_input_equals_arrays(digits, members):
    x = digits["x_train"][:200]
    recipe = quick("image_ood", calibrate_spread=False, phase2_epochs=1)
    runs = []
    for inputs in (x, tf.data.Dataset.from_tensor_slices(x).batch(37)):
        keras.utils.set_random_seed(2)
        hydra = kh.distill(
            members,
            mlp_body(),
            kh.heads.Categorical(6),
            inputs,
            recipe,
            image_shape=(8, 8),
            seed=1,
            verbose=0,
        )
        runs.append(weights_of(hydra))
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_tabular_regression_recipe_on_a_table():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 3)).astype("float32")
    y = (x @ [1.0, -1.0, 0.5])[:, None].astype("float32")
    teacher = kh.HydraModel(
        keras.layers.Identity(),
        kh.heads.Distribution("Normal", hidden_units=(16,)),
        num_heads=3,
    )
    teacher.compile("adam", kh.losses.DistributionNLL("Normal", mixture=False))
    teacher.fit(x, y, epochs=20, batch_size=32, verbose=0)
    recipe = quick("tabular_regression", batch_size=32)
    hydra = kh.distill(
        teacher,
        mlp_body(),
        kh.heads.Distribution("Normal"),
        x,
        recipe,
        seed=0,
        verbose=0,
    )
    assert isinstance(hydra.loss, kh.losses.DistributionKL)
    assert hydra.num_heads == 3
    # Four noisy copies: 600 inputs, 19 steps an epoch, one cosine over both
    # phases' 57 steps, ending at a learning rate of 0.
    steps = 3 * -(-600 // 32)
    assert int(hydra.optimizer.iterations) == steps
    assert float(hydra.optimizer.learning_rate) == pytest.approx(0.0, abs=1e-9)
    inputs, _ = kh.recipes.transfer_set(teacher, x, recipe, seed=0)
    np.testing.assert_allclose(
        inputs[120:240] - x, kh.transfer.GaussianNoise(0.1)(x, 0) - x, atol=1e-6
    )
    variance = hydra.predict_uncertainty(x)["epistemic_variance"]
    assert np.all(variance > 0)


def test_custom_transforms_and_keras_layers(members, digits):
    x = digits["x_train"][:50]
    flip = keras.layers.RandomFlip("horizontal", seed=0)
    recipe = kh.HydraRecipe(transforms=(lambda images, seed: 1.0 - images, flip))
    inputs, targets = kh.recipes.transfer_set(members, x, recipe, image_shape=(8, 8))
    np.testing.assert_allclose(inputs[50:100], 1.0 - x)
    flipped = inputs[100:].reshape(50, 8, 8)
    images = x.reshape(50, 8, 8)
    # Each image is left as it was or mirrored, and some are mirrored.
    mirrored = np.all(flipped == images[:, :, ::-1], axis=(1, 2))
    kept = np.all(flipped == images, axis=(1, 2))
    assert np.all(mirrored | kept) and mirrored.any()
    np.testing.assert_allclose(
        targets[50:], kh.teacher.predict(members, inputs[50:]), atol=1e-5
    )


def test_transform_of_the_wrong_shape_is_refused(members, digits):
    recipe = kh.HydraRecipe(transforms=(lambda images, seed: images[:, :4],))
    with pytest.raises(ValueError, match=r"returned shape \(10, 4\)"):
        kh.recipes.transfer_set(members, digits["x_train"][:10], recipe)


def test_empty_inputs_are_refused(members):
    with pytest.raises(ValueError, match=r"`x` holds no examples \(shape \(0, 64\)\)"):
        kh.distill(
            members,
            mlp_body(),
            kh.heads.Categorical(6),
            np.zeros((0, 64), "float32"),
            verbose=0,
        )
    empty = tf.data.Dataset.from_tensor_slices(np.zeros((0, 64), "float32")).batch(4)
    with pytest.raises(ValueError, match="The dataset `x` yields no batches"):
        kh.distill(members, mlp_body(), kh.heads.Categorical(6), empty, verbose=0)


def test_image_ood_on_a_cnn_body_with_conv_heads(digits, members):
    """The recipe's fresh heads keep `conv_filters` and get its hidden layer."""
    x = digits["x_train"][:200]
    body = keras.Sequential(
        [keras.layers.Reshape((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu")]
    )
    hydra = kh.distill(
        members,
        body,
        kh.heads.Categorical(6, conv_filters=4),
        x,
        quick("image_ood", phase2_epochs=1),
        image_shape=(8, 8),
        seed=0,
        verbose=0,
    )
    assert (hydra.head.conv_filters, hydra.head.hidden_units) == (4, (128,))
    assert hydra.heads.conv_kernel.shape == (len(members), 3, 3, 8, 4)
    outputs = hydra.predict(digits["x_test"], verbose=0)
    assert np.isfinite(outputs).all() and np.ptp(outputs, axis=1).max() > 1e-3
