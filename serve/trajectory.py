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

A turn that cannot run (the transcript outgrew the model's context or the cache pool) raises :class:`TurnFailed`,
which names the file and the turn and keeps the turns that completed before it (``replay`` reports them).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ServeError
from .sampling import SamplingParams

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos")
TOP_KEYS = ("name", "description", "base", "defaults", "turns")


class TrajectoryError(ServeError):
    """A trajectory file that cannot be read or replayed; the message names the file (and the turn)."""


class TurnFailed(TrajectoryError):
    """One generated turn could not run: ``"FILE: turn N (role): reason"``; ``results`` are the turns completed
    before it, in order."""

    def __init__(self, message: str, turn: int, role: str, results: list):
        super().__init__(message)
        self.turn, self.role, self.results = turn, role, results


# What a turn may raise that is about this turn's input (too long for the context / pool), not a bug.
TURN_ERRORS = (ServeError, MemoryError, torch.OutOfMemoryError)


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
        """The sampling parameters of a generated turn: the file's defaults (with command-line overrides) and the
        turn's own keys."""
        return SamplingParams(**{**self.defaults, **turn.sampling})

    def check_params(self) -> None:
        """Build every generated turn's parameters now (overrides merged into ``defaults`` included), so that a bad
        combination is refused before any turn runs."""
        for i, t in enumerate(self.turns, 1):
            if t.content is None:
                try:
                    self.params(t)
                except (ServeError, TypeError) as e:
                    raise TrajectoryError(f"{self.path}: turn {i} ({t.role}): {e}") from None


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


def _not_utf8(obj, where=()) -> tuple | None:
    """The key path of the first string (or key) in a JSON value that cannot be encoded as UTF-8 (JSON allows lone
    surrogate escapes; tokenizers refuse them), or None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        found = _not_utf8(k, where + (k,)) if isinstance(k, str) else None
        found = found if found is not None else _not_utf8(v, where + (k,))
        if found is not None:
            return found
    return None


def load_trajectory(path: str | Path) -> Trajectory:
    """Read and validate a trajectory file; every problem is one line naming the file and the turn."""
    path = Path(path)
    if not path.is_file():
        raise TrajectoryError(f"trajectory file {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrajectoryError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise TrajectoryError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise TrajectoryError(f"{path}: the top level must be an object with a 'turns' list")
    try:
        bad_text = _not_utf8(raw)
    except RecursionError:
        raise TrajectoryError(f"{path}: nested too deeply (a trajectory is a few levels of objects)") from None
    if bad_text is not None:
        keys = ".".join(str(k) for k in (bad_text[2:] if bad_text[:1] == ("turns",) else bad_text))
        where = f"turn {bad_text[1] + 1}" if bad_text[:1] == ("turns",) and len(bad_text) > 1 else ""
        where = ": ".join(w for w in (where, keys and f"'{keys}'") if w)
        raise TrajectoryError(f"{path}: {where} is not valid UTF-8 text (a lone surrogate escape such as \\ud800)")
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
    """Every generated turn names a role of the bundle (one line naming the file and the turn otherwise)."""
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


def run_trajectory(engine, traj: Trajectory, on_turn=None, results: list | None = None) -> list[TurnResult]:
    """Replay ``traj`` on ``engine``: append given turns, generate the others (each with its role's adapter).

    Completed turns are appended to ``results`` (a new list by default) as they finish, so a caller keeps them
    whatever stops the replay; a turn that cannot run raises :class:`TurnFailed` naming the file and the turn."""
    check_roles(traj, engine.roles)
    messages: list[dict] = []
    results = [] if results is None else results
    last_role = None
    for i, turn in enumerate(traj.turns, 1):
        if turn.content is not None:
            messages.append({"role": turn.role, "content": turn.content})
            continue
        try:
            ids = engine.render(messages, turn.role)
            out = engine.generate(ids, turn.role, traj.params(turn))
        except TURN_ERRORS as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
                reason = f"out of memory ({reason[:160]}): lower --cache-tokens or shorten the trajectory"
            raise TurnFailed(f"{traj.path}: turn {i} ({turn.role}): {reason}", i, turn.role, results) from None
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


@dataclass
class Replay:
    """What replaying one trajectory on several engines (one per cache mode) produced."""
    turns: dict[str, list[TurnResult]]      # per mode: the median of its complete runs, else the turns completed
    errors: dict[str, TurnFailed]           # modes stopped by a turn that could not run
    interrupted: bool = False               # Ctrl-C stopped the replay (what completed is in ``turns``)


def replay(engines: dict, traj: Trajectory, repeat: int = 1) -> Replay:
    """Replay ``traj`` ``repeat`` times on each engine of ``{mode: engine}``, each time from an empty cache.

    Repeats are interleaved across modes (mode 1, mode 2, ..., mode 1, ...) so that a drift in machine load affects
    every mode alike. A mode whose turn cannot run stops there, keeping the turns it completed, while the other
    modes go on; Ctrl-C stops everything, keeping what completed."""
    full: dict[str, list] = {m: [] for m in engines}
    partial: dict[str, list] = {}
    errors: dict[str, TurnFailed] = {}
    interrupted = False
    try:
        for _ in range(repeat):
            for mode, engine in engines.items():
                if mode in errors:
                    continue
                partial[mode] = done = []
                engine.clear_cache()
                try:
                    run_trajectory(engine, traj, results=done)
                except TurnFailed as e:
                    errors[mode] = e
                    continue
                full[mode].append(done)
    except KeyboardInterrupt:
        interrupted = True
    turns = {m: median_runs(full[m]) if full[m] else partial[m] for m in engines if full[m] or m in partial}
    return Replay(turns, errors, interrupted)


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
    """Totals and means over one replay's turns (prefilled / reused tokens, TTFT, decode speed, final cache)."""
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
