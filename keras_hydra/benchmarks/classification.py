"""Fashion-MNIST benchmark: deep ensemble vs Hydra vs KD student vs single model.

A deep ensemble of M members (`--body mlp`: 784-512-512-10 MLPs; `--body
cnn`: small Conv2D + BatchNormalization networks, `images.cnn`) is trained
on Fashion-MNIST labels. From it, for each `--recipe` (a
`keras_hydra.HydraRecipe` preset), `--seeds` Hydras are distilled with
`keras_hydra.distill` and a KD student with `distill` and `recipe.kd()` (the
same transfer set, body, batch size, learning rate and total epochs, one
linear head), on a student body of the same kind (`--body mlp`: 784-512;
`cnn`: `images.cnn` with `--student-filters`, by default the members' 16 and
32, and with `--student-head-conv`, heads that start with a convolution on
its last feature map). The single model is an ensemble member (member `s`
for seed `s`). Everything is scored on the Fashion-MNIST test set and on the
out-of-distribution sets of `images.ood_sets` (MNIST, plus sets built from
offline data) and any `--extra-ood` files, and written to
`OUT/results.json`, `OUT/table.md` and PNG plots.

`keras-hydra benchmark classification --recipe image_ood` runs exactly
`kh.distill(members, body, kh.heads.Categorical(10), x, recipe="image_ood",
image_shape=(28, 28), seed=...)`. `--quick` shortens the recipes' epochs
(`ClassificationConfig.recipe_changes`) for a smoke run. Measured results
are in RESULTS.md at the top of the repository.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import keras
import numpy as np
from scipy import stats

from keras_hydra import heads, metrics, recipes, teacher, uncertainty
from keras_hydra.benchmarks import images
from keras_hydra.data import load_fashion_mnist
from keras_hydra.evaluation import ood_auroc

METHODS = ("ensemble", "hydra", "kd", "single")
SCORES = ("accuracy", "nll", "ece", "brier")
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
BODIES = ("mlp", "cnn")


@dataclass
class ClassificationConfig:
    """Settings of the benchmark; the defaults are the reported full run.

    The members train in float32 with `batch_size`, `learning_rate` and
    `member_epochs`; the students follow their recipe, built and trained
    under `student_dtype`, a Keras dtype policy (`"mixed_bfloat16"`
    computes in bfloat16; losses, softmax and KL stay float32).

    Args:
        members: int, the ensemble size M.
        seeds: int, students distilled per recipe.
        body: `"mlp"` or `"cnn"`, the members' and students' kind.
        hidden: hidden layers of the MLP members.
        student_hidden: hidden layers of the MLP students' body.
        student_filters: filters of the CNN students' convolutional blocks
            (the members have `images.cnn`'s default, 16 and 32).
        student_head_conv: int, filters of a convolution that starts each
            CNN student head, on the body's last feature map
            (`heads.Categorical(conv_filters=...)`); 0 for heads on pooled
            features.
        member_epochs: int, epochs of the members' training; `None` for the
            body's default (5 for MLPs, `images.CNN_EPOCHS` for CNNs).
        batch_size: int, the members' batch size.
        learning_rate: float, the members' Adam learning rate.
        train_size, test_size, ood_size: optional subset sizes.
        recipes: names of `HydraRecipe` presets; the first is reported as
            `methods.hydra`, and the KD student follows its `kd()`.
        recipe_changes: fields replaced in every recipe (`--quick` only).
        seed: int, the seed of the data subsets, members and transfer sets.
        student_dtype: the students' dtype policy.
    """

    members: int = 10
    seeds: int = 3
    body: str = "mlp"
    hidden: tuple = (512, 512)
    student_hidden: tuple = (512,)
    student_filters: tuple = (16, 32)
    student_head_conv: int = 0
    member_epochs: int | None = None
    batch_size: int = 256
    learning_rate: float = 1e-3
    train_size: int | None = None
    test_size: int | None = None
    ood_size: int | None = None
    recipes: list = field(default_factory=lambda: ["image_ood"])
    recipe_changes: dict = field(default_factory=dict)
    seed: int = 0
    student_dtype: str = "mixed_bfloat16"

    def __post_init__(self):
        if self.student_head_conv and self.body != "cnn":
            raise ValueError(
                "student_head_conv needs a CNN body's feature map; received "
                f"body={self.body!r} with student_head_conv={self.student_head_conv}."
            )

    @classmethod
    def quick(cls) -> ClassificationConfig:
        """A CI smoke run: small subsets, 3 members, 1 seed, few epochs."""
        return cls(
            members=3,
            seeds=1,
            member_epochs=2,
            train_size=4000,
            test_size=1000,
            ood_size=1000,
            recipe_changes={"phase1_epochs": 1, "phase2_epochs": 1},
        )

    def recipe(self, name: str) -> recipes.HydraRecipe:
        """The preset `name` with `recipe_changes` applied."""
        return recipes.HydraRecipe.get(name).replace(**self.recipe_changes)


# Many small steps per compiled call: Keras' per-step overhead is large next
# to an MLP step.
_STEPS_PER_EXECUTION = 32


def _flatten(images: np.ndarray) -> np.ndarray:
    """uint8 `[N, 28, 28]` images as float32 `[N, 784]` in [0, 1]."""
    return (images.reshape(len(images), -1) / 255.0).astype("float32")


def load_extra_ood(spec: str) -> tuple[str, np.ndarray]:
    """Parses `NAME=FILE.npz` and loads the file's `x` as flat float inputs.

    Args:
        spec: string `NAME=FILE.npz`; the file holds `x`, uint8 `[N, 28, 28]`.

    Returns:
        `(name, x)` with `x` float32 `[N, 784]` in [0, 1].

    Raises:
        ValueError: if `spec` is malformed or `x` has the wrong shape or dtype.
    """
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--extra-ood must be NAME=FILE.npz. Received: {spec!r}")
    with np.load(path) as data:
        if "x" not in data:
            raise ValueError(f"{path} has no array `x` (it has {list(data)}).")
        x = data["x"]
    if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8 or not len(x):
        raise ValueError(
            f"{path}: `x` must be uint8 [N, 28, 28]; received {x.dtype} {x.shape}."
        )
    return name, _flatten(x)


def load_data(config: ClassificationConfig, extra_ood: Sequence[str] = ()) -> dict:
    """Fashion-MNIST train/test and the OOD sets, flat float32 in [0, 1]."""
    rng = np.random.default_rng(config.seed)
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()

    def subset(x, y, size):
        if size is None or size >= len(x):
            return x, y
        index = np.sort(rng.choice(len(x), size, replace=False))
        return x[index], (None if y is None else y[index])

    x_train, y_train = subset(x_train, y_train, config.train_size)
    x_test, y_test = subset(x_test, y_test, config.test_size)
    ood = images.ood_sets(config.ood_size, config.seed)
    for spec in extra_ood:
        name, x = load_extra_ood(spec)
        if name in ood:
            raise ValueError(f"Duplicate out-of-distribution set name {name!r}.")
        ood[name] = subset(x, None, config.ood_size)[0]
    return {
        "x_train": _flatten(x_train),
        "y_train": y_train.astype("int32"),
        "x_test": _flatten(x_test),
        "y_test": y_test.astype("int32"),
        "ood": ood,
    }


def _mlp(hidden: Sequence[int], name: str, outputs: int | None = None):
    layers = [keras.layers.Dense(u, activation="relu") for u in hidden]
    if outputs is not None:
        layers.append(keras.layers.Dense(outputs))
    return keras.Sequential(layers, name=name)


def network(config: ClassificationConfig, name: str, outputs: int | None = None):
    """A member (with `outputs`) or a student body of `config.body`'s kind."""
    if config.body == "cnn":
        if outputs is None:
            return images.cnn(
                name,
                filters=config.student_filters,
                pooling=not config.student_head_conv,
            )
        return images.cnn(name, outputs)
    hidden = config.hidden if outputs is not None else config.student_hidden
    return _mlp(hidden, name, outputs)


def _steps(num_examples: int, batch_size: int) -> int:
    return min(_STEPS_PER_EXECUTION, max(1, -(-num_examples // batch_size)))


def train_ensemble(x, y, config: ClassificationConfig) -> list[keras.Model]:
    """Trains `config.members` networks on labels, all in one model and one `fit`.

    The members see the same batches (they differ by their initialization,
    the main source of a deep ensemble's diversity), which lets Keras run
    them as one graph with no per-member overhead.
    """
    keras.utils.set_random_seed(config.seed)
    members = [
        network(config, f"member_{m}", NUM_CLASSES) for m in range(config.members)
    ]
    ensemble = teacher.Ensemble(members, name="ensemble")
    ensemble.compile(
        keras.optimizers.Adam(config.learning_rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=_steps(len(x), config.batch_size),
    )
    epochs = config.member_epochs
    if epochs is None:
        epochs = images.CNN_EPOCHS if config.body == "cnn" else 5
    ensemble.fit(
        x,
        np.repeat(y[:, None], config.members, axis=1),
        epochs=epochs,
        batch_size=config.batch_size,
        verbose=0,
    )
    return members


@contextlib.contextmanager
def _dtype_policy(name: str):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def train_student(
    members,
    transfer_data: tuple[np.ndarray, np.ndarray],
    recipe: recipes.HydraRecipe,
    config: ClassificationConfig,
    seed: int,
    name: str = "hydra",
) -> keras.Model:
    """`keras_hydra.distill` with `recipe` on a fresh body, under `config`'s dtype.

    Layers take the dtype policy when they are made, and `add_heads` keeps
    it, so the body and the heads are made inside the policy.
    """
    keras.utils.set_random_seed(seed)
    with _dtype_policy(config.student_dtype):
        return recipes.distill(
            members,
            network(config, "body"),
            heads.Categorical(NUM_CLASSES, conv_filters=config.student_head_conv),
            None,
            recipe,
            transfer_data=transfer_data,
            seed=config.seed + 7,
            verbose=0,
            name=name,
        )


def _outputs(model, x) -> np.ndarray:
    """Logits `[N, S, K]` of a `HydraModel` or an `Ensemble`."""
    return np.asarray(model.predict(x, batch_size=2048, verbose=0), "float32")


def score(outputs: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, NLL, ECE (15 bins) and Brier of the averaged prediction.

    Args:
        outputs: logits `[N, S, K]` of S heads or members.
        labels: int array `[N]`.

    Returns:
        Dict of floats keyed by `SCORES`.
    """
    result = {}
    for name, metric in [
        ("accuracy", metrics.Accuracy()),
        ("nll", metrics.NegativeLogLikelihood()),
        ("ece", metrics.ExpectedCalibrationError(num_bins=15)),
        ("brier", metrics.BrierScore()),
    ]:
        metric.update_state(labels, outputs)
        result[name] = float(metric.result())
    return result


def _uncertainty(outputs: np.ndarray) -> dict:
    u = uncertainty.categorical(outputs)
    return {k: np.asarray(u[k]) for k in ("total_uncertainty", "epistemic_uncertainty")}


def ood_scores(u_in: dict, u_ood: dict, several: bool) -> dict:
    """AUROC of entropy (and of mutual information, with several heads).

    Args:
        u_in: `_uncertainty` of the in-distribution test set.
        u_ood: name -> `_uncertainty` of each out-of-distribution set.
        several: whether the method has several members or heads.

    Returns:
        `{ood_name: {"entropy": auroc, "mutual_information": auroc}}`.
    """
    result = {}
    for name, u in u_ood.items():
        entry = {
            "entropy": ood_auroc(u_in["total_uncertainty"], u["total_uncertainty"])[
                "auroc"
            ]
        }
        if several:
            entry["mutual_information"] = ood_auroc(
                u_in["epistemic_uncertainty"], u["epistemic_uncertainty"]
            )["auroc"]
        result[name] = entry
    return result


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def member_kl_matrix(teacher_outputs: np.ndarray, student_outputs: np.ndarray):
    """Mean over examples of `KL(member m || head s)`, as `[S, M]`, at T = 1."""
    log_p = teacher_outputs - _logsumexp(teacher_outputs)
    log_q = student_outputs - _logsumexp(student_outputs)
    p = np.exp(log_p)
    self_term = np.sum(p * log_p, axis=-1).mean(axis=0)  # [M]
    cross = np.einsum("nmk,nsk->sm", p, log_q) / len(p)  # [S, M]
    return self_term[None, :] - cross


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def fidelity(ensemble: dict, hydra: dict) -> dict:
    """How well the Hydra's heads keep the ensemble's members and diversity.

    Args:
        ensemble: `{"test": logits, "ood": {name: logits}}` of the members.
        hydra: the same for the Hydra's heads.

    Returns:
        `mi_spearman` (test set), `own_member_fraction` (share of heads whose
        KL to their own member is the smallest among all members),
        `mean_kl_to_ensemble` (`keras_hydra.metrics.Fidelity`: KL from the
        ensemble mean to the Hydra mean), and per OOD set
        `mi_spearman_ood` and `mean_mi_ratio_ood` (Hydra's mean MI over the
        ensemble's).
    """
    mi = {
        "ens": _uncertainty(ensemble["test"])["epistemic_uncertainty"],
        "hydra": _uncertainty(hydra["test"])["epistemic_uncertainty"],
    }
    kl = member_kl_matrix(ensemble["test"], hydra["test"])
    own = np.argmin(kl, axis=1) == np.arange(kl.shape[0])
    kl_metric = metrics.Fidelity()
    kl_metric.update_state(ensemble["test"], hydra["test"])
    result = {
        "mi_spearman": _spearman(mi["hydra"], mi["ens"]),
        "own_member_fraction": float(np.mean(own)),
        "mean_kl_to_ensemble": float(kl_metric.result()),
        "mi_spearman_ood": {},
        "mean_mi_ratio_ood": {},
    }
    for name, ens_out in ensemble["ood"].items():
        ens_mi = _uncertainty(ens_out)["epistemic_uncertainty"]
        hydra_mi = _uncertainty(hydra["ood"][name])["epistemic_uncertainty"]
        result["mi_spearman_ood"][name] = _spearman(hydra_mi, ens_mi)
        result["mean_mi_ratio_ood"][name] = float(
            hydra_mi.mean() / max(ens_mi.mean(), 1e-12)
        )
    return result


def evaluate(outputs: dict, labels: np.ndarray, params: int) -> dict:
    """Scores, parameter count and OOD AUROCs of one method's outputs.

    Args:
        outputs: `{"test": logits [N, S, K], "ood": {name: logits}}`.
        labels: test labels `[N]`.
        params: int, the method's parameter count.
    """
    several = outputs["test"].shape[1] > 1
    u_in = _uncertainty(outputs["test"])
    u_ood = {name: _uncertainty(o) for name, o in outputs["ood"].items()}
    return {
        **score(outputs["test"], labels),
        "params": int(params),
        "ood_auroc": ood_scores(u_in, u_ood, several),
    }


def mean_over_seeds(per_seed: list[dict]) -> dict:
    """The mean of every numeric leaf, with the per-seed dicts beside them."""

    def mean(trees):
        first = trees[0]
        if isinstance(first, dict):
            return {k: mean([t[k] for t in trees]) for k in first}
        values = np.array(trees, dtype="float64")
        if isinstance(first, int) and np.all(values == first):
            return first
        return float(np.mean(values))

    return {**mean(per_seed), "per_seed": per_seed}


def summary(methods: dict, scored: list[tuple[dict, dict]]) -> dict:
    """A Hydra's `evaluate` and `fidelity` per seed as means, with its goals."""
    hydra = mean_over_seeds([run for run, _ in scored])
    hydra_fidelity = mean_over_seeds([fid for _, fid in scored])
    return {
        "hydra": hydra,
        "fidelity": hydra_fidelity,
        "goals": goals(methods, hydra, hydra_fidelity),
    }


def goals(methods: dict, hydra: dict, hydra_fidelity: dict) -> dict:
    """The issue's targets for a Hydra, each as `{value, target, met}`."""
    ens, kd = methods["ensemble"], methods["kd"]

    def check(value, target, higher=True):
        met = bool(value >= target) if higher else bool(value <= target)
        return {"value": float(value), "target": float(target), "met": met}

    result = {
        "accuracy": check(hydra["accuracy"], ens["accuracy"] - 0.005),
        "nll": check(hydra["nll"], 1.05 * ens["nll"], higher=False),
        "ece": check(hydra["ece"], ens["ece"] + 0.01, higher=False),
        "mi_spearman": check(hydra_fidelity["mi_spearman"], 0.9),
        "own_member_fraction": check(hydra_fidelity["own_member_fraction"], 0.9),
    }
    for name, ens_auroc in ens["ood_auroc"].items():
        auroc = hydra["ood_auroc"][name]["mutual_information"]
        kd_best = max(kd["ood_auroc"][name].values())
        result[f"{name}/auroc_mi_vs_ensemble"] = check(
            auroc, 0.98 * ens_auroc["mutual_information"]
        )
        result[f"{name}/auroc_mi_vs_kd"] = check(auroc, kd_best + 0.05)
        result[f"{name}/mean_mi_ratio"] = check(
            hydra_fidelity["mean_mi_ratio_ood"][name], 0.8
        )
        result[f"{name}/mi_spearman"] = check(
            hydra_fidelity["mi_spearman_ood"][name], 0.85
        )
    return result


def _reliability(outputs: np.ndarray, labels: np.ndarray, num_bins: int = 15):
    """Per-bin (confidence, accuracy, count) of the averaged prediction."""
    probs = np.asarray(uncertainty.categorical(outputs)["probabilities"])
    confidence = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    bins = np.clip(np.ceil(confidence * num_bins) - 1, 0, num_bins - 1).astype(int)
    count = np.bincount(bins, minlength=num_bins)
    acc = np.bincount(bins, correct, num_bins) / np.maximum(count, 1)
    conf = np.bincount(bins, confidence, num_bins) / np.maximum(count, 1)
    return conf, acc, count


def plot(out: str, outputs: dict, labels: np.ndarray, hydra_name: str) -> list[str]:
    """Writes the PNG plots; returns their file names.

    Args:
        out: output folder.
        outputs: method -> `{"test": logits, "ood": {name: logits}}`, for
            `ensemble`, `hydra`, `kd` and `single` (first seed).
        labels: test labels.
        hydra_name: the Hydra recipe shown, for titles.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    files = []
    fig, axes = plt.subplots(1, len(outputs), figsize=(4 * len(outputs), 4))
    edges = np.linspace(0, 1, 16)
    for ax, (method, out_m) in zip(axes, outputs.items(), strict=True):
        conf, acc, count = _reliability(out_m["test"], labels)
        keep = count > 0
        ax.bar(
            edges[:-1][keep],
            acc[keep],
            width=1 / 15,
            align="edge",
            edgecolor="k",
            alpha=0.7,
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
        ax.plot(conf[keep], acc[keep], "ko", ms=3)
        ax.set(
            title=method,
            xlabel="confidence",
            ylabel="accuracy",
            xlim=(0, 1),
            ylim=(0, 1),
        )
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Reliability on the Fashion-MNIST test set (hydra: {hydra_name})")
    fig.tight_layout()
    files.append("reliability.png")
    fig.savefig(os.path.join(out, files[-1]), dpi=100)
    plt.close(fig)

    ood_names = list(outputs["ensemble"]["ood"])
    mi = {
        method: {
            "fashion_mnist (in)": _uncertainty(outputs[method]["test"])[
                "epistemic_uncertainty"
            ],
            **{
                name: _uncertainty(outputs[method]["ood"][name])[
                    "epistemic_uncertainty"
                ]
                for name in ood_names
            },
        }
        for method in ("ensemble", "hydra")
    }
    top = max(np.quantile(np.concatenate(list(v.values())), 0.995) for v in mi.values())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, method in zip(axes, ("ensemble", "hydra"), strict=True):
        for name, values in mi[method].items():
            ax.hist(
                values,
                bins=np.linspace(0, top, 50),
                alpha=0.5,
                density=True,
                label=f"{name} (mean {values.mean():.3f})",
            )
        ax.set(
            title=f"{method} mutual information",
            xlabel="MI (nats)",
            ylabel="density",
            yscale="log",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    files.append("mi_histograms.png")
    fig.savefig(os.path.join(out, files[-1]), dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    for name in mi["ensemble"]:
        ax.scatter(mi["ensemble"][name], mi["hydra"][name], s=2, alpha=0.4, label=name)
    ax.plot([0, top], [0, top], "k--", lw=1)
    ax.set(
        title=f"Per-example MI, hydra ({hydra_name}) vs ensemble",
        xlabel="ensemble MI (nats)",
        ylabel="hydra MI (nats)",
    )
    ax.legend(markerscale=4, fontsize=8)
    fig.tight_layout()
    files.append("mi_scatter.png")
    fig.savefig(os.path.join(out, files[-1]), dpi=100)
    plt.close(fig)
    return files


def table(results: dict) -> str:
    """Markdown tables: methods, then every Hydra recipe against the goals."""
    ood_names = list(results["methods"]["ensemble"]["ood_auroc"])
    head = "| method | params | accuracy | NLL | ECE | Brier |"
    for name in ood_names:
        head += f" AUROC {name} (entropy) | AUROC {name} (MI) |"
    lines = [head, "|" + "---|" * (6 + 2 * len(ood_names))]

    def row(label, m):
        cells = [
            f"{m['params']:,}",
            f"{m['accuracy']:.4f}",
            f"{m['nll']:.4f}",
            f"{m['ece']:.4f}",
            f"{m['brier']:.4f}",
        ]
        for name in ood_names:
            a = m["ood_auroc"][name]
            cells.append(f"{a['entropy']:.4f}")
            mi = a.get("mutual_information")
            cells.append("–" if mi is None else f"{mi:.4f}")
        return f"| {label} | " + " | ".join(cells) + " |"

    for method in METHODS:
        lines.append(row(method, results["methods"][method]))
    # Each recipe, and a calibrated recipe's heads before calibration too.
    hydras = {}
    for name, v in results["recipes"].items():
        hydras[name] = v
        if "uncalibrated" in v:
            hydras[f"{name} (uncalibrated)"] = v["uncalibrated"]
    for name, v in hydras.items():
        lines.append(row(f"hydra[{name}]", v["hydra"]))
    lines += ["", "Hydra recipes against the goals (means over seeds; ✓ met):", ""]
    first = next(iter(hydras.values()))["goals"]
    lines.append("| goal | target | " + " | ".join(hydras) + " |")
    lines.append("|" + "---|" * (2 + len(hydras)))
    for key in first:
        cells = [
            f"{v['goals'][key]['value']:.4f} {'✓' if v['goals'][key]['met'] else '✗'}"
            for v in hydras.values()
        ]
        lines.append(
            f"| {key} | {first[key]['target']:.4f} | " + " | ".join(cells) + " |"
        )
    lines.append("")
    lines.append(
        "Fidelity: "
        + "; ".join(
            f"{name}: mean KL to ensemble {v['fidelity']['mean_kl_to_ensemble']:.4f}"
            for name, v in hydras.items()
        )
    )
    spreads = [
        f"{name}: {v['spread']['mean']:.4f}"
        for name, v in results["recipes"].items()
        if "spread" in v
    ]
    if spreads:
        lines.append("")
        lines.append("Calibrated spread (mean over seeds): " + "; ".join(spreads))
    return "\n".join(lines) + "\n"


def run(
    out: str,
    config: ClassificationConfig | None = None,
    extra_ood: Sequence[str] = (),
) -> dict:
    """Runs the benchmark and writes `results.json`, `table.md` and plots.

    Args:
        out: output folder.
        config: a `ClassificationConfig` (`ClassificationConfig.quick()` for CI).
        extra_ood: `NAME=FILE.npz` specs of extra out-of-distribution sets.

    Returns:
        The results dict written to `out/results.json`.

    Raises:
        ValueError: on an unknown recipe or body, or a bad `--extra-ood` file.
    """
    config = config or ClassificationConfig()
    if not config.recipes:
        raise ValueError("The benchmark needs at least one recipe.")
    if config.body not in BODIES:
        raise ValueError(f"Unknown body {config.body!r}; choose from {BODIES}.")
    chosen = {name: config.recipe(name) for name in config.recipes}
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    seconds = {}
    load = {"start": list(os.getloadavg()), "cpus": os.cpu_count()}
    data = load_data(config, extra_ood)
    x, y, y_test = data["x_train"], data["y_train"], data["y_test"]

    def outputs_of(model):
        return {
            "test": _outputs(model, data["x_test"]),
            "ood": {name: _outputs(model, xo) for name, xo in data["ood"].items()},
        }

    tick = time.perf_counter()
    members = train_ensemble(x, y, config)
    ensemble = teacher.Ensemble(members, name="ensemble")
    seconds["ensemble"] = time.perf_counter() - tick
    tick = time.perf_counter()
    ens_out = outputs_of(ensemble)
    targets = teacher.predict(members, x, batch_size=2048)
    transfer_sets = {}  # recipes with the same transforms share their targets

    def transfer_set(recipe):
        key = json.dumps(recipe.get_config()["transforms"], sort_keys=True)
        if key not in transfer_sets:
            transfer_sets[key] = recipes.transfer_set(
                ensemble,
                x,
                recipe,
                targets=targets,
                image_shape=IMAGE_SHAPE,
                seed=config.seed + 7,
                batch_size=2048,
            )
        return transfer_sets[key]

    first = chosen[config.recipes[0]]
    kd_recipe = first.kd()
    transfer_set(first)
    seconds["teacher_targets"] = time.perf_counter() - tick
    member_params = members[0].count_params()
    print(f"ensemble: {seconds['ensemble']:.0f} s", flush=True)

    methods = {"ensemble": evaluate(ens_out, y_test, member_params * len(members))}
    single_out = [
        {
            "test": ens_out["test"][:, [s % config.members]],
            "ood": {k: v[:, [s % config.members]] for k, v in ens_out["ood"].items()},
        }
        for s in range(config.seeds)
    ]
    methods["single"] = mean_over_seeds(
        [evaluate(o, y_test, member_params) for o in single_out]
    )
    tick = time.perf_counter()
    kd_runs, kd_first = [], None
    for s in range(config.seeds):
        kd = train_student(
            members,
            transfer_set(kd_recipe),
            kd_recipe,
            config,
            config.seed + 1000 + s,
            name="kd",
        )
        kd_out = outputs_of(kd)
        kd_first = kd_first or kd_out
        kd_runs.append(evaluate(kd_out, y_test, kd.count_params()))
    methods["kd"] = mean_over_seeds(kd_runs)
    seconds["kd"] = time.perf_counter() - tick
    print(f"kd: {seconds['kd']:.0f} s", flush=True)

    results = {
        "config": asdict(config),
        "methods": methods,
        "fidelity": {},
        "recipes": {},
        "kd_recipe": kd_recipe.get_config(),
        "seconds": seconds,
        "load_average": load,
    }
    plot_outputs = None
    for name, recipe in chosen.items():
        tick = time.perf_counter()
        scored, uncalibrated, spreads = [], [], []

        def score_hydra(hydra):
            hydra_out = outputs_of(hydra)
            run = evaluate(hydra_out, y_test, hydra.count_params())
            return hydra_out, (run, fidelity(ens_out, hydra_out))

        for s in range(config.seeds):
            hydra = train_student(
                members, transfer_set(recipe), recipe, config, config.seed + 2000 + s
            )
            if recipe.calibrate_spread:
                spreads.append(float(keras.ops.convert_to_numpy(hydra.spread)))
                hydra.spread.assign(1.0)
                uncalibrated.append(score_hydra(hydra)[1])
                hydra.spread.assign(spreads[-1])
            hydra_out, result = score_hydra(hydra)
            scored.append(result)
            if s == 0 and plot_outputs is None:
                plot_outputs = hydra_out
        entry = {
            "recipe": recipe.get_config(),
            **summary(methods, scored),
            "seconds": time.perf_counter() - tick,
        }
        if spreads:
            entry["spread"] = {"mean": float(np.mean(spreads)), "per_seed": spreads}
            entry["uncalibrated"] = summary(methods, uncalibrated)
        results["recipes"][name] = entry
        if "hydra" not in methods:
            methods["hydra"] = entry["hydra"]
            results["fidelity"]["hydra"] = entry["fidelity"]
        met = sum(g["met"] for g in entry["goals"].values())
        print(
            f"hydra[{name}]: {entry['seconds']:.0f} s, goals met {met}/"
            f"{len(entry['goals'])}",
            flush=True,
        )
        if "plots" not in results:  # the first recipe's Hydra is plotted
            results["plots"] = plot(
                out,
                {
                    "ensemble": ens_out,
                    "hydra": plot_outputs,
                    "kd": kd_first,
                    "single": single_out[0],
                },
                y_test,
                config.recipes[0],
            )
        # Written after every recipe, so a long run leaves usable results.
        _write(out, results, table_too=True)

    seconds["total"] = time.perf_counter() - start
    load["end"] = list(os.getloadavg())
    _write(out, results, table_too=True)
    return results


def _write(out: str, results: dict, table_too: bool = False) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=_jsonable)
    if table_too:
        with open(os.path.join(out, "table.md"), "w") as f:
            f.write(table(results))


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Not JSON serializable: {type(value).__name__}")


def add_arguments(parser) -> None:
    """Registers the `keras-hydra benchmark classification` arguments."""
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--members", type=int, default=None, help="ensemble size")
    parser.add_argument(
        "--seeds", type=int, default=None, help="student seeds (default 3)"
    )
    parser.add_argument(
        "--body",
        default="mlp",
        choices=BODIES,
        help="members' and students' kind: MLPs or small CNNs (default mlp)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: data subsets, 3 members, 1 seed, 1 epoch per phase",
    )
    parser.add_argument(
        "--extra-ood",
        action="append",
        default=[],
        metavar="NAME=FILE.npz",
        help="extra OOD set: an .npz with `x`, uint8 [N, 28, 28] (repeatable)",
    )
    parser.add_argument(
        "--member-epochs",
        type=int,
        default=None,
        help="override the members' epochs",
    )
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="train on a random subset of this many Fashion-MNIST images",
    )
    parser.add_argument(
        "--student-filters",
        type=int,
        nargs="+",
        default=None,
        help="filters of the CNN students' blocks (default 16 32, as the members)",
    )
    parser.add_argument(
        "--student-head-conv",
        type=int,
        default=None,
        help="filters of a convolution starting each CNN student head, on the "
        "body's last feature map (default 0: heads on pooled features)",
    )
    parser.add_argument(
        "--student-dtype",
        default=None,
        choices=("mixed_bfloat16", "float32"),
        help="dtype policy of the Hydra and KD students (default mixed_bfloat16)",
    )
    parser.add_argument(
        "--recipe",
        action="append",
        default=None,
        choices=sorted(recipes.PRESETS),
        help="HydraRecipe preset (repeatable; default image_ood; the first is "
        "`hydra`, and the KD student follows its kd())",
    )


def main(args) -> None:
    """Runs the benchmark from parsed command-line arguments."""
    config = ClassificationConfig.quick() if args.quick else ClassificationConfig()
    overrides = {
        "members": args.members,
        "seeds": args.seeds,
        "body": args.body,
        "recipes": args.recipe,
        "member_epochs": args.member_epochs,
        "train_size": args.train_size,
        "student_dtype": args.student_dtype,
        "student_filters": args.student_filters and tuple(args.student_filters),
        "student_head_conv": args.student_head_conv,
    }
    config = dataclasses.replace(
        config, **{k: v for k, v in overrides.items() if v is not None}
    )
    results = run(args.out, config, args.extra_ood)
    print(table(results))
    print(f"total {results['seconds']['total']:.0f} s; written to {args.out}")
