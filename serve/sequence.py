"""A request in flight: its tokens, role, sampling parameters, cache blocks and timings; and what it returns."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams

_ids = itertools.count()


@dataclass
class CompState:
    """A sequence's blocks in one cache component (see kvmanager)."""
    blocks: list[int] = field(default_factory=list)     # its block table
    nodes: list = field(default_factory=list)           # tree nodes it holds: nodes[i].block == blocks[i]
    write_from: int = 0                                 # positions below are already cached: never written
    reserved: int = 0                                   # blocks reserved for it and not yet allocated
    stopped: bool = False                               # the tree already had a twin block: publish no further


@dataclass
class RequestStats:
    prompt_tokens: int
    reused_tokens: int             # prompt tokens found in the cache (not computed)
    prefilled_tokens: int          # prompt tokens computed
    generated_tokens: int
    ttft_s: float                  # request added -> first token sampled
    decode_tok_s: float            # generated tokens after the first / time after the first (0 if one token)
    latency_s: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Completion:
    request_id: int
    role: str
    text: str
    token_ids: list[int]
    finish_reason: str             # "eos", "stop", "length"
    stats: RequestStats
    logits: torch.Tensor | None = None    # [generated, vocab] fp32, when asked for

    def as_dict(self) -> dict:
        return {"request_id": self.request_id, "role": self.role, "text": self.text, "token_ids": self.token_ids,
                "finish_reason": self.finish_reason, "stats": self.stats.as_dict()}


class Sequence:
    def __init__(self, prompt_ids: list[int], role: str, role_idx: int, params: SamplingParams):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.role, self.role_idx, self.params = role, role_idx, params
        self.num_computed = 0          # tokens whose K/V (and L) are in the cache
        self.reused = 0
        self.comps: list[CompState] = []
        self.published_prefill = False
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.finish_reason: str | None = None
        self.text = ""
        self.logits: list[torch.Tensor] = []
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed() % (2 ** 63))

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole list."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_tokens(self) -> int:
        """The most tokens it can ever hold in the cache (the last sampled token is never computed)."""
        return len(self.prompt_ids) + self.params.max_new_tokens - 1

    def stats(self) -> RequestStats:
        n = len(self.output_ids)
        first = self.first_token_time or self.arrival
        end = self.finish_time or first
        decode = (n - 1) / (end - first) if n > 1 and end > first else 0.0
        return RequestStats(prompt_tokens=len(self.prompt_ids), reused_tokens=self.reused,
                            prefilled_tokens=len(self.prompt_ids) - self.reused, generated_tokens=n,
                            ttft_s=first - self.arrival, decode_tok_s=decode, latency_s=end - self.arrival)

    def completion(self) -> Completion:
        logits = torch.stack(self.logits) if self.logits else None
        return Completion(self.id, self.role, self.text, list(self.output_ids), self.finish_reason or "length",
                          self.stats(), logits)
