"""A lean torch implementation of the paged Flash-LoRA-Attention call: the CPU fast path beside the references.

``flash_lora_attention_paged_cpu`` has the signature and semantics of ``flash_lora_attention_paged_ref`` (tested
against it). Per sequence it reads the rows it attends over, then runs dense attention (``cpu_sdpa.attend``: fused
flash kernels for prefill chunks, plain matmuls for a few queries; grouped-query heads batched as rows, no K/V
repetition):

- base modes: the gathered base K/V;
- low-rank modes: K' = K + RoPE(L_k B_k): with X = L B = [X1 | X2] per head, K' = K + X * cos + [-X2 | X1] * sin
  (HF rotate_half), by the native kernel (``cpu_native``: one pass per row that gathers K, accumulates L B in
  registers and writes K') or, without it, by ONE matmul of the gathered L_k rows against B_k (all KV heads side by
  side) rotated into the gathered K in place. For a prefill chunk V' = V + L_v B_v is expanded too (the fused
  kernel needs it); for a few queries the value term is never expanded: O = P V + (P L_v) B_v (the
  Flash-LoRA-Attention reordering, H*sq*r per key instead of H_kv*D*r).

A serving engine calls :func:`paged_attention_cpu` with extras made once: ``prepared`` (B laid out per adapter, by
:func:`prepare_b`, once per engine), ``plan`` (a :class:`Plan`: per-step bookkeeping shared by all layers),
``lr_cache`` (the [num_lr_blocks, block_size, m*r] tensor of which ``lr_k_cache`` / ``lr_v_cache`` are views: one
gather instead of two) and a ``workspace`` (``cpu_workspace.Workspace``: each running request's K' rows, so that a
step expands only its new positions). A step whose sequences each have one query skips this function:
``cpu_step.DecodeStep`` runs the same kernels with the per-layer arguments made once per step.
"""
from __future__ import annotations

import torch

from ._args import check_paged
from . import cpu_native
from .cpu_sdpa import DECODE_MAX_Q, attend, group_queries, probabilities, ungroup
from .cpu_workspace import Scratch, Workspace


def prepare_b(b_k: torch.Tensor | None, b_v: torch.Tensor | None) -> dict:
    """b_k, b_v [N, H_kv, r, D] -> per adapter, fp32: {"k_f"/"v_f": B with the KV heads side by side, [r, H_kv*D], as
    a :func:`factor` pair; "v": [H_kv, r, D]} (None where absent), laid out once for :func:`paged_attention_cpu`."""
    out = {"v": None, "k_f": None, "v_f": None}

    def side_by_side(b):
        n, h_kv, r, d = b.shape
        return list(b.float().permute(0, 2, 1, 3).reshape(n, r, h_kv * d).contiguous())
    if b_k is not None:
        out["k_f"] = [factor(b) for b in side_by_side(b_k)]
    if b_v is not None:
        out["v"] = list(b_v.float().contiguous())
        out["v_f"] = [factor(b) for b in side_by_side(b_v)]
    return out


def value_columns(prepared: dict, width: int) -> list[tuple[slice, torch.Tensor]]:
    """Per adapter of a :func:`prepare_b` dict, (the columns of the [L_k | L_v] rows, ``width`` wide, that its value
    term reads; its B_v over them [H_kv, q, D]): the L_v columns and all of B_v, or with a block basis
    (:func:`factor`) only the role's block (a view of B_v). Kept in ``prepared`` (made once per width)."""
    key = ("v_cols", width)
    if key not in prepared:
        out = []
        for bv, (p, _) in zip(prepared["v"], prepared["v_f"]):
            lo = width - bv.shape[1]
            out.append((slice(lo + p.start, lo + p.stop), bv[:, p]) if isinstance(p, slice) else
                       (slice(lo, width), bv))
        prepared[key] = out
    return prepared[key]


