"""Pure-torch references for Flash-LoRA-Attention (materialise K', V' per row; the oracle for every kernel test).

For a sequence using adapter a (``agent_ids``):

    V' = V_base + L_v B_v[a]                       L_v: [Sk, r] (scaling already folded in), B_v[a]: [H_kv, r, D]
    K' = K_base + RoPE(L_k B_k[a])                 RoPE(x) = x * cos + rotate_half(x) * sin (HF convention,
                                                   rotate_half(x) = cat(-x[D/2:], x[:D/2]); cos/sin by key position)
    O  = softmax(Q K'^T * scale + causal mask) V'  query head h reads KV head h // (H / H_kv); query i of a sequence
                                                   with Sq queries and Sk keys sits at position Sk - Sq + i
                                                   (bottom-right alignment) and sees keys j <= Sk - Sq + i.

Computation is in float32, or float64 when any input is float64; the result is returned in q's dtype. The paged
reference gathers each sequence's blocks with one index per sequence (a Python loop over sequences, none over
tokens), so it doubles as the engine's CPU attention path.
"""
import math

import torch

from ._args import check_dense, check_paged


def _compute_dtype(*tensors):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def rotate_half(x):
    """HF rotate_half: [x1, x2] -> [-x2, x1] along the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attend_one(q, k, v, *, lr_v=None, b_v=None, lr_k=None, b_k=None, cos=None, sin=None, causal=True,
               softmax_scale=None, dtype=torch.float32):
    """One sequence. q [Sq, H, D]; k, v [Sk, H_kv, D]; lr_v/lr_k [Sk, r]; b_v/b_k [H_kv, r, D]; cos/sin [Sk, D].

    Works KV-head-major: the G = H / H_kv query heads of a KV head are stacked as G * Sq rows, so K', V' are
    materialised once per KV head and every product is one batched matmul. Returns [Sq, H, D] in ``dtype``.
    """
    sq, h, d = q.shape
    sk, h_kv = k.shape[0], k.shape[1]
    group = h // h_kv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    k = k.to(dtype).transpose(0, 1)  # [H_kv, Sk, D]
    v = v.to(dtype).transpose(0, 1)
    if lr_v is not None:
        v = v + torch.matmul(lr_v.to(dtype), b_v.to(dtype))  # [Sk, r] @ [H_kv, r, D] -> [H_kv, Sk, D]
    if lr_k is not None:
        delta = torch.matmul(lr_k.to(dtype), b_k.to(dtype))
        k = k + delta * cos[:sk].to(dtype) + rotate_half(delta) * sin[:sk].to(dtype)
    rows = q.to(dtype).permute(1, 0, 2).reshape(h_kv, group * sq, d)  # row g * Sq + i: head kvh * G + g, query i
    scores = torch.matmul(rows, k.transpose(1, 2)) * scale  # [H_kv, G * Sq, Sk]
    if causal:
        pos_q = (torch.arange(sq, device=q.device) + (sk - sq)).repeat(group)
        visible = torch.arange(sk, device=q.device)[None, :] <= pos_q[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [H_kv, G * Sq, D]
    return out.view(h, sq, d).transpose(0, 1)


def flash_lora_attention_ref(q, k, v, lr_v=None, b_v=None, agent_ids=None, *, causal=True, softmax_scale=None,
                             lr_k=None, b_k=None, cos=None, sin=None, num_splits=None, out=None):
    """Dense reference. q [B, H, Sq, D]; k, v [B, H_kv, Sk, D]; lr_v, lr_k [B, Sk, r]; b_v, b_k [N, H_kv, r, D];
    agent_ids [B]; cos/sin [>=Sk, D]. Returns [B, H, Sq, D] in q's dtype, written into ``out`` if given
    (num_splits is a kernel hint, ignored here)."""
    b_v, b_k, ids, _ = check_dense(q, k, v, lr_v, b_v, agent_ids, lr_k, b_k, cos, sin, causal)
    dtype = _compute_dtype(q, k, v, lr_v, b_v, lr_k, b_k)
    ids = ids.tolist() if ids is not None else None
    out = torch.empty_like(q) if out is None else out
    for b in range(q.shape[0]):
        a = ids[b] if ids is not None else 0
        o = attend_one(q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1),
                       lr_v=None if lr_v is None else lr_v[b], b_v=None if b_v is None else b_v[a],
                       lr_k=None if lr_k is None else lr_k[b], b_k=None if b_k is None else b_k[a],
                       cos=cos, sin=sin, causal=causal, softmax_scale=softmax_scale, dtype=dtype)
        out[b] = o.transpose(0, 1).to(q.dtype)
    return out


def gather_pages(cache, table_row, n_tokens):
    """Rows [0, n_tokens) of one sequence from a paged cache [num_blocks, block_size, ...]."""
    block_size = cache.shape[1]
    n_blocks = -(-n_tokens // block_size)
    blocks = table_row[:n_blocks].long()
    return cache[blocks].reshape(n_blocks * block_size, *cache.shape[2:])[:n_tokens]


def flash_lora_attention_paged_ref(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, lr_v_cache=None,
                                   b_v=None, agent_ids=None, lr_block_table=None, lr_k_cache=None, b_k=None,
                                   cos=None, sin=None, softmax_scale=None, causal=True, max_seqlen_q=None,
                                   max_seqlen_k=None, num_splits=None, out=None):
    """Paged/varlen reference with the signature of ``flash_lora_attention_paged`` (the hints max_seqlen_q,
    max_seqlen_k and num_splits only tune the kernel and are ignored here).

    q [total_q, H, D] packed by cu_seqlens_q [B+1]; k_cache, v_cache [num_blocks, block_size, H_kv, D];
    block_table [B, max_blocks]; seq_lens [B] keys per sequence (cached prefix + new tokens, already written);
    lr_v_cache, lr_k_cache [num_lr_blocks, lr_block_size, r] addressed through lr_block_table (default block_table);
    b_v, b_k [N, H_kv, r, D]; agent_ids [B]; cos/sin [max_positions, D] by absolute key position.
    Returns [total_q, H, D] in q's dtype, written into ``out`` if given.
    """
    b_v, b_k, ids, _, lr_block_table = check_paged(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                                                   lr_v_cache, b_v, agent_ids, lr_block_table, lr_k_cache, b_k,
                                                   cos, sin)
    dtype = _compute_dtype(q, k_cache, v_cache, lr_v_cache, lr_k_cache, b_v, b_k)
    lens = seq_lens.tolist()
    starts = cu_seqlens_q.tolist()
    ids = ids.tolist() if ids is not None else None
    out = torch.empty_like(q) if out is None else out
    for b, n_keys in enumerate(lens):
        q_b = q[starts[b]:starts[b + 1]]
        if q_b.shape[0] == 0:
            continue
        if q_b.shape[0] > n_keys:
            raise ValueError(f"sequence {b}: {q_b.shape[0]} queries but only {n_keys} keys")
        a = ids[b] if ids is not None else 0
        lr = {}
        if lr_v_cache is not None:
            lr.update(lr_v=gather_pages(lr_v_cache, lr_block_table[b], n_keys), b_v=b_v[a])
        if lr_k_cache is not None:
            lr.update(lr_k=gather_pages(lr_k_cache, lr_block_table[b], n_keys), b_k=b_k[a], cos=cos, sin=sin)
        o = attend_one(q_b, gather_pages(k_cache, block_table[b], n_keys),
                       gather_pages(v_cache, block_table[b], n_keys), causal=causal,
                       softmax_scale=softmax_scale, dtype=dtype, **lr)
        out[starts[b]:starts[b + 1]] = o.to(q.dtype)
    return out
