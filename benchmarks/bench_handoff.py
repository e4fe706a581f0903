"""1-token hand-off latency of ``lrshared`` against ``fullshared``, and the arithmetic floor of the difference.

A hand-off that prefills one token (the previous role's last one) is one decode step in ``fullshared``; in
``lrshared`` the reading role must first expand K' = K + RoPE(L_k B_k) over the whole context with its own B_k:
2·n·r_role·H_kv·D flops per layer, on top of the step. This script measures both steps side by side on the trace
benchmark's random Llama (``workload.py``, 3 roles or ``--roles``, ``import-peft --share-a exact``), one torch
thread, repeats interleaved, over a fixed context already in the cache (each hand-off is a new request of another
role, so the workspace is empty), and sets the measured difference beside the time the expansion's flops take at
this core's measured fp32 GEMM rate (a large ``torch.mm``, the fastest fp32 arithmetic on the machine): the floor
that no kernel for this layout can go under on this core.

    python benchmarks/bench_handoff.py [--contexts 1024,4096,16384] [--repeats 8] [--roles 3] [--tiny]

Prints a table and writes ``benchmarks/results/handoff_floor.csv`` and ``handoff_floor.png``.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402
from report import save_figure, write_csv  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def gemm_gflops(repeats: int = 5) -> float:
    """fp32 GFLOP/s of a [2048, 1024] x [1024, 1024] torch.mm on this thread (median of ``repeats``)."""
    a, b = torch.randn(2048, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * 2048 * 1024 * 1024 / statistics.median(times) / 1e9


def measure(engines: dict, context: int, repeats: int, roles: list[str], vocab: int) -> tuple[dict, dict]:
    """TTFT (s) of ``repeats`` hand-offs per engine over one cached ``context``-token prompt, interleaved, and the
    most prompt tokens a hand-off prefilled per engine (1 when the whole prefix is reused; a full cache can leave
    a partial last block unshared)."""
    rng = random.Random(context)
    prompt = [1] + [rng.randrange(4, vocab) for _ in range(context - 1)]
    for e in engines.values():
        e.clear_cache()
        e.generate(prompt, roles[0], max_new_tokens=1, ignore_eos=True)
    out, prefilled = {m: [] for m in engines}, {m: 0 for m in engines}
    for i in range(repeats):
        for m, e in (list(engines.items()) if i % 2 == 0 else list(engines.items())[::-1]):
            c = e.generate(prompt, roles[1 + i % (len(roles) - 1)], max_new_tokens=1, ignore_eos=True)
            out[m].append(c.stats.ttft_s)
            prefilled[m] = max(prefilled[m], context - c.stats.reused_tokens)
    return out, prefilled


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--roles", type=int, default=3, help="adapters in the bundle (the hand-offs cycle through them)")
    ap.add_argument("--workdir", default="/tmp/lragent-bench")
    ap.add_argument("--tiny", action="store_true",
                    help="a 2-layer model of hidden 128 (a smoke run, not a measurement)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from lragent.serve import Engine

    if a.roles < 2:
        ap.error("--roles: at least 2 (a hand-off goes to another role)")
    spec = workload.Spec(roles=a.roles)
    if a.tiny:
        spec = workload.Spec(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, intermediate=256, vocab=512,
                             max_positions=2048, roles=a.roles, rank=8)
    paths = workload.prepare(spec, Path(a.workdir) / f"{'tiny' if a.tiny else 'random'}-r{a.roles}")
    engines = {m: Engine(paths["bundle"], mode=m) for m in ("fullshared", "lrshared")}
    for e in engines.values():
        e.warmup()
    gflops = gemm_gflops()
    rows = []
    for n in map(int, a.contexts.split(",")):
        t, pre = measure(engines, n, a.repeats, spec.role_names(), spec.vocab)
        full, lr = statistics.median(t["fullshared"]), statistics.median(t["lrshared"])
        flops = 2 * n * spec.rank * spec.kv_heads * spec.head_dim * spec.layers
        floor = flops / (gflops * 1e9)
        rows.append(dict(context=n, prefilled=" / ".join(str(pre[m]) for m in engines), fullshared_ms=full * 1e3,
                         lrshared_ms=lr * 1e3, ratio=lr / full, extra_ms=(lr - full) * 1e3,
                         expansion_mflop=flops / 1e6, gemm_gflops=gflops,
                         floor_ms=floor * 1e3, floor_ratio=(full + floor) / full,
                         fullshared_all=" ".join(f"{x * 1e3:.1f}" for x in t["fullshared"]),
                         lrshared_all=" ".join(f"{x * 1e3:.1f}" for x in t["lrshared"])))
        print(f"context {n}: done", flush=True)
    print(f"\nfp32 GEMM on this thread: {gflops:.1f} GFLOP/s; {a.repeats} hand-offs per mode, interleaved\n")
    print("| context | prefilled (full / lr) | fullshared ms | lrshared ms | ratio | extra ms | expansion MFLOP | "
          "floor ms | floor ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['prefilled']} | {r['fullshared_ms']:.1f} | {r['lrshared_ms']:.1f} | "
              f"{r['ratio']:.3f} | {r['extra_ms']:.1f} | {r['expansion_mflop']:.0f} | {r['floor_ms']:.1f} | "
              f"{r['floor_ratio']:.3f} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "handoff_floor.csv", rows)
    draw(rows, out / "handoff_floor.png")
    print(f"wrote {out}/handoff_floor.csv, handoff_floor.png")
    return 0


def draw(rows: list[dict], path: Path) -> None:
    """Measured lrshared/fullshared hand-off ratio and the flop floor's ratio against context."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [r["context"] for r in rows]
    ax.plot(x, [r["ratio"] for r in rows], marker="o", label="measured lrshared / fullshared")
    ax.plot(x, [r["floor_ratio"] for r in rows], marker="s", ls="--", label="floor: + expansion flops at GEMM peak")
    ax.axhline(1.10, color="k", lw=0.8, ls=":", label="1.10")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("1-token hand-off TTFT ratio")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
