"""Which modules a bundle's ``peft/<role>`` adapter covers, said the way PEFT, vLLM and SGLang read it.

PEFT wraps every module whose name ends in a ``target_modules`` entry, in every decoder layer unless
``layers_to_transform`` narrows it; a wrapped module with no tensor in ``adapter_model.safetensors`` is reported as a
missing key (and left at a zero adapter). So the adapter config must name exactly the bundle's modules:

- adapters on every decoder layer: ``target_modules`` = the short target names (what every bundle wrote before);
- adapters on some layers, the same ones for every target: short names plus ``layers_to_transform`` (the layer
  indices) and ``layers_pattern: "layers"`` (the ``model.layers.N`` module list);
- targets on different layer sets: ``target_modules`` = the full module paths (PEFT matches a path exactly).

Whether a bundle covers every layer needs the base model's layer count (:func:`base_layer_count`, read from the
base's config.json when it is the one the bundle records); when unknown, the layers are always spelled out.
"""
from __future__ import annotations

import json
from pathlib import Path

from .format import base_fingerprint, layer_of, target_of

LAYOUT_KEYS = ("target_modules", "layers_to_transform", "layers_pattern")
LAYERS_PATTERN = "layers"


def base_layer_count(base: dict, base_dir: str | Path | None = None) -> int | None:
    """The number of decoder layers of the bundle's base (``base``: the manifest's base record), read from
    ``base_dir`` or the recorded path, whichever holds a config.json with the recorded sha256 first; None when
    neither does (or it has no ``num_hidden_layers``)."""
    want = (base or {}).get("config_sha256")
    for d in (base_dir, (base or {}).get("path")):
        if not d or not (Path(d) / "config.json").is_file():
            continue
        try:
            if want is not None and base_fingerprint(d) != want:
                continue
            cfg = json.loads((Path(d) / "config.json").read_text())
        except (OSError, ValueError):
            continue
        n = cfg.get("num_hidden_layers", (cfg.get("text_config") or {}).get("num_hidden_layers"))
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def peft_layout(modules: list[str], n_layers: int | None) -> dict:
    """The adapter_config.json keys (of :data:`LAYOUT_KEYS`) that make PEFT wrap exactly ``modules`` (module
    paths inside decoder layers) of a base with ``n_layers`` decoder layers (None: unknown)."""
    by_target: dict[str, set[int]] = {}
    for m in modules:
        by_target.setdefault(target_of(m), set()).add(layer_of(m))
    if len({frozenset(v) for v in by_target.values()}) > 1:
        return {"target_modules": sorted(modules)}
    layers = sorted(next(iter(by_target.values())))
    targets = sorted(by_target)
    if n_layers is not None and layers == list(range(n_layers)):
        return {"target_modules": targets}
    return {"target_modules": targets, "layers_to_transform": layers, "layers_pattern": LAYERS_PATTERN}


def layout_ok(config: dict, modules: list[str], n_layers: int | None) -> bool:
    """Whether an adapter config's layout keys describe exactly ``modules``: the layout :func:`peft_layout` gives,
    or the one it gives with the layer count unknown (layers spelled out: exact for any base); with the layer count
    unknown, the every-layer form (short names only) is accepted too."""
    got = {k: config[k] for k in LAYOUT_KEYS if config.get(k) is not None}
    if isinstance(got.get("target_modules"), list):
        got["target_modules"] = sorted(got["target_modules"])
    explicit = peft_layout(modules, None)
    want = [peft_layout(modules, n_layers), explicit]
    if n_layers is None and "layers_to_transform" in explicit:
        want.append({"target_modules": explicit["target_modules"]})
    return got in want
