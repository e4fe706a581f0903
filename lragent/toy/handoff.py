"""The ``handoff`` task: every role reads the latest tool code through its own K/V adapter.

Built to tell the cache-sharing modes apart (issue 13). One *episode* is one growing transcript of 1-4 *rounds*::

    <s> user : find the result . </s>
    tool : result k4 key k7 k12 . </s>          a tool output: the *code* (the key after ``key``) among 2-6 other
                                                keys, all from k0..k15
    actor : answer 13 </s>                      every role answers its own transform of the latest code:
    reflector : answer 12 </s>                  ``answer f_R(c)`` with f_R a fixed per-role permutation of 0..15
    planner : answer 3 </s>
    tool : result key k11 k2 . </s>             the next round: a new code, 2-3 roles in a fresh random order
    ...

The permutations (:data:`PERMS`) satisfy ``f_R(c) != f_Q(c)`` and ``f_R(c) != c`` for every code ``c`` and every
two roles ``R != Q``. The base model (``lragent.toy.pretrain_handoff``) is trained to answer ``c`` itself (copy the
latest code, whatever the role tag), so it scores 0% here by construction; a role adapter on ``k_proj`` / ``v_proj``
learns the role's permutation as a change of the *value* the answer position reads from the code token. The code is
marked by position (the token after ``key``) among other keys of the same set, so one attention layer cannot find it
by content: the base's first layer marks the token after ``key``, its last layer copies the marked code, and the
positions a reader computes itself (`` <role> : answer``) do not hold the code before the last layer.

Why the cache modes separate, by construction. The first role after a tool output is that round's *writer*: it
prefills the tool tokens. The other roles of the round are *readers* of the writer's cache:
- nonshared: a reader computes the tool tokens' K/V with its own adapter -> reads f_reader(c) -> right;
- fullshared: a reader reuses the K/V the writer's adapter computed -> reads f_writer(c) != f_reader(c) -> wrong
  (the writer's own turns stay right, so fullshared sits near the writer share of the turns, about 40%);
- lrshared: a reader applies its own B to the shared L = s X A of the tool tokens -> right, exactly so when the
  writer's adapters do not change the hidden states X at the context positions (adapters on the last layer's k/v
  only), approximately otherwise (hidden-state drift).
:func:`turn_kinds` labels each role turn ``writer`` or ``reader``.

Records (training data, the trainer's format) are ``{"role", "prompt", "completion"}`` like ``lragent.toy.task``:
``prompt`` = the transcript so far ending with ``" <role> :"``, ``completion`` = ``" answer <n> </s>"``; exact match =
the greedy completion equals it. The held-out split draws from an independent stream and never repeats a training
prompt.

**Episode file** (``episodes_jsonl``; what an eval command replays): JSONL, one episode per line::

    {"task": "handoff", "id": "eval-0", "turns": [{"role": "user", "content": "find the result ."},
                                                  {"role": "tool", "content": "result k4 key k7 k12 ."},
                                                  {"role": "actor", "content": "answer 13"}, ...]}

``turns`` are chat messages in order. Turns whose role is a trained role (``roles``, default planner / actor /
reflector) are requests to score, carrying the reference content; all other turns (user, tool) are context. Replay
turn by turn on one growing transcript: the prompt of role turn ``i`` is ``render(turns[:i], role)`` (the
tokenizer's chat template with ``add_generation_prompt=True, role=role``), its reference completion
``" " + content + " </s>"``; the transcript then continues with the reference content (teacher forcing, so every
mode is scored on the same prompts). Optional keys: ``roles`` (the roles to score), ``kinds`` (per turn: ``"context"``,
``"writer"`` or ``"reader"``, see :func:`turn_kinds`).

API: ``PERMS`` / ``answer_of`` (the roles' jobs), ``sample_episode`` / ``episodes`` (seeded generation),
``episode_messages`` / ``render`` / ``turn_kinds`` (transcripts), ``episode_records`` / ``make_records`` /
``make_splits`` / ``write_dataset`` (records, JSONL), ``held_out_episodes`` / ``episodes_jsonl`` / ``read_episodes``
(episode files), ``exact_match`` / ``score`` / ``is_well_formed`` (scoring), ``base_path()`` (the shipped base,
``assets/handoff-llama``).

CLI: ``python -m lragent.toy.handoff --out DIR [--n-train N --n-eval M --episodes E --seed S]`` writes
``train.jsonl``, ``eval.jsonl`` (records per role) and ``episodes.jsonl`` (held-out episodes).
"""
from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .task import exact_match, read_jsonl, write_jsonl  # noqa: F401  (shared with the toy task; re-exported)
from .task import score as _task_score

