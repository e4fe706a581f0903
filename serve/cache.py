"""A block pool indexed by a prefix tree over token ids, with ref counts and LRU eviction.

Each tree node is one cache block: a full block (``block_size`` token ids; it may have children) or a partial
block (fewer ids; always a leaf, written by a sequence that finished inside it). A node's key is its token ids, so a
path from a namespace root spells a token prefix; namespaces carry the base fingerprint, the A-family hash and, in
per-role modes, the role and its adapter hash. A request reuses the full blocks on its path in place; a partly
matching block (a partial node, or a full one it only shares a prefix with) is copied into a fresh block
(copy-on-write), so a block in the tree is never written again.

Invariants: a sequence holds (refs) every node on its path from the root, so the ancestors of a held node are held;
a node with ref 0 whose subtree is unreferenced is evictable, leaves first, least recently released first; a held
node is never evicted. ``available()`` counts free blocks plus unreferenced nodes. Nothing is reserved: blocks are
allocated as sequences grow, and ``allocate()`` returns None when the pool is exhausted (the scheduler then
preempts a sequence).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


class Node:
    __slots__ = ("tokens", "block", "parent", "children", "ref", "writer")

    def __init__(self, tokens: tuple, block: int, parent: "Node | None", writer=None):
        self.tokens, self.block, self.parent, self.writer = tokens, block, parent, writer
        self.children: dict[tuple, Node] = {}
        self.ref = 0


@dataclass
class Match:
    nodes: list[Node]                 # full blocks reused in place, from the root
    cow: tuple[Node, int] | None      # (source node, n tokens) to copy into a fresh block
    length: int                       # tokens reused in total


class PrefixCache:
    def __init__(self, num_blocks: int, block_size: int, tensors: list[torch.Tensor]):
        if num_blocks < 1:
            raise ValueError("the cache pool needs at least one block")
        self.num_blocks, self.block_size, self.tensors = num_blocks, block_size, tensors
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.roots: dict[tuple, Node] = {}
        self.evictable: OrderedDict[int, Node] = OrderedDict()   # ref-0 leaves, least recently released first
        self.n_unref = 0          # tree nodes with ref 0 (all evictable, leaves first)
        self.n_nodes = 0
        self.evictions = 0

    # -- accounting -------------------------------------------------------------------------------------------
    def available(self) -> int:
        """Blocks an allocation can take now: free ones and unreferenced cached ones (evicted on demand)."""
        return len(self.free) + self.n_unref

    def held(self) -> int:
        """Blocks some sequence holds: referenced tree nodes and private (not yet published) blocks."""
        return self.num_blocks - self.available()

    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def cost(self, nodes: list[Node]) -> int:
        """How much acquiring these nodes lowers ``available()`` (the unreferenced ones stop being evictable)."""
        unique = {id(n): n for n in nodes}
        return sum(1 for n in unique.values() if n.ref == 0)

    # -- tree ---------------------------------------------------------------------------------------------------
    def match(self, namespace: tuple, tokens: list[int], limit: int) -> Match:
        """The longest cached prefix of ``tokens[:limit]`` under ``namespace``."""
        bs = self.block_size
        node = self.roots.get(namespace)
        nodes: list[Node] = []
        i = 0
        if node is None:
            return Match(nodes, None, 0)
        while i + bs <= limit:
            child = node.children.get(tuple(tokens[i:i + bs]))
            if child is None:
                break
            nodes.append(child)
            node, i = child, i + bs
        rest = tokens[i:min(i + bs, limit)]
        best, best_n = None, 0
        for child in node.children.values():
            n = 0
            for a, b in zip(child.tokens, rest):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = child, n
        return Match(nodes, (best, best_n) if best is not None else None, i + best_n)

    def acquire(self, nodes: list[Node]) -> None:
        for n in nodes:
            if n.ref == 0:
                self.n_unref -= 1
                self.evictable.pop(id(n), None)
            n.ref += 1

    def release(self, nodes: list[Node]) -> None:
        for n in reversed(nodes):
            n.ref -= 1
            assert n.ref >= 0
            if n.ref == 0:
                self.n_unref += 1
                if not n.children:
                    self.evictable[id(n)] = n

    def insert(self, namespace: tuple, parent: Node | None, tokens: tuple, block: int, writer=None) -> Node | None:
        """Adopt a written block as the child of ``parent`` (None: the namespace root), held once by the caller;
        ``writer`` records who computed it (a role name). Returns None (nothing adopted) when the tree already has
        these tokens there."""
        if parent is None:
            parent = self.roots.get(namespace)
            if parent is None:
                parent = self.roots[namespace] = Node((), -1, None)
        if tokens in parent.children:
            return None
        for c in list(parent.children.values()):
            if len(c.tokens) > len(tokens) and c.tokens[:len(tokens)] == tokens:
                return None                # already covered by a longer sibling
        for c in list(parent.children.values()):
            if len(c.tokens) < len(tokens) and c.ref == 0 and tokens[:len(c.tokens)] == c.tokens:
                self._remove(c)            # a stale partial block this longer one supersedes
        node = Node(tokens, block, parent, writer)
        node.ref = 1
        parent.children[tokens] = node
        self.evictable.pop(id(parent), None)
        self.n_nodes += 1
        return node

    def _remove(self, node: Node) -> None:
        assert node.ref == 0 and not node.children
        self.evictable.pop(id(node), None)
        parent = node.parent
        del parent.children[node.tokens]
        self.free.append(node.block)
        self.n_unref -= 1
        self.n_nodes -= 1
        if parent.parent is not None and parent.ref == 0 and not parent.children:
            self.evictable[id(parent)] = parent
            self.evictable.move_to_end(id(parent), last=False)

    # -- blocks -------------------------------------------------------------------------------------------------
    def allocate(self) -> int | None:
        """A free block, evicting the least recently released unreferenced leaf if needed; None if every block is
        held."""
        if not self.free:
            if not self.evictable:
                return None
            _, victim = self.evictable.popitem(last=False)
            self.evictable[id(victim)] = victim
            self._remove(victim)
            self.evictions += 1
        return self.free.pop()

    def free_block(self, block: int) -> None:
        self.free.append(block)

    def copy_tokens(self, src: int, dst: int, n: int) -> None:
        for t in self.tensors:
            t[:, dst, :n] = t[:, src, :n]

    def clear(self) -> None:
        """Evict every unreferenced node."""
        while self.evictable:
            _, node = self.evictable.popitem(last=False)
            self.evictable[id(node)] = node
            self._remove(node)
