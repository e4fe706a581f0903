"""The ``handoff`` task (``lragent.toy.handoff``) and its shipped base (``lragent/toy/assets/handoff-llama``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lragent.toy import handoff
from lragent.toy.tokenizer import build_tokenizer, vocabulary

BASE = Path(handoff.__file__).resolve().parent / "assets" / "handoff-llama"


@pytest.fixture(scope="module")
def splits():
    return handoff.make_splits(200, 40, seed=0)


def test_permutations_disagree_everywhere():
    perms = handoff.PERMS
    assert set(perms) == set(handoff.ROLES)
    for r, p in perms.items():
        assert sorted(p) == list(range(handoff.N_CODES))
        assert all(p[c] != c for c in range(handoff.N_CODES))          # the base (copy) is wrong for every role
    for r in handoff.ROLES:
        for q in handoff.ROLES:
            if r != q:                                                  # a reader of another role's cache is wrong
                assert all(perms[r][c] != perms[q][c] for c in range(handoff.N_CODES))


def test_generator_is_deterministic_per_seed():
    assert handoff.make_splits(30, 10, seed=3) == handoff.make_splits(30, 10, seed=3)
    assert handoff.make_splits(30, 10, seed=4)[0] != handoff.make_splits(30, 10, seed=3)[0]
    assert handoff.episodes(5, seed=1) == handoff.episodes(5, seed=1)
    assert handoff.held_out_episodes(5, seed=2) == handoff.held_out_episodes(5, seed=2)
    assert handoff.held_out_episodes(5, seed=2) != handoff.held_out_episodes(5, seed=3)


def test_splits_are_disjoint(splits):
    train, evals = splits
    train_prompts = {r["prompt"] for r in train}
    assert not train_prompts & {r["prompt"] for r in evals}
    eps = handoff.held_out_episodes(40, seed=0, exclude_prompts=train_prompts)
    assert not train_prompts & {r["prompt"] for ep in eps for r in handoff.turn_records(ep["turns"])}


def test_records_are_well_formed(splits):
    tok = build_tokenizer()
    train, evals = splits
    for split, n in ((train, 200), (evals, 40)):
        assert {r: sum(x["role"] == r for x in split) for r in handoff.ROLES} == {r: n for r in handoff.ROLES}
    for rec in train + evals:
        assert set(rec) == {"role", "prompt", "completion"}
        role, prompt, comp = rec["role"], rec["prompt"], rec["completion"]
        assert prompt.startswith("<s> user : find the result . </s> tool : result ") and prompt.endswith(f" {role} :")
        code = handoff.latest_code(prompt)
        assert comp == f" answer {handoff.PERMS[role][code]} </s>" and handoff.is_well_formed(comp)
        tool = prompt.rsplit("tool : result ", 1)[1].split(" .", 1)[0].split()
        keys = [w for w in tool if w != "key"]
        assert len(keys) == len(set(keys)) and 3 <= len(keys) <= 7
        assert all(w.startswith("k") and int(w[1:]) < handoff.N_CODES for w in keys)
        ids = tok(prompt + comp, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == prompt + comp
    assert max(x["prompt"].count("tool :") for x in train) == 4     # transcripts grow over several rounds


def test_transcripts_writers_readers_and_chat_template():
    tok = build_tokenizer()
    ep = handoff.held_out_episodes(1, seed=5)[0]
    turns, kinds = ep["turns"], ep["kinds"]
    assert turns[0] == {"role": "user", "content": handoff.USER_TEXT} and turns[1]["role"] == "tool"
    for i, t in enumerate(turns):
        if t["role"] in handoff.ROLES:
            prev = [j for j in range(i) if turns[j]["role"] == "tool"][-1]
            assert kinds[i] == ("writer" if i == prev + 1 else "reader")
            assert tok.apply_chat_template(turns[:i], tokenize=False, add_generation_prompt=True,
                                           role=t["role"]) == handoff.render(turns[:i], t["role"])
        else:
            assert kinds[i] == "context"
    assert handoff.turn_kinds([{"role": "tool", "content": "x"}, {"role": "actor", "content": "a"},
                               {"role": "actor", "content": "a"}, {"role": "planner", "content": "p"}]) == \
        ["context", "writer", "writer", "reader"]
    s = handoff.score([{"role": "actor", "completion": " answer 3 </s>"}] * 3,
                      ["answer 3 </s> tool :", " answer 4 </s>", "answer 3"])
    assert s["actor"]["exact_match"] == pytest.approx(1 / 3) and s["actor"]["well_formed"] == 1.0


def test_write_dataset_episode_file_and_cli(tmp_path):
    paths = handoff.write_dataset(tmp_path / "a", n_train=20, n_eval=5, seed=2, n_episodes=4)
    train = handoff.read_jsonl(paths["train"])
    assert len(train) == 60 and len(handoff.read_jsonl(paths["eval"])) == 15
    eps = handoff.read_episodes(paths["episodes"])
    assert len(eps) == 4 and all(ep["task"] == "handoff" and ep["roles"] == list(handoff.ROLES) for ep in eps)
    assert not {r["prompt"] for r in train} & {r["prompt"] for ep in eps for r in handoff.turn_records(ep["turns"])}
    bare = tmp_path / "bare.jsonl"          # a user's own file: turns only
    bare.write_text(json.dumps({"turns": eps[0]["turns"]}) + "\n")
    assert handoff.read_episodes(bare)[0]["kinds"] == eps[0]["kinds"]
    handoff.main(["--out", str(tmp_path / "b"), "--n-train", "20", "--n-eval", "5", "--episodes", "4", "--seed", "2"])
    for name in ("train.jsonl", "eval.jsonl", "episodes.jsonl"):
        assert (tmp_path / "b" / name).read_text() == (tmp_path / "a" / name).read_text()


# -------------------------------------------------------------------------------------------------- shipped base
def test_shipped_base_files():
    files = {p.name: p for p in BASE.iterdir()}
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "PRETRAIN.json", "PRETRAIN.md"):
        assert name in files, name
    assert not [n for n in files if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert sum(p.stat().st_size for p in files.values()) < 5 * 2 ** 20
    cfg = json.loads(files["config.json"].read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["vocab_size"] == len(vocabulary()) and cfg["tie_word_embeddings"] is False
    note = json.loads(files["PRETRAIN.json"].read_text())
    assert note["script"] == "python -m lragent.toy.pretrain_handoff" and note["trainable"].startswith("all")
    assert note["copy_exact_match"] >= 0.95 and note["task_exact_match"] <= 0.05
    # every block is live: zeroing any one raises the held-out loss
    assert all(v["held_out_loss"] > note["held_out_loss"]["after"] + 0.01 for v in note["ablations"].values())


def test_shipped_base_copies_the_latest_code_and_does_not_solve_the_task():
    import torch
    import transformers
    from lragent.toy.pretrain_base import collate

    tok = transformers.AutoTokenizer.from_pretrained(str(BASE))
    assert tok.get_vocab() == build_tokenizer().get_vocab() and tok.chat_template == build_tokenizer().chat_template
    model = transformers.AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32).eval()
    for p in model.parameters():
        assert p.abs().max() > 0                                         # dense: no all-zero block
    recs = handoff.make_records(12, seed=1, split="eval")
    seqs, spans = [], []
    for rec in recs:
        p = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
        code = handoff.latest_code(rec["prompt"])
        c = tok(f" answer {code} </s>", add_special_tokens=False)["input_ids"]
        seqs.append((p + c, [-100] * len(p) + c))
        spans.append((len(p), len(p) + len(c), int(rec["completion"].split()[1])))
    batch = collate(seqs, tok.pad_token_id)
    with torch.no_grad():
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    copies = sum(bool((pred[i, a - 1:b - 1] == batch["input_ids"][i, a:b]).all()) for i, (a, b, _) in enumerate(spans))
    solves = sum(tok.convert_ids_to_tokens(int(pred[i, a])) == str(t) for i, (a, _, t) in enumerate(spans))
    assert copies >= 0.9 * len(recs), copies
    assert solves <= 0.1 * len(recs), solves
