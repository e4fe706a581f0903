"""``lragent chat``: the interactive loop on one engine (the command's options are parsed in ``cli``).

Each line is a user message (the current role replies), or a command: /role NAME, /go, /tool TEXT, /reset, /stats,
/quit. The chat never exits for a turn that cannot run: when the transcript outgrows the model's context or the
cache pool, its oldest messages are dropped until it fits (said on stderr); any other problem with a turn is one
``error:`` line on stderr and the chat goes on. With ``json_mode`` stdout carries only JSON lines (one per reply);
the prompt, help and notes go to stderr.
"""
from __future__ import annotations

import json
import sys

from .config import ServeError
from .sampling import SamplingParams

CHAT_HELP = ("type a message (appended as 'user', then the current role replies); /role NAME switches role; "
             "/go lets the current role speak; /tool TEXT appends a tool observation; /reset; /stats; /quit")


def enable_line_editing() -> bool:
    """Import ``readline`` for its side effect on ``input()`` (cursor keys, history); False where it is missing."""
    try:
        import readline  # noqa: F401
    except ImportError:
        return False
    return True


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def fit_transcript(engine, messages: list[dict], role: str, params: SamplingParams) -> tuple[list[int], int]:
    """The prompt ids for ``role`` to reply to ``messages``, and how many of the oldest messages had to be dropped
    so that prompt + ``max_new_tokens`` fits the model's context and the cache pool. When not even the last message
    alone fits (or the problem is not the length), raises the ServeError of that shortest transcript."""
    last = None
    for k in range(max(1, len(messages))):           # an empty transcript is rendered once too
        try:
            ids = engine.render(messages[k:], role)
            engine.make_request(ids, role, params)           # checks context, window and pool; queues nothing
            return ids, k
        except ServeError as e:
            last = e
    raise last


def check_chat(engine, role: str, params: SamplingParams) -> None:
    """Refuse at start what would make every turn fail: no chat template, or max_new_tokens that leave no room for
    a prompt in the context or the cache pool."""
    engine.render([{"role": "user", "content": "hi"}], role)
    engine.make_request([engine.cfg.bos_token_id or 0], role, params)


def _read(prompt: str, json_mode: bool, read) -> str:
    if json_mode:                        # stdout is the JSON stream: the prompt goes to stderr
        sys.stderr.write(prompt)
        sys.stderr.flush()
        return read()
    return read(prompt)


def chat_loop(engine, role: str, params: SamplingParams, *, json_mode: bool = False, read=None,
              stats_line=str) -> int:
    """Run the chat until /quit or end of input; returns the exit code (0). ``read`` defaults to ``input`` (looked
    up at call time); ``stats_line(engine.stats())`` is what /stats prints."""
    read = read or (lambda *prompt: input(*prompt))
    messages: list[dict] = []
    err = sys.stderr
    print(f"roles: {', '.join(engine.roles)}; mode {engine.mode}. {CHAT_HELP}", file=err)
    while True:
        try:
            line = _read(f"{role}> ", json_mode, read).strip()
            line.encode("utf-8")
        except EOFError:
            return 0
        except UnicodeError:                 # bytes that are not UTF-8 (strict stdin, or surrogate escapes)
            print("error: that line is not valid UTF-8 text; it was ignored, the chat goes on", file=err)
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line.startswith("/role"):
            name = line[5:].strip()
            if name not in engine.roles:
                print(f"unknown role {name!r}: roles are {', '.join(engine.roles)}", file=err)
            else:
                role = name
            continue
        if line == "/reset":
            messages.clear()
            print("transcript cleared", file=err)
            continue
        if line == "/stats":
            print(stats_line(engine.stats()), file=err)
            continue
        if line.startswith("/tool"):
            messages.append({"role": "tool", "content": line[5:].strip()})
            continue
        if line.startswith("/") and line != "/go":
            print(CHAT_HELP, file=err)
            continue
        if not line:
            continue
        if line != "/go":
            messages.append({"role": "user", "content": line})
        _reply(engine, messages, role, params, json_mode)


def _reply(engine, messages: list[dict], role: str, params: SamplingParams, json_mode: bool) -> None:
    err = sys.stderr
    try:
        ids, dropped = fit_transcript(engine, messages, role, params)
    except ServeError as e:
        if messages and messages[-1]["role"] in ("user", "tool"):
            messages.pop()
            print(f"error: {_one_line(e)}; your last message was removed (even on its own it cannot be answered), "
                  f"the chat goes on", file=err)
        else:
            print(f"error: {_one_line(e)}; the chat goes on (/reset clears the transcript)", file=err)
        return
    if dropped:
        total = len(messages)
        del messages[:dropped]
        print(f"note: the transcript outgrew the model's context or the cache pool: dropped the {dropped} oldest of "
              f"{total} messages so that it fits (/reset starts over)", file=err)
    try:
        out = engine.generate(ids, role, params)
    except (ServeError, MemoryError) as e:
        print(f"error: {_one_line(e)}; the chat goes on", file=err)
        return
    text = out.text.strip()
    messages.append({"role": role, "content": text})
    s = out.stats
    if json_mode:
        print(json.dumps({**out.as_dict(), "dropped_messages": dropped}), flush=True)
    else:
        print(f"{role} : {text}", flush=True)
        print(f"  [prefilled {s.prefilled_tokens}, reused {s.reused_tokens}, TTFT {s.ttft_s * 1e3:.1f} ms, "
              f"{s.decode_tok_s:.0f} tok/s]", file=err)
