"""Writing bundles: atomically (temp dir, optional verification, then rename or atomic exchange)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from . import fsutil
from .format import FORMAT_NAME, FORMAT_VERSION, Bundle, BundleError, sha256_file
from .peftlayout import base_layer_count, peft_layout


def _peft_files(bundle: Bundle, role: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A standard PEFT LoRA adapter for one role: uniform rank, scaling baked into B, lora_alpha == r; its
    target_modules (and, for adapters on some decoder layers only, layers_to_transform / layers_pattern) name exactly
    the bundle's modules (see ``peftlayout``)."""
    tensors = {}
    for module in bundle.modules:
        tensors[f"base_model.model.{module}.lora_A.weight"] = bundle.a(module, role).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = (bundle.b(module, role) * bundle.scaling).contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": bundle.rank, "lora_alpha": bundle.rank,
        "use_rslora": False, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        **peft_layout(bundle.modules, base_layer_count(bundle.base)), "inference_mode": True,
        "base_model_name_or_path": bundle.base.get("path") or bundle.base.get("name"),
    }
    return config, tensors


def manifest_of(bundle: Bundle, files: dict[str, str]) -> dict:
    """The manifest.json content of ``bundle`` with the given {relative path: sha256} file list."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "base": bundle.base,
        "roles": list(bundle.roles),
        "lora": {
            "rank": bundle.rank, "alpha": bundle.alpha, "scaling_rule": bundle.scaling_rule,
            "scaling": bundle.scaling, "targets": list(bundle.targets), "share_a": list(bundle.share_a),
            "modules": bundle.modules, "lrshared_ok": bundle.lrshared_ok,
        },
        "modes": bundle.modes,
        "dtype": str(bundle.b(bundle.modules[0], bundle.roles[0]).dtype).replace("torch.", ""),
        "a_family_hash": bundle.a_family_hash,
        "peft": {role: f"peft/{role}" for role in bundle.roles},
        "source": bundle.source,
        "files": files,
    }


def _replaceable(out: Path) -> bool:
    """--force replaces only an lragent bundle (any version) or an empty directory, never arbitrary data."""
    if not out.is_dir() or out.is_symlink():
        return False
    if not any(out.iterdir()):
        return True
    try:
        return json.loads((out / "manifest.json").read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


_exchange = fsutil.exchange        # module attribute so that tests can force the two-rename fallback


def _check_target(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise BundleError(f"{out} already exists: choose another --out or pass --force to replace it")
        if not _replaceable(out):
            raise BundleError(f"{out} exists and is not an lragent bundle: refusing to replace it, even with --force")


def _place(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished ``tmp`` to ``out``. The target is checked again here, at the exchange: without ``force``
    the rename fails if anything appeared at ``out`` meanwhile; with it, only a bundle (or empty directory) is ever
    swapped out, and something else found in the swap is swapped back."""
    if not force or not os.path.lexists(out):
        try:
            fsutil.rename_noreplace(tmp, out)
            return
        except FileExistsError:
            if not force:
                raise BundleError(f"{out} appeared while the bundle was being written (another export?): nothing "
                                  f"was replaced; choose another --out or pass --force") from None
    if not _replaceable(out):
        raise BundleError(f"{out} exists and is not an lragent bundle: refusing to replace it, even with --force")
    if _exchange(tmp, out):                        # tmp now holds what was at out; removed by the caller
        if not _replaceable(tmp):                  # replaced by something else between the check and the swap
            _exchange(tmp, out)
            raise BundleError(f"{out} was replaced by something that is not an lragent bundle while the bundle "
                              f"was being written: left it in place, nothing was written")
        return
    old = fsutil.new_temp_dir(out, "old")          # fallback: two renames, rolled back on failure
    try:
        os.rename(out, old / "bundle")
        if not _replaceable(old / "bundle"):
            os.rename(old / "bundle", out)
            raise BundleError(f"{out} was replaced by something that is not an lragent bundle while the bundle "
                              f"was being written: left it in place, nothing was written")
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old / "bundle", out)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_bundle(bundle: Bundle, out_dir: str | Path, *, force: bool = False,
                 verify: Callable[[Path], None] | None = None) -> Path:
    """Write ``bundle`` to ``out_dir`` atomically: everything goes to a temp dir next to it (stale temp dirs of
    killed writers are removed first), ``verify(tmp_dir)`` (if given) may check it and raise, then the temp dir is
    renamed into place (with ``force``, atomically exchanged with the existing bundle). Refuses to overwrite anything
    unless ``force``, and even then only an existing bundle or empty directory, checked again at the exchange;
    on any failure (a full disk included) nothing is left behind and an existing bundle is untouched. Files and
    directories get umask-following modes."""
    bundle.validate()
    out = Path(out_dir).absolute()
    _check_target(out, force)
    tmp, created, placed = None, fsutil.missing_ancestor(out), False
    try:
        tmp = fsutil.new_temp_dir(out)
        files = {}

        def put(rel: str, tensors: dict[str, torch.Tensor]):
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
            files[rel] = sha256_file(path)

        if bundle.shared_a:
            put("shared_a.safetensors", {f"{m}.lora_A": a for m, a in bundle.shared_a.items()})
        for role in bundle.roles:
            tensors = {f"{m}.lora_B": b for m, b in bundle.role_b[role].items()}
            tensors.update({f"{m}.lora_A": a for m, a in bundle.role_a.get(role, {}).items()})
            put(f"roles/{role}.safetensors", tensors)
            config, peft_tensors = _peft_files(bundle, role)
            put(f"peft/{role}/adapter_model.safetensors", peft_tensors)
            cfg_path = tmp / "peft" / role / "adapter_config.json"
            cfg_path.write_text(json.dumps(config, indent=2) + "\n")
            files[f"peft/{role}/adapter_config.json"] = sha256_file(cfg_path)
        (tmp / "manifest.json").write_text(json.dumps(manifest_of(bundle, files), indent=2) + "\n")
        if verify is not None:
            verify(tmp)
        fsutil.seal(tmp)
        _place(tmp, out, force)
        placed = True
    except OSError as e:
        raise BundleError(f"cannot write bundle {out}: {fsutil.describe_os_error(e)}; nothing was written") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not placed:
            fsutil.remove_created(created, out)
    bundle.root = out
    return out
