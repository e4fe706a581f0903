"""Issue 10, serve command line: long sessions keep their work (run names file and turn and prints the completed
turns; chat drops the oldest turns and goes on), chat --json keeps stdout JSON-only, chat line editing, bad serve
inputs give one ``error:`` line and exit 2, and the README's --attention values match --help."""
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lragent.cli import main
from lragent.serve import cli as serve_cli
from lragent.serve.chat import enable_line_editing
from lragent.serve.config import ATTENTION_BACKENDS, ServeError
from lragent.serve.trajectory import Trajectory, Turn, TurnFailed, replay
from support.bundles import write_random_bundle
from support.models import make_random_base

README = Path(__file__).resolve().parents[1] / "README.md"
CONTEXT = 512                    # max_position_embeddings of the tiny "gqa16" base


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("servecli")
    base = make_random_base(d / "base", "gqa16", seed=23)
    assert json.loads((base / "config.json").read_text())["max_position_embeddings"] == CONTEXT
    notok = d / "notok"
    notok.mkdir()
    for f in base.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, notok / f.name)
    trunc = d / "trunc"
    shutil.copytree(base, trunc)
    weights = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return {"base": base, "notok": notok, "trunc": trunc, "dir": d,
            "bundle": write_random_bundle(base, d / "bundle", roles=("planner", "actor"), rank=4, seed=24)}


@pytest.fixture(autouse=True)
def debug(monkeypatch):
    monkeypatch.setenv("LRAGENT_DEBUG", "1")          # an unexpected exception fails the test (no generic line)


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def long_trajectory(path: Path, rounds: int = 7, new_tokens: int = 40) -> Path:
    """planner / actor hand-offs of ``new_tokens`` each (EOS ignored): outgrows the 512-token context."""
    turns = [{"role": "user", "content": "find the value of k7 ."}]
    turns += [{"role": r} for r in ("planner", "actor") * rounds]
    path.write_text(json.dumps({"name": "long", "defaults": {"max_new_tokens": new_tokens, "ignore_eos": True},
                                "turns": turns}))
    return path


# -- #5 long sessions ------------------------------------------------------------------------------------------
def test_run_past_the_context_names_file_and_turn_and_prints_completed_turns(paths, capsys, tmp_path):
    traj = long_trajectory(tmp_path / "long.json")
    rc, out, err = cli(capsys, "run", "--bundle", paths["bundle"], "--trajectory", traj, "--no-warmup")
    assert rc == 2
    line = one_error(err)
    m = re.match(rf"error: {re.escape(str(traj))}: turn (\d+) \((planner|actor)\): prompt \((\d+) tokens\) \+ "
                 rf"max_new_tokens \(40\) exceeds the model's context of {CONTEXT} positions", line)
    assert m, line
    failed, prompt = int(m.group(1)), int(m.group(3))
    assert prompt + 40 > CONTEXT
    rows = [ln.replace(" * ", " ").split() for ln in out.splitlines() if re.match(r"\s+\d+\s+(planner|actor)", ln)]
    assert [int(r[0]) for r in rows] == list(range(2, failed))           # every completed turn, in order
    assert all(int(r[2]) + 40 <= CONTEXT for r in rows)
    assert f"stopped at turn {failed}" in out and "completed turns are printed above" in line


def test_run_json_past_the_cache_pool_keeps_completed_turns(paths, capsys, tmp_path):
    traj = long_trajectory(tmp_path / "long.json", rounds=3)
    rc, out, err = cli(capsys, "run", "--bundle", paths["bundle"], "--trajectory", traj, "--no-warmup", "--json",
                       "--cache-tokens", "200")
    assert rc == 2
    line = one_error(err)
    doc = json.loads(out)
    mode = doc["modes"]["lrshared"]
    turns = mode["turns"]
    assert len(turns) >= 2 and [t["turn"] for t in turns] == list(range(2, 2 + len(turns)))
    assert all(t["generated_tokens"] == 40 and t["text"] for t in turns)
    assert mode["summary"]["turns"] == len(turns)
    assert doc["error"] == mode["error"] and doc["error"] in line
    assert doc["error"].startswith(f"{traj}: turn {2 + len(turns)} (") and "pool holds" in doc["error"]


def test_run_flag_error_is_the_flags_not_a_turns(paths, capsys, tmp_path):
    traj = long_trajectory(tmp_path / "t.json", rounds=1)
    rc, out, err = cli(capsys, "run", "--bundle", paths["bundle"], "--trajectory", traj, "--max-new-tokens", "0")
    assert rc == 2 and out == ""
    assert one_error(err) == "error: max_new_tokens must be a positive integer, got 0"


class Out:
    """A completion as run_trajectory reads it."""

    def __init__(self, n):
        self.text = f"out{n}"
        self.stats = type("S", (), dict(prompt_tokens=n, prefilled_tokens=n, reused_tokens=0, ttft_s=0.001,
                                        decode_tok_s=1.0, generated_tokens=1))()


