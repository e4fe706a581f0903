"""Per-request workspace of expanded keys and values for the CPU fast path in the low-rank cache modes.

In lrshared (and baseshared, lrbase) the cache holds base K/V and the low-rank rows L; a role reads
K' = K + RoPE(L_k B_k) and V' = V + L_v B_v with its own B. Expanding K' and V' over the whole context costs
n * r * H_kv * D multiply-adds per layer, several times the attention of one decode step, so re-expanding at every
step of every running request makes the low-rank modes much slower per token than fullshared. The workspace keeps,
for each running request, K' and V' of the positions already expanded ([layers, 2, H_kv, capacity, D], fp32); a
step expands only its new positions. It is a copy of what the request reads, not cache: the paged pool stays the
shared store, the workspace is freed when the request finishes, is aborted or is preempted (``release``), and its
total size is bounded by ``max_tokens`` (a request that does not fit runs without one, re-expanding as before).

Cache rows never change once written (the pool is append-only per sequence and shared prefixes are immutable),
so a workspace row stays valid for as long as its request runs.
"""
from __future__ import annotations

import torch


class Workspace:
    """K'/V' rows per running request, by request id; ``max_tokens`` bounds the summed capacity of all of them."""

    def __init__(self, num_layers: int, n_kv: int, head_dim: int, max_tokens: int, device="cpu"):
        self.num_layers, self.n_kv, self.head_dim = num_layers, n_kv, head_dim
        self.max_tokens, self.device = max_tokens, device
        self.reqs: dict[int, list] = {}       # id -> [tensor [L, 2, H_kv, cap, D], filled rows per layer]
        self.tokens = 0                       # summed capacity (rows) of every request's tensor

    @property
    def bytes(self) -> int:
        """Bytes held by every request's workspace now."""
        return self.tokens * self.num_layers * 2 * self.n_kv * self.head_dim * 4

    def reserve(self, req: int, n: int) -> bool:
        """Make room for ``n`` rows of request ``req``; False (and nothing held for it) when the bound forbids it."""
        entry = self.reqs.get(req)
        cap = 0 if entry is None else entry[0].shape[3]
        if n <= cap:
            return True
        new_cap = max(n, 2 * cap, 64)
        if self.tokens - cap + new_cap > self.max_tokens:
            new_cap = n
        if self.tokens - cap + new_cap > self.max_tokens:
            self.release(req)
            return False
        t = torch.empty(self.num_layers, 2, self.n_kv, new_cap, self.head_dim, dtype=torch.float32,
                        device=self.device)
        if entry is None:
            self.reqs[req] = [t, [0] * self.num_layers]
        else:
            old, filled = entry
            for layer, m in enumerate(filled):
                t[layer, :, :, :m] = old[layer, :, :, :m]
            entry[0] = t
        self.tokens += new_cap - cap
        return True

    def filled(self, req: int, layer: int) -> int:
        """How many leading positions of ``req`` are expanded in ``layer``."""
        return self.reqs[req][1][layer]

    def rows(self, req: int, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views K', V' [H_kv, n, D] of the first ``n`` positions of ``req`` in ``layer``."""
        t = self.reqs[req][0][layer]
        return t[0, :, :n], t[1, :, :n]

    def write(self, req: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K', V' rows [m, H_kv, D] at positions start..start+m-1 (start must equal ``filled``)."""
        entry = self.reqs[req]
        t, m = entry[0][layer], k.shape[0]
        t[0, :, start:start + m] = k.transpose(0, 1)
        t[1, :, start:start + m] = v.transpose(0, 1)
        entry[1][layer] = start + m

    def release(self, req: int) -> None:
        """Free the workspace of ``req`` (no-op if it has none)."""
        entry = self.reqs.pop(req, None)
        if entry is not None:
            self.tokens -= entry[0].shape[3]

    def clear(self) -> None:
        """Free every request's workspace."""
        self.reqs.clear()
        self.tokens = 0
