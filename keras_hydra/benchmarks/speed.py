"""Speed benchmark: a Hydra vs an ensemble of M models, heads batched vs looped.

For each head count M, on a Fashion-MNIST-sized MLP (784-512-512 body, 10
classes) fed synthetic inputs, in one process:

- inference throughput (examples/s) of a Hydra with M heads and of an
  ensemble of M separate models with the same body and head
  (`keras_hydra.teacher.Ensemble`, all members in one compiled call), and the
  theoretical FLOP ratio `M (body + head) / (body + M head)`; and the
  throughput of the body alone, which bounds what any heads can reach: on
  several cores an ensemble's independent members run side by side, each on
  its own core, while a Hydra's one chain of matrix products must split
  every product across cores, which scales less (`speedup_over_flop_bound`);
- the train-step time of the Hydra (M heads, `HydraKL` on cached targets)
  and of a single model (the same with one head), beside the ratio of their
  FLOPs, `(body + M head) / (body + head)`, and of a plain Keras model with
  the same FLOPs and loss, whose one `Dense(M * 10)` layer holds all heads:
  the bound for any implementation of the heads (`step_ratio_bound`); and
  the cost of the bad-data check (`check_cost`): the Hydra's step with its
  check (and the batch hook of `fit`'s `DataGuard` callback) against the
  same model's step with `check_finite=False` (both traced before timing),
  as the median of the two's ratio over `check_repeats` back-to-back pairs
  (their order alternating), with the quartiles of that ratio
  (`check_cost_low`, `check_cost_high`) to show how finely the machine's
  noise lets it resolve;
- forward + backward time of the heads alone, body excluded: `HydraHeads`
  against a Python loop of M Dense heads (traced into one graph), for linear
  heads and for heads with one 128-unit hidden layer;
- parameter counts;
- peak TensorFlow memory of one distillation epoch (M heads, targets
  `[N, M, 10]`) and of a single-model epoch (targets `[N, 1, 10]`), and of
  the distillation epoch with float16 numpy targets (`teacher.predict(...,
  dtype="float16")`), which `fit` casts back to float32.

Timings are medians over repeats after warm-up, the compared calls taking
turns, of `tf.function`-compiled calls (the train step is Keras's own
compiled `train_function`). Memory is the growth of the peak resident set
size (`VmHWM`) of a fresh process per measurement, from just after
TensorFlow starts to the end of one `fit` epoch. tracemalloc sees none of
TensorFlow's memory, and `tf.config.experimental.get_memory_info("CPU:0")`
reports 0 during `fit` on this CPU build (it only counts some allocations),
so neither is used.

`--threads N` runs everything on N threads (TensorFlow's intra- and
inter-op pools), `--threads 1` compares the models at equal parallelism.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import keras
import numpy as np
import tensorflow as tf

from keras_hydra import guard, heads, losses
from keras_hydra.layers import HydraHeads
from keras_hydra.model import HydraModel
from keras_hydra.teacher import Ensemble

KEYS = (
    "hydra_throughput",
    "ensemble_throughput",
    "body_throughput",
    "flop_ratio",
    "step_flop_ratio",
    "hydra_step_s",
    "checked_step_s",
    "unchecked_step_s",
    "check_cost",
    "check_cost_low",
    "check_cost_high",
    "single_step_s",
    "dense_step_s",
    "loop_heads_step_s",
    "vectorized_heads_step_s",
    "loop_heads_hidden_step_s",
    "vectorized_heads_hidden_step_s",
    "dense_heads_step_s",
    "dense_heads_hidden_step_s",
    "hydra_params",
    "ensemble_params",
    "hydra_peak_mb",
    "hydra_peak_f16_mb",
    "single_peak_mb",
)
RATIOS = (
    "inference_speedup",
    "speedup_over_flop_ratio",
    "speedup_over_flop_bound",
    "step_ratio",
    "step_ratio_bound",
    "heads_speedup",
    "heads_hidden_speedup",
    "heads_speedup_bound",
    "heads_hidden_speedup_bound",
    "memory_ratio",
    "memory_ratio_f16",
)


@dataclass
class SpeedConfig:
    """Sizes of the benchmark; the defaults are the reported ones.

    Example:

    >>> SpeedConfig.quick().num_heads
    (1, 5)
    """

    num_heads: Sequence[int] = (1, 5, 10, 50)
    input_dim: int = 784
    body: Sequence[int] = (512, 512)
    num_classes: int = 10
    head_hidden: int = 128
    inference_batch: int = 1024
    train_batch: int = 256
    memory_examples: int = 8192
    memory_repeats: int = 3
    warmup: int = 3
    repeats: int = 7
    calls_per_repeat: int = 5
    check_repeats: int = 101
    jit_compile: bool = False
    threads: int | None = None
    seed: int = 0

    @classmethod
    def quick(cls) -> SpeedConfig:
        """Tiny sizes and M in {1, 5}: a seconds-long smoke run."""
        return cls(
            num_heads=(1, 5),
            input_dim=32,
            body=(64, 64),
            head_hidden=16,
            inference_batch=128,
            train_batch=64,
            memory_examples=512,
            memory_repeats=1,
            warmup=1,
            repeats=3,
            calls_per_repeat=2,
            check_repeats=5,
        )


def repeat_times(
    functions: dict[str, Callable[[], object]], warmup: int, repeats: int, calls: int
) -> dict[str, list[float]]:
    """Per function, the mean seconds of `calls` calls, `repeats` times.

    The functions take turns, one repeat each, in an order reversed every
    other repeat, so that a drift in the machine's speed (other load, clock
    changes) reaches all of them alike and cancels in their ratios. Each
    call's result is fetched to numpy so that asynchronous work is counted.

    Example:

    >>> times = repeat_times({"a": lambda: None}, warmup=1, repeats=3, calls=2)
    >>> len(times["a"])
    3
    """
    for function in functions.values():
        for _ in range(warmup):
            _fetch(function())
    times = {name: [] for name in functions}
    names = list(functions)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            start = time.perf_counter()
            for _ in range(calls):
                _fetch(functions[name]())
            times[name].append((time.perf_counter() - start) / calls)
    return times


def median_times(
    functions: dict[str, Callable[[], object]], warmup: int, repeats: int, calls: int
) -> dict[str, float]:
    """Median over `repeats` of the mean seconds of `calls` calls, per function.

    Example:

    >>> times = median_times({"a": lambda: None}, warmup=1, repeats=3, calls=2)
    >>> times["a"] >= 0.0
    True
    """
    times = repeat_times(functions, warmup, repeats, calls)
    return {name: statistics.median(t) for name, t in times.items()}


def _fetch(result) -> None:
    for value in tf.nest.flatten(result):
        if hasattr(value, "numpy"):
            value.numpy()


def flops(config: SpeedConfig, hidden: bool = False) -> tuple[int, int]:
    """Multiply-adds of one example in the body and in one head.

    Example:

    >>> flops(SpeedConfig())
    (663552, 5120)
    """
    sizes = [config.input_dim, *config.body]
    body = sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    features = sizes[-1]
    if hidden:
        head = features * config.head_hidden + config.head_hidden * config.num_classes
    else:
        head = features * config.num_classes
    return body, head


def flop_ratio(config: SpeedConfig, num_heads: int, hidden: bool = False) -> float:
    """`M (body + head) / (body + M head)`, in multiply-adds of one example.

    Example:

    >>> round(flop_ratio(SpeedConfig(), 10), 2)
    9.36
    """
    body, head = flops(config, hidden)
    return num_heads * (body + head) / (body + num_heads * head)


def _body(config: SpeedConfig, name: str = "body") -> keras.Sequential:
    return keras.Sequential(
        [keras.layers.Dense(u, activation="relu") for u in config.body], name=name
    )


def _compile(model: keras.Model, config: SpeedConfig) -> None:
    model.compile(
        optimizer="adam",
        loss=losses.HydraKL(temperature=2.0),
        jit_compile=config.jit_compile,
    )


def _hydra(config: SpeedConfig, num_heads: int) -> HydraModel:
    model = HydraModel(
        _body(config), heads.Categorical(config.num_classes), num_heads=num_heads
    )
    _compile(model, config)
    model.build((None, config.input_dim))
    return model


def _dense(config: SpeedConfig, num_heads: int) -> keras.Model:
    """The Hydra's FLOPs and loss as a plain model: all heads in one `Dense`."""
    inputs = keras.Input((config.input_dim,))
    outputs = keras.layers.Dense(num_heads * config.num_classes)(_body(config)(inputs))
    outputs = keras.layers.Reshape((num_heads, config.num_classes))(outputs)
    model = keras.Model(inputs, outputs)
    _compile(model, config)
    return model


