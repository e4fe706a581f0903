"""The native CPU kernels of the fast path, one C library:

- ``cpu_expand.c`` (:func:`expand_rows`): fused gather + L·B expansion (+ RoPE) of cache rows, the low-rank modes'
  K' = K + RoPE(L_k B_k). With torch ops that took a gather, a matmul into a temporary and three multiply-add passes
  over [n, H_kv*D]: on a 1-token hand-off at 4K context about 2 ms per layer, a third of the step. The C loop reads
  each cache row once, accumulates L·B in registers and writes K' once.
- ``cpu_decode.c`` (:func:`decode_attention`): attention of one query position read straight from the (paged) cache
  rows, with the value term's P·L_v alongside. With torch ops a decode step gathered K and V into a copy (at 4K
  context 8 MB per layer, as long as the two matmuls that follow) before two matrix-vector-shaped bmm calls.

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

SOURCES = tuple(Path(__file__).with_name(f) for f in ("cpu_expand.c", "cpu_decode.c"))
_FLAGS = (["-O3", "-march=native"], ["-O3"])
_lib = None
_reason: str | None = None
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_size = 0
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
    src = b"".join(f.read_bytes() for f in SOURCES)
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
                run = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", tmp, *map(str, SOURCES)], capture_output=True,
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
        i64, fp, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        for name, types in (("lragent_expand_rows", [fp, fp, i64, i64, i64, i64, fp, i64, i64, fp, fp, fp, i64, fp,
                                                     i64]),
                            ("lragent_decode_scores", [fp, i64, i64, fp, i64, fp, i64, f32, fp, i64, i64]),
                            ("lragent_decode_values", [fp, i64, i64, fp, i64, fp, i64, fp, fp, i64, i64, fp, i64,
                                                       i64])):
            f = getattr(dll, name)
            f.argtypes, f.restype = types, None
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
    _split(lambda a, b: lib.lragent_expand_rows(*args[:2], a, b, *args[2:]), n,
           min(torch.get_num_threads(), max(1, n // MIN_ROWS_PER_THREAD)))
    return out


def _rows(t: torch.Tensor | None, name: str) -> tuple[int, int]:
    """(data pointer, row stride) of a 2-D fp32 tensor of unit column stride; (None, 0) for None."""
    if t is None:
        return None, 0
    assert t.dim() == 2 and t.dtype == torch.float32 and t.stride(1) == 1, f"{name}: 2-D fp32 rows of unit stride"
    return t.data_ptr(), t.stride(0)


def _index(tok: torch.Tensor | None, n: int):
    if tok is None:
        return None
    assert tok.dtype == torch.int64 and tok.is_contiguous() and tok.shape == (n,)
    return tok.data_ptr()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, scale: float,
                     k_tok: torch.Tensor | None = None, v_tok: torch.Tensor | None = None,
                     lv: torch.Tensor | None = None, scores: torch.Tensor | None = None,
                     out: torch.Tensor | None = None, pl: torch.Tensor | None = None):
    """Attention of one query position over n keys, all fp32: with P = softmax_t(scale * q[h] . K_t), returns
    (o [H, D] = P V, P lv [H, r] or None). q [H, D] contiguous (head h reads KV head h // (H / H_kv)); K_t / V_t
    the rows k[k_tok[t]] / v[v_tok[t]] (rows t without an index) of k, v [N, H_kv * D]; lv [n, r] (optional).
    ``scores`` [H, n], ``out`` [H, D] and ``pl`` [H, r] are contiguous buffers to use (else allocated); KV heads are split
    over ``torch.get_num_threads()`` threads."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native CPU kernel unavailable: {_reason}")
    h, d = q.shape
    n_kv = k.shape[1] // d
    assert q.dtype == torch.float32 and q.is_contiguous() and k.shape[1] == v.shape[1] == n_kv * d and h % n_kv == 0
    g = h // n_kv
    kp, ks = _rows(k, "k")
    vp, vs = _rows(v, "v")
    lp, ls = _rows(lv, "lv")
    r = lv.shape[1] if lv is not None else 0
    assert lv is None or lv.shape[0] >= n
    kt, vt = _index(k_tok, n), _index(v_tok, n)
    s = torch.empty(h, n) if scores is None else scores
    o = torch.empty(h, d) if out is None else out
    p = (torch.empty(h, r) if pl is None else pl) if lv is not None else None
    assert s.shape == (h, n) and o.shape == (h, d) and (p is None or p.shape == (h, r))
    assert s.is_contiguous() and o.is_contiguous() and (p is None or p.is_contiguous())
    threads = min(torch.get_num_threads(), n_kv, max(1, n * n_kv // (4 * MIN_ROWS_PER_THREAD)))
    _split(lambda a, b: lib.lragent_decode_scores(q.data_ptr(), g, d, kp, ks, kt, n, scale, s.data_ptr(), a, b),
           n_kv, threads)
    s.sub_(s.amax(-1, keepdim=True)).exp_()
    s.div_(s.sum(-1, keepdim=True))
    _split(lambda a, b: lib.lragent_decode_values(s.data_ptr(), g, d, vp, vs, vt, n, o.data_ptr(), lp, ls, r,
                                                  p.data_ptr() if p is not None else None, a, b), n_kv, threads)
    return o, p


def _split(run, n: int, threads: int) -> None:
    """run(a, b) over [0, n) in ``threads`` contiguous parts, on the pool's threads (ctypes releases the GIL)."""
    if threads <= 1:
        run(0, n)
        return
    global _pool
    if _pool is None or _pool_size < threads:
        _new_pool(threads)
    bounds = [n * i // threads for i in range(threads + 1)]
    for f in [_pool.submit(run, a, b) for a, b in zip(bounds, bounds[1:])]:
        f.result()


def _new_pool(threads: int) -> None:
    global _pool, _pool_size
    _pool, _pool_size = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="lragent-native"), threads
