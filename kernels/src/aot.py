"""Ahead-of-time compile of the Flash-LoRA-Attention kernels for real GPU targets, without a GPU.

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))`` runs the whole NVIDIA
pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin via the ptxas Triton ships), so it enforces what the CPU
interpreter does not: tl.dot shape/dtype rules, layouts, shared-memory and register allocation.

Run ``python -m lragent.kernels.aot [--arch 80 90] [--all | --flip] [--small] [--out FILE]`` with TRITON_INTERPRET
unset (the interpreter replaces the kernels by interpreted functions); it prints one JSON line per variant: stages
produced, shared memory, and registers / stack (spill) bytes per thread read back with cuobjdump.
"""
import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

_PTR = ["q_ptr", "k_ptr", "v_ptr", "o_ptr", "lrv_ptr", "bv_ptr", "lrk_ptr", "bk_ptr", "cos_ptr", "sin_ptr"]
_IDX = ["aid_ptr", "bt_ptr", "lbt_ptr", "cuq_ptr", "seqlen_ptr"]
_PART = ["part_o_ptr", "part_lse_ptr"]
_INTS = ["s_qb", "s_qt", "s_qh", "s_ob", "s_ot", "s_oh", "s_kb", "s_kt", "s_kh", "s_vb", "s_vt", "s_vh",
         "s_lvb", "s_lvt", "s_lkb", "s_lkt", "s_bvn", "s_bvh", "s_bvr", "s_bkn", "s_bkh", "s_bkr", "s_cs", "s_bt",
         "s_lbt", "Sq", "Sk", "H_KV"]
_TAIL = ["split_len", "NUM_SPLITS", "MQ_BUCKET", "SK_BUCKET"]

# (name, kwargs of the fwd kernel): G=4 (GQA 32/8), head_dim 128, rank 16, tiles from the autotune space.
KINDS = {
    "dense_prefill": dict(PAGED=False, VARLEN=False, SPLIT=False, BLOCK_M=128, BLOCK_N=64, num_warps=8,
                          num_stages=2),
    "decode_splitk": dict(PAGED=False, VARLEN=False, SPLIT=True, BLOCK_M=16, BLOCK_N=64, num_warps=4,
                          num_stages=3),
    "paged_prefill": dict(PAGED=True, VARLEN=True, SPLIT=False, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    "paged_decode_splitk": dict(PAGED=True, VARLEN=True, SPLIT=True, BLOCK_M=16, BLOCK_N=64, num_warps=4,
                                num_stages=2),
}
# Shared memory a block may use (opt-in maximum): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 166912, 90: 232448}


def _dtype_name(dtype):
    return {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}[dtype]


def fwd_source(kind, dtype="fp16", key_lora=True, head_dim=128, rank=16, group=4, page=16, **overrides):
    """ASTSource and compile options of one forward-kernel variant (``overrides``: constexprs, num_warps/stages)."""
    from triton.compiler import ASTSource
    from ._launch import rank_pad
    from ._triton_attn import flash_lora_fwd_kernel
    const = dict(R=rank, G=group, HEAD_DIM=head_dim, BLOCK_D=head_dim, PAGE=page, LR_PAGE=page,
                 HAS_LR_V=True, HAS_LR_K=key_lora, CAUSAL=True, DOT_PREC="tf32" if dtype != "fp32" else "ieee")
    const.update(KINDS[kind])
    const["R_PAD"] = rank_pad(rank, decode=const["BLOCK_M"] <= 16)
    const.update(overrides)
    opts = {"num_warps": const.pop("num_warps"), "num_stages": const.pop("num_stages")}
    sig = {n: "*" + _dtype_name(dtype) for n in _PTR}
    sig.update({"bv_ptr": "*fp32", "bk_ptr": "*fp32"})  # B may stay fp32; cos/sin come in the model dtype
    sig.update({n: "*i32" for n in _IDX})
    sig.update({n: "*fp32" for n in _PART})
    sig.update({n: "i32" for n in _INTS})
    sig["qk_scale"] = "fp32"
    sig.update({n: "i32" for n in _TAIL})
    sig.update({n: "constexpr" for n in const})
    return ASTSource(fn=flash_lora_fwd_kernel, signature=sig, constexprs=const,
                     attrs=_aligned(flash_lora_fwd_kernel, sig, _UNALIGNED)), opts


# Integer arguments that are usually not multiples of 16 at run time (everything else gets the divisibility-16 hint
# the JIT derives from 16-byte aligned pointers and strides such as D, H*D, block_size*H*D, r=16).
_UNALIGNED = {"s_bt", "s_lbt", "Sq", "Sk", "H_KV", "NUM_SPLITS", "MQ_BUCKET", "qk_scale"}


def _aligned(fn, sig, unaligned):
    """Divisibility attributes in the form triton.compile expects: {(arg_index,): [["tt.divisibility", 16]]}."""
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
            if t != "constexpr" and n not in unaligned and t != "fp32"}


