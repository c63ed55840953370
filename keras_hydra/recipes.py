"""Distillation recipes and `distill`, the whole Hydra path in one call."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_hydra import heads as heads_lib
from keras_hydra import losses, transfer
from keras_hydra.model import HydraModel
from keras_hydra.teacher import Ensemble
from keras_hydra.teacher import predict as predict_targets

Transform = Callable[[np.ndarray, int], np.ndarray] | keras.layers.Layer


@keras.saving.register_keras_serializable(package="keras_hydra")
@dataclasses.dataclass(frozen=True)
class HydraRecipe:
    """How `distill` trains a Hydra: every setting absolute, none implied.

    Epochs are passes over the transfer set: the training inputs plus one
    transformed copy of them per entry of `transforms`. With
    `phase2_epochs=0` there is no expansion, and the result is a one-head
    Hinton KD student.

    Args:
        phase1_epochs: int >= 1, epochs of phase 1 (one head, the ensemble's
            mean).
        phase2_epochs: int >= 0, epochs of phase 2 (after `add_heads(M)`,
            head `m` matches member `m`).
        batch_size: int, examples per optimizer step.
        learning_rate: float, Adam's learning rate.
        schedule: `"constant"`, or `"cosine"`: the learning rate decays to 0
            along a cosine over all of the optimizer's steps (both phases,
            or each phase when `reset_optimizer`).
        temperature: float, `HydraKL`'s temperature (categorical heads).
        logit_weight: float >= 0, `HydraKL`'s logit-matching weight.
        fresh_heads: bool, whether `add_heads` draws the M heads fresh
            (`copy_head=False`) instead of copying the phase-1 head.
        reset_optimizer: bool, whether phase 2 starts with a fresh optimizer
            instead of the state `add_heads` carries over.
        expansion_noise: float >= 0, standard deviation of the noise
            `add_heads` adds to copied heads.
        head_hidden_units: `None` to keep the head's hidden layers, else
            the hidden layer sizes every head gets.
        transforms: transfer transformations, each making one extra copy of
            the training inputs whose teacher targets are cached with the
            rest: a callable `transform(x, seed) -> array shaped like x`
            (`keras_hydra.transfer.CutMix`, `Affine`, `Mixup`,
            `GaussianNoise`, or your own), or a random Keras preprocessing
            layer, called on batches with `training=True`.
        calibrate_spread: bool, whether the trained heads' spread is fitted
            to the teacher's mean epistemic uncertainty on the transfer set
            (`HydraModel.calibrate_spread`).
        clipnorm: optional float, Adam's `global_clipnorm`.
        steps_per_execution: int, train steps per compiled call (a speed
            setting: large values help small models).

    Example:

    >>> import keras_hydra as kh
    >>> recipe = kh.HydraRecipe.get("image_ood")
    >>> recipe.phase2_epochs, recipe.batch_size
    (21, 128)
    >>> kh.HydraRecipe.from_config(recipe.get_config()) == recipe
    True
    """

    phase1_epochs: int = 3
    phase2_epochs: int = 8
    batch_size: int = 256
    learning_rate: float = 1e-3
    schedule: str = "constant"
    temperature: float = 2.0
    logit_weight: float = 0.0
    fresh_heads: bool = False
    reset_optimizer: bool = False
    expansion_noise: float = 0.0
    head_hidden_units: tuple[int, ...] | None = None
    transforms: tuple[Transform, ...] = ()
    calibrate_spread: bool = False
    clipnorm: float | None = None
    steps_per_execution: int = 1

    def __post_init__(self):
        def fail(field, rule):
            raise ValueError(
                f"HydraRecipe.{field} must be {rule}. "
                f"Received: {getattr(self, field)!r}"
            )

        for field, low in [
            ("phase1_epochs", 1),
            ("phase2_epochs", 0),
            ("batch_size", 1),
            ("steps_per_execution", 1),
        ]:
            value = getattr(self, field)
            if not isinstance(value, int | np.integer) or isinstance(value, bool):
                fail(field, "an int")
            if value < low:
                fail(field, f">= {low}")
        for field in ("learning_rate", "temperature"):
            if not float(getattr(self, field)) > 0:
                fail(field, "> 0")
        for field in ("logit_weight", "expansion_noise"):
            if not float(getattr(self, field)) >= 0:
                fail(field, ">= 0")
        if self.clipnorm is not None and not float(self.clipnorm) > 0:
            fail("clipnorm", "None or > 0")
        if self.schedule not in ("constant", "cosine"):
            fail("schedule", "'constant' or 'cosine'")
        for transform in self.transforms:
            if not callable(transform):
                raise ValueError(
                    "HydraRecipe.transforms must hold callables "
                    f"`transform(x, seed)` or Keras layers. Received: {transform!r}"
                )
        object.__setattr__(self, "transforms", tuple(self.transforms))
        if self.head_hidden_units is not None:
            units = tuple(int(u) for u in self.head_hidden_units)
            object.__setattr__(self, "head_hidden_units", units)

    @classmethod
    def get(cls, recipe: str | HydraRecipe) -> HydraRecipe:
        """A preset by name (see `PRESETS`), or `recipe` itself."""
        if isinstance(recipe, HydraRecipe):
            return recipe
        if recipe not in PRESETS:
            raise ValueError(
                f"Unknown recipe {recipe!r}; the presets are {sorted(PRESETS)}, "
                "or pass a HydraRecipe."
            )
        return PRESETS[recipe]

    def replace(self, **changes) -> HydraRecipe:
        """A copy with `changes` applied, as `dataclasses.replace`."""
        return dataclasses.replace(self, **changes)

    def kd(self) -> HydraRecipe:
        """The one-head KD student of this recipe, for the same total epochs.

        Same transfer set, batch size, learning rate and loss; linear head,
        no expansion and no calibration.
        """
        return self.replace(
            phase1_epochs=self.phase1_epochs + self.phase2_epochs,
            phase2_epochs=0,
            head_hidden_units=(),
            calibrate_spread=False,
        )

    def get_config(self) -> dict:
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        config["transforms"] = [
            keras.saving.serialize_keras_object(t) for t in self.transforms
        ]
        if self.head_hidden_units is not None:
            config["head_hidden_units"] = list(self.head_hidden_units)
        return config

    @classmethod
    def from_config(cls, config: dict) -> HydraRecipe:
        config = dict(config)
        config["transforms"] = tuple(
            keras.saving.deserialize_keras_object(t) for t in config["transforms"]
        )
        return cls(**config)


PRESETS: dict[str, HydraRecipe] = {
    # The paper's plain Hydra: training inputs only, linear heads copied
    # from the phase-1 head, the optimizer carried over.
    "paper": HydraRecipe(),
    # Out-of-distribution detection on images (a 784-512 MLP body or a small
    # CNN on Fashion-MNIST): CutMix and affine copies, fresh 128-unit heads
    # and a fresh optimizer for phase 2, long noisy phase 2, logit matching,
    # spread calibrated on the transfer set. Results: RESULTS.md.
    "image_ood": HydraRecipe(
        phase1_epochs=1,
        phase2_epochs=21,
        batch_size=128,
        learning_rate=2e-3,
        logit_weight=0.05,
        fresh_heads=True,
        reset_optimizer=True,
        head_hidden_units=(128,),
        transforms=(transfer.CutMix(), transfer.Affine(zoom=(0.0, 0.6))),
        calibrate_spread=True,
        steps_per_execution=32,
    ),
    # Standardised tables (UCI), `Distribution` heads, with a wide body
    # (2x400 in the benchmark): four Gaussian-perturbed copies of the inputs
    # and long phases under one cosine decay. Batch 32 and 120 epochs per
    # phase are the benchmark's setting for tables of up to 2000 rows.
    "tabular_regression": HydraRecipe(
        phase1_epochs=120,
        phase2_epochs=120,
        batch_size=32,
        learning_rate=3e-3,
        schedule="cosine",
        transforms=(transfer.GaussianNoise(0.1),) * 4,
        steps_per_execution=64,
    ),
}


def transfer_set(
    teacher: Sequence[keras.Model] | Ensemble,
    x,
    recipe: str | HydraRecipe = "paper",
    *,
    targets=None,
    image_shape: Sequence[int] | None = None,
    seed: int | None = None,
    batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """The recipe's transfer inputs and the teacher's targets on them, cached.

    Args:
        teacher: the member models, or an `Ensemble` of them.
        x: training inputs: an array, or a `tf.data.Dataset` of input
            batches (read once, in its order, into memory).
        recipe: a preset name or a `HydraRecipe`.
        targets: optional teacher outputs on `x` `[N, M, ...]`, if already
            computed; the transformed copies' targets are always computed.
        image_shape: `(height, width[, channels])` when `x` holds flat rows
            of images: transformations then see `x` reshaped to images.
        seed: optional int; transformation `j` is seeded `seed + 100 * j`.
        batch_size: int, batch size of the teacher's pass.

    Returns:
        `(inputs, targets)`: `x` followed by one transformed copy per
        transformation, and the teacher's outputs on them.

    Raises:
        ValueError: for an empty `x`, or `targets` that do not cover `x`.
    """
    recipe = HydraRecipe.get(recipe)
    x = _as_array(x)
    if targets is None:
        targets = predict_targets(teacher, x, batch_size=batch_size)
    targets = np.asarray(targets)
    if len(targets) != len(x):
        raise ValueError(
            f"`targets` cover {len(targets)} examples but `x` has {len(x)}."
        )
    if not recipe.transforms:
        return x, targets
    rng_seed = int(np.random.default_rng().integers(2**31)) if seed is None else seed
    images = x if image_shape is None else x.reshape(len(x), *image_shape)
    copies = []
    for j, transform in enumerate(recipe.transforms):
        if isinstance(transform, keras.layers.Layer):
            copy = transfer.augmented(images, transform)
        else:
            copy = np.asarray(transform(images, rng_seed + 100 * j), "float32")
        if copy.shape != images.shape:
            raise ValueError(
                f"Transfer transformation {transform!r} returned shape "
                f"{copy.shape} for inputs of shape {images.shape}."
            )
        copies.append(copy.reshape(x.shape))
    extra = np.concatenate(copies)
    extra_targets = predict_targets(teacher, extra, batch_size=batch_size)
    return np.concatenate([x, extra]), np.concatenate([targets, extra_targets])


def distill(
    teacher: Sequence[keras.Model] | Ensemble,
    body: keras.layers.Layer,
    head,
    x,
    recipe: str | HydraRecipe = "paper",
    *,
    targets=None,
    transfer_data: tuple[np.ndarray, np.ndarray] | None = None,
    image_shape: Sequence[int] | None = None,
    validation_data=None,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    seed: int | None = None,
    verbose="auto",
    name: str = "hydra",
) -> HydraModel:
    """Distils a teacher ensemble into a Hydra, following a recipe.

    Runs the whole path: the transfer set (`x` plus the recipe's
    transformed copies) and the teacher's targets on it, computed once
    (`transfer_set`); phase 1 with one head on the ensemble's mean;
    `add_heads(M)`; phase 2, head `m` on member `m`; and spread calibration
    when the recipe says so. Each phase is one Keras `fit`, with its
    progress output. The loss follows the head: `HydraKL` for `Categorical`
    heads, `DistributionKL` for `Distribution` heads. Called inside a
    `tf.distribute` strategy's `scope()`, the model is built and trained
    under it.

    Args:
        teacher: the M trained member models, or an `Ensemble` of them.
        body: the shared body, mapping inputs to features `[batch, d]` (or
            to a feature map, for heads with `conv_filters`).
        head: the output family, e.g. `keras_hydra.heads.Categorical(10)`.
        x: training inputs (array, or a `tf.data.Dataset` of input batches).
        recipe: a preset name (`"paper"`, `"image_ood"`,
            `"tabular_regression"`) or a `HydraRecipe`.
        targets: optional teacher outputs on `x`, if already computed.
        transfer_data: optional `(inputs, targets)` from `transfer_set` with
            this recipe, to reuse one transfer set for several students
            (`x` and `targets` are then ignored).
        image_shape: `(height, width[, channels])` of flat image rows, for
            the recipe's image transformations.
        validation_data: passed to each phase's `fit`.
        callbacks: passed to each phase's `fit`.
        seed: optional int seed of the transformations.
        verbose: progress output, as for `keras.Model.fit`.
        name: the returned model's name.

    Returns:
        The trained `HydraModel`, compiled, with `M` heads (one when
        `recipe.phase2_epochs == 0`).

    Example:

    >>> import keras_hydra as kh
    >>> x = np.random.rand(64, 8).astype("float32")
    >>> members = [keras.Sequential([keras.layers.Dense(3)]) for _ in range(4)]
    >>> body = keras.Sequential([keras.layers.Dense(16, activation="relu")])
    >>> recipe = kh.HydraRecipe(phase1_epochs=1, phase2_epochs=1)
    >>> hydra = kh.distill(members, body, kh.heads.Categorical(3), x, recipe,
    ...                    verbose=0)
    >>> hydra.num_heads
    4
    """
    recipe = HydraRecipe.get(recipe)
    if recipe.head_hidden_units is not None:
        head = type(head).from_config(
            {**head.get_config(), "hidden_units": list(recipe.head_hidden_units)}
        )
    if transfer_data is None:
        transfer_data = transfer_set(
            teacher, x, recipe, targets=targets, image_shape=image_shape, seed=seed
        )
    inputs, targets = transfer_data
    num_members = targets.shape[1]
    hydra = HydraModel(body, head, name=name)
    steps_per_epoch = -(-len(inputs) // recipe.batch_size)

    def compile_phase(epochs: int) -> None:
        learning_rate = recipe.learning_rate
        if recipe.schedule == "cosine":
            learning_rate = keras.optimizers.schedules.CosineDecay(
                recipe.learning_rate, decay_steps=epochs * steps_per_epoch
            )
        hydra.compile(
            keras.optimizers.Adam(learning_rate, global_clipnorm=recipe.clipnorm),
            _loss(head, recipe),
            steps_per_execution=min(recipe.steps_per_execution, steps_per_epoch),
        )

    def fit(epochs: int, label: str) -> None:
        if verbose:
            print(f"{name} {label}: {epochs} epochs on {len(inputs)} inputs")
        hydra.fit(
            inputs,
            targets,
            epochs=epochs,
            batch_size=recipe.batch_size,
            validation_data=validation_data,
            callbacks=list(callbacks or ()),
            shuffle=True,
            verbose=verbose,
        )

    one_schedule = not recipe.reset_optimizer
    compile_phase(recipe.phase1_epochs + (recipe.phase2_epochs if one_schedule else 0))
    fit(recipe.phase1_epochs, "phase 1 (one head, the ensemble mean)")
    if recipe.phase2_epochs:
        hydra.add_heads(
            num_members,
            noise_stddev=recipe.expansion_noise,
            seed=seed,
            copy_head=not recipe.fresh_heads,
        )
        if recipe.reset_optimizer:
            compile_phase(recipe.phase2_epochs)
        fit(recipe.phase2_epochs, f"phase 2 ({num_members} heads, one per member)")
        if recipe.calibrate_spread:
            hydra.calibrate_spread(inputs, targets, batch_size=2048)
    return hydra


def _loss(head, recipe: HydraRecipe) -> keras.losses.Loss:
    if isinstance(head, heads_lib.Distribution):
        return losses.DistributionKL(head.family)
    return losses.HydraKL(
        temperature=recipe.temperature, logit_weight=recipe.logit_weight
    )


def _as_array(x) -> np.ndarray:
    if isinstance(x, tf.data.Dataset):
        batches = [np.asarray(b) for b in x.as_numpy_iterator()]
        if not batches:
            raise ValueError("The dataset `x` yields no batches.")
        return np.concatenate(batches)
    x = np.asarray(x)
    if not len(x):
        raise ValueError(f"`x` holds no examples (shape {x.shape}).")
    return x
