"""Dense attention for the CPU fast path: fused kernels for multi-query chunks, plain matmuls for decode.

A prefill chunk of ``sq`` queries over ``n = p + sq`` keys (the chunk's own keys last, causal bottom-right) is split
into the part every query sees in full, the ``p`` prefix keys, and the ``sq x sq`` diagonal block:

- prefix: PyTorch's CPU flash-attention kernel with no mask; the queries of one KV head's group are stacked as rows
  of that head (grouped-query attention without repeating K/V);
- diagonal: the same kernel with ``is_causal`` (top-left equals bottom-right on a square block);
- merge by the two log-sum-exps: ``o = o_diag + (o_prefix - o_diag) * sigmoid(lse_prefix - lse_diag)``.

PyTorch's public ``scaled_dot_product_attention`` runs its unfused math path on CPU as soon as a mask is given (the
bottom-right causal mask of a chunk after a prefix), and does not return the log-sum-exp; so the split calls the
flash kernel's ATen op, whose output and log-sum-exp are tested against a float64 reference. Where that op is
missing (another PyTorch build) the chunk runs through the public call with an explicit mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
DECODE_MAX_Q = 1        # chunks up to this many queries use plain matmuls (measured: the split wins from 2 on)


def flash_available() -> bool:
    """True when this PyTorch build has the CPU flash-attention op that returns the log-sum-exp."""
    return _FLASH is not None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale, causal bottom-right) v for one sequence: q [sq, H, D]; k, v [H_kv, n, D] (views are
    fine) with H a multiple of H_kv (query head h reads KV head h // (H / H_kv)). Returns [sq, H, D] in q's dtype."""
    sq, h = q.shape[:2]
    n_kv, n = k.shape[0], k.shape[1]
    qg = group_queries(q, n_kv)
    if sq <= DECODE_MAX_Q or not causal or sq > n:
        o = torch.bmm(probabilities(qg * scale, k, sq, causal), v)
    elif _FLASH is None:
        o = _attend_masked_sdpa(qg, k, v, scale, sq)
    else:
        o = _attend_split(qg, k, v, scale, sq)
    return ungroup(o, sq, h)


def group_queries(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """q [sq, H, D] -> [H_kv, G*sq, D]: each KV head's group of query heads stacked as rows (member, query)."""
    sq, h, d = q.shape
    return q.view(sq, n_kv, h // n_kv, d).permute(1, 2, 0, 3).reshape(n_kv, h // n_kv * sq, d)


def ungroup(o: torch.Tensor, sq: int, h: int) -> torch.Tensor:
    """The inverse of :func:`group_queries`: [H_kv, G*sq, D] -> [sq, H, D]."""
    n_kv, _, d = o.shape
    return o.view(n_kv, h // n_kv, sq, d).permute(2, 0, 1, 3).reshape(sq, h, d)


def probabilities(qg: torch.Tensor, k: torch.Tensor, sq: int, causal: bool) -> torch.Tensor:
    """softmax(qg k^T, causal bottom-right) [H_kv, G*sq, n] for grouped, already scaled queries; k [H_kv, n, D]."""
    n = k.shape[1]
    s = torch.bmm(qg, k.transpose(1, 2))
    if sq > 1 and causal:
        mask = torch.ones(sq, n, dtype=torch.bool, device=qg.device).triu_(n - sq + 1)
        s = s.view(k.shape[0], -1, sq, n).masked_fill_(mask, float("-inf")).view_as(s)
    return torch.softmax(s, dim=-1)


def _attend_split(qg, k, v, scale, sq):
    n_kv, rows, d = qg.shape
    g, p = rows // sq, k.shape[1] - sq
    # diagonal block: each query head against its KV head's last sq keys (small copies of K/V)
    kd = k[:, p:, None].expand(n_kv, sq, g, d).transpose(1, 2).reshape(1, n_kv * g, sq, d)
    vd = v[:, p:, None].expand(n_kv, sq, g, d).transpose(1, 2).reshape(1, n_kv * g, sq, d)
    o_d, lse_d = _FLASH(qg.view(1, n_kv * g, sq, d), kd, vd, is_causal=True, scale=scale)[:2]
    o_d, lse_d = o_d.reshape(n_kv, rows, d), lse_d.reshape(n_kv, rows)
    if p == 0:
        return o_d
    o_p, lse_p = _FLASH(qg[None], k[None, :, :p], v[None, :, :p], scale=scale)[:2]
    w = torch.sigmoid(lse_p.reshape(n_kv, rows) - lse_d).unsqueeze(-1)                  # weight of the prefix part
    return o_d.addcmul_(o_p.reshape(n_kv, rows, d) - o_d, w)


def _attend_masked_sdpa(qg, k, v, scale, sq):
    n_kv, rows, d = qg.shape
    n = k.shape[1]
    keep = torch.ones(sq, n, dtype=torch.bool, device=qg.device).tril_(n - sq)
    keep = keep.repeat(rows // sq, 1)                                                 # rows are (member, query)
    return F.scaled_dot_product_attention(qg[None], k[None], v[None], attn_mask=keep, scale=scale)[0]
