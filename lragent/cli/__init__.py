"""The ``lragent`` command: train, export, import-peft, inspect, generate, run, chat, serve."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from lragent.serve.cli import add_serve_commands

    from .bundle import add_bundle_commands
    from .train import add_train_arguments, run_train

    p = argparse.ArgumentParser(prog="lragent", description="Shared-A multi-LoRA role adapters: train and serve "
                                "all roles from one shared cache.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train role adapters with a shared A (in-process)")
    add_train_arguments(t).set_defaults(func=run_train)
    add_bundle_commands(sub)
    add_serve_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .embedded import base_candidates

    args = build_parser().parse_args(argv)
    args.base_candidates = base_candidates()
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
