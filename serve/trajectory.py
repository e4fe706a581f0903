"""Multi-role trajectories: a JSON file of turns on one growing transcript, replayed through an Engine.

Format (``examples/trajectories/*.json``)::

    {
      "name": "lookup-3-rounds",                       optional
      "description": "...",                            optional
      "base": "path/to/base",                          optional; relative to this file; --base wins
      "defaults": {"max_new_tokens": 8, "temperature": 0, "top_p": 1, "seed": 0, "stop": []},     optional
      "turns": [
        {"role": "user", "content": "find the value of k7 ."},        content given: appended to the transcript
        {"role": "tool", "content": "db : k3 = 41 ; k7 = 18 ;"},
        {"role": "planner"},                                          no content: the role's adapter generates it
        {"role": "actor", "max_new_tokens": 4},                       per-turn sampling overrides
        ...
      ]
    }

A turn without ``content`` must name a role of the bundle; its prompt is the transcript so far rendered by the
tokenizer's chat template with ``add_generation_prompt=True`` and ``role=<role>``, and the generated text (stop
strings and EOS removed) is appended as that role's message. Turns with ``content`` may use any role name.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .config import ServeError
from .sampling import SamplingParams

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos")
TOP_KEYS = ("name", "description", "base", "defaults", "turns")


class TrajectoryError(ServeError):
    pass


@dataclass
class Turn:
    role: str
    content: str | None = None
    sampling: dict = field(default_factory=dict)


@dataclass
class Trajectory:
    turns: list[Turn]
    name: str = ""
    description: str = ""
    base: str | None = None
    defaults: dict = field(default_factory=dict)
    path: Path | None = None

    def params(self, turn: Turn) -> SamplingParams:
        return SamplingParams(**{**self.defaults, **turn.sampling})


def _check_sampling(d, where: str) -> dict:
    if not isinstance(d, dict):
        raise TrajectoryError(f"{where}: must be an object")
    bad = sorted(set(d) - set(SAMPLING_KEYS))
    if bad:
        raise TrajectoryError(f"{where}: unknown key {bad[0]!r} (sampling keys: {', '.join(SAMPLING_KEYS)})")
    out = dict(d)
    if "stop" in out:
        stop = out["stop"]
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise TrajectoryError(f"{where}: 'stop' must be a string or a list of strings")
        out["stop"] = tuple(stop)
    try:
        SamplingParams(**out)
    except (ServeError, TypeError) as e:
        raise TrajectoryError(f"{where}: {e}") from None
    return out


def load_trajectory(path: str | Path) -> Trajectory:
    """Read and validate a trajectory file; every problem is one line naming the file and the turn."""
    path = Path(path)
    if not path.is_file():
        raise TrajectoryError(f"trajectory file {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrajectoryError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise TrajectoryError(f"{path}: the top level must be an object with a 'turns' list")
    bad = sorted(set(raw) - set(TOP_KEYS))
    if bad:
        raise TrajectoryError(f"{path}: unknown key {bad[0]!r} (allowed: {', '.join(TOP_KEYS)})")
    turns_raw = raw.get("turns")
    if not isinstance(turns_raw, list) or not turns_raw:
        raise TrajectoryError(f"{path}: 'turns' must be a non-empty list")
    defaults = _check_sampling(raw.get("defaults", {}), f"{path}: defaults")
    turns = []
    for i, t in enumerate(turns_raw, 1):
        where = f"{path}: turn {i}"
        if not isinstance(t, dict):
            raise TrajectoryError(f"{where}: must be an object with a 'role'")
        role, content = t.get("role"), t.get("content")
        if not isinstance(role, str) or not role.strip():
            raise TrajectoryError(f"{where}: 'role' must be a non-empty string")
        if content is not None and not isinstance(content, str):
            raise TrajectoryError(f"{where}: 'content' must be a string")
        extra = {k: v for k, v in t.items() if k not in ("role", "content")}
        turns.append(Turn(role, content, _check_sampling(extra, where)))
    if not any(t.content is None for t in turns):
        raise TrajectoryError(f"{path}: no turn to generate (give at least one role turn without 'content')")
    base = raw.get("base")
    if base is not None:
        if not isinstance(base, str):
            raise TrajectoryError(f"{path}: 'base' must be a path string")
        base = str((path.parent / base) if not Path(base).is_absolute() else Path(base))
    return Trajectory(turns, str(raw.get("name", path.stem)), str(raw.get("description", "")), base, defaults,
                      path)


def check_roles(traj: Trajectory, roles: list[str]) -> None:
    for i, t in enumerate(traj.turns, 1):
        if t.content is None and t.role not in roles:
            raise TrajectoryError(f"{traj.path}: turn {i}: role {t.role!r} has no adapter in the bundle "
                                  f"(roles: {', '.join(roles)}); give it 'content' or use a bundle role")


@dataclass
class TurnResult:
    turn: int
    role: str
    handoff: bool                 # a different role than the previous generated turn continues the transcript
    prompt_tokens: int
    prefilled_tokens: int
    reused_tokens: int
    ttft_ms: float
    decode_tok_s: float
    generated_tokens: int
    text: str
    cache: dict                   # engine cache bytes after the turn: base, lowrank, total, free

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def run_trajectory(engine, traj: Trajectory, on_turn=None) -> list[TurnResult]:
    """Replay ``traj`` on ``engine``: append given turns, generate the others (each with its role's adapter)."""
    check_roles(traj, engine.roles)
    messages: list[dict] = []
    results: list[TurnResult] = []
    last_role = None
    for i, turn in enumerate(traj.turns, 1):
        if turn.content is not None:
            messages.append({"role": turn.role, "content": turn.content})
            continue
        ids = engine.render(messages, turn.role)
        out = engine.generate(ids, turn.role, traj.params(turn))
        messages.append({"role": turn.role, "content": out.text.strip()})
        st = engine.stats()
        res = TurnResult(turn=i, role=turn.role, handoff=last_role is not None and last_role != turn.role,
                         prompt_tokens=out.stats.prompt_tokens, prefilled_tokens=out.stats.prefilled_tokens,
                         reused_tokens=out.stats.reused_tokens, ttft_ms=out.stats.ttft_s * 1e3,
                         decode_tok_s=out.stats.decode_tok_s, generated_tokens=out.stats.generated_tokens,
                         text=out.text.strip(),
                         cache={k: st[f"{k}_bytes"] for k in ("base", "lowrank", "total", "free")})
        last_role = turn.role
        results.append(res)
        if on_turn is not None:
            on_turn(res)
    return results


def median_runs(runs: list[list[TurnResult]]) -> list[TurnResult]:
    """Several replays of one trajectory (fresh cache each): the first run's turns with the median TTFT and decode
    speed per turn (timings on a busy machine are noisy; token counts and outputs are deterministic)."""
    out = []
    for turns in zip(*runs):
        r = TurnResult(**turns[0].as_dict())
        r.ttft_ms = statistics.median(t.ttft_ms for t in turns)
        r.decode_tok_s = statistics.median(t.decode_tok_s for t in turns)
        out.append(r)
    return out


def summarize(results: list[TurnResult]) -> dict:
    hand = [r.ttft_ms for r in results if r.handoff]
    dec = [r.decode_tok_s for r in results if r.decode_tok_s > 0]
    last = results[-1].cache if results else {}
    return {"turns": len(results), "prefilled_tokens": sum(r.prefilled_tokens for r in results),
            "reused_tokens": sum(r.reused_tokens for r in results),
            "ttft_ms_mean": sum(r.ttft_ms for r in results) / max(1, len(results)),
            "handoff_ttft_ms_mean": sum(hand) / len(hand) if hand else 0.0,
            "decode_tok_s_mean": sum(dec) / len(dec) if dec else 0.0,
            "cache_base_bytes": last.get("base", 0), "cache_lowrank_bytes": last.get("lowrank", 0),
            "cache_total_bytes": last.get("total", 0), "outputs": [r.text for r in results]}
