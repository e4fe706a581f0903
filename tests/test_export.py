"""``lragent export``: run dir -> bundle; tensors identical, PEFT exports reproduce the bundle's logits, failures
write nothing."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lragent.bundle import write as bundle_write
from lragent.bundle import load_bundle
from test_bundle_helpers import assert_one_line_error, make_run_dir, run_cli, tree  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
ROLES = ("planner", "actor", "reflector")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_base):
    """A run dir with checkpoints at steps 3 and 6; alpha/r = 5/3 so that scaling is not a power of two."""
    run = tmp_path_factory.mktemp("run")
    saved = make_run_dir(run, tiny_base, roles=ROLES, steps=(3, 6), rank=3, alpha=5.0)
    return run, saved


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "bundle"
    from lragent.cli.bundle import main
    assert main(["export", "--run", str(run[0]), "--out", str(out)]) == 0
    return out


def _assert_same_as_checkpoint(bundle, state):
    for m in bundle.modules:
        for r in bundle.roles:
            a_key = f"{m}.lora_A" if bundle.shares_a(m) else f"{m}.lora_A.{r}"
            assert torch.equal(bundle.a(m, r), state[a_key]) and torch.equal(bundle.b(m, r), state[f"{m}.lora_B.{r}"])


@torch.no_grad()
def test_round_trip_tensors_and_peft_logits(run, exported, tiny_base):
    import peft
    import transformers

    bundle = load_bundle(exported, base_dir=tiny_base)
    assert bundle.roles == list(ROLES) and bundle.source["checkpoint"] == "step-000006"
    assert bundle.share_a == ["k_proj", "v_proj"] and bundle.lrshared_ok and abs(bundle.scaling - 5 / 3) < 1e-12
    _assert_same_as_checkpoint(bundle, run[1][6])
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)  # noqa
    base_logits = load()(input_ids=ids).logits
    for role in ROLES:
        # An independent reference for "the bundle's forward": base weights + scaling * B @ A merged in.
        merged = load()
        for m in bundle.modules:
            merged.get_submodule(m).weight += bundle.delta_weight(m, role)
        want = merged(input_ids=ids).logits
        got = peft.PeftModel.from_pretrained(load(), str(exported / "peft" / role))(input_ids=ids).logits
        assert (got - want).abs().max().item() <= 1e-5
        assert (want - base_logits).abs().max().item() > 1e-2                 # the adapters do change the logits
        cfg = json.loads((exported / "peft" / role / "adapter_config.json").read_text())
        assert cfg["r"] == cfg["lora_alpha"] == 3 and cfg["use_rslora"] is False


def test_checkpoint_choice_and_verify_report(run, tmp_path, capsys):
    rc, out, err = run_cli(["export", "--run", run[0], "--checkpoint", 3, "--out", tmp_path / "b3"], capsys)
    assert rc == 0, err
    assert "step-000003" in out and out.count("PEFT logits match the bundle") == 3
    bundle = load_bundle(tmp_path / "b3")
    assert bundle.source["checkpoint"] == "step-000003"
    _assert_same_as_checkpoint(bundle, run[1][3])


def test_rslora_and_unshared_k(tmp_path, tiny_base, capsys):
    run = tmp_path / "run"
    make_run_dir(run, tiny_base, roles=("planner", "critic"), steps=(2,), rank=4, alpha=6.0, rslora=True,
                 targets=("k_proj", "v_proj", "down_proj"), share_a=("v_proj",))
    rc, out, err = run_cli(["export", "--run", run, "--out", tmp_path / "b"], capsys)
    assert rc == 0, err
    bundle = load_bundle(tmp_path / "b")
    assert bundle.scaling_rule == "rslora" and bundle.scaling == 3.0 and not bundle.lrshared_ok
    assert "lrshared" not in json.loads((tmp_path / "b" / "manifest.json").read_text())["modes"]
    peft_b = load_file(str(tmp_path / "b" / "peft" / "critic" / "adapter_model.safetensors"))
    m = "model.layers.1.mlp.down_proj"
    assert torch.allclose(peft_b[f"base_model.model.{m}.lora_B.weight"], 3.0 * bundle.b(m, "critic"))


def _copy_run(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run[0], dst)
    return dst


def _edit_run(path, fn):
    meta = json.loads((path / "run.json").read_text())
    fn(meta)
    (path / "run.json").write_text(json.dumps(meta))


BAD_RUNS = {
    "no run.json": (lambda r: (r / "run.json").unlink(), [], r"has no run\.json"),
    "missing checkpoint": (lambda r: None, ["--checkpoint", "9"],
                           r"step-000009 does not exist \(checkpoints: step-000003, step-000006\)"),
    "no checkpoints": (lambda r: shutil.rmtree(r / "checkpoints"), [], r"holds no step-NNNNNN checkpoint"),
    "other base": (lambda r: _edit_run(r, lambda m: m["base"].update(config_sha256="ab" * 32)), [],
                   r"does not match the run \(config\.json sha256"),
    "tensors vs run.json": (lambda r: _edit_run(r, lambda m: m.update(roles=["planner", "actor", "critic"])), [],
                            r"adapter\.safetensors does not match run\.json"),
    "bad role name": (lambda r: _edit_run(r, lambda m: m.update(roles=["planner", "mlp", "reflector"])), [],
                      r"invalid role name 'mlp': it is a module-path segment"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_run_writes_nothing(case, run, tmp_path, capsys):
    mutate, extra, pattern = BAD_RUNS[case]
    src = _copy_run(run, tmp_path)
    mutate(src)
    rc, _, err = run_cli(["export", "--run", src, "--out", tmp_path / "out" / "b", *extra], capsys)
    assert rc == 2
    assert_one_line_error(err, pattern)
    assert not (tmp_path / "out").exists()


def test_existing_out_and_peft_mismatch_write_nothing(run, exported, tmp_path, monkeypatch, capsys):
    before = tree(exported)
    rc, _, err = run_cli(["export", "--run", run[0], "--out", exported], capsys)
    assert rc == 2
    assert_one_line_error(err, r"already exists: choose another --out or pass --force")
    real = bundle_write._peft_files

    def unscaled(bundle, role):                                           # a broken PEFT export: scaling not baked
        config, tensors = real(bundle, role)
        return config, {k: v / bundle.scaling if "lora_B" in k else v for k, v in tensors.items()}

    monkeypatch.setattr(bundle_write, "_peft_files", unscaled)
    for out, force in ((exported, ["--force"]), (tmp_path / "new", [])):
        rc, _, err = run_cli(["export", "--run", run[0], "--out", out, *force], capsys)
        assert rc == 2
        # caught by load's peft/ check (B not scaling * B) before PEFT's forward would show it
        assert_one_line_error(err, r"peft/planner does not match the bundle's own tensors for 'planner'")
    assert tree(exported) == before and not (tmp_path / "new").exists()
    assert sorted(p.name for p in exported.parent.iterdir()) == ["bundle"] and list(tmp_path.iterdir()) == []


def test_peft_forward_mismatch_writes_nothing(run, tmp_path, monkeypatch, capsys):
    """The PEFT logit comparison itself (peft/ copies consistent with roles/, but a forward that differs)."""
    from lragent.train import export

    real = export.bundle_model

    def off_by_scale(model, bundle):
        model = real(model, bundle)
        with torch.no_grad():
            for p in (p for n, p in model.named_parameters() if "lora_B" in n):
                p.mul_(2.0)
        return model

    monkeypatch.setattr(export, "bundle_model", off_by_scale)
    rc, _, err = run_cli(["export", "--run", run[0], "--out", tmp_path / "b"], capsys)
    assert rc == 2
    assert_one_line_error(err, r"peft/planner does not reproduce the bundle's forward: max \|logit diff\|")
    assert list(tmp_path.iterdir()) == []