def _ensemble(config: SpeedConfig, num_members: int) -> Ensemble:
    members = [
        keras.Sequential(
            [*_body(config, f"body{m}").layers, keras.layers.Dense(config.num_classes)],
            name=f"member{m}",
        )
        for m in range(num_members)
    ]
    ensemble = Ensemble(members)
    ensemble(np.zeros((1, config.input_dim), "float32"))  # build every member
    return ensemble


def _forward(model, config: SpeedConfig) -> Callable:
    function = tf.function(
        lambda x: model(x, training=False), jit_compile=config.jit_compile
    )
    return function


def inference(config: SpeedConfig, num_heads: int, rng) -> dict:
    """Throughputs and parameter counts of a Hydra, an ensemble and a body."""
    x = tf.constant(
        rng.normal(size=(config.inference_batch, config.input_dim)), "float32"
    )
    hydra = _hydra(config, num_heads)
    ensemble = _ensemble(config, num_heads)
    body = _body(config)
    body.build((None, config.input_dim))
    models = {"hydra": hydra, "ensemble": ensemble, "body": body}
    forwards = {
        name: functools.partial(_forward(model, config), x)
        for name, model in models.items()
    }
    times = median_times(
        forwards, config.warmup, config.repeats, config.calls_per_repeat
    )
    results = {
        f"{name}_throughput": config.inference_batch / times[name] for name in times
    }
    results["hydra_params"] = int(hydra.count_params())
    results["ensemble_params"] = int(ensemble.count_params())
    return results


