"""Bundle v1: the one contract between training and serving.

A bundle is a directory::

    manifest.json                  format, version, base fingerprint, roles, LoRA config, A-family hash, serving
                                   modes, and the sha256 of every other file (all of them are listed)
    shared_a.safetensors           one A [r, in] per module whose target shares A across roles ("<module>.lora_A")
    roles/<role>.safetensors       that role's B [out, r] per module ("<module>.lora_B") and its own A [r, in] for
                                   targets that do not share A ("<module>.lora_A")
    peft/<role>/adapter_config.json, adapter_model.safetensors
                                   a standard PEFT LoRA adapter (scaling baked into B, lora_alpha == r)

Module names are the base model's ``nn.Linear`` paths (``model.layers.3.self_attn.v_proj``). Tensors are kept as
trained (unscaled); the LoRA delta of a role on a module is ``scaling * B @ A``. Bundles are written atomically
(temp directory, optional verification, then rename or atomic exchange) and loaded with full validation; every
problem is one :class:`BundleError` line. Only safetensors and JSON are ever read: nothing is unpickled.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_NAME = "lragent-bundle"
FORMAT_VERSION = 1
CACHED_TARGETS = ("k_proj", "v_proj")
MODES = ("nonshared", "fullshared", "baseshared", "lrshared")
ROLE_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Names that appear as segments of Llama-family module paths (or PEFT's own): a role (= PEFT adapter name) equal to
# one of them silently corrupts PEFT exports, so they are refused.
RESERVED_ROLE_NAMES = frozenset({
    "model", "layers", "self_attn", "mlp", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
    "down_proj", "embed_tokens", "norm", "lm_head", "input_layernorm", "post_attention_layernorm", "rotary_emb",
    "q_norm", "k_norm", "base_model", "base_layer", "lora", "default", "weight", "bias",
})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")
ALLOWED_SUFFIXES = (".safetensors", ".json")


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
    def modes(self) -> list[str]:
        """Serving modes this bundle supports: lrshared needs shared A on every cached target."""
        return [m for m in MODES if m != "lrshared" or self.lrshared_ok]

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
        """Check names, ranks, shapes and which A each module uses; raise one BundleError line for the first
        problem."""
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
            extra_a = set(self.role_a.get(role, {})) - {m for m in modules if not self.shares_a(m)}
            if extra_a:
                raise BundleError(f"role {role!r} has its own lora_A for {sorted(extra_a)[0]}, which is not a "
                                  f"module of an unshared target (share_a={self.share_a})")
        extra = set(self.shared_a) - {m for m in modules if self.shares_a(m)}
        if extra:
            raise BundleError(f"shared lora_A for {sorted(extra)[0]}, which is not a module of a share_a target")
        for module in sorted(modules):
            if target_of(module) not in self.targets:
                raise BundleError(f"module {module!r} is not one of the targets {self.targets}")
            dims = set()
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
                if not (a.is_floating_point() and b.is_floating_point()):
                    raise BundleError(f"{module}: lora tensors of role {role!r} are not floating point")
                dims.add((a.shape[1], b.shape[0]))
            if len(dims) != 1:
                raise BundleError(f"{module}: roles disagree on the [in, out] shape of the module: {sorted(dims)}")


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


# ----------------------------------------------------------------------------------------------------------------
# loading


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
