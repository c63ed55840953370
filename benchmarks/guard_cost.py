"""Cost of `check_finite`: a Hydra train step with the guard on and off.

    python benchmarks/guard_cost.py

Both models run interleaved rounds of the same compiled steps (784 inputs,
a 512-unit body, 10 linear heads, batches of 256); prints median step times
and their ratio.
"""

import time

import keras
import numpy as np

import keras_hydra as kh

rng = np.random.default_rng(0)
x = rng.random((256 * 20, 784), dtype="float32")
targets = rng.normal(size=(len(x), 10, 10)).astype("float32")


def model(check_finite):
    keras.utils.set_random_seed(0)
    body = keras.Sequential([keras.layers.Dense(512, activation="relu")])
    hydra = kh.HydraModel(body, kh.heads.Categorical(10), 10, check_finite=check_finite)
    hydra.compile(optimizer="adam", loss=kh.losses.HydraKL(), steps_per_execution=20)
    hydra.fit(x, targets, batch_size=256, epochs=1, verbose=0)  # compile, warm up
    return hydra


models = {"on": model(True), "off": model(False)}
times = {name: [] for name in models}
for _ in range(7):
    for name, hydra in models.items():
        start = time.perf_counter()
        hydra.fit(x, targets, batch_size=256, epochs=1, verbose=0)
        times[name].append((time.perf_counter() - start) / 20)
on, off = (float(np.median(times[k])) for k in ("on", "off"))
print(f"step with guard {on * 1e3:.2f} ms, without {off * 1e3:.2f} ms, ratio {on / off:.3f}")