def _train_function(model: keras.Model, x, targets) -> Callable:
    """Keras's compiled train step, fed the same batch from a repeated dataset."""
    iterator = iter(tf.data.Dataset.from_tensors((x, targets)).repeat())
    model.make_train_function(force=True)
    train_function = model.train_function
    return lambda: train_function(iterator)


def train_steps(config: SpeedConfig, num_heads: int, rng) -> dict:
    """Seconds per train step of the Hydra, a single-head model and `_dense`."""
    x, targets = _batch(config, num_heads, rng)
    steps = {
        "hydra_step_s": _train_function(_hydra(config, num_heads), x, targets),
        "single_step_s": _train_function(_hydra(config, 1), x, targets[:, :1]),
        "dense_step_s": _train_function(_dense(config, num_heads), x, targets),
    }
    return median_times(steps, config.warmup, config.repeats, config.calls_per_repeat)


def check_steps(model: HydraModel, x, targets) -> dict[str, Callable]:
    """`model`'s compiled train step with its bad-data check and without.

    Both steps update the same variables (separate instances differ in speed
    by up to a few percent on their own). Each is traced here, as soon as it
    is made: `train_step` reads `check_finite` when it is traced, so a step
    first called after the flag is flipped would not have the check.
    """
    previous = model.check_finite
    steps = {}
    for name, check in [("checked", True), ("unchecked", False)]:
        model.check_finite = check
        steps[name] = _train_function(model, x, targets)
        steps[name]()
    model.check_finite = previous
    return steps


def check_cost(config: SpeedConfig, num_heads: int, rng) -> dict:
    """The Hydra's step with its bad-data check against the step without.

    The checked step is what `fit` runs per batch: the compiled step and
    `DataGuard.on_train_batch_end`, which reads the guard's record every
    `DataGuard.every` batches.
    """
    x, targets = _batch(config, num_heads, rng)
    model = _hydra(config, num_heads)
    compiled = check_steps(model, x, targets)
    callback = guard.DataGuard(model._record)

    def checked_step():
        logs = compiled["checked"]()
        callback.on_train_batch_end(0)
        return logs

    steps = {"checked_step_s": checked_step, "unchecked_step_s": compiled["unchecked"]}
    times = repeat_times(
        steps, config.warmup, config.check_repeats, config.calls_per_repeat
    )
    cost = np.divide(times["checked_step_s"], times["unchecked_step_s"])
    low, median, high = np.percentile(cost, [25, 50, 75])
    results = {name: statistics.median(t) for name, t in times.items()}
    results.update(check_cost=median, check_cost_low=low, check_cost_high=high)
    return results


