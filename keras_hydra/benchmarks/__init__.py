"""Benchmarks run by `keras-hydra benchmark ...`."""
