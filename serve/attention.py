"""Attention backends: one interface, one object per engine (``prepare`` once, ``plan`` once per step, call per
layer). Each computes ``lragent.kernels.flash_lora_attention_paged`` semantics over the engine's paged cache:

    V'_b = V_base + L_v B_v[agent_b]        K'_b = K_base + RoPE(L_k B_k[agent_b])       (low-rank modes)
    o = softmax(q K'^T * scale, causal bottom-right) V'                                    (K', V' = K, V otherwise)

- ``torch``: ``lragent.kernels.cpu`` (the torch fast path; B laid out once, RoPE expanded over the KV heads once,
  per-step token indices shared by all layers);
- ``triton``: the Flash-LoRA-Attention kernel (CUDA; CPU only under ``TRITON_INTERPRET=1``);
- ``reference``: the kernels' pure-torch reference (slow; for checking).

``auto`` picks triton on CUDA when the kernel supports the shape (``lragent.kernels.triton_unsupported``), torch
otherwise. A new backend is a class here with the three methods, added to ``BACKENDS``.
"""
from __future__ import annotations

import torch

from lragent import kernels
from lragent.kernels.cpu import Plan, expand_rope, paged_attention_cpu, prepare_b, rope_rows
from lragent.kernels.cpu_step import DecodeStep, NativeLayers
from lragent.kernels.cpu_workspace import Scratch, Workspace

from .config import ServeError