def _batch(config: SpeedConfig, num_heads: int, rng) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(config.train_batch, config.input_dim)).astype("float32")
    targets = rng.normal(size=(config.train_batch, num_heads, config.num_classes))
    return x, targets.astype("float32")


class _LoopHeads(keras.layers.Layer):
    """M separate Dense heads (optionally with a hidden layer), in a loop."""

    def __init__(self, num_heads: int, units: int, hidden: int | None, **kwargs):
        super().__init__(**kwargs)
        self.heads = []
        for _ in range(num_heads):
            layers = [keras.layers.Dense(hidden, activation="relu")] if hidden else []
            self.heads.append(keras.Sequential([*layers, keras.layers.Dense(units)]))

    def call(self, features):
        return keras.ops.stack([head(features) for head in self.heads], axis=1)


def heads_steps(config: SpeedConfig, num_heads: int, rng) -> dict:
    """Forward + backward seconds of the heads alone, batched vs looped.

    `dense` is the bound no batching of the heads can beat: one `Dense`
    layer with all heads' outputs side by side (the linear heads' FLOPs, no
    per-head work) and, for hidden heads, the same for their first layer
    alone. `loop / dense` is the largest speed-up a vectorization can reach.
    """
    features = tf.constant(
        rng.normal(size=(config.train_batch, config.body[-1])), "float32"
    )
    results = {}
    for suffix, hidden in [("", None), ("_hidden", config.head_hidden)]:
        layers = {
            "loop": _LoopHeads(num_heads, config.num_classes, hidden, name="loop"),
            "vectorized": HydraHeads(
                num_heads, config.num_classes, hidden_units=(hidden,) if hidden else ()
            ),
            "dense": keras.layers.Dense(
                num_heads * (hidden or config.num_classes),
                activation="relu" if hidden else None,
            ),
        }
        steps = {}
        for name, layer in layers.items():
            layer(features)  # build

            def step(layer=layer):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.square(layer(features)))
                return tape.gradient(loss, layer.trainable_variables)

            steps[f"{name}_heads{suffix}_step_s"] = tf.function(
                step, jit_compile=config.jit_compile
            )
        results.update(
            median_times(steps, config.warmup, config.repeats, config.calls_per_repeat)
        )
    return results


