"""Role adapters of a bundle, laid out for serving: per layer and target, A (scaling folded in) and stacked B.

Scaling is folded once into A, so ``x @ A_s^T`` is the low-rank activation ``L = s X A`` that the shared modes cache,
and the LoRA delta of role ``i`` is ``(x @ A_s^T) @ B[i]^T``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from lragent.bundle import Bundle, layer_of, target_of
from lragent.kernels.cpu import factor

from .config import ServeError
from .models.config import ModelConfig


@dataclass
class LoraModule:
    a: torch.Tensor          # shared: [r, in]; per role: [N, r, in]   (scaled by s)
    b: torch.Tensor          # [N, out, r]
    shared: bool
    compact: list | None = None   # per role (A_t [in, q], B_t [q, out]): the delta at the role's own rank q

    def project(self, x: torch.Tensor, role: int | None = None) -> torch.Tensor:
        """L = s x A for the role (or the shared A): [T, r]."""
        return x @ (self.a if self.shared else self.a[role]).T


def compact_pair(a: torch.Tensor, b: torch.Tensor, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_t [in, q], B_t [q, out]) with x A^T B^T = x A_t B_t, q the role's own rank: zero rank components (the
    padding of a bundle's uniform rank) dropped, exactly; for a shared A, B (rank q of the shared r = N * q in an
    exact basis of N roles) factored as B^T = P Q (``kernels.cpu.factor``) and A_t = A^T P. Per token that is what
    the role's original adapter costs (in + out) * q, not (in + out) * r."""
    keep = (a.abs().sum(1) > 0) & (b.abs().sum(0) > 0)
    a, b = a[keep], b[:, keep]
    if shared and a.shape[0]:
        p, q = factor(b.T.contiguous())
        if p is not None:
            return (a.double().T @ p.double()).to(a.dtype).contiguous(), q.to(b.dtype).contiguous()
    return a.T.contiguous(), b.T.contiguous()


# A group is (role index, token indices or None for "all tokens of the batch").
Groups = list[tuple[int, torch.Tensor | None]]


def lora_delta(x: torch.Tensor, mod: LoraModule, groups: Groups) -> torch.Tensor:
    """Per-token LoRA delta where each group of tokens uses its role's adapter: [T, out]."""
    if len(groups) == 1 and groups[0][1] is None:
        a_t, b_t = mod.compact[groups[0][0]]
        return (x @ a_t) @ b_t
    out = x.new_zeros(x.shape[0], mod.b.shape[1])
    for role, idx in groups:
        a_t, b_t = mod.compact[role]
        out[idx] = (x[idx] @ a_t) @ b_t
    return out


