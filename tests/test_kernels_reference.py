"""The torch references themselves, held against independent formulations (no Triton involved).

* dense reference == SDPA on K', V' materialised head by head with explicit RoPE (float64, tolerance 1e-10);
* the LoRA-V reorder the kernel relies on: softmax(S) (V + L B) == P V + (P L) B (float64, 1e-10);
* paged reference == dense reference on the same data scattered into shuffled blocks (float64, 1e-10), including
  the baseshared layout with a separate low-rank block table, and poisoned (NaN) unused slots.
"""
import math

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lragent.kernels import flash_lora_attention_paged_ref, flash_lora_attention_ref
from support.kernels import make_dense, rope_tables, to_float64

TOL64 = 1e-10


def _naive(q, k, v, lr_v, b_v, ids, lr_k=None, b_k=None, cos=None, sin=None, causal=True):
    """Per (batch, head) loops, RoPE written with explicit pair rotation, attention by SDPA."""
    batch, heads, sq, d = q.shape
    h_kv, sk = k.shape[1], k.shape[2]
    half = d // 2
    out = torch.empty_like(q)
    for b in range(batch):
        a = int(ids[b])
        for h in range(heads):
            g = h // (heads // h_kv)
            kk, vv = k[b, g].clone(), v[b, g] + lr_v[b] @ b_v[a, g]
            if lr_k is not None:
                u = lr_k[b] @ b_k[a, g]
                c, s = cos[:sk], sin[:sk]
                rot = torch.cat((u[:, :half] * c[:, :half] - u[:, half:] * s[:, :half],
                                 u[:, half:] * c[:, half:] + u[:, :half] * s[:, half:]), dim=-1)
                kk = kk + rot
            mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq) if causal else None
            out[b, h] = F.scaled_dot_product_attention(q[b, h][None], kk[None], vv[None], attn_mask=mask)[0]
    return out


