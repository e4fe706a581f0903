"""Cache layout per mode, admission with prefix reuse, block tables and write slots for a step.

A *component* is one prefix-cached block pool and the tensors its blocks index:

    mode        component "kv" (namespace)                          component "lr" (namespace)
    nonshared   full K/V with the role's adapter  (base, role, hash)  -
    fullshared  full K/V of whichever role wrote  (base, family)      -
    baseshared  base K/V                          (base, family)      L_k/L_v per role (base, family, role, hash)
    lrshared    base K/V + L_k/L_v, same blocks   (base, A-family)    -

A request computes from c = min over components of the reused prefix; a component that reuses more keeps its
blocks and skips the writes below its own reuse (baseshared: a role recomputes context another role wrote, to get its
own X A_role, but keeps the shared base K/V).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .cache import Match, PrefixCache
from .config import ServeError
from .sequence import CompState, Sequence


@dataclass
class Component:
    name: str
    pool: PrefixCache
    namespace: Callable[[Sequence], tuple]
    block_bytes: dict[str, int]        # bytes per block by kind ("base", "lowrank")


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
                    f"{c.name} pool holds {c.pool.num_blocks} blocks: give the engine more cache (num_blocks / "
                    f"--cache-tokens) or shorten the prompt / max_new_tokens")

    def try_admit(self, seq: Sequence) -> bool:
        """Match the prompt against the cache and reserve every block the request may need; False if the pool is
        busy now (the request waits)."""
        tokens, bs = seq.prompt_ids, self.block_size
        limit = len(tokens) - 1                      # the last prompt token is always computed (its logits)
        matches = [c.pool.match(c.namespace(seq), tokens, limit) for c in self.components]
        need = self.blocks_for(seq.max_tokens)
        plans = []
        for i, (c, m) in enumerate(zip(self.components, matches)):
            n_new = need - len(m.nodes)
            base_cost = n_new + c.pool.cost(m.nodes)
            if base_cost > c.pool.available():
                return False
            if m.cow and base_cost + c.pool.cost([m.cow[0]]) > c.pool.available():
                # the copy's source would have to be evicted to make room: recompute those tokens instead
                matches[i] = Match(m.nodes, None, len(m.nodes) * bs)
            plans.append(n_new)
        start = min(m.length for m in matches)
        seq.comps = []
        for c, m, n_new in zip(self.components, matches, plans):
            pool = c.pool
            st = CompState(blocks=[n.block for n in m.nodes], nodes=list(m.nodes), write_from=m.length)
            pool.acquire(m.nodes)
            pool.reserve(n_new)
            st.reserved = n_new
            if m.cow:
                src, n = m.cow
                pool.acquire([src])                 # keep the source alive while the copy's block is allocated
                blk = pool.allocate()
                st.reserved -= 1
                pool.copy_tokens(src.block, blk, n)
                pool.release([src])
                st.blocks.append(blk)
            seq.comps.append(st)
        seq.num_computed = seq.reused = start
        return True

    def ensure_blocks(self, seq: Sequence, upto: int) -> None:
        """Allocate (from its reservation) the blocks covering positions < upto."""
        need = self.blocks_for(upto)
        for c, st in zip(self.components, seq.comps):
            while len(st.blocks) < need:
                st.blocks.append(c.pool.allocate())
                st.reserved -= 1

    def write_slots(self, seq: Sequence, comp: int, start: int, end: int) -> tuple[list[int], list[int]]:
        """(offsets in [0, end-start), flat cache slots) of the positions in [start, end) this component writes."""
        st, bs = self.comps_of(seq, comp), self.block_size
        offs, slots = [], []
        for p in range(max(start, st.write_from), end):
            offs.append(p - start)
            slots.append(st.blocks[p // bs] * bs + p % bs)
        return offs, slots

    @staticmethod
    def comps_of(seq: Sequence, comp: int) -> CompState:
        return seq.comps[comp]

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
                node = c.pool.insert(ns, parent, tuple(tokens[i * bs:min((i + 1) * bs, n)]), st.blocks[i])
                if node is None:
                    st.stopped = True
                    break
                st.nodes.append(node)
                i += 1

    def finish(self, seq: Sequence) -> None:
        """Publish what it computed, drop its references and private blocks, return its reservation."""
        if not seq.comps:
            return
        self.publish(seq, partial=True)
        for c, st in zip(self.components, seq.comps):
            c.pool.release(st.nodes)
            for blk in st.blocks[len(st.nodes):]:
                c.pool.free_block(blk)
            c.pool.unreserve(st.reserved)
        seq.comps = []

    # -- stats --------------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        out = {"base_bytes": 0, "lowrank_bytes": 0, "free_bytes": 0, "capacity_bytes": 0, "used_blocks": {},
               "free_blocks": {}, "cached_blocks": {}, "evictions": 0}
        for c in self.components:
            p = c.pool
            for kind, per_block in c.block_bytes.items():
                out[f"{kind}_bytes"] += p.used_blocks() * per_block
                out["free_bytes"] += len(p.free) * per_block
                out["capacity_bytes"] += p.num_blocks * per_block
            out["used_blocks"][c.name] = p.used_blocks()
            out["free_blocks"][c.name] = len(p.free)
            out["cached_blocks"][c.name] = p.n_nodes
            out["evictions"] += p.evictions
        out["total_bytes"] = out["base_bytes"] + out["lowrank_bytes"]
        return out

    def clear(self) -> None:
        for c in self.components:
            c.pool.clear()
