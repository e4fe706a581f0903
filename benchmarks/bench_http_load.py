"""Load test of ``lragent serve``: N concurrent planner/actor/reflector agent loops over the OpenAI HTTP API.

One server per cache mode is started (the same bundle); runs are interleaved across modes (mode 1, 2, 3, 4, 1, ...)
with the prefix cache reset before each, so machine-load drift hits every mode alike. Each agent loop keeps its
own growing transcript (its own toy-task database) and makes ``--rounds`` x 3 streamed chat requests, the roles
taking turns. Per mode: requests/s, TTFT p50/p90 (first streamed token, as the client sees it), and the share of
prompt tokens served from the cache (``usage.prompt_tokens_details.cached_tokens``).

    python benchmarks/bench_http_load.py --bundle bundles/tiny --agents 8 --rounds 3 --repeat 3

Writes benchmarks/results/http_load.csv and http_load.png; prints the table.
"""
from __future__ import annotations

import argparse
import csv
import random
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from systems import start_lragent_server as start_server  # noqa: E402

MODES = ("nonshared", "fullshared", "baseshared", "lrshared")
RESULTS = Path(__file__).resolve().parent / "results"


def agent(client: OpenAI, seed: int, rounds: int, out: list) -> None:
    """One agent loop: its own db and transcript; every turn's (ttft_s, prompt tokens, cached tokens)."""
    rng = random.Random(seed)
    keys = rng.sample(range(64), 12)
    db = {f"k{k}": v for k, v in zip(keys, rng.sample(range(100), 12))}
    messages = []
    for r in range(rounds):
        messages.append({"role": "user", "content": f"find the value of {rng.choice(sorted(db))} ."})
        if r == 0:
            messages.append({"role": "tool", "content": "db : " + " ".join(f"{k} = {v} ;" for k, v in db.items())})
        for role in ("planner", "actor", "reflector"):
            t0 = time.perf_counter()
            ttft, text, usage = None, "", None
            for ch in client.chat.completions.create(model=role, messages=messages, max_tokens=8, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}):
                if ch.choices and ch.choices[0].delta.content:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text += ch.choices[0].delta.content
                if ch.usage is not None:
                    usage = ch.usage
            messages.append({"role": "assistant", "name": role, "content": text.strip()})
            out.append((ttft if ttft is not None else time.perf_counter() - t0, usage.prompt_tokens,
                        usage.prompt_tokens_details.cached_tokens))


def run_load(url: str, agents: int, rounds: int, seed: int) -> dict:
    httpx.post(url + "/reset_prefix_cache")
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    turns: list = []
    threads = [threading.Thread(target=agent, args=(client, seed + i, rounds, turns)) for i in range(agents)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(x[0] for x in turns)
    q = statistics.quantiles(ttfts, n=10)
    return {"requests": len(turns), "wall_s": wall, "req_per_s": len(turns) / wall,
            "ttft_p50_ms": statistics.median(ttfts) * 1e3, "ttft_p90_ms": q[8] * 1e3,
            "cached_share": sum(x[2] for x in turns) / max(1, sum(x[1] for x in turns))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="bundles/tiny")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per server")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default=str(RESULTS / "http_load"))
    args = p.parse_args()
    modes = args.modes.split(",")
    servers = {m: start_server(args.bundle, m, args.threads) for m in modes}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        run_load(servers[modes[0]][1], 2, 1, 999)                       # warm-up (first-call overheads)
        for rep in range(args.repeat):
            for m in modes:
                runs[m].append(run_load(servers[m][1], args.agents, args.rounds, seed=1000 * rep))
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            proc.wait(timeout=60)
    rows = []
    for m in modes:
        med = {k: statistics.median(r[k] for r in runs[m]) for k in runs[m][0]}
        rows.append({"mode": m, "agents": args.agents, "rounds": args.rounds, "repeats": args.repeat, **med})
    base = {r["mode"]: r for r in rows}.get("nonshared")
    header = f"{'mode':<11} {'req/s':>7} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'cached share':>13} {'req/s vs nonshared':>19}"
    print(f"{args.agents} concurrent agent loops x {args.rounds} rounds x 3 roles, median of {args.repeat} "
          f"interleaved runs, bundle {args.bundle}")
    print(header)
    for r in rows:
        ratio = f"{r['req_per_s'] / base['req_per_s']:.2f}x" if base else "-"
        print(f"{r['mode']:<11} {r['req_per_s']:>7.1f} {r['ttft_p50_ms']:>12.1f} {r['ttft_p90_ms']:>12.1f} "
              f"{r['cached_share']:>12.1%} {ratio:>19}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        names = [r["mode"] for r in rows]
        axes[0].bar(names, [r["req_per_s"] for r in rows])
        axes[0].set_title("requests / s")
        axes[1].bar(names, [r["ttft_p50_ms"] for r in rows], label="p50")
        axes[1].scatter(names, [r["ttft_p90_ms"] for r in rows], color="k", label="p90", zorder=3)
        axes[1].set_title("TTFT ms")
        axes[1].legend()
        axes[2].bar(names, [100 * r["cached_share"] for r in rows])
        axes[2].set_title("prompt tokens from the cache, %")
        for ax in axes:
            ax.tick_params(axis="x", rotation=20)
        fig.suptitle(f"lragent serve: {args.agents} concurrent agent loops ({args.bundle})")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
