"""The speed benchmark's quick run: every result present, no timed assertions."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from keras_hydra import cli
from keras_hydra.benchmarks import speed


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    cli.main(["benchmark", "speed", "--quick", "--out", str(out)])
    return json.loads((out / "results.json").read_text())


def test_quick_run_writes_every_key(quick):
    assert sorted(quick["per_m"]) == ["1", "5"]
    for row in quick["per_m"].values():
        assert set(row) == set(speed.KEYS) | set(speed.RATIOS)
        for key, value in row.items():
            assert math.isfinite(value) and value > 0, (key, value)


def test_quick_run_counts_parameters_and_flops(quick):
    # Quick sizes: a 32-64-64 body (6,272 parameters), linear heads of 650,
    # and the Hydra's scalar `spread`.
    for m in [1, 5]:
        row = quick["per_m"][str(m)]
        assert row["hydra_params"] == 6272 + 650 * m + 1
        assert row["ensemble_params"] == (6272 + 650) * m
        body, head = 32 * 64 + 64 * 64, 64 * 10
        assert row["flop_ratio"] == pytest.approx(m * (body + head) / (body + m * head))
        assert row["step_flop_ratio"] == pytest.approx(
            (body + m * head) / (body + head)
        )
    assert quick["per_m"]["1"]["flop_ratio"] == 1.0
    # One single-model measurement serves every M.
    assert (
        quick["per_m"]["1"]["single_peak_mb"] == quick["per_m"]["5"]["single_peak_mb"]
    )


def test_step_bound_model_has_the_hydras_weights_and_outputs():
    # The bound's model differs from the Hydra only in how its heads are
    # computed: the same kernels and biases (the Hydra has `spread` besides),
    # the same [batch, M, K] outputs and the same loss.
    config = speed.SpeedConfig.quick()
    dense = speed._dense(config, 5)
    hydra = speed._hydra(config, 5)
    assert dense.count_params() == hydra.count_params() - 1
    assert tuple(dense.output.shape) == (None, 5, config.num_classes)
    assert dense.loss.get_config() == hydra.loss.get_config()


def test_quick_run_records_its_setting(quick):
    assert quick["config"] == {
        **vars(speed.SpeedConfig.quick()),
        "num_heads": [1, 5],
        "body": [64, 64],
    }
    assert len(quick["load_average"]) == 3


def test_ratios_follow_the_measurements(quick):
    row = quick["per_m"]["5"]
    assert row["inference_speedup"] == pytest.approx(
        row["hydra_throughput"] / row["ensemble_throughput"]
    )
    assert row["memory_ratio"] == pytest.approx(
        row["hydra_peak_mb"] / row["single_peak_mb"]
    )
    assert row["memory_ratio_f16"] == pytest.approx(
        row["hydra_peak_f16_mb"] / row["single_peak_mb"]
    )
    assert row["step_ratio_bound"] == pytest.approx(
        row["dense_step_s"] / row["single_step_s"]
    )
    # The check's cost is a median of paired ratios, between their quartiles.
    assert 0 < row["check_cost_low"] <= row["check_cost"] <= row["check_cost_high"]
    body, head = speed.flops(speed.SpeedConfig.quick())
    assert row["speedup_over_flop_bound"] == pytest.approx(
        row["body_throughput"] * body / (body + head) / (5 * row["ensemble_throughput"])
    )


def test_check_cost_times_a_step_that_checks_against_one_that_does_not():
    # Fed a NaN batch, the benchmark's checked step leaves the weights as
    # they were and the unchecked step makes them NaN, on the same model.
    config = speed.SpeedConfig.quick()
    x, targets = speed._batch(config, 3, np.random.default_rng(0))
    x[5, 7] = np.nan
    model = speed._hydra(config, 3)
    before = [w.numpy() for w in model.trainable_weights]
    steps = speed.check_steps(model, x, targets)
    assert model.check_finite
    assert int(model._record.values[0]) >= 0
    for weight, value in zip(model.trainable_weights, before, strict=True):
        weight.assign(value)
    steps["checked"]()
    for weight, value in zip(model.trainable_weights, before, strict=True):
        np.testing.assert_array_equal(weight.numpy(), value)
    steps["unchecked"]()
    assert not all(np.isfinite(w.numpy()).all() for w in model.trainable_weights)


def test_threads_size_both_pools_in_a_fresh_process():
    code = (
        "import tensorflow as tf; from keras_hydra.benchmarks import speed; "
        "speed.set_threads(1); tf.constant(0.0).numpy(); "
        "print(tf.config.threading.get_intra_op_parallelism_threads(), "
        "tf.config.threading.get_inter_op_parallelism_threads())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split()[-2:] == ["1", "1"]


def test_threads_refused_once_tensorflow_runs(quick):
    with pytest.raises(RuntimeError, match="Cannot run the speed benchmark on 1"):
        speed.set_threads(1)


def test_threads_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="--threads must be >= 1. Received: 0"):
        cli.main(
            ["benchmark", "speed", "--quick", "--threads", "0", "--out", str(tmp_path)]
        )


def test_flop_ratio_of_the_reported_sizes():
    config = speed.SpeedConfig()
    body = 784 * 512 + 512 * 512
    assert speed.flop_ratio(config, 50) == pytest.approx(
        50 * (body + 5120) / (body + 50 * 5120)
    )
    hidden = 512 * 128 + 128 * 10
    assert speed.flop_ratio(config, 10, hidden=True) == pytest.approx(
        10 * (body + hidden) / (body + 10 * hidden)
    )
