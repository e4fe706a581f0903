"""``lora.layers``: adapters on some decoder layers only (config, injection, preflight, run.json, resume, export)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lragent.cli.embedded import EMBEDDED
from lragent.train.checkpoint import checkpoint_dir
from lragent.train.config import ConfigError, load_config, resolve_layers
from lragent.train.lora import LoraSpec, SharedALoRALinear, inject_lora, lora_modules
from lragent.train.preflight import PreflightError, check_base_model
from lragent.train.trainer import TrainError, train as train_lib

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
ROLES = ["planner", "actor", "reflector"]          # the toy task's roles
LAST = ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]     # tiny_base has 2 layers


def _cfg(base, out, *extra):
    return load_config(None, [f"model.base={base}", f"output_dir={out}", "data.embedded_train_size=8",
                              "data.eval=null", "train.batch_size=4", "lora.rank=4", "lora.targets=k_proj,v_proj",
                              "lora.layers=[-1]", *extra])


@pytest.fixture(scope="module")
def last_layer_run(tiny_base, tmp_path_factory):
    """A 2-step run with adapters on the last decoder layer only."""
    out = tmp_path_factory.mktemp("layers") / "run"
    return train_lib(_cfg(tiny_base, out, "train.max_steps=2", "train.lr=5e-2"), embedded=EMBEDDED).run_dir


def test_config_parses_and_validates_layers():
    assert load_config(None, []).lora.layers is None
    assert load_config(None, ["lora.layers=[-1]"]).lora.layers == [-1]
    assert load_config(None, ["lora.layers=0,2"]).lora.layers == [0, 2]
    assert load_config(None, ["lora.layers=[0]", "lora.layers=null"]).lora.layers is None
    with pytest.raises(ConfigError) as e:
        load_config(None, ["lora.layers=[]", "lora.rank=0"])
    assert "lora.layers: give at least one decoder-layer index" in str(e.value) and "lora.rank" in str(e.value)
    with pytest.raises(ConfigError, match=r"lora.layers: duplicate indices \[1\]"):
        load_config(None, ["lora.layers=[1, 0, 1]"])
    with pytest.raises(ConfigError, match="lora.layers: expected int, got 'x'"):
        load_config(None, ["lora.layers=[x]"])
    assert resolve_layers(None, 3) == [0, 1, 2] and resolve_layers([-1, 0], 3) == [0, 2]
    with pytest.raises(ValueError, match=r"\[3, -4\] out of range for a model with 3 decoder layers \(valid: -3..2\)"):
        resolve_layers([3, -4, 1], 3)
    with pytest.raises(ValueError, match="-1 and 2 are the same decoder layer"):
        resolve_layers([-1, 2], 3)


def test_inject_lora_wraps_only_the_selected_layers(tiny_base):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    mods = inject_lora(model, LoraSpec(roles=ROLES, rank=4, targets=["q_proj", "k_proj", "v_proj"],
                                       share_a=["k_proj", "v_proj"], layers=[0]))
    assert sorted(mods) == [f"model.layers.0.self_attn.{t}" for t in ("k_proj", "q_proj", "v_proj")]
    assert sorted(lora_modules(model)) == sorted(mods)
    assert type(model.get_submodule("model.layers.1.self_attn.k_proj")) is torch.nn.Linear
    assert isinstance(model.get_submodule("model.layers.0.self_attn.k_proj"), SharedALoRALinear)
    with pytest.raises(ValueError, match="out of range"):
        inject_lora(transformers.AutoModelForCausalLM.from_pretrained(str(tiny_base)),
                    LoraSpec(roles=ROLES, rank=4, layers=[2]))


def test_preflight_filters_modules_and_refuses_a_bad_index(tiny_base):
    _, modules, _ = check_base_model(tiny_base, ["k_proj", "v_proj"], [-1])
    assert modules == LAST
    _, modules, _ = check_base_model(tiny_base, ["k_proj", "v_proj"])
    assert len(modules) == 4
    with pytest.raises(PreflightError) as e:
        check_base_model(tiny_base, ["v_proj"], [0, -2])
    assert "\n" not in str(e.value) and "0 and -2 are the same decoder layer" in str(e.value)


def test_run_records_only_the_selected_modules(last_layer_run):
    meta = json.loads((last_layer_run / "run.json").read_text())
    assert meta["modules"] == LAST and meta["lora"]["layers"] == [-1]
    tensors = load_file(str(checkpoint_dir(last_layer_run, 2) / "adapter.safetensors"))
    assert {k.split(".lora_")[0] for k in tensors} == set(LAST)
    assert all(tensors[f"{m}.lora_B.{r}"].abs().sum() > 0 for m in LAST for r in ROLES)


@pytest.mark.parametrize("change", ["lora.layers=[0]", "lora.layers=null"])
def test_resume_refuses_a_change_of_layers(last_layer_run, tiny_base, change):
    before = sorted(p.name for p in last_layer_run.rglob("*"))
    with pytest.raises(TrainError, match=r"--resume: the config differs .* in lora\.layers"):
        train_lib(_cfg(tiny_base, last_layer_run, "train.max_steps=3", change), resume=True, embedded=EMBEDDED)
    assert sorted(p.name for p in last_layer_run.rglob("*")) == before


def test_export_of_a_partial_run_loads_in_peft_without_missing_keys(last_layer_run, tiny_base, tmp_path):
    import peft
    import transformers
    from lragent.bundle import load_bundle
    from lragent.train.export import export_run

    out, errors = export_run(last_layer_run, tmp_path / "bundle")
    assert set(errors) == set(ROLES)
    bundle = load_bundle(out, base_dir=tiny_base)
    assert bundle.modules == LAST
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)  # noqa
    for role in ROLES:
        cfg = json.loads((out / "peft" / role / "adapter_config.json").read_text())
        assert (cfg["target_modules"], cfg["layers_to_transform"], cfg["layers_pattern"]) == \
            (["k_proj", "v_proj"], [1], "layers")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pm = peft.PeftModel.from_pretrained(load(), str(out / "peft" / role))
        assert not [w for w in caught if "missing" in str(w.message).lower()]
        wrapped = sorted(n[len("base_model.model."):-len(".lora_A")] for n, _ in pm.named_modules()
                         if n.endswith(".lora_A"))
        assert wrapped == LAST
        merged = load()                       # the bundle's forward: base + scaling * B @ A merged in
        with torch.no_grad():
            for m in bundle.modules:
                merged.get_submodule(m).weight += bundle.delta_weight(m, role)
            assert (pm(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item() <= 1e-5
