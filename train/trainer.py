"""The training loop: shared-A role adapters under ``accelerate`` (mixed precision, accumulation, DDP/FSDP).

Data order is a pure function of (seed, step), so ``--resume`` continues exactly where a checkpoint left off.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from lragent.bundle import BundleError, fsutil

from . import rundir
from .checkpoint import CheckpointError, checkpoint_dir, list_checkpoints, load_checkpoint, save_checkpoint
from .config import Config
from .data import IGNORE, DataError, build_dataset, collate, infer_roles, read_records
from .evaluate import evaluate, format_table
from .lora import LoraSpec, inject_lora, load_lora_state, lora_state, roles, set_shared_a_frozen
from .preflight import PreflightError
from .rundir import RunDirError
from .setup import (Setup, TrainError, agree, apply_hparams, data_paths, resolve_base, setup_run,  # noqa: F401
                    write_embedded_data)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainResult:
    """What :func:`train` returns."""
    run_dir: Path
    model: torch.nn.Module        # the (unwrapped) model with trained adapters
    roles: list[str]
    eval: dict | None             # {"base": {role: metrics}, "adapted": {...}} on the main process
    num_processes: int = 1        # processes that trained together (DDP/FSDP world size)


def lr_lambda(cfg: Config):
    """The LambdaLR multiplier per step: warmup, then constant / linear / cosine decay over train.max_steps."""
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


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, embedded=None) -> TrainResult:
    """Train role adapters per ``cfg`` into ``cfg.output_dir``. ``embedded``: the provider of the embedded default
    (``lragent.cli.embedded.EMBEDDED``), needed only when the config says "embedded". Everything (config, base model,
    tokenizer, LoRA targets, data, the run directory, a resumed run's recorded config) is validated before anything
    is written; the run directory is locked against a second writer while training runs."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    t = cfg.train
    # cpu=True without CUDA: accelerate only forms a multi-process (gloo) group on CPU when told it runs on CPU.
    acc = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
                      cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    rundir.watch_parent()
    run_dir = Path(cfg.output_dir).absolute()
    setup, err = None, None
    if acc.is_main_process:
        try:
            setup = setup_run(cfg, run_dir, resume, overwrite, embedded)
        except (TrainError, DataError, PreflightError, RunDirError, BundleError, CheckpointError) as e:
            err = str(e)
        except OSError as e:
            err = f"cannot set up the run in {run_dir}: {fsutil.describe_os_error(e)}"
    err = agree(acc, err)
    if err:
        raise TrainError(err)
    try:
        return _train(acc, cfg, run_dir, resume, setup, embedded)
    finally:
        if setup is not None and setup.lock is not None:
            setup.lock.release()


def _train(acc, cfg: Config, run_dir: Path, resume: bool, setup: Setup | None, embedded) -> TrainResult:
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = cfg.train
    set_seed(t.seed)
    base = setup.base if setup is not None else resolve_base(cfg.model.base, embedded)
    done = list_checkpoints(run_dir)
    train_path, eval_path = data_paths(cfg, run_dir)

    tok = AutoTokenizer.from_pretrained(str(base))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if setup is not None:
        role_names, train_ds, eval_ds = setup.data
    else:                                      # other processes: the main process validated the same files
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

    model, opt = acc.prepare(model, opt)
    inner = acc.unwrap_model(model)
    step = 0
    if resume:
        try:
            step, adapter = load_checkpoint(checkpoint_dir(run_dir, done[-1]), opt, sched)
            load_lora_state(inner, role_names, adapter)
        except (CheckpointError, ValueError) as e:
            raise TrainError(f"--resume: {e}") from None
        apply_hparams(opt, sched, cfg, lr_lambda)
        if acc.is_main_process:          # the values now in use (harmless keys may have changed), nothing else
            fsutil.write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
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
    try:
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
                    try:
                        save_checkpoint(run_dir, step, lora_state(inner, role_names), opt, sched)
                    except CheckpointError as e:
                        raise TrainError(str(e)) from None
        bar.close()
        acc.wait_for_everyone()
        result = TrainResult(run_dir, inner, role_names, None, acc.num_processes)
        if eval_ds is not None and acc.is_main_process:
            kw = dict(pad_id=pad_id, batch_size=t.eval_batch_size, max_per_role=t.eval_max_examples, device=acc.device)
            base_res = evaluate(inner, eval_ds, role_names, adapters=False, **kw)
            adapted = evaluate(inner, eval_ds, role_names, adapters=True, **kw)
            result.eval = {"base": base_res, "adapted": adapted}
            fsutil.write_text_atomic(run_dir / "eval.json", json.dumps(result.eval, indent=2) + "\n")
            print("\nheld-out evaluation (exact match = greedy completion equals the reference):")
            print(format_table(base_res, adapted), flush=True)
            if wb:
                wb.log({f"eval/{k}/{r}": v[k] for r, v in adapted.items() for k in ("loss", "accuracy")}, step=step)
    finally:
        bar.close()                    # ends the progress line, so that an error starts on a line of its own
        if metrics:
            metrics.close()
        if wb:
            wb.finish()
    acc.wait_for_everyone()
    return result


def _wandb(cfg: Config, run_dir: Path):
    if cfg.wandb.mode == "disabled":
        return None
    import wandb
    return wandb.init(project=cfg.wandb.project, name=cfg.wandb.name or run_dir.name, mode=cfg.wandb.mode,
                      dir=str(run_dir), config=cfg.to_dict())
