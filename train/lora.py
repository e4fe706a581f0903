"""Shared-A multi-role LoRA: our own layer (never aliased PEFT modules; see DESIGN.md pitfalls).

For a frozen ``nn.Linear`` W and roles 0..N-1, the wrapped layer computes, for an example of role k,

    y = x W^T + s * (dropout(x) A_k^T) B_k^T

where ``A_k`` is *one* tensor shared by every role on the ``share_a`` targets (the cached projections, so that
serving can share the low-rank cache X·A) and a per-role tensor elsewhere, and ``B_k`` is per role. Each role's A/B
is its own ``nn.Parameter``: a role absent from a batch gets no gradient (``grad is None``), so AdamW leaves it
untouched, and the shared A can be frozen (``freeze_shared_a``) without flipping ``requires_grad`` under DDP.
A mixed-role batch routes each example to its own role with a per-example ``role_ids`` tensor.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lragent.bundle import layer_of, lora_scaling, target_of

from .config import LoraConfig, resolve_layers


@dataclass(kw_only=True)
class LoraSpec(LoraConfig):
    """The ``lora`` section of the training config plus the roles it is applied to."""
    roles: list[str]

    @property
    def scaling(self) -> float:
        return lora_scaling(self.rank, self.alpha, "rslora" if self.rslora else "standard")


class SharedALoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, n_roles: int, rank: int, scaling: float, shared_a: bool,
                 dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.n_roles, self.rank, self.scaling, self.shared = n_roles, rank, scaling, shared_a
        dev, dt = base.weight.device, torch.float32
        n_a = 1 if shared_a else n_roles
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.zeros(rank, base.in_features, device=dev, dtype=dt)) for _ in range(n_a)])
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt)) for _ in range(n_roles)])
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.role_ids: torch.Tensor | None = None   # [batch] long; None = adapters off (the base model)
        self.freeze_shared_a = False

    def reset_parameters(self, init: str = "kaiming", generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            if init == "kaiming":
                for a in self.lora_A:   # PEFT's default: kaiming-uniform A, zero B
                    bound = 1.0 / math.sqrt(a.shape[1])
                    a.copy_(torch.rand(a.shape, generator=generator) * 2 * bound - bound)
            elif init == "svd":
                # One-time, shared: A = top-r right singular vectors of W (the base weight itself is unchanged,
                # so nothing is subtracted per adapter).
                _, _, vh = torch.linalg.svd(self.base.weight.float().cpu(), full_matrices=False)
                for a in self.lora_A:
                    a.copy_(vh[: self.rank])
            else:
                raise ValueError(f"unknown lora init {init!r}: use 'kaiming' or 'svd'")
            for b in self.lora_B:
                b.zero_()

    def a(self, role: int) -> torch.Tensor:
        if self.shared:
            return self.lora_A[0].detach() if self.freeze_shared_a else self.lora_A[0]
        return self.lora_A[role]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.role_ids is None:
            return y
        h = self.dropout(x)
        role_ids = self.role_ids.to(x.device)
        if role_ids.numel() != x.shape[0]:
            raise ValueError(f"role_ids has {role_ids.numel()} entries for a batch of {x.shape[0]}")
        shared_z = F.linear(h, self.a(0).to(h.dtype)) if self.shared else None
        for role in role_ids.unique().tolist():
            idx = (role_ids == role).nonzero(as_tuple=True)[0]
            z = shared_z[idx] if self.shared else F.linear(h[idx], self.a(role).to(h.dtype))
            delta = F.linear(z, self.lora_B[role].to(h.dtype)) * self.scaling
            y = y.index_add(0, idx, delta.to(y.dtype))
        return y


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return model.get_submodule(parent_name), child


_IN_LAYER = re.compile(r"\.layers\.\d+\.")


def lora_target_names(linears: list[str], targets: list[str], layers: list[int] | None = None) -> list[str]:
    """The paths among ``linears`` (the ``nn.Linear`` paths inside a model's decoder layers, in model order) that
    get LoRA: target ``targets``, in the decoder layers ``layers`` selects (see ``config.resolve_layers``; None:
    all). ValueError (one line) for a layer index out of range or named twice."""
    if not linears:
        return []
    keep = set(resolve_layers(layers, 1 + max(layer_of(n) for n in linears)))
    return [n for n in linears if target_of(n) in targets and layer_of(n) in keep]


def decoder_linears(model: nn.Module) -> list[str]:
    """Paths of the ``nn.Linear`` modules inside the decoder layers (``.layers.N.``), in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _IN_LAYER.search(n)]