def peak_memory_mb(
    config: SpeedConfig, num_heads: int, targets_dtype: str = "float32"
) -> float:
    """Peak memory (MiB) of one training epoch with `num_heads` heads.

    Measured in a fresh Python process: the growth of its peak resident set
    size (`VmHWM`) from just after TensorFlow starts to the end of the
    epoch. That covers the inputs and the targets `[N, num_heads, K]` (with
    one head, a single model trained on the ensemble's mean; with M heads,
    the Hydra's distillation), stored as `targets_dtype`, the model, the
    optimizer, tracing and the epoch's activations and gradients. RSS varies
    between identical runs (allocator arenas, thread pools: 147 to 176 MiB
    here for the same M = 50 run, once 455), so this is the median of
    `config.memory_repeats` runs.
    """
    code = (
        "import json, sys; from keras_hydra.benchmarks import speed; "
        "print(json.dumps(speed._memory_child(sys.argv[1], int(sys.argv[2]), "
        "sys.argv[3])))"
    )
    config_json = json.dumps(asdict(config))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    peaks = []
    for _ in range(config.memory_repeats):
        result = subprocess.run(
            [sys.executable, "-c", code, config_json, str(num_heads), targets_dtype],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"The memory measurement failed:\n{result.stderr[-2000:]}"
            )
        peaks.append(json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"])
    return statistics.median(peaks)


def _rss_mb(field: str) -> float:
    """`VmRSS` (current) or `VmHWM` (peak) of this process, in MiB.

    Not `ru_maxrss`: Linux carries it over `fork` + `exec`, so a child of a
    large process reports its parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"No {field} in /proc/self/status.")


def _memory_child(config_json: str, num_heads: int, targets_dtype: str) -> dict:
    """The measurement of `peak_memory_mb`, run inside the fresh process."""
    config = SpeedConfig(**json.loads(config_json))
    if config.threads:
        set_threads(config.threads)
    tf.constant(0.0).numpy()  # start the runtime before the baseline
    baseline = _rss_mb("VmRSS")
    rng = np.random.default_rng(config.seed)
    n = config.memory_examples
    # Drawn in float32: a freed float64 draw of targets [N, 50, 10] (31 MiB)
    # raises glibc's dynamic mmap threshold, after which fit's buffers come
    # from the heap and the peak grows by a fifth; that is the draw's cost.
    x = rng.standard_normal((n, config.input_dim), dtype="float32")
    targets = rng.standard_normal((n, num_heads, config.num_classes), "float32")
    targets = targets.astype(targets_dtype, copy=False)
    model = _hydra(config, num_heads)
    model.fit(x, targets, batch_size=config.train_batch, epochs=1, verbose=0)
    return {"peak_mb": _rss_mb("VmHWM") - baseline, "baseline_mb": baseline}


def run(config: SpeedConfig, out: str | None = None) -> dict:
    """Runs every measurement; writes `out/results.json` when `out` is given.

    Returns:
        `{"config": ..., "load_average": ..., "per_m": {M: {key: value}}}`,
        the keys of `KEYS` and `RATIOS` for each M.
    """
    if config.threads:
        set_threads(config.threads)
    load_before = list(os.getloadavg())
    keras.utils.set_random_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    single_peak = peak_memory_mb(config, 1)
    body, head = flops(config)
    per_m = {}
    for num_heads in config.num_heads:
        row = {
            "flop_ratio": flop_ratio(config, num_heads),
            "step_flop_ratio": (body + num_heads * head) / (body + head),
        }
        row.update(inference(config, num_heads, rng))
        row.update(train_steps(config, num_heads, rng))
        row.update(check_cost(config, num_heads, rng))
        row.update(heads_steps(config, num_heads, rng))
        row["hydra_peak_mb"] = peak_memory_mb(config, num_heads)
        row["hydra_peak_f16_mb"] = peak_memory_mb(config, num_heads, "float16")
        row["single_peak_mb"] = single_peak
        row.update(ratios(row, num_heads, body / (body + head)))
        per_m[str(num_heads)] = row
        keras.backend.clear_session()
    results = {
        "config": asdict(config),
        "load_average_before": load_before,
        "load_average": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "per_m": per_m,
    }
    if out is not None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


def set_threads(threads: int) -> None:
    """Sizes TensorFlow's intra- and inter-op thread pools.

    Raises:
        RuntimeError: if TensorFlow has already run an op in this process.
    """
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as error:
        raise RuntimeError(
            f"Cannot run the speed benchmark on {threads} thread(s): TensorFlow "
            "has already started in this process. Pass `threads` to a fresh "
            "process (`keras-hydra benchmark speed --threads N`)."
        ) from error


def ratios(row: dict, num_heads: int = 1, body_share: float = 1.0) -> dict:
    """The derived ratios of one row of measurements.

    `speedup_over_flop_bound` is `speedup_over_flop_ratio` for a Hydra whose
    heads cost their share of FLOPs at the body's measured speed: what
    perfect heads would reach against this ensemble. It needs `num_heads`
    and `body_share`, the body's share of one member's FLOPs.

    Example:

    >>> row = dict(hydra_throughput=90.0, ensemble_throughput=10.0,
    ...            body_throughput=95.0,
    ...            flop_ratio=10.0, hydra_step_s=1.1, single_step_s=1.0,
    ...            dense_step_s=1.05,
    ...            loop_heads_step_s=4.0, vectorized_heads_step_s=1.0,
    ...            loop_heads_hidden_step_s=3.0, vectorized_heads_hidden_step_s=1.0,
    ...            dense_heads_step_s=0.5, dense_heads_hidden_step_s=1.5,
    ...            hydra_peak_mb=3.0, hydra_peak_f16_mb=2.5, single_peak_mb=2.0)
    >>> {k: round(v, 2) for k, v in ratios(row, num_heads=10).items()}
    {'inference_speedup': 9.0, 'speedup_over_flop_ratio': 0.9,
     'speedup_over_flop_bound': 0.95, 'step_ratio': 1.1,
     'step_ratio_bound': 1.05, 'heads_speedup': 4.0,
     'heads_hidden_speedup': 3.0, 'heads_speedup_bound': 8.0,
     'heads_hidden_speedup_bound': 2.0, 'memory_ratio': 1.5,
     'memory_ratio_f16': 1.25}
    """
    speedup = row["hydra_throughput"] / row["ensemble_throughput"]
    return {
        "inference_speedup": speedup,
        "speedup_over_flop_ratio": speedup / row["flop_ratio"],
        "speedup_over_flop_bound": row["body_throughput"]
        * body_share
        / (num_heads * row["ensemble_throughput"]),
        "step_ratio": row["hydra_step_s"] / row["single_step_s"],
        "step_ratio_bound": row["dense_step_s"] / row["single_step_s"],
        "heads_speedup": row["loop_heads_step_s"] / row["vectorized_heads_step_s"],
        "heads_hidden_speedup": row["loop_heads_hidden_step_s"]
        / row["vectorized_heads_hidden_step_s"],
        "heads_speedup_bound": row["loop_heads_step_s"] / row["dense_heads_step_s"],
        "heads_hidden_speedup_bound": row["loop_heads_hidden_step_s"]
        / row["dense_heads_hidden_step_s"],
        "memory_ratio": row["hydra_peak_mb"] / row["single_peak_mb"],
        "memory_ratio_f16": row["hydra_peak_f16_mb"] / row["single_peak_mb"],
    }


def table(results: dict) -> str:
    """A markdown table of `run`'s results, one row per head count."""
    columns = [
        ("M", None),
        ("Hydra ex/s", "hydra_throughput"),
        ("ensemble ex/s", "ensemble_throughput"),
        ("speed-up", "inference_speedup"),
        ("FLOP ratio", "flop_ratio"),
        ("speed-up / FLOP", "speedup_over_flop_ratio"),
        ("body ex/s", "body_throughput"),
        ("bound", "speedup_over_flop_bound"),
        ("Hydra step ms", "hydra_step_s"),
        ("checked ms", "checked_step_s"),
        ("no check ms", "unchecked_step_s"),
        ("check cost", "check_cost"),
        ("check cost Q1", "check_cost_low"),
        ("check cost Q3", "check_cost_high"),
        ("single step ms", "single_step_s"),
        ("step ratio", "step_ratio"),
        ("step bound", "step_ratio_bound"),
        ("step FLOP ratio", "step_flop_ratio"),
        ("heads loop/vec", "heads_speedup"),
        ("hidden heads loop/vec", "heads_hidden_speedup"),
        ("heads loop/bound", "heads_speedup_bound"),
        ("hidden heads loop/bound", "heads_hidden_speedup_bound"),
        ("Hydra params", "hydra_params"),
        ("ensemble params", "ensemble_params"),
        ("Hydra MiB", "hydra_peak_mb"),
        ("single MiB", "single_peak_mb"),
        ("memory ratio", "memory_ratio"),
        ("f16 targets MiB", "hydra_peak_f16_mb"),
        ("f16 memory ratio", "memory_ratio_f16"),
    ]
    lines = [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for m, row in results["per_m"].items():
        cells = [m]
        for _, key in columns[1:]:
            value = row[key]
            if key.endswith("_step_s"):
                cells.append(f"{value * 1e3:.2f}")
            elif key.endswith("_params"):
                cells.append(f"{value:,}")
            elif key.endswith("_throughput"):
                cells.append(f"{value:,.0f}")
            else:
                cells.append(f"{value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the benchmark's command-line arguments to `parser`."""
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, M in {1, 5}")
    parser.add_argument(
        "--num-heads",
        type=int,
        nargs="+",
        default=None,
        help="head counts M (default 1 5 10 50)",
    )
    parser.add_argument(
        "--jit-compile", action="store_true", help="compile every timed call with XLA"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="TensorFlow threads (intra- and inter-op); default: all cores",
    )


def main(args: argparse.Namespace) -> None:
    """Runs the benchmark from parsed command-line arguments."""
    config = SpeedConfig.quick() if args.quick else SpeedConfig()
    if args.num_heads:
        config.num_heads = tuple(args.num_heads)
    config.jit_compile = bool(args.jit_compile)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1. Received: {args.threads}")
        config.threads = args.threads
    results = run(config, args.out)
    load = ", ".join(f"{v:.2f}" for v in results["load_average"])
    print(f"Load average at the end: {load} on {results['cpu_count']} CPUs.")
    print(table(results))
