"""Ahead-of-time compile of every Flash-LoRA-Attention kernel for sm_80 (A100) and sm_90 (H100), on the CPU.

The interpreter does not check tl.dot shape/dtype rules, layouts, shared memory or registers; a real compile does.
`python -m lragent.kernels.aot` runs triton.compile(ASTSource, target=GPUTarget("cuda", arch, 32)) through
TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas Triton ships (bin/ptxas for sm_80, bin/ptxas-blackwell for
sm_90a), in a subprocess with TRITON_INTERPRET=0. Head dim 64, rank 8 (padded to 16/32 inside) and small tiles
keep it quick; the production-size matrix (head dim 128, autotune tiles) is recorded in
benchmarks/results/aot_report.jsonl. Compiles are cached by Triton on content hash, so reruns are fast.

Each target compiles two (dtype, key-LoRA) combinations of each kernel and the two targets take complementary
halves: every kernel meets fp16 and bf16, with and without key LoRA, on each target, and the union is the full
product.
"""
import itertools
import json
import os
import subprocess
import sys

import pytest

KINDS = ["dense_prefill", "decode_splitk", "paged_prefill", "paged_decode_splitk"]
SMEM_LIMIT = {"sm_80": 166912, "sm_90": 232448}


@pytest.fixture(scope="module")
def reports():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    runs = {arch: subprocess.Popen([sys.executable, "-m", "lragent.kernels.aot", "--small", "--arch", str(arch)]
                                   + (["--flip"] if arch == 90 else []),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for arch in (80, 90)}
    records = []
    for arch, proc in runs.items():
        out, err = proc.communicate(timeout=900)
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert lines, f"sm_{arch}: no report (rc={proc.returncode}); stderr tail:\n{err[-3000:]}"
        records += lines
    return records


def test_every_kernel_compiles_to_cubin(reports):
    failed = [f"{r['arch']} {r['variant']}: {r.get('error')}" for r in reports if not r["ok"]]
    assert not failed, "\n".join(failed)
    for r in reports:
        assert "cubin" in r["stages"] and "ptx" in r["stages"], r
        assert r["shared"] <= SMEM_LIMIT[r["arch"]], f"{r['variant']} needs {r['shared']} B of shared memory"


def test_no_register_spills(reports):
    """Guards the decode layout pitfall (see rank_pad): a bad warp layout shows up as 255 registers + spills."""
    spilled = [f"{r['arch']} {r['variant']}: {r['regs']} regs, {r['stack_bytes']} B stack" for r in reports
               if r.get("stack_bytes", 0) > 0]
    assert not spilled, "\n".join(spilled)


def test_coverage_is_the_full_product(reports):
    seen = {(r["arch"], *(r["variant"].split("/") + [""])[:3]) for r in reports if r["ok"]}
    for arch in ("sm_80", "sm_90"):
        for kind in KINDS:
            dtypes = {d for a, k, d, _ in seen if a == arch and k == kind}
            loras = {lo for a, k, _, lo in seen if a == arch and k == kind}
            assert dtypes == {"fp16", "bf16"} and loras == {"v", "k+v"}, (arch, kind, dtypes, loras)
        assert (arch, "combine", "fp16") in {s[:3] for s in seen}
    union = {(k, d, lo) for _, k, d, lo in seen if k != "combine"}
    assert union == set(itertools.product(KINDS, ("fp16", "bf16"), ("v", "k+v")))
