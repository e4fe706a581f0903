"""A lean torch implementation of the paged Flash-LoRA-Attention call: the CPU fast path beside the references.

``flash_lora_attention_paged_cpu`` has the signature and semantics of ``flash_lora_attention_paged_ref`` (tested
against it). Per sequence it reads the rows it attends over, then runs dense attention (``cpu_sdpa.attend``: fused
flash kernels for prefill chunks, plain matmuls for a few queries; grouped-query heads batched as rows, no K/V
repetition):

- base modes: the gathered base K/V;
- low-rank modes: K' = K + RoPE(L_k B_k) from ONE matmul of the gathered L_k rows against B_k (all KV heads side by
  side), rotated into the gathered K in place: with X = L B = [X1 | X2] per head, K' = K + X * cos + [-X2 | X1] *
  sin (HF rotate_half; cos/sin repeat their halves). For a prefill chunk V' = V + L_v B_v is expanded too (the
  fused kernel needs it); for a few queries without a workspace the value term is never expanded:
  O = P V + (P L_v) B_v (the Flash-LoRA-Attention reordering, H*Sq*r per key instead of H_kv*D*r).

A serving engine calls :func:`paged_attention_cpu` with extras made once: ``prepared`` (B laid out per adapter, by
:func:`prepare_b`, once per engine), ``plan`` (a :class:`Plan`: per-step bookkeeping shared by all layers),
``lr_cache`` (the [num_lr_blocks, block_size, m*r] tensor of which ``lr_k_cache`` / ``lr_v_cache`` are views: one
gather instead of two) and a ``workspace`` (``cpu_workspace.Workspace``: each running request's K'/V' rows, so
that a step expands only its new positions).
"""
from __future__ import annotations

import torch

from ._args import check_paged
from .cpu_sdpa import DECODE_MAX_Q, attend
from .cpu_workspace import Workspace


def prepare_b(b_k: torch.Tensor | None, b_v: torch.Tensor | None) -> dict:
    """b_k, b_v [N, H_kv, r, D] -> {"k": per adapter [r, H_kv*D] (the KV heads side by side), "v": per adapter
    [H_kv, r, D]} (fp32 lists, None where absent), laid out once for :func:`paged_attention_cpu`."""
    out = {"k": None, "v": None}
    if b_k is not None:
        n, h_kv, r, d = b_k.shape
        out["k"] = list(b_k.float().permute(0, 2, 1, 3).reshape(n, r, h_kv * d).contiguous())
    if b_v is not None:
        out["v"] = list(b_v.float().contiguous())
    return out


