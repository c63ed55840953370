"""UCI regression benchmark: deep ensemble vs Hydra vs KD student.

For each split: a deep ensemble of M Normal-output MLPs trained with NLL
(trained together as one model of M independent networks, which is the same
as training them one by one on the same batches), then, for each `--recipe`
(a `keras_hydra.HydraRecipe` preset, default `tabular_regression`), a Hydra
distilled from it with `keras_hydra.distill` and a single-head KD student
with `recipe.kd()`, on the body `RegressionConfig.student_bodies` gives the
recipe, all evaluated on the test split in the target's original units.

Tables of more than 2000 training rows train the members on batches of 128
for 40 epochs instead of 32 for 100, and run each recipe with
`RegressionConfig.large_table_changes` (batches of 128, 40 % of the epochs).
Measured results are in RESULTS.md at the top of the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field

import keras
import numpy as np
from scipy import stats

from keras_hydra import heads, losses, recipes, uncertainty
from keras_hydra.data import uci
from keras_hydra.evaluation import crps_normal_mixture
from keras_hydra.model import HydraModel

METHODS = ("ensemble", "hydra", "kd")
METRICS = ("rmse", "nll", "crps", "coverage_95")
LARGE_TABLE = 2000  # training rows above which the large-table schedule applies


@dataclass
class RegressionConfig:
    """Settings of the benchmark; the defaults are the reported ones.

    Args:
        members: int, the ensemble size M.
        member_hidden: int, units of each member's hidden layer.
        learning_rate: float, the members' Adam learning rate.
        recipes: names of `HydraRecipe` presets; the first fills the `hydra`
            and `kd` entries of `methods` in the results.
        student_bodies: recipe name -> hidden units of its students' body;
            other recipes get `(50, 50)`.
        recipe_changes: fields replaced in every recipe (for short runs).
        large_table_changes: fields replaced in every recipe on tables of
            more than 2000 training rows (`phase1_epochs` and
            `phase2_epochs` as fractions of the recipe's).
        seed: int, the seed of split `i` is `seed + i`.
        epochs: optional override of the members' epochs.
    """

    members: int = 5
    member_hidden: int = 50
    learning_rate: float = 3e-3
    recipes: tuple = ("tabular_regression",)
    student_bodies: dict = field(
        default_factory=lambda: {"tabular_regression": (400, 400)}
    )
    recipe_changes: dict = field(default_factory=dict)
    large_table_changes: dict = field(
        default_factory=lambda: {
            "batch_size": 128,
            "phase1_epochs": 0.4,
            "phase2_epochs": 0.4,
        }
    )
    seed: int = 0
    epochs: int | None = None

    def __post_init__(self):
        unknown = [r for r in self.recipes if r not in recipes.PRESETS]
        if unknown or not self.recipes:
            raise ValueError(
                f"Unknown recipe(s) {unknown or list(self.recipes)}; "
                f"choose from {sorted(recipes.PRESETS)}."
            )

    def schedule(self, num_train: int) -> tuple[int, int]:
        """(batch size, member epochs) for a training set of `num_train` rows."""
        if num_train <= LARGE_TABLE:
            return 32, self.epochs or 100
        return 128, self.epochs or 40

    def recipe(self, name: str, num_train: int) -> recipes.HydraRecipe:
        """The preset `name` as run on a table of `num_train` rows."""
        recipe = recipes.HydraRecipe.get(name).replace(**self.recipe_changes)
        if num_train <= LARGE_TABLE:
            return recipe
        changes = dict(self.large_table_changes)
        for phase in ("phase1_epochs", "phase2_epochs"):
            if phase in changes:
                changes[phase] = max(1, round(getattr(recipe, phase) * changes[phase]))
        return recipe.replace(**changes)


def _normal_heads(hidden=()):
    return heads.Distribution("Normal", hidden_units=hidden, levels=(0.95,))


def _mlp(units, name):
    return keras.Sequential(
        [keras.layers.Dense(u, activation="relu") for u in units], name=name
    )


# Many small steps per compiled call: Keras' per-step overhead dominates MLPs
# this small.
_STEPS_PER_EXECUTION = 64


def _evaluate(params: np.ndarray, split: uci.UCISplit) -> dict:
    """Metrics of `[N, S, 2]` standardised Normal parameters, original units."""
    u = uncertainty.regression(params, "Normal", levels=(0.95,))
    y = split.to_original(split.y_test[:, 0])
    loc = split.to_original(params[..., 0])
    scale = params[..., 1] * split.y_std
    density = stats.norm.pdf(y[:, None], loc, scale).mean(axis=1)
    mean = split.to_original(np.asarray(u["mean"])[:, 0])
    lower = split.to_original(np.asarray(u["lower_95"])[:, 0])
    upper = split.to_original(np.asarray(u["upper_95"])[:, 0])
    epistemic = np.asarray(u["epistemic_variance"])[:, 0]
    return {
        "rmse": float(np.sqrt(np.mean((mean - y) ** 2))),
        "nll": float(-np.mean(np.log(np.maximum(density, 1e-300)))),
        "crps": float(np.mean(crps_normal_mixture(y, loc, scale))),
        "coverage_95": float(np.mean((y >= lower) & (y <= upper))),
        "epistemic_share": float(np.mean(epistemic / np.asarray(u["variance"])[:, 0])),
    }


def run_split(root: str, split_index: int, config: RegressionConfig) -> dict:
    """Trains the ensemble and each recipe's students on one split.

    Returns `{"ensemble": metrics, "<recipe>": {"hydra": ..., "kd": ...}}`.
    """
    seed = config.seed + split_index
    keras.utils.set_random_seed(seed)
    split = uci.load(root, split_index)
    x, y = split.x_train, split.y_train
    batch_size, epochs = config.schedule(len(x))
    ensemble = HydraModel(
        keras.layers.Identity(),
        _normal_heads((config.member_hidden,)),
        num_heads=config.members,
        name="ensemble",
    )
    ensemble.compile(
        keras.optimizers.Adam(config.learning_rate),
        losses.DistributionNLL("Normal", mixture=False),
        steps_per_execution=_STEPS_PER_EXECUTION,
    )
    ensemble.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0)
    results = {"ensemble": _evaluate(ensemble.predict(split.x_test, verbose=0), split)}
    targets = ensemble.predict(x, batch_size=1024, verbose=0)
    for name in config.recipes:
        recipe = config.recipe(name, len(x))
        body = config.student_bodies.get(name, (50, 50))
        # Both students see the same transfer set, as `distill` makes it.
        transfer = recipes.transfer_set(
            ensemble, x, recipe, targets=targets, seed=seed, batch_size=1024
        )
        results[name] = {
            method: _evaluate(
                recipes.distill(
                    ensemble,
                    _mlp(body, "body"),
                    _normal_heads(),
                    x,
                    student_recipe,
                    transfer_data=transfer,
                    seed=seed,
                    verbose=0,
                    name=method,
                ).predict(split.x_test, verbose=0),
                split,
            )
            for method, student_recipe in [("hydra", recipe), ("kd", recipe.kd())]
        }
    return results


def summarize(per_split: list[dict]) -> dict:
    """Mean and standard error over splits of each metric of one method."""
    summary = {}
    for metric in (*METRICS, "epistemic_share"):
        values = np.array([s[metric] for s in per_split])
        stderr = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
        summary[metric] = {
            "mean": float(values.mean()),
            "stderr": float(stderr),
            "per_split": values.tolist(),
        }
    return summary


def _dataset_entry(per_split: list[dict], names) -> dict:
    """`methods` (ensemble and the first recipe's students) and `recipes`."""
    students = {
        r: {m: summarize([s[r][m] for s in per_split]) for m in ("hydra", "kd")}
        for r in names
    }
    ensemble = summarize([s["ensemble"] for s in per_split])
    return {
        "methods": {"ensemble": ensemble, **students[names[0]]},
        "recipes": students,
    }


def table(results: dict) -> str:
    """Markdown table of the mean ± standard error of every metric.

    Students are labelled with their recipe, e.g. `hydra (paper)`.
    """
    lines = [
        "| dataset | method | RMSE | NLL | CRPS | 95% coverage | epistemic share |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["datasets"].items():
        rows = [("ensemble", entry["methods"]["ensemble"])]
        for recipe, students in entry["recipes"].items():
            rows += [(f"{m} ({recipe})", students[m]) for m in ("hydra", "kd")]
        for label, metrics in rows:
            cells = [
                f"{metrics[m]['mean']:.3f} ± {metrics[m]['stderr']:.3f}"
                for m in (*METRICS, "epistemic_share")
            ]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cached_split(
    out: str, dataset: str, root: str, index: int, config: RegressionConfig
) -> dict:
    """`run_split`'s result, saved in `out/splits/` and reused when there.

    A saved split is reused only if it was run with an equal `config`;
    otherwise it is run again and overwritten.
    """
    path = os.path.join(out, "splits", dataset, f"{index}.json")
    settings = json.loads(json.dumps(asdict(config)))
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["config"] == settings:
            return saved["result"]
    result = run_split(root, index, config)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"config": settings, "result": result}, f)
    os.replace(path + ".tmp", path)  # a killed run leaves no partial file
    return result


def run(
    data_dir: str,
    datasets: list[str],
    out: str,
    splits: int | None = None,
    config: RegressionConfig | None = None,
    split_range: tuple[int, int] | None = None,
) -> dict | None:
    """Runs the benchmark and writes `out/results.json` and `out/table.md`.

    Each split's result is saved under `out/splits/` as it finishes, so the
    same call again (say, after a crash) runs only the missing splits. To
    spread one benchmark over several processes, give each a `split_range`
    and the same `out`, then run once more without one to write the results.
    A set's `seconds` counts only the time spent in this call.

    Args:
        data_dir: folder holding one sub-folder per UCI set.
        datasets: names of the sub-folders to run.
        out: output folder.
        splits: number of splits per set (default: all of them).
        config: a `RegressionConfig`.
        split_range: optional `(start, stop)`: run and save only splits
            `start` to `stop - 1` (of those `splits` selects) and write no
            results.

    Returns:
        The results dict written to `results.json`, or `None` with
        `split_range`.
    """
    config = config or RegressionConfig()
    if split_range is not None and not 0 <= split_range[0] < split_range[1]:
        raise ValueError(
            f"`split_range` must be (start, stop) with 0 <= start < stop. "
            f"Received: {split_range}"
        )
    roots = {name: os.path.join(data_dir, name) for name in datasets}
    for root in roots.values():
        uci.load(root, 0)  # fail on a bad folder before any training
    os.makedirs(out, exist_ok=True)
    results = {"config": asdict(config), "datasets": {}}
    for name, root in roots.items():
        count = (
            uci.num_splits(root)
            if splits is None
            else min(splits, uci.num_splits(root))
        )
        start = time.perf_counter()
        if split_range is not None:
            for i in range(split_range[0], min(split_range[1], count)):
                cached_split(out, name, root, i, config)
            continue
        per_split = [cached_split(out, name, root, i, config) for i in range(count)]
        results["datasets"][name] = {
            "splits": count,
            "seconds": time.perf_counter() - start,
            **_dataset_entry(per_split, config.recipes),
        }
        print(
            f"{name}: {count} splits in {time.perf_counter() - start:.0f} s", flush=True
        )
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    if split_range is not None:
        return None
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table(results) + "\n")
    return results


