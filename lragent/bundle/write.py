"""Writing bundles: atomically (temp dir, optional verification, then rename or atomic exchange)."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from .format import FORMAT_NAME, FORMAT_VERSION, Bundle, BundleError, sha256_file, target_of


def _peft_files(bundle: Bundle, role: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A standard PEFT LoRA adapter for one role: uniform rank, scaling baked into B, lora_alpha == r."""
    tensors = {}
    for module in bundle.modules:
        tensors[f"base_model.model.{module}.lora_A.weight"] = bundle.a(module, role).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = (bundle.b(module, role) * bundle.scaling).contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": bundle.rank, "lora_alpha": bundle.rank,
        "use_rslora": False, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted({target_of(m) for m in bundle.modules}), "inference_mode": True,
        "base_model_name_or_path": bundle.base.get("path") or bundle.base.get("name"),
    }
    return config, tensors


def manifest_of(bundle: Bundle, files: dict[str, str]) -> dict:
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


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where the OS cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_bundle(bundle: Bundle, out_dir: str | Path, *, force: bool = False,
                 verify: Callable[[Path], None] | None = None) -> Path:
    """Write ``bundle`` to ``out_dir`` atomically: everything goes to a temp dir next to it, ``verify(tmp_dir)`` (if
    given) may check it and raise, then the temp dir is renamed into place (with ``force``, atomically exchanged
    with the existing bundle). Refuses to overwrite anything unless ``force``, and even then only an existing
    bundle or empty directory; on any failure nothing is left behind and an existing bundle is untouched."""
    bundle.validate()
    out = Path(out_dir).absolute()
    if out.exists() or out.is_symlink():
        if not force:
            raise BundleError(f"{out} already exists: choose another --out or pass --force to replace it")
        if not _replaceable(out):
            raise BundleError(f"{out} exists and is not an lragent bundle: refusing to replace it, even with --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
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
        if out.exists() and _exchange(tmp, out):
            pass                                   # tmp now holds the old bundle; removed below
        elif out.exists():                         # fallback: two renames, rolled back on failure
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "bundle")
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old / "bundle", out)
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bundle.root = out
    return out
