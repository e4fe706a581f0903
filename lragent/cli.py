"""The ``lragent`` command: train, export, import-peft, inspect, generate, run, chat."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lragent", description="Shared-A multi-LoRA role adapters: train and serve "
                                "all roles from one shared cache.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from lragent.train.__main__ import add_train_arguments, run_train
    t = sub.add_parser("train", help="train role adapters with a shared A (in-process)")
    add_train_arguments(t).set_defaults(func=run_train)
    from lragent.train.bundle_cli import add_bundle_commands
    from lragent.serve.cli import add_serve_commands
    add_bundle_commands(sub)
    add_serve_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
