"""Held-out evaluation per role: completion loss and exact match, for the adapted model and for the base.

Exact match is computed teacher-forced: a completion matches when the argmax at every completion position equals
the reference token, which is exactly "greedy decoding reproduces the completion" (each greedy step then sees the
same prefix as the teacher-forced pass).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE, collate
from .lora import roles as route


@torch.no_grad()
def evaluate(model, dataset, roles: list[str], *, pad_id: int, batch_size: int = 32,
             max_per_role: int | None = None, adapters: bool = True, device=None) -> dict[str, dict]:
    """{role: {"loss", "accuracy", "n"}}; ``adapters=False`` evaluates the base model on each role's data."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    by_role: dict[int, list[int]] = {}
    for i, rid in enumerate(dataset["role_id"]):
        by_role.setdefault(rid, []).append(i)
    out = {}
    for rid, idx in sorted(by_role.items()):
        idx = idx[:max_per_role] if max_per_role else idx
        loss_sum, tok, correct = 0.0, 0, 0
        for s in range(0, len(idx), batch_size):
            batch = collate([dataset[i] for i in idx[s:s + batch_size]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with route(model, batch["role_ids"] if adapters else None):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
            mask = labels != IGNORE
            loss_sum += F.cross_entropy(logits[mask], labels[mask], reduction="sum").item()
            tok += int(mask.sum())
            hit = (logits.argmax(-1) == labels) | ~mask
            correct += int(hit.all(dim=1).sum())
        out[roles[rid]] = {"loss": loss_sum / max(tok, 1), "accuracy": correct / len(idx), "n": len(idx)}
    model.train(was_training)
    return out


def format_table(base: dict[str, dict], adapted: dict[str, dict]) -> str:
    lines = [f"{'role':<12} {'n':>5} {'base loss':>10} {'adapted loss':>13} {'base acc':>9} {'adapted acc':>12}"]
    for role in adapted:
        b, a = base[role], adapted[role]
        lines.append(f"{role:<12} {a['n']:>5} {b['loss']:>10.4f} {a['loss']:>13.4f} "
                     f"{b['accuracy']:>9.1%} {a['accuracy']:>12.1%}")
    return "\n".join(lines)
