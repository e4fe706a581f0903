"""The prefix tree over token ids: matching, copy-on-write, ref counts, LRU eviction, namespaces."""
import pytest
import torch

from lragent.serve.cache import PrefixCache

BS = 4
NS = ("lrshared", "base-fp", "family")


def make(num_blocks=8):
    t = torch.zeros(1, num_blocks, BS, 1)
    return PrefixCache(num_blocks, BS, [t]), t


def write(pool, ns, tokens, parent=None):
    """Allocate and insert one block per BS tokens (the last may be partial); returns the nodes, held once."""
    nodes = []
    for i in range(0, len(tokens), BS):
        blk = pool.allocate()
        node = pool.insert(ns, parent, tuple(tokens[i:i + BS]), blk)
        assert node is not None
        nodes.append(node)
        parent = node
    return nodes


def test_match_full_blocks_partial_and_cow():
    pool, _ = make()
    toks = list(range(10, 20))                    # 2 full blocks + a partial of 2
    nodes = write(pool, NS, toks)
    pool.release(nodes)
    m = pool.match(NS, toks + [99], limit=11)
    assert [n.block for n in m.nodes] == [nodes[0].block, nodes[1].block]
    assert m.cow == (nodes[2], 2) and m.length == 10
    # a prompt that diverges inside block 2 reuses block 1 in place and copies the common part of block 2
    m = pool.match(NS, toks[:6] + [77, 78], limit=8)
    assert len(m.nodes) == 1 and m.cow == (nodes[1], 2) and m.length == 6
    # limit: the last prompt token is always computed, so a fully cached prompt still leaves one token
    m = pool.match(NS, toks[:8], limit=7)
    assert len(m.nodes) == 1 and m.cow == (nodes[1], 3) and m.length == 7
    # token identity, not length: same length, other ids -> nothing
    assert pool.match(NS, [1] * 10, limit=9).length == 0


def test_namespaces_are_isolated():
    pool, _ = make()
    pool.release(write(pool, NS, list(range(8))))
    assert pool.match(("lrshared", "base-fp", "other-family"), list(range(8)), 7).length == 0
    assert pool.match(("nonshared", "base-fp", "actor", "h"), list(range(8)), 7).length == 0
    assert pool.match(NS, list(range(8)), 7).length == 7


def test_lru_eviction_leaves_first_and_never_in_use():
    pool, _ = make(num_blocks=4)
    a = write(pool, NS, [1, 2, 3, 4, 5, 6, 7, 8])         # two blocks, chain
    b = write(pool, NS, [9, 9, 9, 9])                     # one block
    pool.release(a)                                       # a released first: least recently used
    assert pool.available() == 1 + 2
    blk = pool.allocate()                   # the free block
    blk2 = pool.allocate()                  # evicts a's leaf (not its parent first, not b: in use)
    assert blk2 == a[1].block and a[1].tokens not in a[0].children
    blk3 = pool.allocate()                  # then a's root block, now a leaf
    assert blk3 == a[0].block and pool.n_nodes == 1
    assert pool.allocate() is None                        # only b is left, and b is in use: exhausted
    assert pool.match(NS, [9, 9, 9, 9, 0], 4).length == 4
    for x in (blk, blk2, blk3):
        pool.free_block(x)
    pool.release(b)
    assert pool.available() == 4 and pool.evictions == 2


def test_availability_and_cost():
    pool, _ = make(num_blocks=4)
    nodes = write(pool, NS, [1, 2, 3, 4, 5, 6, 7, 8])
    pool.release(nodes)
    assert pool.cost(nodes) == 2 and pool.available() == 4 and pool.held() == 0
    pool.acquire(nodes)
    assert pool.cost(nodes) == 0 and pool.available() == 2 and pool.held() == 2
    blk = pool.allocate()
    assert pool.available() == 1 and pool.held() == 3
    pool.free_block(blk)
    pool.release(nodes)
    assert pool.available() == 4


def test_full_block_supersedes_stale_partial_and_copy():
    pool, t = make()
    root = write(pool, NS, [1, 2, 3, 4])
    part = pool.insert(NS, root[0], (5, 6), pool.allocate())
    t[0, part.block, :2, 0] = torch.tensor([50.0, 60.0])
    pool.release(root + [part])
    dst = pool.allocate()
    pool.copy_tokens(part.block, dst, 2)
    assert t[0, dst, :2, 0].tolist() == [50.0, 60.0]
    full = pool.insert(NS, root[0], (5, 6, 7, 8), dst)
    assert (5, 6) not in root[0].children and full is not None
    assert pool.insert(NS, root[0], (5, 6), pool.allocate()) is None   # covered by the full one
    assert pool.insert(NS, root[0], (5, 6, 7, 8), 0) is None                          # twin: not adopted
