"""Random problem builders shared by the kernel tests and the benchmark (dense and paged layouts).

Low-rank rows are drawn at a scale that makes the LoRA terms comparable to the base K/V (so a wrong B, agent, rank
padding or RoPE shows up in the output instead of hiding under the base term).
"""
import torch


def rope_tables(n_pos, d, base=10000.0, dtype=torch.float32, device="cpu"):
    """HF-style RoPE tables [n_pos, d]: cos/sin of cat(freqs, freqs) (the rotate_half convention)."""
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    freqs = torch.outer(torch.arange(n_pos, dtype=torch.float64, device=device), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _randn(gen, *shape, scale=1.0, dtype=torch.float32, device="cpu"):
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def make_dense(batch, heads, kv_heads, sq, sk, d, r, *, n_agents=3, dtype=torch.float32, key_lora=False,
               value_lora=True, seed=0, device="cpu"):
    """Keyword arguments of `flash_lora_attention` for a random problem; agents cycle n_agents-1, ..., 0."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0, dt=dtype: _randn(gen, *s, scale=scale, dtype=dt, device=device)  # noqa: E731
    args = dict(q=rnd(batch, heads, sq, d), k=rnd(batch, kv_heads, sk, d), v=rnd(batch, kv_heads, sk, d))
    ids = torch.tensor([(n_agents - 1 - b) % n_agents for b in range(batch)], device=device)
    lr_scale, b_scale = 1.0, 1.0 / max(r, 1) ** 0.5
    if value_lora:
        args.update(lr_v=rnd(batch, sk, r, scale=lr_scale), b_v=rnd(n_agents, kv_heads, r, d, scale=b_scale),
                    agent_ids=ids)
    if key_lora:
        cos, sin = rope_tables(sk, d, dtype=dtype, device=device)
        args.update(lr_k=rnd(batch, sk, r, scale=lr_scale), b_k=rnd(n_agents, kv_heads, r, d, scale=b_scale),
                    cos=cos, sin=sin, agent_ids=ids)
    return args


def make_paged(seq_lens, q_lens, heads, kv_heads, d, r, *, block_size=16, lr_block_size=None, n_agents=3,
               dtype=torch.float32, key_lora=False, value_lora=True, separate_lr_table=False, spare_blocks=3,
               poison=float("nan"), seed=0, device="cpu"):
    """Keyword arguments of `flash_lora_attention_paged`: blocks in random physical order, every slot that no
    sequence owns (and every unused block) filled with ``poison`` so that reading one shows up in the output.
    ``separate_lr_table`` gives the low-rank caches their own block table (the baseshared layout)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: _randn(gen, *s, scale=scale, dtype=dtype, device=device)  # noqa: E731
    batch = len(seq_lens)
    lr_block_size = lr_block_size or block_size

    def table_and_cache(bs, row_shape):
        per_seq = [-(-n // bs) for n in seq_lens]
        n_blocks = sum(per_seq) + spare_blocks
        perm = torch.randperm(n_blocks, generator=gen)
        table = torch.zeros(batch, max(per_seq) + 1, dtype=torch.int32)
        cache = torch.full((n_blocks, bs, *row_shape), poison, dtype=dtype)
        start = 0
        for b, (n, nb) in enumerate(zip(seq_lens, per_seq)):
            table[b, :nb] = perm[start:start + nb].int()
            table[b, nb:] = perm[-1]  # garbage past the end must never be read
            start += nb
        return table.to(device), cache.to(device)

    def fill(cache, table, bs, rows):
        for b, n in enumerate(seq_lens):
            flat = cache[table[b].long()].reshape(-1, *cache.shape[2:])
            flat[:n] = rows(n)
            cache[table[b].long()] = flat.reshape(-1, bs, *cache.shape[2:])
        return cache

    block_table, k_cache = table_and_cache(block_size, (kv_heads, d))
    k_cache = fill(k_cache, block_table, block_size, lambda n: rnd(n, kv_heads, d))
    v_cache = fill(torch.full_like(k_cache, poison), block_table, block_size, lambda n: rnd(n, kv_heads, d))
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    args = dict(q=rnd(int(cu[-1]), heads, d), k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), cu_seqlens_q=cu)
    if value_lora or key_lora:
        if separate_lr_table or lr_block_size != block_size:
            lr_table, lr_proto = table_and_cache(lr_block_size, (r,))
            args["lr_block_table"] = lr_table
        else:
            lr_table, lr_proto = block_table, torch.full((k_cache.shape[0], block_size, r), poison, dtype=dtype,
                                                         device=device)
        args["agent_ids"] = torch.tensor([(b * 2 + 1) % n_agents for b in range(batch)], device=device)
        b_scale = 1.0 / max(r, 1) ** 0.5
        if value_lora:
            args["lr_v_cache"] = fill(lr_proto.clone(), lr_table, lr_block_size, lambda n: rnd(n, r))
            args["b_v"] = rnd(n_agents, kv_heads, r, d, scale=b_scale)
        if key_lora:
            args["lr_k_cache"] = fill(lr_proto.clone(), lr_table, lr_block_size, lambda n: rnd(n, r))
            args["b_k"] = rnd(n_agents, kv_heads, r, d, scale=b_scale)
            args["cos"], args["sin"] = rope_tables(max(seq_lens) + 5, d, dtype=dtype, device=device)
    return args


def to_float64(args):
    """Copy of a kwargs dict with every floating tensor in float64 (the input of the oracle)."""
    return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in args.items()}
