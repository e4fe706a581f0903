"""The model runner: batching and cache I/O around one forward of a model family over a flat varlen batch.

The family's decoder (``serve/models``) calls back into a :class:`StepContext` for the two things that depend on
the cache mode: ``lora(layer, target, x)`` (the batch's per-role LoRA deltas; in the low-rank modes none on k/v,
whose adapter terms are applied at attention time) and ``attend(layer, q, k, v, x)`` (write this step's K/V, and
L = s X A in the low-rank modes, into the paged cache; run the attention backend over it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import make_backend
from .lora import Groups, RoleAdapters, lora_delta
from .models import build_model
from .models.config import ModelConfig


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
    seq_ids: list[int] | None = None          # request id per sequence (keys per-request backend state)


def make_groups(roles: list[int], device) -> Groups:
    """Token groups by role: [(role, None)] when every token has one role, else (role, token indices) pairs."""
    uniq = sorted(set(roles))
    if len(uniq) == 1:
        return [(uniq[0], None)]
    return [(r, torch.tensor([i for i, x in enumerate(roles) if x == r], dtype=torch.long, device=device))
            for r in uniq]


def last_rows_batch(batch: Batch) -> Batch | None:
    """The batch of only the rows whose logits are wanted (one per sequence whose chunk ends it), reading the cache
    the full batch wrote and writing nothing; None if there are none."""
    cu = batch.cu_seqlens_q.tolist()
    want = set(batch.logits_rows.tolist())
    seqs = [b for b in range(len(cu) - 1) if cu[b + 1] > cu[b] and cu[b + 1] - 1 in want]
    if not seqs:
        return None
    dev = batch.input_ids.device
    sel = torch.tensor(seqs, dtype=torch.long, device=dev)
    rows = torch.tensor([cu[b + 1] - 1 for b in seqs], dtype=torch.long, device=dev)
    agents = batch.agent_ids[sel]
    lens = batch.seq_lens[sel]
    empty = rows[:0]
    return Batch(input_ids=batch.input_ids[rows], positions=batch.positions[rows],
                 groups=make_groups(agents.tolist(), dev),
                 cu_seqlens_q=torch.arange(len(seqs) + 1, dtype=torch.int32, device=dev), seq_lens=lens,
                 block_table=batch.block_table[sel], agent_ids=agents, kv_rows=empty, kv_slots=empty,
                 logits_rows=torch.arange(len(seqs), device=dev),
                 lr_block_table=None if batch.lr_block_table is None else batch.lr_block_table[sel],
                 lr_rows=empty, lr_slots=empty, lr_roles=empty, max_q=1, max_k=int(lens.max()),
                 seq_ids=None if batch.seq_ids is None else [batch.seq_ids[b] for b in seqs])


class CacheTensors:
    """The preallocated paged pool: per layer K/V blocks and, in the low-rank modes, blocks holding [L_k | L_v] side
    by side ([L, num_lr_blocks, block_size, m*r]; the attention backends get the two as strided views)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, *, num_lr_blocks: int, rank: int,
                 lr_targets: list[str], dtype, device):
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lr_targets, self.rank, self.block_size = list(lr_targets), rank, block_size
        self.lr = (torch.zeros(cfg.num_layers, num_lr_blocks, block_size, len(lr_targets) * rank, dtype=dtype,
                               device=device) if lr_targets else None)
        elem = self.k.element_size()
        self.kv_block_bytes = 2 * cfg.num_layers * block_size * cfg.d_kv * elem
        self.lr_block_bytes = len(lr_targets) * cfg.num_layers * block_size * rank * elem
        # Per-layer views made once: flat slots for writes, and L_k / L_v views (strided) for the backends.
        self.k_flat = [t.view(-1, cfg.num_kv_heads, cfg.head_dim) for t in self.k]
        self.v_flat = [t.view(-1, cfg.num_kv_heads, cfg.head_dim) for t in self.v]
        self.lr_layers = [] if self.lr is None else list(self.lr)
        self.lr_flat = [t.view(-1, t.shape[-1]) for t in self.lr_layers]
        self.lr_views = [{f"lr_{t[0]}_cache": layer[..., i * rank:(i + 1) * rank] for i, t in enumerate(lr_targets)}
                         for layer in self.lr_layers]


