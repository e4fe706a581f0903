"""The model runner: one forward over a flat, varlen batch of token chunks from sequences of different roles.

Per layer: RMSNorm -> q/k/v (+ the role's LoRA) -> [Qwen3 q/k norm] -> RoPE -> write the cache -> paged attention
over the cache (the low-rank K/V adapter terms added at attention time in the shared modes) -> o (+LoRA) -> MLP
(+LoRA). Two cache layouts:

- ``lowrank=False`` (nonshared, fullshared): K/V already carry the role's adapter (K' = X W_k + s X A_k B_k), cached
  whole; attention is plain paged attention.
- ``lowrank=True`` (baseshared, lrshared): the cache holds base K (post-RoPE) / base V and L_k = s X A_k (pre-RoPE),
  L_v = s X A_v; the reading role's B is applied inside attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lragent.kernels.reference import rotate_half

from .attention import attention_fn
from .cpu_attention import Plan, expand_rope, prepare_b
from .config import ModelConfig
from .lora import Groups, RoleAdapters, lora_delta
from .weights import load_weights


@dataclass
class Batch:
    input_ids: torch.Tensor          # [T] long
    positions: torch.Tensor          # [T] long, absolute positions
    groups: Groups                   # (role index, token indices | None)
    cu_seqlens_q: torch.Tensor       # [B+1] int32
    seq_lens: torch.Tensor           # [B] int32, keys per sequence after this step
    block_table: torch.Tensor        # [B, M] int32
    agent_ids: torch.Tensor          # [B] int32, role index per sequence
    kv_rows: torch.Tensor            # [W] rows of the batch whose base/full K,V are written ...
    kv_slots: torch.Tensor           # [W] ... to these flat cache slots (block * block_size + offset)
    logits_rows: torch.Tensor        # [B'] rows whose next-token logits are wanted
    lr_block_table: torch.Tensor | None = None
    lr_rows: torch.Tensor | None = None
    lr_slots: torch.Tensor | None = None
    lr_roles: torch.Tensor | None = None     # [W'] role index of each lr row (baseshared with per-role A)
    max_q: int = 0                            # host-side maxima (the kernel then needs no device sync)
    max_k: int = 0


class CacheTensors:
    """The preallocated paged pool: per layer K/V blocks and, in the shared modes, low-rank blocks holding
    [L_k | L_v] side by side ([L, num_lr_blocks, block_size, m*r]; the kernel gets the two as strided views)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, *, num_lr_blocks: int, rank: int,
                 lr_targets: list[str], dtype, device):
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lr_targets, self.rank = list(lr_targets), rank
        self.lr = (torch.zeros(cfg.num_layers, num_lr_blocks, block_size, len(lr_targets) * rank, dtype=dtype,
                               device=device) if lr_targets else None)
        self.block_size = block_size
        elem = self.k.element_size()
        self.kv_block_bytes = 2 * cfg.num_layers * block_size * cfg.d_kv * elem
        self.lr_block_bytes = len(lr_targets) * cfg.num_layers * block_size * rank * elem

        # Per-layer views made once: flat slots for writes, and the kernel's L_k / L_v views (strided).
        self.k_flat = [t.view(-1, cfg.num_kv_heads, cfg.head_dim) for t in self.k]
        self.v_flat = [t.view(-1, cfg.num_kv_heads, cfg.head_dim) for t in self.v]
        self.lr_layers = [] if self.lr is None else list(self.lr)
        self.lr_flat = [t.view(-1, t.shape[-1]) for t in self.lr_layers]
        self.lr_views = [{f"lr_{t[0]}_cache": layer[..., i * rank:(i + 1) * rank] for i, t in enumerate(lr_targets)}
                         for layer in self.lr_layers]

    def lr_tensors(self) -> list[torch.Tensor]:
        return [] if self.lr is None else [self.lr]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


