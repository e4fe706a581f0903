"""The ``peft/<role>`` copies of a bundle must be the bundle's own adapters: same A, B with the scaling baked in."""
from __future__ import annotations

import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from .format import Bundle, BundleError
from .peftlayout import layout_ok

PREFIX = "base_model.model."


def check_peft_copies(bundle: Bundle, files: dict[str, bytes], n_layers: int | None = None) -> None:
    """Raise one BundleError line unless, for every role, ``peft/<role>/adapter_config.json`` says r = lora_alpha =
    the bundle rank (no rsLoRA) and names exactly the bundle's modules (target_modules, layers_to_transform; see
    ``peftlayout``; ``n_layers``: the base's decoder-layer count, None if unknown), and ``adapter_model.safetensors``
    holds exactly the bundle's modules with ``lora_A == A`` and ``lora_B == scaling * B`` (bitwise: the writer
    computes them the same way). ``files`` maps relative paths to the bytes read from the bundle."""
    root = bundle.root
    for role in bundle.roles:
        where = f"{root}/peft/{role}"
        try:
            cfg = json.loads(files[f"peft/{role}/adapter_config.json"].decode("utf-8"))
            ok = isinstance(cfg, dict) and cfg.get("r") == bundle.rank and cfg.get("lora_alpha") == bundle.rank \
                and not cfg.get("use_rslora") and cfg.get("peft_type", "LORA") == "LORA"
        except (KeyError, ValueError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise BundleError(f"{where}/adapter_config.json is unreadable or its r/lora_alpha are not the bundle rank "
                              f"{bundle.rank}: re-export the bundle")
        if not layout_ok(cfg, bundle.modules, n_layers):
            raise BundleError(f"{where}/adapter_config.json: target_modules / layers_to_transform do not name exactly "
                              f"the bundle's modules (PEFT would load it with missing keys): re-export the bundle")
        try:
            tensors = load_safetensors(files[f"peft/{role}/adapter_model.safetensors"])
        except (KeyError, SafetensorError, ValueError, RuntimeError) as e:
            raise BundleError(f"{where}/adapter_model.safetensors is not a readable safetensors file "
                              f"({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})") from None
        want = {f"{PREFIX}{m}.lora_{p}.weight" for m in bundle.modules for p in "AB"}
        if set(tensors) != want:
            odd = sorted(set(tensors) ^ want)[0]
            raise BundleError(f"{where}/adapter_model.safetensors does not hold exactly the bundle's modules "
                              f"({odd} is {'unexpected' if odd in tensors else 'missing'}): re-export the bundle")
        for m in bundle.modules:
            a, b = tensors[f"{PREFIX}{m}.lora_A.weight"], tensors[f"{PREFIX}{m}.lora_B.weight"]
            ref_a, ref_b = bundle.a(m, role), bundle.b(m, role) * bundle.scaling
            if not (a.dtype == ref_a.dtype and a.shape == ref_a.shape and torch.equal(a, ref_a)
                    and b.dtype == ref_b.dtype and b.shape == ref_b.shape and torch.equal(b, ref_b)):
                raise BundleError(f"{where} does not match the bundle's own tensors for {role!r} on {m} (lora_A must "
                                  f"equal roles/ or shared_a, lora_B must be scaling * B): re-export the bundle")
