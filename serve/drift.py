"""Cross-role drift of the shared cache, per layer: the mechanism the shared modes rely on, measured on a bundle.

Every role prefills the same context with its own adapters. Per layer and pair of roles: the cosine similarity of
the base K and V they would cache (X_role W), and of the low-rank cache L = s X_role A; per role: the norm of its
adapter term L B_role relative to the base term, for K and V. Layer 0 is identical across roles (every role sees
the same embeddings); drift enters through the adapters of earlier layers acting on the context tokens.
"""
from __future__ import annotations

import itertools

import torch

from .sampling import SamplingParams


def capture(engine, ids: list[int], role: str) -> list[dict]:
    """Per layer, for the whole context prefilled by ``role`` alone: x (the attention input), base k, base v [T, ...]
    (``engine`` must be in a low-rank mode: the K/V it sees are the base part)."""
    layers: list[dict] = [dict(x=[], k=[], v=[]) for _ in range(engine.cfg.num_layers)]

    def observe(li, x, k, v, batch):
        rows = batch.kv_rows if batch.kv_rows.numel() != x.shape[0] else slice(None)
        for name, t in (("x", x), ("k", k), ("v", v)):
            layers[li][name].append(t[rows].float().reshape(t[rows].shape[0], -1).cpu())

    engine.clear_cache()
    engine.runner.observer = observe
    try:
        engine.generate(ids, role, SamplingParams(max_new_tokens=1, ignore_eos=True))
    finally:
        engine.runner.observer = None
        engine.clear_cache()
    return [{n: torch.cat(v)[:len(ids)] for n, v in d.items()} for d in layers]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Mean over tokens of the cosine similarity of two [T, n] tensors, over the tokens where both are non-zero
    (None when there are none, e.g. a block whose weights are all zero)."""
    a, b = a.double(), b.double()
    live = (a.norm(dim=-1) > 1e-12) & (b.norm(dim=-1) > 1e-12)
    if not live.any():
        return None
    return float(torch.nn.functional.cosine_similarity(a[live], b[live], dim=-1).mean())


def measure(engine, ids: list[int]) -> list[dict]:
    """Per layer: cos_k, cos_v, cos_lr (mean over role pairs; min too) and rel_k / rel_v per role."""
    ad, roles = engine.adapters, list(engine.roles)
    caps = {r: capture(engine, ids, r) for r in roles}
    out = []
    for li in range(engine.cfg.num_layers):
        mods = ad.layers[li]
        row = {"layer": li}
        lr = {}
        for r in roles:
            x = caps[r][li]["x"].to(ad.lr_a_t[li].dtype) if ad.lr_a_t[li] is not None else None
            lr[r] = (x @ ad.lr_a_t[li].cpu()).float() if x is not None else None
        pairs = list(itertools.combinations(roles, 2))
        for name, get in (("k", lambda r: caps[r][li]["k"]), ("v", lambda r: caps[r][li]["v"]),
                          ("lr", lambda r: lr[r])):
            vals = [_cos(get(a), get(b)) for a, b in pairs if get(a) is not None]
            vals = [v for v in vals if v is not None]
            if vals:
                row[f"cos_{name}"], row[f"cos_{name}_min"] = sum(vals) / len(vals), min(vals)
        r_rank = ad.rank
        for t in ("k_proj", "v_proj"):
            if t not in mods or lr[roles[0]] is None:
                continue
            off = engine.cache.lr_targets.index(t) * r_rank
            for r in roles:
                slot = ad.index[r]
                term = lr[r][:, off:off + r_rank] @ mods[t].b[slot].float().T.cpu()      # [T, d_kv]
                base = caps[r][li][t[0]]
                if base.norm() > 1e-12:
                    row[f"rel_{t[0]}_{r}"] = float(term.norm() / base.norm())
        out.append(row)
    return out
