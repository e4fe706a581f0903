"""Interop check: the bundle's PEFT adapters served by vLLM generate the same greedy tokens as lragent's engine.

    python benchmarks/interop_vllm.py --bundle bundles/tiny_handoff \\
        [--trajectory examples/trajectories/handoff_3_rounds.json] [--vllm PATH] [--ignore-eos]

The trajectory's generated turns are replayed through (a) lragent's ``Engine`` in mode ``nonshared`` (fp32,
in-process) and (b) ``vllm serve`` on the same base model (the manifest's base path, resolved as the engine
resolves it) with the bundle's ``peft/<role>`` adapters as LoRA models (fp32, see ``vllm_peer``). Each turn's
prompt is rendered once by the engine (``Engine.render``: the chat template, as ``lragent run`` does) and the SAME
token ids go to both: vLLM gets them as ``/v1/completions`` ``prompt`` (a list of ints), ``model=<role>``,
temperature 0, the turn's ``max_tokens`` and stop strings, and returns its generated ids via ``logprobs: 1,
return_tokens_as_token_ids: true`` ("token_id:N"). The transcript is teacher-forced: the next turn's prompt is
built from the engine's output only, so one mismatch cannot cascade.

Stopping: by default both systems stop on EOS, the turn's stop strings, or max_tokens, and the ids are compared up
to where each stopped (a trailing EOS id is dropped from both; a different stopping point is a mismatch).
``--ignore-eos`` sends ``ignore_eos`` to both, so each generates exactly max_tokens ids (stop strings still apply).

Prints a table (turn, role, prompt tokens, generated ids each, match, first differing position) and the wall
times. Exit status: 0 all turns match, 1 some differ, 2 vLLM not found (a one-line note) or bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_peer import find_vllm, get_json, post_json, vllm_missing_reason, vllm_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def vllm_token_ids(choice: dict) -> list[int]:
    """The generated token ids of one /v1/completions choice: ``token_ids`` when the server returns them, else
    the ``logprobs.tokens`` strings "token_id:N" (``return_tokens_as_token_ids``)."""
    if choice.get("token_ids") is not None:
        return [int(t) for t in choice["token_ids"]]
    toks = (choice.get("logprobs") or {}).get("tokens") or []
    return [int(t.split(":", 1)[1]) for t in toks]


def first_diff(a: list[int], b: list[int]) -> int | None:
    """The first position where the two id lists differ (the shorter one's length if one is a prefix of the
    other), or None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def strip_eos(ids: list[int], eos: set[int], ignore_eos: bool) -> list[int]:
    """``ids`` without a final EOS id (kept when EOS is ignored: then it is an ordinary generated token)."""
    return ids[:-1] if ids and not ignore_eos and ids[-1] in eos else ids


def replay(engine, traj, url: str, ignore_eos: bool) -> list[dict]:
    """Replay ``traj``'s generated turns on ``engine`` and on the vLLM server at ``url`` (teacher-forced by the
    engine's outputs); per generated turn: its index, role, prompt length, both id lists and finish reasons."""
    from lragent.serve.trajectory import check_roles

    check_roles(traj, engine.roles)
    traj.check_params()
    eos, messages, rows = set(engine.eos_ids), [], []
    for i, turn in enumerate(traj.turns, 1):
        if turn.content is not None:
            messages.append({"role": turn.role, "content": turn.content})
            continue
        params = traj.params(turn)
        if ignore_eos:
            params = dataclasses.replace(params, ignore_eos=True)
        ids = engine.render(messages, turn.role)
        ours = engine.generate(ids, turn.role, params)
        body = {"model": turn.role, "prompt": ids, "max_tokens": params.max_new_tokens, "temperature": 0.0,
                "logprobs": 1, "return_tokens_as_token_ids": True, "ignore_eos": params.ignore_eos,
                "skip_special_tokens": True}
        if params.stop:
            body["stop"] = list(params.stop)
        choice = post_json(f"{url}/completions", body)["choices"][0]
        rows.append({"turn": i, "role": turn.role, "prompt_tokens": len(ids),
                     "ours": strip_eos(list(ours.token_ids), eos, params.ignore_eos),
                     "vllm": strip_eos(vllm_token_ids(choice), eos, params.ignore_eos),
                     "ours_finish": ours.finish_reason, "vllm_finish": choice.get("finish_reason"),
                     "ours_text": ours.text, "vllm_text": choice.get("text", "")})
        messages.append({"role": turn.role, "content": ours.text.strip()})     # as run_trajectory does
    return rows


