"""``lragent export``: a training run directory -> bundle v1, verified against PEFT before it is put in place.

Run directory (written by ``lragent.train``)::

    run.json                                    roles, base {name, path, config_sha256}, lora {...}, modules, dtype
    checkpoints/step-NNNNNN/adapter.safetensors <module>.lora_A | <module>.lora_A.<role> | <module>.lora_B.<role>

The bundle is written to a temp directory; each ``peft/<role>`` adapter in it is then loaded with PEFT on the base
model and its logits on a probe batch are compared with the bundle's own forward (our shared-A layer loaded from
the bundle tensors, routed to that role). A mismatch raises and nothing is written.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch

from lragent.bundle import (Bundle, BundleError, base_info, check_base, load_bundle, target_of, validate_role_name,
                            write_bundle)

PROBE_SHAPE = (2, 16)


def read_run(run_dir: str | Path) -> dict:
    """run.json of a training run, checked for the fields export needs; BundleError (one line) otherwise."""
    run = Path(run_dir)
    path = run / "run.json"
    if not path.is_file():
        raise BundleError(f"{run} has no run.json: pass a run directory written by 'lragent train'")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
        _check_run_types(meta)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise BundleError(f"{path} is not a valid run description ({type(e).__name__}: {e})") from None
    for role in meta["roles"]:
        validate_role_name(role)
    return meta


def _check_run_types(meta) -> None:
    """TypeError/KeyError unless run.json has the fields export reads, with their JSON types."""
    def str_list(v, name, nonempty=False):
        if not (isinstance(v, list) and all(isinstance(x, str) for x in v)) or (nonempty and not v):
            raise TypeError(f"{name!r} must be a {'non-empty ' if nonempty else ''}list of strings")

    if not isinstance(meta, dict):
        raise TypeError("the top level must be an object")
    lora = meta["lora"]
    if not isinstance(lora, dict):
        raise TypeError("'lora' must be an object")
    str_list(meta["roles"], "roles", True)
    str_list(meta["modules"], "modules", True)
    str_list(lora["targets"], "lora.targets")
    str_list(lora["share_a"], "lora.share_a")
    if not isinstance(lora["rank"], int) or isinstance(lora["rank"], bool):
        raise TypeError(f"lora.rank must be an integer, got {lora['rank']!r}")
    if isinstance(lora["alpha"], bool) or not isinstance(lora["alpha"], (int, float)):
        raise TypeError(f"lora.alpha must be a number, got {lora['alpha']!r}")
    if not isinstance(lora.get("rslora", False), bool):
        raise TypeError("lora.rslora must be true or false")
    base = meta.get("base", {})
    if not isinstance(base, dict) or not all(isinstance(base.get(k), (str, type(None)))
                                             for k in ("name", "path", "config_sha256", "weights_fingerprint")):
        raise TypeError("'base' must be an object of strings")


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """``checkpoints/step-{step:06d}``, or the highest step when ``step`` is None."""
    from .checkpoint import checkpoint_dir, list_checkpoints

    steps = list_checkpoints(run_dir)
    if step is None:
        if not steps:
            raise BundleError(f"{Path(run_dir) / 'checkpoints'} holds no step-NNNNNN checkpoint: train longer or "
                              f"pass another --run")
        step = steps[-1]
    path = checkpoint_dir(run_dir, step)
    if not path.is_dir():
        have = ", ".join(f"step-{s:06d}" for s in steps) or "none"
        raise BundleError(f"{path} does not exist (checkpoints: {have})")
    if not (path / "adapter.safetensors").is_file():
        raise BundleError(f"{path} has no adapter.safetensors (only safetensors checkpoints can be exported)")
    return path


def bundle_from_run(run_dir: str | Path, checkpoint: int | None = None, base_dir: str | Path | None = None) -> Bundle:
    """Read a run's checkpoint into a :class:`Bundle` (tensors as trained, unscaled)."""
    from safetensors.torch import load_file

    run = Path(run_dir).absolute()
    meta = read_run(run)
    ckpt = find_checkpoint(run, checkpoint)
    lora, roles, modules = meta["lora"], list(meta["roles"]), sorted(meta["modules"])
    recorded = meta.get("base") or {}
    base = Path(base_dir or recorded.get("path") or "").absolute()
    if not recorded.get("config_sha256"):
        raise BundleError(f"{run}/run.json records no base model fingerprint: it is not a run lragent train wrote")
    check_base(recorded, base, against="the run")
    info = base_info(base, name=recorded.get("name") or base.name)   # also refuses damaged / truncated weights
    try:
        tensors = load_file(str(ckpt / "adapter.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise BundleError(f"{ckpt}/adapter.safetensors is not a readable safetensors file "
                          f"({' '.join(str(e).split())[:120]})") from None
    share = set(lora["share_a"])
    shared_a, role_a, role_b = {}, {r: {} for r in roles}, {r: {} for r in roles}
    expected = set()
    for m in modules:
        if target_of(m) in share:
            expected.add(f"{m}.lora_A")
            shared_a[m] = tensors.get(f"{m}.lora_A")
        for r in roles:
            expected.add(f"{m}.lora_B.{r}")
            role_b[r][m] = tensors.get(f"{m}.lora_B.{r}")
            if target_of(m) not in share:
                expected.add(f"{m}.lora_A.{r}")
                role_a[r][m] = tensors.get(f"{m}.lora_A.{r}")
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise BundleError(f"{ckpt}/adapter.safetensors does not match run.json (missing {missing[:2]}, "
                          f"unexpected {extra[:2]})")
    bundle = Bundle(
        roles=roles, rank=int(lora["rank"]), alpha=float(lora["alpha"]), targets=list(lora["targets"]),
        share_a=list(lora["share_a"]), shared_a=shared_a, role_a=role_a, role_b=role_b,
        scaling_rule="rslora" if lora.get("rslora") else "standard",
        base=info,
        source={"kind": "lragent-train", "run": str(run), "checkpoint": ckpt.name, "dtype": meta.get("dtype"),
                "scheme": meta.get("scheme"),
                "lora": {k: lora[k] for k in ("dropout", "init") if k in lora}})
    bundle.validate()
    return bundle


# -- verification: PEFT's forward of peft/<role> vs the bundle's own forward -----------------------------------

def _load_base(base_dir: Path, device: str):
    import transformers
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        return model.to(device).eval()
    except Exception as e:  # noqa: BLE001 - transformers / torch raise many types for a broken model or device
        raise BundleError(f"cannot load base model {base_dir} on {device} for the PEFT verification "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


def bundle_model(model, bundle: Bundle):
    """Inject our shared-A LoRA layer into ``model`` and load ``bundle``'s tensors (zeros for Linear modules the
    bundle does not carry). Route a forward to role k with ``lragent.train.lora.roles(model, ids)``."""
    from lragent.train.lora import LoraSpec, inject_lora, load_lora_state, lora_state

    spec = LoraSpec(roles=list(bundle.roles), rank=bundle.rank, alpha=bundle.alpha,
                    rslora=bundle.scaling_rule == "rslora", dropout=0.0, targets=list(bundle.targets),
                    share_a=list(bundle.share_a))
    wrappers = inject_lora(model, spec)
    unknown = sorted(set(bundle.modules) - set(wrappers))
    if unknown:
        raise BundleError(f"bundle module {unknown[0]} is not a LoRA-targetable Linear of the base model")
    state = {k: torch.zeros_like(v) for k, v in lora_state(model, bundle.roles).items()}
    for m in bundle.modules:
        if bundle.shares_a(m):
            state[f"{m}.lora_A"] = bundle.shared_a[m]
        for r in bundle.roles:
            state[f"{m}.lora_B.{r}"] = bundle.b(m, r)
            if not bundle.shares_a(m):
                state[f"{m}.lora_A.{r}"] = bundle.a(m, r)
    load_lora_state(model, bundle.roles, state)
    return model


@contextlib.contextmanager
def _no_missing_keys(role: str):
    """Raise BundleError when PEFT warns that the adapter lacks tensors for modules it wrapped (its config names
    more modules than the bundle holds); other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if "missing adapter keys" in str(w.message):
            raise BundleError(f"peft/{role}: PEFT wraps modules the adapter has no tensors for ("
                              f"{' '.join(str(w.message).split())[:120]}): its adapter_config.json is wrong")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@torch.no_grad()
def verify_peft(bundle_dir: str | Path, base_dir: str | Path, *, tol: float = 1e-5, device: str = "cpu",
                seed: int = 0) -> dict[str, float]:
    """Load every ``peft/<role>`` of the bundle with PEFT on the base model (fp32) and compare its logits on a
    random probe batch with the bundle's own forward. Error measure: max |logits_peft - logits_bundle| divided by
    max(1, max |logits_bundle|) (fp32 rounding grows with the logit scale); raise :class:`BundleError` above ``tol``,
    or when PEFT reports missing adapter keys (an adapter config naming modules the bundle does not carry).
    Returns {role: max abs logit difference}. Uses one copy of the base weights (PEFT is unloaded first)."""
    from peft import PeftModel

    root, base_dir = Path(bundle_dir), Path(base_dir)
    bundle = load_bundle(root, base_dir=base_dir)
    model = _load_base(base_dir, device)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, PROBE_SHAPE, generator=gen).to(device)
    peft_logits = {}
    pm = None
    for role in bundle.roles:
        path = str(root / "peft" / role)
        with _no_missing_keys(role):
            if pm is None:
                pm = PeftModel.from_pretrained(model, path, adapter_name=role, is_trainable=False)
            else:
                pm.load_adapter(path, adapter_name=role, is_trainable=False)
        pm.set_adapter(role)
        peft_logits[role] = pm(input_ids=ids).logits.float()
    model = bundle_model(pm.unload(), bundle)
    from lragent.train.lora import roles as route

    errors = {}
    for k, role in enumerate(bundle.roles):
        with route(model, torch.full((ids.shape[0],), k, device=device)):
            ours = model(input_ids=ids).logits.float()
        err = (peft_logits[role] - ours).abs().max().item()
        scale = max(1.0, ours.abs().max().item())
        if not err <= tol * scale:
            raise BundleError(f"peft/{role} does not reproduce the bundle's forward: max |logit diff| {err:.3g} > "
                              f"{tol:g} x {scale:.3g} (PEFT export is wrong; nothing was written)")
        errors[role] = err
    return errors


def export_run(run_dir: str | Path, out_dir: str | Path, *, checkpoint: int | None = None, force: bool = False,
               base_dir: str | Path | None = None, device: str = "cpu", tol: float = 1e-5,
               progress=None) -> tuple[Path, dict]:
    """Export a run's checkpoint as a bundle (atomic, PEFT-verified). Returns (bundle path, {role: logit error}).
    ``progress(text)``, if given, is told what is being checked before the (slow) verification starts."""
    bundle = bundle_from_run(run_dir, checkpoint, base_dir)
    errors: dict[str, float] = {}

    def verify(tmp: Path) -> None:
        if progress is not None:
            progress(f"verifying: loading each peft/<role> ({', '.join(bundle.roles)}) with PEFT on the base model "
                     f"and comparing its logits with the bundle's forward ...")
        errors.update(verify_peft(tmp, bundle.base["path"], tol=tol, device=device))

    out = write_bundle(bundle, out_dir, force=force, verify=verify)
    return out, errors
