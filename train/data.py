"""Training data: local JSONL -> validated records -> tokenized ``datasets.Dataset`` with completion-only labels.

A record is ``{"role", "prompt", "completion"}`` or ``{"role", "messages": [{"role", "content"}, ...]}``. For the
chat form the loss covers the messages spoken by the record's role (or by "assistant"); the prompt is everything
before them, rendered with the tokenizer's chat template. Every invalid record fails with ``file:line: reason``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lragent.bundle import BundleError, validate_role_name

IGNORE = -100


class DataError(ValueError):
    """Invalid training data; the message starts with ``file:line`` where a record is at fault."""


def read_records(path: str | Path, roles: list[str] | None = None) -> list[dict]:
    """Parse and validate a JSONL file. ``roles``: the allowed roles (None: any valid role name)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file does not exist")
    out = []
    try:
        f = open(p, "rb")
    except OSError as e:
        raise DataError(f"{p}: cannot read the data file ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line); save the file as UTF-8") \
                    from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{where}: not valid JSON (nested too deeply)") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: a record must be a JSON object")
            out.append(_check_record(rec, where, roles))
    if not out:
        raise DataError(f"{p}: no records")
    return out


def _check_record(rec: dict, where: str, roles: list[str] | None) -> dict:
    if "role" not in rec:
        raise DataError(f"{where}: missing field 'role'")
    role = rec["role"]
    try:
        validate_role_name(role)
    except BundleError as e:
        raise DataError(f"{where}: {e}") from None
    if roles is not None and role not in roles:
        raise DataError(f"{where}: unknown role {role!r} (known roles: {', '.join(roles)})")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must have string 'role' and 'content'")
        if not any(m["role"] in (role, "assistant") and m["content"].strip() for m in msgs):
            raise DataError(f"{where}: empty completion: no non-empty message by {role!r} or 'assistant'")
        return {"role": role, "messages": msgs}
    for key in ("prompt", "completion"):
        if key not in rec:
            raise DataError(f"{where}: missing field {key!r} (or give 'messages')")
        if not isinstance(rec[key], str):
            raise DataError(f"{where}: field {key!r} must be a string")
    if not rec["completion"].strip():
        raise DataError(f"{where}: empty completion")
    return {"role": role, "prompt": rec["prompt"], "completion": rec["completion"]}


def infer_roles(records: list[dict]) -> list[str]:
    """The roles of ``records`` in order of first appearance."""
    seen: list[str] = []
    for r in records:
        if r["role"] not in seen:
            seen.append(r["role"])
    return seen


def _encode(tokenizer, text: str, first: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=first)["input_ids"]
    bos = tokenizer.bos_token_id
    if first and bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]  # the text already started with the BOS string
    return ids


def tokenize_record(rec: dict, tokenizer, role_index: dict[str, int], max_length: int) -> dict:
    """input_ids + labels (IGNORE outside the completion), left-truncated to ``max_length``."""
    if "messages" in rec:
        ids, labels, prev = [], [], ""
        msgs = rec["messages"]
        for i, m in enumerate(msgs):
            text = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not text.startswith(prev):
                raise DataError("the chat template does not render message prefixes stably; use prompt/completion")
            piece = _encode(tokenizer, text[len(prev):], first=(i == 0))
            train = m["role"] in (rec["role"], "assistant")
            ids += piece
            labels += piece if train else [IGNORE] * len(piece)
            prev = text
    else:
        p = _encode(tokenizer, rec["prompt"], first=True)
        c = _encode(tokenizer, rec["completion"], first=False)
        ids, labels = p + c, [IGNORE] * len(p) + c
    ids, labels = ids[-max_length:], labels[-max_length:]
    if all(x == IGNORE for x in labels):
        raise DataError(f"a {rec['role']!r} record has no completion tokens within max_length={max_length}")
    return {"input_ids": ids, "labels": labels, "role_id": role_index[rec["role"]]}


def build_dataset(records: list[dict], tokenizer, roles: list[str], max_length: int, where: str | Path = "data"):
    """Tokenize validated records into a ``datasets.Dataset`` (input_ids, labels, role_id); DataError naming the
    record (``where``: the file, for the message) when one cannot be tokenized."""
    import datasets

    index = {r: i for i, r in enumerate(roles)}
    rows = []
    for i, r in enumerate(records):
        try:
            rows.append(tokenize_record(r, tokenizer, index, max_length))
        except DataError as e:
            raise DataError(f"{where}: record {i + 1}: {e}") from None
        except (ValueError, TypeError, KeyError) as e:   # e.g. a tokenizer without a chat template
            raise DataError(f"{where}: record {i + 1}: cannot tokenize it ({' '.join(str(e).split())[:160]})") \
                from None
    return datasets.Dataset.from_list(rows)


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized rows into tensors (labels padded with IGNORE)."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1
    role_ids = torch.tensor([r["role_id"] for r in rows], dtype=torch.long)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "role_ids": role_ids}
