"""Launch logic shared by the dense and paged/varlen Flash-LoRA-Attention entry points.

Both calls reduce to one launch description (`_Problem`) and go through `_launch`, which picks

* the *decode* path when all query rows of one (sequence, KV head) fit one tile (Sq * G <= 64): one M tile, the
  keys split across ``num_splits`` programs (split-K) whose partial outputs and log2-sum-exps are merged by
  `flash_lora_combine_kernel` (no split when the batch alone fills the GPU);
* the *prefill/extend* path otherwise: tiles of BLOCK_M query rows over all visible keys.

On CUDA the block sizes are autotuned (keyed on the problem's size class); under ``TRITON_INTERPRET=1`` fixed small
tiles are used, and bf16 inputs are computed from fp32 copies because the interpreter mishandles bf16.
"""
import dataclasses
import math

import torch

from .limits import triton_unsupported
import triton

from ._triton_attn import flash_lora_combine_kernel, flash_lora_fwd_kernel

INTERPRETED = not isinstance(flash_lora_fwd_kernel, triton.runtime.jit.JITFunction)
AUTOTUNE = not INTERPRETED  # the interpreter uses fixed 16-wide tiles (tests may switch autotuning on)
INTERP_BLOCK = 16
DECODE_MAX_ROWS = 64
_LOG2E = 1.4426950408889634
_TUNE_KEY = ["G", "HEAD_DIM", "R_PAD", "PAGED", "VARLEN", "SPLIT", "HAS_LR_V", "HAS_LR_K", "CAUSAL",
             "MQ_BUCKET", "SK_BUCKET"]


def rank_pad(r, decode=False):
    """Rank width the kernel computes with: a power of two >= 16 (tl.dot needs K, N >= 16 for 16-bit inputs).

    The decode tile has only 16 query rows, so its 4 warps are laid side by side along the dot's N axis; the P L_v
    dot must be at least 32 wide for that, or Triton lays the warps along M for the whole dot chain and every warp
    recomputes the full tile (found with the sm_90 ahead-of-time compile, see aot.py).
    """
    return max(32 if decode else 16, triton.next_power_of_2(max(r, 1)))


def _prune(configs, named_args, **kwargs):
    """Drop tiles that cannot fit on-chip for wide heads / high ranks (keeps at least one config)."""
    d, r_pad = kwargs["HEAD_DIM"], kwargs["R_PAD"]
    keep = [c for c in configs
            if not (d >= 256 and (c.kwargs.get("BLOCK_M", 0) > 64 or c.kwargs["BLOCK_N"] > 64))
            and not (r_pad >= 128 and c.kwargs.get("BLOCK_M", 0) > 64)]
    return keep or configs[-1:]


