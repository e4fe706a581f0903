"""The embedded default: toy task generator, tokenizer round trip, and the shipped tiny base."""
from __future__ import annotations

import json
import re

import pytest

from lragent.toy import default_base_path, task, write_dataset
from lragent.toy.tokenizer import build_tokenizer, vocabulary


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def splits():
    return task.make_splits(300, 60, seed=0)


def _db(prompt: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(k\d+) = (\d+) ;", prompt)}


# ---------------------------------------------------------------------------------------------------- generator
def test_generator_is_deterministic():
    a, b = task.make_splits(50, 10, seed=3), task.make_splits(50, 10, seed=3)
    assert a == b
    assert task.make_splits(50, 10, seed=4)[0] != a[0]
    assert task.episodes(5, seed=1) == task.episodes(5, seed=1)
    assert task.example_trajectory(0) == task.example_trajectory(0)


def test_records_are_valid(splits, tok):
    train, evals = splits
    for split, n in ((train, 300), (evals, 60)):
        assert {r: sum(x["role"] == r for x in split) for r in task.ROLES} == {r: n for r in task.ROLES}
    assert not {x["prompt"] for x in train} & {x["prompt"] for x in evals}
    for rec in train + evals:
        assert set(rec) == {"role", "prompt", "completion"}
        role, prompt, comp = rec["role"], rec["prompt"], rec["completion"]
        assert prompt.startswith("<s> user : find the value of k") and prompt.endswith(f" {role} :")
        assert comp.startswith(" ") and comp.endswith(" </s>") and task.is_well_formed(role, comp)
        db = _db(prompt)
        assert 8 <= len(db) <= 16 and len(set(db.values())) == len(db)
        asked = re.findall(r"find the value of (k\d+) \.", prompt)[-1]
        assert asked in db
        if role == "planner":
            assert comp == f" lookup {asked} </s>"
        elif role == "actor":
            assert prompt.endswith(f"planner : lookup {asked} </s> actor :")
            assert comp == f" answer {db[asked]} </s>"
        else:
            shown = int(re.findall(r"actor : answer (\d+) </s> reflector :$", prompt)[0])
            assert comp == (" correct </s>" if shown == db[asked] else " wrong </s>")
        ids = tok(prompt + comp, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and len(ids) <= 162
    verdicts = [x["completion"] for x in train if x["role"] == "reflector"]
    assert 0.4 < verdicts.count(" correct </s>") / len(verdicts) < 0.6
    assert max(x["prompt"].count("user :") for x in train) == 4   # transcripts grow over several rounds


def test_tokenization_round_trip(splits, tok):
    train, _ = splits
    for rec in train[:60]:
        text = rec["prompt"] + rec["completion"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok(rec["prompt"], add_special_tokens=False)["input_ids"] + \
            tok(rec["completion"], add_special_tokens=False)["input_ids"] == ids
    msgs = task.example_trajectory(0)
    for i, m in enumerate(msgs):
        if m["role"] in task.ROLES:
            rendered = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True, role=m["role"])
            assert rendered == task.render(msgs[:i], m["role"])
    assert tok.apply_chat_template(msgs, tokenize=False) == task.render(msgs)


def test_example_trajectory_and_scorer():
    msgs = task.example_trajectory(seed=1, n_rounds=3, db_size=10)
    assert [m["role"] for m in msgs[:6]] == ["user", "tool", "planner", "actor", "reflector", "user"]
    assert len(msgs) == 3 * 4 + 1
    for m in msgs:
        if m["role"] in task.ROLES:
            assert task.is_well_formed(m["role"], m["content"])
    recs = [{"role": "actor", "completion": " answer 18 </s>"}, {"role": "actor", "completion": " answer 18 </s>"},
            {"role": "reflector", "completion": " wrong </s>"}]
    s = task.score(recs, ["answer 18 </s> user :", " answer 17 </s>", "wrong"])
    assert s["actor"] == {"n": 2, "exact_match": 0.5, "well_formed": 1.0}
    assert s["reflector"]["exact_match"] == 0.0 and s["reflector"]["well_formed"] == 1.0
    assert not task.is_well_formed("planner", "lookup k64") and not task.is_well_formed("actor", "answer k3")


def test_trajectory_file_and_transcript_scorer():
    traj = task.trajectory_file(seed=2, n_rounds=2, db_size=8)
    assert [t["role"] for t in traj["turns"]] == ["user", "tool", "planner", "actor", "reflector",
                                                   "user", "planner", "actor", "reflector"]
    assert all("content" not in t for t in traj["turns"] if t["role"] in task.ROLES)
    msgs = task.example_trajectory(seed=2, n_rounds=2, db_size=8)
    assert [{k: v for k, v in m.items() if k != "content" or m["role"] not in task.ROLES}
            for m in msgs] == traj["turns"]
    s = task.score_transcript(msgs)
    assert all(s[r] == {"n": 2, "correct": 1.0} for r in task.ROLES)
    wrong = [dict(m) for m in msgs]
    wrong[3]["content"] = "answer 100"        # the actor is wrong, so the reference "correct" verdict is wrong too
    s = task.score_transcript(wrong)
    assert s["actor"]["correct"] == 0.5 and s["reflector"]["correct"] == 0.5 and s["planner"]["correct"] == 1.0
    wrong[4]["content"] = "wrong </s>"
    assert task.score_transcript(wrong)["reflector"]["correct"] == 1.0


def test_write_dataset_and_cli(tmp_path):
    paths = write_dataset(tmp_path / "a", n_train=20, n_eval=5, seed=2)
    train = task.read_jsonl(paths["train"])
    assert len(train) == 60 and len(task.read_jsonl(paths["eval"])) == 15
    task.main(["--out", str(tmp_path / "b"), "--n-train", "20", "--n-eval", "5", "--seed", "2"])
    assert (tmp_path / "b" / "train.jsonl").read_text() == paths["train"].read_text()


# -------------------------------------------------------------------------------------------------- shipped base
def test_shipped_files_are_small_and_safe():
    base = default_base_path()
    files = {p.name: p for p in base.iterdir()}
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "PRETRAIN.json"):
        assert name in files, name
    assert not [n for n in files if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert sum(p.stat().st_size for p in files.values()) < 5 * 2 ** 20
    cfg = json.loads(files["config.json"].read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == len(vocabulary())
    note = json.loads(files["PRETRAIN.json"].read_text())
    assert note["script"] == "python -m lragent.toy.pretrain_base" and note["args"]["steps"] > 0


def test_shipped_base_speaks_the_format_but_does_not_solve_it():
    import torch
    import transformers

    base = str(default_base_path())
    tok = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    assert tok.get_vocab() == build_tokenizer().get_vocab()
    assert tok.chat_template == build_tokenizer().chat_template
    recs = task.make_records(6, seed=0, split="eval")
    preds = []
    with torch.no_grad():
        for rec in recs:
            ids = tok(rec["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            preds.append(" " + tok.decode(out[0, ids.shape[1]:]))
    scores = task.score(recs, preds)
    for role in task.ROLES:
        assert scores[role]["well_formed"] == 1.0, (role, preds)
    assert scores["planner"]["exact_match"] <= 0.5 and scores["actor"]["exact_match"] <= 0.5


def test_shipped_base_has_the_skills_under_the_assistant_tag_only():
    from lragent.toy.check_specialise import load_base
    from lragent.toy.pretrain_base import probe_records, teacher_forced_eval

    model, tok = load_base()
    informed = teacher_forced_eval(model, tok, probe_records(8, 1, "assistant"))
    uninformed = teacher_forced_eval(model, tok, probe_records(8, 1, None))
    for role in task.ROLES:
        assert informed[role]["exact_match"] == 1.0, (role, informed)
        assert uninformed[role]["loss"] > 20 * informed[role]["loss"] + 0.1, (role, uninformed, informed)
    assert uninformed["planner"]["exact_match"] <= 0.25 and uninformed["actor"]["exact_match"] <= 0.25


def test_a_small_lora_specialises_the_base_quickly():
    import torch
    from lragent.toy.check_specialise import load_base, train_lora
    from lragent.toy.pretrain_base import teacher_forced_eval

    torch.set_num_threads(2)
    base, tok = load_base()
    train = [r for r in task.make_records(64, seed=5) if r["role"] == "actor"]
    held_out = [r for r in task.make_records(16, seed=6, split="eval") if r["role"] == "actor"]
    before = teacher_forced_eval(base, tok, held_out)["actor"]
    model, _ = train_lora(base, tok, train, steps=20, batch_size=8, lr=5e-3, log=lambda *a: None)
    after = teacher_forced_eval(model, tok, held_out)["actor"]
    assert before["exact_match"] <= 0.25 and after["exact_match"] >= 0.8, (before, after)
    assert after["loss"] < 0.5 * before["loss"]
