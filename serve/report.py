"""Plain-text tables for the serve commands: per-turn stats of one mode, and the four modes side by side."""
from __future__ import annotations

from .trajectory import TurnResult


def human_bytes(n: float) -> str:
    """``n`` bytes as B / KiB / MiB / GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def turns_table(results: list[TurnResult]) -> str:
    """One row per generated turn: prompt / prefilled / reused tokens, TTFT, decode speed, cache bytes, output."""
    if not results:
        return "(no turn completed)"
    header = ["turn", "role", "prompt", "prefilled", "reused", "TTFT ms", "decode tok/s", "cache base",
              "cache low-rank", "output"]
    rows = [[r.turn, r.role + (" *" if r.handoff else ""), r.prompt_tokens, r.prefilled_tokens, r.reused_tokens,
             f"{r.ttft_ms:.1f}", f"{r.decode_tok_s:.0f}", human_bytes(r.cache["base"]),
             human_bytes(r.cache["lowrank"]), _clip(r.text)] for r in results]
    return _table(header, rows, right={0, 2, 3, 4, 5, 6, 7, 8}) + "\n(* hand-off: a different role continues)"


def _clip(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def comparison_table(per_mode: dict[str, list[TurnResult]]) -> str:
    """Per turn, for each mode: prompt tokens prefilled / reused and TTFT ("-" past the turns a mode completed)."""
    modes = list(per_mode)
    first = max(per_mode.values(), key=len)
    header = ["turn", "role"] + [f"{m} pre/reuse  TTFT ms" for m in modes]
    rows = []
    for i, r0 in enumerate(first):
        row = [r0.turn, r0.role + (" *" if r0.handoff else "")]
        for m in modes:
            rs = per_mode[m]
            row.append(f"{rs[i].prefilled_tokens}/{rs[i].reused_tokens}  {rs[i].ttft_ms:.1f}" if i < len(rs) else "-")
        rows.append(row)
    return _table(header, rows, right={0, *range(2, 2 + len(modes))})


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else "-"


def summary_table(summaries: dict[str, dict], reference: str = "nonshared", ttft_reference: str = "fullshared") -> str:
    """One row per mode. Ratios are taken within this run: hand-off TTFT against ``ttft_reference`` (the cheapest
    sharing, the baseline lrshared must keep up with), cache bytes and outputs against ``reference`` (exact)."""
    header = ["mode", "prefilled", "reused", "hand-off TTFT ms", f"vs {ttft_reference}", "decode tok/s", "cache base",
              "cache low-rank", "cache total", f"vs {reference}", f"outputs = {reference}"]
    ref, tref = summaries.get(reference), summaries.get(ttft_reference)
    rows = []
    for m, s in summaries.items():
        same = (f"{sum(a == b for a, b in zip(s['outputs'], ref['outputs']))}/"
                f"{max(len(s['outputs']), len(ref['outputs']))}"
                if ref else "-")
        rows.append([m, s["prefilled_tokens"], s["reused_tokens"], f"{s['handoff_ttft_ms_mean']:.1f}",
                     _ratio(s["handoff_ttft_ms_mean"], tref and tref["handoff_ttft_ms_mean"]),
                     f"{s['decode_tok_s_mean']:.0f}", human_bytes(s["cache_base_bytes"]),
                     human_bytes(s["cache_lowrank_bytes"]), human_bytes(s["cache_total_bytes"]),
                     _ratio(s["cache_total_bytes"], ref and ref["cache_total_bytes"]), same])
    return _table(header, rows, right=set(range(1, 11)))
