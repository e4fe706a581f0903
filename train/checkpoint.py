"""Checkpoints hold adapter tensors only, as safetensors (never pickle), written atomically.

``checkpoints/step-000006/``:
    adapter.safetensors    ``train.lora.lora_state`` names
    optimizer.safetensors  AdamW moments ``state.<param index>.<key>`` + RNG state
    state.json             step, optimizer param_groups (hyper-parameters), scheduler state
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lragent.bundle import fsutil

STEP_RE = re.compile(r"^step-(\d{6})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; one line."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """``RUN/checkpoints/step-NNNNNN``."""
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[int]:
    """The steps of the complete checkpoints of a run, ascending."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and
                  (p / "state.json").is_file())


def save_checkpoint(run_dir: str | Path, step: int, adapter: dict[str, torch.Tensor], optimizer, scheduler) -> Path:
    """Write checkpoint ``step`` atomically (temp dir, then rename; umask-following modes) after removing stale temp
    dirs of killed writers. On any failure (a full disk included) nothing is left behind: CheckpointError."""
    final = checkpoint_dir(run_dir, step)
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fsutil.clean_stale(final.parent, "", name_re=r"step-\d{6}")
        tmp = fsutil.new_temp_dir(final)
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
        sd = optimizer.state_dict()
        tensors = {"rng.torch": torch.get_rng_state()}
        scalars = {}
        for idx, st in sd["state"].items():
            for key, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"state.{idx}.{key}"] = val.detach().cpu().contiguous()
                else:
                    scalars[f"{idx}.{key}"] = val
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": step, "param_groups": sd["param_groups"], "state_scalars": scalars,
                 "scheduler": scheduler.state_dict()}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=float))
        fsutil.seal(tmp)
        if final.exists() and fsutil.exchange(tmp, final):
            pass                                   # tmp now holds the replaced checkpoint; removed below
        else:
            if final.exists():
                shutil.rmtree(final)
            fsutil.rename_noreplace(tmp, final)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {final}: {fsutil.describe_os_error(e)}; nothing was "
                              f"written (the run keeps its earlier checkpoints: free space, then --resume)") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, optimizer=None, scheduler=None) -> tuple[int, dict[str, torch.Tensor]]:
    """Return (step, adapter tensors); restore optimizer, scheduler and RNG state when given. CheckpointError (one
    line) when the checkpoint is unreadable or does not fit the optimizer."""
    try:
        return _load_checkpoint(Path(path), optimizer, scheduler)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or does not fit this run "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


def _load_checkpoint(path: Path, optimizer, scheduler) -> tuple[int, dict[str, torch.Tensor]]:
    state = json.loads((path / "state.json").read_text())
    adapter = load_file(str(path / "adapter.safetensors"))
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        per_param: dict[int, dict] = {}
        for name, val in tensors.items():
            if name.startswith("state."):
                _, idx, key = name.split(".", 2)
                per_param.setdefault(int(idx), {})[key] = val
        for name, val in state["state_scalars"].items():
            idx, key = name.split(".", 1)
            per_param.setdefault(int(idx), {})[key] = val
        optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state["step"], adapter
