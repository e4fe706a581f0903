"""Tiny random Llama-family models and a local tokenizer, built in code (offline) for tests and examples."""
from __future__ import annotations

from pathlib import Path

# Shapes used across the test-suite: (name, heads, kv_heads, head_dim).
TINY_SHAPES = {
    "gqa16": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "mha16": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    "gqa32": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32),
    "mha64": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=64),
}


def tiny_llama_config(shape: str = "gqa16", *, hidden_size: int = 64, num_hidden_layers: int = 2,
                      vocab_size: int | None = None, model_type: str = "llama", **overrides):
    """A ``transformers`` config for a tiny Llama-family decoder (2 layers, hidden 64 by default)."""
    import transformers
    from lragent.toy.tokenizer import vocabulary

    kw = dict(
        vocab_size=vocab_size or len(vocabulary()),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(TINY_SHAPES[shape])
    kw.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "gemma": transformers.GemmaConfig}[model_type]
    return cls(**kw)


def make_random_base(out_dir: str | Path, shape: str = "gqa16", *, seed: int = 0, dtype=None,
                     model_type: str = "llama", **overrides) -> Path:
    """Write a random tiny base model (config.json, model.safetensors, tokenizer) to ``out_dir``."""
    import torch
    import transformers
    from lragent.toy.tokenizer import save_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_llama_config(shape, model_type=model_type, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    # Random init with a larger std than the HF default so that attention patterns are not near-uniform.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(out)
    return out
