"""Dense Flash-LoRA-Attention (Triton, run by the CPU interpreter) against the float64 torch reference.

Tolerances (max |kernel - reference| <= TOL * max(1, max |reference|)):
  fp32 inputs: 2e-5   (observed ~5e-7: fp32 accumulation, exact fp32 dots in the interpreter)
  fp16 inputs: 4e-3   (observed <= 4e-4: fp16 output rounding 2^-11 relative, P and P L_v cast to fp16 for the
                        dots as on the GPU, K' = K + RoPE(L_k B_k) rounded to fp16 before Q K'^T)
  bf16 inputs: 1.6e-2 (computed from fp32 copies under the interpreter; bf16 rounding of inputs/output 2^-8)
Shapes are deliberately odd: Sq and Sk not multiples of the 16-wide interpreter tiles, H/H_kv in {1, 4, 8},
ranks 1..64 (padded to 16/32 inside), head dims 32/64, several agents in one batch.
"""
import os

import pytest
import torch

from lragent.kernels import flash_lora_attention, flash_lora_attention_ref
from support.kernels import make_dense, to_float64

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                reason="CPU tensors need the Triton interpreter (conftest sets TRITON_INTERPRET=1)")
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}


def check(out, args, causal=True):
    want = flash_lora_attention_ref(**to_float64(args), causal=causal)
    assert out.dtype == args["q"].dtype and out.shape == args["q"].shape
    assert torch.isfinite(out).all()
    err = (out.double() - want).abs().max().item()
    bound = TOL[out.dtype] * max(1.0, want.abs().max().item())
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"
    return err


# (batch, heads, kv_heads, Sq, Sk, head_dim, rank, dtype, key_lora)
CASES = [
    pytest.param(2, 4, 1, 1, 75, 32, 1, torch.float32, False, id="decode-mqa-r1-fp32"),
    pytest.param(2, 4, 4, 1, 50, 64, 8, torch.float16, True, id="decode-mha-r8-fp16-klora"),
    pytest.param(1, 8, 1, 1, 129, 32, 64, torch.float16, False, id="decode-g8-r64-fp16"),
    pytest.param(2, 4, 1, 7, 41, 32, 16, torch.float32, True, id="extend-small-g4-r16-fp32-klora"),
    pytest.param(1, 8, 2, 19, 33, 32, 16, torch.float16, True, id="extend-g4-r16-fp16-klora"),
    pytest.param(1, 2, 2, 70, 70, 64, 64, torch.float32, True, id="prefill-mha-r64-fp32-klora"),
    pytest.param(1, 8, 1, 13, 100, 64, 8, torch.float16, False, id="extend-g8-r8-fp16"),
    pytest.param(2, 4, 2, 3, 5, 32, 8, torch.float32, True, id="tiny-sk5-fp32-klora"),
    pytest.param(1, 4, 2, 9, 27, 48, 8, torch.float16, True, id="headdim48-fp16-klora"),
]


@pytest.mark.parametrize("batch,heads,kv_heads,sq,sk,d,r,dtype,key_lora", CASES)
def test_dense_matches_reference(batch, heads, kv_heads, sq, sk, d, r, dtype, key_lora):
    args = make_dense(batch, heads, kv_heads, sq, sk, d, r, dtype=dtype, key_lora=key_lora, seed=sq + sk + r)
    check(flash_lora_attention(**args), args)


@pytest.mark.parametrize("sq", [1, 20])
def test_non_causal_with_custom_scale(sq):
    args = make_dense(2, 4, 1, sq, 37, 32, 4, dtype=torch.float32, key_lora=True, seed=7)
    out = flash_lora_attention(**args, causal=False, softmax_scale=0.3)
    want = flash_lora_attention_ref(**to_float64(args), causal=False, softmax_scale=0.3)
    assert (out.double() - want).abs().max() <= TOL[torch.float32] * max(1.0, want.abs().max().item())


def test_plain_attention_without_lora_fp16():
    args = make_dense(2, 4, 2, 5, 44, 32, 0, dtype=torch.float16, value_lora=False, seed=8)
    out = flash_lora_attention(args["q"], args["k"], args["v"])
    check(out, args)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        *(t.double() for t in (args["q"], args["k"].repeat_interleave(2, 1), args["v"].repeat_interleave(2, 1))),
        attn_mask=torch.ones(5, 44, dtype=torch.bool).tril(39))
    assert (out.double() - sdpa).abs().max() < 8e-3


