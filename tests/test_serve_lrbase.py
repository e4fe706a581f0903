"""The drift-controlled mode ``lrbase``: the shared cache is written by an adapter-free pass of the base model."""
import pytest
import torch

from lragent.bundle import write_bundle
from lragent.serve import Engine, SamplingParams
from support.bundles import random_bundle
from support.models import make_random_base

ROLES = ("planner", "actor", "reflector")
PROMPT = [1, 5, 11, 18, 19, 20, 21, 46, 15, 2, 8, 11, 30, 31, 32, 33, 34, 40, 41, 42]
SP = SamplingParams(max_new_tokens=5, ignore_eos=True, return_logits=True)


def only_layers(bundle, layers):
    """The bundle restricted to the modules of ``layers``."""
    keep = lambda m: any(f".layers.{i}." in m for i in layers)  # noqa: E731
    bundle.shared_a = {m: t for m, t in bundle.shared_a.items() if keep(m)}
    bundle.role_a = {r: {m: t for m, t in d.items() if keep(m)} for r, d in bundle.role_a.items()}
    bundle.role_b = {r: {m: t for m, t in d.items() if keep(m)} for r, d in bundle.role_b.items()}
    return bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("lrbase")
    base = make_random_base(d / "base", "gqa16", seed=41)
    full = random_bundle(base, roles=ROLES, rank=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=42)
    last = only_layers(random_bundle(base, roles=ROLES, rank=4, targets=("k_proj", "v_proj"), seed=43), [1])
    return {"full": write_bundle(full, d / "full"), "last_kv": write_bundle(last, d / "last_kv")}


def close(a, b, tol=1e-5):
    assert a.token_ids == b.token_ids
    assert (a.logits - b.logits).abs().max().item() <= tol


def test_last_layer_kv_adapters_equal_nonshared(bundles):
    """Adapters only on the last layer's K/V leave every cached hidden state adapter-free: lrbase is exact, for a
    role alone and for a role reading another role's prefill."""
    ns, lb = Engine(bundles["last_kv"], mode="nonshared"), Engine(bundles["last_kv"], mode="lrbase")
    for role in ROLES:
        close(lb.generate(PROMPT, role, SP), ns.generate(PROMPT, role, SP))
    lb.clear_cache()
    lb.generate(PROMPT[:14], "planner", SP)                          # the planner writes the shared prefix
    out = lb.generate(PROMPT, "actor", SP)
    assert out.stats.reused_tokens >= 13 and out.stats.reused_from_other_roles >= 13
    close(out, ns.generate(PROMPT, "actor", SP))


def test_output_does_not_depend_on_who_prefilled(bundles):
    """With adapters everywhere, lrbase still gives a reader the same result whichever role wrote the cache (the
    writer is always the base model); lrshared does not."""
    lb = Engine(bundles["full"], mode="lrbase")
    alone = lb.generate(PROMPT, "actor", SP)
    for writer in ("planner", "reflector"):
        lb.clear_cache()
        lb.generate(PROMPT[:16], writer, SP)
        after = lb.generate(PROMPT, "actor", SP)
        assert after.stats.reused_tokens >= 15
        close(after, alone)
    lr = Engine(bundles["full"], mode="lrshared")
    lr_alone = lr.generate(PROMPT, "actor", SP)
    lr.clear_cache()
    lr.generate(PROMPT[:16], "planner", SP)
    assert (lr.generate(PROMPT, "actor", SP).logits - lr_alone.logits).abs().max() > 1e-3


def test_lrbase_is_not_the_base_model_and_keys_carry_the_writer(bundles):
    lb, ns = Engine(bundles["full"], mode="lrbase"), Engine(bundles["full"], mode="nonshared")
    a, p = lb.generate(PROMPT, "actor", SP), lb.generate(PROMPT, "planner", SP)
    assert (a.logits - p.logits).abs().max() > 1e-3                 # each reader's own B and Q/O adapters apply
    assert (a.logits - ns.generate(PROMPT, "actor", SP).logits).abs().max() > 1e-4   # context is base-written
    from lragent.serve.sequence import Sequence
    seq = Sequence(0, [1], "actor", 1, SP, None)
    lr = Engine(bundles["full"], mode="lrshared")
    ns_key, lb_key = lr.kv.components[0].namespace(seq), lb.kv.components[0].namespace(seq)
    assert lb_key[1:3] == ("lrbase", "base") and ns_key[1:3] == ("lrshared", "role") and lb_key != ns_key
    assert torch.equal(torch.tensor(lb.stats()["bytes_per_token_lowrank"]),
                       torch.tensor(lr.stats()["bytes_per_token_lowrank"]))
