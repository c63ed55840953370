"""`HeadDiversity`: a penalty that pushes a Hydra's heads apart in weight space."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_hydra")
class HeadDiversity(keras.regularizers.Regularizer):
    """Penalises heads whose weights point the same way as the mean head.

    The head-diversity term of Hydra+ (Ferianc & Rodrigues 2022): for a
    stacked kernel `[M, fan_in, fan_out]`, each output unit's weight vector
    in head `m` is compared with the same unit's mean over heads, and the
    penalty is `strength` times the mean of `(1 + cos) / 2` over heads and
    units (1 when all heads are equal, 0.5 when orthogonal to the mean). The
    distillation loss keeps each head on its member where there is data;
    the penalty spreads the heads where there is none.

    Set it on the kernels of `HydraModel.heads` after `add_heads`, e.g.
    `for k in model.heads.kernels: k.regularizer = HeadDiversity(0.1)`;
    Keras adds it to the loss of the next `fit`.

    Args:
        strength: float, weight of the penalty.

    Example:

    >>> same = np.ones((3, 4, 2), "float32")
    >>> float(HeadDiversity(1.0)(same))
    1.0
    >>> opposite = np.stack([np.ones((4, 2)), -np.ones((4, 2)), np.ones((4, 2))])
    >>> round(float(HeadDiversity(1.0)(opposite.astype("float32"))), 3)
    0.667
    """

    def __init__(self, strength: float = 0.1):
        self.strength = float(strength)

    def __call__(self, kernel):
        kernel = ops.cast(kernel, "float32")
        mean = ops.mean(kernel, axis=0, keepdims=True)
        dot = ops.sum(kernel * mean, axis=1)
        norms = ops.norm(kernel, axis=1) * ops.norm(mean, axis=1)
        cos = dot / (norms + 1e-8)
        return self.strength * ops.mean((1.0 + cos) / 2.0)

    def get_config(self):
        return {"strength": self.strength}
