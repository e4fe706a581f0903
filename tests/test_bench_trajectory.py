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
