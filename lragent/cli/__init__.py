"""The ``lragent`` command: train, export, import-peft, inspect, generate, run, chat, serve, eval, drift."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The ``lragent`` argument parser with every subcommand."""
    from lragent.serve.cli import add_serve_commands

    from .bundle import add_bundle_commands
    from .fidelity import add_fidelity_commands
    from .train import add_train_arguments, run_train

    from lragent import __version__

    p = argparse.ArgumentParser(prog="lragent", description="Shared-A multi-LoRA role adapters: train and serve "
                                "all roles from one shared cache.")
    p.add_argument("--version", action="version", version=f"lragent {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train role adapters with a shared A (in-process)")
    add_train_arguments(t).set_defaults(func=run_train)
    add_bundle_commands(sub)
    add_serve_commands(sub)
    add_fidelity_commands(sub)
    return p


WRITERS = ("train", "export", "import-peft")      # commands whose SIGTERM ends in a clean, nothing-half-written exit


def main(argv: list[str] | None = None) -> int:
    """Run one ``lragent`` command; its exit code (0, or 2 after one ``error:`` line; see ``guard``)."""
    from .embedded import base_candidates
    from .guard import run_guarded

    args = build_parser().parse_args(argv)
    args.base_candidates = base_candidates()
    return run_guarded(lambda: args.func(args), sigterm=args.command in WRITERS)


if __name__ == "__main__":
    sys.exit(main())
