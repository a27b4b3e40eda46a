"""`pdserve` entry point: dispatches to the subcommands.

Each subcommand lives beside the code it drives and exposes two functions,
`add_arguments(parser)` and `run(args) -> int`. Their modules keep heavy
imports (vLLM, Ray, torch) inside `run`, so `pdserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("pdserve.cli.serve", "Serve a model behind an OpenAI-compatible gateway."),
    "scale": ("pdserve.cli.scale", "Add or remove engine instances of a running server."),
    "bench": ("pdserve.loadgen.cli", "Benchmark any OpenAI-compatible endpoint (traces, synthetic load)."),
    "plan": ("pdserve.planner.cli", "Simulate and size prefill/decode pools for a trace and SLO."),
    "simulate": ("pdserve.planner.simulate", "Simulate one cluster design on a workload; bench-compatible results."),
    "profile": ("pdserve.planner.profile_cli", "Measure an engine's prefill and decode times into a profile CSV."),
}


def build_parser() -> argparse.ArgumentParser:
    from pdserve import __version__

    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pdserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and exc.name.startswith("pdserve"):
                continue  # subcommand not built in this checkout
            raise
        sub = subparsers.add_parser(name, help=help_text, description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
