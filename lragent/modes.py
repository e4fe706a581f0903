"""The cache modes: one table, the only place they are defined (bundles list the ones they support; serving builds
its cache layout from a row).

With L layers, d_kv = H_kv * D, r the rank, m the cached projections carrying LoRA (k_proj, v_proj), N roles:

    mode        K/V blocks                                  low-rank L = s X A           another role's prefill
    nonshared   per role, with the role's adapter            -                            computed again (exact)
    fullshared  shared, with the writer's adapter             -                            reused (lossy)
    baseshared  shared base K/V                               per role (its own A)         computed again (for X A)
    lrshared    shared base K/V                               shared (needs shared A)      reused
    lrbase      shared base K/V, written by the base model    shared, from base hidden     reused (drift-controlled)

A new mode is one row here plus what is truly new (a writer, a component).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheMode:
    name: str
    lowrank: bool              # the cache holds base K/V + L = s X A; each reader applies its own B at attention time
    kv_per_role: bool          # K/V blocks are keyed by role (and its adapter hash), not shared across roles
    lowrank_per_role: bool     # L blocks are keyed by role (a separate component: per-role A)
    needs_shared_a: bool       # every cached target must share A across roles
    reuses_other_roles: bool   # context another role prefilled is taken from the cache without recompute
    writer: str = "role"       # who computes a context token's cache entries: "role" (the role that prefills it) or
                               # "base" (an adapter-free pass of the base model; each reader still applies its B)
    summary: str = ""

    @property
    def components(self) -> tuple[str, ...]:
        """The block pools of this mode: "kv" (K/V, with L in the same blocks when L is shared) and, when L is
        per role, a separate "lr" pool."""
        return ("kv", "lr") if self.lowrank and self.lowrank_per_role else ("kv",)


MODE_TABLE: tuple[CacheMode, ...] = (
    CacheMode("nonshared", lowrank=False, kv_per_role=True, lowrank_per_role=False, needs_shared_a=False,
              reuses_other_roles=False, summary="one K/V cache per role (what vLLM/SGLang do): exact, N x memory"),
    CacheMode("fullshared", lowrank=False, kv_per_role=False, lowrank_per_role=False, needs_shared_a=False,
              reuses_other_roles=True, summary="one K/V cache, whatever the writer's adapter produced: lossy"),
    CacheMode("baseshared", lowrank=True, kv_per_role=False, lowrank_per_role=True, needs_shared_a=False,
              reuses_other_roles=False, summary="shared base K/V + per-role low-rank cache: recomputes context"),
    CacheMode("lrshared", lowrank=True, kv_per_role=False, lowrank_per_role=False, needs_shared_a=True,
              reuses_other_roles=True, summary="shared base K/V + shared low-rank cache (the LRAgent scheme)"),
    CacheMode("lrbase", lowrank=True, kv_per_role=False, lowrank_per_role=False, needs_shared_a=True,
              reuses_other_roles=True, writer="base",
              summary="lrshared whose cache an adapter-free pass of the base model writes: no cross-role drift"),
)
MODES: tuple[str, ...] = tuple(m.name for m in MODE_TABLE)
BY_NAME = {m.name: m for m in MODE_TABLE}


def get_mode(name: str) -> CacheMode:
    """The table row of mode ``name`` (KeyError for an unknown name)."""
    return BY_NAME[name]


def modes_for(lrshared_ok: bool) -> list[str]:
    """The modes a bundle supports: those needing shared A only when every cached target shares it."""
    return [m.name for m in MODE_TABLE if lrshared_ok or not m.needs_shared_a]