def factor(b: torch.Tensor, rtol: float = 1e-7) -> tuple[torch.Tensor | slice | None, torch.Tensor]:
    """A role's B [r, W] as (P, Q) with L B = (L P) Q, when that is cheaper: P a slice of rows when B is zero outside
    one block of at most r/2 rows (a block basis of ``import-peft --share-a exact``: L P is a view of L's columns,
    Q those rows of B, exactly); else P [r, q], Q [q, W] with B = P Q to fp32 precision (singular values below rtol
    times the largest dropped) when its rank q is at most r/2; else (None, B). In a shared basis of N roles'
    adapters (r = N * r_role) each role's B has rank r_role, so L B = (L P) Q costs r*q + q*W per row instead of
    r*W, and a block costs q*W."""
    r = b.shape[0]
    nz = (b != 0).any(1).nonzero().flatten().tolist()
    if r >= 8 and nz and nz[-1] + 1 - nz[0] <= r // 2:
        return slice(nz[0], nz[-1] + 1), b[nz[0]:nz[-1] + 1].float().contiguous()
    u, sv, vh = torch.linalg.svd(b.double(), full_matrices=False)
    q = int((sv > sv[0] * rtol).sum()) if sv.numel() and sv[0] > 0 else 0
    if r < 8 or q > r // 2:
        return None, b
    q = max(q, 1)
    return (u[:, :q] * sv[:q]).float().contiguous(), vh[:q].float().contiguous()


def expand_rope(cos: torch.Tensor, sin: torch.Tensor, n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [P, D] -> fp32 [P, H_kv, D], contiguous: broadcasting over the KV heads in the per-layer
    multiply-adds is slow, and expanding per step costs two copies."""
    return tuple(t.float()[:, None, :].expand(-1, n_kv, -1).contiguous() for t in (cos, sin))


def rope_rows(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [P, D] -> fp32 contiguous rows for the native kernel: [P, D/2] when both halves of every row are
    equal (HF RoPE: the angles repeat), else [P, D]. A key row then reads D/2 of them, not the H_kv * D of an
    :func:`expand_rope` row."""
    cos, sin = cos.float(), sin.float()
    h = cos.shape[-1] // 2
    if cos.shape[-1] % 2 == 0 and torch.equal(cos[:, :h], cos[:, h:]) and torch.equal(sin[:, :h], sin[:, h:]):
        cos, sin = cos[:, :h], sin[:, :h]
    return cos.contiguous(), sin.contiguous()


class Plan:
    """What every layer of one engine step shares: per-sequence lists and flat token indices into the caches
    (block * block_size + slot for positions 0..n-1), and the RoPE rows of the key positions. Built once per step.

    ``cos``/``sin`` are [P, D] tables, or [P, H_kv, D] fp32 tables already expanded over the KV heads
    (:func:`expand_rope`, what the engine keeps): then the per-sequence rows are views, not copies. ``rows``: the
    :func:`rope_rows` of the same tables, what the native kernel reads (made here from [P, D] tables)."""

    def __init__(self, block_table, seq_lens, cu_seqlens_q, agent_ids, lr_block_table, block_size, cos=None,
                 sin=None, n_kv: int = 1, req_ids: list[int] | None = None, rows=None):
        self.cu, self.lens = cu_seqlens_q.tolist(), seq_lens.tolist()
        self.req_ids = req_ids        # per sequence, the request id keying its Workspace entry (None: no workspace)
        self.steps: dict = {}         # what a backend makes once for every layer of this step (cpu_step.DecodeStep)
        self.agents = agent_ids.tolist() if agent_ids is not None else [0] * len(self.lens)
        self.tok = self._token_index(block_table, block_size)
        self.lr_tok = self.tok if lr_block_table is None or lr_block_table is block_table else \
            self._token_index(lr_block_table, block_size)
        self.cos = self.sin = self.cos_rows = self.sin_rows = None
        if cos is not None:
            if cos.dim() == 2:
                rows = rope_rows(cos[:max(self.lens)], sin[:max(self.lens)])
                cos, sin = expand_rope(cos[:max(self.lens)], sin[:max(self.lens)], n_kv)
            self.cos = [cos[:n] for n in self.lens]
            self.sin = [sin[:n] for n in self.lens]
            if rows is not None:
                self.cos_rows, self.sin_rows = ([t[:n] for n in self.lens] for t in rows)

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
                        workspace: Workspace | None = None, layer: int = 0, scratch: Scratch | None = None):
    """The fast path with the engine's extras (``prepared``, ``plan``, ``lr_cache``, a :class:`Workspace` of
    expanded K' per request with the ``layer`` index, a :class:`Scratch` of reusable buffers; see the module
    doc); inputs are not checked."""
    total_q, n_heads, d = q.shape
    n_kv = k_cache.shape[2]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    has_lr = lr_k_cache is not None or lr_v_cache is not None
    if has_lr and prepared is None:
        prepared = prepare_b(b_k if lr_k_cache is not None else None, b_v if lr_v_cache is not None else None)
    if plan is None:
        plan = Plan(block_table, seq_lens, cu_seqlens_q, agent_ids, lr_block_table, k_cache.shape[1],
                    cos if lr_k_cache is not None else None, sin, n_kv)
    src = _Source(k_cache, v_cache, q.dtype, plan, prepared if has_lr else None, lr_k_cache, lr_v_cache, lr_cache,
                  scratch or Scratch(q.device))
    out = torch.empty_like(q)
    for b, n in enumerate(plan.lens):
        q0, q1 = plan.cu[b], plan.cu[b + 1]
        if q1 == q0:
            continue
        qb = q[q0:q1] if q.dtype == torch.float32 else q[q0:q1].float()
        req = plan.req_ids[b] if plan.req_ids is not None else None
        ws = workspace if has_lr and src.bk_f is not None and req is not None else None
        out[q0:q1] = _attend_sequence(qb, src, b, n, scale, causal, ws if ws and ws.reserve(req, n) else None,
                                      req, layer)
    return out