class AttentionBackend:
    """``prepare(b_heads, cos, sin)`` once per engine (again when the RoPE tables grow); ``plan(batch)`` once per step;
    ``backend(plan, layer, q, cache, batch)`` per layer -> [T, H, D]."""
    name = "?"

    def __init__(self, *, n_kv: int, block_size: int, lowrank: bool, key_lora: bool):
        self.n_kv, self.block_size, self.lowrank, self.key_lora = n_kv, block_size, lowrank, key_lora
        self.b_heads: list[dict] = []
        self.cos = self.sin = None

    def release(self, request_id: int) -> None:
        """Forget per-request state of a request that finished, was aborted or preempted (none by default)."""

    def trim(self) -> None:
        """Free state kept for reuse that no running request holds."""

    def workspace_bytes(self) -> tuple[int, int]:
        """Bytes of per-request state held now, and of those the running requests' (0, 0 by default)."""
        return 0, 0

    def prepare(self, b_heads: list[dict], cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Per layer {"b_k"/"b_v": [N, H_kv, r, D]} and the RoPE tables [P, D] in the model dtype."""
        self.b_heads, self.cos, self.sin = b_heads, cos, sin

    def plan(self, batch):
        return None

    def lowrank_args(self, layer: int, cache, batch, lowrank: bool = True) -> dict:
        if not (self.lowrank and lowrank):
            return {}
        kw = dict(agent_ids=batch.agent_ids, lr_block_table=batch.lr_block_table, **cache.lr_views[layer],
                  **self.b_heads[layer])
        if self.key_lora:
            kw.update(cos=self.cos, sin=self.sin)
        return kw

    def __call__(self, plan, layer: int, q: torch.Tensor, cache, batch, lowrank: bool = True) -> torch.Tensor:
        """Attention of ``q`` over the layer's cache; ``lowrank=False``: base K/V only (no adapter terms)."""
        raise NotImplementedError


class KernelBackend(AttentionBackend):
    """A ``flash_lora_attention_paged``-signature function called per layer (the Triton kernel, the reference)."""

    def __init__(self, fn, name: str, **kw):
        super().__init__(**kw)
        self.fn, self.name = fn, name

    def __call__(self, plan, layer, q, cache, batch, lowrank=True):
        return self.fn(q, cache.k[layer], cache.v[layer], batch.block_table, batch.seq_lens, batch.cu_seqlens_q,
                       softmax_scale=q.shape[-1] ** -0.5, max_seqlen_q=batch.max_q, max_seqlen_k=batch.max_k,
                       **self.lowrank_args(layer, cache, batch, lowrank))


class TorchBackend(AttentionBackend):
    """The torch fast path (``lragent.kernels.cpu``) with B and the RoPE tables laid out once and, in the low-rank
    modes, a workspace of each running request's expanded K' (``lragent.kernels.cpu_workspace``). A step whose
    sequences each have one query runs as a ``cpu_step.DecodeStep`` (the same kernels, with the per-layer Python
    work done once per step); ``decode_step = False`` sends every step through ``paged_attention_cpu``."""
    name = "torch"

    def __init__(self, *, workspace: Workspace | None = None, **kw):
        super().__init__(**kw)
        self.workspace = workspace if self.lowrank else None
        self.scratch = Scratch()
        self.decode_step = True
        self.native = None          # cpu_step.NativeLayers of (cache, prepared B), made on the first decode step

    def release(self, request_id):
        if self.workspace is not None:
            self.workspace.release(request_id)

    def trim(self):
        if self.workspace is not None:
            self.workspace.trim()

    def workspace_bytes(self):
        return (0, 0) if self.workspace is None else (self.workspace.bytes, self.workspace.running_bytes)

    def prepare(self, b_heads, cos, sin):
        if not self.lowrank:
            self.prepared = []
        elif b_heads is not getattr(self, "b_heads", None):      # not when only the RoPE tables grew
            self.prepared = [prepare_b(b.get("b_k"), b.get("b_v")) for b in b_heads]
            self.native = None
        super().prepare(b_heads, cos, sin)
        self.rope_kv = expand_rope(cos, sin, self.n_kv) if self.lowrank and self.key_lora else (None, None)
        self.rope_rows = rope_rows(cos, sin) if self.lowrank and self.key_lora else None

    def plan(self, batch):
        return Plan(batch.block_table, batch.seq_lens, batch.cu_seqlens_q, batch.agent_ids, batch.lr_block_table,
                    self.block_size, *self.rope_kv, self.n_kv, req_ids=batch.seq_ids, rows=self.rope_rows)

    def __call__(self, plan, layer, q, cache, batch, lowrank=True):
        step = self._step(plan, q, cache, self.lowrank and lowrank) if self.decode_step else None
        if step is not None:
            return step(layer, q)
        kw = {"scratch": self.scratch}
        if self.lowrank and lowrank:        # B is prepared and the plan made: the caches are all the call needs
            kw.update(cache.lr_views[layer], prepared=self.prepared[layer], lr_cache=cache.lr_layers[layer],
                      workspace=self.workspace, layer=layer)
        return paged_attention_cpu(q, cache.k[layer], cache.v[layer], batch.block_table, batch.seq_lens,
                                   batch.cu_seqlens_q, softmax_scale=q.shape[-1] ** -0.5, plan=plan, **kw)

    def _step(self, plan, q, cache, lowrank: bool) -> DecodeStep | None:
        """The step's DecodeStep (made at its first layer; None where the one-query native path does not apply)."""
        if lowrank not in plan.steps:
            if self.native is None or self.native.tensors[0] is not cache.k_flat:
                self.native = NativeLayers(cache.k_flat, cache.v_flat, cache.lr_flat if self.lowrank else None,
                                           self.prepared if self.lowrank else None)
            plan.steps[lowrank] = DecodeStep.make(self.native, plan, q, q.shape[-1] ** -0.5, lowrank,
                                                  self.workspace, self.scratch)
        return plan.steps[lowrank]


BACKENDS = ("auto", "torch", "triton", "reference")


def make_backend(name: str, device: torch.device, *, head_dim: int, rank: int, n_kv: int, block_size: int,
                 lowrank: bool, key_lora: bool, num_layers: int = 1, workspace_tokens: int = 0) -> AttentionBackend:
    """The backend object for a name (auto: triton on CUDA when the kernel supports the shape, else torch);
    ``workspace_tokens`` > 0 gives the torch backend a per-request K' workspace of that many rows in all (when the
    keys carry LoRA)."""
    if name not in BACKENDS:
        raise ServeError(f"unknown attention backend {name!r}: use one of {', '.join(BACKENDS)}")
    why = kernels.triton_unsupported(head_dim, rank, key_lora)
    if name == "auto":
        name = "triton" if device.type == "cuda" and kernels.triton_available() and why is None else "torch"
    kw = dict(n_kv=n_kv, block_size=block_size, lowrank=lowrank, key_lora=key_lora)
    if name == "triton":
        if not kernels.triton_available():
            raise ServeError("attention backend triton asked for but Triton is not installed: use --attention torch")
        if why is not None:
            raise ServeError(f"the Triton kernel cannot serve this model: {why}; use --attention torch")
        import os
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ServeError("attention backend triton needs a CUDA device (or TRITON_INTERPRET=1 on CPU, slow): "
                             "use --attention torch")
        return KernelBackend(kernels.flash_lora_attention_paged, "triton", **kw)
    if name == "reference":
        return KernelBackend(kernels.flash_lora_attention_paged_ref, "reference", **kw)
    ws = Workspace(num_layers, n_kv, head_dim, workspace_tokens, device) if lowrank and key_lora and workspace_tokens \
        else None
    return TorchBackend(workspace=ws, **kw)
