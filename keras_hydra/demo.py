"""`keras-hydra demo`: distil a small ensemble on scikit-learn's digits."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from keras_hydra import heads, losses, teacher, uncertainty
from keras_hydra.callbacks import PhaseProgbar
from keras_hydra.data import load_digits_ood
from keras_hydra.evaluation import ood_auroc
from keras_hydra.model import HydraModel


@dataclass
class DemoConfig:
    """Settings of the demo; `quick()` gives a seconds-long smoke run."""

    members: int = 5
    hidden: int = 64
    member_epochs: int = 60
    phase1_epochs: int = 30
    phase2_epochs: int = 60
    temperature: float = 2.0
    batch_size: int = 64
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(members=3, member_epochs=5, phase1_epochs=2, phase2_epochs=3)


def _body(hidden: int) -> keras.Sequential:
    return keras.Sequential(
        [
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(hidden, activation="relu"),
        ],
        name="body",
    )


def _fit(model, x, y, epochs, label, config):
    model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=config.batch_size,
        verbose=0,
        callbacks=[PhaseProgbar(label, epochs)],
    )


def _row(name, outputs, y_test, ood_outputs, params):
    """Metrics of `[N, M, K]` logits; MI only where there are several heads."""
    u_in = uncertainty.categorical(outputs)
    u_out = uncertainty.categorical(ood_outputs)
    probs = np.asarray(u_in["probabilities"])
    nll = -np.mean(np.log(np.maximum(probs[np.arange(len(y_test)), y_test], 1e-12)))
    row = {
        "method": name,
        "accuracy": float(np.mean(np.argmax(probs, -1) == y_test)),
        "nll": float(nll),
        "auroc_entropy": ood_auroc(
            u_in["total_uncertainty"], u_out["total_uncertainty"]
        )["auroc"],
        "auroc_mi": None,
        "params": int(params),
    }
    if outputs.shape[1] > 1:
        row["auroc_mi"] = ood_auroc(
            u_in["epistemic_uncertainty"], u_out["epistemic_uncertainty"]
        )["auroc"]
    return row


def run(config: DemoConfig | None = None) -> list[dict]:
    """Trains an ensemble, a Hydra and a KD student; returns one row each."""
    config = config or DemoConfig()
    keras.utils.set_random_seed(config.seed)
    data = load_digits_ood()
    x, y = data["x_train"], data["y_train"]
    num_classes = int(y.max()) + 1

    members = []
    for m in range(config.members):
        member = keras.Sequential(
            [*_body(config.hidden).layers, keras.layers.Dense(num_classes)],
            name=f"member_{m}",
        )
        member.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        _fit(
            member,
            x,
            y,
            config.member_epochs,
            f"member {m + 1}/{config.members}",
            config,
        )
        members.append(member)
    targets = teacher.predict(members, x)

    loss = losses.HydraKL(temperature=config.temperature)
    hydra = HydraModel(_body(config.hidden), heads.Categorical(num_classes))
    hydra.compile(optimizer="adam", loss=loss)
    _fit(hydra, x, targets, config.phase1_epochs, "hydra phase 1 (1 head)", config)
    hydra.add_heads(config.members)
    _fit(
        hydra,
        x,
        targets,
        config.phase2_epochs,
        f"hydra phase 2 ({config.members} heads)",
        config,
    )

    kd = HydraModel(_body(config.hidden), heads.Categorical(num_classes))
    kd.compile(optimizer="adam", loss=losses.HydraKL(temperature=config.temperature))
    _fit(
        kd,
        x,
        targets,
        config.phase1_epochs + config.phase2_epochs,
        "kd student",
        config,
    )

    ensemble = teacher.Ensemble(members)
    x_test, y_test, x_ood = data["x_test"], data["y_test"], data["x_ood"]
    return [
        _row(
            name,
            model.predict(x_test, verbose=0),
            y_test,
            model.predict(x_ood, verbose=0),
            params,
        )
        for name, model, params in [
            ("ensemble", ensemble, sum(m.count_params() for m in members)),
            ("hydra", hydra, hydra.count_params()),
            ("kd", kd, kd.count_params()),
        ]
    ]


def format_table(rows: list[dict]) -> str:
    """Renders the demo's rows as a markdown table."""

    def fmt(value):
        return "-" if value is None else f"{value:.3f}"

    lines = [
        "| method | accuracy | NLL | OOD AUROC (MI) | OOD AUROC (entropy) | params |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {fmt(r['accuracy'])} | {fmt(r['nll'])} | "
            f"{fmt(r['auroc_mi'])} | {fmt(r['auroc_entropy'])} | {r['params']:,} |"
        )
    return "\n".join(lines)
