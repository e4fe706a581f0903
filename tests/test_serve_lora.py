"""The serving layout of role adapters: each role's LoRA delta computed at its own rank (``compact_pair``), equal to
the padded / shared-basis form a bundle stores."""
import torch

from lragent.serve.lora import LoraModule, compact_pair, lora_delta


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_padding_is_dropped_exactly():
    """A bundle's uniform rank pads a per-role adapter with zero rows of A / columns of B: the compact pair has the
    adapter's own rank and the same delta."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.zeros(12, 40), torch.zeros(24, 12)
    a[:5], b[:, :5] = torch.randn(5, 40, generator=g), torch.randn(24, 5, generator=g)
    a_t, b_t = compact_pair(a, b, shared=False)
    assert a_t.shape == (40, 5) and b_t.shape == (5, 24)
    x = torch.randn(7, 40, generator=g)
    assert _rel((x @ a_t) @ b_t, (x @ a.T) @ b.T) < 1e-6


def test_shared_basis_is_factored_to_the_role_rank():
    """In an exact shared basis of 3 roles (as ``import-peft --share-a exact`` builds it: rank 3 * 4), each role's B
    has rank 4; the compact pair has rank 4 and the role's original delta x A_i^T B_i^T."""
    g = torch.Generator().manual_seed(1)
    roles = [(torch.randn(4, 64, generator=g, dtype=torch.float64), torch.randn(32, 4, generator=g,
                                                                          dtype=torch.float64)) for _ in range(3)]
    q = torch.linalg.qr(torch.cat([a for a, _ in roles]).T).Q.T                       # [12, 64], orthonormal rows
    x = torch.randn(9, 64, generator=g)
    for a_i, b_i in roles:
        b_shared = b_i @ a_i @ q.T                                                        # [32, 12], rank 4
        a_t, b_t = compact_pair(q.float(), b_shared.float(), shared=True)
        assert a_t.shape == (64, 4) and b_t.shape == (4, 32)
        assert _rel((x @ a_t) @ b_t, x.double() @ a_i.T @ b_i.T) < 1e-5


def test_delta_per_group_of_tokens():
    """Tokens of several roles in one batch each get their role's delta, as when each role runs alone."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 8, 16, generator=g), torch.randn(3, 20, 8, generator=g)
    mod = LoraModule(a=a, b=b, shared=False)
    mod.compact = [compact_pair(a[i], b[i], False) for i in range(3)]
    x = torch.randn(10, 16, generator=g)
    groups = [(2, torch.tensor([0, 1, 2])), (0, torch.tensor([3, 4, 5, 6])), (1, torch.tensor([7, 8, 9]))]
    out = lora_delta(x, mod, groups)
    for role, idx in groups:
        alone = lora_delta(x[idx], mod, [(role, None)])
        assert _rel(out[idx], alone) < 1e-6 and _rel(alone, x[idx] @ a[role].T @ b[role].T) < 1e-6
