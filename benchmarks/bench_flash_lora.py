"""Benchmark Flash-LoRA-Attention against base-only attention and against materialising K', V' per role.

Paths (every batch row uses its own role: agent_ids cycle over 3 stacked adapters):
  base_sdpa     plain attention on the shared base K/V only (torch SDPA, GQA native) - the lower bound
  base_triton   our kernel with no adapter terms (isolates the kernel's own quality from the LoRA overhead)
  materialise   V' = V + L_v B_v[role] (and K' = K + RoPE(L_k B_k[role])) per row, then SDPA - what an engine
                without Flash-LoRA-Attention has to do on a shared cache
  flash_lora    lragent.kernels.flash_lora_attention (values, plus keys with --key-lora)
Decode: Sq = 1, Sk 1K-32K, batch 1-32. Extend: Sq 16-1024 over Sk up to 16K (causal, bottom-right).

Prints a table, appends CSV rows to benchmarks/results/flash_lora_<device>.csv (device, versions, shapes, median
ms, achieved GB/s = bytes the path must move / time) and writes a plot next to it (needs matplotlib). Without a GPU
it times the torch reference paths on small shapes only, and says so: those numbers say nothing about the kernel.

    python benchmarks/bench_flash_lora.py [--mode decode|extend|all] [--rank 16] [--key-lora] [--quick]
"""
import argparse
import csv
import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lragent.kernels import flash_lora_attention, flash_lora_attention_ref
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.kernels import make_dense  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HEADS, KV_HEADS, HEAD_DIM, AGENTS = 32, 8, 128, 3


def shapes(mode, gpu, quick):
    """(mode, batch, Sq, Sk) grid: the issue's grid on a GPU, a small one for the CPU reference paths."""
    if not gpu:
        dec = [("decode", b, 1, sk) for b in (1, 4) for sk in (1024, 4096)]
        ext = [("extend", 1, sq, 2048) for sq in (16, 128)]
    elif quick:
        dec = [("decode", b, 1, sk) for b in (1, 8) for sk in (4096, 16384)]
        ext = [("extend", 1, sq, 8192) for sq in (16, 256)]
    else:
        dec = [("decode", b, 1, sk) for b in (1, 8, 32) for sk in (1024, 4096, 8192, 16384, 32768)]
        ext = [("extend", 1, sq, sk) for sk in (4096, 16384) for sq in (16, 128, 512, 1024)]
    return (dec if mode in ("decode", "all") else []) + (ext if mode in ("extend", "all") else [])


def sdpa(q, k, v):
    """Plain attention, bottom-right causal, GQA without expanding K/V."""
    sq, sk = q.shape[2], k.shape[2]
    if sq == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    from torch.nn.attention.bias import causal_lower_right
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(sq, sk), enable_gqa=True)


def materialise(a):
    """Per-row K', V' at full width (the cost Flash-LoRA-Attention avoids), then plain attention."""
    v = a["v"] + torch.einsum("bsr,bhrd->bhsd", a["lr_v"], a["b_v"][a["agent_ids"]])
    k = a["k"]
    if "lr_k" in a:
        u = torch.einsum("bsr,bhrd->bhsd", a["lr_k"], a["b_k"][a["agent_ids"]])
        u1, u2 = u.chunk(2, dim=-1)
        k = k + u * a["cos"][: k.shape[2]] + torch.cat((-u2, u1), dim=-1) * a["sin"][: k.shape[2]]
    return sdpa(a["q"], k, v)


def paths(a, gpu):
    base = {n: a[n] for n in ("q", "k", "v")}
    out = {"base_sdpa": lambda: sdpa(a["q"], a["k"], a["v"]), "materialise": lambda: materialise(a)}
    if gpu:
        out["base_triton"] = lambda: flash_lora_attention(**base)
        out["flash_lora"] = lambda: flash_lora_attention(**a)
    else:
        out["flash_lora_ref"] = lambda: flash_lora_attention_ref(**a)
    return out


def bytes_moved(path, a):
    """Minimum DRAM traffic of a path: inputs read once, output written once; materialise also writes and
    re-reads K', V' (and reads B, L)."""
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    base = size(a["q"]) * 2 + size(a["k"]) + size(a["v"])
    lora = sum(size(a[n]) for n in ("lr_v", "lr_k") if n in a)
    if path.startswith("base"):
        return base
    if path == "materialise":
        return base + lora + 2 * (size(a["v"]) + (size(a["k"]) if "lr_k" in a else 0))
    return base + lora


