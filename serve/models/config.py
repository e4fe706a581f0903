"""``ModelConfig``: the decoder shape and options the engine needs, read from a Hugging Face ``config.json`` by the
model family (``serve/models/<family>.py``) that serves its ``model_type``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import ServeError


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False                      # RMSNorm on each q/k head before RoPE (Qwen3): K-LoRA not decomposable
    sliding_window: int | None = None
    hidden_act: str = "silu"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def d_kv(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def lora_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each LoRA-targetable projection."""
        d, dq, ff = self.hidden_size, self.num_heads * self.head_dim, self.intermediate_size
        return {"q_proj": (d, dq), "k_proj": (d, self.d_kv), "v_proj": (d, self.d_kv), "o_proj": (dq, d),
                "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}

    @classmethod
    def common(cls, raw: dict, where: str, **family) -> "ModelConfig":
        """The fields every Llama-like config.json spells the same way; ``family`` sets or overrides the rest."""
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
            theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", "linear", "llama3"):
                raise ServeError(f"{where}: rope_type {rope_type!r} is not supported (default, linear, llama3)")
            if float(raw.get("partial_rotary_factor", 1.0)) != 1.0:
                raise ServeError(f"{where}: partial_rotary_factor != 1 is not supported")
            eos = raw.get("eos_token_id")
            eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            kw = dict(model_type=raw["model_type"], vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
                      intermediate_size=int(raw["intermediate_size"]), num_layers=int(raw["num_hidden_layers"]),
                      num_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                      head_dim=int(raw.get("head_dim") or hidden // heads),
                      rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                      rope_scaling={**rope, "rope_type": rope_type},
                      max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                      tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                      attention_bias=bool(raw.get("attention_bias", False)), mlp_bias=bool(raw.get("mlp_bias", False)),
                      eos_token_ids=eos_ids, bos_token_id=raw.get("bos_token_id"))
            kw.update(family)
            cfg = cls(**kw)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ServeError):
                raise
            raise ServeError(f"{where}: missing or bad field {e}") from None
        if min(cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) < 1:
            raise ServeError(f"{where}: sizes must be positive")
        if cfg.num_heads % cfg.num_kv_heads:
            raise ServeError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads")
        return cfg

    # ---------------------------------------------------------------------------------------------------------
    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [D/2] (fp32), following the HF conventions for each rope_type."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        rs = self.rope_scaling
        kind = rs.get("rope_type", "default")
        if kind == "linear":
            inv = inv / float(rs["factor"])
        elif kind == "llama3":
            factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
            old = float(rs.get("original_max_position_embeddings", self.max_position_embeddings))
            lo_wl, hi_wl = old / lo, old / hi
            wl = 2 * math.pi / inv
            scaled = torch.where(wl > lo_wl, inv / factor, inv)
            smooth = (old / wl - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wl < hi_wl) & ~(wl > lo_wl)
            inv = torch.where(medium, smoothed, scaled)
        return inv

    def rope_tables(self, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, D] fp32 for positions 0..n-1 (HF rotate_half layout: the half-frequencies repeated)."""
        inv = self.inv_freq().to(device)
        freqs = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()
