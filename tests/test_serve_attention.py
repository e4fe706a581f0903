"""The engine's CPU attention path against the kernels' reference, and the engine on each attention backend."""
import pytest
import torch

from lragent.kernels import flash_lora_attention_paged_cpu, flash_lora_attention_paged_ref
from lragent.kernels.cpu import Plan, expand_rope, paged_attention_cpu
from lragent.serve.config import ServeError
from lragent.serve.models.config import ModelConfig
from lragent.serve.engine import Engine
from lragent.serve.sampling import SamplingParams
from support.bundles import write_random_bundle
from support.models import make_random_base


def paged_inputs(dtype, *, h=4, h_kv=2, d=16, r=8, bs=4, n_agents=3, seed=0, separate_lr=True):
    g = torch.Generator().manual_seed(seed)
    sq, sk = [5, 1, 3], [9, 14, 3]                     # a prefill chunk, a decode step, a first chunk
    nb = 16
    perm = torch.randperm(nb, generator=g).to(torch.int32)
    table = torch.stack([perm[i * 4:(i + 1) * 4] for i in range(3)])
    lr_perm = torch.randperm(nb, generator=g).to(torch.int32)
    lr_table = torch.stack([lr_perm[i * 4:(i + 1) * 4] for i in range(3)]) if separate_lr else None

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)
    cfg = ModelConfig(model_type="llama", vocab_size=8, hidden_size=h * d, intermediate_size=8, num_layers=1,
                      num_heads=h, num_kv_heads=h_kv, head_dim=d)
    cos, sin = cfg.rope_tables(64)
    return dict(q=rnd(sum(sq), h, d), k_cache=rnd(nb, bs, h_kv, d), v_cache=rnd(nb, bs, h_kv, d), block_table=table,
                seq_lens=torch.tensor(sk, dtype=torch.int32),
                cu_seqlens_q=torch.tensor([0, 5, 6, 9], dtype=torch.int32),
                lr_v_cache=rnd(nb, bs, r), lr_k_cache=rnd(nb, bs, r), b_v=rnd(n_agents, h_kv, r, d) * 0.3,
                b_k=rnd(n_agents, h_kv, r, d) * 0.3, agent_ids=torch.tensor([2, 0, 1], dtype=torch.int32),
                lr_block_table=lr_table, cos=cos, sin=sin)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("lora", ["kv", "v", "none"])
@pytest.mark.parametrize("gqa", [(4, 2), (4, 4), (4, 1)])
def test_cpu_path_matches_reference(dtype, tol, lora, gqa):
    kw = paged_inputs(dtype, h=gqa[0], h_kv=gqa[1], separate_lr=lora != "v")
    if "k" not in lora:
        kw.update(lr_k_cache=None, b_k=None, cos=None, sin=None)
    if lora == "none":
        kw.update(lr_v_cache=None, b_v=None, agent_ids=None, lr_block_table=None)
    args = [kw.pop(k) for k in ("q", "k_cache", "v_cache", "block_table", "seq_lens", "cu_seqlens_q")]
    ref = flash_lora_attention_paged_ref(*args, **kw)
    out = paged_attention_cpu(*args, **kw)
    assert out.dtype == ref.dtype
    assert (out.float() - ref.float()).abs().max().item() <= tol
    assert torch.equal(flash_lora_attention_paged_cpu(*args, **kw), out)     # the public, checked entry point
    if kw["cos"] is not None:   # the engine's way: RoPE tables expanded over the KV heads once, handed in a Plan
        plan = Plan(args[3], args[4], args[5], kw["agent_ids"], kw["lr_block_table"], args[1].shape[1],
                    *expand_rope(kw["cos"], kw["sin"], gqa[1]), gqa[1])
        out_plan = paged_attention_cpu(*args, **kw, plan=plan)
        assert torch.equal(out_plan, out)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("attn")
    base = make_random_base(d / "base", "gqa32", seed=11)   # the kernel needs head_dim >= 32 with key LoRA
    return write_random_bundle(base, d / "bundle", roles=("planner", "actor"), rank=4,
                               targets=("q_proj", "k_proj", "v_proj"), seed=12)


@pytest.mark.parametrize("mode", ["lrshared", "baseshared", "nonshared"])
def test_engine_backends_agree(bundle, mode):
    """torch (CPU path), reference and the Triton kernel (interpreted on CPU) give the same engine outputs."""
    prompt = [1, 5, 11, 18, 19, 20, 21, 46, 15, 2, 8, 11, 30, 31, 32, 33, 34]
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True, return_logits=True)
    outs = {}
    for backend in ("torch", "reference", "triton"):
        eng = Engine(bundle, mode=mode, attention=backend, block_size=8)
        first = eng.generate(prompt, "planner", sp)
        outs[backend] = [first, eng.generate(prompt + first.token_ids + [2, 9, 11], "actor", sp)]
    for backend in ("reference", "triton"):
        for a, b in zip(outs[backend], outs["torch"]):
            assert a.token_ids == b.token_ids
            assert (a.logits - b.logits).abs().max().item() <= 1e-4


