"""Flash-LoRA-Attention on a real GPU (skipped without CUDA): bf16 and large shapes against the float64 reference.

Tolerances: max |kernel - reference| <= TOL * max(1, max |reference|), TOL = 4e-3 (fp16), 2e-2 (bf16: 8-bit
mantissa for inputs, P, K' and the output). These tests are marked `gpu` (conftest skips them without CUDA) and
need compiled kernels, so they also skip under the interpreter that conftest turns on by default. Run them with

    TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels_gpu.py
"""
import os

import pytest
import torch

from lragent.kernels import (flash_lora_attention, flash_lora_attention_paged, flash_lora_attention_paged_ref,
                             flash_lora_attention_ref)
from support.kernels import make_dense, make_paged, to_float64

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.is_available() and _INTERPRETED,
                                 reason="compiled kernels: TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels_gpu.py")]
TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _check(out, want):
    assert torch.isfinite(out).all()
    err = (out.double() - want).abs().max().item()
    bound = TOL[out.dtype] * max(1.0, want.abs().max().item())
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


# (batch, heads, kv_heads, Sq, Sk, head_dim, rank, key_lora)
CASES = [
    (4, 32, 8, 1, 4097, 128, 16, False),   # decode, GQA 4, split-K
    (4, 32, 8, 1, 4097, 128, 16, True),
    (32, 32, 8, 1, 1000, 128, 8, True),    # decode, batch fills the GPU (few or no splits)
    (2, 16, 1, 1, 8191, 64, 64, False),    # MQA decode
    (1, 32, 8, 300, 2000, 128, 64, True),  # chunked extend over a cached prefix
    (1, 8, 8, 513, 513, 256, 128, True),   # prefill, head_dim 256, rank 128
    (2, 8, 2, 33, 77, 32, 1, False),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,heads,kv_heads,sq,sk,d,r,key_lora", CASES)
def test_dense_gpu(batch, heads, kv_heads, sq, sk, d, r, key_lora, dtype):
    args = make_dense(batch, heads, kv_heads, sq, sk, d, r, dtype=dtype, key_lora=key_lora, seed=sk + r,
                      device="cuda")
    _check(flash_lora_attention(**args), flash_lora_attention_ref(**to_float64(args)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decode", [True, False])
def test_paged_gpu(dtype, decode):
    seq_lens = [4000, 17, 1500, 2600]
    q_lens = [1, 1, 1, 1] if decode else [1, 17, 200, 64]
    args = make_paged(seq_lens, q_lens, 32, 8, 128, 16, block_size=16, dtype=dtype, key_lora=True,
                      separate_lr_table=True, seed=3, device="cuda")
    _check(flash_lora_attention_paged(**args), flash_lora_attention_paged_ref(**to_float64(args)))


def test_split_counts_agree_gpu():
    args = make_dense(2, 32, 8, 1, 16384, 128, 16, dtype=torch.bfloat16, key_lora=True, device="cuda")
    want = flash_lora_attention_ref(**to_float64(args))
    for splits in (1, 7, 32, None):
        _check(flash_lora_attention(**args, num_splits=splits), want)
