"""Sampling parameters and next-token selection: greedy, or temperature + top-p with a per-request seed."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ServeError


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    seed: int | None = None           # per request, so results do not depend on batching
    stop: tuple[str, ...] = ()        # stop strings (the text is cut before them)
    ignore_eos: bool = False
    return_logits: bool = False
    logprobs: int | None = None       # log-probabilities of each sampled token and of the top-N alternatives
    def __post_init__(self):
        """Check every field (types included: JSON gives true for 1 and 3.0 for 3); one ServeError line."""
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        if not all(isinstance(s, str) for s in self.stop):
            raise ServeError("stop must be a string or a list of strings")

        def number(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ServeError(f"{name} must be a finite number, got {v!r}")
            return float(v)

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or \
                self.max_new_tokens < 1:
            raise ServeError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        self.temperature = number("temperature", self.temperature)
        self.top_p = number("top_p", self.top_p)
        if self.temperature < 0:
            raise ServeError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ServeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2 ** 63):
            raise ServeError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= 20):
            raise ServeError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        for name in ("ignore_eos", "return_logits"):
            if not isinstance(getattr(self, name), bool):
                raise ServeError(f"{name} must be true or false, got {getattr(self, name)!r}")


GREEDY_BELOW = 1e-5                   # temperatures this small sample the argmax (as vLLM does): no overflow


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_BELOW


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from fp32 logits [vocab] (float64 softmax of logits / temperature; non-finite logits are never
    drawn)."""
    if is_greedy(params):
        return int(torch.argmax(logits))
    z = logits.double().cpu() / params.temperature
    z = torch.where(torch.isfinite(z), z, torch.tensor(float("-inf"), dtype=z.dtype))
    if not torch.isfinite(z).any():
        return int(torch.argmax(torch.nan_to_num(logits.float(), nan=float("-inf"))))
    probs = torch.softmax(z, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = cum - sorted_p > params.top_p          # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
