"""Bundles whose adapters cover some decoder layers only: the PEFT adapter config names exactly their modules (PEFT
loads them with no missing keys), the loader holds it to that, and the engine serves them in every mode, with
nonshared equal to Hugging Face transformers + PEFT."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from lragent.bundle import BundleError, load_bundle
from lragent.bundle.peftlayout import layout_ok, peft_layout
from lragent.modes import MODES
from lragent.serve.engine import Engine
from lragent.serve.sampling import SamplingParams
from support.bundles import hf_peft_greedy, write_random_bundle
from support.models import make_random_base

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
ROLES = ("planner", "actor")
KV = ("k_proj", "v_proj")
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
PROMPT = [1, 5, 11, 18, 19, 20, 21, 46, 15, 2, 8, 11, 30, 40, 2, 9]
CONTEXT = [3, 60, 12, 44, 18, 7, 25, 9, 31, 2, 14, 50, 6, 11, 27, 40, 8, 19]    # a planner prefills, the actor reads
MIXED = {"q_proj": [0], "k_proj": [2], "v_proj": [0, 2], "o_proj": []}   # per-target layer sets


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random 3-layer GQA Llama."""
    return make_random_base(tmp_path_factory.mktemp("base3"), "gqa16", seed=1, num_hidden_layers=3)


def _params(n=5):
    return SamplingParams(max_new_tokens=n, ignore_eos=True, return_logits=True)


def _peft_load(base, peft_dir):
    """(PEFT model, paths of the modules it wrapped, warnings it raised) for one adapter directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(peft_dir))
    wrapped = sorted(n[len("base_model.model."):-len(".lora_A")] for n, _ in pm.named_modules()
                     if n.endswith(".lora_A"))
    return pm, wrapped, [str(w.message) for w in caught]


def test_peft_layout_forms():
    last = [f"model.layers.2.self_attn.{t}" for t in KV]
    every = [f"model.layers.{i}.self_attn.{t}" for i in range(3) for t in KV]
    assert peft_layout(every, 3) == {"target_modules": ["k_proj", "v_proj"]}
    assert peft_layout(last, 3) == {"target_modules": ["k_proj", "v_proj"], "layers_to_transform": [2],
                                    "layers_pattern": "layers"}
    assert peft_layout(every, None)["layers_to_transform"] == [0, 1, 2]      # layer count unknown: spelled out
    mixed = ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.v_proj", "model.layers.0.self_attn.v_proj"]
    assert peft_layout(mixed, 3) == {"target_modules": sorted(mixed)}
    # the loader: an exact description passes whether or not it knows the layer count; all-layers for a partial fails
    assert layout_ok(peft_layout(every, None), every, 3) and layout_ok(peft_layout(every, 3), every, None)
    assert not layout_ok({"target_modules": ["k_proj", "v_proj"]}, last, 3)
    assert not layout_ok({"target_modules": ["v_proj"], "layers_to_transform": [2]}, last, 3)


@pytest.mark.parametrize("layers", [[-1], [0, 2], MIXED, None], ids=["last", "first-last", "per-target", "all"])
def test_peft_loads_exactly_the_bundle_modules(base, tmp_path, layers):
    from transformers import AutoModelForCausalLM

    out = write_random_bundle(base, tmp_path / "b", roles=ROLES, targets=QKVO, layers=layers, seed=2)
    bundle = load_bundle(out, base_dir=base)
    cfg = json.loads((out / "peft" / "actor" / "adapter_config.json").read_text())
    if layers is None:                                          # a full-layer bundle's config is unchanged
        assert cfg["target_modules"] == sorted(QKVO) and "layers_to_transform" not in cfg
    pm, wrapped, warned = _peft_load(base, out / "peft" / "actor")
    assert wrapped == bundle.modules
    assert not [w for w in warned if "missing" in w.lower()], warned
    ids = torch.tensor([PROMPT])
    merged = AutoModelForCausalLM.from_pretrained(str(base))   # the bundle's forward: base + scaling * B @ A
    with torch.no_grad():
        for m in bundle.modules:
            merged.get_submodule(m).weight += bundle.delta_weight(m, "actor")
        assert (pm(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item() <= 1e-5


def test_loader_refuses_a_peft_config_that_names_other_modules(base, tmp_path):
    from lragent.train.export import _no_missing_keys
    out = write_random_bundle(base, tmp_path / "b", roles=ROLES, targets=KV, layers=[-1], seed=3)
    path = out / "peft" / "planner" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for key in ("layers_to_transform", "layers_pattern"):      # what every bundle wrote before: all layers
        del cfg[key]
    path.chmod(0o644)
    path.write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=r"peft/planner/adapter_config\.json: target_modules / layers_to_transform"):
        load_bundle(out, verify=False)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(base))
    with pytest.raises(BundleError, match="peft/planner: PEFT wraps modules the adapter has no tensors for"):
        with _no_missing_keys("planner"):                       # export's PEFT verification refuses it too
            PeftModel.from_pretrained(model, str(path.parent))


@pytest.mark.parametrize("layers", [[-1], MIXED], ids=["last", "per-target"])
def test_nonshared_matches_hf_peft(base, tmp_path, layers):
    out = write_random_bundle(base, tmp_path / "b", roles=ROLES, targets=QKVO, layers=layers, seed=4)
    engine = Engine(out, mode="nonshared")
    outs = engine.generate_batch([PROMPT, PROMPT], list(ROLES), [_params()] * 2)
    for role, got in zip(ROLES, outs):
        toks, logits = hf_peft_greedy(base, out / "peft" / role, PROMPT, 5)
        assert got.token_ids == toks, role
        assert (got.logits - logits).abs().max().item() <= 1e-4, role
    assert (outs[0].logits[0] - outs[1].logits[0]).abs().max() > 1e-3       # the adapters matter


def test_every_mode_serves_a_last_layer_bundle(base, tmp_path):
    """k/v adapters on the last layer only: every mode equals HF + PEFT for one request, and a hand-off (the actor
    continuing the planner's prefilled context) in lrshared equals nonshared, since no adapter changes the hidden
    states the shared cache is computed from."""
    out = write_random_bundle(base, tmp_path / "b", roles=ROLES, targets=KV, layers=[-1], seed=5)
    toks, logits = hf_peft_greedy(base, out / "peft" / "actor", PROMPT, 4)
    handoff = {}
    for mode in MODES:
        engine = Engine(out, mode=mode)
        got = engine.generate(PROMPT, "actor", _params(4))
        assert got.token_ids == toks and (got.logits - logits).abs().max().item() <= 1e-4, mode
        engine.generate(CONTEXT, "planner", _params(1))
        handoff[mode] = engine.generate(CONTEXT + [7, 3], "actor", _params(3))
    assert handoff["lrshared"].stats.reused_from_other_roles > 0
    assert (handoff["lrshared"].logits - handoff["nonshared"].logits).abs().max().item() <= 1e-4
    assert (handoff["fullshared"].logits - handoff["nonshared"].logits).abs().max().item() > 1e-3  # the writer's K/V
