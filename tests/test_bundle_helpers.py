"""Helpers shared by the bundle / export / import-peft tests (no tests here).

``make_run_dir`` writes the training run layout ``lragent export`` reads (run.json, config.yaml, metrics.jsonl,
checkpoints/step-NNNNNN/{adapter,optimizer}.safetensors + state.json), from a tiny random model with our shared-A
LoRA injected and its (zero-initialised) B randomised. ``make_peft_adapter`` saves an ordinary PEFT adapter.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from lragent.bundle import base_fingerprint


def make_run_dir(run_dir: Path, base_dir: Path, *, roles=("planner", "actor", "reflector"), steps=(3, 6), rank=4,
                 alpha=8.0, rslora=False, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                 share_a=("k_proj", "v_proj"), seed=0) -> dict[int, dict[str, torch.Tensor]]:
    """Write a run dir; returns {step: adapter tensors} as saved."""
    import transformers
    from lragent.train.lora import LoraSpec, inject_lora, lora_modules, lora_state

    run_dir = Path(run_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    spec = LoraSpec(roles=list(roles), rank=rank, alpha=alpha, rslora=rslora, targets=list(targets),
                    share_a=list(share_a))
    inject_lora(model, spec, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    saved = {}
    for step in steps:
        with torch.no_grad():
            for m in lora_modules(model).values():
                for p in list(m.lora_B) + list(m.lora_A):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        state = lora_state(model, list(roles))
        ck = run_dir / "checkpoints" / f"step-{step:06d}"
        ck.mkdir(parents=True)
        save_file(state, str(ck / "adapter.safetensors"))
        save_file({"exp_avg": torch.zeros(1)}, str(ck / "optimizer.safetensors"))
        (ck / "state.json").write_text(json.dumps({"step": step}))
        saved[step] = state
    meta = {"roles": list(roles),
            "base": {"name": "tiny", "path": str(Path(base_dir).absolute()),
                     "config_sha256": base_fingerprint(base_dir)},
            "lora": {"rank": rank, "alpha": alpha, "rslora": rslora, "dropout": 0.0, "targets": list(targets),
                     "share_a": list(share_a), "init": "kaiming"},
            "modules": sorted(lora_modules(model)), "dtype": "float32"}
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2))
    (run_dir / "config.yaml").write_text("# resolved config (informational)\n")
    (run_dir / "metrics.jsonl").write_text("")
    return saved


def make_peft_adapter(out: Path, base_dir: Path, *, r=4, alpha=8, seed=0, targets=("q_proj", "v_proj"),
                      rslora=False, **extra) -> Path:
    """An independently initialised PEFT LoRA adapter (random A and B), saved as safetensors."""
    import peft
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                          init_lora_weights=False, **extra)
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(str(out))
    return Path(out)


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes), to check that a failed command wrote nothing."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = Path(dirpath) / f
            out[p.relative_to(path).as_posix()] = p.read_bytes()
    return out


def run_cli(argv, capsys) -> tuple[int, str, str]:
    from lragent.cli.bundle import main
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(err: str, pattern: str) -> None:
    """stderr holds exactly one line, ``error: ...`` matching ``pattern`` (besides ``verifying: ...`` progress)."""
    import re
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("verifying: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]
