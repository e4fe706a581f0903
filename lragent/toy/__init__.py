"""Embedded default: a tiny Llama-architecture base, its tokenizer and a synthetic multi-role agent task.

- ``default_base_path()``: the shipped base model directory (``assets/tiny-llama``: config.json, model.safetensors,
  tokenizer files), made by ``python -m lragent.toy.pretrain_base``.
- ``write_dataset(out_dir, ...)``: train/eval JSONL records of the toy task (``lragent.toy.task``).
"""
from __future__ import annotations

from pathlib import Path

BASE_NAME = "tiny-llama"


def default_base_path() -> Path:
    """The directory of the shipped tiny base model (loads with ``AutoModelForCausalLM.from_pretrained``)."""
    return Path(__file__).resolve().parent / "assets" / BASE_NAME


def write_dataset(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write ``train.jsonl`` / ``eval.jsonl`` (``n_train`` / ``n_eval`` records per role) to ``out_dir``."""
    from lragent.toy.task import write_dataset as _write
    return _write(out_dir, n_train=n_train, n_eval=n_eval, seed=seed)


__all__ = ["default_base_path", "write_dataset", "BASE_NAME"]
