import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import types  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import pytest  # noqa: E402

import keras_hydra as kh  # noqa: E402
from keras_hydra.data import fashion_mnist  # noqa: E402

NUM_MEMBERS = 4
TEMPERATURE = 2.0
# Where the tutorials look for the UCI sets when $KERAS_HYDRA_UCI_DIR is unset.
SHARED_UCI = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "datasets", "uci"
)
UCI_DIR = os.environ.get("KERAS_HYDRA_UCI_DIR") or SHARED_UCI


def _has_fashion_mnist(directory: str | None) -> bool:
    # The loader's own file lookup, without reading 30 MB at collection time.
    return bool(directory) and all(
        fashion_mnist._find(Path(directory), name) for name in fashion_mnist.FILES
    )


# Data that a bare `pip install` does not bring: CI installs it, a newcomer's
# machine skips the tests that need it, with the way to enable them.
needs_fashion_mnist = pytest.mark.skipif(
    not (
        _has_fashion_mnist(os.environ.get(fashion_mnist.ENV_VAR))
        or _has_fashion_mnist(fashion_mnist.DEFAULT_DIR)
    ),
    reason="needs Fashion-MNIST: the Debian package dataset-fashion-mnist "
    f"(.ci/run installs it) or its IDX files in ${fashion_mnist.ENV_VAR}",
)
needs_uci = pytest.mark.skipif(
    not os.path.isdir(UCI_DIR),
    reason="needs the UCI regression sets: shared/datasets/uci beside the "
    "repository (as in CI) or $KERAS_HYDRA_UCI_DIR",
)


def mlp_body(hidden=32, name="body"):
    return keras.Sequential(
        [
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(hidden, activation="relu"),
        ],
        name=name,
    )


@pytest.fixture(scope="session")
def digits():
    return kh.data.load_digits_ood()


@pytest.fixture(scope="session")
def distilled(digits):
    """A real digits ensemble and a Hydra distilled from it through both phases."""
    keras.utils.set_random_seed(1)
    x, y = digits["x_train"], digits["y_train"]
    members = []
    for m in range(NUM_MEMBERS):
        member = keras.Sequential(
            [*mlp_body(name=f"b{m}").layers, keras.layers.Dense(6)], name=f"m{m}"
        )
        member.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        member.fit(x, y, epochs=30, batch_size=64, verbose=0)
        members.append(member)
    targets = kh.teacher.predict(members, x)

    hydra = kh.HydraModel(mlp_body(), kh.heads.Categorical(6))
    hydra.compile(optimizer="adam", loss=kh.losses.HydraKL(temperature=TEMPERATURE))
    hydra.fit(x, targets, epochs=15, batch_size=64, verbose=0)
    phase1_outputs = hydra.predict(x, verbose=0)
    hydra.add_heads(NUM_MEMBERS)
    expanded_outputs = hydra.predict(x, verbose=0)
    history = hydra.fit(x, targets, epochs=60, batch_size=64, verbose=0)
    return types.SimpleNamespace(
        x=x,
        members=members,
        targets=targets,
        hydra=hydra,
        phase1_outputs=phase1_outputs,
        expanded_outputs=expanded_outputs,
        phase2_losses=history.history["loss"],
    )
