"""Fidelity of ``import-peft --share-a rank=R``: held-out accuracy vs the shared rank R on the ``handoff`` task.

    python benchmarks/rank_curve.py [--work runs/rank_curve] [--ranks 2,4,8,12,16,24,32] [--steps 300]
                                    [--episodes 300] [--nonshared all|exact|R,R,...] [--reuse]

1. Trains one plain PEFT LoRA per role (planner, actor, reflector), independently, on that role's handoff training
   records (``lragent.toy.handoff.write_dataset``), on the shipped handoff base: r=16, alpha=32, k_proj/v_proj of the
   last decoder layer only, each role from its own seed (so the roles' A differ), completion-only loss, AdamW with
   cosine decay; saved with ``save_pretrained`` (safetensors) under WORK/peft/<role>. Each adapter's held-out exact
   match on its own role is measured with HF ``generate`` (greedy); the base's is measured too (0% by design).
2. Imports the three adapters with ``lragent.train.import_peft.import_peft`` (what ``lragent import-peft`` runs) at
   ``--share-a exact`` and ``rank=R`` for each R, into WORK/bundles/, and keeps each role's relative dW error on the
   shared-A modules (``rel ||dW err||_F``).
3. Evaluates every bundle in one ``lragent eval --task handoff --episodes N --mode lrshared --json`` run, and (the
   reference) ``--mode nonshared`` on the bundles chosen by ``--nonshared`` (default: all of them).
4. Prints a table and writes ``benchmarks/results/rank_curve.csv`` (one row per bundle and mode) and
   ``benchmarks/results/rank_curve.png`` (exact match vs R with 95% CIs; relative dW error on the right axis).

Seeded and deterministic on CPU (torch 1 thread): a rerun from scratch writes the same CSV. Runtime on 2 shared CPU
cores: about 5.5 minutes (training ~70 s, import ~2 s, the two eval runs ~2 min each).
``--reuse`` skips training when WORK/peft/<role> already exists.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

from lragent.toy import handoff
from lragent.toy.check_specialise import greedy_complete
from lragent.toy.pretrain_base import collate, encode_record

RESULTS = Path(__file__).resolve().parent / "results"
ROLES = handoff.ROLES


def train_role(base, tok, records, *, seed, steps, batch_size, lr, layer, log):
    """A fresh PEFT LoRA on ``records`` (loss on completion tokens only); A drawn from ``seed``."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["k_proj", "v_proj"],
                     layers_to_transform=[layer], task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng, order, t0 = random.Random(f"rank_curve/{seed}"), [], time.time()
    enc = [encode_record(r, tok) for r in records]
    model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            perm = list(range(len(enc)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        loss = model(**collate([enc[i] for i in idx], tok.pad_token_id)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == 1 or step % 100 == 0 or step == steps:
            log(f"    step {step:4d}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)")
    return model, time.time() - t0


def generate_em(model, tok, records) -> float:
    preds = greedy_complete(model, tok, [r["prompt"] for r in records])
    return sum(handoff.exact_match(p, r["completion"]) for p, r in zip(preds, records)) / len(records)


def train_all(args, work: Path, log) -> dict:
    base_dir = str(handoff.base_path())
    tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32")
    layer = base.config.num_hidden_layers - 1
    paths = handoff.write_dataset(work / "data", n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
    train, evals = handoff.read_jsonl(paths["train"]), handoff.read_jsonl(paths["eval"])
    info = {}
    for i, role in enumerate(ROLES):
        out = work / "peft" / role
        held = [r for r in evals if r["role"] == role]
        if args.reuse and (out / "adapter_model.safetensors").is_file():
            from peft import PeftModel
            model, secs = PeftModel.from_pretrained(copy.deepcopy(base), str(out)), 0.0
            log(f"  {role}: reusing {out}")
        else:
            recs = [r for r in train if r["role"] == role]
            log(f"  {role}: training on {len(recs)} records (layer {layer} k_proj/v_proj, r=16, seed {args.seed + i})")
            model, secs = train_role(base, tok, recs, seed=args.seed + i, steps=args.steps,
                                     batch_size=args.batch_size, lr=args.lr, layer=layer, log=log)
            model.save_pretrained(str(out), safe_serialization=True)
        info[role] = {"path": out, "train_s": round(secs, 1), "em_adapted": generate_em(model, tok, held),
                      "em_base": generate_em(base, tok, held), "n": len(held)}
        log(f"  {role}: held-out exact match (HF generate, {len(held)} records): adapter "
            f"{info[role]['em_adapted']:.1%}, base {info[role]['em_base']:.1%}")
    from safetensors.torch import load_file
    a = {r: next(v for k, v in load_file(str(info[r]["path"] / "adapter_model.safetensors")).items()
                 if "k_proj.lora_A" in k) for r in ROLES}
    assert not any(torch.equal(a[p], a[q]) for p in ROLES for q in ROLES if p < q), "roles share an A already"
    return info


def import_all(args, work: Path, adapters: dict, log) -> dict:
    from lragent.train.import_peft import import_peft
    bundles = {}
    for share in ["exact"] + [f"rank={r}" for r in args.ranks]:
        out = work / "bundles" / share.replace("=", "")
        _, rep = import_peft(handoff.base_path(), {r: adapters[r]["path"] for r in ROLES}, out, share=share,
                             force=True)
        srank = max(rep["shared_rank"].values())
        bundles[share] = {"path": str(out), "R": srank, "bundle_rank": rep["rank"],
                          "kinds": rep["shared_targets"],
                          "rel_err": {r: rep["roles"][r]["rel_err_shared"] for r in ROLES}}
        log(f"  {share:8s} -> {out}: shared rank {srank} ({rep['shared_targets']}), rel ||dW err||_F "
            + " ".join(f"{r} {e:.3g}" for r, e in bundles[share]["rel_err"].items()))
    return bundles


def run_eval(args, paths: list[str], mode: str, out: Path, log) -> dict:
    cmd = [sys.executable, "-m", "lragent.cli", "eval", "--task", "handoff", "--episodes", str(args.episodes),
           "--seed", str(args.seed), "--mode", mode, "--threads", "1", "--json", "--out", str(out)]
    for p in paths:
        cmd += ["--bundle", p]
    log(f"  $ {' '.join(cmd[1:])}")
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"lragent eval failed ({res.returncode}):\n{res.stderr[-2000:]}")
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    log(f"  ({time.time() - t0:.0f}s)")
    per = doc["bundles"] if "bundles" in doc else {paths[0]: {"modes": doc["modes"]}}
    return {p: per[p]["modes"][mode] for p in paths}


def fmt(g: dict | None) -> str:
    return "-" if g is None else f"{100 * g['exact_match']:5.1f} [{100 * g['ci95'][0]:5.1f},{100 * g['ci95'][1]:5.1f}]"


def report(bundles: dict, out_dir: Path) -> None:
    rows, modes = [], ("lrshared", "nonshared")
    head = f"{'share':8s} {'R':>3s}  " + " ".join(f"{'err ' + r[:4]:>9s}" for r in ROLES) + "  " + "  ".join(
        f"{m + ' ' + k:^20s}" for m in modes for k in ("all", "reader", "writer"))
    print(head + "\n" + "-" * len(head))
    for share, b in bundles.items():
        cells = [f"{share:8s} {b['R']:3d} "] + [f"{b['rel_err'][r]:9.2e}" for r in ROLES]
        for m in modes:
            d = b["eval"].get(m)
            cells += [fmt(d), fmt(d and d["kinds"].get("reader")), fmt(d and d["kinds"].get("writer"))]
            if d:
                row = {"share": share, "R": b["R"], "bundle_rank": b["bundle_rank"], "mode": m, "n": d["n"]}
                row.update({f"rel_err_{r}": b["rel_err"][r] for r in ROLES})
                for g, v in [("all", d)] + [(k, d["kinds"][k]) for k in ("reader", "writer")] + \
                        [(r, d["roles"][r]) for r in ROLES]:
                    row.update({f"em_{g}": v["exact_match"], f"lo_{g}": v["ci95"][0], f"hi_{g}": v["ci95"][1]})
                rows.append(row)
        print(" ".join(cells))
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "rank_curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax2 = ax.twinx()
    for (m, g), (c, mk) in zip([(m, g) for m in modes for g in ("all", "reader", "writer")],
                               [("C0", "o"), ("C1", "s"), ("C2", "^"), ("C0", "x"), ("C1", "x"), ("C2", "x")]):
        pts = sorted((r["R"], r[f"em_{g}"], r[f"lo_{g}"], r[f"hi_{g}"]) for r in rows if r["mode"] == m)
        if pts:
            x, y, lo, hi = (list(t) for t in zip(*pts))
            ax.errorbar(x, [100 * v for v in y], yerr=[[max(0.0, 100 * (a - b)) for a, b in zip(y, lo)],
                                                      [max(0.0, 100 * (b - a)) for a, b in zip(y, hi)]],
                        color=c, marker=mk, ls="-" if m == "lrshared" else ":", capsize=3, label=f"{m} {g}")
    xs = sorted({b["R"] for b in bundles.values()})
    for r, ls in zip(ROLES, ("--", "-.", (0, (1, 1)))):
        ax2.plot(xs, [next(b["rel_err"][r] for b in bundles.values() if b["R"] == x) for x in xs],
                 color="gray", ls=ls, label=f"rel dW err {r}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) + (" (exact)" if x == bundles["exact"]["R"] else "") for x in xs], fontsize=7)
    ax2.set_ylim(0, 1.03)
    ax.set_xlabel("shared rank R (import-peft --share-a rank=R)")
    ax.set_ylabel("exact match % (95% CI)")
    ax2.set_ylabel("relative ||dW err||_F (shared-A modules, gray)")
    ax.set_ylim(-3, 103)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=6, loc="center right", framealpha=0.9)
    ax.set_title("handoff: accuracy vs shared rank of imported independent PEFT adapters", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "rank_curve.png", dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/rank_curve", help="adapters, bundles, eval outputs")
    ap.add_argument("--ranks", default="2,4,8,12,16,24,32")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-train", type=int, default=1000, help="training records per role")
    ap.add_argument("--n-eval", type=int, default=100, help="held-out records per role for the generate check")
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--nonshared", default="all", help="bundles also evaluated in nonshared: all | exact | R,R,...")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true", help="reuse trained adapters found under WORK/peft")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    args.ranks = [int(r) for r in args.ranks.split(",")]
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    work, t0 = Path(args.work), time.time()
    log = lambda s: print(f"[{time.time() - t0:6.0f}s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    log("1. training one PEFT LoRA per role")
    adapters = train_all(args, work, log)
    log("2. import-peft")
    bundles = import_all(args, work, adapters, log)
    log("3. lragent eval")
    for b, d in run_eval(args, [b["path"] for b in bundles.values()], "lrshared", work / "eval_lrshared",
                         log).items():
        next(v for v in bundles.values() if v["path"] == b)["eval"] = {"lrshared": d}
    ns = [k for k in bundles if args.nonshared == "all" or k == "exact"
          or k in {f"rank={r}" for r in args.nonshared.split(",") if r.isdigit()}]
    for b, d in run_eval(args, [bundles[k]["path"] for k in ns], "nonshared", work / "eval_nonshared", log).items():
        next(v for v in bundles.values() if v["path"] == b)["eval"]["nonshared"] = d
    print("\nper-role adapters alone (HF generate, held-out): " + "; ".join(
        f"{r} {a['em_adapted']:.1%} (base {a['em_base']:.1%}, n={a['n']}, {a['train_s']}s)" for r, a in adapters.items()))
    print(f"eval: {args.episodes} held-out handoff episodes; exact match % [95% CI]; err = rel ||dW err||_F\n")
    report(dict(sorted(bundles.items(), key=lambda kv: kv[1]["R"])), Path(args.out))
    log(f"wrote {args.out}/rank_curve.csv and rank_curve.png (total {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
