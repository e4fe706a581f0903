"""Paged/varlen Flash-LoRA-Attention (Triton, CPU interpreter) against the float64 paged reference.

Tolerances as in test_kernels_flash_lora.py: max |kernel - reference| <= TOL * max(1, max |reference|) with
TOL = 2e-5 (fp32) and 4e-3 (fp16). Every cache slot no sequence owns, every unused block and every block-table
entry past a sequence's end is poisoned (NaN / a spare block), so reading one makes the output non-finite.
Batches mix decode (1 query), chunked extend over a cached prefix (bottom-right causal) and full prefill.
"""
import os

import pytest
import torch

from lragent.kernels import flash_lora_attention_paged, flash_lora_attention_paged_ref
from support.kernels import make_paged, to_float64

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                reason="CPU tensors need the Triton interpreter (conftest sets TRITON_INTERPRET=1)")
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def check(out, args):
    want = flash_lora_attention_paged_ref(**to_float64(args))
    assert torch.isfinite(want).all(), "the reference read a poisoned slot"
    assert torch.isfinite(out).all(), "the kernel read a poisoned slot or left an output row unwritten"
    err = (out.double() - want).abs().max().item()
    bound = TOL[out.dtype] * max(1.0, want.abs().max().item())
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


# (seq_lens, q_lens, heads, kv_heads, head_dim, rank, block_size, dtype, key_lora, separate_lr_table)
CASES = [
    pytest.param([13, 40, 5], [3, 40, 1], 4, 1, 32, 8, 16, torch.float32, True, False, id="mixed-mqa-fp32-klora"),
    pytest.param([37, 21], [1, 1], 8, 1, 32, 64, 8, torch.float16, False, True, id="decode-g8-r64-fp16-baseshared"),
    pytest.param([50, 9, 31], [19, 9, 2], 8, 2, 64, 16, 32, torch.float16, True, True,
                 id="extend-g4-fp16-klora-baseshared-bs32"),
    pytest.param([26], [26], 2, 2, 32, 1, 8, torch.float32, True, False, id="prefill-mha-r1-fp32-klora"),
]


@pytest.mark.parametrize("seq_lens,q_lens,heads,kv_heads,d,r,block_size,dtype,key_lora,separate", CASES)
def test_paged_matches_reference(seq_lens, q_lens, heads, kv_heads, d, r, block_size, dtype, key_lora, separate):
    args = make_paged(seq_lens, q_lens, heads, kv_heads, d, r, block_size=block_size, dtype=dtype,
                      key_lora=key_lora, separate_lr_table=separate, seed=sum(seq_lens) + r)
    out = torch.full_like(args["q"], float("nan"))
    flash_lora_attention_paged(**args, out=out)
    check(out, args)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_split_k_with_hints(num_splits):
    """Decode batch with host-side length hints (no device sync) and a low-rank cache with its own block size."""
    seq_lens = [70, 3, 45]
    args = make_paged(seq_lens, [1, 1, 1], 4, 2, 32, 16, block_size=16, lr_block_size=8, dtype=torch.float16,
                      key_lora=True, seed=5)
    out = flash_lora_attention_paged(**args, max_seqlen_q=1, max_seqlen_k=max(seq_lens), num_splits=num_splits)
    check(out, args)


def test_paged_plain_attention_and_value_only_with_int64_indices():
    args = make_paged([20, 33], [4, 1], 4, 2, 32, 8, block_size=16, dtype=torch.float32, seed=6)
    for name in ("block_table", "seq_lens", "cu_seqlens_q", "agent_ids"):
        args[name] = args[name].long()
    check(flash_lora_attention_paged(**args), args)
    plain = {k: v for k, v in args.items() if k in ("q", "k_cache", "v_cache", "block_table", "seq_lens",
                                                    "cu_seqlens_q")}
    check(flash_lora_attention_paged(**plain), plain)


def test_paged_bf16_through_fp32_under_interpreter():
    args = make_paged([12, 30], [12, 1], 4, 2, 32, 8, block_size=8, dtype=torch.bfloat16, key_lora=True, seed=4)
    out = flash_lora_attention_paged(**args)
    want = flash_lora_attention_paged_ref(**to_float64(args))
    assert out.dtype == torch.bfloat16 and (out.double() - want).abs().max() <= 1.6e-2 * max(1.0, want.abs().max())


def test_paged_rejects_bad_tables():
    args = make_paged([10], [2], 4, 2, 32, 8, dtype=torch.float32)
    args["seq_lens"] = torch.tensor([10, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_lens must be"):
        flash_lora_attention_paged(**args)
