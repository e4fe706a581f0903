"""``lragent export | import-peft | inspect``: the bundle commands.

``add_bundle_commands(subparsers)`` registers them on the ``lragent`` parser; each handler returns the exit code
(0, or 2 after printing one ``error: ...`` line to stderr; nothing is written on error). ``main(argv)`` runs them
standalone: ``python -m lragent.cli.bundle inspect BUNDLE``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lragent.bundle import BundleError, load_bundle, read_manifest


def _fail(e: Exception) -> int:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def _quiet() -> None:
    """Keep the commands' stderr to their own lines: no progress bars or deprecation chatter from HF/PEFT."""
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _progress(text: str) -> None:
    """A progress line on stderr (stdout stays the command's result)."""
    print(text, file=sys.stderr, flush=True)


def _check_device(device: str) -> str:
    """``--device`` for the verification forward: a torch device that exists here; BundleError otherwise."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise BundleError(f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise BundleError(f"--device {device}: no such CUDA device on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise BundleError(f"--device {device!r}: use cpu, cuda or cuda:N")
    return device


def cmd_export(args) -> int:
    """``lragent export``: a run's checkpoint -> a PEFT-verified bundle."""
    from lragent.train.export import export_run
    _quiet()
    try:
        out, errors = export_run(args.run, args.out, checkpoint=args.checkpoint, force=args.force,
                                 base_dir=args.base, device=_check_device(args.device), progress=_progress)
    except BundleError as e:
        return _fail(e)
    bundle = load_bundle(out, verify=False)
    print(f"wrote {out} ({bundle.source.get('checkpoint')}; roles {', '.join(bundle.roles)}; rank {bundle.rank})")
    for role, err in errors.items():
        print(f"  peft/{role}: PEFT logits match the bundle (max |diff| {err:.2e})")
    return 0


def _parse_roles(items: list[str]) -> dict[str, str]:
    """``["NAME=DIR", ...]`` -> {name: dir}; BundleError for a malformed or repeated role."""
    roles: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise BundleError(f"--role {item!r}: use NAME=PEFT_DIR")
        if name in roles:
            raise BundleError(f"role {name!r} is given twice")
        roles[name] = path
    return roles


def cmd_import_peft(args) -> int:
    """``lragent import-peft``: PEFT adapters -> one shared-A bundle, with the rewrite's error report."""
    from lragent.train.import_peft import import_peft
    _quiet()
    try:
        out, rep = import_peft(args.base, _parse_roles(args.role), args.out, share=args.share_a, force=args.force,
                               device=_check_device(args.device), progress=_progress)
    except BundleError as e:
        return _fail(e)
    shared = ", ".join(f"{t} ({k}, rank {rep['shared_rank'][t]})" for t, k in rep["shared_targets"].items())
    print(f"wrote {out}: roles {', '.join(rep['roles'])}; bundle rank {rep['rank']}; targets "
          f"{', '.join(rep['targets'])}; shared A: {shared or 'none'}; lrshared {'ok' if rep['lrshared_ok'] else 'NO'}")
    for line in report_lines(rep):
        print(line)
    if rep["rank"] > max(rep["shared_rank"].values(), default=rep["rank"]):
        print(f"  note: other targets need rank {rep['rank']}; shared A is zero-padded to it (bundles have one rank)")
    return 0


def report_lines(rep: dict) -> list[str]:
    """The per-role error table of import-peft, each column labelled with what it measures and over which modules:
    dW errors are absolute (max |dW' - dW|) or relative (to max |dW|, or Frobenius ||dW' - dW|| / ||dW||); the
    "exact" columns cover the modules rewritten exactly ("-" when there are none), the shared-A column the modules
    whose A was rewritten (lossy under rank=R); the last column is the PEFT export's logit difference."""
    n_exact, n_shared = rep.get("exact_modules"), rep.get("shared_modules")
    ex = f"exact: {n_exact} mod" if n_exact is not None else "exact modules"
    sh = f"shared A: {n_shared} mod" if n_shared is not None else "shared-A modules"
    lines = [f"  {'role':<16} {'abs max|dW err|':>16} {'rel max|dW err|':>16} {'rel ||dW err||_F':>17} "
             f"{'max|logit diff|':>16}",
             f"  {'':<16} {'(' + ex + ')':>16} {'(' + ex + ')':>16} {'(' + sh + ')':>17} {'(PEFT vs bundle)':>16}"]
    for role, r in rep["roles"].items():
        none = n_exact == 0
        abs_e = f"{'-':>16}" if none else f"{r['max_abs_err']:>16.2e}"
        rel_e = f"{'-':>16}" if none else f"{r['rel_max_err']:>16.2e}"
        shared_e = f"{'-':>17}" if n_shared == 0 else f"{r['rel_err_shared']:>17.2e}"
        lines.append(f"  {role:<16} {abs_e} {rel_e} {shared_e} {rep['peft_logit_err'][role]:>16.2e}")
    return lines


