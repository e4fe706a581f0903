"""The embedded default (a tiny base model and a synthetic task shipped in ``lragent.toy``), resolved here only.

Library code never imports ``lragent.toy``: the command line hands what it resolved to ``lragent.train.train``
(``embedded=EMBEDDED``) and to the serving engine (``base_candidates()``).
"""
from __future__ import annotations

from pathlib import Path


class EmbeddedDefault:
    """What ``model.base: embedded`` and ``data.train|eval: embedded`` stand for in a training recipe."""

    def base_path(self) -> Path:
        """The shipped tiny base model directory."""
        from lragent.toy import default_base_path
        return default_base_path()

    def write_data(self, out_dir: Path, n_train: int, n_eval: int, seed: int) -> None:
        """Generate the toy task's train.jsonl / eval.jsonl (records per role) into ``out_dir``."""
        from lragent.toy import write_dataset
        write_dataset(out_dir, n_train=n_train, n_eval=n_eval, seed=seed)


EMBEDDED = EmbeddedDefault()


def base_candidates() -> list[Path]:
    """Base model directories a bundle's recorded base may be found in when its path is not on this machine (the
    engine takes one only if its config fingerprint is the one the bundle records)."""
    return [EMBEDDED.base_path()]
