"""A lean torch implementation of the paged Flash-LoRA-Attention call: the CPU fast path beside the references.

``flash_lora_attention_paged_cpu`` has the signature and semantics of ``flash_lora_attention_paged_ref`` (tested
against it). It is built for few-token steps over long contexts, where the cost is the number of torch ops:

- grouped-query heads are batched as rows (no K/V repetition per query head);
- the key term is expanded with ONE matmul of the gathered L_k rows against B_k (all KV heads side by side), then
  rotated into the gathered K in place: with X = L B = [X1 | X2] per head, K' = K + X * cos + [-X2 | X1] * sin
  (HF rotate_half; cos/sin repeat their halves), i.e. one full-width and two half-width fused multiply-adds. The
  matmul is the costly step on CPU (K = r is too thin for BLAS to run well), so it is kept H_kv*D wide rather than
  also producing rotate_half(X) through [B | rotate_half(B)];
- the value term is never expanded: O = P V + (P L_v) B_v (the Flash-LoRA-Attention reordering), which costs
  H*Sq*r per key instead of H_kv*D*r;
- single-query rows (decode) need no mask.

A serving engine calls :func:`paged_attention_cpu` with three extras made once: ``prepared`` (B laid out per adapter,
by :func:`prepare_b`, once per engine), ``plan`` (a :class:`Plan`: per-step bookkeeping shared by all layers) and
``lr_cache`` (the [num_lr_blocks, block_size, m*r] tensor of which ``lr_k_cache`` / ``lr_v_cache`` are views: one
gather instead of two).
"""
from __future__ import annotations

import torch

from ._args import check_paged


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
                 sin=None, n_kv: int = 1):
        self.cu, self.lens = cu_seqlens_q.tolist(), seq_lens.tolist()
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
                        lr_cache: torch.Tensor | None = None, plan: Plan | None = None):
    """The fast path with the engine's extras (``prepared``, ``plan``, ``lr_cache``; see the module doc); inputs are
    not checked."""
    total_q, n_heads, d = q.shape
    n_kv = k_cache.shape[2]
    group = n_heads // n_kv
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    has_lr = lr_k_cache is not None or lr_v_cache is not None
    if has_lr and prepared is None:
        prepared = prepare_b(b_k if lr_k_cache is not None else None, b_v if lr_v_cache is not None else None)
    if plan is None:
        plan = Plan(block_table, seq_lens, cu_seqlens_q, agent_ids, lr_block_table, k_cache.shape[1],
                    cos if lr_k_cache is not None else None, sin, n_kv)
    f32 = q.dtype == torch.float32 and k_cache.dtype == torch.float32
    k_flat, v_flat = k_cache.reshape(-1, n_kv, d), v_cache.reshape(-1, n_kv, d)    # views for contiguous caches
    if has_lr:
        bk, bv = prepared["k"], prepared["v"]
        if lr_cache is not None:
            lr_flat = lr_cache.reshape(-1, lr_cache.shape[-1])
        else:
            lr_flat = torch.cat([c.reshape(-1, c.shape[-1]) for c in (lr_k_cache, lr_v_cache) if c is not None], 1)
        r = lr_flat.shape[-1] // ((bk is not None) + (bv is not None))
    qs = (q if f32 else q.float()) * scale
    out = torch.empty_like(q)
    for b, n in enumerate(plan.lens):
        q0, q1 = plan.cu[b], plan.cu[b + 1]
        sq = q1 - q0
        if sq == 0:
            continue
        tok = plan.tok[b]
        k, v = k_flat.index_select(0, tok), v_flat.index_select(0, tok)          # [n, H_kv, D]
        if not f32:
            k, v = k.float(), v.float()
        if has_lr:
            a = plan.agents[b]
            lr = lr_flat.index_select(0, plan.lr_tok[b])                         # [n, m*r] = [L_k | L_v]
            if not f32:
                lr = lr.float()
            if bk is not None:                                                   # K' = K + RoPE(L_k B_k)
                x = (lr[:, :r] @ bk[a]).view(n, n_kv, 2, d // 2)                 # k is our gathered copy
                k.addcmul_(x.view(n, n_kv, d), plan.cos[b])
                k2, sin = k.view(n, n_kv, 2, d // 2), plan.sin[b].view(n, n_kv, 2, d // 2)
                k2[:, :, 0].addcmul_(x[:, :, 1], sin[:, :, 0], value=-1.0)
                k2[:, :, 1].addcmul_(x[:, :, 0], sin[:, :, 1])
        qb = qs[q0:q1].view(sq, n_kv, group, d).permute(1, 2, 0, 3).reshape(n_kv, group * sq, d)
        s = torch.bmm(qb, k.permute(1, 2, 0))                                   # [H_kv, G*sq, n]
        if sq > 1 and causal:
            mask = torch.ones(sq, n, dtype=torch.bool, device=q.device).triu_(n - sq + 1)
            s = s.view(n_kv, group, sq, n).masked_fill_(mask, float("-inf")).view(n_kv, group * sq, n)
        p = torch.softmax(s, dim=-1)
        o = torch.bmm(p, v.transpose(0, 1))                                      # [H_kv, G*sq, D]
        if has_lr and bv is not None:                                            # + (P L_v) B_v
            # P times the whole [L_k | L_v] row, then the L_v columns: CPU BLAS is about 2x slower on the
            # r-wide strided slice than on the full (m*r)-wide row, and the extra columns cost nothing here
            o = torch.baddbmm(o, torch.matmul(p, lr)[..., -r:], bv[a])
        out[q0:q1] = o.view(n_kv, group, sq, d).permute(2, 0, 1, 3).reshape(sq, n_heads, d)
    return out