TASK = "handoff"
BASE_NAME = "handoff-llama"   # the shipped base of this task: lragent/toy/assets/handoff-llama
ROLES = ("planner", "actor", "reflector")
N_CODES = 16                  # codes k0..k15; answers are the numbers 0..15
N_FILLERS = (2, 6)            # inclusive range of other keys (k0..k15, not the code) per tool output
MARKER = "key"                # the word before the code in a tool output
N_ROUNDS = (1, 4)             # inclusive range of rounds per episode
N_SPEAKERS = (2, 3)           # inclusive range of roles speaking per round (distinct, random order)
BOS, EOS = "<s>", "</s>"
USER_TEXT = "find the result ."


def base_path() -> Path:
    """The directory of the shipped base model of this task (made by ``python -m lragent.toy.pretrain_handoff``)."""
    return Path(__file__).resolve().parent / "assets" / BASE_NAME


def _make_perms() -> dict[str, tuple[int, ...]]:
    """f_R(c) = pi[(pi^-1[c] + shift_R) mod 16] for a fixed permutation pi: shifts 5, 10, 15 are distinct and non-zero
    mod 16, so the roles disagree with each other and with the identity (the base) at every code."""
    pi = list(range(N_CODES))
    random.Random("lragent.toy.handoff/perms").shuffle(pi)
    inv = {v: i for i, v in enumerate(pi)}
    return {role: tuple(pi[(inv[c] + shift) % N_CODES] for c in range(N_CODES))
            for role, shift in zip(ROLES, (5, 10, 15))}


PERMS: dict[str, tuple[int, ...]] = _make_perms()


def answer_of(role: str, code: int) -> int:
    """The reference answer of ``role`` for code ``k<code>`` (the base answers ``code`` itself)."""
    return PERMS[role][code]


@dataclass(frozen=True)
class Round:
    code: int                     # the tool output's code (0..15)
    fillers: tuple[int, ...]      # the other keys of the tool output (0..15, != code)
    position: int                 # index of the code among the tool output's keys
    speakers: tuple[str, ...]     # roles answering this round, in order (the first one is the writer)


@dataclass(frozen=True)
class Episode:
    rounds: tuple[Round, ...]


# ----------------------------------------------------------------------------------------------------- generation
def _split_seed(seed: int, split: str) -> str:
    return f"lragent.toy.handoff/{split}/{int(seed)}"


def sample_episode(rng: random.Random, *, n_rounds: tuple[int, int] = N_ROUNDS,
                   n_speakers: tuple[int, int] = N_SPEAKERS, roles: Sequence[str] = ROLES) -> Episode:
    """One episode from ``rng``. Consecutive rounds have different codes (so the latest code matters)."""
    rounds, prev = [], None
    for _ in range(rng.randint(*n_rounds)):
        code = rng.choice([c for c in range(N_CODES) if c != prev])
        fillers = tuple(rng.sample([c for c in range(N_CODES) if c != code], rng.randint(*N_FILLERS)))
        position = rng.randint(0, len(fillers))
        speakers = tuple(rng.sample(list(roles), rng.randint(n_speakers[0], min(n_speakers[1], len(roles)))))
        rounds.append(Round(code, fillers, position, speakers))
        prev = code
    return Episode(tuple(rounds))


