"""Bundle v1: the one contract between training and serving.

A bundle is a directory::

    manifest.json                  format, version, base fingerprint, roles, LoRA config, A-family hash, file sha256s
    shared_a.safetensors           one A [r, in] per module whose target shares A across roles ("<module>.lora_A")
    roles/<role>.safetensors       that role's B [out, r] per module ("<module>.lora_B") and its own A [r, in] for
                                   targets that do not share A ("<module>.lora_A")
    peft/<role>/adapter_config.json, adapter_model.safetensors
                                   a standard PEFT LoRA adapter (scaling baked into B, lora_alpha == r)

Module names are the base model's ``nn.Linear`` paths (``model.layers.3.self_attn.v_proj``). Tensors are kept as
trained (unscaled); the LoRA delta of a role on a module is ``scaling * B @ A``. Bundles are written atomically
(temp directory, then rename) and loaded with full validation; every problem is one :class:`BundleError` line.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_NAME = "lragent-bundle"
FORMAT_VERSION = 1
CACHED_TARGETS = ("k_proj", "v_proj")
ROLE_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Names that appear as segments of Llama-family module paths (or PEFT's own): a role (= PEFT adapter name) equal to
# one of them silently corrupts PEFT exports, so they are refused.
RESERVED_ROLE_NAMES = frozenset({
    "model", "layers", "self_attn", "mlp", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
    "down_proj", "embed_tokens", "norm", "lm_head", "input_layernorm", "post_attention_layernorm", "rotary_emb",
    "q_norm", "k_norm", "base_model", "base_layer", "lora", "default", "weight", "bias",
})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")


class BundleError(ValueError):
    """A bundle (or the request to write one) is invalid; the message is one line saying what and how to fix it."""


def validate_role_name(role: str) -> str:
    if not isinstance(role, str) or not ROLE_RE.match(role):
        raise BundleError(f"invalid role name {role!r}: use lowercase letters, digits and '_' (^[a-z][a-z0-9_]*$)")
    if role in RESERVED_ROLE_NAMES:
        raise BundleError(f"invalid role name {role!r}: it is a module-path segment of the model; pick another name")
    return role


def target_of(module: str) -> str:
    """``model.layers.3.self_attn.v_proj`` -> ``v_proj``."""
    return module.rsplit(".", 1)[-1]


def layer_of(module: str) -> int:
    m = re.search(r"\.layers\.(\d+)\.", module)
    if not m:
        raise BundleError(f"module {module!r} is not inside a decoder layer ('.layers.N.')")
    return int(m.group(1))


def lora_scaling(rank: int, alpha: float, rule: str = "standard") -> float:
    if rule == "standard":
        return alpha / rank
    if rule == "rslora":
        return alpha / math.sqrt(rank)
    raise BundleError(f"unknown scaling rule {rule!r}: use 'standard' or 'rslora'")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_fingerprint(base_dir: str | Path) -> str:
    """sha256 of the base model's config.json (the bytes on disk)."""
    cfg = Path(base_dir) / "config.json"
    if not cfg.is_file():
        raise BundleError(f"base model {base_dir} has no config.json: pass a local Hugging Face model directory")
    return sha256_file(cfg)


