"""Model families: a registry keyed by Hugging Face ``model_type``. One file per family holds its config parsing,
its weight names and its decoder block; the runner (batching, cache I/O) calls only ``model.forward(ids, ctx)``.

    llama.py   llama, mistral, qwen2, qwen3       gemma.py   gemma

Adding a family: a module with a :class:`Family` (``parse`` a config.json dict, ``build`` the model from weights)
registered here, and a test against HF transformers + PEFT (tests/test_serve_hf.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import ServeError
from .config import ModelConfig


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    parse: Callable[[dict, str], ModelConfig]          # (config.json dict, where) -> ModelConfig
    build: Callable                                     # (WeightReader, ModelConfig) -> model with .forward


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    for mt in family.model_types:
        FAMILIES[mt] = family
    return family


def read_config_json(model_dir: str | Path) -> dict:
    """The parsed config.json of a local model directory (one-line errors)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ServeError(f"base model {model_dir} has no config.json: pass a local Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServeError(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ServeError(f"{path}: the top level must be an object")
    return raw


def family_of(model_type) -> Family:
    if model_type not in FAMILIES:
        raise ServeError(f"model_type {model_type!r} is not supported; the engine serves {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def load_config(model_dir: str | Path) -> ModelConfig:
    """The ModelConfig of a local HF model directory, parsed by the family of its ``model_type``."""
    raw = read_config_json(model_dir)
    where = str(Path(model_dir) / "config.json")
    try:
        fam = family_of(raw.get("model_type"))
    except ServeError as e:
        raise ServeError(f"{where}: {e}") from None
    return fam.parse(raw, where)


def build_model(model_dir: str | Path, cfg: ModelConfig, *, dtype, device):
    """The decoder of ``cfg``'s family with the weights of ``model_dir`` on ``device`` in ``dtype``."""
    from .weights import WeightReader
    reader = WeightReader(model_dir, dtype=dtype, device=device, model_type=cfg.model_type)
    return family_of(cfg.model_type).build(reader, cfg)


from . import gemma, llama  # noqa: E402,F401  (register the families)

__all__ = ["FAMILIES", "Family", "ModelConfig", "build_model", "family_of", "load_config", "register"]
