"""The toy multi-role agent task: key lookup over one shared, growing transcript.

One *episode* is one database of 8-16 ``k<i> = <v>`` entries (keys ``k0..k63``, distinct values ``0..99``) and 1-4
*rounds*. Each round appends to the same transcript::

    user : find the value of k7 .              (first round only:)  tool : db : k3 = 41 ; k7 = 18 ; ... ;
    planner : lookup k7                        names the key the user asked for
    actor : answer 18                          copies that key's value from the db tool output
    reflector : correct | wrong                whether the actor turn it sees matches the db

In the transcript, the actor turn that the reflector (and later rounds) see is wrong about half of the time (a value
of another db key, or a random value), so the reflector must really check. The actor's own training target is always
the right value. Rendering is canonical (tokens separated by single spaces, see ``lragent.toy.tokenizer``)::

    <s> user : find the value of k7 . </s> tool : db : k3 = 41 ; k7 = 18 ; </s> planner : lookup k7 </s> actor :

A *record* is ``{"role", "prompt", "completion"}``: ``prompt`` is the transcript so far ending with ``"<role> :"``,
``completion`` is ``" <content> </s>"`` (leading space), so ``prompt + completion`` is the rendered transcript
through that turn. Exact match = the greedy completion equals ``completion`` (up to surrounding whitespace).

API: ``sample_episode`` / ``episodes`` (seeded generation), ``episode_messages`` / ``render`` (transcripts),
``episode_records`` / ``make_records`` / ``make_splits`` / ``write_dataset`` (records, JSONL), ``example_trajectory``
/ ``trajectory_file`` / ``write_trajectory`` (multi-role trajectories for serving), ``exact_match`` / ``score`` /
``is_well_formed`` / ``score_transcript`` (scoring).

CLI: ``python -m lragent.toy.task --out DIR [--n-train N --n-eval M --seed S]`` writes ``train.jsonl`` and
``eval.jsonl`` (N and M records *per role*).
"""
from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

ROLES = ("planner", "actor", "reflector")
N_KEYS = 64
N_VALUES = 100
DB_SIZE = (8, 16)      # inclusive range of db entries per episode
N_ROUNDS = (1, 4)      # inclusive range of rounds per episode
P_WRONG_ACTOR = 0.5    # probability that the actor turn shown in the transcript is wrong
BOS, EOS = "<s>", "</s>"


@dataclass(frozen=True)
class Round:
    key: int      # the key the user asks for
    value: int    # its value in the db (the right answer)
    shown: int    # the actor answer written into the transcript (== value about half of the time)

    @property
    def correct(self) -> bool:
        return self.shown == self.value


@dataclass(frozen=True)
class Episode:
    db: tuple[tuple[int, int], ...]   # (key, value) in display order
    rounds: tuple[Round, ...]


# ----------------------------------------------------------------------------------------------------- generation
def _split_seed(seed: int, split: str) -> str:
    # String seeds are hashed deterministically by random.Random (sha512), independent of PYTHONHASHSEED.
    return f"lragent.toy/{split}/{int(seed)}"


def sample_episode(rng: random.Random, *, db_size: tuple[int, int] = DB_SIZE, n_rounds: tuple[int, int] = N_ROUNDS,
                   p_wrong: float = P_WRONG_ACTOR) -> Episode:
    """One episode drawn from ``rng``. Keys and values are distinct within a db; each round asks a new key."""
    n = rng.randint(*db_size)
    keys = rng.sample(range(N_KEYS), n)
    values = rng.sample(range(N_VALUES), n)
    db = tuple(zip(keys, values))
    r = rng.randint(n_rounds[0], min(n_rounds[1], n))
    rounds = []
    for i in rng.sample(range(n), r):
        key, value = db[i]
        shown = value
        if rng.random() < p_wrong:
            if rng.random() < 0.5:   # a distractor: the value of another key of the same db
                shown = rng.choice([v for j, (_, v) in enumerate(db) if j != i])
            else:                    # any other value
                shown = rng.choice([v for v in range(N_VALUES) if v != value])
        rounds.append(Round(key, value, shown))
    return Episode(db, tuple(rounds))