class ModelRunner:
    def __init__(self, model_dir, cfg: ModelConfig, adapters: RoleAdapters, *, lowrank: bool, dtype, device,
                 attention: str = "auto"):
        self.cfg, self.adapters, self.lowrank = cfg, adapters, lowrank
        self.dtype, self.device = dtype, torch.device(device)
        self.attention, self.attend = attention_fn(
            attention, self.device, head_dim=cfg.head_dim, rank=adapters.rank,
            key_lora=lowrank and "k_proj" in adapters.cached_targets())
        self.w = load_weights(model_dir, cfg, dtype=dtype, device=self.device)
        h, hk, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.splits = (h * d, hk * d, hk * d)
        if cfg.qk_norm:   # one RMSNorm over the q and k heads together: per-head weights stacked
            self.qk_norm = [torch.cat([lw.q_norm.expand(h, d), lw.k_norm.expand(hk, d)]) for lw in self.w.layers]
        self.b_kw = [{f"b_{t[0]}": b[t] for t in adapters.cached_targets()} for b in adapters.b_heads]
        self.prepared = None
        if lowrank and self.attention == "torch":
            self.prepared = [prepare_b(b.get("k_proj"), b.get("v_proj")) for b in adapters.b_heads]
        self.cos = self.sin = torch.empty(0, cfg.head_dim)
        self.rope_kv = (None, None)
        self._ensure_rope(1024)

    def _ensure_rope(self, n: int) -> None:
        if self.cos.shape[0] < n:
            size = 1 << max(10, (n - 1).bit_length())
            self.cos, self.sin = self.cfg.rope_tables(size, self.device)      # fp32, computed as HF does
            # used in the model dtype (HF casts cos/sin to the activations' dtype; the kernel wants q's dtype)
            self.cos_dt, self.sin_dt = self.cos.to(self.dtype), self.sin.to(self.dtype)
            if self.prepared is not None and "k_proj" in self.adapters.cached_targets():
                # the torch path's key term reads RoPE rows per KV head: expanded once here, not per step
                self.rope_kv = expand_rope(self.cos_dt, self.sin_dt, self.cfg.num_kv_heads)

    @torch.inference_mode()
    def forward(self, batch: Batch, cache: CacheTensors) -> torch.Tensor:
        """Run the batch, writing its K/V (and L) to the cache; fp32 logits [len(batch.logits_rows), vocab]."""
        cfg, ad = self.cfg, self.adapters
        n_tok, h, hk, d = batch.input_ids.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self._ensure_rope(batch.max_k + 1)
        cos = self.cos_dt[batch.positions][:, None, :]
        sin = self.sin_dt[batch.positions][:, None, :]
        kv_all = batch.kv_rows.numel() == n_tok
        extra = {"max_seqlen_q": batch.max_q, "max_seqlen_k": batch.max_k}
        if self.attention == "torch":    # per-step bookkeeping shared by the layers (see cpu_attention.Plan)
            extra = {"plan": Plan(batch.block_table, batch.seq_lens, batch.cu_seqlens_q, batch.agent_ids,
                                  batch.lr_block_table, cache.block_size, *self.rope_kv, hk)}
        groups = batch.groups
        x = self.w.embed[batch.input_ids]
        for li, lw in enumerate(self.w.layers):
            mods = ad.layers[li]
            hn = rms_norm(x, lw.ln1, cfg.rms_norm_eps)
            qkv = F.linear(hn, lw.wqkv, lw.bqkv)
            for i, t in enumerate(("q_proj", "k_proj", "v_proj")):
                if t in mods and (i == 0 or not self.lowrank):
                    lo = sum(self.splits[:i])
                    qkv[:, lo:lo + self.splits[i]] += lora_delta(hn, mods[t], groups)
            qkv = qkv.view(n_tok, h + 2 * hk, d)
            qk, v = qkv[:, :h + hk], qkv[:, h + hk:]
            if cfg.qk_norm:
                qk = rms_norm(qk, self.qk_norm[li], cfg.rms_norm_eps)
            qk = qk * cos + rotate_half(qk) * sin
            q, k = qk[:, :h], qk[:, h:]
            kc, vc = cache.k[li], cache.v[li]
            if batch.kv_rows.numel():
                cache.k_flat[li][batch.kv_slots] = k if kv_all else k[batch.kv_rows]
                cache.v_flat[li][batch.kv_slots] = v if kv_all else v[batch.kv_rows]
            kw = self._lowrank_terms(li, hn, mods, batch, cache) if self.lowrank else {}
            o = self.attend(q, kc, vc, batch.block_table, batch.seq_lens, batch.cu_seqlens_q,
                            softmax_scale=d ** -0.5, **kw, **extra).reshape(n_tok, h * d)
            y = F.linear(o, lw.wo, lw.bo)
            if "o_proj" in mods:
                y = y + lora_delta(o, mods["o_proj"], groups)
            x = x + y
            hn = rms_norm(x, lw.ln2, cfg.rms_norm_eps)
            gu = F.linear(hn, lw.wgu, lw.bgu)
            ff = cfg.intermediate_size
            for i, t in enumerate(("gate_proj", "up_proj")):
                if t in mods:
                    gu[:, i * ff:(i + 1) * ff] += lora_delta(hn, mods[t], groups)
            m = F.silu(gu[:, :ff]) * gu[:, ff:]
            y = F.linear(m, lw.wd, lw.bd)
            if "down_proj" in mods:
                y = y + lora_delta(m, mods["down_proj"], groups)
            x = x + y
        x = rms_norm(x[batch.logits_rows], self.w.norm, cfg.rms_norm_eps)
        return F.linear(x, self.w.lm_head).float()

    def _lowrank_terms(self, li, hn, mods, batch: Batch, cache: CacheTensors) -> dict:
        """Write L = s X A of the computed tokens to the low-rank cache; return the kernel's low-rank arguments."""
        ad = self.adapters
        targets = cache.lr_targets
        rows = batch.lr_rows
        if rows.numel():
            hs = hn if rows.numel() == hn.shape[0] else hn[rows]
            fused = ad.lr_a_t[li]
            if fused is not None:                       # A shared by all roles: one matmul for [L_k | L_v]
                lr = hs @ fused
            else:                                       # per-role A (baseshared): each token with its role's A
                lr = hs.new_empty(hs.shape[0], len(targets) * ad.rank)
                for role in batch.lr_roles.unique().tolist():
                    sel = batch.lr_roles == role
                    lr[sel] = torch.cat([mods[t].project(hs[sel], role) for t in targets], dim=1)
            cache.lr_flat[li][batch.lr_slots] = lr
        kw = dict(agent_ids=batch.agent_ids, lr_block_table=batch.lr_block_table, **cache.lr_views[li],
                  **self.b_kw[li])
        if "k_proj" in targets:
            kw["cos"], kw["sin"] = self.cos_dt, self.sin_dt
        if self.prepared is not None:                   # the torch path: B laid out once, one gather for L
            kw["prepared"], kw["lr_cache"] = self.prepared[li], cache.lr_layers[li]
        return kw
