"""Cache layout per mode, admission with prefix reuse, growth, and block tables and write slots for a step.

A *component* is one prefix-cached block pool and the tensors its blocks index, built from the mode's row in
``lragent.modes``:

    mode        component "kv" (namespace)                            component "lr" (namespace)
    nonshared   full K/V with the role's adapter  (.., role, hash)      -
    fullshared  full K/V of whichever role wrote  (.., family)          -
    baseshared  base K/V                          (.., family)          L_k/L_v per role (.., family, role, hash)
    lrshared    base K/V + L_k/L_v, same blocks   (.., A-family)        -
    lrbase      as lrshared, written by the base  (.., A-family)        -       (writer "base" in the namespace)

Every namespace starts with (component, mode, writer, base fingerprint), so blocks of one mode, writer or base are
never read by another. A request computes from c = min over components of the reused prefix; a component that
reuses more keeps its blocks and skips the writes below its own reuse (baseshared: a role recomputes context another
role wrote, to get its own X A_role, but keeps the shared base K/V).

Nothing is reserved at admission: blocks are allocated as a sequence grows (:meth:`grow`), and when a pool runs out
the scheduler preempts a sequence (:meth:`finish` frees what it held; it is recomputed later).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lragent.modes import CacheMode

from .cache import Match, PrefixCache
from .config import ServeError
from .sequence import CompState, Sequence


@dataclass
class Component:
    name: str
    pool: PrefixCache
    namespace: Callable[[Sequence], tuple]
    block_bytes: dict[str, int]        # bytes per block by kind ("base", "lowrank")


def build_components(mode: CacheMode, cache, num_blocks: int, block_size: int, *, base_fp: str,
                     family: str) -> list[Component]:
    """The block pools of ``mode`` over the cache tensors, with namespaces from the mode's row."""
    head = (mode.name, mode.writer, base_fp)
    shared = (*head, family)

    def per_role(s: Sequence) -> tuple:        # the adapter the request was admitted with (roles may be reloaded)
        return (*shared, s.role, s.adapter_hash)
    lr_in_kv = mode.lowrank and not mode.lowrank_per_role and cache.lr is not None
    kv_ns = (lambda s: ("kv", *per_role(s))) if mode.kv_per_role else (lambda s: ("kv", *shared))
    kv_bytes = {"base": cache.kv_block_bytes, **({"lowrank": cache.lr_block_bytes} if lr_in_kv else {})}
    comps = [Component("kv", PrefixCache(num_blocks, block_size, [cache.k, cache.v] + ([cache.lr] if lr_in_kv else [])),
                       kv_ns, kv_bytes)]
    if mode.lowrank and mode.lowrank_per_role and cache.lr is not None:
        comps.append(Component("lr", PrefixCache(cache.lr.shape[1], block_size, [cache.lr]),
                               lambda s: ("lr", *per_role(s)), {"lowrank": cache.lr_block_bytes}))
    return comps


