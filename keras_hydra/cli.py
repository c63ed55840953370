"""The `keras-hydra` command line."""

from __future__ import annotations

import argparse
import importlib
import os
import time

# Benchmark name -> module under keras_hydra.benchmarks. Each module defines
# `add_arguments(parser)` and `main(args)`.
BENCHMARKS = {
    "classification": "classification",
    "regression": "regression",
    "speed": "speed",
}


def _demo(args) -> None:
    from keras_hydra import demo

    config = demo.DemoConfig.quick() if args.quick else demo.DemoConfig()
    if args.members is not None:
        config.members = args.members
    start = time.perf_counter()
    rows = demo.run(config)
    print()
    print(
        f"Digits 0-5 in distribution, 6-9 out of distribution; "
        f"{config.members} members, {time.perf_counter() - start:.0f} s."
    )
    print(demo.format_table(rows))


def _available_benchmarks() -> dict:
    modules = {}
    for name, module in BENCHMARKS.items():
        try:
            modules[name] = importlib.import_module(f"keras_hydra.benchmarks.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"keras_hydra.benchmarks.{module}":
                raise
    return modules


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(
        prog="keras-hydra", description="Hydra ensemble distillation for Keras."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", help="distil an ensemble on scikit-learn digits and print a table"
    )
    demo_parser.add_argument(
        "--quick", action="store_true", help="a seconds-long smoke run"
    )
    demo_parser.add_argument(
        "--members", type=int, default=None, help="ensemble size (default 5)"
    )
    demo_parser.set_defaults(run=_demo)

    benchmark = commands.add_parser("benchmark", help="run a benchmark")
    kinds = benchmark.add_subparsers(dest="benchmark", required=True)
    for name, module in _available_benchmarks().items():
        sub = kinds.add_parser(name, help=module.__doc__.splitlines()[0])
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
