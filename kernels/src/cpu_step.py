"""A decode step's attention on CPU with the per-layer Python work done once per step.

Between two layers the model's weights stream through the cache, so every torch call and every Python-level step
of a layer's attention runs cold. On the trace benchmark's model (8 roles, 64 context) the one-query path of
:func:`cpu.paged_attention_cpu` cost about 145 µs per layer in ``fullshared`` and 225 µs in ``lrshared``, against
50 / 75 µs for the same call repeated at once and a few µs of kernel work: most of it was building views, checking
arguments and slicing per layer what is the same for every layer of the step.

For a step whose sequences each have one query (decode steps, 1-token hand-offs), :class:`DecodeStep` makes the
layer-independent arguments once (token indices, RoPE rows, each sequence's workspace rows, scratch buffers), and
:class:`NativeLayers` once per engine the per-layer addresses (cache rows, each role's B). A layer is then one native
call for the scores (two when a request's workspace holds K' rows and new rows are expanded), one softmax and one
native call for P V and the value term. The kernels, their order and the rows they read are those of the one-query
path (``cpu._decode_native``), so the results are the same bits.
"""
from __future__ import annotations

import torch

from . import cpu_native
from .cpu import Plan, value_columns
from .cpu_workspace import Scratch, Workspace

F32, I64 = 4, 8     # bytes per element: fp32 rows, int64 token indices


