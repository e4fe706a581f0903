"""``python -m lragent.cli ...`` == ``lragent ...``."""
import sys

from . import main

sys.exit(main())
