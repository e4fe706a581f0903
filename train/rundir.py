"""The run directory: recognising our own runs, locking one against a second writer, and creating or replacing it
atomically (``--overwrite``) so that nothing is deleted that is not ours and a failed setup changes nothing.

A run written by this version carries ``"format": "lragent-run"`` in run.json; runs written before that are
recognised by their layout (run.json with roles, base.config_sha256, lora and modules, plus config.yaml). A new or
replacing run is first assembled in ``.NAME.tmp-*`` next to the run directory (data, config.yaml, run.json), then
renamed into place (or atomically exchanged with the old run, which is then removed).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import threading
from pathlib import Path

from lragent.bundle import fsutil

RUN_FORMAT = "lragent-run"
RUN_VERSION = 1
LOCK_NAME = ".lragent.lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; one line."""


def read_run_json(run_dir: Path) -> dict | None:
    """run.json as a dict, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads((run_dir / "run.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_our_run(run_dir: Path) -> bool:
    """True when ``run_dir`` is a training run lragent wrote (format marker, or the layout of older versions)."""
    if not run_dir.is_dir() or run_dir.is_symlink():
        return False
    meta = read_run_json(run_dir)
    if meta is None:
        return False
    if meta.get("format") == RUN_FORMAT:
        return True
    base, lora = meta.get("base"), meta.get("lora")
    return (isinstance(meta.get("roles"), list) and isinstance(meta.get("modules"), list)
            and isinstance(base, dict) and isinstance(base.get("config_sha256"), str) and isinstance(lora, dict)
            and (run_dir / "config.yaml").is_file())


def plan(run_dir: Path, *, resume: bool, overwrite: bool) -> str:
    """What to do with ``output_dir``: "new", "overwrite" or "resume"; RunDirError (one line) when the request cannot
    be honoured. Reads only."""
    if resume and overwrite:
        raise RunDirError("pass --resume or --overwrite, not both")
    if os.path.lexists(run_dir) and not run_dir.is_dir():
        raise RunDirError(f"output_dir {run_dir} exists and is not a directory: choose another output_dir")
    has_run = (run_dir / "run.json").exists()
    if not has_run:
        if resume:
            raise RunDirError(f"--resume: {run_dir} holds no run (no run.json) to resume")
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise RunDirError(f"output_dir {run_dir} exists, is not empty and is not an lragent run (no run.json): "
                              f"refusing to write into it; choose another output_dir")
        return "new"
    if not is_our_run(run_dir):
        raise RunDirError(f"{run_dir} holds a run.json that lragent train did not write: refusing to touch it, even "
                          f"with --overwrite; choose another output_dir")
    if resume:
        return "resume"
    if not overwrite:
        raise RunDirError(f"{run_dir} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                          f"or output_dir=... for a new one")
    return "overwrite"


class RunLock:
    """An exclusive ``flock`` on ``DIR/.lragent.lock`` for as long as one process writes the run directory."""

    def __init__(self, run_dir: Path):
        path = run_dir / LOCK_NAME
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip()
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"{run_dir} is being written by another lragent process"
                                  f"{f' (pid {holder})' if holder else ''}: wait for it to finish or choose another "
                                  f"output_dir") from None
            raise
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def stage(run_dir: Path) -> tuple[Path, RunLock]:
    """A marked, locked temp directory next to ``run_dir`` to assemble a new run in."""
    tmp = fsutil.new_temp_dir(run_dir)
    return tmp, RunLock(tmp)


def commit(tmp: Path, run_dir: Path, mode: str) -> None:
    """Put the assembled run ``tmp`` at ``run_dir``: "new" never replaces anything but an empty directory; "overwrite"
    swaps out only a run of ours (checked again at the exchange) and then removes it."""
    fsutil.seal(tmp)
    if mode == "new":
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        try:
            fsutil.rename_noreplace(tmp, run_dir)
        except FileExistsError:
            raise RunDirError(f"{run_dir} appeared while the run was being set up (another process?): nothing "
                              f"was replaced; choose another output_dir") from None
        return
    if not is_our_run(run_dir):
        raise RunDirError(f"{run_dir} is no longer an lragent run: refusing to replace it")
    if fsutil.exchange(tmp, run_dir):
        if not is_our_run(tmp):                   # swapped in by someone else between the check and the exchange
            fsutil.exchange(tmp, run_dir)
            raise RunDirError(f"{run_dir} changed while the run was being set up: refusing to replace it")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = fsutil.new_temp_dir(run_dir, "old")
    os.rename(run_dir, old / "run")
    try:
        os.rename(tmp, run_dir)
    except OSError:
        os.rename(old / "run", run_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def discard(tmp: Path | None) -> None:
    """Remove an assembled run that was never committed."""
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def watch_parent(interval_s: float = 1.0) -> None:
    """Under a launcher (accelerate / torchrun set LOCAL_RANK), send ourselves SIGTERM when the launcher dies, so
    that killing it does not orphan this worker (the SIGTERM handler of the command line then exits cleanly)."""
    if "LOCAL_RANK" not in os.environ or getattr(watch_parent, "_started", False):
        return
    parent = os.getppid()
    if parent == 1:                               # the launcher is already gone (we were re-parented to init)
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def loop():
        ev = threading.Event()
        while not ev.wait(interval_s):
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=loop, name="lragent-parent-watch", daemon=True).start()
    watch_parent._started = True
