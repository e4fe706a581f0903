"""Public Triton entry points: `flash_lora_attention` (dense, SDPA layout), `flash_lora_attention_paged`.

    O = softmax(Q (K_base + RoPE(L_k B_k))^T * scale, causal bottom-right) (V_base + L_v B_v)

computed without materialising L B at full width: P L_v is accumulated r-wide beside P V_base under the same
online-softmax rescale and multiplied by B_v once per output tile; L_k B_k is expanded and rotated per KV tile in
registers. Each sequence b uses adapter ``agent_ids[b]`` of the stacked B tensors, so roles share one launch.
The torch references in `reference.py` have the same signatures and are the oracle of the tests.
"""
import torch

from ._args import check_dense, check_paged, index_tensor
from ._launch import _Problem, _as, _last_contig, _launch, _ready


def flash_lora_attention(q, k, v, lr_v=None, b_v=None, agent_ids=None, *, causal=True, softmax_scale=None,
                         lr_k=None, b_k=None, cos=None, sin=None, num_splits=None, out=None):
    """Dense Flash-LoRA-Attention.

    q [B, H, Sq, D] (post-RoPE); k, v [B, H_kv, Sk, D] base (k post-RoPE); lr_v, lr_k [B, Sk, r] scaled X A rows
    (lr_k pre-RoPE); b_v, b_k [N, H_kv, r, D]; agent_ids [B]; cos/sin [>=Sk, D] by key position. Any rank 1..128,
    H a multiple of H_kv, Sq <= Sk (bottom-right causal alignment). ``num_splits`` overrides the split-K factor
    used when Sq * H / H_kv <= 64 (decode). Returns [B, H, Sq, D] in q's dtype (written into ``out`` if given).
    """
    b_v, b_k, ids, r = check_dense(q, k, v, lr_v, b_v, agent_ids, lr_k, b_k, cos, sin, causal)
    upcast = _ready([q, k, v, lr_v, lr_k], lr_k is not None)
    if upcast is not None:
        o = flash_lora_attention(*(_as(t, upcast) for t in (q, k, v, lr_v, b_v)), ids, causal=causal,
                                 softmax_scale=softmax_scale, lr_k=_as(lr_k, upcast), b_k=_as(b_k, upcast),
                                 cos=_as(cos, upcast), sin=_as(sin, upcast), num_splits=num_splits)
        return _into(out, o.to(q.dtype))
    q, k, v, lr_v, lr_k, b_v, b_k, cos, sin = map(_last_contig, (q, k, v, lr_v, lr_k, b_v, b_k, cos, sin))
    cos, sin = _rope_tables(cos, sin)
    batch, n_heads, sq, _ = q.shape
    h_kv, sk = k.shape[1], k.shape[2]
    o = _output(out, q)
    if o.numel() == 0:
        return o
    p = _Problem(q=q, k=k, v=v, o=o, q_strides=(q.stride(0), q.stride(2), q.stride(1)),
                 o_strides=(o.stride(0), o.stride(2), o.stride(1)), k_strides=(k.stride(0), k.stride(2), k.stride(1)),
                 v_strides=(v.stride(0), v.stride(2), v.stride(1)), batch=batch, n_heads=n_heads, h_kv=h_kv,
                 max_q=sq, max_k=sk, sq=sq, sk=sk, lr_v=lr_v, lr_k=lr_k, lr_strides=_lr_strides(lr_v, lr_k),
                 b_v=b_v, b_k=b_k, cos=cos, sin=sin, agent_ids=ids, r=r)
    return _launch(p, causal, softmax_scale, num_splits)


