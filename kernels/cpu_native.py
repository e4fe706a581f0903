"""The native CPU kernel of the low-rank modes (``cpu_expand.c``): fused gather + L·B expansion (+ RoPE) of cache rows.

Expanding K' = K + RoPE(L_k B_k) with torch ops takes a gather, a matmul into a temporary and three multiply-add
passes over [n, H_kv*D]; on a 1-token hand-off at 4K context that was about 2 ms per layer, a third of the step.
The C loop reads each cache row once, accumulates L·B in registers and writes K' once.

The library is compiled on first use with the machine's C compiler (``$CC``, else ``cc``; ``-O3 -march=native``,
falling back to ``-O3``) into ``$LRAGENT_CACHE_DIR`` (default ``~/.cache/lragent``), keyed by the source, the flags
and the CPU; the build goes to a temporary name and is renamed into place. ``LRAGENT_NATIVE=0`` turns it off; where
no compiler works, :func:`available` is False, :func:`unavailable_reason` says why, and callers use torch ops.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_expand.c")
_FLAGS = (["-O3", "-march=native"], ["-O3"])
_lib = None
_reason: str | None = None
_pool: concurrent.futures.ThreadPoolExecutor | None = None
MIN_ROWS_PER_THREAD = 256


def _cpu_key() -> str:
    try:
        flags = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith(("flags", "Features"))]
        return flags[0] if flags else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def _build() -> ctypes.CDLL | None:
    global _reason
    if os.environ.get("LRAGENT_NATIVE", "1") == "0":
        _reason = "LRAGENT_NATIVE=0"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _reason = "no C compiler (cc, gcc or $CC) on PATH"
        return None
    cache = Path(os.environ.get("LRAGENT_CACHE_DIR") or Path.home() / ".cache" / "lragent")
    src = SOURCE.read_bytes()
    errors = []
    for flags in _FLAGS:
        key = hashlib.sha256(src + repr((cc, flags, _cpu_key(), platform.machine())).encode()).hexdigest()[:16]
        lib = cache / f"cpu_expand-{key}.so"
        if not lib.is_file():
            tmp = None
            try:
                cache.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
                os.close(fd)
                run = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)], capture_output=True,
                                     text=True, timeout=120)
                if run.returncode != 0:
                    os.unlink(tmp)
                    errors.append(f"{cc} {' '.join(flags)}: {(run.stderr.strip().splitlines() or ['failed'])[-1]}")
                    continue
                os.replace(tmp, lib)
            except (OSError, subprocess.SubprocessError) as e:    # a timeout, say: leave no partial file
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
                errors.append(f"{cc} {' '.join(flags)}: {e}")
                continue
        try:
            dll = ctypes.CDLL(str(lib))
        except OSError as e:
            errors.append(f"loading {lib}: {e}")
            continue
        f = dll.lragent_expand_rows
        i64, fp = ctypes.c_int64, ctypes.c_void_p
        f.argtypes = [fp, fp, i64, i64, i64, i64, fp, i64, i64, fp, fp, fp, i64, fp, i64]
        f.restype = None
        return dll
    _reason = "; ".join(errors) or "build failed"
    return None


def _load():
    global _lib, _reason
    if _lib is None and _reason is None:
        _lib = _build()
    return _lib


def available() -> bool:
    """True when the native kernel is built and loaded (compiling it on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _reason


def reset() -> None:
    """Forget the loaded library and the last failure, so the next call builds again (tests, env changes)."""
    global _lib, _reason
    _lib, _reason = None, None


def expand_rows(src: torch.Tensor, tok: torch.Tensor, lk: torch.Tensor, q: torch.Tensor, out: torch.Tensor,
                cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, head_dim: int = 0) -> torch.Tensor:
    """out[t] = src[tok[t]] + RoPE_t(lk[t] @ q) (RoPE with rows cos[t], sin[t] per head of ``head_dim``; plain
    lk[t] @ q without cos), all fp32. src [N, W] contiguous, tok [n] int64 contiguous, lk [n, r] with unit column
    stride, q [r, W] contiguous, out [n, W] with unit column stride; cos/sin [n, >= head_dim] with unit column
    stride. Rows are split over ``torch.get_num_threads()`` threads. Returns ``out``."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native CPU kernel unavailable: {_reason}")
    n, w = out.shape
    r = lk.shape[1]
    assert src.dtype == lk.dtype == q.dtype == out.dtype == torch.float32 and tok.dtype == torch.int64
    assert src.is_contiguous() and tok.is_contiguous() and q.is_contiguous() and q.shape == (r, w)
    assert src.shape[1] == w and lk.shape[0] == n == tok.shape[0] and lk.stride(1) == 1 and out.stride(1) == 1
    d = head_dim or w
    cp = sp = None
    cs = 0
    if cos is not None:
        assert cos.stride() == sin.stride() and cos.stride(1) == 1 and cos.shape[0] == n and cos.shape[1] >= d
        cp, sp, cs = cos.data_ptr(), sin.data_ptr(), cos.stride(0)
    args = (src.data_ptr(), tok.data_ptr(), w, d, lk.data_ptr(), lk.stride(0), r, q.data_ptr(), cp, sp, cs,
            out.data_ptr(), out.stride(0))
    threads = min(torch.get_num_threads(), max(1, n // MIN_ROWS_PER_THREAD))
    if threads <= 1:
        lib.lragent_expand_rows(args[0], args[1], 0, n, *args[2:])
        return out
    global _pool
    if _pool is None or _pool._max_workers < threads:
        _pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="lragent-expand")
    bounds = [n * i // threads for i in range(threads + 1)]
    futs = [_pool.submit(lib.lragent_expand_rows, args[0], args[1], a, b, *args[2:])
            for a, b in zip(bounds, bounds[1:])]
    for f in futs:
        f.result()
    return out