def test_kernel_shape_limits(tmp_path):
    base = make_random_base(tmp_path / "base", "gqa16", seed=17)
    b = write_random_bundle(base, tmp_path / "b", roles=("planner",), rank=4, targets=("k_proj", "v_proj"))
    with pytest.raises(ServeError, match="head_dim 16 is outside 32..256 with key LoRA"):
        Engine(b, mode="lrshared", attention="triton")
    assert Engine(b, mode="nonshared", attention="triton").runner.attention == "triton"
    assert Engine(b, mode="lrshared").runner.attention == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["lrshared", "nonshared"])
def test_engine_on_cuda_matches_cpu(bundle, mode):
    prompt = [1, 5, 11, 18, 19, 20, 21, 46, 15, 2, 8, 11, 30, 31, 32, 33, 34]
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True, return_logits=True)
    cpu = Engine(bundle, mode=mode, device="cpu").generate(prompt, "actor", sp)
    gpu_engine = Engine(bundle, mode=mode, device="cuda", dtype="float32")
    assert gpu_engine.runner.attention == "triton"
    gpu = gpu_engine.generate(prompt, "actor", sp)
    assert gpu.token_ids == cpu.token_ids
    assert (gpu.logits - cpu.logits).abs().max().item() <= 1e-3


@pytest.mark.parametrize("mode", ["lrshared", "lrbase", "baseshared"])
def test_engine_workspace_matches_no_workspace(bundle, mode):
    """The torch backend's per-request K' workspace changes no output (long prompts run as several chunks, then
    a hand-off to another role over the cached prefix), counts its bytes while a request runs and frees them."""
    prompt = [1] + [5 + (i * 7) % 40 for i in range(60)]
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True, return_logits=True)
    outs = {}
    for ws in (0, None):
        eng = Engine(bundle, mode=mode, attention="torch", block_size=8, max_batch_tokens=24, workspace_tokens=ws)
        a = eng.generate(prompt, "planner", sp)
        b = eng.generate(prompt + a.token_ids + [9, 11, 30], "actor", sp)
        outs[ws] = (a, b)
        st = eng.stats()
        assert st["workspace_running_bytes"] == 0                    # dropped when the requests finished
        assert (st["workspace_bytes"] > 0) == (ws is None)            # the arena stays for the next request
        if ws is None:
            rid = eng.add_request(prompt, "actor", max_new_tokens=3, ignore_eos=True)
            eng.step()
            assert eng.stats()["workspace_running_bytes"] > 0
            now = eng.stats()                                           # its rows start where the last ones did
            assert now["workspace_bytes"] == max(st["workspace_bytes"], now["workspace_running_bytes"])
            eng.abort(rid)
            assert eng.stats()["workspace_running_bytes"] == 0
            eng.clear_cache()
            assert eng.stats()["workspace_bytes"] == 0                 # the arena goes with the cached prefixes
    for x, y in zip(outs[0], outs[None]):
        assert x.token_ids == y.token_ids
        assert (x.logits - y.logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("mode", ["lrshared", "lrbase", "baseshared", "fullshared", "nonshared"])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_step_matches_generic_path(bundle, mode, threads, monkeypatch):
    """Steps whose sequences each have one query run as a DecodeStep (per-step arguments made once for all
    layers); it gives the same bits as the generic one-query path, with and without the workspace, for a batch of
    sequences of different roles and lengths, on one thread and on two (rows and heads split over threads)."""
    from lragent.kernels import cpu_step
    calls = []
    real = cpu_step.DecodeStep.__call__
    monkeypatch.setattr(cpu_step.DecodeStep, "__call__", lambda self, *a: calls.append(len(self.seqs)) or
                        real(self, *a))
    monkeypatch.setattr(cpu_step.cpu_native, "MIN_ROWS_PER_THREAD", 4)      # short rows still split
    prompt = [1] + [5 + (i * 7) % 40 for i in range(40)]
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True, return_logits=True)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs = {}
        for fast, ws in ((False, None), (True, None), (True, 0)):
            eng = Engine(bundle, mode=mode, attention="torch", block_size=8, workspace_tokens=ws)
            eng.runner.backend.decode_step = fast
            first = eng.generate(prompt, "planner", sp)
            batch = eng.generate_batch([prompt + first.token_ids + [9], prompt[:23] + [11, 30], prompt + [2]],
                                       ["actor", "planner", "actor"], sp)
            outs[fast, ws] = [first] + batch
    finally:
        torch.set_num_threads(old)
    assert calls and max(calls) == 3                        # batched decode steps took the path
    for key in ((True, None), (True, 0)):
        for a, b in zip(outs[key], outs[False, None]):
            assert a.token_ids == b.token_ids
            diff = (a.logits - b.logits).abs().max().item()
            assert diff == 0 if key[1] is None else diff <= 1e-4
