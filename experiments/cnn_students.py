"""Study: which CNN student lets Hydra's heads keep the CNN ensemble's spread?

Not part of the package. Trains the benchmark's CNN ensemble once
(`--body cnn`, full Fashion-MNIST, seed 0), builds the `image_ood` transfer
set, then distils one `image_ood` Hydra per student body and scores each as
the benchmark does (`classification.evaluate` / `fidelity`). Results go to
OUT/results.json after every variant.

    python experiments/cnn_students.py OUT base wide flat wideflat conv conv64

A variant may end in `/N` to distil it again with student seed N (default 0):
`conv/1` is the `conv` student from another initialisation and shuffle. A
body may be followed by `+change` to distil it with `image_ood` changed as
`RECIPES` says: `conv+cosine/1`.
"""

import json
import os
import sys
import time

import keras

from keras_hydra import heads, recipes, teacher
from keras_hydra.benchmarks import classification as cls
from keras_hydra.benchmarks import images

VARIANTS = ("base", "wide", "flat", "wideflat", "conv", "conv64")
# Changes to `image_ood` tried on the CNN students, as `HydraRecipe` fields.
RECIPES = {
    "": {},
    "cosine": {"schedule": "cosine"},
    "logits3": {"logit_weight": 0.3},
}


def parse(variant: str) -> tuple[str, recipes.HydraRecipe, int]:
    """`body[+change][/N]` as (body, recipe, student seed N), checked first."""
    rest, _, seed = variant.partition("/")
    name, _, change = rest.partition("+")
    if (
        name not in VARIANTS
        or change not in RECIPES
        or not (seed == "" or seed.isdigit())
    ):
        raise ValueError(
            f"Unknown variant {variant!r}: expected one of {VARIANTS}, "
            f"optionally followed by +C with C one of {tuple(RECIPES)[1:]}, "
            "then optionally by /N with N a student seed >= 0."
        )
    recipe = recipes.HydraRecipe.get("image_ood").replace(**RECIPES[change])
    return name, recipe, int(seed or 0)


def body(variant: str) -> keras.Model:
    if variant == "base":
        return images.cnn("body")
    if variant == "wide":
        return images.cnn("body", filters=(32, 64))
    if variant in ("flat", "wideflat"):  # the last feature map flattened
        model = images.cnn(
            "body", filters=(32, 64) if variant == "wideflat" else (16, 32)
        )
        model.pop()
        model.add(keras.layers.Flatten())
        return model
    if variant in ("conv", "conv64"):  # the last feature map, for conv heads
        return images.cnn("body", pooling=False)
    raise ValueError(variant)


def head(variant: str) -> heads.Categorical:
    filters = {"conv": 32, "conv64": 64}.get(variant, 0)
    return heads.Categorical(10, conv_filters=filters)


def _members(folder, x, y, config):
    """The benchmark's members, trained once and then read back from `folder`."""
    paths = [os.path.join(folder, f"member_{m}.keras") for m in range(config.members)]
    if all(os.path.exists(p) for p in paths):
        return [keras.saving.load_model(p) for p in paths]
    members = cls.train_ensemble(x, y, config)
    os.makedirs(folder, exist_ok=True)
    for member, p in zip(members, paths, strict=True):
        member.save(p)
    return members


def main(out, variants):
    if not variants:
        raise ValueError(f"No variant given: name one or more of {VARIANTS}.")
    students = [(variant, *parse(variant)) for variant in variants]
    os.makedirs(out, exist_ok=True)
    config = cls.ClassificationConfig(body="cnn", seeds=1)
    data = cls.load_data(config)
    x, y = data["x_train"], data["y_train"]
    tick = time.perf_counter()
    members = _members(os.path.join(out, "members"), x, y, config)
    ensemble = teacher.Ensemble(members)
    print(f"members {time.perf_counter() - tick:.0f} s", flush=True)

    def outputs_of(model):
        return {
            "test": cls._outputs(model, data["x_test"]),
            "ood": {k: cls._outputs(model, v) for k, v in data["ood"].items()},
        }

    ens_out = outputs_of(ensemble)
    path = os.path.join(out, "results.json")
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    results["ensemble"] = cls.evaluate(ens_out, data["y_test"], 0)
    # The changes in `RECIPES` leave the transfer set as `image_ood` makes it.
    transfer = recipes.transfer_set(
        ensemble, x, "image_ood", image_shape=cls.IMAGE_SHAPE, seed=7, batch_size=2048
    )
    for variant, name, recipe, seed in students:
        tick = time.perf_counter()
        keras.utils.set_random_seed(2000 + seed)
        with cls._dtype_policy(config.student_dtype):
            hydra = recipes.distill(
                members,
                body(name),
                head(name),
                None,
                recipe,
                transfer_data=transfer,
                seed=7 + seed,
                verbose=0,
            )
        hydra_out = outputs_of(hydra)
        results[variant] = {
            **cls.evaluate(hydra_out, data["y_test"], hydra.count_params()),
            "fidelity": cls.fidelity(ens_out, hydra_out),
            "spread": float(keras.ops.convert_to_numpy(hydra.spread)),
            "seconds": time.perf_counter() - tick,
        }
        r = results[variant]
        print(
            variant,
            f"{r['seconds']:.0f} s acc {r['accuracy']:.4f} nll {r['nll']:.4f}",
            {k: round(v["mutual_information"], 4) for k, v in r["ood_auroc"].items()},
            {k: round(v, 3) for k, v in r["fidelity"]["mean_mi_ratio_ood"].items()},
            flush=True,
        )
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=float)
    e = results["ensemble"]
    print(
        "ensemble",
        e["accuracy"],
        e["nll"],
        {k: round(v["mutual_information"], 4) for k, v in e["ood_auroc"].items()},
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