@dataclass
class Bundle:
    """Role adapters with (optionally) shared A, in memory. A [r, in] and B [out, r] are unscaled."""

    roles: list[str]
    rank: int
    alpha: float
    targets: list[str]
    share_a: list[str]
    shared_a: dict[str, torch.Tensor]                      # module -> A, for modules whose target is in share_a
    role_a: dict[str, dict[str, torch.Tensor]]             # role -> module -> A, for the other targets
    role_b: dict[str, dict[str, torch.Tensor]]             # role -> module -> B
    scaling_rule: str = "standard"
    base: dict = field(default_factory=dict)               # {"name", "path", "config_sha256"}
    source: dict = field(default_factory=dict)             # free-form provenance (run dir, import options, ...)
    root: Path | None = None

    @property
    def scaling(self) -> float:
        return lora_scaling(self.rank, self.alpha, self.scaling_rule)

    @property
    def modules(self) -> list[str]:
        return sorted(self.role_b[self.roles[0]])

    def shares_a(self, module_or_target: str) -> bool:
        return target_of(module_or_target) in self.share_a

    def a(self, module: str, role: str) -> torch.Tensor:
        return self.shared_a[module] if self.shares_a(module) else self.role_a[role][module]

    def b(self, module: str, role: str) -> torch.Tensor:
        return self.role_b[role][module]

    @property
    def lrshared_ok(self) -> bool:
        """True when every cached target carrying LoRA shares A, so the low-rank cache can be shared by all roles."""
        cached = [t for t in self.targets if t in CACHED_TARGETS]
        return bool(cached) and all(t in self.share_a for t in cached)

    @property
    def a_family_hash(self) -> str | None:
        """sha256 over the shared A tensors (names, shapes, values) and the scaling: two bundles may share a
        low-rank cache only if this and the base fingerprint both match. None when no target shares A."""
        if not self.shared_a:
            return None
        h = hashlib.sha256(f"scaling={self.scaling!r};share_a={sorted(self.share_a)}".encode())
        for name in sorted(self.shared_a):
            t = self.shared_a[name].detach().to("cpu").contiguous()
            h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def delta_weight(self, module: str, role: str) -> torch.Tensor:
        return self.scaling * (self.b(module, role).float() @ self.a(module, role).float())

    def validate(self) -> None:
        """Check names, ranks and shapes; raise one BundleError line for the first problem."""
        if not self.roles:
            raise BundleError("bundle has no roles: give at least one role")
        if len(set(self.roles)) != len(self.roles):
            raise BundleError(f"duplicate role names in {self.roles}")
        for role in self.roles:
            validate_role_name(role)
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise BundleError(f"lora rank must be a positive integer, got {self.rank!r}")
        bad = [t for t in self.share_a if t not in self.targets]
        if bad:
            raise BundleError(f"share_a targets {bad} are not LoRA targets {self.targets}")
        lora_scaling(self.rank, self.alpha, self.scaling_rule)
        modules = set(self.role_b.get(self.roles[0], {}))
        if not modules:
            raise BundleError(f"role {self.roles[0]!r} has no B tensors")
        for role in self.roles:
            if role not in self.role_b or set(self.role_b[role]) != modules:
                raise BundleError(f"role {role!r} does not have a B for exactly the modules {sorted(modules)[:3]}...")
        for module in sorted(modules):
            if target_of(module) not in self.targets:
                raise BundleError(f"module {module!r} is not one of the targets {self.targets}")
            for role in self.roles:
                try:
                    a, b = self.a(module, role), self.b(module, role)
                except KeyError:
                    raise BundleError(f"missing lora_A for module {module!r} (role {role!r})") from None
                if a.dim() != 2 or a.shape[0] != self.rank:
                    raise BundleError(f"{module}.lora_A has shape {list(a.shape)}, expected [rank={self.rank}, in]")
                if b.dim() != 2 or b.shape[1] != self.rank:
                    raise BundleError(f"{module}.lora_B of role {role!r} has shape {list(b.shape)}, "
                                      f"expected [out, rank={self.rank}]")
        extra = set(self.shared_a) - modules
        if extra:
            raise BundleError(f"shared lora_A for modules with no B: {sorted(extra)[:3]}")


# ----------------------------------------------------------------------------------------------------------------
# writing


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
        "dtype": str(next(iter(bundle.role_b[bundle.roles[0]].values())).dtype).replace("torch.", ""),
        "a_family_hash": bundle.a_family_hash,
        "peft": {role: f"peft/{role}" for role in bundle.roles},
        "source": bundle.source,
        "files": files,
    }


