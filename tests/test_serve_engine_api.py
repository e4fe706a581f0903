"""The engine API a server drives: streaming deltas, abort, preemption under a small pool, threads, per-engine RNG."""
import random
import threading

import pytest
import torch

from lragent.serve import Engine, SamplingParams, ServeError
from lragent.serve.loop import EngineLoop
from support.bundles import write_random_bundle
from support.models import make_random_base

ROLES = ("planner", "actor", "reflector")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    base = make_random_base(d / "base", "gqa16", seed=21)
    return write_random_bundle(base, d / "bundle", roles=ROLES, rank=4, seed=22)


def prompts(n, seed=0, lo=6, hi=30):
    """Distinct random prompts (distinct first tokens: no request reuses another's cache)."""
    rng = random.Random(seed)
    firsts = rng.sample(range(4, 150), n)
    return [[f] + [rng.randrange(4, 150) for _ in range(rng.randint(lo, hi))] for f in firsts]


def drain(engine):
    """Step until done; per request: concatenated new_text, concatenated new_token_ids, completion."""
    text, ids, done = {}, {}, {}
    while engine.has_unfinished():
        for o in engine.step():
            text[o.request_id] = text.get(o.request_id, "") + o.new_text
            ids.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                done[o.request_id] = o.completion
    return text, ids, done


@pytest.mark.parametrize("mode", ["lrshared", "nonshared"])
def test_streaming_deltas_concatenate_to_the_final_text(bundle, mode):
    eng = Engine(bundle, mode=mode, max_batch_tokens=8)
    ps = prompts(4, seed=1)
    full = Engine(bundle, mode=mode).generate(ps[2], "actor", max_new_tokens=8, ignore_eos=True).text
    words = full.split()          # a stop string: the shortest tail of the output first found after a prefix
    stop = next(" ".join(words[-k:]) for k in range(1, len(words)) if full.find(" ".join(words[-k:])) > 0)
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True),
              SamplingParams(max_new_tokens=5, temperature=0.8, seed=3, ignore_eos=True),
              SamplingParams(max_new_tokens=8, ignore_eos=True, stop=(stop,)),     # cut by a stop string
              SamplingParams(max_new_tokens=8)]
    rids = [eng.add_request(p, r, sp) for p, r, sp in zip(ps, ["planner", "actor", "actor", "reflector"], params)]
    text, ids, done = drain(eng)
    assert sorted(done) == sorted(rids)
    for rid in rids:
        c = done[rid]
        assert text[rid] == c.text and c.text
        eos_cut = c.token_ids[:-1] if c.finish_reason == "eos" else c.token_ids
        assert ids[rid] == eos_cut
    assert done[rids[2]].finish_reason == "stop" and done[rids[2]].text == full[:full.find(stop)]


def test_abort_frees_every_block(bundle):
    eng = Engine(bundle, mode="lrshared", cache_tokens=512, block_size=8)
    pool = eng.kv.components[0].pool
    free0 = pool.available()
    rids = [eng.add_request(p, r, max_new_tokens=30, ignore_eos=True) for p, r in zip(prompts(3, 2), ROLES)]
    for _ in range(4):
        eng.step()
    assert pool.held() > 0
    done = eng.abort(rids[1])
    assert done.finish_reason == "abort" and done.token_ids
    assert eng.abort(rids[1]) is None and eng.abort(12345) is None
    for rid in (rids[0], rids[2]):
        eng.abort(rid)
    assert pool.held() == 0 and pool.available() == free0 == pool.num_blocks
    assert not eng.has_unfinished() and eng.step() == []          # nothing schedulable: returns at once


