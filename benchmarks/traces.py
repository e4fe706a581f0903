"""Seeded synthetic multi-role traces shaped like ReAct trajectories, for ``bench_trajectory.py``.

A trace is token-level: a shared prefix (system prompt, tool descriptions, the task), then rounds in which every
role takes one turn in order; after the second role's turn (the actor's tool call) a tool observation is appended.
Every turn reads the whole transcript so far and generates ``decode`` tokens, which are appended to it. Lengths
are drawn from a seeded RNG so that the transcript ends near ``context`` tokens.

    python benchmarks/traces.py --context 17000 --roles 3 --out react_17k.json     # write one as JSON

``react17k`` is the shape of a 3-agent ReAct run of about 17K tokens (a 1.5K-token system prompt and task, six
rounds of planner -> actor -> tool output -> reflector with observations of about 2.5K tokens).
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass, field


@dataclass
class TraceTurn:
    role: str
    append: int          # tokens appended to the transcript before this turn (a tool observation), may be 0
    decode: int          # tokens this role generates


@dataclass
class Trace:
    name: str
    prefix: int                          # tokens of the shared start (system prompt + task)
    turns: list[TraceTurn] = field(default_factory=list)
    seed: int = 0

    @property
    def roles(self) -> list[str]:
        """The roles in order of first appearance."""
        return list(dict.fromkeys(t.role for t in self.turns))

    def total_tokens(self) -> int:
        """Transcript length after the last turn."""
        return self.prefix + sum(t.append + t.decode for t in self.turns)

    def token_ids(self, vocab: int, salt: int = 0, lo: int = 4) -> tuple[list[int], list[list[int]]]:
        """Seeded random ids for the prefix and for each turn's appended tokens (ids in [lo, vocab)); another
        ``salt`` gives other ids of the same lengths (each repeat its own, so no cache carries over)."""
        rng = random.Random((self.seed * 7919 + 1) * 1000003 + salt)
        draw = lambda n: [rng.randrange(lo, vocab) for _ in range(n)]  # noqa: E731
        return [1] + draw(self.prefix - 1), [draw(t.append) for t in self.turns]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "Trace":
        return cls(obj["name"], obj["prefix"], [TraceTurn(**t) for t in obj["turns"]], obj.get("seed", 0))


def react_trace(context: int, roles: list[str], *, rounds: int | None = None, decode=(16, 32),
                prefix_share: float = 0.15, seed: int = 0, name: str | None = None) -> Trace:
    """A ReAct-shaped trace over ``roles`` ending near ``context`` tokens: ``rounds`` rounds (default: about 12
    turns, at least 2 rounds) of one turn per role, a tool observation after the second role's turn (after the only
    role's turn when there is one)."""
    rng = random.Random(seed)
    rounds = rounds or max(2, 12 // len(roles))
    prefix = max(8, round(context * prefix_share))
    decodes = [[rng.randint(*decode) for _ in roles] for _ in range(rounds)]
    budget = context - prefix - sum(map(sum, decodes))
    weights = [rng.uniform(0.7, 1.3) for _ in range(rounds)]
    obs = [max(0, round(budget * w / sum(weights))) for w in weights]
    tool_after = min(1, len(roles) - 1)
    turns, pending = [], 0
    for r in range(rounds):
        for i, role in enumerate(roles):
            turns.append(TraceTurn(role, pending, decodes[r][i]))
            pending = obs[r] if i == tool_after else 0
    return Trace(name or f"react-{context // 1000}k-{len(roles)}roles", prefix, turns, seed)


def react17k(roles: list[str], seed: int = 0) -> Trace:
    """The 17K-token, 3-agent ReAct shape (six rounds)."""
    return react_trace(17000, roles, rounds=6, decode=(32, 96), prefix_share=0.09, seed=seed, name="react-17k")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--roles", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    from workload import Spec
    names = Spec(roles=a.roles).role_names()
    t = react_trace(a.context, names, rounds=a.rounds, seed=a.seed)
    with open(a.out, "w") as f:
        json.dump(t.to_json(), f, indent=1)
    print(f"{a.out}: {len(t.turns)} turns, {t.total_tokens()} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
