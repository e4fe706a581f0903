"""Checks that run before any training work or any write: the base model (config, weights, tokenizer, LoRA targets)
and, for ``--resume``, the new config against the one the run recorded.

A resumed run must be the same run: every key that shapes the adapters, the data or its order must be unchanged
(one line names the keys that differ). The keys in :data:`RESUME_APPLIED` may change; they are applied from the
resumed step on and recorded in config.yaml (never recorded one value and used another).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from lragent.bundle import BundleError, base_info, check_base, target_of

from .config import Config
from .lora import decoder_linears, lora_target_names

RESUME_APPLIED = frozenset({
    "train.lr", "train.loraplus_ratio", "train.weight_decay", "train.max_grad_norm", "train.warmup_steps",
    "train.schedule", "train.max_steps", "train.log_every", "train.save_every", "train.eval_max_examples",
    "train.eval_batch_size", "model.gradient_checkpointing", "wandb.mode", "wandb.project", "wandb.name",
})
NOT_COMPARED = frozenset({"output_dir", "model.base"})     # compared as the resolved path / base fingerprint


def meta_model(base_dir, label: str, error: type[Exception]):
    """The base model's module tree built from its config.json on the 'meta' device (no weights read), or one
    ``error`` line starting with ``label`` when transformers cannot build it."""
    import torch
    import transformers
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(base_dir))
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken config
        raise error(f"{label}: config.json cannot be used ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:160]})") from None


class PreflightError(RuntimeError):
    """A problem found before training started; one line."""


def check_base_model(base: Path, targets: list[str], layers: list[int] | None = None) -> tuple[dict, list[str], object]:
    """(base info with weights fingerprint, LoRA module paths, tokenizer) for ``base``; the module paths are the
    ``targets`` in the decoder layers ``layers`` selects (``lora.layers``; None: all). PreflightError when its
    config, weights or tokenizer cannot be used, ``targets`` names no Linear inside its decoder layers, or
    ``layers`` holds an index out of range (or two naming the same layer)."""
    import transformers

    try:
        info = base_info(base)
    except BundleError as e:
        raise PreflightError(str(e)) from None
    model = meta_model(base, f"model.base {base}", PreflightError)
    linears = decoder_linears(model)
    found = sorted({target_of(n) for n in linears})
    missing = [t for t in targets if t not in found]
    if missing:
        raise PreflightError(f"lora.targets {missing} name no Linear module inside the decoder layers of {base} "
                             f"(available: {', '.join(found)})")
    try:
        modules = lora_target_names(linears, targets, layers)
    except ValueError as e:
        raise PreflightError(f"{e} ({base})") from None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(base))
    except Exception as e:  # noqa: BLE001 - a missing tokenizer surfaces as OSError, ValueError, TypeError, ...
        raise PreflightError(f"model.base {base} has no usable tokenizer ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:120]}): save the tokenizer into the model directory") \
            from None
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token_id", None) is None:
        raise PreflightError(f"the tokenizer of {base} has neither a pad nor an eos token: set one in its "
                             f"tokenizer_config.json")
    return info, modules, tok


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_differences(cfg: Config, run_dir: Path) -> list[str]:
    """Keys whose value in ``cfg`` differs from the config the run recorded (config.yaml), outside
    :data:`RESUME_APPLIED`. ``train.max_steps`` counts as a difference for the sequential scheme (it sets the phase
    boundary). PreflightError when the recorded config is unreadable."""
    try:
        recorded = yaml.safe_load((run_dir / "config.yaml").read_bytes().decode("utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise PreflightError(f"--resume: {run_dir}/config.yaml is unreadable ({type(e).__name__}), so the run's "
                             f"config cannot be compared: start a new run") from None
    if not isinstance(recorded, dict):
        raise PreflightError(f"--resume: {run_dir}/config.yaml does not hold a config mapping: start a new run")
    old, new = _flatten(recorded), _flatten(cfg.to_dict())
    default = _flatten(dataclasses.asdict(Config()))
    allowed = RESUME_APPLIED - ({"train.max_steps"} if new.get("train.scheme") == "sequential" else set())
    return [k for k, v in new.items()
            if k not in allowed and k not in NOT_COMPARED and old.get(k, default.get(k)) != v]


def check_resume(cfg: Config, run_dir: Path, meta: dict, info: dict, last_step: int) -> None:
    """Refuse (PreflightError, one line) a resume that is not the recorded run continued: a key that matters
    differs, another base model, or nothing left to train."""
    diff = resume_differences(cfg, run_dir)
    if diff:
        may = ", ".join(sorted(k.split(".")[-1] for k in RESUME_APPLIED if k.startswith("train.")))
        raise PreflightError(f"--resume: the config differs from the run's recorded config.yaml in {', '.join(diff)} "
                             f"(only train.{{{may}}}, model.gradient_checkpointing and wandb.* may change): undo "
                             f"the change, or start a new run with output_dir=...")
    try:
        check_base(meta.get("base") or {}, info["path"], against="the run")
    except BundleError as e:
        raise PreflightError(f"--resume: {e}") from None
    if cfg.train.max_steps <= last_step:
        raise PreflightError(f"--resume: the last checkpoint is step {last_step} and train.max_steps is "
                             f"{cfg.train.max_steps}: pass train.max_steps > {last_step} to continue training")
