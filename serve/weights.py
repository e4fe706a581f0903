"""Load a Llama-family base model's safetensors into plain tensors (no transformers modeling code)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig, ServeError


@dataclass
class LayerWeights:
    """One decoder layer; q/k/v and gate/up are fused row-wise (one matmul each)."""
    ln1: torch.Tensor
    ln2: torch.Tensor
    wqkv: torch.Tensor                     # [H*D + 2*H_kv*D, hidden]
    wo: torch.Tensor
    wgu: torch.Tensor                      # [2*intermediate, hidden]
    wd: torch.Tensor
    bqkv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    bgu: torch.Tensor | None = None
    bd: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


def _cat_bias(biases: list, sizes: list[int]) -> torch.Tensor | None:
    if all(b is None for b in biases):
        return None
    ref = next(b for b in biases if b is not None)
    return torch.cat([b if b is not None else ref.new_zeros(n) for b, n in zip(biases, sizes)])


@dataclass
class ModelWeights:
    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list[LayerWeights]


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ServeError(f"{index} is malformed ({e})") from None
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ServeError(f"base model {model_dir} has no *.safetensors weights (pickle checkpoints are not loaded)")
    return files


def load_weights(model_dir: str | Path, cfg: ModelConfig, *, dtype: torch.dtype, device) -> ModelWeights:
    model_dir = Path(model_dir)
    where: dict[str, Path] = {}                     # tensor name -> file (tensors are read one at a time)
    for f in _weight_files(model_dir):
        if not f.is_file():
            raise ServeError(f"base model {model_dir} is missing weight file {f.name}")
        with safe_open(str(f), framework="pt") as sf:
            where.update({k: f for k in sf.keys()})

    def get(name: str, shape: tuple | None = None, *, optional: bool = False):
        if name not in where:
            if optional:
                return None
            raise ServeError(f"base model {model_dir} has no tensor {name!r}: not a {cfg.model_type} checkpoint?")
        with safe_open(str(where[name]), framework="pt") as sf:
            t = sf.get_tensor(name)
        if shape is not None and tuple(t.shape) != shape:
            raise ServeError(f"{name} has shape {list(t.shape)}, expected {list(shape)} from config.json")
        return t.to(device=device, dtype=dtype).contiguous()

    d, dq, dkv, ff = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.d_kv, cfg.intermediate_size
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        no_bias = not cfg.attention_bias
        layers.append(LayerWeights(
            ln1=get(p + "input_layernorm.weight", (d,)), ln2=get(p + "post_attention_layernorm.weight", (d,)),
            wqkv=torch.cat([get(a + "q_proj.weight", (dq, d)), get(a + "k_proj.weight", (dkv, d)),
                            get(a + "v_proj.weight", (dkv, d))]),
            bqkv=_cat_bias([get(a + f"{t}_proj.bias", (n,), optional=no_bias) for t, n in zip("qkv", (dq, dkv, dkv))],
                           [dq, dkv, dkv]),
            wo=get(a + "o_proj.weight", (d, dq)), bo=get(a + "o_proj.bias", (d,), optional=True),
            wgu=torch.cat([get(p + "mlp.gate_proj.weight", (ff, d)), get(p + "mlp.up_proj.weight", (ff, d))]),
            bgu=_cat_bias([get(p + "mlp.gate_proj.bias", (ff,), optional=True),
                           get(p + "mlp.up_proj.bias", (ff,), optional=True)], [ff, ff]),
            wd=get(p + "mlp.down_proj.weight", (d, ff)), bd=get(p + "mlp.down_proj.bias", (d,), optional=True),
            q_norm=get(a + "q_norm.weight", (cfg.head_dim,), optional=not cfg.qk_norm),
            k_norm=get(a + "k_norm.weight", (cfg.head_dim,), optional=not cfg.qk_norm),
        ))
    embed = get("model.embed_tokens.weight", (cfg.vocab_size, d))
    lm_head = get("lm_head.weight", (cfg.vocab_size, d), optional=cfg.tie_word_embeddings)
    return ModelWeights(embed=embed, norm=get("model.norm.weight", (d,)),
                        lm_head=embed if lm_head is None else lm_head, layers=layers)
