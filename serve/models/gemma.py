"""The Gemma family (``gemma``, v1): the Llama block with three differences, each one method of LlamaModel.

- embeddings are scaled by sqrt(hidden_size) (in the model dtype, as HF does);
- RMSNorm scales by (1 + w), computed in fp32 before the cast back;
- the gated MLP uses GELU (tanh approximation); embeddings are tied to the LM head by default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ServeError
from . import Family, register
from .config import ModelConfig
from .llama import LlamaModel


def parse(raw: dict, where: str) -> ModelConfig:
    """ModelConfig of a gemma config.json."""
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu"):          # HF maps legacy "gelu" to the tanh approximation
        raise ServeError(f"{where}: hidden activation {act!r} is not supported (gelu_pytorch_tanh)")
    raw = {**raw, "tie_word_embeddings": raw.get("tie_word_embeddings", True)}
    return ModelConfig.common(raw, where, hidden_act="gelu_pytorch_tanh")


class GemmaModel(LlamaModel):
    def norm_weight(self, w: torch.Tensor) -> torch.Tensor:
        return 1.0 + w.float()                              # kept in fp32: (x_normed * (1 + w)).to(dtype)

    def norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return (xf * w).to(x.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed_tokens[ids]
        return e * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=e.dtype)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


FAMILY = register(Family("gemma", ("gemma",), parse, GemmaModel))
