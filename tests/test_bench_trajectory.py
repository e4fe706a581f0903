"""The trace benchmark end to end on the embedded model (one small cell): every system replays the trace, the
nonshared engine and HF + PEFT generate the same tokens, the shared modes reuse what was prefilled, and cache bytes
match the analytic layout."""
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_trajectory_small_cell(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_trajectory.py"), "--model", "embedded",
                        "--cell", "160x3@1:fullshared,lrshared,nonshared,hf-reuse,hf-noreuse,serve-lrshared",
                        "--workdir", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["system"]: row for row in csv.DictReader(open(out / "summary.csv"))}
    assert set(rows) == {"fullshared", "lrshared", "nonshared", "hf-reuse", "hf-noreuse", "serve-lrshared"}
    n = rows["nonshared"]["turns_same_as_hf"].split("/")
    assert n[0] == n[1] and int(n[1]) > 0                            # nonshared == HF + PEFT, every turn
    assert rows["hf-noreuse"]["turns_same_as_hf"] == rows["nonshared"]["turns_same_as_hf"]
    assert rows["nonshared"]["prefilled"] == rows["hf-reuse"]["prefilled"]        # same work as HF's best case
    assert int(rows["lrshared"]["prefilled"]) < int(rows["nonshared"]["prefilled"])
    assert rows["serve-lrshared"]["prefilled"] == rows["lrshared"]["prefilled"]    # the server reports the reuse
    for s in ("fullshared", "lrshared", "nonshared", "hf-reuse"):
        assert abs(float(rows[s]["cache_vs_analytic"]) - 1) <= 0.05, (s, rows[s]["cache_vs_analytic"])
    for f in ("turns.csv", "ttft_per_turn.png", "cache_vs_context.png", "wall_vs_roles.png"):
        assert (out / f).stat().st_size > 0
    turns = list(csv.DictReader(open(out / "turns.csv")))
    order = [(row["turn"], row["system"]) for row in turns]          # every system has every turn of the repeat
    assert sorted(order) == sorted((str(t), s) for t in range(len(order) // len(rows)) for s in rows)
    handoffs = sum(row["system"] == "lrshared" and row["turn"] != "0" and row["prefilled"] == "1" for row in turns)
    assert handoffs > 0 and f"1-token hand-off TTFT, median of {handoffs} paired turns" in r.stdout


def test_paired_handoffs_pairs_same_turn_and_repeat():
    """The paired hand-off ratio takes only turns after the first where both systems prefilled one token."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import plots
    rows = [dict(cell="c", system=s, repeat=rep, turn=t, prefilled=p, ttft_s=v)
            for s, rep, t, p, v in [("fullshared", 0, 0, 1, 1.0), ("lrshared", 0, 0, 1, 9.0),     # first turn: no
                                    ("fullshared", 0, 1, 1, 2.0), ("lrshared", 0, 1, 1, 3.0),     # 1.5
                                    ("fullshared", 0, 2, 5, 2.0), ("lrshared", 0, 2, 5, 8.0),     # a prefill: no
                                    ("fullshared", 1, 1, 1, 4.0), ("lrshared", 1, 1, 1, 5.0),     # 1.25
                                    ("lrshared", 1, 2, 1, 5.0)]]                                  # unpaired: no
    assert sorted(plots.paired_handoffs(rows, "c")) == [1.25, 1.5]
