"""``lragent serve`` on a free loopback port, driven by the official ``openai`` client (and raw HTTP for bad input)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from lragent.bundle import Bundle, load_bundle, write_bundle
from lragent.serve import Engine, SamplingParams
from support.bundles import hf_peft_greedy, write_random_bundle
from support.models import make_random_base
from support.server import LiveServer, free_port

ROLES = ("planner", "actor", "reflector")
USER = [{"role": "user", "content": "find the value of k7 ."}]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("http")
    base = make_random_base(d / "base", "gqa16", seed=31)
    return {"dir": d, "base": base, "bundle": write_random_bundle(base, d / "bundle", roles=ROLES, rank=4, seed=32)}


@pytest.fixture(scope="module")
def lr_server(paths):
    eng = Engine(paths["bundle"], mode="lrshared")
    with LiveServer(eng) as srv:
        srv.engine = eng
        yield srv


@pytest.fixture(scope="module")
def ns_server(paths):
    eng = Engine(paths["bundle"], mode="nonshared")
    with LiveServer(eng) as srv:
        srv.engine = eng
        yield srv


def client(srv, **kw):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def greedy(n=6):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def test_models_list_one_card_per_role_and_the_base(lr_server, paths):
    models = client(lr_server).models.list().data
    ids = [m.id for m in models]
    assert ids == [*ROLES, "base"]
    for m in models:
        d = m.model_dump()
        assert d["object"] == "model" and d["owned_by"] == "lragent" and d["max_model_len"] == 512
        assert d["parent"] == (None if m.id == "base" else "base")


def test_completions_and_chat_equal_the_engine(lr_server, paths):
    c = client(lr_server)
    ref = Engine(paths["bundle"], mode="lrshared")
    r = c.completions.create(model="actor", prompt="find the value of k7 .", max_tokens=6, temperature=0,
                             extra_body={"ignore_eos": True})
    want = ref.generate("find the value of k7 .", "actor", greedy())
    assert r.choices[0].text == want.text and r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == want.stats.prompt_tokens
    parts = [ch.choices[0].text for ch in c.completions.create(
        model="actor", prompt=[5, 9, 30, 44], max_tokens=6, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if ch.choices]
    ref.clear_cache()
    assert "".join(parts) == ref.generate([5, 9, 30, 44], "actor", greedy()).text
    lr_server.engine.clear_cache()
    ref.clear_cache()
    chat = c.chat.completions.create(model="planner", messages=USER, max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    want = ref.generate(ref.render(USER, "planner"), "planner", greedy())
    assert chat.choices[0].message.content == want.text and chat.choices[0].message.role == "assistant"
    lr_server.engine.clear_cache()
    stream = c.chat.completions.create(model="planner", messages=USER, max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 6


def test_completions_equal_hf_peft_greedy(ns_server, paths):
    prompt = [1, 5, 11, 18, 19, 20, 21, 60, 15, 2, 6, 11]
    for role in ("planner", "reflector"):
        r = client(ns_server).completions.create(model=role, prompt=prompt, max_tokens=6, temperature=0,
                                                 logprobs=0, extra_body={"ignore_eos": True})
        toks, _ = hf_peft_greedy(paths["base"], paths["bundle"] / "peft" / role, prompt, 6)
        assert r.choices[0].text == ns_server.engine.tokenizer.decode(toks, skip_special_tokens=True)
        assert len(r.choices[0].logprobs.token_logprobs) == 6 and all(lp <= 0 for lp in r.choices[0].logprobs.token_logprobs)


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("mode", ["lrshared", "nonshared"])
def test_handoff_reports_cached_tokens(lr_server, ns_server, mode):
    srv = lr_server if mode == "lrshared" else ns_server
    srv.engine.clear_cache()
    c = client(srv)
    plan = c.chat.completions.create(model="planner", messages=USER, max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    msgs = USER + [{"role": "assistant", "name": "planner", "content": plan.choices[0].message.content}]
    act = c.chat.completions.create(model="actor", messages=msgs, max_tokens=3, temperature=0)
    eng = srv.engine
    planner_ids = eng.render(USER, "planner")
    out_ids = eng.tokenizer(" " + plan.choices[0].message.content, add_special_tokens=False).input_ids
    computed = planner_ids + out_ids[:-1]                   # the planner's last sampled token is never computed
    # the server renders an assistant message with a name as that role speaking
    actor_ids = eng.render(USER + [{"role": "planner", "content": plan.choices[0].message.content}], "actor")
    want = _common_prefix(computed, actor_ids[:-1]) if mode == "lrshared" else 0
    assert act.usage.prompt_tokens == len(actor_ids)
    assert act.usage.prompt_tokens_details.cached_tokens == want
    assert (want > len(planner_ids)) == (mode == "lrshared")


def test_concurrent_mixed_role_clients_equal_serial_runs(ns_server, paths):
    c = client(ns_server)
    ref = Engine(paths["bundle"], mode="nonshared")
    jobs = [(ROLES[i % 3], [4 + i, 9, 30 + i % 7, 44, 2 + i % 5]) for i in range(32)]
    want = [ref.generate(p, r, greedy(5)).text for r, p in jobs]
    got, errors = [None] * 32, []

    def call(i):
        try:
            r, p = jobs[i]
            got[i] = c.completions.create(model=r, prompt=p, max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
        except Exception as e:   # noqa: BLE001 - reported below
            errors.append(repr(e))
    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == want


def _wait(cond, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_mid_stream_frees_its_blocks(lr_server):
    pool = lr_server.engine.kv.components[0].pool
    body = {"model": "actor", "prompt": [5] * 40, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", lr_server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert pool.held() > 0
        # leaving the block closes the connection mid-stream
    assert _wait(lambda: pool.held() == 0 and not lr_server.engine.has_unfinished())


def test_load_and_unload_a_role_of_the_same_family(lr_server, paths):
    own = load_bundle(paths["bundle"])
    g = torch.Generator().manual_seed(5)
    b = {m: torch.randn(own.b(m, "actor").shape, generator=g) * 0.08 for m in own.modules}
    critic = Bundle(roles=["critic"], rank=own.rank, alpha=own.alpha, targets=own.targets, share_a=own.share_a,
                    shared_a=own.shared_a, role_a={"critic": {m: own.role_a["actor"][m] for m in own.role_a["actor"]}},
                    role_b={"critic": b}, base=own.base)
    path = write_bundle(critic, paths["dir"] / "critic", force=True)
    c = client(lr_server)
    r = httpx.post(lr_server.url + "/v1/load_lora_adapter", json={"lora_name": "critic", "lora_path": str(path)})
    assert r.status_code == 200, r.text
    assert "critic" in [m.id for m in c.models.list().data]
    out = c.completions.create(model="critic", prompt=[5, 9, 30], max_tokens=4, temperature=0,
                               extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4
    foreign = write_random_bundle(paths["base"], paths["dir"] / "foreign", roles=("critic2",), rank=4, seed=77)
    r = httpx.post(lr_server.url + "/v1/load_lora_adapter", json={"lora_name": "critic2", "lora_path": str(foreign)})
    assert r.status_code == 400 and "A family" in r.json()["error"]["message"]
    r = httpx.post(lr_server.url + "/v1/unload_lora_adapter", json={"lora_name": "critic"})
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="critic", prompt=[5, 9], max_tokens=2)
    assert httpx.post(lr_server.url + "/v1/unload_lora_adapter", json={"lora_name": "critic"}).status_code == 404


BAD = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404),
    ("/v1/completions", {"model": "actor", "prompt": 5}, 400),
    ("/v1/completions", {"model": "actor", "prompt": "x", "max_tokens": -3}, 400),
    ("/v1/completions", {"model": "actor", "prompt": "x", "max_tokens": "ten"}, 400),
    ("/v1/completions", {"model": "actor", "prompt": "x", "max_tokens": 10 ** 6}, 400),
    ("/v1/completions", {"model": "actor", "prompt": [5] * 600, "max_tokens": 4}, 400),
    ("/v1/completions", {"model": "actor", "prompt": [5, 10 ** 7], "max_tokens": 4}, 400),
    ("/v1/completions", {"model": "actor", "prompt": "x", "n": 2}, 400),
    ("/v1/completions", {"model": "actor", "prompt": "x", "temperature": "hot"}, 400),
    ("/v1/completions", {"model": "actor", "prompt": "x", "top_p": 0}, 400),
    ("/v1/completions", {"model": "actor", "prompt": "x", "stop": [1, 2]}, 400),
    ("/v1/completions", [1, 2, 3], 400),
    ("/v1/chat/completions", {"model": "actor"}, 400),
    ("/v1/chat/completions", {"model": "actor", "messages": [{"content": "no role"}]}, 400),
    ("/v1/chat/completions", {"model": "actor", "messages": "hi"}, 400),
    ("/detokenize", {"model": "actor", "tokens": [-1]}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "x"}, 400),
]


@pytest.mark.parametrize("path,body,status", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gets_a_4xx_with_an_openai_error_body(lr_server, path, body, status):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(lr_server.url + path, headers={"content-type": "application/json"}, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert httpx.get(lr_server.url + "/health").status_code == 200


def test_no_chat_template_is_a_clear_400(paths):
    eng = Engine(paths["bundle"], mode="lrshared")
    eng.tokenizer.chat_template = None
    with LiveServer(eng) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "actor", "messages": USER})
        assert r.status_code == 400 and "/v1/completions" in r.json()["error"]["message"]
        assert client(srv).completions.create(model="actor", prompt="k7", max_tokens=2).usage.completion_tokens >= 1


def test_api_key_and_full_queue(paths):
    eng = Engine(paths["bundle"], mode="lrshared")
    with LiveServer(eng, api_key="sesame", max_queue=1) as srv:
        with pytest.raises(openai.AuthenticationError):
            client(srv, api_key="wrong").models.list()
        assert httpx.get(srv.url + "/health").status_code == 200          # health needs no key
        good = client(srv, api_key="sesame", timeout=20)
        body = {"model": "actor", "prompt": [5] * 30, "max_tokens": 480, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body,
                          headers={"Authorization": "Bearer sesame"}, timeout=30) as r:
            lines = r.iter_lines()             # keep the iterator: dropping it closes the connection
            next(lines)
            with eng._lock:                # hold the engine between two steps: the first request stays in flight
                with pytest.raises(openai.RateLimitError) as exc:
                    good.completions.create(model="planner", prompt="k7", max_tokens=2)
            assert exc.value.response.headers["retry-after"] == "1"
        assert _wait(lambda: not eng.has_unfinished())
        assert good.completions.create(model="planner", prompt="k7", max_tokens=2).usage.completion_tokens >= 1


def _metrics(srv) -> dict:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(srv.url + "/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_and_move(lr_server):
    before = _metrics(lr_server)
    key = ("lragent_generation_tokens_total", (("role", "reflector"),))
    client(lr_server).completions.create(model="reflector", prompt=[7, 8, 9], max_tokens=3, temperature=0,
                                         extra_body={"ignore_eos": True})
    after = _metrics(lr_server)
    assert after[key] - before.get(key, 0) == 3
    assert after[("lragent_cache_bytes", (("component", "free"),))] > 0
    assert ("lragent_time_to_first_token_seconds_count", (("role", "reflector"),)) in after


def test_sigterm_drains_and_exits_zero(paths):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.Popen([sys.executable, "-m", "lragent.cli", "serve", "--bundle", str(paths["bundle"]),
                             "--port", str(port), "--drain-timeout", "20", "--no-warmup", "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert _wait(lambda: _up(url), timeout=60)
        result = {}

        def slow():
            r = httpx.post(url + "/v1/completions", timeout=60, json={"model": "actor", "prompt": [5] * 20,
                                                                     "max_tokens": 60, "ignore_eos": True})
            result["r"] = r
        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=60)
        assert proc.wait(timeout=60) == 0
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 60
    finally:
        if proc.poll() is None:
            proc.kill()


def _up(url) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_tokenize_detokenize_and_reset_prefix_cache(lr_server):
    url = lr_server.url
    r = httpx.post(url + "/tokenize", json={"model": "actor", "prompt": "find the value of k7 ."}).json()
    assert r["tokens"] == lr_server.engine.encode("find the value of k7 .") and r["count"] == len(r["tokens"])
    chat = httpx.post(url + "/tokenize", json={"model": "planner", "messages": USER}).json()
    assert chat["tokens"] == lr_server.engine.render(USER, "planner")
    assert httpx.post(url + "/detokenize", json={"model": "actor", "tokens": r["tokens"]}).json()["prompt"] == \
        lr_server.engine.tokenizer.decode(r["tokens"])
    client(lr_server).completions.create(model="actor", prompt=[5, 6, 7, 8, 9] * 4, max_tokens=2)
    assert lr_server.engine.stats()["cached_blocks"]["kv"] > 0
    assert httpx.post(url + "/reset_prefix_cache").status_code == 200
    assert lr_server.engine.stats()["cached_blocks"]["kv"] == 0


def test_a_dead_engine_loop_is_a_503_not_a_hang(paths):
    eng = Engine(paths["bundle"], mode="lrshared")
    with LiveServer(eng) as srv:
        def broken():
            raise RuntimeError("simulated engine failure")
        eng.step = broken                                  # the next step fails inside the loop thread
        r = httpx.post(srv.url + "/v1/completions", json={"model": "actor", "prompt": [5, 6], "max_tokens": 3},
                       timeout=30)
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
        assert httpx.get(srv.url + "/health").status_code == 503
        r = httpx.post(srv.url + "/v1/completions", json={"model": "actor", "prompt": [5, 6], "max_tokens": 3})
        assert r.status_code == 503


def test_load_unload_cycles_reuse_drained_slots(paths):
    """Hot-swapping an adapter through load/unload reuses its drained slot: the stacked tensors do not grow."""
    from lragent.bundle import load_bundle
    eng = Engine(paths["bundle"], mode="lrshared")
    own = load_bundle(paths["bundle"])
    other = Bundle(roles=["tmp"], rank=own.rank, alpha=own.alpha, targets=own.targets, share_a=own.share_a,
                   shared_a=own.shared_a, role_a={"tmp": dict(own.role_a["actor"])},
                   role_b={"tmp": dict(own.role_b["actor"])}, base=own.base)
    path = write_bundle(other, paths["dir"] / "tmp_role", force=True)
    eng.load_role("tmp", path)
    n = len(eng.adapters.roles)
    want = eng.generate([5, 9, 30], "actor", greedy(4)).token_ids
    for _ in range(4):
        eng.unload_role("tmp")
        eng.load_role("tmp", path)
        assert eng.generate([5, 9, 30], "tmp", greedy(4)).token_ids == want          # the actor's tensors
    assert len(eng.adapters.roles) == n and eng.adapters.layers[0]["v_proj"].b.shape[0] == n


def test_a_tiny_temperature_is_greedy_and_the_engine_survives(lr_server):
    c = client(lr_server)
    g = c.completions.create(model="actor", prompt=[5, 9, 30], max_tokens=4, temperature=0,
                             extra_body={"ignore_eos": True})
    t = c.completions.create(model="actor", prompt=[5, 9, 30], max_tokens=4, temperature=1e-39,
                             extra_body={"ignore_eos": True})
    assert t.choices[0].text == g.choices[0].text
    r = c.completions.create(model="actor", prompt=[5, 9, 30], max_tokens=2, logprobs=5)
    assert len(r.choices[0].logprobs.top_logprobs[0]) == 5
    assert httpx.get(lr_server.url + "/health").status_code == 200


def test_return_tokens_as_token_ids_gives_the_generated_ids(lr_server):
    """vLLM's extension: logprobs name tokens "token_id:N", streamed and not, equal to the engine's ids."""
    prompt = [1, 5, 11, 18, 19, 20, 21]
    want = lr_server.engine.generate(prompt, "actor", greedy(5)).token_ids
    c = client(lr_server)
    body = dict(model="actor", prompt=prompt, max_tokens=5, temperature=0, logprobs=1,
                extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    r = c.completions.create(**body)
    assert [int(t.split(":")[1]) for t in r.choices[0].logprobs.tokens] == want
    got = [int(t.split(":")[1]) for ch in c.completions.create(**body, stream=True) for c_ in ch.choices
           for t in (c_.logprobs.tokens if c_.logprobs else [])]
    assert got == want
    chat = c.chat.completions.create(model="actor", messages=[{"role": "user", "content": "k3 ?"}], max_tokens=3,
                                     temperature=0, logprobs=True,
                                     extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    assert all(e.token.startswith("token_id:") for e in chat.choices[0].logprobs.content)
