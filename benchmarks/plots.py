"""Tables, headline ratios and plots of ``bench_trajectory.py`` (summary rows as it writes them to summary.csv)."""
from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

SYSTEMS = ("fullshared", "lrshared", "baseshared", "lrbase", "nonshared", "serve-lrshared", "serve-nonshared",
           "hf-reuse", "hf-noreuse", "vllm")
INTS = ("context", "roles", "repeats", "prefilled", "reused", "peak_cache_bytes", "analytic_cache_bytes", "turn",
        "repeat", "prompt", "decode", "cache_bytes")
TEXT = ("cell", "system", "role", "turns_same_as_hf", "note")


def color(system: str) -> str:
    """One color per system in every plot."""
    return f"C{SYSTEMS.index(system) % 10}" if system in SYSTEMS else "k"


def load(out: Path) -> tuple[list[dict], list[dict]]:
    """turns.csv and summary.csv of a run, with numbers parsed (empty -> None)."""
    def rows(name):
        res = []
        for r in csv.DictReader(open(Path(out) / name)):
            res.append({k: (None if v == "" else v if k in TEXT else int(float(v)) if k in INTS else float(v))
                        for k, v in r.items()})
        return res
    return rows("turns.csv"), rows("summary.csv")

COLS = [("system", "system", "{}"), ("handoff_ttft_p50", "hand-off TTFT p50 s", "{:.3f}"),
        ("handoff_ttft_p90", "p90 s", "{:.3f}"), ("wall_s", "wall s", "{:.1f}"),
        ("decode_tok_s", "decode tok/s", "{:.1f}"), ("prefilled", "prefilled", "{:.0f}"),
        ("reused", "reused", "{:.0f}"), ("peak_cache_bytes", "peak cache MiB", "{}"),
        ("cache_vs_analytic", "vs analytic", "{:.3f}"), ("turns_same_as_hf", "turns = HF", "{}")]


def _fmt(row, key, fmt):
    v = row.get(key)
    if v is None or v == "":
        return "-"
    if key == "peak_cache_bytes":
        return f"{v / 2 ** 20:.1f}"
    return fmt.format(v)


def print_summary(rows: list[dict]) -> None:
    """One markdown table per cell."""
    for cell in dict.fromkeys(r["cell"] for r in rows):
        sub = [r for r in rows if r["cell"] == cell]
        print(f"\n### {cell} ({sub[0]['context']} tokens, {sub[0]['roles']} roles)\n")
        print("| " + " | ".join(h for _, h, _ in COLS) + " |")
        print("|" + "---|" * len(COLS))
        for r in sub:
            if r.get("note"):
                print(f"| {r['system']} | skipped: {r['note']} |")
                continue
            print("| " + " | ".join(_fmt(r, k, f) for k, _, f in COLS) + " |")


def paired_handoffs(turn_rows: list[dict], cell: str, a: str = "lrshared", b: str = "fullshared") -> list[float]:
    """TTFT of ``a`` over ``b`` on each 1-token hand-off they share in ``cell`` (same repeat and turn, one prompt
    token prefilled by both): the hand-off step itself, side by side, without the mix of contexts a p50 takes."""
    ttft = {(r["system"], r["repeat"], r["turn"]): r for r in turn_rows if r["cell"] == cell and r["turn"] > 0}
    out = []
    for (system, rep, turn), r in ttft.items():
        other = ttft.get((b, rep, turn))
        if system == a and other and r["prefilled"] == 1 and other["prefilled"] == 1:
            out.append(r["ttft_s"] / other["ttft_s"])
    return out


def ratios(rows: list[dict], turn_rows: list[dict] | None = None) -> list[tuple[str, str, float]]:
    """The headline ratios per cell, each from one run of the benchmark: (cell, what, value)."""
    out = []
    for cell in dict.fromkeys(r["cell"] for r in rows):
        by = {r["system"]: r for r in rows if r["cell"] == cell and not r.get("note")}

        def ratio(a, b, key, what):
            if a in by and b in by and by[b].get(key):
                out.append((cell, what, by[a][key] / by[b][key]))
        ratio("nonshared", "hf-reuse", "wall_s", "nonshared wall / hf-reuse wall (target <= 1.0)")
        ratio("lrshared", "fullshared", "handoff_ttft_p50", "lrshared / fullshared hand-off TTFT (target <= 1.10)")
        ratio("lrshared", "fullshared", "wall_s", "lrshared / fullshared wall (target <= 1.10)")
        ratio("hf-reuse", "lrshared", "handoff_ttft_p50", "hf-reuse / lrshared hand-off TTFT (target >= 30)")
        ratio("vllm", "lrshared", "handoff_ttft_p50", "vllm / lrshared hand-off TTFT")
        ratio("lrshared", "nonshared", "peak_cache_bytes", "lrshared / nonshared cache bytes")
        paired = paired_handoffs(turn_rows or [], cell)
        if paired:
            out.append((cell, f"lrshared / fullshared 1-token hand-off TTFT, median of {len(paired)} paired turns",
                        statistics.median(paired)))
        if "lrshared" in by and by["lrshared"].get("cache_vs_analytic"):
            out.append((cell, "lrshared cache / analytic (target 1 +- 0.02)", by["lrshared"]["cache_vs_analytic"]))
    return out


def print_ratios(rows: list[dict], turn_rows: list[dict] | None = None) -> None:
    print("\n| cell | ratio | value |\n|---|---|---|")
    for cell, what, v in ratios(rows, turn_rows):
        print(f"| {cell} | {what} | {v:.2f} |")


def draw(turn_rows: list[dict], rows: list[dict], out: Path) -> None:
    """ttft_per_turn.png (per cell, TTFT of each turn, one line per system; repeat 0), cache_vs_context.png
    (peak cache bytes vs context at the smallest role count), wall_vs_roles.png (wall time vs roles at 4K)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys(r["cell"] for r in turn_rows))
    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 4), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        for system in dict.fromkeys(r["system"] for r in turn_rows if r["cell"] == cell):
            pts = [(r["turn"], r["ttft_s"]) for r in turn_rows
                   if r["cell"] == cell and r["system"] == system and r["repeat"] == 0]
            ax.plot(*zip(*pts), marker=".", label=system, color=color(system))
        ax.set_yscale("log")
        ax.set_title(cell)
        ax.set_xlabel("turn")
        ax.set_ylabel("TTFT (s)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "ttft_per_turn.png", dpi=110)
    plt.close(fig)

    ok = [r for r in rows if not r.get("note") and r.get("peak_cache_bytes")]
    for fname, xkey, pick, xlabel, ykey, ylabel in (
            ("cache_vs_context.png", "context", lambda r: r["roles"] == min(x["roles"] for x in ok), "context tokens",
             "peak_cache_bytes", "peak cache MiB"),
            ("wall_vs_roles.png", "roles", lambda r: r["cell"].startswith("4096x"), "roles", "wall_s",
             "trajectory wall time (s)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        src = [r for r in (ok if ykey == "peak_cache_bytes" else rows) if not r.get("note") and pick(r)]
        for system in dict.fromkeys(r["system"] for r in src):
            pts = sorted((r[xkey], r[ykey] / (2 ** 20 if ykey == "peak_cache_bytes" else 1))
                         for r in src if r["system"] == system and r.get(ykey))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=system, color=color(system))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


if __name__ == "__main__":          # redraw and reprint a run: python benchmarks/plots.py benchmarks/results/trajectory
    turns, summary = load(Path(sys.argv[1]))
    print_summary(summary)
    print_ratios(summary, turns)
    draw(turns, summary, Path(sys.argv[1]))