def print_table(rows: list[dict]) -> bool:
    """Print one line per generated turn (plus both id lists where they differ); True when every turn matches."""
    print(f"{'turn':>4}  {'role':<10} {'prompt':>6} {'ours':>4} {'vllm':>4}  {'finish (ours/vllm)':<18} "
          f"{'match':<5} first diff")
    ok = True
    for r in rows:
        d = first_diff(r["ours"], r["vllm"])
        ok &= d is None
        print(f"{r['turn']:>4}  {r['role']:<10} {r['prompt_tokens']:>6} {len(r['ours']):>4} {len(r['vllm']):>4}  "
              f"{r['ours_finish'] + '/' + str(r['vllm_finish']):<18} {'yes' if d is None else 'NO':<5} "
              f"{'-' if d is None else d}")
        if d is not None:
            print(f"      ours {r['ours']} {r['ours_text']!r}\n      vllm {r['vllm']} {r['vllm_text']!r}")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--trajectory", default=str(ROOT / "examples/trajectories/handoff_3_rounds.json"))
    ap.add_argument("--vllm", default=None, help="vllm executable (default: $LRAGENT_VLLM, else vllm on PATH)")
    ap.add_argument("--base", default=None, help="base model directory (default: the bundle's recorded base)")
    ap.add_argument("--attention", default="auto", help="the engine's attention backend (auto|torch|triton|reference)")
    ap.add_argument("--ignore-eos", action="store_true", help="both generate exactly max_tokens ids per turn")
    ap.add_argument("--log", default=None, help="vLLM server log file (default: a temporary file)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for vLLM to come up")
    args = ap.parse_args(argv)

    exe = find_vllm(args.vllm)
    if exe is None:
        print(f"vLLM not found ({vllm_missing_reason(args.vllm)}): interop check skipped")
        return 2
    from lragent.bundle import read_manifest
    from lragent.serve import Engine, ServeConfig, ServeError, load_trajectory

    t0 = time.perf_counter()
    try:
        traj = load_trajectory(args.trajectory)
        engine = Engine(args.bundle, ServeConfig(mode="nonshared", dtype="float32",
                                                     attention=args.attention), base=args.base)
    except (ServeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    peft = {r: Path(args.bundle) / p for r, p in (read_manifest(Path(args.bundle)).get("peft") or {}).items()}
    missing = [r for r in engine.roles if r not in peft]
    if missing:
        print(f"error: bundle {args.bundle} has no PEFT copy for roles {missing}", file=sys.stderr)
        return 2
    t_engine = time.perf_counter() - t0
    print(f"bundle {args.bundle}: base {engine.base_dir}, roles {', '.join(engine.roles)}, rank "
          f"{engine.bundle.rank}; engine nonshared fp32 on {engine.device} "
          f"({args.attention} attention); vLLM {exe}")
    t1 = time.perf_counter()
    with vllm_server(exe, engine.base_dir, peft, max_lora_rank=engine.bundle.rank,
                     max_model_len=engine.cfg.max_position_embeddings, log_path=args.log,
                     timeout_s=args.timeout) as url:
        t_up = time.perf_counter() - t1
        try:
            version = get_json(url.rsplit("/v1", 1)[0] + "/version").get("version", "?")
        except (OSError, ValueError):
            version = "?"
        t2 = time.perf_counter()
        rows = replay(engine, traj, url, args.ignore_eos)
        t_replay = time.perf_counter() - t2
    print(f"trajectory {args.trajectory} ({len(rows)} generated turns), vLLM {version}, "
          f"{'ignore_eos, max_tokens ids' if args.ignore_eos else 'natural stopping (EOS / stop / max_tokens)'}")
    ok = print_table(rows)
    print(f"wall: engine load {t_engine:.1f} s, vLLM start {t_up:.1f} s, replay (both) {t_replay:.1f} s")
    print("all turns match" if ok else "MISMATCH: some turns differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
