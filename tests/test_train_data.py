"""Every data and config validation error: file, line and reason."""
import json

import pytest

from lragent.toy.tokenizer import build_tokenizer
from lragent.train.config import ConfigError, load_config
from lragent.train.data import IGNORE, DataError, build_dataset, read_records, tokenize_record


def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return p


GOOD = {"role": "planner", "prompt": "user : find k1 . </s> planner :", "completion": " lookup k1 </s>"}


@pytest.mark.parametrize("bad,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"prompt": "a", "completion": "b"}, "missing field 'role'"),
    ({"role": "Planner", "prompt": "a", "completion": "b"}, "invalid role name 'Planner'"),
    ({"role": "mlp", "prompt": "a", "completion": "b"}, "module-path segment"),
    ({"role": "critic", "prompt": "a", "completion": "b"}, "unknown role 'critic'"),
    ({"role": "actor", "completion": "b"}, "missing field 'prompt'"),
    ({"role": "actor", "prompt": "a"}, "missing field 'completion'"),
    ({"role": "actor", "prompt": "a", "completion": "   "}, "empty completion"),
    ({"role": "actor", "prompt": 3, "completion": "x"}, "field 'prompt' must be a string"),
    ({"role": "actor", "messages": []}, "'messages' must be a non-empty list"),
    ({"role": "actor", "messages": [{"role": "user"}]}, r"messages\[0\] must have string 'role' and 'content'"),
    ({"role": "actor", "messages": [{"role": "user", "content": "hi"}]}, "empty completion"),
])
def test_invalid_record_reports_file_line_and_reason(tmp_path, bad, message):
    p = _write(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(DataError, match=message) as e:
        read_records(p, roles=["planner", "actor", "reflector"])
    assert f"{p}:3:" in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_records(tmp_path / "e.jsonl")


def test_labels_cover_completion_only():
    tok = build_tokenizer()
    row = tokenize_record(GOOD, tok, {"planner": 0}, 64)
    n_c = len(tok(" lookup k1 </s>", add_special_tokens=False)["input_ids"])
    assert row["labels"][:-n_c] == [IGNORE] * (len(row["labels"]) - n_c)
    assert row["labels"][-n_c:] == row["input_ids"][-n_c:]
    chat = {"role": "actor", "messages": [{"role": "user", "content": "find k1 ."},
                                          {"role": "actor", "content": "answer 7"}]}
    row = tokenize_record(chat, tok, {"actor": 0}, 64)
    trained = [t for t, l in zip(row["input_ids"], row["labels"]) if l != IGNORE]
    assert tok.decode(trained).split() == ["actor", ":", "answer", "7", "</s>"]
    ds = build_dataset([GOOD], tok, ["planner"], max_length=3)   # left-truncation keeps the completion end
    assert len(ds[0]["input_ids"]) == 3


def test_config_reports_every_problem_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.scheme=magic", "lora.rank=0", "train.lr=abc", "nope.x=1",
                           "lora.share_a=[k_proj,w_proj]", "data.roles=[planner,MLP]"])
    msg = str(e.value)
    for part in ("train.scheme", "lora.rank", "train.lr", "nope: unknown key", "w_proj", "MLP"):
        assert part in msg, part
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  lr: 0.01\n  max_steps: 5\n")
    cfg = load_config(cfg_file, ["train.max_steps=7"])
    assert cfg.train.lr == 0.01 and cfg.train.max_steps == 7
