"""The Llama family (llama, mistral, qwen2, qwen3): config parsing, weight names and the decoder block.

Per layer: RMSNorm -> q/k/v (+ LoRA) -> [Qwen3 per-head q/k RMSNorm] -> RoPE -> ``ctx.attend`` (the runner writes
the cache and runs the attention backend) -> o (+ LoRA) -> RMSNorm -> gated MLP (+ LoRA). q/k/v are fused
row-wise (one matmul), and the runner may append rows of its own to that matmul
(:meth:`LlamaModel.fuse_attention_rows`: the low-rank modes' shared A, whose outputs ``ctx.attend`` gets as
``extra``); gate and up are not (on CPU one [2*intermediate, hidden] matmul runs about 10% slower per row than two
[intermediate, hidden] ones). ``ctx.lora(layer, target, x)`` returns the LoRA delta of the batch's roles, or
None where the target carries none (or, in the low-rank cache modes, for k/v: applied at attention time instead).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lragent.kernels.reference import rotate_half

from ..config import ServeError
from . import Family, register
from .config import ModelConfig
from .weights import WeightReader

QKV = ("q_proj", "k_proj", "v_proj")


def parse(raw: dict, where: str) -> ModelConfig:
    """ModelConfig of a llama / mistral / qwen2 / qwen3 config.json."""
    mt = raw.get("model_type")
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ServeError(f"{where}: hidden_act {act!r} is not supported (silu)")
    window = raw.get("sliding_window")
    if mt in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
        window = None
    return ModelConfig.common(raw, where, hidden_act="silu", qk_norm=(mt == "qwen3"),
                              attention_bias=bool(raw.get("attention_bias", mt == "qwen2")),
                              sliding_window=int(window) if window else None)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalise in fp32, cast back, then scale (HF's order)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    ln2: torch.Tensor
    wqkv: torch.Tensor                     # [H*D + 2*H_kv*D, hidden]
    wo: torch.Tensor
    wg: torch.Tensor                       # [intermediate, hidden]
    wu: torch.Tensor
    wd: torch.Tensor
    bqkv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    bg: torch.Tensor | None = None
    bu: torch.Tensor | None = None
    bd: torch.Tensor | None = None
    qk_norm: torch.Tensor | None = None    # Qwen3: per-head q and k norm weights stacked [(H + H_kv), D]
    wqkvx: torch.Tensor | None = None      # [wqkv; extra rows] (wqkv is then a view of its first rows)
    bqkvx: torch.Tensor | None = None


class LlamaModel:
    """The decoder: weights as plain tensors and ``forward(input_ids, ctx) -> fp32 logits``."""

    def __init__(self, w: WeightReader, cfg: ModelConfig):
        self.cfg = cfg
        d, dq, dkv, ff, hd = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.d_kv, cfg.intermediate_size, \
            cfg.head_dim
        self.splits = (dq, dkv, dkv)
        self.layers = []
        for i in range(cfg.num_layers):
            p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
            lw = LayerWeights(
                ln1=self.norm_weight(w.get(p + "input_layernorm.weight", (d,))),
                ln2=self.norm_weight(w.get(p + "post_attention_layernorm.weight", (d,))),
                wqkv=w.cat([a + f"{t}.weight" for t in QKV], [(dq, d), (dkv, d), (dkv, d)]),
                bqkv=w.cat([a + f"{t}.bias" for t in QKV], [(dq,), (dkv,), (dkv,)],
                           optional=True) if cfg.attention_bias else None,
                wo=w.get(a + "o_proj.weight", (d, dq)), bo=w.get(a + "o_proj.bias", (d,), optional=True),
                wg=w.get(p + "mlp.gate_proj.weight", (ff, d)), wu=w.get(p + "mlp.up_proj.weight", (ff, d)),
                bg=w.get(p + "mlp.gate_proj.bias", (ff,), optional=True),
                bu=w.get(p + "mlp.up_proj.bias", (ff,), optional=True),
                wd=w.get(p + "mlp.down_proj.weight", (d, ff)), bd=w.get(p + "mlp.down_proj.bias", (d,), optional=True))
            if cfg.qk_norm:
                lw.qk_norm = torch.cat([w.get(a + "q_norm.weight", (hd,)).expand(cfg.num_heads, hd),
                                        w.get(a + "k_norm.weight", (hd,)).expand(cfg.num_kv_heads, hd)])
            self.layers.append(lw)
        self.embed_tokens = w.get("model.embed_tokens.weight", (cfg.vocab_size, d))
        self.final_norm = self.norm_weight(w.get("model.norm.weight", (d,)))
        lm_head = w.get("lm_head.weight", (cfg.vocab_size, d), optional=cfg.tie_word_embeddings)
        self.lm_head = self.embed_tokens if lm_head is None else lm_head

    # -- the parts a family variant may change ------------------------------------------------------------------
    def norm_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, w, self.cfg.rms_norm_eps)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens[ids]

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)

    def fuse_attention_rows(self, layer: int, rows: torch.Tensor | None) -> torch.Tensor | None:
        """Append ``rows`` [n, hidden] to the layer's q/k/v matmul (None: remove them): ``forward`` then computes
        ``hn @ rows^T`` in the same pass over the weights as q/k/v (one call; on CPU a separate [1, hidden] x
        [hidden, n] product of a cold 1 MB matrix costs about 3x its share of the fused one) and hands it to
        ``ctx.attend`` as ``extra``. The q/k/v weight becomes a view of the fused one (no second copy). Returns the
        view of the appended rows (None when removed)."""
        lw = self.layers[layer]
        main = lw.wqkv.shape[0]
        if rows is None:
            if lw.wqkvx is not None:
                lw.wqkv, lw.bqkv = lw.wqkv.clone(), None if lw.bqkv is None else lw.bqkv.clone()
            lw.wqkvx = lw.bqkvx = None
            return None
        rows = rows.to(lw.wqkv)
        if lw.wqkvx is not None and lw.wqkvx.shape[0] == main + rows.shape[0]:
            lw.wqkvx[main:] = rows
        else:
            lw.wqkvx = torch.cat([lw.wqkv, rows]).contiguous()
            lw.wqkv = lw.wqkvx[:main]
            if lw.bqkv is not None:
                lw.bqkvx = torch.cat([lw.bqkv, lw.bqkv.new_zeros(rows.shape[0])])
                lw.bqkv = lw.bqkvx[:main]
        return lw.wqkvx[main:]

    # -- the block ----------------------------------------------------------------------------------------------
    @staticmethod
    def _add_lora(y: torch.Tensor, ctx, li: int, targets, x: torch.Tensor, widths) -> None:
        lo = 0
        for t, n in zip(targets, widths):
            delta = ctx.lora(li, t, x)
            if delta is not None:
                y[:, lo:lo + n] += delta
            lo += n

    def forward(self, input_ids: torch.Tensor, ctx) -> torch.Tensor:
        """Run the flat batch ``input_ids`` [T] through the decoder; fp32 logits of ``ctx.logits_rows``."""
        cfg = self.cfg
        n, h, hk, d, ff = input_ids.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        x = self.embed(input_ids)
        for li, lw in enumerate(self.layers):
            hn = self.norm(x, lw.ln1)
            extra = None
            if lw.wqkvx is None:
                qkv = F.linear(hn, lw.wqkv, lw.bqkv)
            else:
                qkvx = F.linear(hn, lw.wqkvx, lw.bqkvx)
                qkv, extra = qkvx[:, :lw.wqkv.shape[0]], qkvx[:, lw.wqkv.shape[0]:]
            self._add_lora(qkv, ctx, li, QKV, hn, self.splits)
            qkv = qkv.view(n, h + 2 * hk, d)
            qk, v = qkv[:, :h + hk], qkv[:, h + hk:]
            if lw.qk_norm is not None:
                qk = rms_norm(qk, lw.qk_norm, cfg.rms_norm_eps)
            qk = qk * ctx.cos + rotate_half(qk) * ctx.sin
            o = ctx.attend(li, qk[:, :h], qk[:, h:], v, hn, extra).reshape(n, h * d)
            y = F.linear(o, lw.wo, lw.bo)
            self._add_lora(y, ctx, li, ("o_proj",), o, (y.shape[1],))
            x = x + y
            hn = self.norm(x, lw.ln2)
            g = F.linear(hn, lw.wg, lw.bg)
            self._add_lora(g, ctx, li, ("gate_proj",), hn, (ff,))
            u = F.linear(hn, lw.wu, lw.bu)
            self._add_lora(u, ctx, li, ("up_proj",), hn, (ff,))
            m = self.act(g).mul_(u)
            y = F.linear(m, lw.wd, lw.bd)
            self._add_lora(y, ctx, li, ("down_proj",), m, (y.shape[1],))
            x = x + y
        x = self.norm(x[ctx.logits_rows], self.final_norm)
        return F.linear(x, self.lm_head).float()


FAMILY = register(Family("llama", ("llama", "mistral", "qwen2", "qwen3"), parse, LlamaModel))
