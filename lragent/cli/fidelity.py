"""``lragent eval`` and ``lragent drift``: how faithful each cache mode is, and why (the cross-role drift).

    lragent eval --bundle B --task handoff --episodes 300 [--mode M|all] [--json] [--out DIR]
    lragent eval --bundle B_r4 --bundle B_r8 --task handoff --mode lrshared        (several bundles: a curve)
    lragent drift --bundle B --trajectory T [--json] [--out DIR]

Tasks: ``toy`` (the embedded lookup task), ``handoff`` (every role reads the tool output through its own K/V
adapter), or a JSONL file of episodes (format: ``lragent.serve.episodes``). The embedded tasks are resolved here,
at the command line; the evaluator itself (``lragent.serve.evaluate``) only sees episodes.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from lragent.modes import MODES
from lragent.serve.config import ServeError
from lragent.serve.episodes import Episode, parse_episode, read_episodes

TASKS = ("toy", "handoff")


def task_episodes(task: str, n: int, seed: int) -> list[Episode]:
    """Held-out episodes of an embedded task, or the first ``n`` of a JSONL file."""
    if task == "handoff":
        from lragent.toy import handoff
        return [parse_episode(e, f"handoff episode {i}") for i, e in enumerate(handoff.held_out_episodes(n, seed))]
    if task == "toy":
        from lragent.toy import task as toy
        out = []
        for i, ep in enumerate(toy.episodes(n, seed, split="eval")):
            msgs, refs = toy.episode_messages(ep), iter(toy.episode_records(ep))
            turns = []
            for m in msgs:
                t = dict(m)
                if m["role"] in toy.ROLES:             # scored: the reference may differ from what is shown
                    t["reference"] = next(refs)["completion"].replace(toy.EOS, "").strip()
                turns.append(t)
            out.append(Episode(turns, f"toy-eval-{i}", list(toy.ROLES)))
        return out
    if Path(task).is_file():
        return read_episodes(task, limit=n)
    raise ServeError(f"unknown task {task!r}: use {', '.join(TASKS)} or a JSONL file of episodes")


def _engines(args, bundle: str, modes: list[str]) -> tuple[dict, dict]:
    from lragent.serve.cli import _make_engine
    engines, skipped = {}, {}
    for m in modes:
        try:
            engines[m] = _make_engine(_with(args, bundle=bundle), m)
        except ServeError as e:
            if args.mode != "all":
                raise
            skipped[m] = str(e)
    return engines, skipped


def _with(args, **kw):
    import argparse
    return argparse.Namespace(**{**vars(args), **kw})


def _pct(x) -> str:
    return f"{100 * x:5.1f}"


def table(summary: dict) -> str:
    """One row per mode: overall exact match [95% CI], per role, per kind, agreement and KL to nonshared."""
    any_mode = next(iter(summary.values()))
    roles, kinds = list(any_mode["roles"]), list(any_mode["kinds"])
    head = ["mode", "exact % [95% CI]"] + roles + [f"kind:{k}" for k in kinds] + ["agree w/ ns", "KL med", "KL max"]
    rows = []
    for m, d in summary.items():
        rows.append([m, f"{_pct(d['exact_match'])} [{_pct(d['ci95'][0])}, {_pct(d['ci95'][1])}]"]
                    + [_pct(d["roles"][r]["exact_match"]) for r in roles]
                    + [_pct(d["kinds"][k]["exact_match"]) for k in kinds]
                    + [_pct(d["agreement"]) if "agreement" in d else "-",
                       f"{d['kl_median']:.2g}" if "kl_median" in d else "-",
                       f"{d['kl_max']:.2g}" if "kl_max" in d else "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def write_outputs(out: Path, results: dict[str, dict]) -> None:
    """CSV (one row per bundle, mode and group) and a bar chart with 95% error bars per role and mode."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["bundle", "mode", "group", "n", "exact_match", "ci95_lo", "ci95_hi", "agreement", "kl_median",
                    "kl_max"])
        for b, summary in results.items():
            for m, d in summary.items():
                groups = [("all", d)] + [(r, v) for r, v in d["roles"].items()] + \
                         [(f"kind:{k}", v) for k, v in d["kinds"].items()]
                for g, v in groups:
                    w.writerow([b, m, g, v["n"], v["exact_match"], *v["ci95"], v.get("agreement", ""),
                                v.get("kl_median", ""), v.get("kl_max", "")])
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 3.6), squeeze=False)
    for ax, (b, summary) in zip(axes[0], results.items()):
        modes = list(summary)
        first = next(iter(summary.values()))
        groups = ["all"] + list(first["roles"]) + [f"kind:{k}" for k in first["kinds"]]
        width = 0.8 / len(modes)
        for j, m in enumerate(modes):
            d = summary[m]
            vals = [d if g == "all" else d["kinds"][g[5:]] if g.startswith("kind:") else d["roles"][g] for g in groups]
            ys = [100 * v["exact_match"] for v in vals]
            err = [[max(0.0, 100 * (v["exact_match"] - v["ci95"][0])) for v in vals],
                   [max(0.0, 100 * (v["ci95"][1] - v["exact_match"])) for v in vals]]
            ax.bar([i + j * width for i in range(len(groups))], ys, width, yerr=err, capsize=2, label=m)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [g.replace("kind:", "") for g in groups],
                      rotation=20)
        ax.set_ylim(0, 105)
        ax.set_ylabel("exact match %")
        ax.set_title(Path(b).name)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out / "eval.png", dpi=110)