def episodes(n: int, seed: int = 0, split: str = "train", **kw) -> list[Episode]:
    """``n`` episodes, deterministic in (seed, split); splits draw from independent streams."""
    rng = random.Random(_split_seed(seed, split))
    return [sample_episode(rng, **kw) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------ rendering
def user_text(key: int) -> str:
    return f"find the value of k{key} ."


def db_text(db: Sequence[tuple[int, int]]) -> str:
    return "db : " + " ".join(f"k{k} = {v} ;" for k, v in db)


def planner_text(key: int) -> str:
    return f"lookup k{key}"


def actor_text(value: int) -> str:
    return f"answer {value}"


def reflector_text(correct: bool) -> str:
    return "correct" if correct else "wrong"


def episode_messages(ep: Episode) -> list[dict]:
    """The full transcript of an episode as chat messages ``{"role", "content"}`` (actor turns as shown)."""
    msgs: list[dict] = []
    for i, rd in enumerate(ep.rounds):
        msgs.append({"role": "user", "content": user_text(rd.key)})
        if i == 0:
            msgs.append({"role": "tool", "content": db_text(ep.db)})
        msgs.append({"role": "planner", "content": planner_text(rd.key)})
        msgs.append({"role": "actor", "content": actor_text(rd.shown)})
        msgs.append({"role": "reflector", "content": reflector_text(rd.correct)})
    return msgs


def render(messages: Iterable[dict], next_role: str | None = None) -> str:
    """Canonical text of a transcript; with ``next_role`` it ends with ``" <next_role> :"`` (a generation prompt).

    Equal to the tokenizer's chat template (``apply_chat_template(messages, tokenize=False,
    add_generation_prompt=next_role is not None, role=next_role)``).
    """
    parts = [BOS]
    for m in messages:
        parts.append(f"{m['role']} : {m['content']} {EOS}")
    if next_role is not None:
        parts.append(f"{next_role} :")
    return " ".join(parts)


def completion_text(content: str) -> str:
    return f" {content} {EOS}"


# -------------------------------------------------------------------------------------------------------- records
def episode_records(ep: Episode) -> list[dict]:
    """All role records of one episode, in transcript order (planner, actor, reflector per round)."""
    msgs = episode_messages(ep)
    out = []
    targets = {"planner": lambda rd: planner_text(rd.key), "actor": lambda rd: actor_text(rd.value),
               "reflector": lambda rd: reflector_text(rd.correct)}
    r = -1
    for i, m in enumerate(msgs):
        if m["role"] == "planner":
            r += 1
        if m["role"] in targets:
            out.append({"role": m["role"], "prompt": render(msgs[:i], m["role"]),
                        "completion": completion_text(targets[m["role"]](ep.rounds[r]))})
    return out


def make_records(n_per_role: int, seed: int = 0, split: str = "train", roles: Sequence[str] = ROLES,
                 exclude_prompts: set[str] | None = None, **episode_kw) -> list[dict]:
    """``n_per_role`` records for each role, grouped by episode (records of one episode are contiguous).

    ``episode_kw`` (``db_size``, ``n_rounds``, ``p_wrong``) go to :func:`sample_episode`.
    """
    rng = random.Random(_split_seed(seed, split))
    counts = {r: 0 for r in roles}
    out: list[dict] = []
    while min(counts.values()) < n_per_role:
        for rec in episode_records(sample_episode(rng, **episode_kw)):
            role = rec["role"]
            if role not in counts or counts[role] >= n_per_role:
                continue
            if exclude_prompts and rec["prompt"] in exclude_prompts:
                continue
            counts[role] += 1
            out.append(rec)
    return out


def make_splits(n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out eval records (independent streams; eval prompts never occur in train)."""
    train = make_records(n_train, seed, "train")
    evals = make_records(n_eval, seed, "eval", exclude_prompts={r["prompt"] for r in train})
    return train, evals


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_dataset(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (records per role: n_train / n_eval) under ``out_dir``."""
    out = Path(out_dir)
    train, evals = make_splits(n_train, n_eval, seed)
    return {"train": write_jsonl(train, out / "train.jsonl"), "eval": write_jsonl(evals, out / "eval.jsonl")}


# -------------------------------------------------------------------------------------------------------- serving
def example_trajectory(seed: int = 0, n_rounds: int = 3, db_size: int = 12) -> list[dict]:
    """A multi-role trajectory (list of ``{"role", "content"}`` turns) with reference role turns (all correct).

    Replaying it turn by turn, each planner/actor/reflector turn is a request for that role whose prompt is
    ``render(turns[:i], role)`` and whose reference answer is ``turns[i]["content"]``.
    """
    rng = random.Random(_split_seed(seed, "trajectory"))
    ep = sample_episode(rng, db_size=(db_size, db_size), n_rounds=(n_rounds, n_rounds), p_wrong=0.0)
    return episode_messages(ep)


def trajectory_file(seed: int = 0, n_rounds: int = 3, db_size: int = 16, name: str | None = None) -> dict:
    """A trajectory in the ``lragent run --trajectory`` format: user/tool turns with content, role turns without
    (generated by the role's adapter when replayed). Score the replayed transcript with :func:`score_transcript`."""
    turns = [t if t["role"] not in ROLES else {"role": t["role"]}
             for t in example_trajectory(seed, n_rounds, db_size)]
    return {"name": name or f"toy_lookup_{n_rounds}_rounds_seed{seed}",
            "description": f"Toy lookup task: a {db_size}-entry db tool output, then {n_rounds} rounds of "
                           "planner -> actor -> reflector on one growing transcript.",
            "defaults": {"max_new_tokens": 8, "temperature": 0},
            "turns": turns}


def write_trajectory(path: str | Path, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trajectory_file(**kw), indent=1) + "\n")
    return path


# -------------------------------------------------------------------------------------------------------- scoring
_FORMS = {
    "planner": re.compile(r"^lookup k([0-9]|[1-5][0-9]|6[0-3])$"),
    "actor": re.compile(r"^answer ([0-9]|[1-9][0-9])$"),
    "reflector": re.compile(r"^(correct|wrong)$"),
}


def _content(text: str) -> str:
    words = text.split()
    if EOS in words:
        words = words[:words.index(EOS)]
    return " ".join(words)


def is_well_formed(role: str, text: str) -> bool:
    """Whether ``text`` (a completion, with or without ``</s>``) is a well-formed turn for ``role``."""
    return bool(_FORMS[role].match(_content(text)))


def exact_match(prediction: str, reference: str) -> bool:
    """Greedy completion equals the reference completion (whitespace-normalised; both must end the turn)."""
    p, r = prediction.split(), reference.split()
    if EOS in r:   # the reference ends with </s>: the prediction must stop there too (anything after is ignored)
        p = p[:p.index(EOS) + 1] if EOS in p else p
    return p == r


def score(records: Sequence[dict], predictions: Sequence[str], well_formed=None) -> dict[str, dict]:
    """Per-role exact-match accuracy and well-formedness rate of ``predictions`` against ``records``;
    ``well_formed(role, text)`` defaults to this task's :func:`is_well_formed`."""
    well_formed = well_formed or is_well_formed
    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
    out: dict[str, dict] = {}
    for rec, pred in zip(records, predictions):
        s = out.setdefault(rec["role"], {"n": 0, "exact_match": 0, "well_formed": 0})
        s["n"] += 1
        s["exact_match"] += exact_match(pred, rec["completion"])
        s["well_formed"] += well_formed(rec["role"], pred)
    for s in out.values():
        s["exact_match"] /= s["n"]
        s["well_formed"] /= s["n"]
    return out


def score_transcript(messages: Sequence[dict]) -> dict:
    """Check every planner / actor / reflector turn of a transcript (e.g. one generated turn by turn) against the db.

    The planner must name the key of the latest user request, the actor must answer that key's db value, the
    reflector must say ``correct`` iff the actor turn just before it did. Returns per-role ``{"n", "correct"}``
    (fraction) and ``"turns"``: ``[(index, role, ok)]``.
    """
    db: dict[int, int] = {}
    asked: int | None = None
    last_answer: str | None = None
    turns, per = [], {r: [0, 0] for r in ROLES}
    for i, m in enumerate(messages):
        role, content = m["role"], _content(m.get("content") or "")
        if role == "tool":
            db.update({int(k): int(v) for k, v in re.findall(r"k(\d+) = (\d+) ;", content)})
        elif role == "user":
            found = re.findall(r"find the value of k(\d+) \.", content)
            asked = int(found[-1]) if found else None
        if role not in ROLES:
            continue
        truth = db.get(asked) if asked is not None else None
        if role == "planner":
            ok = asked is not None and content == planner_text(asked)
        elif role == "actor":
            last_answer = content
            ok = truth is not None and content == actor_text(truth)
        else:
            right = truth is not None and last_answer == actor_text(truth)
            ok = content == reflector_text(right)
        turns.append((i, role, ok))
        per[role][0] += 1
        per[role][1] += ok
    out: dict = {r: {"n": n, "correct": c / n} for r, (n, c) in per.items() if n}
    out["turns"] = turns
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lragent.toy.task", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (train.jsonl, eval.jsonl)")
    ap.add_argument("--n-train", type=int, default=2000, help="train records per role")
    ap.add_argument("--n-eval", type=int, default=200, help="eval records per role")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = write_dataset(args.out, args.n_train, args.n_eval, args.seed)
    for split, p in paths.items():
        print(f"{split}: {p}")


if __name__ == "__main__":
    main()
