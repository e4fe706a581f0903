"""The shared A fused into the q/k/v matmul (``ModelRunner.fuse_lowrank``): L = s x A comes out of the same matmul as
q/k/v, and serving gives what the separate product gives."""
import pytest
import torch

from lragent.serve.engine import Engine
from lragent.serve.sampling import SamplingParams
from support.bundles import write_random_bundle
from support.models import make_random_base

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = [1, 5, 11] + [20 + (i * 7) % 60 for i in range(37)]
GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True, return_logits=True)


@pytest.fixture(scope="module", params=["llama", "qwen2"])        # qwen2: q/k/v carry a bias
def bundle(request, tmp_path_factory):
    base = make_random_base(tmp_path_factory.mktemp("base"), "gqa16", seed=3, model_type=request.param)
    return write_random_bundle(base, tmp_path_factory.mktemp("bundle") / "b", roles=("planner", "actor"), rank=8,
                               targets=ALL, seed=4)


def unfuse(engine: Engine) -> None:
    """Back to the separate x @ A product (the runner's fallback)."""
    ad, model = engine.runner.adapters, engine.runner.model
    for li in range(len(model.layers)):
        ad.lr_a_t[li] = ad.lr_a_t[li].contiguous()
        model.fuse_attention_rows(li, None)


def turns(engine: Engine) -> list:
    ids, outs = list(PROMPT), []
    for role in ("planner", "actor", "planner"):
        out = engine.generate(ids, role, GREEDY)
        outs.append(out)
        ids = ids + out.token_ids + [2, 9, 11]
    return outs


def test_fused_rows_are_views_of_one_weight(bundle):
    engine = Engine(bundle, mode="lrshared")
    ad = engine.runner.adapters
    for li, lw in enumerate(engine.runner.model.layers):
        main = lw.wqkv.shape[0]
        assert lw.wqkvx is not None and lw.wqkvx.shape[0] == main + ad.lr_a_t[li].shape[1]
        assert lw.wqkv.data_ptr() == lw.wqkvx.data_ptr()                      # q/k/v: the first rows, no copy
        assert ad.lr_a_t[li].data_ptr() == lw.wqkvx[main:].data_ptr()         # A: the appended rows
        if lw.bqkv is not None:
            assert torch.equal(lw.bqkvx[main:], torch.zeros(ad.lr_a_t[li].shape[1]))
    assert all(lw.wqkvx is None for lw in Engine(bundle, mode="fullshared").runner.model.layers)


def test_fused_matches_separate_product(bundle):
    fused, plain = Engine(bundle, mode="lrshared"), Engine(bundle, mode="lrshared")
    unfuse(plain)
    assert all(lw.wqkvx is None for lw in plain.runner.model.layers)
    for a, b in zip(turns(fused), turns(plain), strict=True):      # roles reading each other's cache entries
        assert a.token_ids == b.token_ids
        assert (a.logits - b.logits).abs().max().item() <= 1e-5


def test_adding_a_role_fuses_again_in_place(bundle):
    engine = Engine(bundle, mode="lrshared")
    before = [lw.wqkvx.data_ptr() for lw in engine.runner.model.layers]
    engine.add_base_role("base")                 # new adapter layouts, the same shared A: written in place
    ad = engine.runner.adapters
    for li, lw in enumerate(engine.runner.model.layers):
        assert lw.wqkvx.data_ptr() == before[li]
        assert ad.lr_a_t[li].data_ptr() == lw.wqkvx[lw.wqkv.shape[0]:].data_ptr()
    plain = Engine(bundle, mode="lrshared")
    unfuse(plain)
    assert [o.token_ids for o in turns(engine)] == [o.token_ids for o in turns(plain)]