def _attend_sequence(qb, src, b, n, scale, causal, ws, req, layer):
    """Attention of sequence b's queries over its n positions. Keys: base K, or K' from the request's workspace
    rows (expanding the positions not there yet), or K' expanded into scratch. One query with the native kernels:
    see :func:`_decode_native`. Otherwise the rows are gathered: V' (base V + L_v B_v) for the fused prefill kernel,
    or for a few queries P V + (P L_v) B_v."""
    if qb.shape[0] == 1 and src.native_rows:
        return _decode_native(qb, src, b, n, scale, ws, req, layer)
    if src.bk_f is None:                                          # keys carry no LoRA: base K
        k = src.gather_k(b, n)
    elif ws is not None:
        start = ws.filled(req, layer)
        if start < n:
            src.keys(b, start, n, ws.rows(req, layer, start, n))
            ws.mark(req, layer, n)
        k = ws.rows(req, layer, 0, n)
    else:
        k = src.keys(b, 0, n, src.scratch.get("k", n, src.n_kv, src.d))
    if src.bv is not None and qb.shape[0] <= DECODE_MAX_Q:
        # P times the whole [L_k | L_v] row, then the L_v columns: CPU BLAS is about 2x slower on the r-wide strided
        # slice than on the full (m*r)-wide row, and the extra columns cost nothing here
        return _value_lora(qb, k, src.gather_v(b, n), src.lowrank(b, 0, n), src.r, src.bv[src.plan.agents[b]],
                           src.n_kv, scale, causal)
    v = src.values(b, n) if src.bv is not None else src.gather_v(b, n)
    return attend(qb, k.transpose(0, 1), v.transpose(0, 1), scale, causal)


def _decode_native(qb, src, b, n, scale, ws, req, layer):
    """One query by the native kernels, every row read in place from the caches: scores over base K, or over K'
    (the workspace rows already expanded, then the new positions expanded into the workspace with their scores in
    the same pass; without a workspace, only their scores); then P V and, with a value term, (P L_v) B_v;
    [1, H, D]."""
    h, d, tok = qb.shape[1], qb.shape[2], src.plan.tok[b]
    q = qb[0].contiguous()
    s = src.scratch.get("s", h, n)
    if src.bk_f is None:
        cpu_native.decode_scores(q, src.k_flat2, n, scale, s, tok)
    else:
        start = ws.filled(req, layer) if ws is not None else 0
        if start:
            cpu_native.decode_scores(q, ws.rows(req, layer, 0, start).view(start, -1), start, scale, s[:, :start])
        if start < n:       # the new rows, streamed into the workspace (read again only by the next step)
            src.keys(b, start, n, ws.rows(req, layer, start, n) if ws is not None else None, query=q,
                     scores=s[:, start:], scale=scale, stream=True)
            if ws is not None:
                ws.mark(req, layer, n)
    lv = bv = None
    if src.bv is not None:
        a = src.plan.agents[b]
        cols, bv = src.bv_cols[a]          # the role's L_v columns (with a block basis only its block) and B_v
        lv = src.lr_flat[:, cols]
    o, _ = cpu_native.decode_values(s, src.v_flat2, n, src.scratch.get("o", h, d), tok, lv,
                                    src.plan.lr_tok[b] if lv is not None else None,
                                    src.scratch.get("pl", h, lv.shape[1]) if lv is not None else None,
                                    src.scratch.get("p", h, n), bv=bv)
    return o.view(1, h, d)


