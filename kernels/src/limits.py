"""What the Triton Flash-LoRA-Attention kernels support (one place; the kernels enforce it, servers ask it)."""

HEAD_DIM_MAX = 256
HEAD_DIM_MIN = 16            # tl.dot needs K >= 16
HEAD_DIM_MIN_KEY_LORA = 32   # key LoRA splits the head dim in halves for RoPE: each half-dot needs K >= 16
RANK_MAX = 128               # padded inside to a power of two >= 16 (>= 32 on the decode path)


def triton_unsupported(head_dim: int, rank: int = 0, key_lora: bool = False) -> str | None:
    """Why the Triton kernels cannot serve this shape, as a phrase; None when they can."""
    lo = HEAD_DIM_MIN_KEY_LORA if key_lora else HEAD_DIM_MIN
    if not lo <= head_dim <= HEAD_DIM_MAX:
        return f"head_dim {head_dim} is outside {lo}..{HEAD_DIM_MAX}{' with key LoRA' if key_lora else ''}"
    if key_lora and head_dim % 2:
        return f"key LoRA needs an even head_dim, got {head_dim}"
    if rank > RANK_MAX:
        return f"rank {rank} > {RANK_MAX}"
    return None
