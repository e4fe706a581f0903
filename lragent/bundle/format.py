"""Bundle v1 in memory: names, constants, the Bundle dataclass and its A-family hash."""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lragent.modes import MODES, modes_for  # noqa: F401  (MODES re-exported)

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
ALLOWED_SUFFIXES = (".safetensors", ".json")
MAX_ROLE_LEN = 64
TENSOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class BundleError(ValueError):
    """A bundle (or the request to write one) is invalid; the message is one line saying what and how to fix it."""


def validate_role_name(role: str) -> str:
    """Return ``role`` if it is a valid role name (``^[a-z][a-z0-9_]*$``, at most 64 characters, not a module-path
    segment); raise BundleError otherwise."""
    if isinstance(role, str) and len(role) > MAX_ROLE_LEN:
        raise BundleError(f"invalid role name {role[:20]!r}... ({len(role)} characters): role names have at most "
                          f"{MAX_ROLE_LEN} characters")
    if not isinstance(role, str) or not ROLE_RE.match(role):
        raise BundleError(f"invalid role name {role!r}: use lowercase letters, digits and '_' (^[a-z][a-z0-9_]*$)")
    if role in RESERVED_ROLE_NAMES:
        raise BundleError(f"invalid role name {role!r}: it is a module-path segment of the model; pick another name")
    return role


def target_of(module: str) -> str:
    """``model.layers.3.self_attn.v_proj`` -> ``v_proj``."""
    return module.rsplit(".", 1)[-1]


def layer_of(module: str) -> int:
    """The decoder layer index of a module path (``model.layers.3.self_attn.v_proj`` -> 3)."""
    m = re.search(r"\.layers\.(\d+)\.", module)
    if not m:
        raise BundleError(f"module {module!r} is not inside a decoder layer ('.layers.N.')")
    return int(m.group(1))


def lora_scaling(rank: int, alpha: float, rule: str = "standard") -> float:
    """The LoRA scaling s: alpha / rank ("standard") or alpha / sqrt(rank) ("rslora")."""
    if rule == "standard":
        return alpha / rank
    if rule == "rslora":
        return alpha / math.sqrt(rank)
    raise BundleError(f"unknown scaling rule {rule!r}: use 'standard' or 'rslora'")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
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
        """The LoRA scaling s of this bundle's rank, alpha and rule."""
        return lora_scaling(self.rank, self.alpha, self.scaling_rule)

    @property
    def modules(self) -> list[str]:
        """Sorted module paths carrying LoRA."""
        return sorted(self.role_b[self.roles[0]])

    def shares_a(self, module_or_target: str) -> bool:
        """True when the module's (or target's) A is shared by all roles."""
        return target_of(module_or_target) in self.share_a

    def a(self, module: str, role: str) -> torch.Tensor:
        """A [r, in] that ``role`` uses on ``module`` (the shared one on share_a targets)."""
        return self.shared_a[module] if self.shares_a(module) else self.role_a[role][module]

    def b(self, module: str, role: str) -> torch.Tensor:
        """B [out, r] of ``role`` on ``module`` (unscaled)."""
        return self.role_b[role][module]

    @property
    def lrshared_ok(self) -> bool:
        """True when every cached target carrying LoRA shares A, so the low-rank cache can be shared by all roles."""
        cached = [t for t in self.targets if t in CACHED_TARGETS]
        return bool(cached) and all(t in self.share_a for t in cached)

    @property
    def modes(self) -> list[str]:
        """Serving modes this bundle supports: lrshared needs shared A on every cached target."""
        return modes_for(self.lrshared_ok)

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
        """scaling * B @ A of ``role`` on ``module``, float32."""
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
        if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1):
            raise BundleError(f"lora rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or \
                not (math.isfinite(self.alpha) and self.alpha > 0):
            raise BundleError(f"lora alpha must be a finite number > 0, got {self.alpha!r}")
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
        self._validate_values()

    def _validate_values(self) -> None:
        """One dtype for every tensor, and every value finite."""
        named = [(f"shared A of {m}", t) for m, t in self.shared_a.items()]
        named += [(f"lora_A of role {r!r} on {m}", t) for r, d in self.role_a.items() for m, t in d.items()]
        named += [(f"lora_B of role {r!r} on {m}", t) for r, d in self.role_b.items() for m, t in d.items()]
        dtypes = {t.dtype for _, t in named}
        if len(dtypes) > 1 or not dtypes <= set(TENSOR_DTYPES):
            odd = sorted(str(d).replace("torch.", "") for d in dtypes)
            raise BundleError(f"adapter tensors must all have one floating dtype (float32, float16, bfloat16 or "
                              f"float64), found {odd}: re-export the bundle")
        for what, t in named:
            if not bool(torch.isfinite(t).all()):
                raise BundleError(f"{what} holds non-finite values (NaN or inf): the adapter is broken "
                                  f"(diverged training?); re-train or re-export it")
