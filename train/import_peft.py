"""``lragent import-peft``: ordinary PEFT LoRA adapters (trained anywhere) -> one bundle, with shared A.

Role i has, on module m, ``dW_i = s_i B_i A_i`` (A_i [r_i, in], B_i [out, r_i], s_i = alpha/r or alpha/sqrt(r)).
On the cached targets (k_proj, v_proj) the roles must share one A to serve with a shared low-rank cache:

- adapters whose A is already bitwise identical keep it (``B_i' = s_i B_i``);
- ``exact``: when the roles' A rows are independent (adapters trained apart), Q is those rows stacked,
  ``[A_1; ...; A_N]``, and ``B_i'`` is ``s_i B_i`` in role i's block of columns and zero elsewhere: ``B_i' Q = dW_i``
  with no arithmetic at all, and a role reads only its own block of the cached L = X Q^T (the serving kernels skip
  the zero columns). When they are dependent (some directions shared), Q = orthonormal basis of their span (SVD of
  the stacked rows, numerically-zero directions dropped), ``B_i' = s_i B_i A_i Q^T``; since each A_i's rows lie in
  span(Q), ``B_i' Q = dW_i`` exactly, with the smaller rank;
- ``rank=R``: the rank-R Q minimising ``sum_i ||dW_i - dW_i Q^T Q||_F^2 / ||dW_i||_F^2``: the top-R right singular
  vectors of the stacked, per-role normalised ``[dW_1/|dW_1|; ...; dW_N/|dW_N|]`` (computed inside span(A) as a small
  SVD). Weighting by B (through dW) rather than taking an SVD of the stacked A rows matters: A alone ignores which
  directions B actually uses and how strongly; normalising each role makes every role count equally whatever its
  adapter's norm, i.e. it minimises the sum of squared *relative* errors that we report;
- ``none``: keep per-role A (nonshared / fullshared / baseshared serving only; the manifest says so).

Other targets keep per-role A. Scaling is baked into B (bundle alpha = rank, scaling 1) and the bundle has one
uniform rank: A/B are padded with zero rows/columns, which leaves dW unchanged. Only safetensors are read.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from lragent.bundle import CACHED_TARGETS, Bundle, BundleError, base_info, target_of, validate_role_name

PREFIX = "base_model.model."
ZERO_TOL = 1e-10          # singular values below ZERO_TOL * max are numerically-zero directions
EXACT_TOL = 1e-5          # max |dW' - dW| / max |dW| allowed for exact modes
UNSUPPORTED = ("fan_in_fan_out", "use_dora", "lora_bias", "modules_to_save", "target_parameters", "layer_replication",
               "trainable_token_indices", "alora_invocation_tokens", "use_qalora")


@dataclass
class PeftAdapter:
    path: Path
    r: int
    scaling: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]   # module -> (A [r, in], B [out, r]), unscaled


def _refuse(path: Path, what: str) -> BundleError:
    return BundleError(f"PEFT adapter {path}: {what}")


def read_peft_adapter(path: str | Path) -> PeftAdapter:
    """Read a standard PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    path = Path(path)
    cfg_path, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise _refuse(path, "no adapter_config.json (pass a directory written by PEFT's save_pretrained)")
    if not weights.is_file():
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise _refuse(path, "has only a pickle weight file (.bin/.pt); lragent never unpickles: re-save it with "
                                "safe_serialization=True")
        raise _refuse(path, "no adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
        r, alpha = cfg["r"], cfg["lora_alpha"]
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"lora_alpha must be a finite number > 0, got {alpha!r}")
        alpha = float(alpha)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise _refuse(path, f"adapter_config.json is unreadable or lacks r/lora_alpha ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _refuse(path, f"peft_type {cfg.get('peft_type')!r} is not LORA")
    if any(v not in (None, r) for v in (cfg.get("rank_pattern") or {}).values()) or \
            any(v not in (None, alpha) for v in (cfg.get("alpha_pattern") or {}).values()):
        raise _refuse(path, "uses rank_pattern/alpha_pattern with per-module ranks or alphas, which import-peft "
                            "does not support; merge it to a uniform r and lora_alpha first")
    unsupported = [(k, cfg[k]) for k in UNSUPPORTED if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(("bias", cfg["bias"]))
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(("pissa", "olora", "corda", "loftq")):
        raise _refuse(path, f"was initialised with init_lora_weights={cfg['init_lora_weights']!r}, which changes the "
                            f"base weights; save it with PEFT's path_initial_model_for_weight_conversion first")
    if unsupported:
        k, v = unsupported[0]
        raise _refuse(path, f"sets {k}={v!r}, which import-peft does not support (plain LoRA on nn.Linear only)")
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise _refuse(path, f"adapter_model.safetensors is not readable ({str(e).splitlines()[0][:120]})") from None
    for key, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.startswith(PREFIX) and key.endswith(suffix):
                pairs.setdefault(key[len(PREFIX): -len(suffix)], {})[part] = t
                break
        else:
            raise _refuse(path, f"holds tensor {key!r}, which is not a plain LoRA lora_A/lora_B weight")
    modules = {}
    for m, p in sorted(pairs.items()):
        a, b = p.get("lora_A"), p.get("lora_B")
        if a is None or b is None:
            raise _refuse(path, f"module {m} has only one of lora_A/lora_B")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise _refuse(path, f"module {m}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not have rank r={r}")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise _refuse(path, f"module {m}: lora_A/lora_B are not floating-point tensors")
        if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise _refuse(path, f"module {m}: lora_A/lora_B hold non-finite values (NaN or inf): the adapter is "
                                f"broken (diverged training?)")
        modules[m] = (a, b)
    if not modules:
        raise _refuse(path, "holds no LoRA tensors")
    return PeftAdapter(path=path, r=r, scaling=scaling, modules=modules)


def parse_share(spec: str) -> tuple[str, int | None]:
    """``--share-a``: "exact" | "none" -> (mode, None); "rank=R" -> ("rank", R)."""
    if spec in ("exact", "none"):
        return spec, None
    if spec.startswith("rank="):
        try:
            rank = int(spec[5:])
        except ValueError:
            rank = 0
        if rank >= 1:
            return "rank", rank
    raise BundleError(f"--share-a {spec!r}: use exact, rank=R (R a positive integer) or none")


def linear_shapes(base_dir: str | Path) -> dict[str, tuple[int, int]]:
    """{module path: (in, out)} of the base model's nn.Linear layers inside decoder layers (built on 'meta')."""
    from .preflight import meta_model
    model = meta_model(base_dir, f"base model {base_dir}", BundleError)
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


def shared_basis(pairs: list[tuple[torch.Tensor, torch.Tensor]], rank: int | None) -> tuple[torch.Tensor, bool]:
    """Orthonormal Q [k, in] (float64) for roles' ``(A_i, s_i B_i)`` and whether it is exact. ``rank`` None: the
    span of all A rows; else the best rank-``rank`` basis for the per-role normalised deltas (module docstring),
    exact when that span has dimension <= ``rank``. Never materialises a delta-W."""
    _, s, vh = torch.linalg.svd(torch.cat([a for a, _ in pairs]), full_matrices=False)
    q0 = vh[: int((s > ZERO_TOL * s.max()).sum())] if s.numel() and s.max() > 0 else vh[:0]
    if rank is None or rank >= q0.shape[0]:
        return q0, True
    c = [sb @ (a @ q0.T) for a, sb in pairs]                        # dW_i = C_i Q0 exactly, |C_i| = |dW_i|
    parts = [ci / n for ci in c if (n := ci.norm()) > 0]
    if not parts:                                                   # every dW is zero: any basis is exact
        return q0[:rank], True
    _, _, v = torch.linalg.svd(torch.cat(parts), full_matrices=False)
    return v[:rank] @ q0, False


def _pad(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` along ``dim`` (0: rows of A, 1: columns of B) to ``rank``; float32."""
    pad = [0, 0, 0, 0]
    pad[1 if dim == 1 else 3] = rank - t.shape[dim]
    return torch.nn.functional.pad(t, pad).to(torch.float32).contiguous()


def combine(adapters: dict[str, PeftAdapter], shapes: dict[str, tuple[int, int]], mode: str,
            rank: int | None = None) -> tuple[Bundle, dict]:
    """Build the bundle (without base info) and the error report from role adapters; see the module docstring."""
    roles = list(adapters)
    for role, ad in adapters.items():
        for m, (a, b) in ad.modules.items():
            if m not in shapes:
                raise _refuse(ad.path, f"module {m} is not an nn.Linear inside the base model's decoder layers")
            if (a.shape[1], b.shape[0]) != shapes[m]:
                raise _refuse(ad.path, f"module {m} has [in, out] {[a.shape[1], b.shape[0]]}, base model has "
                                       f"{list(shapes[m])}: wrong --base?")
    order = {m: i for i, m in enumerate(shapes)}
    modules = sorted({m for ad in adapters.values() for m in ad.modules}, key=order.__getitem__)
    targets = list(dict.fromkeys(target_of(m) for m in modules))
    share = [t for t in targets if t in CACHED_TARGETS] if mode != "none" else []
    basis, new_b, how = {}, {}, {}
    for m in modules:
        if target_of(m) not in share:
            continue
        have = {r: (ad.modules[m][0].double(), ad.scaling * ad.modules[m][1].double())
                for r, ad in adapters.items() if m in ad.modules}
        first = next(iter(have.values()))[0]
        same = all(a.shape == first.shape and torch.equal(a, first) for a, _ in have.values())
        if same and (rank is None or first.shape[0] <= rank):
            q, kind = first, "bitwise"                              # already shared: keep A bit for bit
            new_b[m] = {r: sb for r, (_, sb) in have.items()}
        else:
            q, exact = shared_basis(list(have.values()), rank)
            kind = "exact" if exact else "lossy"
            stacked = torch.cat([a for a, _ in have.values()])
            if exact and rank is None and q.shape[0] == stacked.shape[0]:   # independent rows: blocks
                q, new_b[m], lo = stacked, {}, 0
                for r, (a, sb) in have.items():
                    new_b[m][r] = torch.zeros(sb.shape[0], q.shape[0], dtype=torch.float64)
                    new_b[m][r][:, lo:lo + a.shape[0]] = sb
                    lo += a.shape[0]
            else:
                new_b[m] = {r: sb @ (a @ q.T) for r, (a, sb) in have.items()}
        basis[m], how[m] = q, (kind, q.shape[0])
    per_role = [ad.r for ad in adapters.values()] if any(target_of(m) not in share for m in modules) else []
    urank = max([q.shape[0] for q in basis.values()] + per_role + [1])
    shared_a = {m: _pad(q, urank, 0) for m, q in basis.items()}
    role_a = {r: {} for r in roles}
    role_b = {r: {} for r in roles}
    for m in modules:
        out_f, in_f = shapes[m][1], shapes[m][0]
        for r, ad in adapters.items():
            if m in basis:
                b = new_b[m].get(r, torch.zeros(out_f, basis[m].shape[0], dtype=torch.float64))
            else:
                a, b = ad.modules.get(m, (torch.zeros(0, in_f), torch.zeros(out_f, 0)))
                role_a[r][m] = _pad(a.double(), urank, 0)
                b = ad.scaling * b.double()
            role_b[r][m] = _pad(b, urank, 1)
    bundle = Bundle(roles=roles, rank=urank, alpha=float(urank), targets=targets, share_a=share,
                    shared_a=shared_a, role_a=role_a, role_b=role_b)
    bundle.validate()
    return bundle, _report(bundle, adapters, how, mode, rank)


def _report(bundle: Bundle, adapters: dict[str, PeftAdapter], how: dict, mode: str, rank: int | None) -> dict:
    """Per role: max |dW' - dW| (absolute, and relative to max |dW|) over the modules meant to be exact (all but
    lossy rank=R ones), and ||dW' - dW||_F / ||dW||_F over the shared-A modules; float64, one module at a time."""
    acc = {r: [0.0, 0.0, 0.0, 0.0] for r in bundle.roles}          # max err, max |dW|, sum err^2, sum |dW|^2
    n_exact = sum(1 for m in bundle.modules if how.get(m, ("",))[0] != "lossy")
    for m in bundle.modules:
        for r, ad in adapters.items():
            got = bundle.b(m, r).double() @ bundle.a(m, r).double() * bundle.scaling
            a, b = ad.modules.get(m, (None, None))
            diff = got - ad.scaling * b.double() @ a.double() if a is not None else got
            ref = (got - diff).abs().max().item()
            if how.get(m, ("",))[0] != "lossy":
                acc[r][0], acc[r][1] = max(acc[r][0], diff.abs().max().item()), max(acc[r][1], ref)
            if m in how:
                acc[r][2] += diff.pow(2).sum().item()
                acc[r][3] += (got - diff).pow(2).sum().item()
    roles = {r: {"max_abs_err": e, "rel_max_err": e / ref if ref else 0.0,
                 "rel_err_shared": math.sqrt(e2 / ref2) if ref2 else 0.0} for r, (e, ref, e2, ref2) in acc.items()}
    kinds = {t: sorted({k for m, (k, _) in how.items() if target_of(m) == t}) for t in bundle.share_a}
    return {"share_a": mode if rank is None else f"rank={rank}", "rank": bundle.rank, "targets": bundle.targets,
            "shared_targets": {t: "+".join(k) for t, k in kinds.items()},
            "shared_rank": {t: max(k for m, (_, k) in how.items() if target_of(m) == t) for t in bundle.share_a},
            "lrshared_ok": bundle.lrshared_ok, "roles": roles, "exact_modules": n_exact,
            "shared_modules": len(how)}


def import_peft(base_dir: str | Path, role_dirs: dict[str, str | Path], out_dir: str | Path, *,
                share: str = "exact", force: bool = False, device: str = "cpu", tol: float = 1e-5,
                progress=None) -> tuple[Path, dict]:
    """Bundle PEFT adapters ``{role: dir}`` for ``base_dir``; written atomically after the exact parts are checked
    (relative max error <= EXACT_TOL) and every ``peft/<role>`` export is verified against the bundle's forward.
    The base is fingerprinted (config and weights; a damaged or truncated weight file is refused). ``progress(text)``,
    if given, is told what is being checked before the verification. Returns (bundle path, report)."""
    from lragent.bundle import write_bundle
    from lragent.train.export import verify_peft

    if not role_dirs:
        raise BundleError("give at least one --role NAME=PEFT_DIR")
    for role in role_dirs:
        validate_role_name(role)
    mode, rank = parse_share(share)
    base = Path(base_dir).absolute()
    info = base_info(base)
    adapters = {role: read_peft_adapter(d) for role, d in role_dirs.items()}
    bundle, report = combine(adapters, linear_shapes(base), mode, rank)
    for role, rep in report["roles"].items():
        if not rep["rel_max_err"] <= EXACT_TOL:
            raise BundleError(f"role {role}: rewritten adapter does not reproduce delta-W (relative max error "
                              f"{rep['rel_max_err']:.3g} > {EXACT_TOL:g}); nothing was written")
    bundle.base = info
    bundle.source = {"kind": "import-peft", "share_a": report["share_a"], "report": report,
                     "adapters": {r: {"path": str(Path(ad.path).absolute()), "r": ad.r, "scaling": ad.scaling}
                                  for r, ad in adapters.items()}}
    errors: dict[str, float] = {}

    def verify(tmp: Path) -> None:
        if progress is not None:
            progress(f"verifying: loading each peft/<role> ({', '.join(bundle.roles)}) with PEFT on the base model "
                     f"and comparing its logits with the bundle's forward ...")
        errors.update(verify_peft(tmp, base, tol=tol, device=device))

    out = write_bundle(bundle, out_dir, force=force, verify=verify)
    report["peft_logit_err"] = errors
    return out, report
