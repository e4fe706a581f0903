"""Fidelity of the cache modes: replay held-out episodes through one engine per mode, score every role turn.

Per mode and role: exact match with a 95% Wilson interval, agreement with ``nonshared`` (the same greedy text), and
the logit KL divergence to ``nonshared`` (KL(p_nonshared || p_mode) per generated position while the two outputs
agree, the first difference included; median and max over turns). Episodes are interleaved across modes, and each
replay starts from an empty cache (an episode is one conversation).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from .episodes import Episode, scored_turns, turn_kind
from .sampling import SamplingParams


@dataclass
class TurnScore:
    episode: int
    turn: int
    role: str
    kind: str
    exact: bool
    text: str
    reference: str
    agree: bool | None = None      # same text as nonshared
    kl: float | None = None        # to nonshared


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def replay(engine, ep: Episode, roles: list[str]) -> list[tuple[int, str, object]]:
    """Generate every scored turn of ``ep`` on one growing transcript (teacher forcing with the turns' content);
    (turn index, reference, completion with logits) per scored turn."""
    engine.clear_cache()
    scored = set(scored_turns(ep, roles))
    messages, out = [], []
    for i, t in enumerate(ep.turns):
        if i in scored:
            ref = t.get("reference", t["content"])
            n = len(engine.tokenizer(" " + ref, add_special_tokens=False).input_ids) + 2
            c = engine.generate(engine.render(messages, t["role"]), t["role"],
                                SamplingParams(max_new_tokens=n, return_logits=True))
            out.append((i, ref, c))
        messages.append({"role": t["role"], "content": t["content"]})
    return out


def kl_to(ref, other) -> float:
    """Mean KL(p_ref || p_other) over the generated positions up to and including the first differing token."""
    n = min(len(ref.token_ids), len(other.token_ids))
    stop = next((j for j in range(n) if ref.token_ids[j] != other.token_ids[j]), n - 1)
    p = torch.log_softmax(ref.logits[:stop + 1].double(), -1)
    q = torch.log_softmax(other.logits[:stop + 1].double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean().clamp(min=0))


def evaluate(engines: dict, episodes: list[Episode], roles: list[str], on_episode=None) -> dict[str, list[TurnScore]]:
    """Scores per mode (``engines``: mode -> Engine of one bundle), episodes interleaved across modes."""
    scores: dict[str, list[TurnScore]] = {m: [] for m in engines}
    for e, ep in enumerate(episodes):
        scored = scored_turns(ep, roles)
        runs = {m: replay(eng, ep, roles) for m, eng in engines.items()}
        ref = runs.get("nonshared")
        for m, run in runs.items():
            for k, (i, reference, c) in enumerate(run):
                s = TurnScore(e, i, ep.turns[i]["role"], turn_kind(ep, i, scored), c.text.strip() == reference.strip(),
                              c.text.strip(), reference.strip())
                if ref is not None:
                    s.agree = c.text.strip() == ref[k][2].text.strip()
                    s.kl = kl_to(ref[k][2], c)
                scores[m].append(s)
        if on_episode is not None:
            on_episode(e + 1)
    return scores


def _group(scores: list[TurnScore]) -> dict:
    k, n = sum(s.exact for s in scores), len(scores)
    lo, hi = wilson(k, n)
    out = {"n": n, "exact_match": k / n if n else 0.0, "ci95": [lo, hi]}
    agree = [s.agree for s in scores if s.agree is not None]
    kls = [s.kl for s in scores if s.kl is not None]
    if agree:
        out["agreement"] = sum(agree) / len(agree)
    if kls:
        out["kl_median"], out["kl_max"] = statistics.median(kls), max(kls)
    return out


def summarize(scores: dict[str, list[TurnScore]]) -> dict:
    """Per mode: the overall figures, ``roles.<role>`` and ``kinds.<kind>`` (see the module doc)."""
    out = {}
    for m, ss in scores.items():
        d = _group(ss)
        d["roles"] = {r: _group([s for s in ss if s.role == r]) for r in dict.fromkeys(s.role for s in ss)}
        d["kinds"] = {k: _group([s for s in ss if s.kind == k]) for k in dict.fromkeys(s.kind for s in ss)}
        out[m] = d
    return out