@pytest.mark.parametrize("mode", ["nonshared", "lrshared"])
def test_preemption_under_a_small_pool_equals_serial_runs(bundle, mode):
    """64 mixed-role requests whose worst cases far exceed the pool: all finish, outputs equal serial runs."""
    ps = prompts(64, seed=3, lo=10, hi=40)
    roles = [ROLES[i % 3] for i in range(64)]
    sp = SamplingParams(max_new_tokens=24, ignore_eos=True)
    serial_engine = Engine(bundle, mode=mode)
    serial = [serial_engine.generate(p, r, sp).token_ids for p, r in zip(ps, roles)]
    worst = sum(-(-(len(p) + 23) // 8) for p in ps)
    eng = Engine(bundle, mode=mode, cache_tokens=40 * 8, block_size=8)        # 40 blocks
    pool = eng.kv.components[0].pool
    assert worst > 5 * pool.num_blocks
    peak = 0
    rids = [eng.add_request(p, r, sp) for p, r in zip(ps, roles)]
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.completion
        peak = max(peak, pool.held())
    assert [done[i].token_ids for i in rids] == serial
    assert all(done[i].finish_reason == "length" for i in rids)
    assert eng.stats()["preemptions"] > 0 and peak <= pool.num_blocks and pool.held() == 0


def test_request_too_large_for_the_pool_is_refused(bundle):
    eng = Engine(bundle, mode="lrshared", cache_tokens=32, block_size=8)
    with pytest.raises(ServeError, match="cache"):
        eng.add_request([5] * 30, "actor", max_new_tokens=10)
    with pytest.raises(ServeError, match="outside the vocabulary"):      # generate_batch: nothing queued
        eng.generate_batch([[5, 6], [10 ** 6]], ["actor", "actor"], SamplingParams(max_new_tokens=4))
    assert not eng.has_unfinished()


def test_threads_calling_generate_get_their_own_results(bundle):
    eng = Engine(bundle, mode="lrshared")
    ps = prompts(40, seed=4)
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    serial = [Engine(bundle, mode="lrshared").generate(p, ROLES[i % 3], sp).token_ids for i, p in enumerate(ps)]
    results, errors = {}, []

    def work(idx):
        try:
            for i in idx:
                results[i] = eng.generate(ps[i], ROLES[i % 3], sp).token_ids
        except Exception as e:   # noqa: BLE001 - the test reports it
            errors.append(e)
    threads = [threading.Thread(target=work, args=(range(k, 40, 4),)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert [results[i] for i in range(40)] == serial
    assert not eng.has_unfinished()


def test_engine_loop_serves_concurrent_producers(bundle):
    eng = Engine(bundle, mode="lrshared")
    loop = EngineLoop(eng).start()
    ps = prompts(12, seed=5)
    sp = SamplingParams(max_new_tokens=5, ignore_eos=True)
    streams = [loop.submit(p, ROLES[i % 3], sp) for i, p in enumerate(ps)]
    texts = ["".join(o.new_text for o in s) for s in streams]
    ref = Engine(bundle, mode="lrshared")
    assert texts == [ref.generate(p, ROLES[i % 3], sp).text for i, p in enumerate(ps)]
    loop.stop()
    assert not loop.alive and loop.error is None


def test_rng_and_ids_are_per_engine(bundle):
    state = torch.get_rng_state()
    a, b = Engine(bundle, mode="lrshared", seed=7), Engine(bundle, mode="lrshared", seed=7)
    assert a.add_request([5, 6], "actor") == b.add_request([5, 6], "actor") == 0
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True)        # no per-request seed
    ta = a.generate([9, 10, 11], "actor", sp).token_ids
    assert ta == b.generate([9, 10, 11], "actor", sp).token_ids                   # same engine seed, same draws
    assert torch.equal(torch.get_rng_state(), state)                            # the global RNG is untouched


def test_unloaded_role_finishes_its_requests_in_flight(bundle):
    eng = Engine(bundle, mode="lrshared")
    ref = Engine(bundle, mode="lrshared").generate([5, 9, 30, 44], "actor", max_new_tokens=6, ignore_eos=True)
    rid = eng.add_request([5, 9, 30, 44], "actor", max_new_tokens=6, ignore_eos=True)
    eng.step()
    eng.step()
    eng.unload_role("actor")
    with pytest.raises(ServeError, match="unknown role"):
        eng.add_request([5, 9], "actor")
    _, _, done = drain(eng)
    assert done[rid].finish_reason == "length" and done[rid].token_ids == ref.token_ids