def _tensor_digest(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


class RoleAdapters:
    """All roles of one bundle on one base model, on the serving device and dtype."""

    def __init__(self, bundle: Bundle, cfg: ModelConfig, *, dtype: torch.dtype, device):
        self.roles = list(bundle.roles)                      # every adapter slot, in stacking order
        self.index = {r: i for i, r in enumerate(self.roles)}   # the roles requests may use -> slot
        self.cfg, self.dtype, self.device, self.modules = cfg, dtype, device, list(bundle.modules)
        self.rank, self.scaling = bundle.rank, bundle.scaling
        self.targets = sorted({target_of(m) for m in bundle.modules})
        dims = cfg.lora_dims
        bad = [t for t in self.targets if t not in dims]
        if bad:
            raise ServeError(f"bundle targets {bad} are not supported; the engine applies LoRA on {list(dims)}")
        self.share_a = set(bundle.share_a)
        by_layer: list[dict[str, str]] = [{} for _ in range(cfg.num_layers)]
        for m in bundle.modules:
            li = layer_of(m)
            if li >= cfg.num_layers:
                raise ServeError(f"bundle module {m} is beyond the base model's {cfg.num_layers} layers: wrong --base?")
            by_layer[li][target_of(m)] = m
        self.by_layer = by_layer
        r, s = self.rank, self.scaling
        self.layers: list[dict[str, LoraModule]] = []
        for li in range(cfg.num_layers):
            mods = {}
            for t in self.targets:
                fin, fout = dims[t]
                name = by_layer[li].get(t)
                shared = t in self.share_a
                if name is None:   # a target missing in this layer: a zero adapter keeps the layout uniform
                    a = torch.zeros(r, fin) if shared else torch.zeros(len(self.roles), r, fin)
                    b = torch.zeros(len(self.roles), fout, r)
                else:
                    a_list = [bundle.a(name, role).float() for role in (self.roles[:1] if shared else self.roles)]
                    a = a_list[0] if shared else torch.stack(a_list)
                    b = torch.stack([bundle.b(name, role).float() for role in self.roles])
                    if a.shape[-1] != fin or b.shape[1] != fout:
                        raise ServeError(f"bundle module {name}: A {list(a.shape)} / B {list(b.shape)} do not fit "
                                         f"the base model ({fin} -> {fout}): wrong --base?")
                mods[t] = LoraModule(a=(a * s).to(device=device, dtype=dtype).contiguous(),
                                     b=b.to(device=device, dtype=dtype).contiguous(), shared=shared)
            self.layers.append(mods)
        self._derive()
        self.role_hash = {}
        for role in self.roles:
            h = hashlib.sha256(f"scaling={s!r}".encode())
            for name in bundle.modules:
                _tensor_digest(h, name + ".A", bundle.a(name, role))
                _tensor_digest(h, name + ".B", bundle.b(name, role))
            self.role_hash[role] = h.hexdigest()
        fam = bundle.a_family_hash
        if fam is None:   # no shared A: the family is the whole bundle (all roles' tensors)
            fam = hashlib.sha256("".join(self.role_hash[r] for r in self.roles).encode()).hexdigest()
        self.family = fam

    def _derive(self) -> None:
        """Layouts made from the stacked tensors: each role's compact pair per module, per-head B of the cached
        projections and the fused shared A."""
        for mods in self.layers:
            for mod in mods.values():
                mod.compact = [compact_pair(mod.a if mod.shared else mod.a[i], mod.b[i], mod.shared)
                               for i in range(mod.b.shape[0])]
        cfg, r = self.cfg, self.rank
        hk, d = cfg.num_kv_heads, cfg.head_dim
        # B of the cached projections in the kernel's per-head layout [N, H_kv, r, D].
        self.b_heads: list[dict[str, torch.Tensor]] = [
            {t: mods[t].b.view(len(self.roles), hk, d, r).permute(0, 1, 3, 2).contiguous()
             for t in ("k_proj", "v_proj") if t in mods} for mods in self.layers]
        # The cached targets' A stacked ([m*r, in]) when every one is shared: L_k and L_v in one matmul.
        cached = self.cached_targets()
        self.lr_a_t = [torch.cat([mods[t].a for t in cached]).T.contiguous()
                       if cached and self.shares_cached_a() else None for mods in self.layers]

    def add_role(self, name: str, bundle: Bundle | None = None, source: str | None = None,
                 slot: int | None = None) -> int:
        """Stack one more adapter: role ``source`` of ``bundle`` (whose base, shared A, modules, rank and scaling the
        caller checked against this one), or a zero adapter (the base model itself) when ``bundle`` is None; with
        ``slot``, overwrite that (unused) slot instead of growing the stack. Returns its slot; the role becomes
        usable under ``name``."""
        s = self.scaling
        h = hashlib.sha256(f"scaling={s!r}".encode())
        for li, mods in enumerate(self.layers):
            for t, mod in mods.items():
                module = self.by_layer[li].get(t)
                fout, r = mod.b.shape[1], mod.b.shape[2]
                if bundle is None or module is None:
                    b = mod.b.new_zeros(1, fout, r)
                    a = None if mod.shared else mod.a.new_zeros(1, *mod.a.shape[1:])
                else:
                    b = bundle.b(module, source).to(mod.b)[None]
                    a = None if mod.shared else (bundle.a(module, source).float() * s).to(mod.a)[None]
                    _tensor_digest(h, module + ".A", bundle.a(module, source))
                    _tensor_digest(h, module + ".B", bundle.b(module, source))
                if slot is None:
                    mod.b = torch.cat([mod.b, b]).contiguous()
                    if a is not None:
                        mod.a = torch.cat([mod.a, a]).contiguous()
                else:
                    mod.b[slot] = b[0]
                    if a is not None:
                        mod.a[slot] = a[0]
        if slot is None:
            slot = len(self.roles)
            self.roles.append(name)
        else:
            self.roles[slot] = name
        self.index[name] = slot
        self.role_hash[name] = h.hexdigest() if bundle is not None else "zero-adapter"
        self._derive()
        return slot

    def cached_targets(self) -> list[str]:
        """The cached projections that carry LoRA (k_proj, v_proj), i.e. m = len(...)."""
        return [t for t in ("k_proj", "v_proj") if t in self.targets]

    def shares_cached_a(self) -> bool:
        return all(t in self.share_a for t in self.cached_targets())
