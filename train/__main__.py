"""``accelerate launch -m lragent.train --config recipes/tiny.yaml [key=value ...] [--resume] [--overwrite]``:
an entry shim for the command line (``lragent.cli.train``), which resolves the embedded default."""
import sys

from lragent.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
