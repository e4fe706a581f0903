"""Writing benchmark results: CSV rows and matplotlib figures, each to a temporary name first and then renamed, so
that an interrupted run never leaves a half-written file in ``benchmarks/results/``."""
from __future__ import annotations

import csv
from pathlib import Path


def write_csv(path: Path, rows: list[dict]) -> None:
    """All rows' keys as columns (in first-seen order), written to a temp file then renamed."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = Path(path).with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """fig saved as PNG to a temp file then renamed to ``path``."""
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    tmp.replace(path)
