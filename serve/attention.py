"""Paged varlen attention with the low-rank K/V adapter terms: the engine's one call into ``lragent.kernels``.

Signature (``lragent.kernels.flash_lora_attention_paged``):

    q [total_q, H, D] (post-RoPE), k_cache/v_cache [num_blocks, block_size, H_kv, D] (K post-RoPE),
    block_table [B, max_blocks] int32, seq_lens [B] int32 (keys per sequence, new tokens included, already written),
    cu_seqlens_q [B+1] int32; optional lr_v_cache / lr_k_cache [num_lr_blocks, block_size, r] (L = s X A, L_k
    pre-RoPE) with lr_block_table (defaults to block_table), b_v / b_k [N, H_kv, r, D], agent_ids [B], cos/sin
    [max_positions, D] by absolute key position (HF rotate_half). Causal, aligned bottom-right. Returns [total_q, H, D].

    V'_b = V_base + L_v B_v[agent_b]        K'_b = K_base + RoPE(L_k B_k[agent_b])

Backends: ``triton`` (the Flash-LoRA-Attention kernel; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``torch``
(:mod:`.cpu_attention`, a lean torch path tested against the reference), ``reference`` (the kernels' pure-torch
reference) and ``auto`` (triton on CUDA tensors, torch otherwise). The engine passes ``prepared`` (B laid out once)
to the torch path only.
"""
from __future__ import annotations

import torch

from .config import ServeError

BACKENDS = ("auto", "torch", "reference", "triton")


def kernel_limits(head_dim: int, key_lora: bool, rank: int) -> str | None:
    """Why the Triton kernel cannot serve this shape (None when it can): head_dim 16..256, 32..256 with key LoRA
    (its half-head-dim dots need K >= 16), rank <= 128."""
    lo = 32 if key_lora else 16
    if not lo <= head_dim <= 256:
        return f"head_dim {head_dim} is outside {lo}..256{' with key LoRA' if key_lora else ''}"
    if rank > 128:
        return f"rank {rank} > 128"
    return None


def attention_fn(backend: str, device: torch.device, *, head_dim: int, key_lora: bool = False,
                 rank: int = 0) -> tuple[str, callable]:
    """(resolved backend name, paged attention function) for a backend, device and model shape."""
    from lragent import kernels

    from .cpu_attention import paged_attention_cpu

    if backend not in BACKENDS:
        raise ServeError(f"unknown attention backend {backend!r}: use one of {', '.join(BACKENDS)}")
    why = kernel_limits(head_dim, key_lora, rank)
    if backend == "auto":   # the torch path runs on any device: it covers shapes the kernel does not
        backend = "triton" if device.type == "cuda" and kernels.triton_available() and why is None else "torch"
    if backend == "triton":
        if not kernels.triton_available():
            raise ServeError("attention backend triton asked for but Triton is not installed: use --attention torch")
        if why is not None:
            raise ServeError(f"the Triton kernel cannot serve this model: {why}; use --attention torch")
    return backend, {"torch": paged_attention_cpu, "reference": kernels.flash_lora_attention_paged_ref,
                     "triton": kernels.flash_lora_attention_paged}[backend]