def _configs(prefill):
    """Autotune space. Prefill: (BLOCK_M, BLOCK_N, warps, stages) with >= 16 rows per warp. Decode (BLOCK_M fixed
    at 16-64): (BLOCK_N, warps, stages) with at most 4 warps, so that 8 * warps <= R_PAD (see rank_pad)."""
    C = triton.Config
    if prefill:
        shapes = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                  (64, 32, 4, 4), (64, 128, 4, 2), (64, 64, 4, 2)]
        return [C({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]
    shapes = [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3), (32, 4, 3), (32, 2, 3), (64, 2, 3)]
    return [C({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in shapes]


_TUNED = {}


def _tuned(prefill):
    """Autotuned wrapper of the forward kernel (created on first CUDA use)."""
    if prefill not in _TUNED:
        _TUNED[prefill] = triton.autotune(_configs(prefill), key=_TUNE_KEY,
                                          prune_configs_by={"early_config_prune": _prune})(flash_lora_fwd_kernel)
    return _TUNED[prefill]


_SM_COUNT = {}


def _sm_count(device):
    if device.type != "cuda":
        return 1
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]


def choose_splits(n_programs, max_k, device):
    """Split-K factor for decode: enough programs for ~2 waves, at least 256 keys per split, at most 64 splits."""
    want = -(-2 * _sm_count(device) // max(n_programs, 1))
    return max(1, min(want, -(-max_k // 256), 64))


@dataclasses.dataclass
class _Problem:
    """Everything one launch needs: tensors, their (block/batch, token, head) strides and the problem sizes."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_strides: tuple
    o_strides: tuple
    k_strides: tuple
    v_strides: tuple
    batch: int
    n_heads: int
    h_kv: int
    max_q: int
    max_k: int
    sq: int = 0
    sk: int = 0
    page: int = 1
    lr_page: int = 1
    paged: bool = False
    varlen: bool = False
    lr_v: torch.Tensor = None
    lr_k: torch.Tensor = None
    lr_strides: tuple = (0, 0, 0, 0)
    b_v: torch.Tensor = None
    b_k: torch.Tensor = None
    cos: torch.Tensor = None
    sin: torch.Tensor = None
    agent_ids: torch.Tensor = None
    block_table: torch.Tensor = None
    lr_block_table: torch.Tensor = None
    cu_seqlens_q: torch.Tensor = None
    seq_lens: torch.Tensor = None
    r: int = 0


def _last_contig(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _launch(p, causal, softmax_scale, num_splits):
    d = p.q.shape[-1]
    group = p.n_heads // p.h_kv
    rows = p.max_q * group
    dummy = p.q
    b_v = p.b_v if p.b_v is not None else dummy
    b_k = p.b_k if p.b_k is not None else dummy
    bv_s = p.b_v.stride()[:3] if p.b_v is not None else (0, 0, 0)
    bk_s = p.b_k.stride()[:3] if p.b_k is not None else (0, 0, 0)
    bt_s = p.block_table.stride(0) if p.paged else 0
    lbt_s = p.lr_block_table.stride(0) if p.paged else 0
    cs_s = p.cos.stride(0) if p.cos is not None else 0
    decode = rows <= DECODE_MAX_ROWS
    r_pad = rank_pad(p.r, decode)
    if num_splits is None:
        num_splits = choose_splits(p.batch * p.h_kv, p.max_k, p.q.device) if decode else 1
    if num_splits > 1:
        if not decode:
            raise ValueError(f"split-K needs Sq * H / H_kv <= {DECODE_MAX_ROWS}, got {rows}")
        align = 128 if AUTOTUNE else INTERP_BLOCK  # a multiple of every BLOCK_N
        split_len = -(-(-(-p.max_k // num_splits)) // align) * align
        num_splits = max(1, -(-p.max_k // split_len))
    else:
        split_len = max(p.max_k, 1)
    split = num_splits > 1
    block_m = max(16, triton.next_power_of_2(rows)) if decode else INTERP_BLOCK
    block_d = triton.next_power_of_2(d)
    n_mb = max(1, -(-rows // block_m))
    part_o = part_lse = dummy
    if split:
        n_rows = n_mb * p.batch * p.h_kv * num_splits * block_m
        part_o = torch.empty(n_rows, block_d, device=p.q.device, dtype=torch.float32)
        part_lse = torch.empty(n_rows, device=p.q.device, dtype=torch.float32)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    args = (p.q, p.k, p.v, p.o, _or(p.lr_v, dummy), b_v, _or(p.lr_k, dummy), b_k, _or(p.cos, dummy),
            _or(p.sin, dummy), _or(p.agent_ids, dummy), _or(p.block_table, dummy), _or(p.lr_block_table, dummy),
            _or(p.cu_seqlens_q, dummy), _or(p.seq_lens, dummy), part_o, part_lse,
            *p.q_strides, *p.o_strides, *p.k_strides, *p.v_strides, *p.lr_strides, *bv_s, *bk_s, cs_s, bt_s, lbt_s,
            p.sq, p.sk, p.h_kv, scale * _LOG2E, split_len, num_splits,
            triton.next_power_of_2(max(p.max_q, 1)), triton.next_power_of_2(max(p.max_k, 1)))
    meta = dict(R=p.r, G=group, HEAD_DIM=d, BLOCK_D=block_d, R_PAD=r_pad, PAGE=p.page, LR_PAGE=p.lr_page,
                PAGED=p.paged, VARLEN=p.varlen, SPLIT=split, HAS_LR_V=p.lr_v is not None, HAS_LR_K=p.lr_k is not None,
                CAUSAL=bool(causal), DOT_PREC="ieee" if p.q.dtype == torch.float32 else "tf32")
    if not AUTOTUNE:
        grid = (n_mb, p.batch * p.h_kv, num_splits)
        flash_lora_fwd_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=INTERP_BLOCK)
    elif decode:
        _tuned(False)[(n_mb, p.batch * p.h_kv, num_splits)](*args, **meta, BLOCK_M=block_m)
    else:
        grid = lambda m: (triton.cdiv(rows, m["BLOCK_M"]), p.batch * p.h_kv, 1)  # noqa: E731
        _tuned(True)[grid](*args, **meta)
    if split:
        flash_lora_combine_kernel[(n_mb, p.batch * p.h_kv)](
            p.o, part_o, part_lse, _or(p.cu_seqlens_q, dummy), *p.o_strides, p.sq, p.h_kv, num_splits,
            G=group, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, VARLEN=p.varlen)
    return p.o


def _or(t, default):
    return default if t is None else t


def _ready(tensors, key_lora):
    """Device, dtype and head-dim gate. Returns the compute dtype override (fp32 for bf16 under the interpreter)
    or None. Head dims 16..256 (32..256 with key LoRA, whose dots run over half the head dim: tl.dot needs K >= 16)."""
    q = tensors[0]
    d = q.shape[-1]
    why = triton_unsupported(d, 0, key_lora)
    if why is not None:
        raise ValueError(f"flash_lora_attention cannot run this shape: {why}; use the _ref function instead")
    if not INTERPRETED and q.device.type != "cuda":
        raise RuntimeError("flash_lora_attention needs CUDA tensors; on CPU use flash_lora_attention_ref / "
                           "flash_lora_attention_paged_ref, or set TRITON_INTERPRET=1 before importing lragent.kernels")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"flash_lora_attention supports fp16/bf16/fp32 inputs, got {q.dtype}")
    for t in tensors[1:]:
        if t is not None and t.dtype != q.dtype:
            raise TypeError(f"k/v and the low-rank caches must have q's dtype {q.dtype}, got {t.dtype}")
    return torch.float32 if INTERPRETED and q.dtype == torch.bfloat16 else None


def _as(t, dtype):
    return t if t is None or dtype is None else t.to(dtype)
