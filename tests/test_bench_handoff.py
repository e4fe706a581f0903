"""The hand-off benchmark end to end on a tiny random model: both modes reuse the whole cached prefix, the CSV and
plot are written, and the flop floor is computed from a measured GEMM rate (a smoke run: no timing is asserted)."""
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_handoff_tiny(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_handoff.py"), "--tiny", "--contexts",
                        "64,200", "--repeats", "2", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "handoff_floor.csv")))
    assert [int(x["context"]) for x in rows] == [64, 200]
    for x in rows:
        assert x["prefilled"] == "1 / 1"                          # a 1-token hand-off in both modes
        assert float(x["fullshared_ms"]) > 0 and float(x["lrshared_ms"]) > 0
        assert float(x["gemm_gflops"]) > 0 and float(x["floor_ratio"]) > 1
        assert round(float(x["expansion_mflop"]) * 1e6) == 2 * int(x["context"]) * 8 * 2 * 32 * 2
    assert (out / "handoff_floor.png").stat().st_size > 0