def summary(bundle_dir: str | Path, base_dir: str | Path | None = None) -> dict:
    """What ``inspect`` shows, as a dict (the bundle is fully validated first)."""
    bundle = load_bundle(bundle_dir, base_dir=base_dir)
    root = Path(bundle.root)
    manifest = read_manifest(root)
    sizes = {rel: (root / rel).stat().st_size for rel in manifest["files"]}
    cached = [t for t in bundle.targets if t in ("k_proj", "v_proj")]
    n_layers = len({m.split(".layers.")[1].split(".")[0] for m in bundle.modules})
    return {
        "path": str(root), "format": f"{manifest['format']} v{manifest['version']}", "roles": bundle.roles,
        "rank": bundle.rank, "alpha": bundle.alpha, "scaling": bundle.scaling, "scaling_rule": bundle.scaling_rule,
        "targets": bundle.targets, "share_a": bundle.share_a, "per_role_a": [t for t in bundle.targets
                                                                             if t not in bundle.share_a],
        "lrshared_ok": bundle.lrshared_ok, "modes": bundle.modes, "a_family_hash": bundle.a_family_hash,
        "base": bundle.base, "dtype": manifest.get("dtype"), "modules": len(bundle.modules), "layers": n_layers,
        "lr_cache_per_token": {"lrshared": len(cached) * bundle.rank * n_layers if bundle.lrshared_ok else None,
                               "baseshared": len(bundle.roles) * len(cached) * bundle.rank * n_layers},
        "bytes": {"total": sum(sizes.values()) + (root / "manifest.json").stat().st_size,
                  "shared_a": sizes.get("shared_a.safetensors", 0),
                  "roles": {r: sizes[f"roles/{r}.safetensors"] for r in bundle.roles},
                  "peft": sum(v for k, v in sizes.items() if k.startswith("peft/"))},
        "source": {k: v for k, v in bundle.source.items() if k != "report"},
    }


def cmd_inspect(args) -> int:
    """``lragent inspect``: validate a bundle and print its summary."""
    try:
        s = summary(args.bundle, args.base)
    except BundleError as e:
        return _fail(e)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    b = s["bytes"]
    print(f"bundle     {s['path']}  ({s['format']}, sha256 verified)")
    base = s["base"]
    print(f"base       {base.get('name')}  {base.get('path')}  config sha256 {base.get('config_sha256')}"
          + (f"  weights {base['weights_fingerprint']}" if base.get("weights_fingerprint") else ""))
    print(f"roles      {', '.join(s['roles'])}")
    print(f"lora       rank {s['rank']}, alpha {s['alpha']:g} ({s['scaling_rule']}, scaling {s['scaling']:g}), "
          f"dtype {s['dtype']}, {s['modules']} modules in {s['layers']} layers")
    print(f"targets    {', '.join(s['targets'])}")
    print(f"shared A   {', '.join(s['share_a']) or 'none'}   per-role A: {', '.join(s['per_role_a']) or 'none'}")
    print(f"A-family   {s['a_family_hash'] or 'none (no shared A)'}")
    print(f"modes      {', '.join(s['modes'])}" + ("" if s["lrshared_ok"] else "   (lrshared unavailable: the cached "
          "targets do not share A)"))
    lr = s["lr_cache_per_token"]
    lrs = f"{lr['lrshared']} numbers" if lr["lrshared"] is not None else "n/a"
    print(f"lr cache   per context token, all layers, on top of base K/V: lrshared {lrs}, "
          f"baseshared {lr['baseshared']} numbers")
    print(f"sizes      total {b['total']:,} B; shared A {b['shared_a']:,} B; peft/ {b['peft']:,} B; roles " +
          ", ".join(f"{r} {n:,} B" for r, n in b["roles"].items()))
    print(f"source     {json.dumps(s['source'])}")
    return 0


def add_bundle_commands(sub) -> None:
    """Register export, import-peft and inspect on the ``lragent`` subparsers."""
    p = sub.add_parser("export", help="write a bundle from a training run (verified against PEFT)")
    p.add_argument("--run", required=True, help="training run directory (run.json, checkpoints/)")
    p.add_argument("--checkpoint", type=int, default=None, help="step N (checkpoints/step-N); default: the last")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out (atomically)")
    p.add_argument("--base", default=None, help="base model dir (default: the one recorded in run.json)")
    p.add_argument("--device", default="cpu", help="device for the PEFT verification forward (default cpu)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-peft", help="bundle ordinary PEFT LoRA adapters, rewritten to share A")
    p.add_argument("--base", required=True, help="base model directory the adapters were trained on")
    p.add_argument("--role", required=True, action="extend", nargs="+", metavar="NAME=PEFT_DIR",
                   help="a role and its PEFT adapter directory (repeatable)")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--share-a", default="exact", metavar="exact|rank=R|none",
                   help="exact: lossless shared basis (rank up to N*r); rank=R: best rank-R shared basis (lossy, "
                        "errors reported); none: keep per-role A (no lrshared serving). Default exact")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out (atomically)")
    p.add_argument("--device", default="cpu", help="device for the PEFT verification forward (default cpu)")
    p.set_defaults(func=cmd_import_peft)

    p = sub.add_parser("inspect", help="validate a bundle and summarise it")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--base", default=None, help="also check the bundle against this base model")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)


def main(argv: list[str] | None = None) -> int:
    """The bundle commands standalone (same exit codes as ``lragent``)."""
    from .guard import run_guarded

    parser = argparse.ArgumentParser(prog="lragent")
    add_bundle_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return run_guarded(lambda: args.func(args), sigterm=args.command in ("export", "import-peft"))


if __name__ == "__main__":
    sys.exit(main())