class FakeEngine:
    """Enough of Engine for run_trajectory; the ``fail_at``-th generate call of a replay raises ``error``."""

    roles = ["planner", "actor"]

    def __init__(self, fail_at=None, error=None):
        self.calls, self.fail_at, self.error = 0, fail_at, error

    def clear_cache(self):
        self.calls = 0

    def render(self, messages, role):
        return [1] * (len(messages) + 1)

    def generate(self, ids, role, params):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return Out(len(ids))

    def stats(self):
        return {f"{k}_bytes": 0 for k in ("base", "lowrank", "total", "free")}


def _traj():
    return Trajectory([Turn("user", "x")] + [Turn(r) for r in ("planner", "actor") * 2], path=Path("t.json"))


def test_replay_one_mode_stops_the_others_go_on():
    engines = {"nonshared": FakeEngine(fail_at=3, error=ServeError("too long")), "lrshared": FakeEngine()}
    rep = replay(engines, _traj(), repeat=2)
    assert not rep.interrupted
    assert [r.turn for r in rep.turns["nonshared"]] == [2, 3]
    assert [r.turn for r in rep.turns["lrshared"]] == [2, 3, 4, 5]
    e = rep.errors["nonshared"]
    assert isinstance(e, TurnFailed) and str(e) == "t.json: turn 4 (planner): too long" and "lrshared" not in rep.errors


def test_replay_ctrl_c_keeps_completed_turns_and_exits_130(capsys):
    rep = replay({"lrshared": FakeEngine(fail_at=2, error=KeyboardInterrupt())}, _traj())
    assert rep.interrupted and [r.turn for r in rep.turns["lrshared"]] == [2]
    assert serve_cli.run_exit(rep, json_mode=False) == 130
    assert one_error(capsys.readouterr().err) == "error: interrupted; the completed turns are printed above"