def combine_source(group=4, head_dim=128, block_m=16, dtype="fp16"):
    from triton.compiler import ASTSource
    from ._triton_attn import flash_lora_combine_kernel
    sig = {"o_ptr": "*" + _dtype_name(dtype), "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "cuq_ptr": "*i32"}
    sig.update({n: "i32" for n in ["s_ob", "s_ot", "s_oh", "Sq", "H_KV", "NUM_SPLITS"]})
    const = dict(G=group, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=block_m, VARLEN=True)
    sig.update({n: "constexpr" for n in const})
    attrs = _aligned(flash_lora_combine_kernel, sig, {"Sq", "H_KV", "NUM_SPLITS"})
    return ASTSource(fn=flash_lora_combine_kernel, signature=sig, constexprs=const, attrs=attrs), {"num_warps": 4}


def compile_one(src, opts, arch):
    """Compile for sm_<arch>; returns a summary (stages produced, shared memory, registers if reported)."""
    import triton
    from triton.backends.compiler import GPUTarget
    t0 = time.time()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    md = compiled.metadata
    return {"arch": f"sm_{arch}", "stages": sorted(compiled.asm.keys()), "shared": md.shared,
            "num_warps": md.num_warps, **resource_usage(compiled.asm["cubin"]), "seconds": round(time.time() - t0, 2)}


def resource_usage(cubin):
    """Registers and stack (spill) bytes per thread, read with the cuobjdump Triton ships (empty if absent)."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return {"regs": int(found.group(1)), "stack_bytes": int(found.group(2))} if found else {}


SMALL = dict(head_dim=64, rank=8, BLOCK_N=32, num_stages=2)  # fast-compiling shapes for the test suite


def variants(full=False, flip=False, small=False):
    """(label, source-builder) pairs. ``full``: every kernel x {fp16, bf16} x {with, without key LoRA}. Otherwise
    two combinations per kernel, alternating so that every kernel meets both dtypes and both key-LoRA settings;
    ``flip`` takes the complementary two (so two targets together cover the full product)."""
    out = []
    extra = dict(SMALL) if small else {}
    for i, kind in enumerate(KINDS):
        combos = list(itertools.product(("fp16", "bf16"), (False, True)))
        if not full:
            even = (i % 2 == 0) != flip
            combos = [("fp16", even), ("bf16", not even)]
        for dtype, key_lora in combos:
            label = f"{kind}/{dtype}/{'k+v' if key_lora else 'v'}" + ("/small" if small else "")
            over = dict(extra)
            if small and KINDS[kind]["BLOCK_M"] > 64:
                over["BLOCK_M"] = 64
            out.append((label, lambda kind=kind, dtype=dtype, key_lora=key_lora, over=over:
                        fwd_source(kind, dtype, key_lora, **over)))
    d = SMALL["head_dim"] if small else 128
    out.append(("combine/fp16", lambda: combine_source(dtype="fp16", head_dim=d)))
    out.append(("combine/bf16", lambda: combine_source(dtype="bf16", head_dim=d)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--all", action="store_true", help="every kernel x dtype x key-LoRA combination")
    ap.add_argument("--flip", action="store_true", help="the complementary subset (without --all)")
    ap.add_argument("--small", action="store_true", help="head_dim 64, rank 8, small tiles (quick)")
    ap.add_argument("--only", default="", help="substring filter on the variant label")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("aot: unset TRITON_INTERPRET (the interpreter replaces the kernels)")
    import triton
    failed = 0
    for arch in args.arch:
        for label, build in variants(args.all, args.flip, args.small):
            if args.only not in label:
                continue
            rec = {"variant": label, "arch": f"sm_{arch}", "triton": triton.__version__}
            try:
                rec.update(ok=True, **compile_one(*build(), arch))
                rec["fits_smem"] = rec["shared"] <= SMEM_LIMIT[arch]
            except Exception as exc:  # report every failure, keep going
                failed += 1
                rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-2000:]}")
            line = json.dumps(rec)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
