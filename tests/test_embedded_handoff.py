"""``embedded:<task>`` names (the handoff task's base and data) and the handoff recipe end to end: train a few steps,
export (a last-layer bundle, PEFT-verified), serve one request."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lragent.cli.embedded import EMBEDDED, base_candidates
from lragent.toy import default_base_path, handoff
from lragent.train.config import ConfigError, load_config
from lragent.train.setup import TrainError, data_paths, resolve_base, write_embedded_data

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_handoff.yaml"


def test_embedded_names_resolve_to_their_task():
    assert EMBEDDED.base_path() == EMBEDDED.base_path("toy") == default_base_path()
    assert EMBEDDED.base_path("handoff") == handoff.base_path() != default_base_path()
    assert resolve_base("embedded", EMBEDDED) == default_base_path()
    assert resolve_base("embedded:handoff", EMBEDDED) == handoff.base_path()
    assert set(base_candidates()) == {default_base_path(), handoff.base_path()}
    with pytest.raises(TrainError, match=r"^model\.base=embedded:nope: unknown embedded task 'nope' \(known: toy, "
                                         r"handoff\)$"):
        resolve_base("embedded:nope", EMBEDDED)
    with pytest.raises(TrainError, match="resolved by the lragent command line"):
        resolve_base("embedded:handoff", None)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.base=embedded:9x", "data.train=embedded:Hand-off"])
    assert "model.base: 'embedded:9x' does not name an embedded task" in str(e.value)
    assert "data.train: 'embedded:Hand-off' does not name an embedded task" in str(e.value)


def test_embedded_handoff_data_is_the_handoff_task(tmp_path):
    cfg = load_config(None, ["data.train=embedded:handoff", "data.eval=embedded:handoff", "data.embedded_train_size=5",
                             "data.embedded_eval_size=2", "train.seed=3"])
    assert data_paths(cfg, tmp_path) == (tmp_path / "data" / "train.jsonl", tmp_path / "data" / "eval.jsonl")
    write_embedded_data(cfg, tmp_path, EMBEDDED)
    train, evals = handoff.make_splits(5, 2, seed=3)
    assert handoff.read_jsonl(tmp_path / "data" / "train.jsonl") == train
    assert handoff.read_jsonl(tmp_path / "data" / "eval.jsonl") == evals
    mixed = load_config(None, ["data.train=embedded:handoff", "data.eval=embedded"])
    with pytest.raises(TrainError, match="name different embedded tasks"):
        write_embedded_data(mixed, tmp_path / "other", EMBEDDED)


def test_handoff_recipe_trains_exports_and_serves(tmp_path, capsys):
    from lragent.cli import main
    from lragent.train.trainer import train
    from support.bundles import hf_peft_greedy

    cfg = load_config(RECIPE, [f"output_dir={tmp_path / 'run'}", "data.embedded_train_size=16",
                               "data.embedded_eval_size=4", "train.max_steps=6", "train.batch_size=8",
                               "train.warmup_steps=2", "train.log_every=3"])
    assert cfg.lora.layers == [-1] and cfg.model.base == "embedded:handoff"
    res = train(cfg, embedded=EMBEDDED)
    meta = json.loads((res.run_dir / "run.json").read_text())
    assert meta["base"]["path"] == str(handoff.base_path())
    assert meta["modules"] == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    first = handoff.read_jsonl(res.run_dir / "data" / "train.jsonl")[0]
    assert first == handoff.make_splits(16, 4, seed=0)[0][0]
    assert set(res.eval["adapted"]) == set(handoff.ROLES)

    bundle = tmp_path / "bundle"
    assert main(["export", "--run", str(res.run_dir), "--out", str(bundle)]) == 0
    assert capsys.readouterr().out.count("PEFT logits match the bundle") == 3
    assert json.loads((bundle / "peft" / "actor" / "adapter_config.json").read_text())["layers_to_transform"] == [1]

    prompt = handoff.render(handoff.held_out_episodes(1)[0]["turns"][:2], "actor")
    assert main(["generate", "--bundle", str(bundle), "--role", "actor", "--prompt", prompt, "--raw",
                 "--mode", "nonshared", "--max-new-tokens", "4", "--json", "--no-warmup"]) == 0
    out = json.loads(capsys.readouterr().out)
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(str(handoff.base_path()))(prompt, add_special_tokens=False).input_ids
    assert out["stats"]["prompt_tokens"] == len(ids)
    toks, _ = hf_peft_greedy(handoff.base_path(), bundle / "peft" / "actor", ids, len(out["token_ids"]))
    assert out["token_ids"] == toks
