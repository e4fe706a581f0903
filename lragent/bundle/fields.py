"""Typed reading of a bundle manifest: every field is checked for its JSON type before use (no silent ``int()``,
no ``float("abc")`` traceback); each problem is one BundleError line naming the field."""
from __future__ import annotations

import math
import re

from .format import BundleError

_SHA = re.compile(r"^[0-9a-f]{64}$")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def parse_manifest(manifest: dict, where: str) -> dict:
    """The manifest's fields, type-checked: roles, rank, alpha, scaling (or None), scaling_rule, targets, share_a,
    modules / lrshared_ok / modes / dtype (None when absent), a_family_hash, base, source, files, peft."""
    def bad(field: str, want: str, got) -> BundleError:
        shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
        return BundleError(f"{where}: {field} must be {want}, got {shown}: re-export the bundle")

    roles = manifest.get("roles")
    if not _str_list(roles) or not roles:
        raise bad("roles", "a non-empty list of role names", roles)
    lora = manifest.get("lora")
    if not isinstance(lora, dict):
        raise bad("lora", "an object", lora)
    rank = lora.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise bad("lora.rank", "a positive integer", rank)
    alpha = lora.get("alpha")
    if not _is_num(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise bad("lora.alpha", "a finite number > 0", alpha)
    scaling = lora.get("scaling")
    if scaling is not None and (not _is_num(scaling) or not math.isfinite(scaling)):
        raise bad("lora.scaling", "a finite number", scaling)
    rule = lora.get("scaling_rule", "standard")
    if rule not in ("standard", "rslora"):
        raise bad("lora.scaling_rule", "'standard' or 'rslora'", rule)
    out = {"roles": roles, "rank": rank, "alpha": float(alpha), "scaling": None if scaling is None else float(scaling),
           "scaling_rule": rule}
    for key in ("targets", "share_a"):
        v = lora.get(key)
        if not _str_list(v):
            raise bad(f"lora.{key}", "a list of module names", v)
        out[key] = list(v)
    modules = lora.get("modules")
    if modules is not None and not _str_list(modules):
        raise bad("lora.modules", "a list of module paths", modules)
    lrs = lora.get("lrshared_ok")
    if lrs is not None and not isinstance(lrs, bool):
        raise bad("lora.lrshared_ok", "true or false", lrs)
    modes = manifest.get("modes")
    if modes is not None and not _str_list(modes):
        raise bad("modes", "a list of mode names", modes)
    dtype = manifest.get("dtype")
    if dtype is not None and not isinstance(dtype, str):
        raise bad("dtype", "a dtype name", dtype)
    afh = manifest.get("a_family_hash")
    if afh is not None and not (isinstance(afh, str) and _SHA.match(afh)):
        raise bad("a_family_hash", "a sha256 hex digest or null", afh)
    out.update(modules=modules, lrshared_ok=lrs, modes=modes, dtype=dtype, a_family_hash=afh)
    for key in ("base", "source", "peft"):
        v = manifest.get(key)
        if v is not None and not isinstance(v, dict):
            raise bad(key, "an object", v)
        out[key] = v or {}
    if not all(isinstance(v, str) for v in out["peft"].values()):
        raise bad("peft", "an object of role -> relative path", out["peft"])
    base = out["base"]
    for key in ("name", "path", "config_sha256", "weights_fingerprint"):
        if base.get(key) is not None and not isinstance(base[key], str):
            raise bad(f"base.{key}", "a string", base[key])
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{where}: 'files' must map relative paths to sha256 digests")
    for rel, digest in files.items():
        if not (isinstance(digest, str) and _SHA.match(digest)):
            raise bad(f"files[{rel!r}]", "a sha256 hex digest", digest)
    out["files"] = files
    return out