class NativeLayers:
    """Per layer, the addresses the native decode kernels read: K/V cache rows, the low-rank rows, and per role the
    key expansion's (L_k column offset, its width r, P or None, P's width, Q) and the value term's (L_v column
    offset, width, B_v, B_v's head stride). ``ok`` is False where the one-query native path does not apply (no
    native library, a cache that is not fp32 and contiguous, a factored B wider than the kernel takes)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], lr: list[torch.Tensor] | None,
                 prepared: list[dict] | None):
        self.n_kv, self.d = k[0].shape[-2], k[0].shape[-1]
        self.w = self.n_kv * self.d
        self.tensors = (k, v, lr, prepared)          # the addresses below stay valid while these live
        self.ok = cpu_native.available() and all(
            t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in (*k, *v, *(lr or ())))
        self.k, self.v = [t.data_ptr() for t in k], [t.data_ptr() for t in v]
        self.lr = [t.data_ptr() for t in lr] if lr else None
        self.width = lr[0].shape[-1] if lr else 0
        self.keys = self.values = None
        if not (self.ok and lr and prepared):
            return
        p0 = prepared[0]
        r = self.width // ((p0["k_f"] is not None) + (p0["v"] is not None))
        if p0["k_f"] is not None:
            self.keys = [[self._key(pq, r) for pq in p["k_f"]] for p in prepared]
            self.ok = self.w <= cpu_native.ROW_BUFFER and all(x is not None for layer in self.keys for x in layer)
        if p0["v"] is not None:
            self.values = [[(c.start * F32, c.stop - c.start, bv.data_ptr(), bv.stride(0))
                            for c, bv in value_columns(p, self.width)] for p in prepared]

    @staticmethod
    def _key(pq, r: int):
        """(L_k column offset in bytes, columns read, P address or None, l P's width, Q address) of one role's
        :func:`cpu.factor` pair, as ``cpu._Source._expand_native`` reads it; None for a P wider than the kernel's
        QMAX (that path multiplies by P in torch)."""
        p, q = pq
        if isinstance(p, slice):
            return p.start * F32, p.stop - p.start, None, p.stop - p.start, q.data_ptr()
        if p is None:
            return 0, r, None, r, q.data_ptr()
        if p.shape[1] > cpu_native.QMAX:
            return None
        return 0, r, p.data_ptr(), p.shape[1], q.data_ptr()


class DecodeStep:
    """The attention of every layer of one step whose sequences each have one query (see the module doc):
    ``step(layer, q)`` -> [T, H, D] fp32, what ``paged_attention_cpu`` returns for the same inputs. Make it with
    :meth:`make` (None where the path does not apply); it reserves each running request's workspace rows once."""

    def __init__(self, layers: NativeLayers, plan: Plan, n_heads: int, scale: float, lowrank: bool,
                 workspace: Workspace | None, scratch: Scratch):
        self.layers, self.h, self.scale = layers, n_heads, scale
        self.g = n_heads // layers.n_kv
        self.lowrank = lowrank and layers.lr is not None
        self.key_lora = self.lowrank and layers.keys is not None
        self.total = plan.cu[-1]
        n_max = max(plan.lens)
        s_buf, p_buf = scratch.get("step_s", n_heads * n_max), scratch.get("step_p", n_heads * n_max)
        self.pl = scratch.get("step_pl", n_heads, max(1, layers.width))
        self.seqs = []
        for b, n in enumerate(plan.lens):
            s, p = s_buf[:n_heads * n].view(n_heads, n), p_buf[:n_heads * n].view(n_heads, n)
            seq = dict(row=plan.cu[b], n=n, tok=plan.tok[b].data_ptr(), s=s, p=p, s_ptr=s.data_ptr(),
                       p_ptr=p.data_ptr(), role=plan.agents[b], lr_tok=plan.lr_tok[b].data_ptr(), ws=None)
            if self.key_lora:
                cos, sin = plan.cos_rows[b], plan.sin_rows[b]
                seq.update(cos=cos.data_ptr(), sin=sin.data_ptr(), cs=cos.stride(0),
                           ch=layers.d // 2 if cos.shape[1] >= layers.d else 0)
                req = plan.req_ids[b] if plan.req_ids is not None else None
                if workspace is not None and req is not None and workspace.reserve(req, n):
                    seq["ws"] = (workspace, req) + workspace.addresses(req)
            self.seqs.append(seq)

    @classmethod
    def make(cls, layers: NativeLayers, plan: Plan, q: torch.Tensor, scale: float, lowrank: bool,
             workspace: Workspace | None = None, scratch: Scratch | None = None) -> "DecodeStep | None":
        """A :class:`DecodeStep` for this plan and q [T, H, D], or None when a sequence has more than one query or
        none, q is not fp32, the layers do not take the native path, or key LoRA comes without RoPE rows."""
        if not layers.ok or q.dtype != torch.float32 or q.device.type != "cpu" or q.stride(-1) != 1 or \
                q.stride(-2) != q.shape[-1] or any(b - a != 1 for a, b in zip(plan.cu, plan.cu[1:])):
            return None
        if lowrank and layers.keys is not None and plan.cos_rows is None:
            return None
        return cls(layers, plan, q.shape[1], scale, lowrank, workspace, scratch or Scratch(q.device))

    def __call__(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Attention of the step's queries q [T, H, D] (one per sequence) over ``layer``'s cache: [T, H, D]."""
        lib, L = cpu_native.lib(), self.layers
        out = torch.empty(self.total, self.h, L.d)
        qp, qs, op, os_ = q.data_ptr(), q.stride(0) * F32, out.data_ptr(), self.h * L.d * F32
        kp, vp, w, d, g, n_kv = L.k[layer], L.v[layer], L.w, L.d, self.g, L.n_kv
        for sq in self.seqs:
            n, qb, tok = sq["n"], qp + sq["row"] * qs, sq["tok"]
            if self.key_lora:
                self._keys(lib, layer, sq, qb)
            else:
                cpu_native.split(lambda a, b: lib.lragent_decode_scores(qb, g, d, kp, w, tok, n, self.scale,
                                                                        sq["s_ptr"], n, a, b),
                                 n_kv, cpu_native.head_threads(n, n_kv))
            torch.softmax(sq["s"], -1, out=sq["p"])
            lv = lt = bv = None
            r = bs = 0
            if self.lowrank and L.values is not None:
                off, r, bv, bs = L.values[layer][sq["role"]]
                lv, lt = L.lr[layer] + off, sq["lr_tok"]
            pl, ob = self.pl.data_ptr(), op + sq["row"] * os_
            cpu_native.split(lambda a, b: lib.lragent_decode_values(sq["p_ptr"], g, d, vp, w, tok, n, ob, lv,
                                                                    L.width, lt, r, pl, bv, bs, a, b),
                             n_kv, cpu_native.head_threads(n, n_kv))
        return out

    def _keys(self, lib, layer: int, sq: dict, qb: int) -> None:
        """Scores of one sequence over K' = K + RoPE(L_k B_k): the rows its workspace already holds, then the new
        rows expanded (into the workspace, by non-temporal stores, or only scored without one)."""
        L, n, start, out, entry = self.layers, sq["n"], 0, None, sq["ws"]
        g, d, w, n_kv, s = self.g, L.d, L.w, L.n_kv, sq["s_ptr"]
        if entry is not None:
            ws, req, base, layer_bytes, filled = entry
            rows = base + layer * layer_bytes
            start = filled[layer]
            if start:
                cpu_native.split(lambda a, b: lib.lragent_decode_scores(qb, g, d, rows, w, None, start, self.scale,
                                                                        s, n, a, b),
                                 n_kv, cpu_native.head_threads(start, n_kv))
            out = rows + start * w * F32
        if start < n:
            off, r, p, k, qm = L.keys[layer][sq["role"]]
            tok, lt, cs = sq["tok"] + start * I64, sq["lr_tok"] + start * I64, sq["cs"]
            cos, sin = sq["cos"] + start * cs * F32, sq["sin"] + start * cs * F32
            nt = int(out is not None)       # workspace rows: streamed (NativeLayers.ok bounds w by ROW_BUFFER)
            cpu_native.split(lambda a, b: lib.lragent_expand_rows(L.k[layer], tok, a, b, w, d, L.lr[layer] + off,
                                                                  L.width, lt, p, r, k, qm, cos, sin, cs, sq["ch"],
                                                                  out, w, nt, qb, g, self.scale, s + start * F32, n),
                             n - start, cpu_native.row_threads(n - start))
            if entry is not None:
                ws.mark(req, layer, n)
