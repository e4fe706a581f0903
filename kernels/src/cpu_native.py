"""The native CPU kernels of the fast path, one C library:

- ``cpu_expand.c`` (:func:`expand_rows`): fused gather + L·B expansion (+ RoPE) of cache rows, the low-rank modes'
  K' = K + RoPE(L_k B_k). With torch ops that took a gather, a matmul into a temporary and three multiply-add passes
  over [n, H_kv*D]: on a 1-token hand-off at 4K context about 2 ms per layer, a third of the step. The C loop reads
  each cache row once, accumulates L·B in registers (4 rows per load of B) and writes K' once, by non-temporal
  stores when the rows go to a request's workspace (``stream``: nothing reads them before the next step).
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
HEADERS = (Path(__file__).with_name("cpu_vec.h"),)
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
    src = b"".join(f.read_bytes() for f in SOURCES + HEADERS)
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
        for name, types in (("lragent_expand_rows", [fp, fp, i64, i64, i64, i64, fp, i64, fp, fp, i64, i64, fp, fp,
                                                     fp, i64, i64, fp, i64, i64, fp, i64, f32, fp, i64]),
                            ("lragent_decode_scores", [fp, i64, i64, fp, i64, fp, i64, f32, fp, i64, i64, i64]),
                            ("lragent_decode_values", [fp, i64, i64, fp, i64, fp, i64, fp, fp, i64, fp, i64, fp,
                                                       fp, i64, i64, i64])):
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


def lib() -> ctypes.CDLL:
    """The loaded library (built on first use); RuntimeError with the reason where it cannot be."""
    dll = _load()
    if dll is None:
        raise RuntimeError(f"native CPU kernel unavailable: {_reason}")
    return dll


def reset() -> None:
    """Forget the loaded library and the last failure, so the next call builds again (tests, env changes)."""
    global _lib, _reason
    _lib, _reason = None, None


QMAX = 256          # the most columns l P may have in the kernel (cpu_expand.c)
ROW_BUFFER = 8192   # the widest rows (floats) the kernel builds in its stack buffer (4 rows: 128 KB)


def expand_rows(src: torch.Tensor, tok: torch.Tensor, lk: torch.Tensor, q: torch.Tensor, out: torch.Tensor | None,
                cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, head_dim: int = 0,
                lk_tok: torch.Tensor | None = None, p: torch.Tensor | None = None,
                query: torch.Tensor | None = None, scores: torch.Tensor | None = None, scale: float = 1.0,
                stream: bool = False) -> torch.Tensor | None:
    """out[t] = src[tok[t]] + RoPE_t(l_t @ q), all fp32, with l_t the row lk[lk_tok[t]] (lk[t] without an index),
    times ``p`` when given (RoPE with rows cos[t], sin[t] per head of ``head_dim``; plain l_t @ q without cos).
    With ``query`` [H, head_dim] contiguous, also the decode scores of the new rows while they are in cache:
    scores[h, t] = scale * query[h] . out[t, KV head h // (H / H_kv)] (``scores`` [H, n], unit column stride).
    src [N, W] contiguous, tok [n] int64 contiguous, lk [N', r] with unit column stride, p [r, k] contiguous
    (k <= QMAX), q [k, W] contiguous (k = r without p), out [n, W] with unit column stride; cos/sin [n, >= head_dim]
    with unit column stride, or [n, head_dim / 2] when both halves of a head share their angles (HF RoPE).
    ``out`` None: the scores only, the rows never stored (``query`` required; W <= ROW_BUFFER). ``stream``: write
    the rows with non-temporal stores where out's alignment allows (W <= ROW_BUFFER), for rows nothing reads soon:
    no read of each destination line first, and the cache keeps what it held. Rows are split over
    ``torch.get_num_threads()`` threads. Returns ``out``."""
    dll = lib()
    n, w = (tok.shape[0], q.shape[1]) if out is None else out.shape
    assert out is not None or (query is not None and w <= ROW_BUFFER), "out=None computes scores only: pass query"
    r = lk.shape[1]
    k = p.shape[1] if p is not None else r
    assert src.dtype == lk.dtype == q.dtype == torch.float32 and tok.dtype == torch.int64
    assert out is None or out.dtype == torch.float32
    assert src.is_contiguous() and tok.is_contiguous() and q.is_contiguous() and q.shape == (k, w)
    assert src.shape[1] == w and tok.shape[0] == n and lk.stride(1) == 1 and (out is None or out.stride(1) == 1)
    assert p is None or (p.dtype == torch.float32 and p.is_contiguous() and p.shape[0] == r and k <= QMAX)
    assert lk_tok is not None or lk.shape[0] >= n
    d = head_dim or w
    cp = sp = None
    cs = ch = 0
    if cos is not None:
        assert cos.stride() == sin.stride() and cos.stride(1) == 1 and cos.shape[0] == n
        assert cos.shape[1] >= d or cos.shape[1] == d // 2 and d % 2 == 0
        cp, sp, cs, ch = cos.data_ptr(), sin.data_ptr(), cos.stride(0), d // 2 if cos.shape[1] >= d else 0
    qp, g, sp_, ss = None, 0, None, 0
    if query is not None:
        assert query.dtype == torch.float32 and query.is_contiguous() and query.shape[1] == d
        assert scores.shape == (query.shape[0], n) and scores.stride(1) == 1 and query.shape[0] % (w // d) == 0
        qp, g, sp_, ss = query.data_ptr(), query.shape[0] // (w // d), scores.data_ptr(), scores.stride(0)
    args = (src.data_ptr(), tok.data_ptr(), w, d, lk.data_ptr(), lk.stride(0), _index(lk_tok, n),
            p.data_ptr() if p is not None else None, r, k, q.data_ptr(), cp, sp, cs, ch,
            out.data_ptr() if out is not None else None, out.stride(0) if out is not None else 0,
            int(stream and w <= ROW_BUFFER), qp, g, scale, sp_, ss)
    split(lambda a, b: dll.lragent_expand_rows(*args[:2], a, b, *args[2:]), n, row_threads(n))
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


def head_threads(n: int, n_kv: int) -> int:
    """Threads for a pass over n rows split by KV heads: torch's thread count, at most one per head and per
    4 * MIN_ROWS_PER_THREAD head rows."""
    return min(torch.get_num_threads(), n_kv, max(1, n * n_kv // (4 * MIN_ROWS_PER_THREAD)))


def row_threads(n: int) -> int:
    """Threads for a pass split by rows: torch's thread count, at most one per MIN_ROWS_PER_THREAD rows."""
    return min(torch.get_num_threads(), max(1, n // MIN_ROWS_PER_THREAD))


def decode_scores(q: torch.Tensor, k: torch.Tensor, n: int, scale: float, scores: torch.Tensor,
                  k_tok: torch.Tensor | None = None) -> torch.Tensor:
    """scores[h, t] = scale * q[h] . K_t[KV head h // (H / H_kv)] for t < n, all fp32: q [H, D] contiguous, K_t the
    row k[k_tok[t]] (k[t] without an index) of k [N, H_kv * D] (unit column stride), ``scores`` [H, n] with unit
    column stride (a column slice of a wider buffer is fine). KV heads are split over threads. Returns ``scores``."""
    dll = lib()
    h, d = q.shape
    n_kv = k.shape[1] // d
    assert q.dtype == torch.float32 and q.is_contiguous() and k.shape[1] == n_kv * d and h % n_kv == 0
    assert scores.shape == (h, n) and scores.stride(1) == 1 and scores.dtype == torch.float32
    kp, ks = _rows(k, "k")
    kt = _index(k_tok, n)
    split(lambda a, b: dll.lragent_decode_scores(q.data_ptr(), h // n_kv, d, kp, ks, kt, n, scale,
                                                 scores.data_ptr(), scores.stride(0), a, b),
          n_kv, head_threads(n, n_kv))
    return scores


def decode_values(scores: torch.Tensor, v: torch.Tensor, n: int, out: torch.Tensor,
                  v_tok: torch.Tensor | None = None, lv: torch.Tensor | None = None,
                  lv_tok: torch.Tensor | None = None, pl: torch.Tensor | None = None,
                  probs: torch.Tensor | None = None, bv: torch.Tensor | None = None):
    """With P the row softmax of ``scores`` [H, n] (written into ``probs``, a contiguous [H, n] buffer, else
    allocated): (P V into ``out`` [H, D], P L [H, r] or None), all fp32, V_t the row v[v_tok[t]] of v [N, H_kv * D]
    and L_t the row lv[lv_tok[t]] of lv [N', r] (rows t without an index); ``out`` and ``pl`` (else allocated)
    contiguous. With ``bv`` [H_kv, r, D] (rows of D contiguous, any head stride) and ``lv``, ``out`` gets the
    value term too: out[h] = P V + (P L)[h] @ bv[h // (H / H_kv)]."""
    dll = lib()
    (h, d), r = out.shape, lv.shape[1] if lv is not None else 0
    n_kv = v.shape[1] // d
    p = (torch.empty(h, r) if pl is None else pl) if lv is not None else None
    assert scores.shape == (h, n) and out.is_contiguous() and v.shape[1] == n_kv * d
    assert p is None or (p.shape == (h, r) and p.is_contiguous()) and (lv_tok is not None or lv.shape[0] >= n)
    assert bv is None or (lv is not None and bv.dtype == torch.float32 and bv.shape == (n_kv, r, d) and
                          bv.stride(2) == 1 and bv.stride(1) == d)
    (vp, vs), (lp, ls) = _rows(v, "v"), _rows(lv, "lv")
    vt, lt = _index(v_tok, n), _index(lv_tok, n)
    bp, bs = (bv.data_ptr(), bv.stride(0)) if bv is not None else (None, 0)
    probs = torch.softmax(scores, -1, out=torch.empty(h, n) if probs is None else probs)     # one fused pass
    assert probs.shape == (h, n) and probs.is_contiguous()
    split(lambda a, b: dll.lragent_decode_values(probs.data_ptr(), h // n_kv, d, vp, vs, vt, n, out.data_ptr(),
                                                 lp, ls, lt, r, p.data_ptr() if p is not None else None, bp, bs,
                                                 a, b),
          n_kv, head_threads(n, n_kv))
    return out, p


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, scale: float,
                     k_tok: torch.Tensor | None = None, v_tok: torch.Tensor | None = None,
                     lv: torch.Tensor | None = None, lv_tok: torch.Tensor | None = None,
                     scores: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     pl: torch.Tensor | None = None, bv: torch.Tensor | None = None):
    """Attention of one query position over n keys, all fp32: with P = softmax_t(scale * q[h] . K_t), returns
    (o [H, D] = P V (+ (P L) B_v with ``bv``), P L [H, r] or None); :func:`decode_scores` then
    :func:`decode_values` (their arguments); ``scores`` [H, n] is a contiguous buffer to use (else allocated)."""
    h, d = q.shape
    s = decode_scores(q, k, n, scale, torch.empty(h, n) if scores is None else scores, k_tok)
    return decode_values(s, v, n, torch.empty(h, d) if out is None else out, v_tok, lv, lv_tok, pl, bv=bv)


def split(run, n: int, threads: int) -> None:
    """run(a, b) over [0, n) in ``threads`` contiguous parts, on the pool's threads (ctypes releases the GIL)."""
    if threads <= 1:
        run(0, n)
        return
    global _pool, _pool_size
    if _pool is None or _pool_size < threads:
        _pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="lragent-native")
        _pool_size = threads
    bounds = [n * i // threads for i in range(threads + 1)]
    for f in [_pool.submit(run, a, b) for a, b in zip(bounds, bounds[1:])]:
        f.result()
