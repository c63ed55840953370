"""Carrying an optimizer's state over `HydraModel.add_heads`."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


def expanded(
    optimizer: keras.optimizers.Optimizer, variables, copy_head: bool = True
) -> keras.optimizers.Optimizer:
    """A copy of `optimizer` built for `variables`, with the state carried over.

    Optimizer variables are created in the order of the model's variables,
    and `add_heads` keeps that order, so the old and new lists align one to
    one. A head's slot of leading size 1 is repeated for each new head, or
    left at its initial value when the heads are fresh (`copy_head=False`).

    Args:
        optimizer: the built optimizer of the single-head model.
        variables: the expanded model's trainable variables.
        copy_head: bool, whether the new heads copy the trained head.

    Returns:
        A new, built optimizer of the same class and configuration.

    Raises:
        RuntimeError: if the optimizer's variables do not follow the model's.
    """
    rebuilt = optimizer.__class__.from_config(optimizer.get_config())
    rebuilt.build(variables)
    if len(rebuilt.variables) != len(optimizer.variables):
        raise RuntimeError(
            f"Cannot carry the state of optimizer {optimizer.name} over "
            "add_heads: its variables do not follow the model's."
        )
    for new, old in zip(rebuilt.variables, optimizer.variables, strict=True):
        value = ops.convert_to_numpy(old)
        if tuple(new.shape) != tuple(old.shape):
            if not copy_head:
                continue
            value = np.repeat(value, new.shape[0], axis=0)
        new.assign(value)
    return rebuilt
