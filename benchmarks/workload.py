"""Models and adapters for the trace benchmark, built in code (no downloads): a random-weight Llama of a realistic
shape with a word-level tokenizer as large as its vocabulary, N random PEFT LoRA adapters on it, and the lragent
bundle made from them by ``lragent import-peft --share-a exact`` (the path a user with ordinary PEFT adapters takes).

Everything lands in one work directory and is reused when its ``spec.json`` matches (building costs seconds).
The embedded default (``--model embedded``) is the shipped tiny toy base instead, with adapters made the same way.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Spec:
    hidden: int = 1024
    layers: int = 8
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 64
    intermediate: int = 2816
    vocab: int = 32000
    max_positions: int = 32768
    roles: int = 3
    rank: int = 16
    targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    seed: int = 0
    model: str = "random"         # random | embedded

    def role_names(self) -> list[str]:
        """planner, actor, reflector, then role3, role4, ... for more roles."""
        names = ["planner", "actor", "reflector"]
        return (names + [f"role{i}" for i in range(3, self.roles)])[:self.roles]


def _word_tokenizer(out: Path, vocab: int) -> None:
    """A word-level fast tokenizer with ``vocab`` entries (<pad>, <s>, </s>, <unk>, then w4, w5, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(out))


def build_base(spec: Spec, out: Path) -> Path:
    """The random base model directory (config, safetensors weights, tokenizer)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                                   num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                                   num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
                                   max_position_embeddings=spec.max_positions, rms_norm_eps=1e-5, rope_theta=10000.0,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(spec.seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():                       # wider than HF's init, so attention is not near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.04)
    model.save_pretrained(str(out), safe_serialization=True)
    _word_tokenizer(out, spec.vocab)
    return out


def build_adapters(spec: Spec, base: Path, out: Path) -> dict[str, Path]:
    """One random PEFT LoRA adapter per role (independent A and B, B nonzero), saved as safetensors."""
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    paths = {}
    for i, role in enumerate(spec.role_names()):
        torch.manual_seed(spec.seed + 100 + i)
        lcfg = peft.LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, target_modules=list(spec.targets),
                               lora_dropout=0.0, init_lora_weights=False)
        pm = peft.get_peft_model(model, lcfg)
        pm.save_pretrained(str(out / role), safe_serialization=True)
        model = pm.unload()                      # the plain base again for the next role
        paths[role] = out / role
    return paths


def prepare(spec: Spec, workdir: Path) -> dict:
    """Build (or reuse) base, adapters and bundle for ``spec`` under ``workdir``; returns their paths:
    {"base", "adapters": {role: dir}, "bundle"}."""
    workdir = Path(workdir)
    key = json.dumps(asdict(spec), sort_keys=True)
    stamp = workdir / "spec.json"
    paths = {"base": workdir / "base", "bundle": workdir / "bundle",
             "adapters": {r: workdir / "peft" / r for r in spec.role_names()}}
    if stamp.is_file() and stamp.read_text() == key and (workdir / "bundle" / "manifest.json").is_file():
        return paths
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    if spec.model == "embedded":
        from lragent.toy import default_base_path
        shutil.copytree(default_base_path(), paths["base"])
    else:
        build_base(spec, paths["base"])
    build_adapters(spec, paths["base"], workdir / "peft")
    cmd = [sys.executable, "-m", "lragent.cli", "import-peft", "--base", str(paths["base"]), "--out",
           str(paths["bundle"]), "--share-a", "exact", "--role",
           *[f"{r}={p}" for r, p in paths["adapters"].items()]]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    stamp.write_text(key)
    return paths
