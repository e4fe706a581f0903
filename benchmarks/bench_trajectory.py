"""Trace benchmark: multi-role ReAct-shaped trajectories replayed against lragent and its peers on one machine.

Systems (``--systems``, per cell with ``--cell CTXxROLES:sys1,sys2``):
  fullshared, lrshared, baseshared, lrbase, nonshared   lragent's engine in-process, in that cache mode
  serve-lrshared, serve-nonshared                        the same through ``lragent serve`` (OpenAI HTTP)
  hf-reuse                                               HF transformers + PEFT, a DynamicCache per role (best case)
  hf-noreuse                                             HF transformers + PEFT, every turn prefilled from scratch
  vllm                                                   ``vllm serve --enable-lora --enable-prefix-caching`` with
                                                         the bundle's peft/<role> adapters (when vLLM is installed)

Per cell (context, roles): the model (a random-weight Llama of hidden 1024, 8 layers, 16 heads / 4 KV heads,
head_dim 64, vocab 32000; or ``--model embedded``), one random PEFT adapter per role imported with
``--share-a exact``, and a seeded trace (``traces.py``). Each repeat replays the trace on every system,
interleaved turn by turn (turn i of every system before turn i + 1 of any, in a seeded order drawn per turn, so
every pair of systems shares the machine's load of the same few seconds and none always follows the same other one;
a short pause after each turn of an HTTP server, which may still be busy after answering; each repeat draws its own
token ids, so no cache carries over); every system generates greedily exactly the trace's decode lengths. Reported
per system (median over repeats): hand-off TTFT p50/p90 (every turn after the first), whole-trajectory wall time
(the sum of its turns), decode tok/s, prefilled and reused prompt tokens, peak cache bytes against the analytic
minimum of its cache layout, and whether its greedy trajectory is identical to HF + PEFT's.

    python benchmarks/bench_trajectory.py                                     # the README's grid (long)
    python benchmarks/bench_trajectory.py --cell 1024x3 --repeats 1          # one small cell, every system

Writes ``--out`` (default benchmarks/results/trajectory): turns.csv, summary.csv, ttft_per_turn.png,
cache_vs_context.png, wall_vs_roles.png; prints the tables and the headline ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from lragent.serve.config import ServeConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plots  # noqa: E402
from report import write_csv  # noqa: E402
import traces  # noqa: E402
import workload  # noqa: E402
from systems import EngineSystem, HttpSystem, lragent_http_system, start_lragent_server, stop_server  # noqa: E402

ENGINE_MODES = ("fullshared", "lrshared", "baseshared", "lrbase", "nonshared")
ALL = ENGINE_MODES + ("serve-lrshared", "serve-nonshared", "hf-reuse", "hf-noreuse", "vllm")
CORE = ("fullshared", "lrshared", "nonshared", "hf-reuse")
DEFAULT_CELLS = ["1024x3@2:" + ",".join(ALL), "4096x3@3:" + ",".join(CORE), "4096x8@2:" + ",".join(CORE),
                 "react17k@1:fullshared,lrshared"]
RESULTS = Path(__file__).resolve().parent / "results" / "trajectory"
SHARED_KV = {"fullshared", "lrshared", "lrbase", "baseshared"}     # one base K/V for every role
SETTLE_S = 0.5                   # pause after an HTTP system's turn (its server process may still be busy)


def parse_cell(text: str, default_systems: list[str], repeats: int) -> tuple[str, int, int, list[str], int]:
    """"CTXxROLES[@REPEATS][:sys,...]" or "react17k[@R][:...]" -> (name, context, roles, systems, repeats)."""
    head, _, tail = text.partition(":")
    head, _, rep = head.partition("@")
    if rep:
        if not rep.isdigit() or int(rep) < 1:
            raise SystemExit(f"bad cell {text!r}: @REPEATS must be a positive integer")
        repeats = int(rep)
    systems = [s for s in tail.split(",") if s] or default_systems
    bad = [s for s in systems if s not in ALL]
    if bad:
        raise SystemExit(f"unknown system(s) {', '.join(bad)}: use {', '.join(ALL)}")
    if head == "react17k":
        return head, 17000, 3, systems, repeats
    try:
        ctx, roles = (int(x) for x in head.lower().split("x"))
    except ValueError:
        raise SystemExit(f"bad cell {text!r}: use CTXxROLES[:systems], e.g. 4096x3:lrshared,hf-reuse") from None
    return head, ctx, roles, systems, repeats


def analytic_bytes(system: str, rows: list[dict], cfg: dict, rank: int, m: int, elem: int) -> int:
    """The least cache a system's layout needs for the replayed trajectory: per token 2*d_kv*L*b for one base
    K/V (shared modes: one copy; per-role layouts: each role's own prefix) plus m*r*L*b for the low-rank rows."""
    kv = 2 * cfg["d_kv"] * cfg["layers"] * elem
    lr = m * rank * cfg["layers"] * elem
    fed = {}                                  # per role: tokens it has run through the model (its last one not)
    for r in rows:
        fed[r["role"]] = r["prompt"] + r["decode"] - 1
    longest = max(fed.values())
    mode = system.replace("serve-", "")
    if mode in ("fullshared",):
        return kv * longest
    if mode in ("lrshared", "lrbase"):
        return (kv + lr) * longest
    if mode == "baseshared":
        return kv * longest + lr * sum(fed.values())
    return kv * sum(fed.values())             # nonshared, hf-reuse, vllm: every role its own K/V


def replay(system, trace: traces.Trace, vocab: int, salt: int):
    """Run every turn of ``trace`` on ``system``, yielding one dict per turn (times, tokens, cache bytes after it)."""
    prefix, appends = trace.token_ids(vocab, salt)
    transcript = list(prefix)
    for i, (turn, app) in enumerate(zip(trace.turns, appends)):
        transcript += app
        r = system.run_turn(transcript, turn.role, turn.decode)
        yield dict(turn=i, role=turn.role, prompt=len(transcript), decode=turn.decode, ttft_s=r.ttft_s,
                   total_s=r.total_s, prefilled=r.prefilled, reused=r.reused, cache_bytes=system.cache_bytes(),
                   output=r.output_ids)
        transcript += r.output_ids


def replay_interleaved(systems: dict, trace: traces.Trace, vocab: int, salt: int, seed: int) -> dict[str, list]:
    """One repeat of ``trace`` on every system, interleaved turn by turn: turn i of every system runs before turn
    i + 1 of any, in an order drawn per turn (seeded by ``seed`` and i), so that each pair of systems meets the
    machine's load of the same few seconds on every turn and no system always runs right after the same other one.
    After a turn of a system that runs in another process (an HTTP server) the next waits ``SETTLE_S``: such a
    server may still be working when its answer has arrived (a 2-core machine shares the cores with it). Each
    system replays its own transcript (its own outputs feed its next turns). Per system, its turns' dicts."""
    runs = {n: replay(s, trace, vocab, salt) for n, s in systems.items()}
    rows = {n: [] for n in systems}
    for i in range(len(trace.turns)):
        order = list(systems)
        random.Random(seed * 100003 + i).shuffle(order)
        for n in order:
            rows[n].append(next(runs[n]))
            if isinstance(systems[n], HttpSystem):
                time.sleep(SETTLE_S)
    return rows


def summarize(rows: list[dict]) -> dict:
    """One run's figures: hand-off TTFT p50/p90 (turns after the first), wall, decode tok/s, token counts."""
    hand = sorted(r["ttft_s"] for r in rows[1:]) or [rows[0]["ttft_s"]]
    p90 = hand[min(len(hand) - 1, round(0.9 * (len(hand) - 1)))]
    dec_t = sum(r["total_s"] - r["ttft_s"] for r in rows)
    dec_n = sum(r["decode"] - 1 for r in rows)
    caches = [r["cache_bytes"] for r in rows if r["cache_bytes"] is not None]
    return dict(handoff_ttft_p50=statistics.median(hand), handoff_ttft_p90=p90, wall_s=sum(r["total_s"] for r in rows),
                decode_tok_s=dec_n / dec_t if dec_t > 0 else float("nan"),
                prefilled=sum(r["prefilled"] for r in rows), reused=sum(r["reused"] for r in rows),
                peak_cache_bytes=max(caches) if caches else None)


class Cell:
    """One (context, roles) point: its workload, trace and the systems replaying it."""

    def __init__(self, name, ctx, n_roles, systems, args):
        self.name, self.ctx, self.n_roles, self.systems, self.args = name, ctx, n_roles, systems, args
        self.spec = workload.Spec(roles=n_roles, model=args.model, seed=args.seed)
        self.paths = workload.prepare(self.spec, Path(args.workdir) / f"{args.model}-r{n_roles}")
        roles = self.spec.role_names()
        self.trace = (traces.react17k(roles, seed=args.seed) if name == "react17k" else
                      traces.react_trace(ctx, roles, seed=args.seed))
        cfg = json.loads((self.paths["base"] / "config.json").read_text())
        self.vocab, self.max_positions = cfg["vocab_size"], cfg["max_position_embeddings"]
        hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        self.cfg = dict(d_kv=cfg["num_key_value_heads"] * hd, layers=cfg["num_hidden_layers"])
        man = json.loads((self.paths["bundle"] / "manifest.json").read_text())
        self.rank = man["lora"]["rank"]          # the shared rank (N * r for independent adapters, exact)
        self.servers, self.live, self.skipped = contextlib.ExitStack(), {}, {}

    def cache_tokens(self) -> int:
        return (self.trace.total_tokens() + 64) * self.n_roles + 1024

    def start(self, name: str):
        """The system object for ``name`` (servers started here, stopped by ``close``); None with a note."""
        a, bundle = self.args, self.paths["bundle"]
        eng = dict(cache_tokens=self.cache_tokens(), max_batch_tokens=a.max_batch_tokens)
        if name in ENGINE_MODES:
            return EngineSystem(bundle, name, **eng)
        if name.startswith("serve-"):
            mode = name[len("serve-"):]
            proc, url = start_lragent_server(bundle, mode, a.threads, ["--cache-tokens", eng["cache_tokens"],
                                                                       "--max-batch-tokens", a.max_batch_tokens])
            self.servers.callback(stop_server, proc)
            return lragent_http_system(url, mode)
        if name.startswith("hf-"):
            from peer_hf import HFPeftSystem
            return HFPeftSystem(self.paths["base"], self.paths["adapters"], reuse=name == "hf-reuse")
        return self.start_vllm()

    def start_vllm(self):
        import vllm_peer
        exe = vllm_peer.find_vllm(self.args.vllm)
        if exe is None:
            self.skipped["vllm"] = vllm_peer.vllm_missing_reason(self.args.vllm)
            return None
        adapters = {r: self.paths["bundle"] / "peft" / r for r in self.spec.role_names()}
        log = Path(self.args.workdir) / f"vllm-{self.name}.log"
        ctx = vllm_peer.vllm_server(exe, self.paths["base"], adapters, max_lora_rank=self.rank,
                                    max_model_len=min(self.trace.total_tokens() + 256, self.max_positions),
                                    log_path=log)
        try:
            url = self.servers.enter_context(ctx)
        except RuntimeError as e:
            self.skipped["vllm"] = f"vllm serve did not start ({str(e).splitlines()[-1][:200]}; log {log})"
            return None
        return HttpSystem("vllm", url)

    def close(self):
        for s in self.live.values():
            s.close()
        self.servers.close()


def run_cell(cell: Cell, repeats: int, turn_rows: list, summary_rows: list) -> None:
    t = cell.trace
    print(f"\n== {cell.name}: {len(t.turns)} turns over {t.total_tokens()} tokens, roles {', '.join(t.roles)}; "
          f"systems {', '.join(cell.systems)}", flush=True)
    try:
        for name in cell.systems:
            s = cell.start(name)
            if s is None:
                print(f"   {name}: skipped: {cell.skipped.get(name)}")
            else:
                cell.live[name] = s
        replay_all(cell, repeats, turn_rows, summary_rows)
    finally:
        cell.close()


def replay_all(cell: Cell, repeats: int, turn_rows: list, summary_rows: list) -> None:
    """The interleaved repeats of every live system of a cell, then its summary rows."""
    t = cell.trace
    runs = {n: [] for n in cell.live}
    outputs = {n: [] for n in cell.live}
    for rep in range(repeats):
        for s in cell.live.values():
            s.reset()
        by_system = replay_interleaved(cell.live, t, cell.vocab, salt=rep, seed=cell.args.seed * 1000 + rep)
        for name, rows in by_system.items():
            runs[name].append(summarize(rows))
            outputs[name].append([r["output"] for r in rows])
            for r in rows:
                turn_rows.append(dict(cell=cell.name, system=name, repeat=rep,
                                      **{k: v for k, v in r.items() if k != "output"}))
            print(f"   rep {rep} {name:16s} {sum(r['total_s'] for r in rows):7.1f} s", flush=True)
    m = 2 if "k_proj" in cell.spec.targets else 1
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None for k in rs[0]}
        last = [r for r in turn_rows if r["cell"] == cell.name and r["system"] == name and r["repeat"] == 0]
        exp = analytic_bytes(name, last, cell.cfg, cell.rank, m, 4)
        same = None
        if "hf-reuse" in outputs and name != "hf-reuse":
            ref = outputs["hf-reuse"]
            same = sum(a == b for x, y in zip(outputs[name], ref) for a, b in zip(x, y))
            same = f"{same}/{sum(len(x) for x in ref)}"
        summary_rows.append(dict(cell=cell.name, context=t.total_tokens(), roles=cell.n_roles, system=name,
                                 repeats=len(rs), **med, analytic_cache_bytes=exp,
                                 cache_vs_analytic=(med["peak_cache_bytes"] / exp
                                                    if med["peak_cache_bytes"] else None),
                                 turns_same_as_hf=same))
    for name, note in cell.skipped.items():
        summary_rows.append(dict(cell=cell.name, context=t.total_tokens(), roles=cell.n_roles, system=name,
                                 repeats=0, note=note))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", action="append",
                    help="CTXxROLES[@REPEATS][:systems] or react17k[@REPEATS][:systems] (repeatable)")
    ap.add_argument("--systems", default=",".join(ALL), help="systems of cells that name none")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of cells that name none")
    ap.add_argument("--model", choices=("random", "embedded"), default="random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (every system alike)")
    ap.add_argument("--max-batch-tokens", type=int, default=ServeConfig.max_batch_tokens,
                    help="lragent's tokens per engine step")
    ap.add_argument("--vllm", help="the vllm executable (default: $LRAGENT_VLLM, then vllm on PATH)")
    ap.add_argument("--workdir", default="/tmp/lragent-bench", help="where models and bundles are built")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cells = [parse_cell(c, a.systems.split(","), a.repeats) for c in (a.cell or DEFAULT_CELLS)]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {a.threads} thread(s), "
          f"model {a.model}, repeats {a.repeats}")
    turn_rows, summary_rows = [], []
    for name, ctx, roles, systems, repeats in cells:
        if a.model == "embedded" and ctx > 480:
            raise SystemExit(f"cell {name}: the embedded model has 512 positions; use contexts <= 480 with it")
        run_cell(Cell(name, ctx, roles, systems, a), repeats, turn_rows, summary_rows)
        write_csv(out / "turns.csv", turn_rows)
        write_csv(out / "summary.csv", summary_rows)
    plots.print_summary(summary_rows)
    plots.print_ratios(summary_rows, turn_rows)
    plots.draw(turn_rows, summary_rows, out)
    print(f"wrote {out}/turns.csv, summary.csv, ttft_per_turn.png, cache_vs_context.png, wall_vs_roles.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