def timer(fn, gpu):
    """Median milliseconds: triton.testing.do_bench on a GPU, wall clock over a few runs on the CPU."""
    if gpu:
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(runs)


def device_info(gpu):
    if gpu:
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args):
    gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
    device = device_info(gpu)
    if not gpu:
        print("No CUDA GPU (or TRITON_INTERPRET=1): timing the torch REFERENCE paths on small shapes only. "
              "These numbers are not kernel results; run on a GPU for those.")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    dtype = torch.bfloat16 if gpu else torch.float32
    rows = []
    for mode, batch, sq, sk in shapes(args.mode, gpu, args.quick):
        a = make_dense(batch, HEADS, KV_HEADS, sq, sk, HEAD_DIM, args.rank, n_agents=AGENTS, dtype=dtype,
                       key_lora=args.key_lora, device="cuda" if gpu else "cpu")
        times = {}
        for path, fn in paths(a, gpu).items():
            ms = timer(fn, gpu)
            times[path] = ms
            rows.append(dict(time=datetime.datetime.now().isoformat(timespec="seconds"), device=device,
                             torch=torch.__version__, triton=triton_version, dtype=str(dtype).split(".")[-1],
                             mode=mode, batch=batch, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                             rank=args.rank, key_lora=int(args.key_lora), sq=sq, sk=sk, path=path,
                             median_ms=round(ms, 5), gbps=round(bytes_moved(path, a) / ms / 1e6, 2)))
        base = min(times[p] for p in times if p.startswith("base"))
        for r in rows[-len(times):]:
            r["x_base"] = round(r["median_ms"] / base, 3)
        del a
        if gpu:
            torch.cuda.empty_cache()
    return device, rows


def print_table(rows):
    keys = sorted({(r["mode"], r["batch"], r["sq"], r["sk"]) for r in rows})
    names = list(dict.fromkeys(r["path"] for r in rows))
    header = f"{'mode':7} {'B':>3} {'Sq':>5} {'Sk':>6} " + " ".join(f"{n + ' ms':>16}" for n in names)
    header += "  lora/base  mat/lora"
    print(header)
    for key in keys:
        cell = {r["path"]: r for r in rows if (r["mode"], r["batch"], r["sq"], r["sk"]) == key}
        line = f"{key[0]:7} {key[1]:>3} {key[2]:>5} {key[3]:>6} "
        line += " ".join(f"{cell[n]['median_ms']:>16.4f}" if n in cell else f"{'-':>16}" for n in names)
        lora = cell.get("flash_lora") or cell.get("flash_lora_ref")
        line += f"  {lora['x_base']:>9.2f}  {cell['materialise']['median_ms'] / lora['median_ms']:>8.2f}"
        print(line)


def write_csv(rows, path):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


def plot(rows, path, device):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)")
        return
    modes = [m for m in ("decode", "extend") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r["mode"] == mode]
        batch = max(r["batch"] for r in sel)
        sel = [r for r in sel if r["batch"] == batch]
        x = "sk" if mode == "decode" else "sq"
        for name in dict.fromkeys(r["path"] for r in sel):
            pts = sorted((r[x], r["median_ms"]) for r in sel if r["path"] == name and
                         (mode == "decode" or r["sk"] == max(s["sk"] for s in sel)))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("Sk (keys)" if x == "sk" else f"Sq (new tokens, Sk={max(s['sk'] for s in sel)})")
        ax.set_ylabel("median ms")
        ax.set_title(f"{mode}, batch {batch}, H={HEADS}/{KV_HEADS}, D={HEAD_DIM}, r={rows[0]['rank']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{device}: torch reference paths only, not kernel timings" if device.startswith("cpu") else device)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["decode", "extend", "all"], default="all")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--key-lora", action="store_true", help="also put LoRA on the keys (RoPE'd in the kernel)")
    ap.add_argument("--quick", action="store_true", help="a few GPU shapes only")
    ap.add_argument("--out-dir", default=RESULTS)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    device, rows = run(args)
    print_table(rows)
    os.makedirs(args.out_dir, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device.split(" (")[0].lower()).strip("-")
    stem = os.path.join(args.out_dir, f"flash_lora_{slug}")
    write_csv(rows, stem + ".csv")
    print(f"csv: {stem}.csv ({len(rows)} rows appended)")
    if not args.no_plot:
        plot(rows, stem + f"_r{args.rank}{'_k' if args.key_lora else ''}.png", device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
