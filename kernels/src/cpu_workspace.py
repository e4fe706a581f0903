"""Per-request workspace of expanded keys for the CPU fast path in the low-rank cache modes.

In lrshared (and baseshared, lrbase) the cache holds base K/V and the low-rank rows L; a role reads
K' = K + RoPE(L_k B_k) and V' = V + L_v B_v with its own B. Expanding K' over the whole context costs
n * r * H_kv * D multiply-adds per layer, several times the attention of one decode step, so re-expanding at every
step of every running request makes the low-rank modes much slower per token than fullshared. The workspace keeps,
for each running request, K' of the positions already expanded ([layers, capacity, H_kv, D], fp32); a step expands
only its new positions, straight into the workspace rows. Values need no copy: a decode step reads base V and the
L_v rows in place from the cache and adds the value term as (P L_v) B_v, and a prefill chunk expands V' into a
scratch buffer. It is a copy of what the request reads, not cache: the paged pool stays the shared store.

The rows live in one arena of ``max_tokens`` rows ([layers, max_tokens, H_kv, D]), allocated on first use and never
touched beyond the rows handed out; each running request holds a range of it (room for its decode, ``reserve``),
grown in place when the rows after it are free, else moved. A request's range
is returned when it finishes, is aborted or is preempted (``release``); a request that does not fit runs without
one, re-expanding at every step. Why an arena: a fresh multi-MB tensor per request page-faults on every first touch
(about 30 ms for the 32 MB of a 4K-token request, as much as the step itself), while the arena's pages, once
touched, are reused by every later request; on Linux it also asks for transparent huge pages (512x fewer faults).

Cache rows never change once written (the pool is append-only per sequence and shared prefixes are immutable),
so a workspace row stays valid for as long as its request runs.
"""
from __future__ import annotations

import ctypes
import sys

import torch

_HUGE = 2 << 20