def chat(capsys, monkeypatch, paths, lines, *flags):
    """Run ``lragent chat`` on scripted input; ``input`` writes its prompt to stdout, as the real one does."""
    feed = iter(lines)

    def fake_input(prompt=""):
        sys.stdout.write(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr("builtins.input", fake_input)
    return cli(capsys, "chat", "--bundle", paths["bundle"], "--no-warmup", *flags)


def test_chat_at_the_context_limit_drops_oldest_turns_and_goes_on(paths, capsys, monkeypatch):
    msgs = [f"find the value of k{i} . " * 4 for i in range(9)]
    rc, out, err = chat(capsys, monkeypatch, paths, msgs + ["/quit"], "--max-new-tokens", "40", "--ignore-eos")
    assert rc == 0 and "error:" not in err, err
    assert out.count("planner : ") == len(msgs)                     # every message was answered
    dropped = [int(n) for n in re.findall(r"dropped the (\d+) oldest of \d+ messages", err)]
    assert dropped and all(n >= 1 for n in dropped)


def test_chat_message_too_long_alone_is_removed_and_chat_goes_on(paths, capsys, monkeypatch):
    rc, out, err = chat(capsys, monkeypatch, paths, ["k7 " * 600, "find the value of k7 ."], "--max-new-tokens", "2")
    assert rc == 0
    assert "exceeds the model's context" in err and "your last message was removed" in err
    assert out.count("planner : ") == 1


def test_chat_line_not_utf8_is_ignored_and_chat_goes_on(paths, capsys, monkeypatch):
    rc, out, err = chat(capsys, monkeypatch, paths, ["x \udcff", "find the value of k7 ."], "--max-new-tokens", "2")
    assert rc == 0 and "error: that line is not valid UTF-8 text" in err
    assert out.count("planner : ") == 1


def test_chat_max_new_tokens_beyond_context_refused_at_start(paths, capsys, monkeypatch):
    rc, out, err = chat(capsys, monkeypatch, paths, ["hi"], "--max-new-tokens", str(CONTEXT))
    assert rc == 2 and "exceeds the model's context" in one_error(err)


# -- #13 chat --json, line editing ----------------------------------------------------------------------------
def test_chat_json_stdout_is_only_json(paths, capsys, monkeypatch):
    rc, out, err = chat(capsys, monkeypatch, paths, ["find the value of k7 .", "/role nobody", "/help", "/role actor",
                                                     "/go", "/stats"], "--max-new-tokens", "2", "--json")
    assert rc == 0, err
    docs = [json.loads(ln) for ln in out.splitlines()]
    assert [d["role"] for d in docs] == ["planner", "actor"] and all("dropped_messages" in d for d in docs)
    assert "planner> " in err and "actor> " in err and "unknown role 'nobody'" in err and "/reset" in err


def test_chat_text_mode_prompts_on_stdout(paths, capsys, monkeypatch):
    rc, out, err = chat(capsys, monkeypatch, paths, ["find the value of k7 ."], "--max-new-tokens", "2")
    assert rc == 0 and out.startswith("planner> ") and "planner : " in out, err


def test_line_editing(monkeypatch, paths, capsys):
    assert enable_line_editing() is True                    # readline ships with this Python
    monkeypatch.setitem(sys.modules, "readline", None)      # as where it is missing: import raises ImportError
    assert enable_line_editing() is False
    called = []
    monkeypatch.setattr(serve_cli, "enable_line_editing", lambda: called.append(1) or True)
    rc, _, _ = chat(capsys, monkeypatch, paths, [])
    assert rc == 0 and called == [1]


# -- #10 bad serve inputs: one line, exit 2 ---------------------------------------------------------------------
def _traj_file(d: Path, name: str, doc) -> Path:
    f = d / f"{name}.json"
    f.write_text(json.dumps(doc))
    return f


TRAJ_CASES = {
    "max-new-tokens-true": ({"turns": [{"role": "user", "content": "x"}, {"role": "planner", "max_new_tokens": True}]},
                            "turn 2: max_new_tokens must be a positive integer, got True"),
    "float-token-ids": ({"turns": [{"role": "user", "content": [1.0, 2.5]}, {"role": "planner"}]},
                        "turn 1: 'content' must be a string"),
    "no-role": ({"turns": [{"content": "x"}, {"role": "planner"}]}, "turn 1: 'role' must be a non-empty string"),
    "lone-surrogate": ({"turns": [{"role": "user", "content": "x \ud800"}, {"role": "planner"}]},
                       "turn 1: 'content' is not valid UTF-8 text"),
}


@pytest.mark.parametrize("name", list(TRAJ_CASES))
def test_bad_trajectory_one_line(paths, capsys, name):
    doc, message = TRAJ_CASES[name]
    f = _traj_file(paths["dir"], name, doc)
    rc, out, err = cli(capsys, "run", "--bundle", paths["bundle"], "--trajectory", f, "--no-warmup")
    assert rc == 2 and out == ""
    line = one_error(err)
    assert str(f) in line and message in line, line


@pytest.mark.parametrize("flags,message", [
    (["--device", "foo"], "device 'foo' is not a device"),
    (["--temperature", "nan"], "temperature must be a finite number, got nan"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--seed", str(2 ** 63)], "seed must be an integer in [0, 2^63)"),
    (["--seed", "-1"], "seed must be an integer in [0, 2^63)"),
    (["--prompt", "\udcff"], "--prompt is not valid UTF-8 text"),
    (["--cache-tokens", "10000000000"], "lower --cache-tokens"),
    (["--block-size", "0"], "block_size must be a positive integer, got 0"),
    (["--max-batch-tokens", "0"], "max_batch_tokens must be a positive integer, got 0"),
    (["--base", "NOTOK"], "has no tokenizer files"),
    (["--base", "TRUNC"], "model.safetensors is not a readable safetensors file"),
])
def test_bad_generate_input_one_line(paths, capsys, flags, message):
    flags = [str(paths["notok"]) if f == "NOTOK" else str(paths["trunc"]) if f == "TRUNC" else f for f in flags]
    rc, out, err = cli(capsys, "generate", "--bundle", paths["bundle"], "--prompt", "x", "--max-new-tokens", "2",
                       "--no-warmup", *flags)
    assert rc == 2 and out == ""
    line = one_error(err)
    assert message in line and "internal error" not in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_attention_triton_without_cuda(paths, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    v_only = write_random_bundle(paths["base"], tmp_path / "v", roles=("planner",), rank=4, targets=("v_proj",),
                                 share_a=("v_proj",))       # a shape the kernel covers: only the device is wrong
    rc, out, err = cli(capsys, "generate", "--bundle", v_only, "--prompt", "x", "--attention", "triton",
                       "--no-warmup")
    line = one_error(err)
    assert rc == 2 and out == "" and "needs a CUDA device" in line and "--attention torch" in line, line


def test_cuda_index_beyond_the_machine_is_refused(monkeypatch):
    from lragent.serve.config import ServeConfig
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)       # as on a one-GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ServeError, match=r"device 'cuda:7': this machine has 1 CUDA device\(s\) \(cuda:0 .. cuda:0\)"):
        ServeConfig(device="cuda:7")
    assert ServeConfig(device="cuda:0").torch_device() == torch.device("cuda:0")


# -- #13 README -------------------------------------------------------------------------------------------------
def test_readme_attention_values_match_help(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert " | ".join(ATTENTION_BACKENDS) in help_text
    found = re.findall(r"--attention\s+`?([a-z|]+)`?", " ".join(README.read_text().split()))
    assert found and all(v.split("|") == list(ATTENTION_BACKENDS) for v in found), found
