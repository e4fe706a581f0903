"""Feasibility check: ordinary PEFT LoRA adapters, one per role, specialise the shipped base on the toy task.

    python -m lragent.toy.check_specialise [--base DIR] [--steps 150] [--rank 8] [--targets q_proj,k_proj,v_proj,o_proj]

For each role: train a fresh LoRA (r=8, alpha=16 by default) on that role's train records (loss on completion tokens
only), then report held-out per-role completion loss and exact-match accuracy of the base and of the adapted model.
Exact match is teacher forced (equivalent to greedy decoding, see ``teacher_forced_eval``) and cross-checked with
real ``generate`` calls on a few records.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Sequence

from lragent.toy import default_base_path, task
from lragent.toy.pretrain_base import collate, encode_record, teacher_forced_eval

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def load_base(path: str | Path | None = None):
    import transformers
    path = str(path or default_base_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    return model, tok


def greedy_complete(model, tok, prompts: Sequence[str], max_new_tokens: int = 6) -> list[str]:
    """Greedy completions (decoded text, stopping at ``</s>``) with ``model.generate``, one prompt at a time."""
    import torch
    outs = []
    model.eval()
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            outs.append(" " + tok.decode(gen[0, ids.shape[1]:]))
    return outs


def train_lora(base, tok, records: Sequence[dict], *, rank: int = 8, alpha: int = 16,
               targets: Sequence[str] = DEFAULT_TARGETS, steps: int = 100, batch_size: int = 16, lr: float = 3e-3,
               seed: int = 0, time_budget_s: float | None = None, log=print):
    """A PEFT LoRA adapter trained on ``records`` (completion-only loss); returns (peft_model, info)."""
    import copy
    import math
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                           target_modules=list(targets), task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(f"check/{seed}")
    order: list[int] = []
    t0 = time.time()
    step = 0
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            perm = list(range(len(records)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        batch = collate([encode_record(records[i], tok) for i in idx], tok.pad_token_id)
        model.train()
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == 1:
            log(f"  step {step:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if time_budget_s is not None and time.time() - t0 > time_budget_s:
            break
    info = {"steps": step, "batch_size": batch_size, "lr": lr, "train_time_s": round(time.time() - t0, 1),
            "trainable_params": sum(p.numel() for p in params)}
    return model, info


def run_check(base_path: str | Path | None = None, *, n_train: int = 2000, n_eval: int = 200, seed: int = 0,
              roles: Sequence[str] = task.ROLES, n_generate: int = 20, threads: int = 2, log=print, **train_kw) -> dict:
    import torch
    torch.set_num_threads(threads)
    base, tok = load_base(base_path)
    train, evals = task.make_splits(n_train, n_eval, seed)
    by_role = {r: [x for x in train if x["role"] == r] for r in roles}
    eval_by_role = {r: [x for x in evals if x["role"] == r] for r in roles}
    base_ev = teacher_forced_eval(base, tok, [x for x in evals if x["role"] in roles])
    log("base: " + json.dumps(base_ev))
    results = {}
    for role in roles:
        log(f"role {role}: training on {len(by_role[role])} records")
        model, info = train_lora(base, tok, by_role[role], seed=seed, log=log, **train_kw)
        cross = teacher_forced_eval(model, tok, [x for x in evals if x["role"] in roles])
        ev = cross[role]
        sub = eval_by_role[role][:n_generate]
        gen = task.score(sub, greedy_complete(model, tok, [x["prompt"] for x in sub]))[role] if n_generate else {}
        gen_base = task.score(sub, greedy_complete(base, tok, [x["prompt"] for x in sub]))[role] if n_generate else {}
        results[role] = {"base": base_ev[role], "adapted": ev, "train": info,
                         "generate_check": {"n": len(sub), "adapted": gen, "base": gen_base},
                         "on_other_roles": {r: v for r, v in cross.items() if r != role}}
        log(f"role {role}: " + json.dumps(results[role]))
    return results


def format_table(results: dict) -> str:
    lines = ["| role | base loss | base EM | adapted loss | adapted EM | steps | train s |",
             "|---|---|---|---|---|---|---|"]
    for role, r in results.items():
        lines.append(f"| {role} | {r['base']['loss']:.3f} | {r['base']['exact_match']:.1%} | "
                     f"{r['adapted']['loss']:.3f} | {r['adapted']['exact_match']:.1%} | {r['train']['steps']} | "
                     f"{r['train']['train_time_s']} |")
    others = [f"{role} adapter on {r}: EM {v['exact_match']:.0%}" for role, res in results.items()
              for r, v in res.get("on_other_roles", {}).items()]
    if others:
        lines.append("")
        lines.append("cross-role (an adapter evaluated on another role's records): " + "; ".join(others))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lragent.toy.check_specialise", description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=None, help="base model dir (default: the shipped tiny-llama)")
    ap.add_argument("--roles", default=",".join(task.ROLES))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--time-budget", type=float, default=None, help="max training seconds per role")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write results here")
    a = ap.parse_args(argv)
    res = run_check(a.base, n_train=a.n_train, n_eval=a.n_eval, seed=a.seed, roles=a.roles.split(","),
                    rank=a.rank, alpha=a.alpha, targets=a.targets.split(","), steps=a.steps,
                    batch_size=a.batch_size, lr=a.lr, time_budget_s=a.time_budget)
    print(format_table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