def _advise_huge_pages(t: torch.Tensor) -> None:
    """madvise(MADV_HUGEPAGE) over the 2 MB-aligned part of a CPU tensor's memory (Linux; best effort)."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    lo, hi = -(-start // _HUGE) * _HUGE, end // _HUGE * _HUGE
    if hi > lo:
        try:
            ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 14)
        except (OSError, AttributeError):
            pass


class Workspace:
    """K' rows per running request, by request id, in one arena of ``max_tokens`` rows (see the module doc)."""

    def __init__(self, num_layers: int, n_kv: int, head_dim: int, max_tokens: int, device="cpu"):
        self.num_layers, self.n_kv, self.head_dim = num_layers, n_kv, head_dim
        self.max_tokens, self.device = max_tokens, device
        self.kv = None                         # the arena, made on first use
        self.free: list[list[int]] = [[0, max_tokens]]   # free row ranges [offset, length], by offset, coalesced
        self.reqs: dict[int, list] = {}       # id -> [offset, capacity, filled rows per layer]
        self.high = 0                         # rows of the arena handed out at least once (its touched part)

    @property
    def row_bytes(self) -> int:
        return self.num_layers * self.n_kv * self.head_dim * 4

    @property
    def tokens(self) -> int:
        """Rows held by running requests."""
        return sum(e[1] for e in self.reqs.values())

    @property
    def bytes(self) -> int:
        """Bytes of the arena touched so far (what it holds in memory; 0 before first use and after trim)."""
        return self.high * self.row_bytes

    @property
    def running_bytes(self) -> int:
        """Bytes of the running requests' rows."""
        return self.tokens * self.row_bytes

    def _arena(self) -> bool:
        """Make the arena if there is none; where ``max_tokens`` rows cannot be mapped, the bound halves until they
        can (False below 256 rows: no workspace)."""
        kw = dict(dtype=torch.float32, device=self.device)
        while self.kv is None and self.max_tokens >= 256:
            try:
                self.kv = torch.empty(self.num_layers, self.max_tokens, self.n_kv, self.head_dim, **kw)
                self.free = [[0, self.max_tokens]]
                _advise_huge_pages(self.kv)
            except RuntimeError:
                self.kv = None
                self.max_tokens //= 2
        return self.kv is not None

    def _take(self, n: int, budget: int) -> tuple[int, int] | None:
        """(offset, rows) of a free range of ``budget`` rows, else of ``n``: the smallest range that fits, lowest
        offset first (keeps the touched part small); None when none fits."""
        for want in (budget, n):
            fits = [f for f in self.free if f[1] >= want]
            if fits:
                f = min(fits, key=lambda f: (f[1], f[0]))
                off = f[0]
                f[0], f[1] = f[0] + want, f[1] - want
                self.free = [g for g in self.free if g[1] > 0]
                self.high = max(self.high, off + want)
                return off, want
        return None

    def _give(self, off: int, rows: int) -> None:
        """Return a range to the free list, merging it with its neighbours."""
        self.free.append([off, rows])
        self.free.sort()
        merged = []
        for f in self.free:
            if merged and merged[-1][0] + merged[-1][1] == f[0]:
                merged[-1][1] += f[1]
            else:
                merged.append(f)
        self.free = merged

    def reserve(self, req: int, n: int) -> bool:
        """Make room for ``n`` rows of request ``req``; False (and nothing held for it) when the bound forbids it.
        A new request gets room for its decode too, a growing one doubles (in place when the rows after it are
        free)."""
        entry = self.reqs.get(req)
        if entry is not None and n <= entry[1]:
            return True
        if not self._arena():
            return False
        if entry is None:
            got = self._take(n, n + max(256, n // 4))
            if got is None:
                return False
            self.reqs[req] = [got[0], got[1], [0] * self.num_layers]
            return True
        off, cap, filled = entry
        after = next((f for f in self.free if f[0] == off + cap), None)
        if after is not None and cap + after[1] >= n:            # grow in place
            extra = min(after[1], max(n, 2 * cap) - cap)
            after[0], after[1] = after[0] + extra, after[1] - extra
            self.free = [g for g in self.free if g[1] > 0]
            entry[1] = cap + extra
            self.high = max(self.high, off + entry[1])
            return True
        got = self._take(n, max(n, 2 * cap))
        if got is None:
            self.release(req)
            return False
        for layer, m in enumerate(filled):                        # move: copy the filled rows
            self.kv[layer, got[0]:got[0] + m] = self.kv[layer, off:off + m]
        self._give(off, cap)
        entry[0], entry[1] = got
        return True

    def filled(self, req: int, layer: int) -> int:
        """How many leading positions of ``req`` are expanded in ``layer``."""
        return self.reqs[req][2][layer]

    def rows(self, req: int, layer: int, start: int, end: int) -> torch.Tensor:
        """View of K' [end-start, H_kv, D] of positions start..end-1 of ``req`` in ``layer`` (contiguous)."""
        off = self.reqs[req][0]
        return self.kv[layer, off + start:off + end]

    def addresses(self, req: int) -> tuple[int, int, list[int]]:
        """For native callers: (the address of ``req``'s first row in layer 0, the bytes from one layer's rows to
        the next's, its per-layer expanded counts as the live list that :meth:`mark` updates); valid until the
        next ``reserve`` or ``release`` of ``req``."""
        off, _, filled = self.reqs[req]
        return self.kv[0, off].data_ptr(), self.kv.stride(0) * self.kv.element_size(), filled

    def mark(self, req: int, layer: int, end: int) -> None:
        """Record that positions up to ``end`` of ``req`` are expanded in ``layer``."""
        self.reqs[req][2][layer] = end

    def release(self, req: int) -> None:
        """Return the rows of ``req`` to the arena (no-op if it has none)."""
        entry = self.reqs.pop(req, None)
        if entry is not None:
            self._give(entry[0], entry[1])

    def trim(self) -> None:
        """Free the arena when no request runs (while one does, it stays)."""
        if not self.reqs:
            self.clear()

    def clear(self) -> None:
        """Free everything."""
        self.reqs.clear()
        self.kv = None
        self.free, self.high = [[0, self.max_tokens]], 0


class Scratch:
    """Reusable fp32 buffers by name, grown as needed: gathers and matmul outputs written into them instead of into
    fresh tensors (fresh multi-MB tensors cost page faults on every call on CPU). A buffer is valid until the next
    ``get`` of the same name."""

    def __init__(self, device="cpu"):
        self.device, self.bufs = device, {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        """A contiguous fp32 tensor of ``shape`` (contents undefined)."""
        n = 1
        for s in shape:
            n *= s
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < n:
            buf = self.bufs[name] = torch.empty(max(n, 2 * (0 if buf is None else buf.numel())),
                                                dtype=torch.float32, device=self.device)
        return buf[:n].view(*shape)