class _Source:
    """Reads one sequence's rows from the paged caches (fp32): base K/V, and K' = K + RoPE(L_k B_k),
    V' = V + L_v B_v in the low-rank modes."""

    def __init__(self, k_cache, v_cache, dtype, plan, prepared, lr_k_cache, lr_v_cache, lr_cache, scratch):
        n_kv, d = k_cache.shape[2], k_cache.shape[3]
        self.plan, self.n_kv, self.d, self.scratch = plan, n_kv, d, scratch
        self.f32 = dtype == torch.float32 and k_cache.dtype == torch.float32
        self.k_flat, self.v_flat = k_cache.reshape(-1, n_kv, d), v_cache.reshape(-1, n_kv, d)   # views if contiguous
        self.bk_f = self.bv = None
        if prepared is not None:
            self.bv, self.bk_f, self.bv_f = prepared["v"], prepared["k_f"], prepared["v_f"]
            if lr_cache is not None:
                self.lr_flat = lr_cache.reshape(-1, lr_cache.shape[-1])
            else:
                self.lr_flat = torch.cat([c.reshape(-1, c.shape[-1]) for c in (lr_k_cache, lr_v_cache)
                                          if c is not None], 1)
            self.r = self.lr_flat.shape[-1] // ((self.bk_f is not None) + (self.bv is not None))
            if self.bv is not None:
                self.bv_cols = value_columns(prepared, self.lr_flat.shape[-1])
        self.native_rows = (self.f32 and self.k_flat.is_contiguous() and self.v_flat.is_contiguous() and
                            k_cache.device.type == "cpu" and cpu_native.available() and
                            (prepared is None or self.lr_flat.dtype == torch.float32))
        if self.native_rows:        # rows of H_kv * D, what the native kernels read
            self.k_flat2, self.v_flat2 = self.k_flat.view(-1, n_kv * d), self.v_flat.view(-1, n_kv * d)

    def _gather(self, flat, tok, out):
        if self.f32:
            return torch.index_select(flat, 0, tok, out=out)
        out.copy_(flat.index_select(0, tok))
        return out

    def gather_k(self, b: int, n: int) -> torch.Tensor:
        """Base K [n, H_kv, D] of positions 0..n-1 of sequence b (a scratch buffer)."""
        return self._gather(self.k_flat, self.plan.tok[b][:n], self.scratch.get("k", n, self.n_kv, self.d))

    def gather_v(self, b: int, n: int) -> torch.Tensor:
        """Base V [n, H_kv, D] of positions 0..n-1 of sequence b (a scratch buffer)."""
        return self._gather(self.v_flat, self.plan.tok[b][:n], self.scratch.get("v", n, self.n_kv, self.d))

    def lr_part(self, part: str) -> torch.Tensor:
        """The L_k (``"k"``) or L_v (``"v"``) columns of the whole low-rank cache (a view)."""
        return self.lr_flat[:, :self.r] if part == "k" else self.lr_flat[:, -self.r:]

    def lowrank(self, b: int, start: int, end: int, part: str | None = None) -> torch.Tensor:
        """The rows [L_k | L_v] [end-start, m*r] of positions start..end-1 of sequence b, or only their L_k
        (``part="k"``) or L_v (``"v"``) columns (a scratch buffer)."""
        flat = self.lr_flat if part is None else self.lr_part(part)
        return self._gather(flat, self.plan.lr_tok[b][start:end],
                            self.scratch.get("lr" + (part or ""), end - start, flat.shape[-1]))

    def keys(self, b: int, start: int, end: int, out: torch.Tensor | None, query=None, scores=None,
             scale: float = 1.0, stream: bool = False) -> torch.Tensor | None:
        """K' = K + RoPE(L_k B_k) [end-start, H_kv, D] of positions start..end-1 of sequence b into ``out``: the
        native kernel (one pass per row: gather, accumulate L B in registers, rotate, write; with ``query`` [H, D]
        also its ``scores`` [H, end-start] against the new rows, see ``cpu_native.expand_rows``) or torch ops (ONE
        matmul of the L_k rows against B_k, all KV heads side by side, rotated into the gathered K in place).
        ``out`` None (native kernel, with ``query``): the scores only, K' not stored. ``stream``: the
        native kernel writes ``out`` by non-temporal stores (rows nothing reads before the next step)."""
        a, m, n_kv, d = self.plan.agents[b], end - start, self.n_kv, self.d
        if self.native_rows:
            if self.plan.cos_rows is not None:                  # rows the kernel reads as they are
                cos, sin = self.plan.cos_rows[b][start:end], self.plan.sin_rows[b][start:end]
            else:
                cos, sin = (t[b][start:end].reshape(m, -1) for t in (self.plan.cos, self.plan.sin))
            self._expand_native(self.k_flat2, b, start, end, "k", self.bk_f[a],
                                out.view(m, n_kv * d) if out is not None else None, cos, sin, query=query,
                                scores=scores, scale=scale, stream=stream)
            return out
        cos, sin = self.plan.cos[b][start:end], self.plan.sin[b][start:end]
        lk = self.lowrank(b, start, end, "k")
        k = self._gather(self.k_flat, self.plan.tok[b][start:end], out)
        x = torch.mm(_times_p(lk, self.bk_f[a]), self.bk_f[a][1], out=self.scratch.get("x", m, n_kv * d))
        x = x.view(m, n_kv, 2, d // 2)
        sin = sin.view(m, n_kv, 2, d // 2)
        k.addcmul_(x.view(m, n_kv, d), cos)          # K' = K + X cos + rotate_half(X) sin
        k2 = k.view(m, n_kv, 2, d // 2)
        k2[:, :, 0].addcmul_(x[:, :, 1], sin[:, :, 0], value=-1.0)
        k2[:, :, 1].addcmul_(x[:, :, 0], sin[:, :, 1])
        return k

    def values(self, b: int, n: int) -> torch.Tensor:
        """V' = V + L_v B_v [n, H_kv, D] of positions 0..n-1 of sequence b (a scratch buffer), all KV heads in one
        matmul (or one native pass per row)."""
        a, tok = self.plan.agents[b], self.plan.tok[b][:n]
        out = self.scratch.get("v", n, self.n_kv, self.d)
        if self.native_rows:
            self._expand_native(self.v_flat2, b, 0, n, "v", self.bv_f[a], out.view(n, -1))
            return out
        lv = self.lowrank(b, 0, n, "v")
        v = self._gather(self.v_flat, tok, out)
        v.view(n, -1).addmm_(_times_p(lv, self.bv_f[a]), self.bv_f[a][1])
        return v

    def _expand_native(self, flat, b, start, end, part, pq, out, cos=None, sin=None, **scores):
        """out = flat[tok] + (RoPE of) L P Q for positions start..end-1 of sequence b, L the ``part`` ("k" or "v")
        columns of the low-rank cache read in place by row index (``cpu_native.expand_rows``); B given as a
        :func:`factor` pair (P, Q)."""
        p, q = pq
        cols, lr_tok = self.lr_part(part), self.plan.lr_tok[b][start:end]
        if isinstance(p, slice):                                # a block of L's columns, read in place
            cols, p = cols[:, p], None
        elif p is not None and p.shape[1] > cpu_native.QMAX:      # a wide P: l P as a matmul on gathered rows
            cols, lr_tok, p = _times_p(self.lowrank(b, start, end, part), pq), None, None
        cpu_native.expand_rows(flat, self.plan.tok[b][start:end], cols, q, out, cos, sin, self.d, lr_tok, p,
                               **scores)


def _times_p(lr, pq):
    """lr @ P for B given as a :func:`factor` pair (P, Q), so that lr @ B = (lr @ P) @ Q: a column slice for a block
    P, lr itself when B is not factored (P None)."""
    p = pq[0]
    if p is None:
        return lr
    return lr[:, p] if isinstance(p, slice) else lr @ p


def _value_lora(qb, k, v, lv, r, bv, n_kv, scale, causal):
    """O = P V + (P lv)[..., -r:] B_v for a few queries (the Flash-LoRA-Attention reordering: H*sq*r per key
    instead of H_kv*D*r), with P = softmax(q K'^T * scale); k, v [n, H_kv, D], lv [n, >= r], bv [H_kv, r, D]."""
    sq, h = qb.shape[:2]
    p = probabilities(group_queries(qb * scale, n_kv), k.transpose(0, 1), sq, causal)
    o = torch.bmm(p, v.transpose(0, 1))
    return ungroup(torch.baddbmm(o, torch.matmul(p, lv)[..., -r:], bv), sq, h)