@pytest.mark.parametrize("sq,num_splits", [(1, 1), (1, 2), (1, 5), (5, 4)])
def test_split_k_decode_matches_reference(sq, num_splits):
    """Split-K with its log-sum-exp combine; with Sq = 5 some rows see no key of the last split (lse = -inf)."""
    args = make_dense(2, 4, 2, sq, 100, 32, 16, dtype=torch.float16, key_lora=True, seed=9)
    check(flash_lora_attention(**args, num_splits=num_splits), args)


def test_agents_are_selected_per_row():
    """Same K/V/L rows for every batch row, different agents: outputs differ exactly as the reference says."""
    args = make_dense(3, 4, 2, 2, 30, 32, 8, n_agents=3, dtype=torch.float32, key_lora=True, seed=10)
    for name in ("q", "k", "v", "lr_v", "lr_k"):
        args[name] = args[name][:1].expand_as(args[name]).contiguous()
    args["agent_ids"] = torch.tensor([2, 0, 1])
    out = flash_lora_attention(**args)
    check(out, args)
    assert (out[0] - out[1]).abs().max() > 1e-2 and (out[1] - out[2]).abs().max() > 1e-2


def test_strided_inputs_and_poisoned_out():
    """q/k/v as transposed views of [B, S, H, D] storage; `out` pre-filled with NaN must be fully overwritten."""
    args = make_dense(2, 4, 2, 6, 29, 32, 8, dtype=torch.float32, key_lora=True, seed=11)
    for name in ("q", "k", "v"):
        args[name] = args[name].transpose(1, 2).contiguous().transpose(1, 2)
        assert not args[name].is_contiguous()
    out = torch.full_like(args["q"], float("nan"))
    result = flash_lora_attention(**args, out=out)
    assert result.data_ptr() == out.data_ptr()
    check(out, args)


def test_bf16_runs_through_fp32_under_interpreter():
    args = make_dense(1, 4, 2, 3, 20, 32, 8, dtype=torch.bfloat16, key_lora=True, seed=12)
    check(flash_lora_attention(**args), args)


def test_kernel_rejects_bad_inputs():
    args = make_dense(1, 4, 2, 2, 10, 32, 8, dtype=torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        flash_lora_attention(args["q"], args["k"].half(), args["v"], args["lr_v"], args["b_v"], args["agent_ids"])
    with pytest.raises(ValueError, match="agent_ids is required"):
        flash_lora_attention(args["q"], args["k"], args["v"], args["lr_v"], args["b_v"])
    with pytest.raises(ValueError, match="outside 32..256 with key LoRA"):
        small = make_dense(1, 4, 2, 2, 10, 16, 8, dtype=torch.float32, key_lora=True)
        flash_lora_attention(**small)
    with pytest.raises(ValueError, match="rank must be <= 128"):
        big = make_dense(1, 4, 2, 2, 10, 32, 130, dtype=torch.float32)
        flash_lora_attention(**big)


def test_causal_boundary_sweep():
    """Every residue of the cached-prefix length Sk - Sq modulo the 16-wide tiles, for a multi-tile prefill
    (Sq * G = 68 rows) and a single-tile extend (20 rows): the unmasked/masked loop split must never let a row see
    a later key."""
    for sq in (17, 5):
        for offset in range(16):
            args = make_dense(1, 4, 1, sq, sq + offset, 32, 4, dtype=torch.float32, seed=offset)
            check(flash_lora_attention(**args), args)


@pytest.mark.parametrize("sq", [1, 40])
def test_every_autotune_config_is_correct(monkeypatch, sq):
    """Drive the CUDA launch path (autotuner, grid lambda, pruning) under the interpreter: the fake benchmark
    checks the output of every config against the reference (64/128-wide tiles, 2-8 warps)."""
    from lragent.kernels import _launch

    args = make_dense(1, 4, 2, sq, 50, 32, 8, dtype=torch.float32, key_lora=True, seed=13)
    want = flash_lora_attention_ref(**to_float64(args))
    out = torch.full_like(args["q"], float("nan"))
    seen = []

    def fake_bench(kernel_call, quantiles=None):
        out.fill_(float("nan"))
        kernel_call()
        seen.append((out.double() - want).abs().max().item())
        return [float(len(seen))] * 3

    monkeypatch.setattr(_launch, "AUTOTUNE", True)
    monkeypatch.setattr(_launch, "_TUNED", {})
    for prefill in (True, False):
        _launch._tuned(prefill)._do_bench = fake_bench
    flash_lora_attention(**args, out=out)  # Sq = 1: decode space (no split at Sk = 50); Sq = 40: prefill space
    bound = TOL[torch.float32] * max(1.0, want.abs().max().item())
    assert len(seen) == 8 and all(err <= bound for err in seen), seen
    check(out, args)
