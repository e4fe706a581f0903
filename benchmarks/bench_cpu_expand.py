"""Where the CPU expansion kernel's time goes: K' = K + RoPE(L_k B_k) with fused decode scores, against the score pass
over base K that ``fullshared`` runs instead.

Per layer over n context rows of the trace benchmark's shape (4 KV heads of 64, 16 query heads, one thread), rows
read by index from a paged cache as the engine does, RoPE rows of half width (HF tables), K' written into the
engine's workspace arena; the layers' caches differ, a 64 MB buffer is read before each step (in the engine the
model's weights stream through the cache between two attention calls), repeats interleaved:

  scores                     cpu_native.decode_scores over base K (what a fullshared decode step does per layer)
  expand r=R, streamed       cpu_native.expand_rows into workspace rows by non-temporal stores, with the decode
                             scores, the role's rank R: lrshared's 1-token hand-off
  expand r=R, cached stores  the same rows written by ordinary stores
  expand r=R, not stored     the scores only (K' never written)
  expand r=1, streamed       the same bytes moved with (almost) no L·B arithmetic

    python benchmarks/bench_cpu_expand.py [--context 4096] [--rank 16] [--repeats 15]

Prints a table and writes ``benchmarks/results/cpu_expand.csv`` and ``cpu_expand.png``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from lragent.kernels import cpu_native
from lragent.kernels.cpu_workspace import Workspace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import save_figure, write_csv  # noqa: E402
from workload import Spec  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
SPEC = Spec()                                   # the trace benchmark's model shape
LAYERS, KV, D, G, BLOCK = SPEC.layers, SPEC.kv_heads, SPEC.head_dim, SPEC.heads // SPEC.kv_heads, 16


def setup(n: int, rank: int, roles: int = 3) -> dict:
    """Paged caches for LAYERS layers, a block table, low-rank rows of ``roles`` roles (block basis: the role's own
    ``rank`` columns), half-width cos/sin rows, n rows of a workspace arena and one query."""
    w, blocks = KV * D, 2 * n // BLOCK + 4
    g = torch.Generator().manual_seed(0)
    table = torch.randperm(blocks, generator=g)[:(n + BLOCK - 1) // BLOCK]
    tok = (table[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:n].contiguous()
    lr = torch.randn(blocks * BLOCK, 2 * roles * rank, generator=g)
    angles = torch.rand(n, D // 2, generator=g) * 6.3
    ws = Workspace(LAYERS, KV, D, max_tokens=n + 256)
    assert ws.reserve(0, n)
    return dict(k=[torch.randn(blocks * BLOCK, w, generator=g) for _ in range(LAYERS)], tok=tok,
                lk=lr[:, rank:2 * rank], q_b=torch.randn(rank, w, generator=g),
                cos=angles.cos().contiguous(), sin=angles.sin().contiguous(),
                out=[ws.rows(0, layer, 0, n).view(n, w) for layer in range(LAYERS)],
                query=torch.randn(KV * G, D, generator=g), scores=torch.empty(KV * G, n),
                flush=torch.ones(16 << 20))


def paths(s: dict, rank: int) -> dict:
    """name -> a callable running one step's LAYERS layers."""
    def expand(r, store, stream=True):
        lk, qb = s["lk"][:, :r], s["q_b"][:r].contiguous()

        def run():
            for layer in range(LAYERS):
                cpu_native.expand_rows(s["k"][layer], s["tok"], lk, qb, s["out"][layer] if store else None,
                                       s["cos"], s["sin"], D, s["tok"], query=s["query"], scores=s["scores"],
                                       scale=D ** -0.5, stream=stream)
        return run

    def scores():
        for layer in range(LAYERS):
            cpu_native.decode_scores(s["query"], s["k"][layer], len(s["tok"]), D ** -0.5, s["scores"], s["tok"])
    return {"scores (fullshared)": scores, f"expand r={rank}, streamed (lrshared)": expand(rank, True),
            f"expand r={rank}, cached stores": expand(rank, True, stream=False),
            f"expand r={rank}, not stored": expand(rank, False), "expand r=1, streamed": expand(1, True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=SPEC.rank)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    if not cpu_native.available():
        raise SystemExit(f"native kernels unavailable: {cpu_native.unavailable_reason()}")
    torch.set_num_threads(1)
    fns_state = setup(a.context, a.rank)
    fns = paths(fns_state, a.rank)
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    flush = fns_state["flush"]
    for i in range(a.repeats):
        for k, f in (list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]):
            flush.sum()                           # what the model's weights do to the cache between layers
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) / LAYERS)
    base = statistics.median(times["scores (fullshared)"])
    rows = [dict(path=k, context=a.context, rank=a.rank, ms_per_layer=statistics.median(v) * 1e3,
                 min_ms=min(v) * 1e3, vs_scores=statistics.median(v) / base) for k, v in times.items()]
    print(f"\ncontext {a.context}, {KV} KV heads x {D}, {KV * G} query heads, one thread, {a.repeats} repeats, "
          "interleaved\n")
    print("| path | ms per layer (median) | min | vs score pass |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['ms_per_layer']:.3f} | {r['min_ms']:.3f} | {r['vs_scores']:.2f} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "cpu_expand.csv", rows)
    draw(rows, out / "cpu_expand.png")
    print(f"wrote {out}/cpu_expand.csv, cpu_expand.png")
    return 0


def draw(rows: list[dict], path: Path) -> None:
    """Horizontal bars of ms per layer per path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.barh([r["path"] for r in rows][::-1], [r["ms_per_layer"] for r in rows][::-1])
    ax.set_xlabel(f"ms per layer at {rows[0]['context']} context")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
