"""Reading a base model's safetensors by tensor name (no transformers modeling code, never pickle)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ServeError


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a HF model directory (sharded index, single file, or any *.safetensors)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise ServeError(f"{index} is malformed ({e})") from None
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ServeError(f"base model {model_dir} has no *.safetensors weights (pickle checkpoints are not loaded)")
    return files


class WeightReader:
    """Tensor name -> tensor on the serving device and dtype, shape-checked against config.json."""

    def __init__(self, model_dir: str | Path, *, dtype: torch.dtype, device, model_type: str):
        self.dir, self.dtype, self.device, self.model_type = Path(model_dir), dtype, device, model_type
        self.where: dict[str, Path] = {}
        for f in weight_files(self.dir):
            if not f.is_file():
                raise ServeError(f"base model {self.dir} is missing weight file {f.name}")
            try:
                with safe_open(str(f), framework="pt") as sf:
                    self.where.update({k: f for k in sf.keys()})
            except (SafetensorError, OSError, ValueError) as e:
                raise ServeError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0][:100]})") from None

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple | None = None, *, optional: bool = False) -> torch.Tensor | None:
        """The tensor ``name`` (None if absent and ``optional``); a shape other than ``shape`` is an error."""
        if name not in self.where:
            if optional:
                return None
            raise ServeError(f"base model {self.dir} has no tensor {name!r}: not a {self.model_type} checkpoint?")
        try:
            with safe_open(str(self.where[name]), framework="pt") as sf:
                t = sf.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise ServeError(f"{self.where[name]}: cannot read {name} ({str(e).splitlines()[0][:100]}): "
                             f"the file is truncated or corrupt") from None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ServeError(f"{name} has shape {list(t.shape)}, expected {list(shape)} from config.json")
        if t.is_floating_point() and not torch.isfinite(t).all():     # in its own dtype: no fp32 copy at load
            raise ServeError(f"base model tensor {name} holds NaN or Inf: the checkpoint is corrupt")
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    def cat(self, names: list[str], shapes: list[tuple], *, optional: bool = False) -> torch.Tensor | None:
        """Several tensors stacked row-wise (fused projections). With ``optional``, absent ones are zeros (None if
        all are absent)."""
        parts = [self.get(n, s, optional=optional) for n, s in zip(names, shapes)]
        if all(p is None for p in parts):
            return None
        return torch.cat([p if p is not None else torch.zeros(s, dtype=self.dtype, device=self.device)
                          for p, s in zip(parts, shapes)])
