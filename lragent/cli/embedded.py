"""The embedded default (tiny base models and synthetic tasks shipped in ``lragent.toy``), resolved here only.

Library code never imports ``lragent.toy``: the command line hands what it resolved to ``lragent.train.train``
(``embedded=EMBEDDED``) and to the serving engine (``base_candidates()``).

A recipe names an embedded task as ``embedded`` (the toy agent task on the tiny Llama) or ``embedded:<task>``
(:data:`TASKS`: ``toy``, ``handoff``), for ``model.base`` (the task's shipped base) and ``data.train`` /
``data.eval`` (the task's generated records).
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_TASK = "toy"
TASKS = ("toy", "handoff")


def _task(name: str | None) -> str:
    """The task ``name`` stands for (None: the default); ValueError (one line) for an unknown one."""
    task = DEFAULT_TASK if name is None else name
    if task not in TASKS:
        raise ValueError(f"unknown embedded task {task!r} (known: {', '.join(TASKS)})")
    return task


class EmbeddedDefault:
    """What ``model.base: embedded[:<task>]`` and ``data.train|eval: embedded[:<task>]`` stand for in a recipe."""

    def base_path(self, task: str | None = None) -> Path:
        """The shipped base model directory of ``task`` (None: the toy task's tiny Llama)."""
        if _task(task) == "handoff":
            from lragent.toy.handoff import base_path
            return base_path()
        from lragent.toy import default_base_path
        return default_base_path()

    def write_data(self, task: str | None, out_dir: Path, n_train: int, n_eval: int, seed: int) -> None:
        """Generate ``task``'s train.jsonl / eval.jsonl (``n_train`` / ``n_eval`` records per role) into ``out_dir``
        (None: the toy task)."""
        if _task(task) == "handoff":
            from lragent.toy.handoff import write_dataset as write
        else:
            from lragent.toy import write_dataset as write
        write(out_dir, n_train=n_train, n_eval=n_eval, seed=seed)


EMBEDDED = EmbeddedDefault()


def base_candidates() -> list[Path]:
    """Base model directories a bundle's recorded base may be found in when its path is not on this machine (the
    engine takes one only if its config fingerprint is the one the bundle records): every embedded task's base."""
    return [EMBEDDED.base_path(task) for task in TASKS]
