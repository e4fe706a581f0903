"""Loading bundles with full validation: every problem is one BundleError line; nothing is unpickled."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .format import (ALLOWED_SUFFIXES, FORMAT_NAME, FORMAT_VERSION, PICKLE_SUFFIXES, base_fingerprint, Bundle,
                     BundleError, sha256_file, validate_role_name)


def _resolve_inside(root: Path, rel: str) -> Path:
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise BundleError(f"manifest path {rel!r} escapes the bundle directory {root}: paths must be relative, no '..'")
    full = (root / rel).resolve()
    if root.resolve() not in full.parents:
        raise BundleError(f"manifest path {rel!r} escapes the bundle directory {root} (through a link)")
    return full


def read_manifest(bundle_dir: str | Path) -> dict:
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"bundle {root} is not a directory: pass the directory written by 'lragent export'")
    path = root / "manifest.json"
    if not path.is_file():
        raise BundleError(f"bundle {root} has no manifest.json: it is not an lragent bundle (or was half-written)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                          f"expected {FORMAT_NAME!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise BundleError(f"{path}: unknown bundle format version {manifest.get('version')!r}; this lragent reads "
                          f"version {FORMAT_VERSION} (upgrade lragent or re-export the bundle)")
    return manifest


def _files_on_disk(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):           # does not follow links to directories
        rel = Path(dirpath).relative_to(root)
        out.update((rel / n).as_posix() for n in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()])
    return out - {"manifest.json"}


def _check_files(root: Path, manifest: dict, roles: list[str], share_a: list) -> dict[str, str]:
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{root}/manifest.json: 'files' must map relative paths to sha256 digests")
    for rel in list(files) + [v for v in (manifest.get("peft") or {}).values()]:
        _resolve_inside(root, rel)
    on_disk = _files_on_disk(root)
    for rel in sorted(on_disk | set(files)):
        if rel.endswith(PICKLE_SUFFIXES) or not rel.endswith(ALLOWED_SUFFIXES):
            raise BundleError(f"{root}/{rel} is not a safetensors or JSON file; bundles hold safetensors weights only "
                              f"(lragent never unpickles): remove it or re-export the bundle")
    missing = sorted(set(files) - on_disk)
    if missing:
        raise BundleError(f"bundle {root} is missing {missing[0]} (listed in manifest.json): re-export the bundle")
    extra = sorted(on_disk - set(files))
    if extra:
        raise BundleError(f"bundle {root} has an unlisted file {extra[0]}: remove it or re-export the bundle")
    expected = {f"roles/{r}.safetensors" for r in roles} | ({"shared_a.safetensors"} if share_a else set())
    expected |= {f"peft/{r}/{n}" for r in roles for n in ("adapter_config.json", "adapter_model.safetensors")}
    if set(files) != expected:
        odd = sorted(set(files) ^ expected)[0]
        raise BundleError(f"{root}/manifest.json: file list does not match roles {roles} "
                          f"({odd} is {'unexpected' if odd in files else 'not listed'}): re-export the bundle")
    return files


def _load_tensors(path: Path, suffix_ok: tuple[str, ...]) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    bad = [k for k in tensors if not k.endswith(suffix_ok)]
    if bad:
        raise BundleError(f"{path} holds an unexpected tensor {bad[0]!r} (expected names ending in {suffix_ok})")
    return tensors


def _check_manifest_matches(root: Path, manifest: dict, bundle: Bundle) -> None:
    lora, where = manifest["lora"], f"{root}/manifest.json"
    if "modules" in lora and sorted(lora["modules"]) != bundle.modules:
        raise BundleError(f"{where}: lora.modules do not match the modules in the tensor files: re-export")
    if not math.isclose(float(lora.get("scaling", bundle.scaling)), bundle.scaling, rel_tol=1e-9):
        raise BundleError(f"{where}: lora.scaling {lora.get('scaling')} != {bundle.scaling} from rank/alpha/rule")
    if lora.get("lrshared_ok", bundle.lrshared_ok) != bundle.lrshared_ok or \
            manifest.get("modes", bundle.modes) != bundle.modes:
        raise BundleError(f"{where}: lrshared_ok/modes do not match share_a {bundle.share_a}: re-export")
    dtype = str(bundle.b(bundle.modules[0], bundle.roles[0]).dtype).replace("torch.", "")
    if manifest.get("dtype", dtype) != dtype:
        raise BundleError(f"{where}: dtype {manifest.get('dtype')!r} does not match the tensors ({dtype}): re-export")
    if manifest.get("a_family_hash") != bundle.a_family_hash:
        raise BundleError(f"{where}: a_family_hash does not match the shared A tensors; re-export")
    for role in bundle.roles:
        try:
            cfg = json.loads((root / "peft" / role / "adapter_config.json").read_text())
            ok = cfg.get("r") == bundle.rank and cfg.get("lora_alpha") == bundle.rank and not cfg.get("use_rslora")
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise BundleError(f"{root}/peft/{role}/adapter_config.json is unreadable or its r/lora_alpha are not "
                              f"the bundle rank {bundle.rank}: re-export the bundle")


def load_bundle(bundle_dir: str | Path, *, base_dir: str | Path | None = None, verify: bool = True) -> Bundle:
    """Load and validate a bundle. ``base_dir``: the base model to be used with it; its config fingerprint must
    match the manifest. ``verify``: check the sha256 of every listed file. Reads nothing but JSON and
    safetensors; raises :class:`BundleError` (one line) on the first problem and never writes."""
    root = Path(bundle_dir).absolute()
    manifest = read_manifest(root)
    try:
        if not isinstance(manifest["roles"], list):
            raise TypeError("'roles' must be a list")
        roles = [validate_role_name(r) for r in manifest["roles"]]
        lora = manifest["lora"]
        rank, alpha, targets, share_a = int(lora["rank"]), float(lora["alpha"]), lora["targets"], lora["share_a"]
        rule = lora.get("scaling_rule", "standard")
        files = _check_files(root, manifest, roles, share_a)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"{root}/manifest.json is missing or has a bad field: {e}") from None
    if verify:
        for rel, digest in files.items():
            if sha256_file(root / rel) != digest:
                raise BundleError(f"{root}/{rel}: sha256 does not match manifest.json (corrupted or modified); "
                                  f"re-export the bundle")
    if base_dir is not None:
        want = (manifest.get("base") or {}).get("config_sha256")
        got = base_fingerprint(base_dir)
        if want != got:
            raise BundleError(f"base model {base_dir} does not match the bundle (config.json sha256 {got[:12]} != "
                              f"{str(want)[:12]}): pass the base model the adapters were trained on")

    shared_a: dict[str, torch.Tensor] = {}
    if share_a:
        shared_a = {k[: -len(".lora_A")]: v for k, v in _load_tensors(root / "shared_a.safetensors",
                                                                       (".lora_A",)).items()}
    role_a, role_b = {}, {}
    for role in roles:
        t = _load_tensors(root / "roles" / f"{role}.safetensors", (".lora_A", ".lora_B"))
        role_b[role] = {k[: -len(".lora_B")]: v for k, v in t.items() if k.endswith(".lora_B")}
        role_a[role] = {k[: -len(".lora_A")]: v for k, v in t.items() if k.endswith(".lora_A")}
    bundle = Bundle(roles=roles, rank=rank, alpha=alpha, targets=list(targets), share_a=list(share_a),
                    shared_a=shared_a, role_a=role_a, role_b=role_b, scaling_rule=rule,
                    base=manifest.get("base") or {}, source=manifest.get("source") or {}, root=root)
    try:
        bundle.validate()
    except BundleError as e:
        raise BundleError(f"{root}: {e}") from None
    _check_manifest_matches(root, manifest, bundle)
    return bundle
