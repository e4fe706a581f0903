"""Per-request workspace of expanded keys and values for the CPU fast path in the low-rank cache modes.

In lrshared (and baseshared, lrbase) the cache holds base K/V and the low-rank rows L; a role reads
K' = K + RoPE(L_k B_k) and V' = V + L_v B_v with its own B. Expanding K' and V' over the whole context costs
n * r * H_kv * D multiply-adds per layer, several times the attention of one decode step, so re-expanding at every
step of every running request makes the low-rank modes much slower per token than fullshared. The workspace keeps,
for each running request, K' and V' of the positions already expanded ([layers, 2, capacity, H_kv, D], fp32); a
step expands only its new positions, straight into the workspace rows. With ``lr_width`` > 0 it keeps the base V
instead of V' and the L_v rows beside it ([layers, capacity, lr_width]): decode steps then add the value term as
(P L_v) B_v (no V' expansion, which on a 1-token hand-off over a long context is as dear as the K' one), and a
prefill chunk expands V' into a scratch buffer. It is a copy of what the request reads, not cache: the paged pool stays the
shared store, a request's rows are dropped when it finishes, is aborted or is preempted (``release``: its tensor goes
to a pool for the next request), and everything held is bounded by ``max_tokens`` rows (a request that does not fit
runs without one, re-expanding at every step).

Cache rows never change once written (the pool is append-only per sequence and shared prefixes are immutable),
so a workspace row stays valid for as long as its request runs.
"""
from __future__ import annotations

import torch


class Workspace:
    """K'/V' rows per running request, by request id; ``max_tokens`` bounds the summed capacity of every tensor held,
    the running requests' and the pool's (tensors of finished requests, kept for reuse: fresh multi-MB tensors cost
    page faults on every first touch, which made a hand-off's expansion several times slower)."""

    def __init__(self, num_layers: int, n_kv: int, head_dim: int, max_tokens: int, device="cpu", lr_width: int = 0):
        self.num_layers, self.n_kv, self.head_dim, self.lr_width = num_layers, n_kv, head_dim, lr_width
        self.max_tokens, self.device = max_tokens, device
        self.reqs: dict[int, list] = {}       # id -> [(kv [L, 2, cap, H_kv, D], lv [L, cap, lr_width]), filled rows per layer]
        self.pool: list[tuple] = []           # (kv, lv) pairs no request uses
        self.tokens = 0                       # summed capacity (rows) of every tensor held (requests and pool)

    def _bytes(self, rows: int) -> int:
        return rows * self.num_layers * (2 * self.n_kv * self.head_dim + self.lr_width) * 4

    @staticmethod
    def _cap(pair) -> int:
        return pair[0].shape[2]

    @property
    def bytes(self) -> int:
        """Bytes held now (running requests' tensors and the pool)."""
        return self._bytes(self.tokens)

    @property
    def running_bytes(self) -> int:
        """Bytes of the running requests' tensors."""
        return self._bytes(sum(self._cap(e[0]) for e in self.reqs.values()))

    def _take(self, n: int, budget: int) -> tuple | None:
        """A (kv, lv) pair of capacity >= n: the pool's smallest that fits, else a new one of ``budget`` rows if the
        bound allows (after dropping pooled pairs), else None."""
        fits = [i for i, t in enumerate(self.pool) if self._cap(t) >= n]
        if fits:
            return self.pool.pop(min(fits, key=lambda i: self._cap(self.pool[i])))
        for want in (budget, n):
            while self.tokens + want > self.max_tokens and self.pool:
                self.tokens -= self._cap(self.pool.pop(0))
            if self.tokens + want <= self.max_tokens:
                self.tokens += want
                kw = dict(dtype=torch.float32, device=self.device)
                return (torch.empty(self.num_layers, 2, want, self.n_kv, self.head_dim, **kw),
                        torch.empty(self.num_layers, want, self.lr_width, **kw))
        return None

    def reserve(self, req: int, n: int) -> bool:
        """Make room for ``n`` rows of request ``req``; False (and nothing held for it) when the bound forbids it."""
        entry = self.reqs.get(req)
        cap = 0 if entry is None else self._cap(entry[0])
        if n <= cap:
            return True
        t = self._take(n, max(n, 2 * cap, 256))
        if t is None:
            self.release(req)
            return False
        if entry is None:
            self.reqs[req] = [t, [0] * self.num_layers]
        else:                                     # grow: copy, then the old tensor goes to the pool
            old, filled = entry
            for layer, m in enumerate(filled):
                t[0][layer, :, :m] = old[0][layer, :, :m]
                t[1][layer, :m] = old[1][layer, :m]
            entry[0] = t
            self.pool.append(old)
        return True

    def filled(self, req: int, layer: int) -> int:
        """How many leading positions of ``req`` are expanded in ``layer``."""
        return self.reqs[req][1][layer]

    def rows(self, req: int, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views K', V' (base V with ``lr_width``) [end-start, H_kv, D] of positions start..end-1 of ``req`` in
        ``layer`` (contiguous)."""
        t = self.reqs[req][0][0][layer]
        return t[0, start:end], t[1, start:end]

    def lowrank_rows(self, req: int, layer: int, start: int, end: int) -> torch.Tensor:
        """View of the L_v rows [end-start, lr_width] of positions start..end-1 of ``req`` in ``layer``."""
        return self.reqs[req][0][1][layer, start:end]

    def mark(self, req: int, layer: int, end: int) -> None:
        """Record that positions up to ``end`` of ``req`` are expanded in ``layer``."""
        self.reqs[req][1][layer] = end

    def release(self, req: int) -> None:
        """Return the tensor of ``req`` to the pool (no-op if it has none)."""
        entry = self.reqs.pop(req, None)
        if entry is not None:
            self.pool.append(entry[0])

    def trim(self) -> None:
        """Free the pool (the running requests keep theirs)."""
        self.tokens -= sum(self._cap(t) for t in self.pool)
        self.pool.clear()

    def clear(self) -> None:
        """Free every tensor."""
        self.reqs.clear()
        self.pool.clear()
        self.tokens = 0


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