def expand_rope(cos: torch.Tensor, sin: torch.Tensor, n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [P, D] -> fp32 [P, H_kv, D], contiguous: broadcasting over the KV heads in the per-layer
    multiply-adds is slow, and expanding per step costs two copies."""
    return tuple(t.float()[:, None, :].expand(-1, n_kv, -1).contiguous() for t in (cos, sin))


class Plan:
    """What every layer of one engine step shares: per-sequence lists and flat token indices into the caches
    (block * block_size + slot for positions 0..n-1), and the RoPE rows of the key positions. Built once per step.

    ``cos``/``sin`` are [P, D] tables, or [P, H_kv, D] fp32 tables already expanded over the KV heads
    (:func:`expand_rope`, what the engine keeps): then the per-sequence rows are views, not copies."""

    def __init__(self, block_table, seq_lens, cu_seqlens_q, agent_ids, lr_block_table, block_size, cos=None,
                 sin=None, n_kv: int = 1, req_ids: list[int] | None = None):
        self.cu, self.lens = cu_seqlens_q.tolist(), seq_lens.tolist()
        self.req_ids = req_ids        # per sequence, the request id keying its Workspace entry (None: no workspace)
        self.agents = agent_ids.tolist() if agent_ids is not None else [0] * len(self.lens)
        self.tok = self._token_index(block_table, block_size)
        self.lr_tok = self.tok if lr_block_table is None or lr_block_table is block_table else \
            self._token_index(lr_block_table, block_size)
        self.cos = self.sin = None
        if cos is not None:
            if cos.dim() == 2:
                cos, sin = expand_rope(cos[:max(self.lens)], sin[:max(self.lens)], n_kv)
            self.cos = [cos[:n] for n in self.lens]
            self.sin = [sin[:n] for n in self.lens]

    def _token_index(self, table, bs):
        slots = torch.arange(bs, device=table.device)
        flat = (table.long()[:, :, None] * bs + slots).view(table.shape[0], -1)
        return [flat[b, :n] for b, n in enumerate(self.lens)]


def flash_lora_attention_paged_cpu(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, lr_v_cache=None,
                                   b_v=None, agent_ids=None, lr_block_table=None, lr_k_cache=None, b_k=None,
                                   cos=None, sin=None, softmax_scale=None, causal=True, max_seqlen_q=None,
                                   max_seqlen_k=None, num_splits=None, out=None):
    """``flash_lora_attention_paged_ref`` computed by the torch fast path (fp32 math); the hints max_seqlen_q,
    max_seqlen_k and num_splits are ignored. Returns [total_q, H, D] in q's dtype (into ``out`` if given)."""
    b_v, b_k, agent_ids, _, lr_block_table = check_paged(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                                                         lr_v_cache, b_v, agent_ids, lr_block_table, lr_k_cache,
                                                         b_k, cos, sin)
    o = paged_attention_cpu(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, lr_v_cache=lr_v_cache, b_v=b_v,
                            agent_ids=agent_ids, lr_block_table=lr_block_table, lr_k_cache=lr_k_cache, b_k=b_k,
                            cos=cos, sin=sin, softmax_scale=softmax_scale, causal=causal)
    if out is None:
        return o
    out.copy_(o)
    return out


def paged_attention_cpu(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, lr_v_cache=None, b_v=None,
                        agent_ids=None, lr_block_table=None, lr_k_cache=None, b_k=None, cos=None, sin=None,
                        softmax_scale=None, causal=True, prepared: dict | None = None,
                        lr_cache: torch.Tensor | None = None, plan: Plan | None = None,
                        workspace: Workspace | None = None, layer: int = 0):
    """The fast path with the engine's extras (``prepared``, ``plan``, ``lr_cache``, and a :class:`Workspace` of
    expanded K'/V' per request with the ``layer`` index; see the module doc); inputs are not checked."""
    total_q, n_heads, d = q.shape
    n_kv = k_cache.shape[2]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    has_lr = lr_k_cache is not None or lr_v_cache is not None
    if has_lr and prepared is None:
        prepared = prepare_b(b_k if lr_k_cache is not None else None, b_v if lr_v_cache is not None else None)
    if plan is None:
        plan = Plan(block_table, seq_lens, cu_seqlens_q, agent_ids, lr_block_table, k_cache.shape[1],
                    cos if lr_k_cache is not None else None, sin, n_kv)
    src = _Source(k_cache, v_cache, q.dtype, plan, prepared if has_lr else None, lr_k_cache, lr_v_cache, lr_cache)
    out = torch.empty_like(q)
    for b, n in enumerate(plan.lens):
        q0, q1 = plan.cu[b], plan.cu[b + 1]
        sq = q1 - q0
        if sq == 0:
            continue
        qb = q[q0:q1] if q.dtype == torch.float32 else q[q0:q1].float()
        req = plan.req_ids[b] if plan.req_ids is not None else None
        if has_lr and workspace is not None and req is not None and workspace.reserve(req, n):
            start = workspace.filled(req, layer)
            if start < n:
                workspace.write(req, layer, start, *src.expanded(b, start, n))
            o = attend(qb, *workspace.rows(req, layer, n), scale, causal)
        elif has_lr and sq <= DECODE_MAX_Q and src.bv is not None:
            o = _decode_value_lora(qb, src, b, n, scale, causal)
        elif has_lr:
            k, v = src.expanded(b, 0, n)
            o = attend(qb, k.transpose(0, 1), v.transpose(0, 1), scale, causal)
        else:
            k, v = src.base(b, 0, n)
            o = attend(qb, k.transpose(0, 1), v.transpose(0, 1), scale, causal)
        out[q0:q1] = o
    return out


class _Source:
    """Reads one sequence's rows from the paged caches (fp32): base K/V, and K' = K + RoPE(L_k B_k),
    V' = V + L_v B_v in the low-rank modes."""

    def __init__(self, k_cache, v_cache, dtype, plan, prepared, lr_k_cache, lr_v_cache, lr_cache):
        n_kv, d = k_cache.shape[2], k_cache.shape[3]
        self.plan, self.n_kv, self.d = plan, n_kv, d
        self.f32 = dtype == torch.float32 and k_cache.dtype == torch.float32
        self.k_flat, self.v_flat = k_cache.reshape(-1, n_kv, d), v_cache.reshape(-1, n_kv, d)   # views if contiguous
        self.bk = self.bv = None
        if prepared is not None:
            self.bk, self.bv = prepared["k"], prepared["v"]
            if lr_cache is not None:
                self.lr_flat = lr_cache.reshape(-1, lr_cache.shape[-1])
            else:
                self.lr_flat = torch.cat([c.reshape(-1, c.shape[-1]) for c in (lr_k_cache, lr_v_cache)
                                          if c is not None], 1)
            self.r = self.lr_flat.shape[-1] // ((self.bk is not None) + (self.bv is not None))

    def _f32(self, t):
        return t if self.f32 else t.float()

    def base(self, b: int, start: int, end: int):
        """Base K, V [end-start, H_kv, D] of positions start..end-1 of sequence b (our own copies)."""
        tok = self.plan.tok[b][start:end]
        return self._f32(self.k_flat.index_select(0, tok)), self._f32(self.v_flat.index_select(0, tok))

    def lowrank(self, b: int, start: int, end: int):
        """The rows [L_k | L_v] [end-start, m*r] of positions start..end-1 of sequence b."""
        return self._f32(self.lr_flat.index_select(0, self.plan.lr_tok[b][start:end]))

    def expanded(self, b: int, start: int, end: int, value: bool = True):
        """K' (and V' when ``value``, else base V) [end-start, H_kv, D] of positions start..end-1 of sequence b."""
        k, v = self.base(b, start, end)
        lr, a, r = self.lowrank(b, start, end), self.plan.agents[b], self.r
        m, n_kv, d = end - start, self.n_kv, self.d
        if self.bk is not None:              # K' = K + X cos + rotate_half(X) sin, X = L_k B_k (k is our copy)
            x = (lr[:, :r] @ self.bk[a]).view(m, n_kv, 2, d // 2)
            cos, sin = self.plan.cos[b][start:end], self.plan.sin[b][start:end].view(m, n_kv, 2, d // 2)
            k.addcmul_(x.view(m, n_kv, d), cos)
            k2 = k.view(m, n_kv, 2, d // 2)
            k2[:, :, 0].addcmul_(x[:, :, 1], sin[:, :, 0], value=-1.0)
            k2[:, :, 1].addcmul_(x[:, :, 0], sin[:, :, 1])
        if value and self.bv is not None:    # V' = V + L_v B_v, all KV heads in one batched matmul
            v.transpose(0, 1).baddbmm_(lr[:, -r:].expand(n_kv, m, r), self.bv[a])
        return k, v


def _decode_value_lora(qb, src, b, n, scale, causal):
    """A few queries without a workspace: K' expanded, the value term never: O = P V + (P L_v) B_v (the
    Flash-LoRA-Attention reordering, H*sq*r per key instead of H_kv*D*r)."""
    sq, h, d = qb.shape
    n_kv = src.n_kv
    g = h // n_kv
    k, v = src.expanded(b, 0, n, value=False)
    lr = src.lowrank(b, 0, n)
    qg = (qb * scale).view(sq, n_kv, g, d).permute(1, 2, 0, 3).reshape(n_kv, g * sq, d)
    s = torch.bmm(qg, k.permute(1, 2, 0))                                             # [H_kv, G*sq, n]
    if sq > 1 and causal:
        mask = torch.ones(sq, n, dtype=torch.bool, device=qb.device).triu_(n - sq + 1)
        s = s.view(n_kv, g, sq, n).masked_fill_(mask, float("-inf")).view(n_kv, g * sq, n)
    p = torch.softmax(s, dim=-1)
    o = torch.bmm(p, v.transpose(0, 1))
    # P times the whole [L_k | L_v] row, then the L_v columns: CPU BLAS is about 2x slower on the r-wide strided
    # slice than on the full (m*r)-wide row, and the extra columns cost nothing here
    o = torch.baddbmm(o, torch.matmul(p, lr)[..., -src.r:], src.bv[src.plan.agents[b]])
    return o.view(n_kv, g, sq, d).permute(2, 0, 1, 3).reshape(sq, h, d)