def cmd_eval(args) -> int:
    from lragent.serve.evaluate import evaluate, summarize
    if args.episodes < 1:
        raise ServeError(f"--episodes must be >= 1, got {args.episodes}")
    modes = list(MODES) if args.mode == "all" else [args.mode or "lrshared"]
    if any(m not in MODES for m in modes):
        raise ServeError(f"unknown mode {args.mode!r}: use one of {', '.join(MODES)} or all")
    episodes = task_episodes(args.task, args.episodes, args.seed)
    results, skipped = {}, {}
    for b in args.bundle:
        engines, skipped[b] = _engines(args, b, modes)
        if not engines:
            raise ServeError(next(iter(skipped[b].values())))
        roles = list(next(iter(engines.values())).roles)
        step = max(1, len(episodes) // 10)

        def progress(k, n=len(episodes)):
            if k % step == 0 or k == n:
                print(f"  {b}: {k}/{n} episodes", file=sys.stderr, flush=True)
        scores = evaluate(engines, episodes, roles, on_episode=None if args.json else progress)
        results[b] = summarize(scores)
        if not args.json:
            n_turns = results[b][next(iter(results[b]))]["n"]
            print(f"== {b}: task {args.task}, {len(episodes)} held-out episodes, {n_turns} scored turns per mode")
            print(table(results[b]))
            for m, why in skipped[b].items():
                print(f"{m}: skipped ({why})")
            print()
    if args.out:
        write_outputs(Path(args.out), results)
    if args.json:
        doc = {"task": args.task, "episodes": len(episodes)}
        if len(results) == 1:
            doc.update(modes=next(iter(results.values())), skipped=next(iter(skipped.values())))
        else:
            doc.update(bundles={b: {"modes": r, "skipped": skipped[b]} for b, r in results.items()})
        print(json.dumps(doc))
    return 0


def cmd_drift(args) -> int:
    from lragent.serve.drift import measure
    from lragent.serve.trajectory import load_trajectory, run_trajectory
    traj = load_trajectory(args.trajectory)
    engine = None
    for mode in ("lrshared", "baseshared"):
        try:
            engine = _engines(_with(args, mode=mode), args.bundle, [mode])[0][mode]
            break
        except ServeError:
            continue
    if engine is None:
        raise ServeError("drift needs a bundle with LoRA on k_proj or v_proj (a low-rank cache to measure)")
    results = run_trajectory(engine, traj)                    # the context: the trajectory as the roles write it
    messages, it = [], iter(results)
    for t in traj.turns:
        messages.append({"role": t.role, "content": t.content if t.content is not None else next(it).text})
    ids = engine.render(messages, engine.roles[0])
    rows = measure(engine, ids)
    if args.json:
        print(json.dumps({"trajectory": traj.name, "tokens": len(ids), "roles": engine.roles, "layers": rows}))
    else:
        roles = engine.roles
        head = ["layer", "cos K", "cos V", "cos L"] + [f"|LB_{t}|/|{t}| {r}" for t in "kv" for r in roles]
        print(f"{traj.name}: {len(ids)} context tokens prefilled by each of {', '.join(roles)} (mean over role "
              f"pairs; min in brackets)")
        print("  ".join(head))
        for row in rows:
            cells = [str(row["layer"])]
            for n in ("k", "v", "lr"):
                cells.append(f"{row[f'cos_{n}']:.4f} [{row[f'cos_{n}_min']:.4f}]" if f"cos_{n}" in row else "-")
            cells += [f"{row[f'rel_{t}_{r}']:.3f}" if f"rel_{t}_{r}" in row else "-" for t in "kv" for r in roles]
            print("  ".join(cells))
    if args.out:
        _drift_plot(Path(args.out), rows, engine.roles, traj.name)
    return 0


def _drift_plot(out: Path, rows: list[dict], roles: list[str], name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "drift.csv", "w", newline="") as f:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "layer", k))
        w = csv.DictWriter(f, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    layers = [r["layer"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    nan = float("nan")
    for n, label in (("k", "base K"), ("v", "base V"), ("lr", "L = sXA")):
        if any(f"cos_{n}" in r for r in rows):
            a.plot(layers, [r.get(f"cos_{n}", nan) for r in rows], marker="o", label=label)
    a.set_title("cosine similarity across roles")
    a.set_xlabel("layer")
    a.legend()
    for t in "kv":
        for r in roles:
            if any(f"rel_{t}_{r}" in row for row in rows):
                b.plot(layers, [row.get(f"rel_{t}_{r}", nan) for row in rows], marker="o", label=f"{t}: {r}")
    b.set_title("|adapter term| / |base term|")
    b.set_xlabel("layer")
    b.legend(fontsize=7)
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=110)


def add_fidelity_commands(sub) -> None:
    """Register ``eval`` and ``drift``."""
    from lragent.serve.cli import _engine_args, _guard

    p = sub.add_parser("eval", help="accuracy per role and cache mode on held-out episodes",
                       conflict_handler="resolve")
    _engine_args(p, allow_all=True)
    p.add_argument("--bundle", action="append", required=True,
                   help="bundle directory; repeat it to compare bundles (e.g. import-peft --share-a rank=R at several R)")
    p.add_argument("--task", required=True, help=f"{' | '.join(TASKS)} | a JSONL file of episodes")
    p.add_argument("--episodes", type=int, default=300, help="held-out episodes (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out episode stream")
    p.add_argument("--out", default=None, help="directory for eval.csv and eval.png")
    p.set_defaults(func=_guard(cmd_eval))

    p = sub.add_parser("drift", help="per-layer similarity of the cache across roles on one trajectory")
    _engine_args(p)
    p.add_argument("--trajectory", required=True, help="trajectory JSON file (examples/trajectories/)")
    p.add_argument("--out", default=None, help="directory for drift.csv and drift.png")
    p.set_defaults(func=_guard(cmd_drift))
