"""Filesystem helpers for everything lragent writes (bundles, runs, checkpoints): umask-following modes, our own
recognisable temp directories and their cleanup, and atomic renames that never replace what is not ours.

A temp directory is ``.NAME.tmp-XXXXXXXX`` (or ``.NAME.old-XXXXXXXX`` for a replaced one) next to its final path.
While a process fills it, it holds a marker file :data:`MARKER` with the writer's host and pid; the marker is removed
(:func:`seal`) just before the directory is renamed into place. :func:`clean_stale` removes only such directories
whose writer is gone: a marker naming a dead pid on this host, or no marker and an lragent manifest/run file inside
(a sealed or swapped-out directory left behind by a kill), never anything else.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

MARKER = ".lragent-writing"
OUR_FILES = {"manifest.json": "lragent-bundle", "run.json": "lragent-run", "state.json": None}
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_STALE_UNMARKED_S = 600          # a sealed dir is renamed microseconds after sealing; 10 min means it was abandoned


def umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask(x) is racy across threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def fix_modes(root: str | Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir``/``open`` would: directories
    ``0o777 & ~umask``, files ``0o666 & ~umask`` (mkdtemp makes 0700 and safetensors 0600). Links are left alone."""
    mask = umask()
    dmode, fmode = 0o777 & ~mask, 0o666 & ~mask
    root = Path(root)
    os.chmod(root, dmode)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, dmode)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, fmode)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ours_unmarked(d: Path) -> bool:
    """A sealed (or swapped-out) directory of ours: it holds our manifest/run file, or (``.old-``) one such dir."""
    for sub in (d, d / "bundle", d / "run"):
        for name, fmt in OUR_FILES.items():
            p = sub / name
            if p.is_file() and not p.is_symlink():
                try:
                    data = json.loads(p.read_text())
                except (OSError, ValueError):
                    continue
                if fmt is None or (isinstance(data, dict) and data.get("format") == fmt):
                    return True
    return False


def is_stale(d: Path) -> bool:
    """True for one of our temp directories whose writer is gone (see the module docstring)."""
    try:
        st = d.lstat()
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return False
    marker = d / MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
            host, pid = info["host"], int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return time.time() - st.st_mtime > _STALE_UNMARKED_S
        if host == socket.gethostname():
            return not _pid_alive(pid)
        return time.time() - st.st_mtime > 24 * 3600
    if time.time() - st.st_mtime <= _STALE_UNMARKED_S:
        return False
    return _ours_unmarked(d) or not any(d.iterdir())


def clean_stale(parent: str | Path, name: str, *, name_re: str | None = None) -> list[Path]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` directories in ``parent`` left by a killed writer; returns them.
    ``name_re``: a regular expression for NAME instead (e.g. every checkpoint step)."""
    pattern = re.compile(rf"^\.({name_re or re.escape(name)})\.(tmp|old)-[A-Za-z0-9_]+$")
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for d in entries:
        if pattern.match(d.name) and is_stale(d):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def missing_ancestor(path: str | Path) -> Path | None:
    """The topmost ancestor of ``path`` that does not exist yet (what ``mkdir(parents=True)`` would create first)."""
    path, top = Path(path).absolute(), None
    for p in path.parents:
        if os.path.lexists(p):
            break
        top = p
    return top


def remove_created(top: Path | None, path: str | Path) -> None:
    """Undo ``mkdir(parents=True)``: remove the now-empty directories between ``path``'s parent and ``top``."""
    if top is None:
        return
    p = Path(path).absolute().parent
    while True:
        try:
            os.rmdir(p)
        except OSError:
            return
        if p == top:
            return
        p = p.parent


def new_temp_dir(final: str | Path, kind: str = "tmp") -> Path:
    """A fresh, marked temp directory next to ``final`` (``.NAME.tmp-*``), after removing stale ones of ours."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{kind}-", dir=final.parent))
    (tmp / MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    return tmp


def seal(tmp: str | Path) -> None:
    """Make a temp directory final: drop the writer marker and set umask-following modes."""
    tmp = Path(tmp)
    try:
        (tmp / MARKER).unlink()
    except FileNotFoundError:
        pass
    fix_modes(tmp)


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """renameat2(a, b, flags); False where the OS/filesystem lacks it (then the caller falls back)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), flags) == 0:  # AT_FDCWD
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux RENAME_EXCHANGE); False where the OS cannot."""
    return _renameat2(a, b, RENAME_EXCHANGE)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists (atomically where the OS can)."""
    try:
        if _renameat2(src, dst, RENAME_NOREPLACE):
            return
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "already exists", str(dst)) from None
        raise
    if os.path.lexists(dst):                 # fallback: rename(2) would silently replace an empty directory
        raise FileExistsError(errno.EEXIST, "already exists", str(dst))
    os.rename(src, dst)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small text file via a temp file in the same directory and rename (never half-written)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def describe_os_error(e: OSError) -> str:
    """One line for an OSError, e.g. ``No space left on device (/data/x)``."""
    msg = e.strerror or str(e)
    return f"{msg} ({e.filename})" if e.filename else msg
