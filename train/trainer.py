"""The training loop: shared-A role adapters under ``accelerate`` (mixed precision, accumulation, DDP/FSDP).

Data order is a pure function of (seed, step), so ``--resume`` continues exactly where a checkpoint left off.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from lragent.bundle import base_fingerprint
from .checkpoint import checkpoint_dir, list_checkpoints, load_checkpoint, save_checkpoint
from .config import Config
from .data import IGNORE, build_dataset, collate, infer_roles, read_records
from .evaluate import evaluate, format_table
from .lora import LoraSpec, inject_lora, load_lora_state, lora_state, roles, set_shared_a_frozen

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainError(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    model: torch.nn.Module        # the (unwrapped) model with trained adapters
    roles: list[str]
    eval: dict | None             # {"base": {role: metrics}, "adapted": {...}} on the main process
    num_processes: int = 1        # processes that trained together (DDP/FSDP world size)


def resolve_base(base: str) -> Path:
    if base == "embedded":
        from lragent.toy import default_base_path
        return default_base_path()
    p = Path(base).expanduser().absolute()
    if not (p / "config.json").is_file():
        raise TrainError(f"model.base={base!r} is not a local Hugging Face model directory (no config.json); "
                         f"pass a downloaded model directory or 'embedded'")
    return p


def data_paths(cfg: Config, run_dir: Path) -> tuple[Path, Path | None]:
    """Training and held-out JSONL paths; "embedded" means the toy agent task generated into RUN_DIR/data."""
    d = cfg.data
    train = run_dir / "data" / "train.jsonl" if d.train == "embedded" else Path(d.train)
    ev = None if d.eval is None else (run_dir / "data" / "eval.jsonl" if d.eval == "embedded" else Path(d.eval))
    return train, ev


def write_embedded_data(cfg: Config, run_dir: Path) -> None:
    d = cfg.data
    if "embedded" in (d.train, d.eval) and not (run_dir / "data" / "train.jsonl").exists():
        from lragent.toy import write_dataset
        write_dataset(run_dir / "data", n_train=d.embedded_train_size, n_eval=d.embedded_eval_size,
                      seed=cfg.train.seed)


def lr_lambda(cfg: Config):
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        frac = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return max(0.0, 1 - frac) if t.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return f


def batch_indices(pool: list[int], micro: int, batch: int, world: int, rank: int, seed: int) -> list[int]:
    """Rows of micro-batch ``micro`` for process ``rank``: a seeded permutation per epoch over ``pool``."""
    per_epoch = max(1, len(pool) // (batch * world))
    epoch, j = divmod(micro, per_epoch)
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    start = (j * world + rank) * batch
    return [pool[perm[(start + i) % len(pool)]] for i in range(batch)]


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = cfg.train
    # cpu=True without CUDA: accelerate only forms a multi-process (gloo) group on CPU when told it runs on CPU.
    acc = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
                      cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    run_dir = Path(cfg.output_dir).absolute()
    done = list_checkpoints(run_dir)
    if (run_dir / "run.json").exists() and not resume:
        if not overwrite:
            raise TrainError(f"{run_dir} already holds a run: pass --resume to continue it, --overwrite to "
                             f"replace it, or output_dir=... for a new one")
        if acc.is_main_process:
            shutil.rmtree(run_dir)
        done = []
    if resume and not done:
        raise TrainError(f"--resume: no checkpoint in {run_dir}/checkpoints to resume from")
    acc.wait_for_everyone()
    set_seed(t.seed)
    base = resolve_base(cfg.model.base)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_embedded_data(cfg, run_dir)
    acc.wait_for_everyone()
    train_path, eval_path = data_paths(cfg, run_dir)

    tok = AutoTokenizer.from_pretrained(str(base))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    records = read_records(train_path, cfg.data.roles)
    role_names = cfg.data.roles or infer_roles(records)
    train_ds = build_dataset(records, tok, role_names, cfg.data.max_length)
    eval_ds = (build_dataset(read_records(eval_path, role_names), tok, role_names, cfg.data.max_length)
               if eval_path else None)

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=DTYPES[cfg.model.dtype])
    spec = LoraSpec(roles=role_names, **dataclasses.asdict(cfg.lora))
    mods = inject_lora(model, spec, seed=t.seed)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    names = sorted(mods)
    a_params = [p for n in names for p in mods[n].lora_A]
    b_params = [p for n in names for p in mods[n].lora_B]
    opt = torch.optim.AdamW([{"params": a_params, "lr": t.lr}, {"params": b_params, "lr": t.lr * t.loraplus_ratio}],
                            weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    if acc.is_main_process:
        _write_run_files(run_dir, cfg, base, role_names, spec, names)
    model, opt = acc.prepare(model, opt)
    inner = acc.unwrap_model(model)
    step = 0
    if resume:
        step, adapter = load_checkpoint(checkpoint_dir(run_dir, done[-1]), opt, sched)
        load_lora_state(inner, role_names, adapter)
        acc.print(f"resumed from {checkpoint_dir(run_dir, done[-1])} at step {step}")

    anchor = role_names.index(t.anchor_role) if t.anchor_role else 0
    anchor_steps = round(t.max_steps * t.anchor_fraction) if t.scheme == "sequential" else 0
    rid = train_ds["role_id"]
    pools = {"anchor": [i for i, r in enumerate(rid) if r == anchor],
             "others": [i for i, r in enumerate(rid) if r != anchor], "all": list(range(len(rid)))}
    wb = _wandb(cfg, run_dir) if acc.is_main_process else None
    metrics = open(run_dir / "metrics.jsonl", "a") if acc.is_main_process else None
    from tqdm.auto import tqdm
    bar = tqdm(total=t.max_steps, initial=step, disable=not acc.is_main_process, desc="train", file=sys.stderr)
    n_roles = len(role_names)
    stats = torch.zeros(n_roles, 2, device=acc.device)
    t0 = time.time()
    model.train()
    while step < t.max_steps:
        if t.scheme == "sequential":
            phase = "anchor" if step < anchor_steps else "others"
            set_shared_a_frozen(inner, phase == "others")
            first = 0 if phase == "anchor" else anchor_steps
        else:
            phase, first = "all", 0
        for k in range(t.grad_accum):
            micro = (step - first) * t.grad_accum + k
            rows = [train_ds[i] for i in batch_indices(pools[phase], micro, t.batch_size, acc.num_processes,
                                                        acc.process_index, t.seed)]
            batch = {key: v.to(acc.device) for key, v in collate(rows, pad_id).items()}
            with acc.accumulate(model), roles(inner, batch["role_ids"]):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                tok_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE,
                                           reduction="none")
                loss = tok_loss.sum() / (labels != IGNORE).sum().clamp(min=1)
                acc.backward(loss)
                if acc.sync_gradients and t.max_grad_norm > 0:
                    acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            per_ex = torch.stack([tok_loss.sum(1).detach(), (labels != IGNORE).sum(1).float()], 1)
            stats.index_add_(0, batch["role_ids"], per_ex)
        sched.step()
        step += 1
        bar.update(1)
        if step % t.log_every == 0 or step == t.max_steps:
            total = acc.reduce(stats, reduction="sum")
            rec = {"step": step, "lr": sched.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 2),
                   "loss": (total[:, 0].sum() / total[:, 1].sum().clamp(min=1)).item()}
            rec.update({f"loss/{r}": (total[i, 0] / total[i, 1]).item() for i, r in enumerate(role_names)
                        if total[i, 1] > 0})
            stats.zero_()
            if acc.is_main_process:
                bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                if wb:
                    wb.log(rec, step=step)
        if (t.save_every and step % t.save_every == 0) or step == t.max_steps:
            acc.wait_for_everyone()
            if acc.is_main_process:
                save_checkpoint(run_dir, step, lora_state(inner, role_names), opt, sched)
    bar.close()
    acc.wait_for_everyone()
    result = TrainResult(run_dir, inner, role_names, None, acc.num_processes)
    if eval_ds is not None and acc.is_main_process:
        kw = dict(pad_id=pad_id, batch_size=t.eval_batch_size, max_per_role=t.eval_max_examples, device=acc.device)
        base_res = evaluate(inner, eval_ds, role_names, adapters=False, **kw)
        adapted = evaluate(inner, eval_ds, role_names, adapters=True, **kw)
        result.eval = {"base": base_res, "adapted": adapted}
        (run_dir / "eval.json").write_text(json.dumps(result.eval, indent=2) + "\n")
        print("\nheld-out evaluation (exact match = greedy completion equals the reference):")
        print(format_table(base_res, adapted), flush=True)
        if wb:
            wb.log({f"eval/{k}/{r}": v[k] for r, v in adapted.items() for k in ("loss", "accuracy")}, step=step)
    if metrics:
        metrics.close()
    if wb:
        wb.finish()
    acc.wait_for_everyone()
    return result


def _write_run_files(run_dir: Path, cfg: Config, base: Path, role_names, spec: LoraSpec, modules) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    info = {
        "roles": role_names,
        "base": {"name": base.name, "path": str(base), "config_sha256": base_fingerprint(base)},
        "lora": {"rank": spec.rank, "alpha": spec.alpha, "rslora": spec.rslora, "dropout": spec.dropout,
                 "targets": spec.targets, "share_a": spec.share_a, "init": spec.init},
        "modules": list(modules), "dtype": "float32", "scheme": cfg.train.scheme,
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")


def _wandb(cfg: Config, run_dir: Path):
    if cfg.wandb.mode == "disabled":
        return None
    import wandb
    return wandb.init(project=cfg.wandb.project, name=cfg.wandb.name or run_dir.name, mode=cfg.wandb.mode,
                      dir=str(run_dir), config=cfg.to_dict())