class StepContext:
    """What the decoder of one step calls back into (see the module doc). ``adapters=False``: the base model alone
    (no LoRA anywhere, plain attention over base K/V), as the base writer of ``lrbase`` computes the cache."""

    def __init__(self, runner: "ModelRunner", batch: Batch, cache: CacheTensors, *, adapters: bool = True,
                 logits: bool = True):
        self.runner, self.batch, self.cache, self.adapters = runner, batch, cache, adapters
        r = runner
        self.cos = r.cos_dt[batch.positions][:, None, :]
        self.sin = r.sin_dt[batch.positions][:, None, :]
        self.logits_rows = batch.logits_rows if logits else batch.logits_rows[:0]
        self.kv_all = batch.kv_rows.numel() == batch.input_ids.shape[0]
        self.plan = r.backend.plan(batch)

    def lora(self, layer: int, target: str, x: torch.Tensor) -> torch.Tensor | None:
        """The per-role LoRA delta of ``target`` in ``layer`` for the batch's tokens, or None."""
        mod = self.runner.adapters.layers[layer].get(target)
        if mod is None or not self.adapters or (self.runner.lowrank and target in ("k_proj", "v_proj")):
            return None
        return lora_delta(x, mod, self.batch.groups)

    def attend(self, layer: int, q, k, v, x, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Write K/V (and L = s x A) of this step's tokens to the cache, then attention over it: [T, H, D].
        ``extra``: x times the rows the runner fused into the q/k/v matmul (the shared A: L itself), or None."""
        b, c = self.batch, self.cache
        if b.kv_rows.numel():
            c.k_flat[layer][b.kv_slots] = k if self.kv_all else k[b.kv_rows]
            c.v_flat[layer][b.kv_slots] = v if self.kv_all else v[b.kv_rows]
        if self.runner.lowrank and b.lr_rows is not None and b.lr_rows.numel():
            self._write_lowrank(layer, x, extra)
        if self.runner.observer is not None:
            self.runner.observer(layer, x, k, v, b)
        return self.runner.backend(self.plan, layer, q, c, b, lowrank=self.adapters and self.runner.lowrank)

    def _write_lowrank(self, layer: int, x: torch.Tensor, extra: torch.Tensor | None) -> None:
        ad, b, c = self.runner.adapters, self.batch, self.cache
        every = b.lr_rows.numel() == x.shape[0]
        if extra is not None:                       # L computed by the q/k/v matmul (ModelRunner.fuse_lowrank)
            c.lr_flat[layer][b.lr_slots] = extra if every else extra[b.lr_rows]
            return
        xs = x if every else x[b.lr_rows]
        fused = ad.lr_a_t[layer]
        if fused is not None:                       # A shared by all roles: one matmul for [L_k | L_v]
            lr = xs @ fused
        else:                                       # per-role A (baseshared): each token with its role's A
            mods = ad.layers[layer]
            lr = xs.new_empty(xs.shape[0], len(c.lr_targets) * ad.rank)
            for role in b.lr_roles.unique().tolist():
                sel = b.lr_roles == role
                lr[sel] = torch.cat([mods[t].project(xs[sel], role) for t in c.lr_targets], dim=1)
        c.lr_flat[layer][b.lr_slots] = lr


class ModelRunner:
    """The model family's decoder, the role adapters and the attention backend, on one device and dtype."""

    def __init__(self, model_dir, cfg: ModelConfig, adapters: RoleAdapters, *, lowrank: bool, dtype, device,
                 attention: str = "auto", block_size: int = 16, writer: str = "role", workspace_tokens: int = 0):
        self.cfg, self.adapters, self.lowrank, self.writer = cfg, adapters, lowrank, writer
        self.observer = None       # optional callable(layer, x, k, v, batch) seeing every layer's inputs (drift)
        self.dtype, self.device = dtype, torch.device(device)
        self.model = build_model(model_dir, cfg, dtype=dtype, device=self.device)
        key_lora = lowrank and "k_proj" in adapters.cached_targets()
        self.backend = make_backend(attention, self.device, head_dim=cfg.head_dim, rank=adapters.rank,
                                    n_kv=cfg.num_kv_heads, block_size=block_size, lowrank=lowrank, key_lora=key_lora,
                                    num_layers=cfg.num_layers, workspace_tokens=workspace_tokens)
        self.attention = self.backend.name
        self.cos = self.sin = torch.empty(0, cfg.head_dim)
        self.refresh_adapters()

    def fuse_lowrank(self) -> None:
        """In the low-rank modes with a shared A, have the model compute L = s x A in its q/k/v matmul (the family's
        ``fuse_attention_rows``; ``adapters.lr_a_t`` then views the fused rows, no second copy)."""
        fuse = getattr(self.model, "fuse_attention_rows", None)
        if fuse is None or not self.lowrank:
            return
        for li, a_t in enumerate(self.adapters.lr_a_t):
            rows = fuse(li, a_t.T if a_t is not None else None)
            if rows is not None:
                self.adapters.lr_a_t[li] = rows.T

    def refresh_adapters(self) -> None:
        """Re-read the adapters' layouts (after a role was added) and hand them to the attention backend."""
        self.fuse_lowrank()
        self.b_heads = [{f"b_{t[0]}": b[t] for t in self.adapters.cached_targets()} for b in self.adapters.b_heads]
        if self.cos.shape[0]:
            self.backend.prepare(self.b_heads, self.cos_dt, self.sin_dt)
        else:
            self._ensure_rope(1024)

    def _ensure_rope(self, n: int) -> None:
        if self.cos.shape[0] < n:
            size = 1 << max(10, (n - 1).bit_length())
            self.cos, self.sin = self.cfg.rope_tables(size, self.device)      # fp32, computed as HF does
            # used in the model dtype (HF casts cos/sin to the activations' dtype; the kernel wants q's dtype)
            self.cos_dt, self.sin_dt = self.cos.to(self.dtype), self.sin.to(self.dtype)
            self.backend.prepare(self.b_heads, self.cos_dt, self.sin_dt)

    @torch.inference_mode()
    def forward(self, batch: Batch, cache: CacheTensors) -> torch.Tensor:
        """Run the batch, writing its K/V (and L) to the cache; fp32 logits [len(batch.logits_rows), vocab].

        With the base writer, an adapter-free pass of the base model computes (and writes) the cache entries of
        every token of the batch; then only the rows whose logits are wanted run again with their role's adapters,
        reading that cache with their own B."""
        self._ensure_rope(batch.max_k + 1)
        if self.writer != "base":
            return self.model.forward(batch.input_ids, StepContext(self, batch, cache))
        self.model.forward(batch.input_ids, StepContext(self, batch, cache, adapters=False, logits=False))
        last = last_rows_batch(batch)
        if last is None:
            return torch.empty(0, self.cfg.vocab_size, device=self.device)
        return self.model.forward(last.input_ids, StepContext(self, last, cache))
