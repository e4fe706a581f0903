"""Episode files for ``lragent eval``: multi-role conversations with reference turns, replayed through the engine.

JSONL, one episode per line::

    {"id": "eval-0",                                          optional
     "turns": [{"role": "user", "content": "find the result ."},
               {"role": "tool", "content": "result k4 key k7 k12 ."},
               {"role": "actor", "content": "answer 13"},      a role of the bundle: scored against its reference
               {"role": "planner", "content": "answer 3", "reference": "answer 9"}, ...],
     "roles": ["planner", "actor"],                           optional: the roles to score (default: the bundle's)
     "kinds": ["context", "context", "writer", "reader"]}    optional: a label per turn, reported separately

A turn whose role is scored is a request: its prompt is the transcript so far rendered with the chat template for
that role; the greedy output is compared with ``reference`` (default: ``content``) after stripping whitespace. The
transcript then continues with ``content`` (teacher forcing), so every cache mode is scored on the same prompts.
Other turns are context, appended as they are.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import ServeError


@dataclass
class Episode:
    turns: list[dict]
    id: str = ""
    roles: list[str] | None = None
    kinds: list[str] | None = None
    extra: dict = field(default_factory=dict)


def parse_episode(raw, where: str) -> Episode:
    """One episode from its JSON object, or a one-line ServeError naming ``where``."""
    if not isinstance(raw, dict) or not isinstance(raw.get("turns"), list) or not raw["turns"]:
        raise ServeError(f"{where}: an episode must be an object with a non-empty 'turns' list")
    for i, t in enumerate(raw["turns"]):
        if not isinstance(t, dict) or not isinstance(t.get("role"), str) or not t["role"]:
            raise ServeError(f"{where}: turn {i + 1} must be an object with a 'role' string")
        for key in ("content", "reference"):
            if key in t and not isinstance(t[key], str):
                raise ServeError(f"{where}: turn {i + 1}: '{key}' must be a string")
        if "content" not in t:
            raise ServeError(f"{where}: turn {i + 1} has no 'content'")
    roles, kinds = raw.get("roles"), raw.get("kinds")
    if roles is not None and not (isinstance(roles, list) and all(isinstance(r, str) for r in roles)):
        raise ServeError(f"{where}: 'roles' must be a list of role names")
    if kinds is not None and not (isinstance(kinds, list) and len(kinds) == len(raw["turns"])
                                  and all(isinstance(k, str) for k in kinds)):
        raise ServeError(f"{where}: 'kinds' must be a list of strings, one per turn")
    return Episode(raw["turns"], str(raw.get("id", "")), roles, kinds,
                   {k: v for k, v in raw.items() if k not in ("turns", "id", "roles", "kinds")})


def read_episodes(path: str | Path, limit: int | None = None) -> list[Episode]:
    """The episodes of a JSONL file (the first ``limit``), each line validated (``file:line: reason``)."""
    path = Path(path)
    if not path.is_file():
        raise ServeError(f"episode file {path} does not exist")
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ServeError(f"{path}: not UTF-8 text ({e.reason})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise ServeError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        out.append(parse_episode(raw, f"{path}:{n}"))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ServeError(f"{path}: no episodes")
    return out


def scored_turns(ep: Episode, roles: list[str]) -> list[int]:
    """Indices of the turns to score: those of ``ep.roles`` (default ``roles``) that the bundle has."""
    want = set(ep.roles if ep.roles is not None else roles) & set(roles)
    return [i for i, t in enumerate(ep.turns) if t["role"] in want]


def turn_kind(ep: Episode, i: int, scored: list[int]) -> str:
    """``ep.kinds[i]`` when given; else "handoff" when the previous scored turn had another role, else "same"."""
    if ep.kinds is not None:
        return ep.kinds[i]
    prev = [j for j in scored if j < i]
    if not prev:
        return "first"
    return "handoff" if ep.turns[prev[-1]]["role"] != ep.turns[i]["role"] else "same"
