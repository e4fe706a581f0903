"""Round trip with a real training run: train -> export -> load gives identical tensors, and each exported
peft/<role> loaded by PEFT gives the same logits as the bundle's own forward (fp32, <= 1e-5)."""
import json

import torch
import transformers
from safetensors.torch import load_file

from lragent.bundle import load_bundle
from lragent.cli import main as cli
from lragent.train.checkpoint import checkpoint_dir
from lragent.train.config import load_config
from lragent.train.export import bundle_model
from lragent.train.lora import roles as route
from lragent.train.trainer import train as train_lib
from lragent.cli.embedded import EMBEDDED


def train(cfg, **kw):
    """The trainer with the embedded default resolved, as the command line does."""
    return train_lib(cfg, embedded=EMBEDDED, **kw)


def test_train_export_load_round_trip(tiny_base, tmp_path, capsys):
    cfg = load_config(None, [f"model.base={tiny_base}", f"output_dir={tmp_path / 'run'}", "lora.rank=4",
                             "data.embedded_train_size=16", "data.eval=null", "train.max_steps=4",
                             "train.batch_size=4", "train.lr=1e-2"])
    run = train(cfg).run_dir
    assert cli(["export", "--run", str(run), "--out", str(tmp_path / "bundle")]) == 0
    bundle = load_bundle(tmp_path / "bundle", base_dir=tiny_base)
    ckpt = load_file(str(checkpoint_dir(run, 4) / "adapter.safetensors"))
    for m in bundle.modules:
        for role in bundle.roles:
            assert torch.equal(bundle.b(m, role), ckpt[f"{m}.lora_B.{role}"])
            a_key = f"{m}.lora_A" if bundle.shares_a(m) else f"{m}.lora_A.{role}"
            assert torch.equal(bundle.a(m, role), ckpt[a_key])
    assert bundle.lrshared_ok and bundle.a_family_hash == json.loads(
        (tmp_path / "bundle" / "manifest.json").read_text())["a_family_hash"]

    import peft
    ids = torch.randint(3, 200, (2, 20))
    ours = bundle_model(transformers.AutoModelForCausalLM.from_pretrained(str(tiny_base)), bundle).eval()
    for k, role in enumerate(bundle.roles):
        base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
        pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "bundle" / "peft" / role))
        with torch.no_grad(), route(ours, torch.tensor([k, k])):
            want = ours(input_ids=ids).logits
            got = pm(input_ids=ids).logits
        assert (want - got).abs().max().item() <= 1e-5
    capsys.readouterr()
    assert cli(["inspect", str(tmp_path / "bundle")]) == 0
    out = capsys.readouterr().out
    assert all(r in out for r in bundle.roles) and bundle.a_family_hash[:12] in out