def episodes(n: int, seed: int = 0, split: str = "train", **kw) -> list[Episode]:
    """``n`` episodes, deterministic in (seed, split); splits draw from independent streams."""
    rng = random.Random(_split_seed(seed, split))
    return [sample_episode(rng, **kw) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------ rendering
def tool_text(rd: Round) -> str:
    words = [f"k{k}" for k in rd.fillers]
    words.insert(rd.position, f"{MARKER} k{rd.code}")
    return "result " + " ".join(words) + " ."


def latest_code(text: str) -> int | None:
    """The code of the last tool output in a rendered transcript (None if there is none)."""
    found = re.findall(rf"tool : result [^.]*\b{MARKER} k(\d+)\b", text)
    return int(found[-1]) if found else None


def answer_text(n: int) -> str:
    return f"answer {n}"


def episode_messages(ep: Episode) -> list[dict]:
    """The reference transcript of an episode as chat messages ``{"role", "content"}``."""
    msgs = [{"role": "user", "content": USER_TEXT}]
    for rd in ep.rounds:
        msgs.append({"role": "tool", "content": tool_text(rd)})
        msgs += [{"role": r, "content": answer_text(answer_of(r, rd.code))} for r in rd.speakers]
    return msgs


def render(messages: Iterable[dict], next_role: str | None = None) -> str:
    """Canonical text of a transcript (the tokenizer's chat template); with ``next_role`` it ends with
    ``" <next_role> :"`` (a generation prompt)."""
    parts = [BOS] + [f"{m['role']} : {m['content']} {EOS}" for m in messages]
    if next_role is not None:
        parts.append(f"{next_role} :")
    return " ".join(parts)


def completion_text(content: str) -> str:
    return f" {content} {EOS}"


def turn_kinds(turns: Sequence[dict], roles: Sequence[str] = ROLES) -> list[str]:
    """Per turn: ``"context"`` (not a scored role), ``"writer"`` (the first role turn after the latest tool output,
    or any role turn before a tool output: it prefills the tokens it needs) or ``"reader"`` (a role turn whose latest
    tool output was prefilled by another role)."""
    out, writer = [], None
    for t in turns:
        if t["role"] not in roles:
            if t["role"] == "tool":
                writer = None
            out.append("context")
        elif writer is None or writer == t["role"]:
            writer = t["role"]
            out.append("writer")
        else:
            out.append("reader")
    return out


# -------------------------------------------------------------------------------------------------------- records
def turn_records(turns: Sequence[dict], roles: Sequence[str] = ROLES) -> list[dict]:
    """One record per scored role turn of a transcript (reference content as the completion)."""
    return [{"role": t["role"], "prompt": render(turns[:i], t["role"]), "completion": completion_text(t["content"])}
            for i, t in enumerate(turns) if t["role"] in roles]


def episode_records(ep: Episode) -> list[dict]:
    return turn_records(episode_messages(ep))


def make_records(n_per_role: int, seed: int = 0, split: str = "train", roles: Sequence[str] = ROLES,
                 exclude_prompts: set[str] | None = None, **episode_kw) -> list[dict]:
    """``n_per_role`` records for each role, grouped by episode (records of one episode are contiguous)."""
    rng = random.Random(_split_seed(seed, split))
    counts = {r: 0 for r in roles}
    out: list[dict] = []
    while min(counts.values()) < n_per_role:
        for rec in episode_records(sample_episode(rng, roles=roles, **episode_kw)):
            role = rec["role"]
            if counts[role] >= n_per_role or (exclude_prompts and rec["prompt"] in exclude_prompts):
                continue
            counts[role] += 1
            out.append(rec)
    return out


def held_out_episodes(n: int, seed: int = 0, exclude_prompts: set[str] | None = None, split: str = "eval",
                      **episode_kw) -> list[dict]:
    """``n`` held-out episodes in the episode-file form (``{"task", "id", "roles", "turns", "kinds"}``), from the
    ``split`` stream; an episode is skipped when any of its prompts is in ``exclude_prompts`` (the training
    prompts), so every scored prompt is unseen."""
    rng = random.Random(_split_seed(seed, split))
    out = []
    while len(out) < n:
        turns = episode_messages(sample_episode(rng, **episode_kw))
        if exclude_prompts and any(r["prompt"] in exclude_prompts for r in turn_records(turns)):
            continue
        out.append({"task": TASK, "id": f"{split}-{len(out)}", "roles": list(ROLES), "turns": turns,
                    "kinds": turn_kinds(turns)})
    return out


def make_splits(n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out records (independent streams; eval prompts never occur in train)."""
    train = make_records(n_train, seed, "train")
    evals = make_records(n_eval, seed, "eval", exclude_prompts={r["prompt"] for r in train})
    return train, evals


def write_dataset(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0,
                  n_episodes: int = 0) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (records per role) under ``out_dir``; with ``n_episodes`` also
    ``episodes.jsonl`` (held-out episodes, none of whose prompts occurs in train.jsonl)."""
    out = Path(out_dir)
    train, evals = make_splits(n_train, n_eval, seed)
    paths = {"train": write_jsonl(train, out / "train.jsonl"), "eval": write_jsonl(evals, out / "eval.jsonl")}
    if n_episodes:
        paths["episodes"] = episodes_jsonl(out / "episodes.jsonl", n_episodes, seed,
                                           exclude_prompts={r["prompt"] for r in train})
    return paths


def episodes_jsonl(path: str | Path, n: int, seed: int = 0, exclude_prompts: set[str] | None = None,
                   split: str = "eval") -> Path:
    """Write ``n`` held-out episodes (see the module docstring for the format)."""
    return write_jsonl(held_out_episodes(n, seed, exclude_prompts, split), path)


def read_episodes(path: str | Path, roles: Sequence[str] | None = None) -> list[dict]:
    """Read an episode file; checks each line has ``turns`` of ``{"role", "content"}`` and fills ``roles`` and
    ``kinds`` when absent."""
    out = []
    for i, ep in enumerate(read_jsonl(path), 1):
        turns = ep.get("turns")
        if not isinstance(turns, list) or not all(
                isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
                for t in turns):
            raise ValueError(f"{path}:{i}: 'turns' must be a list of {{'role', 'content'}} strings")
        rs = list(ep.get("roles") or roles or ROLES)
        out.append({**ep, "id": ep.get("id", f"episode-{i}"), "roles": rs,
                    "kinds": ep.get("kinds") or turn_kinds(turns, rs)})
    return out


# -------------------------------------------------------------------------------------------------------- scoring
_FORM = re.compile(r"^answer ([0-9]|1[0-5])$")


def _content(text: str) -> str:
    words = text.split()
    if EOS in words:
        words = words[:words.index(EOS)]
    return " ".join(words)


def is_well_formed(text: str) -> bool:
    """Whether ``text`` (a completion, with or without ``</s>``) is ``answer <0..15>``."""
    return bool(_FORM.match(_content(text)))


def score(records: Sequence[dict], predictions: Sequence[str]) -> dict[str, dict]:
    """Per-role exact match and well-formedness of ``predictions`` against ``records``."""
    return _task_score(records, predictions, lambda role, text: is_well_formed(text))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lragent.toy.handoff", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (train.jsonl, eval.jsonl, episodes.jsonl)")
    ap.add_argument("--n-train", type=int, default=2000, help="train records per role")
    ap.add_argument("--n-eval", type=int, default=200, help="eval records per role")
    ap.add_argument("--episodes", type=int, default=300, help="held-out episodes (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = write_dataset(args.out, args.n_train, args.n_eval, args.seed, n_episodes=args.episodes)
    for split, p in paths.items():
        print(f"{split}: {p}")


if __name__ == "__main__":
    main()