def add_arguments(parser) -> None:
    """Registers the `keras-hydra benchmark regression` arguments."""
    parser.add_argument("--data-dir", required=True, help="folder of UCI sets")
    parser.add_argument(
        "--dataset",
        action="append",
        required=True,
        help="a sub-folder of --data-dir (repeatable), or 'all'",
    )
    parser.add_argument("--splits", type=int, default=None, help="splits per set")
    parser.add_argument("--members", type=int, default=5, help="ensemble size")
    parser.add_argument(
        "--recipe",
        action="append",
        choices=sorted(recipes.PRESETS),
        help="HydraRecipe preset (repeatable; default: tabular_regression); the "
        "first fills methods.hydra and methods.kd",
    )
    parser.add_argument(
        "--split-range",
        type=_split_range,
        default=None,
        metavar="START:STOP",
        help="run and save only these splits, to spread a run over processes; "
        "then run again without it to write the results",
    )
    parser.add_argument("--out", required=True, help="output folder")


def _split_range(text: str) -> tuple[int, int]:
    start, _, stop = text.partition(":")
    try:
        return int(start), int(stop)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START:STOP, e.g. 0:10; received {text!r}"
        ) from None


def main(args) -> None:
    """Runs the benchmark from parsed command-line arguments."""
    datasets = args.dataset
    if datasets == ["all"]:
        datasets = sorted(
            d
            for d in os.listdir(args.data_dir)
            if os.path.isdir(os.path.join(args.data_dir, d))
        )
    names = tuple(args.recipe or ("tabular_regression",))
    config = RegressionConfig(members=args.members, recipes=names)
    results = run(
        args.data_dir, datasets, args.out, args.splits, config, args.split_range
    )
    if results is not None:
        print(table(results))
