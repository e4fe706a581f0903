"""The hand-off benchmarks end to end, as smoke runs (no timing is asserted): bench_handoff.py on a tiny random model
(both modes reuse the whole cached prefix, the flop floor comes from a measured GEMM rate, CSV and plot written) and
bench_cpu_expand.py on a short context (every path timed, CSV and plot written)."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from lragent.kernels import cpu_native

ROOT = Path(__file__).resolve().parents[1]


def test_bench_handoff_tiny(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_handoff.py"), "--tiny", "--contexts",
                        "64,200", "--repeats", "2", "--roles", "4", "--workdir", str(tmp_path / "work"),
                        "--out", str(out)],
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


def test_bench_cpu_expand_small(tmp_path):
    if not cpu_native.available():
        pytest.skip(f"native kernels unavailable: {cpu_native.unavailable_reason()}")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cpu_expand.py"), "--context", "300",
                        "--repeats", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {x["path"]: x for x in csv.DictReader(open(tmp_path / "cpu_expand.csv"))}
    assert set(rows) == {"scores (fullshared)", "expand r=16, streamed (lrshared)", "expand r=16, cached stores",
                         "expand r=16, not stored", "expand r=1, streamed"}
    assert all(float(x["ms_per_layer"]) > 0 for x in rows.values())
    assert (tmp_path / "cpu_expand.png").stat().st_size > 0
