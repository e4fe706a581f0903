"""The serve commands (generate, run, chat) and their one-line errors; trajectory files."""
import json
from pathlib import Path

import pytest

from lragent.serve.cli import main
from lragent.serve.config import ServeError
from lragent.serve.engine import Engine
from support.bundles import write_random_bundle
from lragent.serve.trajectory import TrajectoryError, load_trajectory
from support.models import make_random_base

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "trajectories"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    base = make_random_base(d / "base", "gqa16", seed=13)
    roles = ("planner", "actor", "reflector")
    return {"base": base,
            "bundle": write_random_bundle(base, d / "bundle", roles=roles, rank=4, seed=14),
            "perrole": write_random_bundle(base, d / "perrole", roles=roles, rank=4, share_a=(), seed=15)}


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_json(paths, capsys):
    rc, out, err = run_cli(capsys, "generate", "--bundle", paths["bundle"], "--role", "actor", "--prompt",
                           "find the value of k7 .", "--max-new-tokens", "3", "--ignore-eos", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["role"] == "actor" and doc["mode"] == "lrshared" and len(doc["token_ids"]) == 3
    assert doc["stats"]["prompt_tokens"] > 0 and "ttft_s" in doc["stats"]
    assert {"base_bytes", "lowrank_bytes", "free_bytes"} <= set(doc["engine"])


def test_run_all_modes_table(paths, capsys):
    traj = EXAMPLES / "toy_lookup_3_rounds.json"
    rc, out, err = run_cli(capsys, "run", "--bundle", paths["bundle"], "--trajectory", traj, "--mode", "all")
    assert rc == 0, err
    assert "modes side by side" in out
    summary = out.split("vs nonshared")[-1]
    for mode in ("nonshared", "fullshared", "baseshared", "lrshared"):
        assert f"\n{mode} " in summary
    rows = {line.split()[0]: line.split() for line in summary.splitlines()[2:] if line.strip()}
    # hand-off TTFT against fullshared, taken from the unrounded times (the table shows ms to 0.1)
    lr_ms, full_ms, printed = float(rows["lrshared"][3]), float(rows["fullshared"][3]), rows["lrshared"][4]
    lo, hi = (lr_ms - 0.05) / (full_ms + 0.05), (lr_ms + 0.05) / max(full_ms - 0.05, 1e-9)   # ms shown to 0.1
    assert printed.endswith("x") and lo - 0.006 <= float(printed[:-1]) <= hi + 0.006
    # cache bytes against nonshared, from the printed totals ("504.0 KiB"; the exact analytic ratio is checked
    # to the byte in test_serve_sharing)
    unit = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}
    total = {m: float(rows[m][-4]) * unit[rows[m][-3]] for m in rows}
    for m in ("lrshared", "fullshared", "baseshared"):
        assert abs(float(rows[m][-2][:-1]) - total[m] / total["nonshared"]) <= 0.006
    assert total["lrshared"] < total["baseshared"] < total["nonshared"]
    rc, out, err = run_cli(capsys, "run", "--bundle", paths["bundle"], "--trajectory", traj, "--mode", "all",
                           "--json", "--no-warmup", "--repeat", "2")
    doc = json.loads(out)
    turns = {m: v["turns"] for m, v in doc["modes"].items()}
    hand = [i for i, t in enumerate(turns["lrshared"]) if t["handoff"]]
    assert hand
    for i in hand:   # hand-offs: lrshared and fullshared prefill only the few new tokens
        for m in ("lrshared", "fullshared"):
            assert turns[m][i]["prefilled_tokens"] < turns[m][i]["prompt_tokens"] / 4
            assert turns[m][i]["prefilled_tokens"] <= turns["nonshared"][i]["prefilled_tokens"]
    for i in (1, 2):   # nonshared: actor and reflector never saw the context of round 1: all of it
        assert turns["nonshared"][i]["prefilled_tokens"] == turns["nonshared"][i]["prompt_tokens"]
    s = {m: v["summary"] for m, v in doc["modes"].items()}
    assert s["lrshared"]["cache_total_bytes"] < 0.6 * s["nonshared"]["cache_total_bytes"]


def test_run_skips_lrshared_for_per_role_a(paths, capsys):
    traj = EXAMPLES / "toy_lookup_3_rounds.json"
    rc, out, err = run_cli(capsys, "run", "--bundle", paths["perrole"], "--trajectory", traj, "--mode", "all",
                           "--max-new-tokens", "2", "--no-warmup")
    assert rc == 0, err
    assert "lrshared: skipped (mode lrshared needs shared A" in out


