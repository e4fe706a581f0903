"""Typed model config for the Llama-family decoders the engine serves, read from a Hugging Face ``config.json``.

Supported: ``llama`` (Llama 2 / 3.x, with ``llama3``/``linear`` RoPE scaling), ``mistral``, ``qwen2`` (q/k/v bias),
``qwen3`` (per-head q/k RMSNorm before RoPE). Everything else is refused with one line.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ServeError(ValueError):
    """Bad input to the serving engine; the message is one line saying what and how to fix it."""


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
    qk_norm: bool = False                      # Qwen3: RMSNorm on each q/k head before RoPE
    sliding_window: int | None = None
    hidden_act: str = "silu"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def d_kv(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ServeError(f"base model {model_dir} has no config.json: pass a local Hugging Face model directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ServeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config.json") -> "ModelConfig":
        mt = raw.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ServeError(f"{where}: model_type {mt!r} is not supported; the engine serves {SUPPORTED_MODEL_TYPES}")
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
            act = raw.get("hidden_act", "silu")
            if act not in ("silu", "swish"):
                raise ServeError(f"{where}: hidden_act {act!r} is not supported (silu)")
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            window = raw.get("sliding_window")
            if mt in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
                window = None
            cfg = cls(
                model_type=mt, vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]), num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                rope_scaling={**rope, "rope_type": rope_type},
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", mt == "qwen2")),
                mlp_bias=bool(raw.get("mlp_bias", False)), qk_norm=(mt == "qwen3"),
                sliding_window=int(window) if window else None, hidden_act=act,
                eos_token_ids=eos_ids, bos_token_id=raw.get("bos_token_id"),
            )
        except (KeyError, TypeError) as e:
            raise ServeError(f"{where}: missing or bad field {e}") from None
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
