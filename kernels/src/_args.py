"""Argument checks shared by the Triton wrappers and the torch references (one place, every problem reported)."""
import torch


def _fail(problems):
    if problems:
        raise ValueError("flash_lora_attention: " + "; ".join(problems))


def lora_b(b, name, h_kv, r, d, problems):
    """Accept B as [N, H_kv, r, D] (or [H_kv, r, D] for a single adapter); return the 4-D view."""
    if b is None:
        return None
    if b.dim() == 3:
        b = b.unsqueeze(0)
    if b.dim() != 4 or tuple(b.shape[1:]) != (h_kv, r, d):
        problems.append(f"{name} must be [N, H_kv={h_kv}, r={r}, D={d}], got {tuple(b.shape)}")
    return b


def agent_index(agent_ids, n_agents, batch, device, problems):
    """Per-sequence adapter index; None is allowed only when a single adapter is stacked."""
    if agent_ids is None:
        if n_agents > 1:
            problems.append(f"agent_ids is required when {n_agents} adapters are stacked")
        return torch.zeros(batch, dtype=torch.int32, device=device)
    agent_ids = index_tensor(torch.as_tensor(agent_ids), device)
    if agent_ids.shape != (batch,):
        problems.append(f"agent_ids must be [{batch}], got {tuple(agent_ids.shape)}")
    return agent_ids


def index_tensor(t, device):
    """int32/int64 index tensor on ``device`` (no copy when it already is one; the kernels read either width)."""
    if t.dtype in (torch.int32, torch.int64) and t.device == device:
        return t
    return t.to(device=device, dtype=torch.int64 if t.dtype == torch.int64 else torch.int32)


def check_lora(problems, h_kv, d, lr_v, b_v, lr_k, b_k, cos, sin, agent_ids, batch, device):
    """Validate the low-rank arguments (appending to ``problems``, raising once for all of them).

    Returns (b_v, b_k, agent_ids, r) with B as 4-D and agent ids as an int32/int64 tensor on ``device``.
    """
    if (lr_v is None) != (b_v is None):
        problems.append("lr_v and b_v must be given together")
    if (lr_k is None) != (b_k is None):
        problems.append("lr_k and b_k must be given together")
    if lr_k is not None and (cos is None or sin is None):
        problems.append("key LoRA (lr_k, b_k) needs the RoPE tables cos and sin")
    if lr_k is not None and d % 2:
        problems.append(f"key LoRA needs an even head_dim, got {d}")
    ranks = {t.shape[-1] for t in (lr_v, lr_k) if t is not None}
    if len(ranks) > 1:
        problems.append(f"lr_v and lr_k must have the same rank, got {sorted(ranks)}")
    r = ranks.pop() if ranks else 0
    b_v = lora_b(b_v, "b_v", h_kv, r, d, problems)
    b_k = lora_b(b_k, "b_k", h_kv, r, d, problems)
    if b_v is not None and b_k is not None and b_v.shape[0] != b_k.shape[0]:
        problems.append("b_v and b_k must stack the same number of adapters")
    for name, t in (("cos", cos), ("sin", sin)):
        if t is not None and (t.dim() != 2 or t.shape[1] != d):
            problems.append(f"{name} must be [positions, D={d}], got {tuple(t.shape)}")
    if r > 128:
        problems.append(f"rank must be <= 128, got {r}")
    stacked = [b for b in (b_v, b_k) if b is not None and b.dim() == 4]
    n_agents = stacked[0].shape[0] if stacked else 1
    ids = agent_index(agent_ids, n_agents, batch, device, problems) if r else None
    _fail(problems)
    return b_v, b_k, ids, r


def check_dense(q, k, v, lr_v, b_v, agent_ids, lr_k, b_k, cos, sin, causal=True):
    """Shapes of the dense (SDPA layout) call. Returns (b_v, b_k, agent_ids, r)."""
    problems = []
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        _fail(["q, k, v must be [B, H, S, D]"])
    batch, h, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != d:
        problems.append(f"k, v must be [B={batch}, H_kv, Sk, D={d}], got {tuple(k.shape)} and {tuple(v.shape)}")
    h_kv, sk = k.shape[1], k.shape[2]
    if h % h_kv:
        problems.append(f"query heads {h} must be a multiple of KV heads {h_kv}")
    if causal and q.shape[2] > sk:
        problems.append(f"causal bottom-right alignment needs Sq <= Sk, got {q.shape[2]} > {sk}")
    for name, t in (("lr_v", lr_v), ("lr_k", lr_k)):
        if t is not None and (t.dim() != 3 or tuple(t.shape[:2]) != (batch, sk)):
            problems.append(f"{name} must be [B={batch}, Sk={sk}, r], got {tuple(t.shape)}")
    if cos is not None and lr_k is not None and cos.shape[0] < sk:
        problems.append(f"cos/sin must cover the {sk} key positions")
    return check_lora(problems, h_kv, d, lr_v, b_v, lr_k, b_k, cos, sin, agent_ids, batch, q.device)


def check_paged(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, lr_v_cache, b_v, agent_ids,
                lr_block_table, lr_k_cache, b_k, cos, sin):
    """Shapes of the paged/varlen call. Returns (b_v, b_k, agent_ids, r, lr_block_table)."""
    problems = []
    if q.dim() != 3 or k_cache.dim() != 4:
        _fail(["q must be [total_q, H, D] and k_cache/v_cache [num_blocks, block_size, H_kv, D]"])
    h, d = q.shape[1], q.shape[2]
    h_kv = k_cache.shape[2]
    batch = block_table.shape[0]
    if v_cache.shape != k_cache.shape or k_cache.shape[3] != d:
        problems.append(f"k_cache/v_cache must be [num_blocks, block_size, H_kv, D={d}], got "
                        f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if h % h_kv:
        problems.append(f"query heads {h} must be a multiple of KV heads {h_kv}")
    if block_table.dim() != 2:
        problems.append("block_table must be [B, max_blocks]")
    if tuple(seq_lens.shape) != (batch,) or tuple(cu_seqlens_q.shape) != (batch + 1,):
        problems.append(f"seq_lens must be [B={batch}] and cu_seqlens_q [B+1={batch + 1}]")
    if lr_block_table is None:
        lr_block_table = block_table
    elif tuple(lr_block_table.shape[:1]) != (batch,) or lr_block_table.dim() != 2:
        problems.append(f"lr_block_table must be [B={batch}, max_blocks], got {tuple(lr_block_table.shape)}")
    shapes = {tuple(t.shape[:2]) for t in (lr_v_cache, lr_k_cache) if t is not None}
    for name, t in (("lr_v_cache", lr_v_cache), ("lr_k_cache", lr_k_cache)):
        if t is not None and t.dim() != 3:
            problems.append(f"{name} must be [num_lr_blocks, block_size, r], got {tuple(t.shape)}")
    if len(shapes) > 1:
        problems.append("lr_v_cache and lr_k_cache must have the same [num_lr_blocks, block_size]")
    b_v, b_k, ids, r = check_lora(problems, h_kv, d, lr_v_cache, b_v, lr_k_cache, b_k, cos, sin, agent_ids,
                                  batch, q.device)
    return b_v, b_k, ids, r, lr_block_table