def write_bundle(bundle: Bundle, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write ``bundle`` to ``out_dir`` atomically (temp dir next to it, then rename). Refuses to overwrite an
    existing path unless ``force``; on any failure nothing is left behind and an existing bundle is untouched."""
    bundle.validate()
    out = Path(out_dir).absolute()
    if out.exists() and not force:
        raise BundleError(f"{out} already exists: choose another --out or pass --force to replace it")
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
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "bundle")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bundle.root = out
    return out


# ----------------------------------------------------------------------------------------------------------------
# loading


def _resolve_inside(root: Path, rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise BundleError(f"manifest path {rel!r} escapes the bundle directory {root}: paths must be relative, no '..'")
    full = (root / p).resolve()
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
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                          f"expected {FORMAT_NAME!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise BundleError(f"{path}: unknown bundle format version {manifest.get('version')!r}; this lragent reads "
                          f"version {FORMAT_VERSION} (upgrade lragent or re-export the bundle)")
    return manifest


def load_bundle(bundle_dir: str | Path, *, base_dir: str | Path | None = None, verify: bool = True) -> Bundle:
    """Load and validate a bundle. ``base_dir``: the base model to be used with it; its config fingerprint must
    match the manifest. ``verify``: check the sha256 of every listed file."""
    root = Path(bundle_dir).absolute()
    manifest = read_manifest(root)
    try:
        roles = [validate_role_name(r) for r in manifest["roles"]]
        lora = manifest["lora"]
        files: dict[str, str] = manifest["files"]
        rank, alpha, targets, share_a = int(lora["rank"]), float(lora["alpha"]), lora["targets"], lora["share_a"]
        rule = lora.get("scaling_rule", "standard")
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{root}/manifest.json is missing or has a bad field: {e}") from None

    for rel in files:
        _resolve_inside(root, rel)
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
    for rel in sorted(on_disk):
        if rel.endswith(PICKLE_SUFFIXES):
            raise BundleError(f"{root}/{rel} is a pickle-format weight file; bundles hold safetensors only "
                              f"(remove it; lragent never unpickles)")
    missing = sorted(set(files) - on_disk)
    if missing:
        raise BundleError(f"bundle {root} is missing {missing[0]} (listed in manifest.json): re-export the bundle")
    extra = sorted(on_disk - set(files))
    if extra:
        raise BundleError(f"bundle {root} has an unlisted file {extra[0]}: remove it or re-export the bundle")
    if verify:
        for rel, digest in files.items():
            if sha256_file(root / rel) != digest:
                raise BundleError(f"{root}/{rel}: sha256 does not match manifest.json (corrupted or modified); "
                                  f"re-export the bundle")
    if base_dir is not None:
        want = manifest.get("base", {}).get("config_sha256")
        got = base_fingerprint(base_dir)
        if want != got:
            raise BundleError(f"base model {base_dir} does not match the bundle (config.json sha256 {got[:12]} != "
                              f"{str(want)[:12]}): pass the base model the adapters were trained on")

    def tensors(rel: str) -> dict[str, torch.Tensor]:
        if rel not in files:
            raise BundleError(f"bundle {root} does not list {rel} in manifest.json: re-export the bundle")
        return load_file(str(root / rel))

    shared_a: dict[str, torch.Tensor] = {}
    if share_a:
        shared_a = {k[: -len(".lora_A")]: v for k, v in tensors("shared_a.safetensors").items()}
    role_a, role_b = {}, {}
    for role in roles:
        t = tensors(f"roles/{role}.safetensors")
        role_b[role] = {k[: -len(".lora_B")]: v for k, v in t.items() if k.endswith(".lora_B")}
        role_a[role] = {k[: -len(".lora_A")]: v for k, v in t.items() if k.endswith(".lora_A")}
    bundle = Bundle(roles=roles, rank=rank, alpha=alpha, targets=list(targets), share_a=list(share_a),
                    shared_a=shared_a, role_a=role_a, role_b=role_b, scaling_rule=rule,
                    base=manifest.get("base", {}), source=manifest.get("source", {}), root=root)
    bundle.validate()
    if manifest.get("a_family_hash") != bundle.a_family_hash:
        raise BundleError(f"{root}/manifest.json: a_family_hash does not match the shared A tensors; re-export")
    return bundle