def inject_lora(model: nn.Module, spec: LoraSpec, seed: int = 0) -> dict[str, SharedALoRALinear]:
    """Replace every target ``nn.Linear`` inside the decoder layers ``spec.layers`` selects (None: all) by a
    :class:`SharedALoRALinear` (in place). Returns {module path (the base Linear's original name): wrapper}. The base
    model's parameters are frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    linears = decoder_linears(model)
    names = lora_target_names(linears, spec.targets)
    if not names:
        raise ValueError(f"no nn.Linear named {spec.targets} inside the model's decoder layers")
    found = {target_of(n) for n in names}
    missing = [t for t in spec.targets if t not in found]
    if missing:
        raise ValueError(f"LoRA targets {missing} are not Linear modules of this model (found {sorted(found)})")
    names = lora_target_names(linears, spec.targets, spec.layers)
    gen = torch.Generator().manual_seed(seed)
    wrappers = {}
    for name in names:
        parent, child = _parent(model, name)
        w = SharedALoRALinear(getattr(parent, child), len(spec.roles), spec.rank, spec.scaling,
                              shared_a=target_of(name) in spec.share_a, dropout=spec.dropout)
        w.reset_parameters(spec.init, gen)
        setattr(parent, child, w)
        wrappers[name] = w
    return wrappers


def lora_modules(model: nn.Module) -> dict[str, SharedALoRALinear]:
    """{base Linear path: wrapper} of an injected model (the path without the wrapper's '.base')."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SharedALoRALinear)}


def set_roles(model: nn.Module, role_ids: torch.Tensor | None) -> None:
    for m in lora_modules(model).values():
        m.role_ids = role_ids


@contextlib.contextmanager
def roles(model: nn.Module, role_ids: torch.Tensor | None):
    """Route the next forward passes: example b uses role ``role_ids[b]``; ``None`` runs the base model."""
    set_roles(model, role_ids)
    try:
        yield model
    finally:
        set_roles(model, None)


def set_shared_a_frozen(model: nn.Module, frozen: bool) -> None:
    for m in lora_modules(model).values():
        m.freeze_shared_a = frozen


# -- tensors <-> model ------------------------------------------------------------------------------------------

def lora_state(model: nn.Module, roles_: list[str]) -> dict[str, torch.Tensor]:
    """Adapter tensors only, named ``<module>.lora_A`` (shared) / ``<module>.lora_A.<role>`` / ``<module>.lora_B.<role>``."""
    out = {}
    for name, m in lora_modules(model).items():
        if m.shared:
            out[f"{name}.lora_A"] = m.lora_A[0].detach().clone()
        else:
            for k, role in enumerate(roles_):
                out[f"{name}.lora_A.{role}"] = m.lora_A[k].detach().clone()
        for k, role in enumerate(roles_):
            out[f"{name}.lora_B.{role}"] = m.lora_B[k].detach().clone()
    return out


def load_lora_state(model: nn.Module, roles_: list[str], tensors: dict[str, torch.Tensor]) -> None:
    expected = lora_state(model, roles_)
    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or extra:
        raise ValueError(f"adapter tensors do not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(extra)[:3]}")
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            params = {f"{name}.lora_A": m.lora_A[0]} if m.shared else {
                f"{name}.lora_A.{r}": m.lora_A[k] for k, r in enumerate(roles_)}
            params.update({f"{name}.lora_B.{r}": m.lora_B[k] for k, r in enumerate(roles_)})
            for key, p in params.items():
                if tensors[key].shape != p.shape:
                    raise ValueError(f"{key}: shape {list(tensors[key].shape)} != model's {list(p.shape)}")
                p.copy_(tensors[key])
