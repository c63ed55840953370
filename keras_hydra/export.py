"""SavedModel export for TF Serving, with uncertainty in the signature."""

from __future__ import annotations

import os
import shutil
import tempfile

import keras
import tensorflow as tf


def _input_name(model) -> str:
    inputs = getattr(model.body, "inputs", None)
    # An unnamed `keras.Input`, or the one a Sequential body makes itself when
    # built without one, is named `keras_tensor...` by Keras.
    if inputs and len(inputs) == 1 and not inputs[0].name.startswith("keras_tensor"):
        return inputs[0].name
    return "inputs"


def saved_model(
    model, path: str, input_name: str | None = None, overwrite: bool = False
) -> str:
    """Writes `model` as a SavedModel that serves predictions and uncertainty.

    The `serving_default` signature takes one named float32 input with a free
    batch dimension and returns the dict of `model.predict_uncertainty` at
    temperature 1:

    - `Categorical` heads: `probabilities` `[batch, K]`, `head_probabilities`
      `[batch, M, K]`, `predicted_class` `[batch]` (int64), and
      `total_uncertainty`, `aleatoric_uncertainty`, `epistemic_uncertainty`
      `[batch]` (nats). A row whose input is not all finite gets NaN
      outputs and `predicted_class` -1.
    - `Distribution` heads: `mean`, `variance`, `aleatoric_variance`,
      `epistemic_variance` `[batch, E]`, `head_parameters` `[batch, M, P * E]`,
      and `lower_XX` / `upper_XX` `[batch, E]` for each of the head's
      `levels` (`lower_95`, `upper_95` for 0.95; `lower_97_5` for 0.975).
      A row whose input is not all finite gets NaN outputs.

    All are float32 unless noted. A second signature, `head_outputs`, returns
    the raw head outputs as `outputs`. The directory loads with TensorFlow
    alone (`tf.saved_model.load`, TF Serving, `saved_model_cli`): neither
    keras_hydra nor TensorFlow Probability is needed to serve it. An online
    teacher (`HydraModel(..., teacher=members)`) is held out of Keras
    tracking, so it is never part of the export: the SavedModel holds the
    body's and heads' variables only.

    The SavedModel is written to a temporary directory next to `path` and
    moved into place, so a failed export leaves nothing behind.

    Args:
        model: a built `keras_hydra.HydraModel`.
        path: str, the export directory, e.g. `"serving/hydra/1"`.
        input_name: name of the signature's input; by default the body's
            input name, or `"inputs"`.
        overwrite: bool, whether to replace a non-empty `path`.

    Returns:
        `path`.

    Raises:
        ValueError: if the model was never built, or `path` exists, is not
            empty and `overwrite` is False.

    Example:

    >>> import keras_hydra as kh, tempfile, os
    >>> hydra = kh.HydraModel(keras.layers.Dense(4), kh.heads.Categorical(3), 2)
    >>> hydra.build((None, 5))
    >>> path = saved_model(hydra, os.path.join(tempfile.mkdtemp(), "1"))
    >>> served = tf.saved_model.load(path).signatures["serving_default"]
    >>> served(inputs=tf.zeros((1, 5)))["head_probabilities"].shape
    TensorShape([1, 2, 3])
    """
    if not model.built:
        raise ValueError(
            "The model has never been built, so it has no weights to export: "
            "call it on data or train it first."
        )
    path = os.fspath(path)
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise ValueError(
            f"Export path {path!r} exists and is not empty; pass overwrite=True "
            "to replace it."
        )
    input_shape = model.get_build_config()["input_shape"]
    if not isinstance(input_shape, (list, tuple)) or not all(
        d is None or isinstance(d, int) for d in input_shape
    ):
        raise ValueError(
            "Export supports models with one input tensor; this model was "
            f"built with input shape {input_shape!r}."
        )
    spec = tf.TensorSpec(
        [None, *input_shape[1:]], tf.float32, name=input_name or _input_name(model)
    )

    def serve(inputs):
        return model.head.uncertainty(model(inputs, training=False))

    def head_outputs(inputs):
        return {"outputs": model(inputs, training=False)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve, input_signature=[spec])
    archive.add_endpoint("head_outputs", head_outputs, input_signature=[spec])

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        archive.write_out(staging, verbose=False)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
