"""A planner / actor / reflector agent loop written only against the official ``openai`` client.

Every role is a model of one ``lragent serve`` server; all roles read the same growing transcript, and each turn
prints how many prompt tokens came from the shared cache (``usage.prompt_tokens_details.cached_tokens``): in the
shared modes the next role reuses what the previous role computed.

    lragent serve --bundle bundles/tiny &                      # the embedded default (examples/quickstart.sh)
    python examples/agents/react_loop.py --rounds 3            # --base-url http://127.0.0.1:8000/v1
"""
from __future__ import annotations

import argparse
import random
import time

from openai import OpenAI


def tool_db(rng: random.Random, n: int = 12) -> dict[str, int]:
    """The 'database' tool of the toy task: n keys with distinct values."""
    keys = rng.sample(range(64), n)
    return {f"k{k}": v for k, v in zip(keys, rng.sample(range(100), n))}


def turn(client: OpenAI, role: str, messages: list[dict], max_tokens: int) -> tuple[str, int, int, float]:
    """One role speaks: (text, prompt tokens, cached prompt tokens, time to first token in ms)."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=role, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, ttft, usage = "", None, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else (time.perf_counter() - t0) * 1e3
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return text.strip(), usage.prompt_tokens, cached, ttft or 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    roles = [m.id for m in client.models.list().data if m.parent is not None]     # the role adapters
    print(f"roles: {', '.join(roles)}")
    rng = random.Random(args.seed)
    db = tool_db(rng)
    messages: list[dict] = []
    for r in range(args.rounds):
        key = rng.choice(sorted(db))
        messages.append({"role": "user", "content": f"find the value of {key} ."})
        if r == 0:   # the tool's output enters the shared transcript once
            messages.append({"role": "tool", "content": "db : " + " ".join(f"{k} = {v} ;" for k, v in db.items())})
        for role in ("planner", "actor", "reflector"):
            text, prompt, cached, ttft = turn(client, role, messages, max_tokens=8)
            messages.append({"role": "assistant", "name": role, "content": text})
            print(f"round {r + 1}  {role:<9} prompt {prompt:4d}  cached {cached:4d}  TTFT {ttft:6.1f} ms  : {text}")
        print(f"          (the db says {key} = {db[key]})")


if __name__ == "__main__":
    main()
