"""Extra transfer inputs on which the teacher's members disagree.

A Hydra distilled on the training inputs alone copies the members where they
agree most; their disagreement off the training data (what flags
out-of-distribution inputs) is learnt only as far as the body extrapolates.
Adding inputs around the training data to the transfer set, with the
teacher's targets on them, shows the heads that disagreement.

The functions below make one such input per row. The `Transform` classes
(`CutMix`, `Affine`, `Mixup`, `GaussianNoise`) wrap them for
`keras_hydra.HydraRecipe.transforms`: callables `transform(x, seed)` that
return one transformed copy of every row, with a config.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_hydra.teacher import Ensemble


def mixup(x: np.ndarray, seed: int | None = None) -> np.ndarray:
    """One mixup input per row: `lam * x[i] + (1 - lam) * x[j]`, `lam ~ U(0, 1)`.

    `j` is a random permutation of the rows.

    Example:

    >>> x = np.eye(4, dtype="float32")
    >>> mixed = mixup(x, seed=0)
    >>> mixed.shape, bool(np.allclose(mixed.sum(axis=1), 1.0))
    ((4, 4), True)
    """
    rng = np.random.default_rng(seed)
    lam = rng.uniform(0.0, 1.0, (len(x), 1)).astype(x.dtype)
    return lam * x + (1 - lam) * x[rng.permutation(len(x))]


def cutmix(
    x: np.ndarray,
    image_shape: Sequence[int] | None = None,
    seed: int | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """One CutMix input per row: a random box of another row pasted in.

    `keras.layers.CutMix` does the pasting: the box's area fraction is
    uniform in (0, 1), its position uniform, and the other row is drawn
    from the same shuffled batch of `batch_size` rows. Unlike mixup's blends,
    the result has sharp, unnatural edges and object parts out of place.

    Args:
        x: images `[N, height, width, channels]`, or flat rows `[N, D]` with
            `image_shape`.
        image_shape: `(height, width)` or `(height, width, channels)` of the
            flat rows; `None` when `x` is already images.
        seed: optional int seed of the shuffle and the boxes.
        batch_size: int, rows per call of the layer.

    Returns:
        Float32 array shaped like `x`.

    Example:

    >>> x = np.stack([np.zeros((4, 4)), np.ones((4, 4))]).astype("float32")
    >>> mixed = cutmix(x.reshape(2, 16), image_shape=(4, 4), seed=0)
    >>> mixed.shape, bool(np.isin(mixed, [0.0, 1.0]).all())
    ((2, 16), True)
    """
    x = np.asarray(x, "float32")
    images = _images(x, image_shape, "cutmix")
    order = np.random.default_rng(seed).permutation(len(images))
    layer = keras.layers.CutMix(seed=seed)
    mixed = np.empty_like(images)
    for start in range(0, len(images), batch_size):
        index = order[start : start + batch_size]
        mixed[index] = keras.ops.convert_to_numpy(layer(images[index]))
    return mixed.reshape(x.shape)


def affine(
    x: np.ndarray,
    image_shape: Sequence[int] | None = None,
    zoom: tuple[float, float] = (0.0, 0.6),
    translation: float = 0.15,
    rotation: float = 0.05,
    seed: int | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """One randomly zoomed, shifted and rotated input per row.

    `keras.layers.RandomZoom`, `RandomTranslation` and `RandomRotation` do the
    work, filling uncovered pixels with zeros. With the default zoom, which
    only zooms out, objects shrink to between 1/1.6 of their size and their
    full size and move off the centre: shapes, scales and positions that the
    training images rarely show.

    Args:
        x: images `[N, height, width, channels]`, or flat rows `[N, D]` with
            `image_shape`.
        image_shape: `(height, width)` or `(height, width, channels)` of the
            flat rows; `None` when `x` is already images.
        zoom: `(low, high)` zoom factors, as `keras.layers.RandomZoom`'s
            `height_factor`: positive values zoom out, negative values zoom
            in.
        translation: float, the largest shift, as a fraction of the height
            and of the width.
        rotation: float, the largest rotation, as a fraction of a full turn.
        seed: optional int seed of the transformations.
        batch_size: int, rows per call of the layers.

    Returns:
        Float32 array shaped like `x`.

    Example:

    >>> x = np.ones((2, 8, 8, 1), "float32")
    >>> shrunk = affine(x, zoom=(1.0, 1.0), translation=0.0, rotation=0.0)
    >>> shrunk.shape, int((shrunk[0, ..., 0] > 0.5).sum())
    ((2, 8, 8, 1), 16)
    """
    x = np.asarray(x, "float32")
    images = _images(x, image_shape, "affine")
    seeds = [None] * 3 if seed is None else [seed, seed + 1, seed + 2]
    layers = keras.Sequential(
        [
            keras.layers.RandomZoom(zoom, fill_mode="constant", seed=seeds[0]),
            keras.layers.RandomTranslation(
                translation, translation, fill_mode="constant", seed=seeds[1]
            ),
            keras.layers.RandomRotation(rotation, fill_mode="constant", seed=seeds[2]),
        ]
    )
    return _apply(layers, images, batch_size).reshape(x.shape)


def augmented(
    x: np.ndarray,
    layer: keras.Layer,
    image_shape: Sequence[int] | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """One output of a random Keras image layer per row, e.g. `RandAugment`.

    Args:
        x: images `[N, height, width, channels]`, or flat rows `[N, D]` with
            `image_shape`.
        layer: a Keras layer (or model) mapping images to images of the same
            shape, called with `training=True`, e.g.
            `keras.layers.RandAugment(value_range=(0, 1), seed=0)`.
        image_shape: `(height, width)` or `(height, width, channels)` of the
            flat rows; `None` when `x` is already images.
        batch_size: int, rows per call of the layer.

    Returns:
        Float32 array shaped like `x`.

    Example:

    >>> x = np.ones((3, 16), "float32")
    >>> float(augmented(x, keras.layers.Rescaling(2.0), (4, 4)).max())
    2.0
    """
    x = np.asarray(x, "float32")
    images = _images(x, image_shape, "augmented")
    return _apply(layer, images, batch_size).reshape(x.shape)


def _apply(layer, images: np.ndarray, batch_size: int) -> np.ndarray:
    out = np.empty_like(images)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        out[start : start + batch_size] = keras.ops.convert_to_numpy(
            layer(batch, training=True)
        )
    return out


def _images(x: np.ndarray, image_shape, name: str) -> np.ndarray:
    """`x` as images `[N, height, width, channels]`."""
    images = x if image_shape is None else x.reshape(len(x), *image_shape)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(
            f"{name} expects images [N, height, width, channels] or flat rows "
            f"with `image_shape`; received shape {x.shape} and image_shape="
            f"{image_shape}."
        )
    return images


def diversified(
    members: Sequence[keras.Model] | Ensemble,
    x: np.ndarray,
    step_size: float,
    clip: tuple[float, float] | None = None,
    from_logits: bool = True,
    batch_size: int = 512,
    seed: int | None = None,
) -> np.ndarray:
    """One input per row of `x`, moved by output-diversified sampling.

    Output-diversified sampling (ODS, Tashiro et al. 2020), as Nam et al.
    (2021, "Diversity Matters When Learning From Ensembles") use to distil
    ensembles: for each row a random member `m` and random weights
    `w ~ U(-1, 1)^K` are drawn, and the row takes one signed-gradient step
    `x + step_size * sign(grad_x w . p_m(x))`, where `p_m` is member `m`'s
    class probabilities. The step changes member `m`'s prediction in a random
    direction; the other members' predictions change in their own ways, so
    the targets on these inputs show how the members differ off the
    training data. Whether a Hydra distilled on them keeps more of the
    ensemble's out-of-distribution disagreement is an empirical question:
    RESULTS.md records what it did in the Fashion-MNIST benchmark.

    Args:
        members: the teacher's members (classifiers), or an `Ensemble`.
        x: float inputs `[N, ...]`.
        step_size: float, size of the step on every input feature.
        clip: optional `(low, high)` range of valid inputs, e.g. `(0, 1)`
            for images.
        from_logits: bool, whether the members output logits (else
            probabilities).
        batch_size: int, rows per gradient computation.
        seed: optional int seed of the members and weights drawn.

    Returns:
        Float32 array shaped like `x`.

    Example:

    >>> members = [keras.Sequential([keras.layers.Dense(3)]) for _ in range(4)]
    >>> x = np.random.default_rng(0).uniform(size=(8, 5)).astype("float32")
    >>> moved = diversified(members, x, step_size=0.1, clip=(0.0, 1.0), seed=0)
    >>> moved.shape, bool(np.abs(moved - x).max() <= 0.1 + 1e-6)
    ((8, 5), True)
    """
    ensemble = members if isinstance(members, Ensemble) else Ensemble(members)
    rng = np.random.default_rng(seed)

    @tf.function
    def step(batch, member, weights):
        with tf.GradientTape() as tape:
            tape.watch(batch)
            outputs = ensemble(batch, training=False)  # [b, M, K]
            probs = tf.nn.softmax(outputs, axis=-1) if from_logits else outputs
            chosen = tf.gather(probs, member, axis=1, batch_dims=1)  # [b, K]
            score = tf.reduce_sum(chosen * weights)
        return batch + step_size * tf.sign(tape.gradient(score, batch))

    x = np.asarray(x, "float32")
    num_members = len(ensemble.members)
    num_classes = ensemble(x[:1], training=False).shape[-1]
    moved = []
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        member = rng.integers(0, num_members, len(batch))
        weights = rng.uniform(-1.0, 1.0, (len(batch), num_classes))
        moved.append(
            step(
                tf.constant(batch),
                tf.constant(member, "int32"),
                tf.constant(weights, "float32"),
            ).numpy()
        )
    moved = np.concatenate(moved) if moved else x.copy()
    return np.clip(moved, *clip) if clip is not None else moved


class Transform:
    """Base of the transfer transformations: config, equality, `from_config`.

    A subclass implements `__call__(x, seed)`, returning one transformed copy
    of every row of `x`, and `get_config`.
    """

    def __call__(self, x: np.ndarray, seed: int | None = None) -> np.ndarray:
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict) -> Transform:
        return cls(**config)

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(sorted(self.get_config().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="keras_hydra")
class CutMix(Transform):
    """A `HydraRecipe` transformation: `cutmix` on images `[N, H, W(, C)]`.

    Example:

    >>> x = np.stack([np.zeros((4, 4)), np.ones((4, 4))]).astype("float32")
    >>> CutMix()(x, seed=0).shape
    (2, 4, 4)
    """

    def __call__(self, x: np.ndarray, seed: int | None = None) -> np.ndarray:
        return cutmix(x, seed=seed)


@keras.saving.register_keras_serializable(package="keras_hydra")
class Affine(Transform):
    """A `HydraRecipe` transformation: `affine` on images `[N, H, W(, C)]`.

    Args:
        zoom: `(low, high)` zoom factors, as for `affine`.
        translation: float, the largest shift, as for `affine`.
        rotation: float, the largest rotation, as for `affine`.

    Example:

    >>> x = np.ones((2, 8, 8, 1), "float32")
    >>> Affine(zoom=(1.0, 1.0))(x, seed=0).shape
    (2, 8, 8, 1)
    """

    def __init__(
        self,
        zoom: Sequence[float] = (0.0, 0.6),
        translation: float = 0.15,
        rotation: float = 0.05,
    ):
        self.zoom = tuple(float(z) for z in zoom)
        self.translation = float(translation)
        self.rotation = float(rotation)

    def __call__(self, x: np.ndarray, seed: int | None = None) -> np.ndarray:
        return affine(x, None, self.zoom, self.translation, self.rotation, seed)

    def get_config(self) -> dict:
        return {
            "zoom": list(self.zoom),
            "translation": self.translation,
            "rotation": self.rotation,
        }


@keras.saving.register_keras_serializable(package="keras_hydra")
class Mixup(Transform):
    """A `HydraRecipe` transformation: `mixup` on inputs of any shape.

    Example:

    >>> Mixup()(np.eye(4, dtype="float32"), seed=0).shape
    (4, 4)
    """

    def __call__(self, x: np.ndarray, seed: int | None = None) -> np.ndarray:
        return mixup(np.asarray(x, "float32"), seed=seed)


@keras.saving.register_keras_serializable(package="keras_hydra")
class GaussianNoise(Transform):
    """A `HydraRecipe` transformation: `x + N(0, stddev^2)` noise, optionally clipped.

    Args:
        stddev: float >= 0, the noise's standard deviation, in the inputs'
            units (standard units for standardised tables).
        clip: optional `(low, high)` range of valid inputs, e.g. `(0, 1)`.

    Example:

    >>> noisy = GaussianNoise(0.1)(np.zeros((1000, 2), "float32"), seed=0)
    >>> round(float(noisy.std()), 1)
    0.1
    """

    def __init__(self, stddev: float, clip: Sequence[float] | None = None):
        if not float(stddev) >= 0:
            raise ValueError(f"`stddev` must be >= 0. Received: {stddev}")
        self.stddev = float(stddev)
        self.clip = None if clip is None else tuple(float(c) for c in clip)

    def __call__(self, x: np.ndarray, seed: int | None = None) -> np.ndarray:
        x = np.asarray(x, "float32")
        rng = np.random.default_rng(seed)
        noisy = x + rng.normal(0.0, self.stddev, x.shape).astype("float32")
        return noisy if self.clip is None else np.clip(noisy, *self.clip)

    def get_config(self) -> dict:
        clip = None if self.clip is None else list(self.clip)
        return {"stddev": self.stddev, "clip": clip}