@pytest.mark.parametrize("key_lora", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_dense_reference_matches_naive(key_lora, causal):
    a = to_float64(make_dense(3, 4, 2, 5, 23, 16, 6, key_lora=key_lora, seed=1))
    got = flash_lora_attention_ref(**a, causal=causal)
    want = _naive(a["q"], a["k"], a["v"], a["lr_v"], a["b_v"], a["agent_ids"], a.get("lr_k"), a.get("b_k"),
                  a.get("cos"), a.get("sin"), causal=causal)
    torch.testing.assert_close(got, want, atol=TOL64, rtol=0)


def test_value_lora_reorder_is_exact():
    """O = P (V + L B) == P V + (P L) B: the identity behind the second r-wide accumulator."""
    a = to_float64(make_dense(2, 2, 1, 4, 9, 8, 3, seed=2))
    base = flash_lora_attention_ref(a["q"], a["k"], a["v"])
    full = flash_lora_attention_ref(**a)
    scores = torch.einsum("bhqd,bhkd->bhqk", a["q"], a["k"].repeat_interleave(2, 1)) / math.sqrt(8)
    mask = torch.ones(4, 9, dtype=torch.bool).tril(5)
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    pl = torch.einsum("bhqk,bkr->bhqr", p, a["lr_v"])
    bv = a["b_v"][a["agent_ids"]].repeat_interleave(2, 1)  # [B, H, r, D]
    torch.testing.assert_close(full, base + pl @ bv, atol=TOL64, rtol=0)


def test_rope_tables_follow_hf_convention():
    cos, sin = rope_tables(7, 8)
    assert torch.equal(cos[:, :4], cos[:, 4:]) and torch.equal(sin[:, :4], sin[:, 4:])
    assert torch.allclose(cos[3, 1], torch.tensor(math.cos(3 / 10000 ** (2 / 8))))


def _scatter(x, block_size, perm_seed):
    """[B, S, ...] -> paged cache [num_blocks, block_size, ...] with shuffled blocks, NaN elsewhere, and the table."""
    batch, s = x.shape[:2]
    per = -(-s // block_size)
    gen = torch.Generator().manual_seed(perm_seed)
    perm = torch.randperm(batch * per + 2, generator=gen)
    cache = torch.full((batch * per + 2, block_size, *x.shape[2:]), float("nan"), dtype=x.dtype)
    table = perm[:batch * per].view(batch, per).int()
    for b in range(batch):
        for j in range(per):
            rows = x[b, j * block_size:(j + 1) * block_size]
            cache[table[b, j], :rows.shape[0]] = rows
    return cache, table


@pytest.mark.parametrize("separate_lr", [False, True])
def test_paged_reference_matches_dense_reference(separate_lr):
    batch, heads, h_kv, sq, sk, d, r = 2, 4, 2, 3, 21, 16, 5
    a = to_float64(make_dense(batch, heads, h_kv, sq, sk, d, r, key_lora=True, seed=3))
    want = flash_lora_attention_ref(**a)
    k_cache, table = _scatter(a["k"].transpose(1, 2), 4, 0)
    v_cache, _ = _scatter(a["v"].transpose(1, 2), 4, 0)
    lr_v, lr_table = _scatter(a["lr_v"], 8 if separate_lr else 4, 1 if separate_lr else 0)
    lr_k, _ = _scatter(a["lr_k"], 8 if separate_lr else 4, 1 if separate_lr else 0)
    got = flash_lora_attention_paged_ref(
        a["q"].transpose(1, 2).reshape(batch * sq, heads, d), k_cache, v_cache, table,
        torch.full((batch,), sk, dtype=torch.int32), torch.arange(batch + 1, dtype=torch.int32) * sq,
        lr_v_cache=lr_v, b_v=a["b_v"], agent_ids=a["agent_ids"], lr_block_table=lr_table if separate_lr else None,
        lr_k_cache=lr_k, b_k=a["b_k"], cos=a["cos"], sin=a["sin"])
    torch.testing.assert_close(got.view(batch, sq, heads, d).transpose(1, 2), want, atol=TOL64, rtol=0)


def test_kernels_and_references_share_signatures():
    import inspect

    import lragent.kernels as K
    from lragent.kernels import flash_lora
    for name in ("flash_lora_attention", "flash_lora_attention_paged"):   # each defined on its own
        ref = getattr(K, name + "_ref")
        assert inspect.signature(getattr(flash_lora, name)) == inspect.signature(ref)
    assert inspect.signature(K.flash_lora_attention_paged_cpu) == inspect.signature(K.flash_lora_attention_paged_ref)
    # the lazy public name forwards to the Triton wrapper (its signature is copied from the reference, so compare
    # what it computes, not its signature)
    a = make_dense(1, 2, 1, 3, 9, 16, 4)
    torch.testing.assert_close(K.flash_lora_attention(**a), flash_lora.flash_lora_attention(**a), rtol=0, atol=0)


def test_reference_reports_every_problem():
    a = make_dense(2, 3, 2, 4, 3, 8, 4, key_lora=True)
    a["lr_k"] = a["lr_k"][:, :, :2]
    a.pop("cos")
    with pytest.raises(ValueError) as err:
        flash_lora_attention_ref(**a)
    msg = str(err.value)
    assert "multiple of KV heads" in msg and "Sq <= Sk" in msg and "cos and sin" in msg and "same rank" in msg


def test_import_without_triton_uses_references():
    """`import lragent.kernels` must work where Triton is absent; the kernels then say to use the references."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None\n"
            "import lragent.kernels as K\n"
            "from support.kernels import make_dense\n"
            "a = make_dense(1, 2, 1, 1, 5, 8, 2)\n"
            "assert K.flash_lora_attention_ref(**a).shape == (1, 2, 1, 8) and not K.triton_available()\n"
            "try:\n    K.flash_lora_attention(**a)\nexcept ImportError as e:\n    assert '_ref' in str(e)\n"
            "else:\n    raise SystemExit('kernel ran without triton')\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