def flash_lora_attention_paged(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, lr_v_cache=None,
                               b_v=None, agent_ids=None, lr_block_table=None, lr_k_cache=None, b_k=None, cos=None,
                               sin=None, softmax_scale=None, causal=True, max_seqlen_q=None, max_seqlen_k=None,
                               num_splits=None, out=None):
    """Paged/varlen Flash-LoRA-Attention for the serving engine.

    q [total_q, H, D] varlen-packed by cu_seqlens_q [B+1]; k_cache, v_cache [num_blocks, block_size, H_kv, D];
    block_table [B, max_blocks]; seq_lens [B] keys per sequence (prefix + new tokens, already written); query i of
    sequence b sits at position seq_lens[b] - q_len_b + i. lr_v_cache, lr_k_cache [num_lr_blocks, lr_block_size, r]
    through lr_block_table (default block_table); b_v, b_k [N, H_kv, r, D]; agent_ids [B]; cos/sin
    [max_positions, D] by absolute key position. Optional hints max_seqlen_q / max_seqlen_k (host ints) avoid a
    device sync; ``num_splits`` overrides the split-K factor. Returns [total_q, H, D] in q's dtype (written into
    ``out`` if given).
    """
    b_v, b_k, ids, r, lr_block_table = check_paged(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                                                   lr_v_cache, b_v, agent_ids, lr_block_table, lr_k_cache, b_k,
                                                   cos, sin)
    upcast = _ready([q, k_cache, v_cache, lr_v_cache, lr_k_cache], lr_k_cache is not None)
    if upcast is not None:
        o = flash_lora_attention_paged(
            _as(q, upcast), _as(k_cache, upcast), _as(v_cache, upcast), block_table, seq_lens, cu_seqlens_q,
            lr_v_cache=_as(lr_v_cache, upcast), b_v=_as(b_v, upcast), agent_ids=ids, lr_block_table=lr_block_table,
            lr_k_cache=_as(lr_k_cache, upcast), b_k=_as(b_k, upcast), cos=_as(cos, upcast), sin=_as(sin, upcast),
            softmax_scale=softmax_scale, causal=causal, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
            num_splits=num_splits)
        return _into(out, o.to(q.dtype))
    q, k_cache, v_cache, lr_v_cache, lr_k_cache, b_v, b_k, cos, sin = map(
        _last_contig, (q, k_cache, v_cache, lr_v_cache, lr_k_cache, b_v, b_k, cos, sin))
    cos, sin = _rope_tables(cos, sin)
    batch, n_heads = block_table.shape[0], q.shape[1]
    o = _output(out, q)
    if batch == 0 or q.shape[0] == 0:
        return o
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if max_seqlen_k is None:
        max_seqlen_k = int(seq_lens.max())
    lr_cache = lr_v_cache if lr_v_cache is not None else lr_k_cache
    ints = lambda t: index_tensor(t, q.device)  # noqa: E731
    p = _Problem(q=q, k=k_cache, v=v_cache, o=o, q_strides=(0, q.stride(0), q.stride(1)),
                 o_strides=(0, o.stride(0), o.stride(1)), k_strides=_cache_strides(k_cache),
                 v_strides=_cache_strides(v_cache), batch=batch, n_heads=n_heads, h_kv=k_cache.shape[2],
                 max_q=max_seqlen_q, max_k=max_seqlen_k, page=k_cache.shape[1],
                 lr_page=lr_cache.shape[1] if lr_cache is not None else 1, paged=True, varlen=True,
                 lr_v=lr_v_cache, lr_k=lr_k_cache, lr_strides=_lr_strides(lr_v_cache, lr_k_cache), b_v=b_v, b_k=b_k,
                 cos=cos, sin=sin, agent_ids=ids, block_table=ints(block_table),
                 lr_block_table=ints(lr_block_table), cu_seqlens_q=ints(cu_seqlens_q), seq_lens=ints(seq_lens),
                 r=r)
    return _launch(p, causal, softmax_scale, num_splits)


def _output(out, q):
    """The output tensor: ``out`` (same shape and dtype as q, last dim contiguous) or a new one like q."""
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device} with a contiguous last dim")
    return out


def _into(out, o):
    return o if out is None else out.copy_(o)


def _cache_strides(cache):
    """(block, slot, head) strides of a [num_blocks, block_size, H_kv, D] cache."""
    return cache.stride(0), cache.stride(1), cache.stride(2)


def _lr_strides(lr_v, lr_k):
    """(block-or-batch, token) strides of the low-rank caches, zeros for absent ones."""
    s_v = (lr_v.stride(0), lr_v.stride(1)) if lr_v is not None else (0, 0)
    s_k = (lr_k.stride(0), lr_k.stride(1)) if lr_k is not None else (0, 0)
    return (*s_v, *s_k)


def _rope_tables(cos, sin):
    """The kernel reads sin with cos's row stride: make both contiguous when their strides differ."""
    if cos is not None and cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin
