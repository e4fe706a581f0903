"""How every ``lragent`` command ends: exit 0, or one ``error: ...`` line and exit 2 — never a traceback.

``run_guarded(fn)`` runs a command and maps what escapes it: a closed stdout (``lragent inspect B | head``) ends
quietly with 141 like coreutils; SIGTERM (where ``sigterm=True``; it is turned into :class:`Terminated` so that
``finally`` blocks remove temp dirs and release locks) ends with 143; Ctrl-C with 130; an OSError (a full disk, a
permission) with one line and 2. Anything else is a bug: one line asking for a report, exit 2 (``LRAGENT_DEBUG=1``
re-raises it with its traceback; the CLI fuzz test runs that way).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives inside :func:`sigterm_raises`."""


@contextlib.contextmanager
def sigterm_raises():
    """While active (main thread only), SIGTERM raises :class:`Terminated` instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so that the interpreter's final flush does not raise BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except Exception:  # noqa: BLE001 - OSError, or io.UnsupportedOperation when stdout is not a real file
        pass


def run_guarded(fn: Callable[[], int], *, sigterm: bool = False) -> int:
    """``fn()``'s exit code, with what escapes it mapped to one stderr line and an exit code (module docstring)."""
    try:
        if sigterm:
            with sigterm_raises():
                return fn() or 0
        return fn() or 0
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except Terminated:
        print("error: terminated (SIGTERM): stopped cleanly; temp files removed, nothing half-written (a training "
              "run keeps its last checkpoint: continue with --resume)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {_one_line(e.strerror or e)}{where}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get("LRAGENT_DEBUG"):
            raise
        print(f"error: internal error ({type(e).__name__}: {_one_line(e)[:200]}); please report it (LRAGENT_DEBUG=1 "
              f"shows the traceback)", file=sys.stderr)
        return 2