def test_chat(paths, capsys, monkeypatch):
    lines = iter(["find the value of k7 .", "/role actor", "/go", "/role nobody", "/tool db : k7 = 18 ;", "/go",
                  "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    rc, out, err = run_cli(capsys, "chat", "--bundle", paths["bundle"], "--max-new-tokens", "2")
    assert rc == 0, err
    assert out.count("planner : ") == 1 and out.count("actor : ") == 2
    assert "unknown role 'nobody'" in err
    assert "reused" in err


@pytest.mark.parametrize("argv,message", [
    (["generate", "--role", "bogus", "--prompt", "x"], "unknown role 'bogus'"),
    (["generate", "--role", "actor", "--prompt", "x", "--mode", "weird"], "unknown mode 'weird'"),
    (["generate", "--prompt", "find k7", "--max-new-tokens", "64", "--cache-tokens", "16"], "request needs"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "temperature must be"),
    (["generate", "--prompt", "x", "--base", "/nonexistent"], "no config.json"),
])
def test_errors_are_one_line(paths, capsys, argv, message):
    rc, out, err = run_cli(capsys, *argv[:1], "--bundle", paths["bundle"], *argv[1:])
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_lrshared_refused_without_shared_a(paths, capsys):
    rc, _, err = run_cli(capsys, "generate", "--bundle", paths["perrole"], "--prompt", "x", "--mode", "lrshared")
    assert rc == 2 and "mode lrshared needs shared A on every cached target" in err


def test_missing_bundle(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "generate", "--bundle", tmp_path / "nope", "--prompt", "x")
    assert rc == 2 and "is not a directory" in err and err.count("\n") == 1


def test_qwen3_k_lora_refused_in_shared_modes(tmp_path):
    base = make_random_base(tmp_path / "q3", "gqa16", seed=16, model_type="qwen3")
    kv = write_random_bundle(base, tmp_path / "kv", roles=("planner",), rank=4, targets=("k_proj", "v_proj"))
    for mode in ("lrshared", "baseshared"):
        with pytest.raises(ServeError, match="cannot serve K-LoRA on qwen3"):
            Engine(kv, mode=mode)
    assert Engine(kv).mode == "nonshared"
    assert Engine(kv, mode="fullshared").mode == "fullshared"
    v = write_random_bundle(base, tmp_path / "v", roles=("planner",), rank=4, targets=("v_proj",),
                            share_a=("v_proj",))
    assert Engine(v).mode == "lrshared"


def test_engine_request_errors(paths):
    eng = Engine(paths["bundle"])
    with pytest.raises(ServeError, match="empty prompt"):
        eng.add_request([], "actor")
    with pytest.raises(ServeError, match="outside the vocabulary"):
        eng.add_request([10 ** 6], "actor")
    with pytest.raises(ServeError, match="max_new_tokens"):
        eng.add_request([1, 2], "actor", max_new_tokens=0)


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ("[]", "top level must be an object"),
    ('{"turns": []}', "'turns' must be a non-empty list"),
    ('{"turns": [{"content": "x"}]}', "turn 1: 'role' must be a non-empty string"),
    ('{"turns": [{"role": "user", "content": "x"}]}', "no turn to generate"),
    ('{"turns": [{"role": "planner", "max_tokens": 3}]}', "turn 1: unknown key 'max_tokens'"),
    ('{"turns": [{"role": "planner", "temperature": -2}]}', "turn 1: temperature must be >= 0"),
    ('{"turns": [{"role": "planner"}], "extra": 1}', "unknown key 'extra'"),
    ('{"turns": [{"role": "planner", "stop": 3}]}', "'stop' must be a string or a list"),
])
def test_malformed_trajectories(tmp_path, content, message):
    f = tmp_path / "t.json"
    f.write_text(content)
    with pytest.raises(TrajectoryError) as e:
        load_trajectory(f)
    assert str(f) in str(e.value) and message in str(e.value)


def test_trajectory_role_without_adapter(paths, capsys, tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"turns": [{"role": "user", "content": "find k7"}, {"role": "critic"}]}))
    rc, _, err = run_cli(capsys, "run", "--bundle", paths["bundle"], "--trajectory", f)
    assert rc == 2 and "turn 2: role 'critic' has no adapter in the bundle" in err and str(f) in err


def test_shipped_trajectories_load():
    files = sorted(EXAMPLES.glob("*.json"))
    assert files
    for f in files:
        t = load_trajectory(f)
        gen = [x.role for x in t.turns if x.content is None]
        assert {"planner", "actor", "reflector"} <= set(gen)


def test_generate_without_a_chat_template_falls_back_to_the_raw_prompt(paths, capsys, tmp_path):
    import json as _json
    import shutil
    base = tmp_path / "plain-base"
    shutil.copytree(paths["base"], base)
    cfg = base / "tokenizer_config.json"
    doc = _json.loads(cfg.read_text())
    doc.pop("chat_template", None)
    cfg.write_text(_json.dumps(doc))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    rc, out, err = run_cli(capsys, "generate", "--bundle", paths["bundle"], "--base", base, "--role", "actor",
                           "--prompt", "find the value of k7 .", "--max-new-tokens", "2", "--ignore-eos", "--json",
                           "--no-warmup")
    assert rc == 0, err
    assert "no chat template" in err and "raw text" in err
    doc = _json.loads(out)
    assert doc["stats"]["prompt_tokens"] == 6 and len(doc["token_ids"]) == 2     # the 6 words, no template