class KVManager:
    def __init__(self, components: list[Component], block_size: int):
        self.components, self.block_size = components, block_size

    def blocks_for(self, n_tokens: int) -> int:
        return (n_tokens + self.block_size - 1) // self.block_size

    def check_fits(self, seq: Sequence) -> None:
        """A request larger than an empty pool can never run: refuse it now."""
        need = self.blocks_for(seq.max_tokens)
        for c in self.components:
            if need > c.pool.num_blocks:
                raise ServeError(
                    f"request needs {seq.max_tokens} tokens of cache ({need} blocks of {self.block_size}) but the "
                    f"{c.name} pool holds {c.pool.num_blocks} blocks: give the engine more cache (--cache-tokens) "
                    f"or shorten the prompt / max_new_tokens")

    def try_admit(self, seq: Sequence, headroom: int = 0) -> bool:
        """Match the sequence's tokens against the cache and take the reused blocks if the pool can also hold the
        rest of its tokens now (plus ``headroom`` blocks); False if the pool is busy (the request waits)."""
        tokens, bs = seq.tokens, self.block_size
        limit = len(tokens) - 1                      # the last token is always computed (its logits)
        matches = [c.pool.match(c.namespace(seq), tokens, limit) for c in self.components]
        need = self.blocks_for(len(tokens))
        for i, (c, m) in enumerate(zip(self.components, matches)):
            cost = need - len(m.nodes) + c.pool.cost(m.nodes) + headroom
            if cost > c.pool.available():
                return False
            if m.cow and cost + c.pool.cost([m.cow[0]]) > c.pool.available():
                # the copy's source would have to be evicted to make room: recompute those tokens instead
                matches[i] = Match(m.nodes, None, len(m.nodes) * bs)
        start = min(m.length for m in matches)
        seq.comps = []
        for c, m in zip(self.components, matches):
            pool = c.pool
            st = CompState(blocks=[n.block for n in m.nodes], nodes=list(m.nodes), write_from=m.length)
            pool.acquire(m.nodes)
            if m.cow:
                src, n = m.cow
                pool.acquire([src])                 # keep the source alive while the copy's block is allocated
                blk = pool.allocate()
                pool.copy_tokens(src.block, blk, n)
                pool.release([src])
                st.blocks.append(blk)
            seq.comps.append(st)
        seq.num_computed = start
        if seq.reused is None:
            seq.reused = min(start, len(seq.prompt_ids))
            m0 = matches[0]                         # prompt tokens another role computed (the shared-cache win)
            spans = [(len(n.tokens), n.writer) for n in m0.nodes] + ([(m0.cow[1], m0.cow[0].writer)] if m0.cow else [])
            left, cross = seq.reused, 0
            for n, writer in spans:
                take = min(n, left)
                cross += take if writer != seq.role else 0
                left -= take
            seq.reused_cross = cross
        return True

    def grow(self, seq: Sequence, upto: int) -> bool:
        """Allocate the blocks covering positions < ``upto``; False if a pool ran out first (what was allocated is
        kept)."""
        need = self.blocks_for(upto)
        for c, st in zip(self.components, seq.comps):
            while len(st.blocks) < need:
                blk = c.pool.allocate()
                if blk is None:
                    return False
                st.blocks.append(blk)
        return True

    def write_slots(self, seq: Sequence, comp: int, start: int, end: int) -> tuple[list[int], list[int]]:
        """(offsets in [0, end-start), flat cache slots) of the positions in [start, end) this component writes."""
        st, bs = seq.comps[comp], self.block_size
        offs, slots = [], []
        for p in range(max(start, st.write_from), end):
            offs.append(p - start)
            slots.append(st.blocks[p // bs] * bs + p % bs)
        return offs, slots

    def publish(self, seq: Sequence, *, partial: bool) -> None:
        """Put the sequence's computed blocks into the prefix tree (full ones; the last partial one too if asked)."""
        n, bs, tokens = seq.num_computed, self.block_size, seq.tokens
        for c, st in zip(self.components, seq.comps):
            ns = c.namespace(seq)
            i = len(st.nodes)
            while not st.stopped and i < len(st.blocks) and ((i + 1) * bs <= n or (partial and i * bs < n)):
                parent = st.nodes[-1] if st.nodes else None
                if parent is not None and len(parent.tokens) < bs:
                    break                       # a partial node is a leaf
                node = c.pool.insert(ns, parent, tuple(tokens[i * bs:min((i + 1) * bs, n)]), st.blocks[i],
                                     writer=seq.role)
                if node is None:
                    st.stopped = True
                    break
                st.nodes.append(node)
                i += 1

    def finish(self, seq: Sequence, *, publish: bool = True) -> None:
        """Drop the sequence's references and private blocks (publishing what it computed first, if asked)."""
        if not seq.comps:
            return
        if publish:
            self.publish(seq, partial=True)
        for c, st in zip(self.components, seq.comps):
            c.pool.release(st.nodes)
            for blk in st.blocks[len(st.nodes):]:
                c.pool.free_block(blk)
        seq.comps = []

    # -- stats --------------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        out = {"base_bytes": 0, "lowrank_bytes": 0, "free_bytes": 0, "capacity_bytes": 0, "used_blocks": {},
               "free_blocks": {}, "cached_blocks": {}, "held_blocks": {}, "evictions": 0}
        for c in self.components:
            p = c.pool
            for kind, per_block in c.block_bytes.items():
                out[f"{kind}_bytes"] += p.used_blocks() * per_block
                out["free_bytes"] += len(p.free) * per_block
                out["capacity_bytes"] += p.num_blocks * per_block
            out["used_blocks"][c.name] = p.used_blocks()
            out["free_blocks"][c.name] = len(p.free)
            out["cached_blocks"][c.name] = p.n_nodes
            out["held_blocks"][c.name] = p.held()
            out["evictions"] += p.evictions
        out["total_bytes"] = out["base_bytes"] + out["lowrank_bytes"]
        return out

    def clear(self) -> None:
        for c in self.components:
            c.pool.clear()
