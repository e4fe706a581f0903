"""``lragent train`` (and ``accelerate launch -m lragent.train``): recipe + dotted overrides -> a training run."""
from __future__ import annotations

import argparse
import sys


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the train command's arguments to ``p``."""
    p.add_argument("--config", help="recipe YAML (recipes/*.yaml); omitted: built-in defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-3")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    return p


def run_train(args: argparse.Namespace) -> int:
    """Train from parsed arguments; 0, or 2 after one ``error:`` block on stderr."""
    from lragent.bundle import BundleError
    from lragent.train.config import ConfigError, load_config
    from lragent.train.data import DataError
    from lragent.train.trainer import TrainError, train

    from .embedded import EMBEDDED

    ok = False
    try:
        cfg = load_config(args.config, args.overrides)
        out = train(cfg, resume=args.resume, overwrite=args.overwrite, embedded=EMBEDDED)
        ok = True
    except (ConfigError, DataError, TrainError, BundleError) as e:
        msg = str(e) if isinstance(e, ConfigError) else " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    finally:
        _close_group(wait=ok)
    print(f"run written to {out.run_dir}")
    return 0


def _close_group(wait: bool) -> None:
    """Destroy the process group of a multi-process run; first wait for every rank (``wait``, after a run that
    succeeded), so that no rank closes its connections while another still has collectives in flight."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """``python -m lragent.train`` / ``accelerate launch -m lragent.train``: train, exit 0 or 2 (SIGTERM: 143)."""
    from .guard import run_guarded

    p = add_train_arguments(argparse.ArgumentParser(prog="lragent.train", description="Train shared-A role adapters"))
    args = p.parse_args(argv)
    return run_guarded(lambda: run_train(args), sigterm=True)
