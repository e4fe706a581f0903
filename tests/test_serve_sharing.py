"""Cache sharing across roles: exactness where it must hold, reuse stats, bytes, eviction, batching."""
import math

import pytest
import torch

from lragent.serve.engine import Engine
from lragent.serve.sampling import SamplingParams
from support.bundles import write_random_bundle
from support.models import make_random_base

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = [1, 5, 11] + [20 + (i * 7) % 60 for i in range(37)] + [2, 8, 11]      # 43 tokens
EXTRA = [2, 9, 11]                                                             # "</s> actor :"-like hand-off tail
GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True, return_logits=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_random_base(tmp_path_factory.mktemp("base"), "gqa16", seed=5)


@pytest.fixture(scope="module")
def bundles(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    three = ("planner", "actor", "reflector")
    return {
        "three": write_random_bundle(base, d / "three", roles=three, rank=8, targets=ALL, seed=6),
        "one": write_random_bundle(base, d / "one", roles=("planner",), rank=8, targets=ALL, seed=7),
        "same": write_random_bundle(base, d / "same", roles=three, rank=8, targets=ALL, seed=8, identical=True),
        "vonly": write_random_bundle(base, d / "vonly", roles=three, rank=4, targets=("q_proj", "v_proj"),
                                     share_a=("v_proj",), seed=9),
    }


def flow(engine, roles, params=GREEDY):
    """Roles take turns on one growing transcript: each prompt = previous prompt + its output + a short tail."""
    ids, outs = list(PROMPT), []
    for role in roles:
        out = engine.generate(ids, role, params)
        outs.append(out)
        ids = ids + out.token_ids + EXTRA
    return outs


def assert_same(outs_a, outs_b, tol=1e-4):
    for a, b in zip(outs_a, outs_b, strict=True):
        assert a.token_ids == b.token_ids
        assert (a.logits - b.logits).abs().max().item() <= tol


ROLES = ["planner", "actor", "reflector", "planner", "reflector", "actor"]


@pytest.mark.parametrize("mode", ["lrshared", "baseshared", "fullshared"])
def test_single_role_shared_equals_nonshared(bundles, mode):
    ref = flow(Engine(bundles["one"], mode="nonshared"), ["planner"] * 4)
    outs = flow(Engine(bundles["one"], mode=mode), ["planner"] * 4)
    assert_same(outs, ref)
    assert outs[-1].stats.reused_tokens > len(PROMPT)


@pytest.mark.parametrize("mode", ["lrshared", "baseshared"])
def test_identical_adapters_shared_equals_nonshared(bundles, mode):
    assert_same(flow(Engine(bundles["same"], mode=mode), ROLES),
                flow(Engine(bundles["same"], mode="nonshared"), ROLES))


def test_handoff_prefills_only_new_tokens(bundles):
    """Role B continues what role A processed: shared-prefill modes compute only the tokens A never computed."""
    for mode in ("nonshared", "fullshared", "baseshared", "lrshared"):
        a, b, c = flow(Engine(bundles["three"], mode=mode), ["planner", "actor", "reflector"])
        assert a.stats.reused_tokens == 0
        prompt_b = len(PROMPT) + len(a.token_ids) + len(EXTRA)
        assert b.stats.prompt_tokens == prompt_b
        # A computed its prompt and all but its last sampled token
        new = prompt_b - (len(PROMPT) + len(a.token_ids) - 1)
        if mode in ("fullshared", "lrshared"):
            assert (b.stats.prefilled_tokens, c.stats.prefilled_tokens) == (new, new), mode
        else:   # nonshared: another role's cache is not usable; baseshared: needs its own X A_role
            assert b.stats.prefilled_tokens == prompt_b, mode
            assert c.stats.reused_tokens == 0, mode


def test_lrshared_handoff_differs_from_nonshared(bundles):
    """Across different roles lrshared is approximate (the writer's hidden states): it must not silently be exact."""
    lr = flow(Engine(bundles["three"], mode="lrshared"), ["planner", "actor"])
    ns = flow(Engine(bundles["three"], mode="nonshared"), ["planner", "actor"])
    assert (lr[1].logits - ns[1].logits).abs().max() > 1e-6


@pytest.mark.parametrize("dtype,key", [("float32", "three"), ("bfloat16", "vonly")])
def test_cache_bytes(bundles, dtype, key):
    """lrshared holds (2 d_kv + m r) b L bytes per cached token, about 1/N of nonshared with N roles."""
    ids = PROMPT[:32] + PROMPT[:32]                     # 64 tokens = 4 blocks of 16
    once = SamplingParams(max_new_tokens=1)             # the sampled token is never computed: 64 cached tokens
    stats = {}
    for mode in ("nonshared", "lrshared", "baseshared", "fullshared"):
        eng = Engine(bundles[key], mode=mode, dtype=dtype)
        for role in eng.roles:
            eng.generate(ids, role, once)
        stats[mode] = eng.stats()
    eng = Engine(bundles[key], mode="lrshared", dtype=dtype)
    cfg, n, r, b, L = eng.cfg, len(eng.roles), eng.adapters.rank, torch.finfo(eng.dtype).bits // 8, eng.cfg.num_layers
    m = len(eng.adapters.cached_targets())
    assert m == (2 if key == "three" else 1)
    lr = stats["lrshared"]
    assert lr["total_bytes"] == (2 * cfg.d_kv + m * r) * b * L * 64
    assert lr["base_bytes"] == 2 * cfg.d_kv * b * L * 64 and lr["lowrank_bytes"] == m * r * b * L * 64
    assert stats["nonshared"]["total_bytes"] == n * 2 * cfg.d_kv * b * L * 64
    assert stats["fullshared"]["total_bytes"] == 2 * cfg.d_kv * b * L * 64
    assert stats["baseshared"]["total_bytes"] == (2 * cfg.d_kv + n * m * r) * b * L * 64
    ratio = lr["total_bytes"] / stats["nonshared"]["total_bytes"]
    assert math.isclose(ratio, (1 + m * r / (2 * cfg.d_kv)) / n, rel_tol=1e-9)
    assert lr["free_bytes"] + lr["total_bytes"] == lr["capacity_bytes"]


@pytest.mark.parametrize("mode,key", [("nonshared", "three"), ("lrshared", "one")])
def test_tiny_pool_evicts_and_matches_huge_pool(bundles, mode, key):
    roles = ROLES if key == "three" else ["planner"] * 5
    huge = Engine(bundles[key], mode=mode, cache_tokens=512 * 8, block_size=8)
    ref = flow(huge, roles)
    longest = len(PROMPT) + len(roles) * (GREEDY.max_new_tokens + len(EXTRA))
    tiny = Engine(bundles[key], mode=mode, cache_tokens=-(-longest // 8) * 8, block_size=8)
    outs = flow(tiny, roles)
    assert_same(outs, ref, tol=1e-5)
    assert tiny.stats()["evictions"] > 0 and huge.stats()["evictions"] == 0


@pytest.mark.parametrize("mode", ["nonshared", "lrshared", "baseshared"])
def test_concurrent_roles_equal_one_at_a_time(bundles, mode):
    prompts = [PROMPT, PROMPT[:20] + [30, 31, 32], PROMPT + [40, 41], PROMPT[:9]]
    roles = ["planner", "actor", "reflector", "actor"]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, return_logits=True) for n in (5, 3, 6, 2)]
    seq_engine = Engine(bundles["three"], mode=mode)
    one_by_one = []
    for p, r, sp in zip(prompts, roles, params):
        seq_engine.clear_cache()      # shared modes: another role's earlier cache would change the result
        one_by_one.append(seq_engine.generate(p, r, sp))
    # a small step budget forces chunked prefill and steps that mix decode and prefill of different roles
    batched = Engine(bundles["three"], mode=mode, max_batch_tokens=16).generate_batch(prompts, roles, params)
    assert_same(batched, one_by_one, tol=1e-5)


def test_request_waits_for_blocks_in_use(bundles):
    """Two requests that do not fit together: the second waits (nothing in use is evicted), same outputs."""
    eng = Engine(bundles["three"], mode="nonshared", cache_tokens=8 * 8, block_size=8)
    prompts, roles = [PROMPT, PROMPT[:30]], ["planner", "actor"]
    together = eng.generate_batch(prompts, roles, GREEDY)
    alone = [Engine(bundles["three"], mode="nonshared").generate(p, r, GREEDY) for p, r in zip(prompts, roles)]
    assert_same(together, alone, tol=1e-5)


def test_sampling_seeded_and_independent_of_batching(bundles):
    eng = Engine(bundles["three"], mode="lrshared")
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    a = eng.generate(PROMPT, "actor", sp).token_ids
    eng.clear_cache()
    b = eng.generate_batch([PROMPT[:10], PROMPT], ["planner", "actor"],
                           [SamplingParams(max_new_tokens=3, temperature=0.7, seed=1), sp])[1].token_ids
    assert a == b
    greedy = eng.generate(PROMPT, "actor", max_new_tokens=6, ignore_eos=True).token_ids
    assert eng.generate(PROMPT, "actor", max_new_tokens=6, ignore_eos=True, temperature=1.0, top_p=1e-6,
                        seed=5).token_ids == greedy


def test_stop_strings_and_eos(bundles):
    eng = Engine(bundles["three"], mode="lrshared")
    full = eng.generate(PROMPT, "actor", max_new_tokens=6, ignore_eos=True)
    words = full.text.split()
    stop = words[2]
    out = eng.generate(PROMPT, "actor", max_new_tokens=6, ignore_eos=True, stop=[stop])
    assert out.finish_reason == "stop" and stop not in out.text and full.text.startswith(out.text)
    # EOS: make the greedy run's third token the end-of-sequence token; the request stops there, the EOS id is
    # the last token id and the text holds only the two tokens before it
    eos = full.token_ids[2]
    eng.eos_ids, eng.scheduler.eos_ids = [eos], {eos}
    out = eng.generate(PROMPT, "actor", max_new_tokens=6)
    assert out.finish_reason == "eos" and out.token_ids == full.token_ids[:3]
    assert out.text == eng.tokenizer.decode(full.token_ids[:2], skip_special_tokens=True)


def test_baseshared_with_per_role_a(base, tmp_path):
    """A bundle whose roles keep their own A on V: baseshared works (per-role L), lrshared is refused."""
    b = write_random_bundle(base, tmp_path / "perrole", roles=("planner", "actor"), rank=4,
                            targets=("q_proj", "k_proj", "v_proj"), share_a=("k_proj",), seed=10)
    ns = Engine(b, mode="nonshared")
    bs = Engine(b, mode="baseshared")
    assert Engine(b).mode == "nonshared"
    for role in ("planner", "actor"):
        ns.clear_cache()
        bs.clear_cache()
        assert_same([bs.generate(PROMPT, role, GREEDY)], [ns.generate(PROMPT, role, GREEDY)])
    outs = flow(bs, ["planner", "actor", "planner"])
    assert outs[2].stats.reused_tokens > 0


def test_cache_keys_carry_base_fingerprint_family_and_adapter(bundles, base, tmp_path):
    from lragent.bundle import base_fingerprint, load_bundle
    from lragent.serve.sequence import Sequence

    info = load_bundle(bundles["three"]).base
    fp = f"{base_fingerprint(base)}/{info.get('weights_fingerprint', '')}"     # config and weights fingerprints
    fam = load_bundle(bundles["three"]).a_family_hash
    seq = Sequence(0, [1, 2], "actor", 1, GREEDY, None)

    def key(eng):                                   # the namespace of an actor request admitted by ``eng``
        seq.adapter_hash = eng.adapters.role_hash["actor"]
        return eng.kv.components[0].namespace(seq)
    lr = Engine(bundles["three"], mode="lrshared")
    assert key(lr) == ("kv", "lrshared", "role", fp, fam)
    ns = Engine(bundles["three"], mode="nonshared")
    assert key(ns) == ("kv", "nonshared", "role", fp, ns.adapters.family, "actor", ns.adapters.role_hash["actor"])
    # a re-exported adapter under the same role name gets another key: no stale reuse
    other = write_random_bundle(base, tmp_path / "other", roles=("planner", "actor", "reflector"), rank=8,
                                targets=ALL, seed=99)
    assert key(Engine(other, mode="nonshared")) != key(ns)
    assert key(Engine(other, mode="lrshared")) != key(lr)
