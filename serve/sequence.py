"""A request in flight: its tokens, role, sampling parameters, cache blocks and timings; and what it returns."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams


@dataclass
class CompState:
    """A sequence's blocks in one cache component (see kvmanager)."""
    blocks: list[int] = field(default_factory=list)     # its block table
    nodes: list = field(default_factory=list)           # tree nodes it holds: nodes[i].block == blocks[i]
    write_from: int = 0                                 # positions below are already cached: never written
    stopped: bool = False                               # the tree already had a twin block: publish no further


@dataclass
class RequestStats:
    prompt_tokens: int
    reused_tokens: int             # prompt tokens found in the cache at admission (not computed)
    prefilled_tokens: int          # prompt tokens computed
    generated_tokens: int
    ttft_s: float                  # request added -> first token sampled
    decode_tok_s: float            # generated tokens after the first / time after the first (0 if one token)
    latency_s: float
    preemptions: int = 0           # times the request was preempted (its blocks freed, recomputed later)
    reused_from_other_roles: int = 0   # of reused_tokens, those another role computed

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Completion:
    request_id: int
    role: str
    text: str
    token_ids: list[int]
    finish_reason: str             # "eos", "stop", "length", "abort"
    stats: RequestStats
    logits: torch.Tensor | None = None    # [generated, vocab] fp32, when asked for

    def as_dict(self) -> dict:
        return {"request_id": self.request_id, "role": self.role, "text": self.text, "token_ids": self.token_ids,
                "finish_reason": self.finish_reason, "stats": self.stats.as_dict()}


@dataclass
class RequestOutput:
    """What one engine step produced for one request: the new tokens and text (deltas), and the completion once
    it has finished. Concatenating a request's ``new_text`` gives its final text."""
    request_id: int
    role: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    completion: Completion | None = None
    new_logprobs: list = field(default_factory=list)     # per new token: (logprob, [(token id, logprob), ...])


class Sequence:
    def __init__(self, seq_id: int, prompt_ids: list[int], role: str, role_idx: int, params: SamplingParams,
                 generator: torch.Generator | None):
        self.id = seq_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.role, self.role_idx, self.params = role, role_idx, params
        self.adapter_hash = ""         # digest of the role's adapter at admission (per-role cache namespaces)
        self.num_computed = 0          # tokens whose K/V (and L) are in the cache
        self.reused: int | None = None # prompt tokens reused at the first admission
        self.reused_cross = 0          # of those, tokens another role computed
        self.comps: list[CompState] = []
        self.published_prefill = False
        self.preemptions = 0
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.finish_reason: str | None = None
        self.text = ""                 # the final text (set when it finishes)
        self.emitted_text = ""         # text handed out as deltas so far
        self.emitted_ids = 0           # output tokens handed out so far
        self.logits: list[torch.Tensor] = []
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []   # per token: (its logprob, top-N)
        self.generator = generator
        self.detok = None              # the engine's incremental detokenizer state

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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def stats(self) -> RequestStats:
        n = len(self.output_ids)
        first = self.first_token_time or self.arrival
        end = self.finish_time or first
        decode = (n - 1) / (end - first) if n > 1 and end > first else 0.0
        reused = self.reused or 0
        return RequestStats(prompt_tokens=len(self.prompt_ids), reused_tokens=reused,
                            prefilled_tokens=len(self.prompt_ids) - reused, generated_tokens=n,
                            ttft_s=first - self.arrival, decode_tok_s=decode, latency_s=end - self.arrival,
                            preemptions=self.preemptions, reused_from_other_roles=self.reused_cross)

    def completion(self) -> Completion:
        logits = torch.stack(self.logits) if self.logits else None
        return Completion(self.id, self.role, self.text, list(self.output_ids), self.finish_reason or "length",
                          self.stats(), logits)
