"""``lragent generate | run | chat``: the serving commands (``add_serve_commands`` registers them on a parser).

    lragent generate --bundle B --role planner --prompt "find the value of k7 ." [--mode M] [--json]
    lragent run --bundle B --trajectory examples/trajectories/toy_lookup_3_rounds.json --mode all
    lragent chat --bundle B [--role planner]        (/role NAME, /tool TEXT, /go, /reset, /stats, /quit)

Errors are one line on stderr and exit code 2. Also runnable as ``python -m lragent.serve.cli``.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from lragent.bundle import BundleError

from lragent.modes import MODES

from .chat import chat_loop, check_chat, enable_line_editing
from .config import ATTENTION_BACKENDS, ServeConfig, ServeError
from .engine import Engine
from .report import comparison_table, human_bytes, summary_table, turns_table
from .sampling import SamplingParams
from .tokens import NoChatTemplate
from .trajectory import check_roles, load_trajectory, replay, summarize


def _engine_args(p: argparse.ArgumentParser, *, allow_all: bool = False) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory (lragent export / import-peft)")
    p.add_argument("--base", default=None, help="base model directory (default: the path recorded in the bundle)")
    modes = list(MODES) + (["all"] if allow_all else [])
    p.add_argument("--mode", default=None, metavar="|".join(modes),
                   help="cache mode (default: lrshared when the bundle shares A on every cached target, "
                        "else nonshared)" + ("; all: compare every mode" if allow_all else ""))
    d = ServeConfig()
    p.add_argument("--dtype", default=d.dtype, help="float32 | float16 | bfloat16 (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=d.device, help="cpu | cuda[:N] | auto")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per cache block")
    p.add_argument("--cache-tokens", type=int, default=d.cache_tokens, help="cache pool capacity in tokens")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help="tokens per engine step (longer prompts are prefilled in chunks)")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences running at once")
    p.add_argument("--workspace-tokens", type=int, default=d.workspace_tokens,
                   help="low-rank modes, torch attention: rows of expanded K' kept for running requests "
                        "(default: --cache-tokens; 0: none, re-expand every step)")
    p.add_argument("--attention", default=d.attention, help=" | ".join(ATTENTION_BACKENDS))
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up request (first-call overheads) "
                   "before timing")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (run: the trajectory's)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", default=None)


def _sampling_overrides(args) -> dict:
    d = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
         "seed": args.seed, "stop": tuple(args.stop) if args.stop else None, "ignore_eos": args.ignore_eos}
    return {k: v for k, v in d.items() if v is not None}


def serve_config(args, mode) -> ServeConfig:
    """The engine config of the command-line options (validated once, in ServeConfig)."""
    if args.threads is not None:
        if args.threads < 1:
            raise ServeError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return ServeConfig(mode=mode, dtype=args.dtype, device=args.device, block_size=args.block_size,
                       cache_tokens=args.cache_tokens, max_batch_tokens=args.max_batch_tokens,
                       max_num_seqs=args.max_num_seqs, attention=args.attention,
                       workspace_tokens=args.workspace_tokens)


def _make_engine(args, mode, base=None) -> Engine:
    return Engine(args.bundle, serve_config(args, mode), base=args.base or base,
                  base_candidates=getattr(args, "base_candidates", ()))


def text_arg(text: str, name: str) -> str:
    """A command-line string that must be valid UTF-8 (argv bytes that are not arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ServeError(f"{name} is not valid UTF-8 text") from None
    return text


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _guard(fn):
    def run(args) -> int:
        try:
            return fn(args) or 0
        except (ServeError, BundleError) as e:
            return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
        except KeyboardInterrupt:
            return 130
    run.__name__ = fn.__name__
    return run


def _cache_line(st: dict) -> str:
    return (f"cache: base {human_bytes(st['base_bytes'])}, low-rank {human_bytes(st['lowrank_bytes'])}, "
            f"free {human_bytes(st['free_bytes'])} (mode {st['mode']})")


# ---------------------------------------------------------------------------------------------------- generate
@_guard
def cmd_generate(args) -> int:
    engine = _make_engine(args, args.mode)
    role = args.role or engine.roles[0]
    engine.role_index(role)
    if not args.no_warmup:
        engine.warmup()
    prompt = text_arg(args.prompt, "--prompt")
    ids = None
    if not args.raw:
        try:
            ids = engine.render([{"role": "user", "content": prompt}], role)
        except NoChatTemplate:
            print("note: the base model's tokenizer has no chat template; using the prompt as raw text",
                  file=sys.stderr)
    if ids is None:
        ids = engine.encode(prompt)
    out = engine.generate(ids, role, SamplingParams(**_sampling_overrides(args)))
    st = engine.stats()
    if args.json:
        print(json.dumps({**out.as_dict(), "mode": engine.mode, "engine": st}))
    else:
        print(out.text)
        s = out.stats
        print(f"[{role}] prompt {s.prompt_tokens} tokens (prefilled {s.prefilled_tokens}, reused {s.reused_tokens}), "
              f"TTFT {s.ttft_s * 1e3:.1f} ms, {s.generated_tokens} tokens at {s.decode_tok_s:.0f} tok/s, "
              f"finish: {out.finish_reason}; {_cache_line(st)}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------------- run
@_guard
def cmd_run(args) -> int:
    """``lragent run``: replay a trajectory per mode; a turn that cannot run stops its mode, keeping (printing)
    the completed turns, and ends in one ``error:`` line naming the file and the turn (exit 2)."""
    traj = load_trajectory(args.trajectory)
    if args.repeat < 1:
        raise ServeError("--repeat must be >= 1")
    if args.mode not in (None, "all") and args.mode not in MODES:
        raise ServeError(f"unknown mode {args.mode!r}: use one of {', '.join(MODES)} or all")
    overrides = _sampling_overrides(args)
    SamplingParams(**overrides)                      # a bad flag is refused as the flag, before any turn
    traj.defaults = {**traj.defaults, **overrides}
    traj.check_params()
    modes = list(MODES) if args.mode == "all" else [args.mode]
    engines, skipped = {}, {}
    for mode in modes:
        try:
            engine = _make_engine(args, mode, base=traj.base)
        except ServeError as e:
            if args.mode != "all":
                raise
            skipped[mode] = str(e)
            continue
        check_roles(traj, engine.roles)
        if not args.no_warmup:
            engine.warmup()
        engines[engine.mode] = engine
    if not engines:
        raise ServeError(next(iter(skipped.values())))
    rep = replay(engines, traj, args.repeat)
    if args.json:
        print_run_json(traj, rep, skipped)
    else:
        print_run_text(traj, rep, engines, skipped, args.repeat)
    return run_exit(rep, json_mode=args.json)


def print_run_text(traj, rep, engines: dict, skipped: dict, repeat: int) -> None:
    """The per-turn table of each mode (the turns completed, for a mode a turn stopped), then the comparison."""
    for mode, results in rep.turns.items():
        engine = engines[mode]
        print(f"== {traj.name}: mode {engine.mode} ({len(engine.roles)} roles, {engine.dtype}, "
              f"{engine.device}, block {engine.block_size}, attention {engine.runner.attention}"
              f"{f', median of {repeat} runs' if repeat > 1 else ''})")
        print(turns_table(results))
        if mode in rep.errors:
            print(f"stopped at turn {rep.errors[mode].turn} ({rep.errors[mode].role}): {len(results)} turn(s) "
                  f"completed")
        print(_cache_line(engine.stats()))
        print()
    if len(rep.turns) > 1:
        summaries = {m: summarize(rs) for m, rs in rep.turns.items()}
        print(f"== {traj.name}: modes side by side (prompt tokens prefilled/reused, TTFT)")
        print(comparison_table(rep.turns))
        print()
        print(summary_table(summaries))
        if rep.errors:
            print(f"(stopped early: {', '.join(rep.errors)}; their totals cover the turns they completed)")
    for mode, why in skipped.items():
        print(f"{mode}: skipped ({why})")


def print_run_json(traj, rep, skipped: dict) -> None:
    """One JSON document: per mode its turns (those completed, where a turn stopped it), summary and error."""
    modes = {}
    for m, rs in rep.turns.items():
        modes[m] = {"turns": [r.as_dict() for r in rs], "summary": summarize(rs)}
        if m in rep.errors:
            modes[m]["error"] = str(rep.errors[m])
    doc = {"trajectory": traj.name, "modes": modes, "skipped": skipped}
    error = run_error(rep)
    if error:
        doc["error"] = error
    print(json.dumps(doc), flush=True)


def run_error(rep) -> str | None:
    """The one-line error of a replay that did not complete (the first mode stopped, naming the others), or None."""
    if rep.interrupted:
        return "interrupted"
    if not rep.errors:
        return None
    (mode, first), *rest = rep.errors.items()
    msg = str(first)
    if len(rep.turns) > 1:
        msg += f" (mode {mode}" + (f"; also stopped: {', '.join(m for m, _ in rest)}" if rest else "") + ")"
    return msg


def run_exit(rep, *, json_mode: bool) -> int:
    """0 when every mode completed; else one ``error:`` line (saying where the completed turns are) and 2, or 130
    after Ctrl-C."""
    error = run_error(rep)
    if error is None:
        return 0
    kept = "in the JSON output" if json_mode else "printed above"
    print(f"error: {error}; the completed turns are {kept}", file=sys.stderr)
    return 130 if rep.interrupted else 2


# -------------------------------------------------------------------------------------------------------- chat
@_guard
def cmd_chat(args) -> int:
    """``lragent chat``: the interactive loop of ``chat.py`` (refuses at start only what no turn could survive)."""
    enable_line_editing()
    engine = _make_engine(args, args.mode)
    role = args.role or engine.roles[0]
    engine.role_index(role)
    params = SamplingParams(**{"max_new_tokens": 64, **_sampling_overrides(args)})
    check_chat(engine, role, params)
    if not args.no_warmup:
        engine.warmup()
    return chat_loop(engine, role, params, json_mode=args.json, stats_line=_cache_line)


# ------------------------------------------------------------------------------------------------------- serve
@_guard
def cmd_serve(args) -> int:
    try:
        from .api.server import run_server
    except ImportError as e:
        raise ServeError(f"lragent serve needs the server extra ({e.name} is missing): pip install 'lragent[serve]'")
    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port must be in 0..65535, got {args.port}")
    if args.max_queue is not None and args.max_queue < 1:
        raise ServeError(f"--max-queue must be >= 1, got {args.max_queue}")
    engine = _make_engine(args, args.mode)
    if not args.no_warmup:
        engine.warmup()
    return run_server(engine, host=args.host, port=args.port, api_key=args.api_key, max_queue=args.max_queue,
                      drain_s=args.drain_timeout)


# ----------------------------------------------------------------------------------------------------- wiring
def add_serve_commands(subparsers) -> None:
    """Register ``generate``, ``run``, ``chat`` and ``serve`` (each sets ``func``: args -> exit code)."""
    p = subparsers.add_parser("generate", help="one request for one role")
    _engine_args(p)
    p.add_argument("--role", default=None, help="role adapter to use (default: the bundle's first role)")
    p.add_argument("--prompt", required=True, help="user message (rendered with the chat template for --role)")
    p.add_argument("--raw", action="store_true", help="tokenize --prompt as is (no chat template)")
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("run", help="replay a multi-role trajectory; per-turn TTFT, reuse, cache bytes")
    _engine_args(p, allow_all=True)
    p.add_argument("--trajectory", required=True, help="trajectory JSON file (see examples/trajectories/)")
    p.add_argument("--repeat", type=int, default=1, help="replay N times (fresh cache each) and report the median "
                   "TTFT / decode speed per turn")
    _sampling_args(p)
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("chat", help="interactive; /role NAME switches role")
    _engine_args(p)
    p.add_argument("--role", default=None, help="starting role (default: the bundle's first role)")
    _sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server; every role is a model")
    _engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--max-queue", type=int, default=None, help="requests in flight before 429 (default: no limit)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds requests in flight get on SIGTERM")
    p.set_defaults(func=cmd_serve)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lragent.serve.cli", description="lragent serving commands")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
