"""nonshared mode == Hugging Face transformers + PEFT (each role's adapter, its own cache): tokens and logits."""
import pytest
import torch

from lragent.serve.engine import Engine
from support.bundles import hf_peft_greedy, write_random_bundle
from support.models import make_random_base

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = {"planner": [1, 5, 11, 18, 19, 20, 21, 46, 15, 2, 8, 11],
           "actor": [1, 5, 11, 18, 19, 20, 21, 60, 15, 2, 6, 11, 30, 40, 2, 9, 11]}
N_NEW = 6


# (model type, shape, rank, targets, share_a): covers GQA and MHA, head_dim 16/32/64, ranks 4/8/16, K+V and V-only,
# and every model family the engine serves (serve/models).
MATRIX = [
    ("llama", "gqa16", 4, ALL, ("k_proj", "v_proj")),
    ("llama", "mha16", 8, ("q_proj", "v_proj", "o_proj"), ("v_proj",)),
    ("llama", "gqa32", 16, ("k_proj", "v_proj"), ("k_proj", "v_proj")),
    ("llama", "mha64", 8, ("v_proj", "gate_proj", "up_proj", "down_proj"), ()),
    ("mistral", "gqa16", 8, ("q_proj", "k_proj", "v_proj"), ("k_proj", "v_proj")),
    ("qwen2", "gqa16", 4, ("q_proj", "k_proj", "v_proj", "o_proj"), ("v_proj",)),
    ("qwen3", "gqa16", 8, ("k_proj", "v_proj", "o_proj"), ("k_proj", "v_proj")),
    ("gemma", "gqa16", 8, ALL, ("k_proj", "v_proj")),
]


@pytest.mark.parametrize("model_type,shape,rank,targets,share_a", MATRIX,
                         ids=[f"{m[0]}-{m[1]}-r{m[2]}-{'kv' if 'k_proj' in m[3] else 'v'}" for m in MATRIX])
def test_nonshared_matches_hf_peft(tmp_path, model_type, shape, rank, targets, share_a):
    base = make_random_base(tmp_path / "base", shape, seed=1, model_type=model_type)
    bundle = write_random_bundle(base, tmp_path / "bundle", roles=("planner", "actor"), rank=rank,
                                 targets=targets, share_a=share_a, seed=2)
    engine = Engine(bundle, mode="nonshared")
    outs = engine.generate_batch([PROMPTS["planner"], PROMPTS["actor"]], ["planner", "actor"],
                                 [_params()] * 2)
    for role, out in zip(("planner", "actor"), outs):
        toks, logits = hf_peft_greedy(base, bundle / "peft" / role, PROMPTS[role], N_NEW)
        assert out.token_ids == toks, role
        assert (out.logits - logits).abs().max().item() <= 1e-4, role
    # the adapters matter: the same prompt gives different logits per role
    a, b = engine.generate_batch([PROMPTS["actor"]] * 2, ["planner", "actor"], [_params()] * 2)
    assert (a.logits[0] - b.logits[0]).abs().max() > 1e-3


def _params():
    from lragent.serve.sampling import SamplingParams
    return SamplingParams(max_new_tokens=N_NEW, ignore_eos=True, return_logits=True)


@pytest.mark.parametrize("mode", ["lrshared", "baseshared", "fullshared"])
def test_shared_modes_match_hf_for_a_single_request(tmp_path, mode):
    """Nothing shared yet: every mode computes the role's exact K/V (shared modes via base + L B at attention)."""
    base = make_random_base(tmp_path / "base", "gqa16", seed=3)
    bundle = write_random_bundle(base, tmp_path / "bundle", roles=("planner", "actor"), rank=8, targets=ALL,
                                 seed=4)
    out = Engine(bundle, mode=mode).generate(PROMPTS["actor"], "actor", _params())
    toks, logits = hf_peft_greedy(base, bundle / "peft" / "actor", PROMPTS["actor"], N_NEW)
    assert out.token_ids == toks
    assert (out.logits - logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_hf_peft(tmp_path, dtype):
    """lrshared in bf16 / fp16 (caches and B in half precision) stays close to the fp32 oracle."""
    base = make_random_base(tmp_path / "base", "gqa32", seed=18)
    bundle = write_random_bundle(base, tmp_path / "bundle", roles=("planner", "actor"), rank=8, targets=ALL,
                                 seed=19)
    name = "bfloat16" if dtype == torch.bfloat16 else "float16"
    out = Engine(bundle, mode="lrshared", dtype=name).generate(PROMPTS["actor"], "actor", _params())
    _, ref = hf_peft_greedy(base, bundle / "peft" / "actor", PROMPTS["actor"], N_NEW)
    # the first step (same prompt on both sides): half-precision engine vs the fp32 oracle
    assert out.logits.dtype == torch.float32
    assert (out.logits[0] - ref[0]).abs().max().item() < 0.1
    assert int(out.logits[0].argmax()) == int(ref[0].argmax())
