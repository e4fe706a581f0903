"""Random role bundles on a base model (for tests, demos and benchmarks; offline)."""
from __future__ import annotations

from pathlib import Path

import torch

from lragent.bundle import Bundle, base_fingerprint, write_bundle

from lragent.serve.models import load_config


def random_bundle(base_dir: str | Path, *, roles=("planner", "actor", "reflector"), rank: int = 8,
                  alpha: float | None = None, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                  share_a=("k_proj", "v_proj"), seed: int = 0, b_std: float = 0.08, a_std: float | None = None,
                  identical: bool = False, layers=None) -> Bundle:
    """A bundle with random A and B (B non-zero, so roles really differ) for every layer of ``targets``.
    ``identical``: every role gets the same tensors. ``layers``: only these decoder layers carry adapters (an
    iterable of indices, negative from the end; or {target: indices} for per-target layer sets); None: all."""
    cfg = load_config(base_dir)
    dims = cfg.lora_dims
    g = torch.Generator().manual_seed(seed)
    a_std = a_std if a_std is not None else 1.0 / cfg.hidden_size ** 0.5
    shared_a, role_a, role_b = {}, {r: {} for r in roles}, {r: {} for r in roles}
    n = cfg.num_layers

    def carries(li: int, t: str) -> bool:
        if layers is None:
            return True
        chosen = layers.get(t, ()) if isinstance(layers, dict) else layers
        return li in {i % n for i in chosen}

    for li in range(n):
        for t in targets:
            if not carries(li, t):
                continue
            fin, fout = dims[t]
            part = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            name = f"model.layers.{li}.{part}.{t}"
            if t in share_a:
                shared_a[name] = torch.randn(rank, fin, generator=g) * a_std
            first_a, first_b = None, None
            for r in roles:
                if identical and first_b is not None:
                    a, b = first_a, first_b
                else:
                    a = torch.randn(rank, fin, generator=g) * a_std
                    b = torch.randn(fout, rank, generator=g) * b_std
                    first_a, first_b = a, b
                if t not in share_a:
                    role_a[r][name] = a.clone()
                role_b[r][name] = b.clone()
    base = {"name": Path(base_dir).name, "path": str(Path(base_dir).absolute()),
            "config_sha256": base_fingerprint(base_dir)}
    return Bundle(roles=list(roles), rank=rank, alpha=float(alpha if alpha is not None else 2 * rank),
                  targets=list(targets), share_a=list(share_a), shared_a=shared_a, role_a=role_a, role_b=role_b,
                  base=base, source={"kind": "random", "seed": seed})


def write_random_bundle(base_dir, out_dir, **kw) -> Path:
    return write_bundle(random_bundle(base_dir, **kw), out_dir, force=True)




def hf_peft_greedy(base_dir, peft_dir, prompt_ids: list[int], n: int):
    """The oracle: Hugging Face transformers + PEFT with one role's adapter and its own KV cache, greedy.
    Returns (token ids, logits [n, vocab] fp32)."""
    import inspect

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, DynamicCache

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"   # 5.x renamed it
    model = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    toks, logits, cache = [], [], DynamicCache()
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True, **{kw: cache})
        for _ in range(n):
            row = out.logits[0, -1].float()
            logits.append(row)
            toks.append(int(row.argmax()))
            out = model(torch.tensor([[toks[-1]]]), use_cache=True, **{kw: cache})
    return toks, torch.stack(logits)
