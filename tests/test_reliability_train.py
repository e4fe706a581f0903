"""Issue 10, training side: --overwrite validates first and replaces only our runs, a failed --resume changes
nothing, modes follow the umask, inputs are refused before any work, a full disk at a checkpoint, the run lock,
SIGTERM, and the worker that outlives its launcher. Tiny base, 1-3 steps, no held-out eval."""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lragent.cli.embedded import EMBEDDED
from lragent.train import checkpoint as ckpt_mod
from lragent.train.checkpoint import checkpoint_dir, list_checkpoints
from lragent.train.config import load_config
from lragent.train.rundir import RunLock
from lragent.train.trainer import TrainError, train as train_lib
from test_bundle_helpers import tree

REPO = Path(__file__).resolve().parents[1]


def _cfg(base, out, *extra):
    return load_config(None, [f"model.base={base}", f"output_dir={out}", "data.embedded_train_size=8",
                              "data.eval=null", "train.batch_size=4", "train.log_every=1", "lora.rank=4",
                              "train.max_steps=2", "train.save_every=1", *extra])


def train(cfg, **kw):
    return train_lib(cfg, embedded=EMBEDDED, **kw)


@pytest.fixture(scope="module")
def done_run(tiny_base, tmp_path_factory):
    """A finished 2-step run (checkpoints at 1 and 2)."""
    return train(_cfg(tiny_base, tmp_path_factory.mktemp("r") / "run")).run_dir


@pytest.fixture
def run(done_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(done_run, dst)
    return dst


def _siblings(p: Path) -> list[str]:
    return sorted(x.name for x in p.parent.iterdir())


# -- #2 --overwrite -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [["model.base=/nonexistent/model"], ["data.train=/nonexistent.jsonl"],
                                 ["lora.targets=nope_proj", "lora.share_a="]])
def test_overwrite_validates_everything_before_touching_the_run(run, tiny_base, bad):
    from lragent.train.data import DataError
    before = tree(run)
    with pytest.raises((TrainError, DataError)):
        train(_cfg(tiny_base, run, *bad), overwrite=True)
    assert tree(run) == before and _siblings(run) == ["run"]


def test_overwrite_refuses_a_foreign_run_json(tiny_base, tmp_path):
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "run.json").write_text('{"experiment": "not lragent"}')
    (foreign / "results.csv").write_text("1,2,3")
    before = tree(foreign)
    with pytest.raises(TrainError, match="lragent train did not write: refusing to touch it, even with --overwrite"):
        train(_cfg(tiny_base, foreign), overwrite=True)
    assert tree(foreign) == before


def test_overwrite_replaces_our_run_atomically(run, tiny_base):
    res = train(_cfg(tiny_base, run, "train.max_steps=3", "train.save_every=0"), overwrite=True)
    assert res.run_dir == run and list_checkpoints(run) == [3] and _siblings(run) == ["run"]
    meta = json.loads((run / "run.json").read_text())
    assert meta["format"] == "lragent-run" and meta["base"]["weights_fingerprint"].startswith("w1:")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3           # the old run's rows are gone


@pytest.mark.parametrize("what", ["file", "foreign dir"])
def test_output_dir_that_is_a_file_or_foreign_is_refused(tiny_base, tmp_path, what):
    target = tmp_path / "out"
    if what == "file":
        target.write_text("not a dir")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match="is not a directory|not an lragent run"):
        train(_cfg(tiny_base, target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- #3 --resume ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, keys", [
    (["lora.rank=8"], "lora.rank"),
    (["lora.share_a=v_proj"], "lora.share_a"),
    (["lora.alpha=4", "train.batch_size=2", "train.seed=3"], "lora.alpha, train.batch_size, train.seed"),
])
def test_resume_with_a_changed_key_that_matters_changes_nothing(run, tiny_base, change, keys):
    shutil.rmtree(checkpoint_dir(run, 2))
    before = tree(run)
    with pytest.raises(TrainError, match=rf"config differs from the run's recorded config\.yaml in {keys} "):
        train(_cfg(tiny_base, run, "train.max_steps=3", *change), resume=True)
    assert tree(run) == before


def test_resume_applies_and_records_a_changed_lr(run, tiny_base):
    train(_cfg(tiny_base, run, "train.max_steps=3", "train.lr=0.0123"), resume=True)
    import yaml
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.0123
    state = json.loads((checkpoint_dir(run, 3) / "state.json").read_text())
    assert [g["lr"] for g in state["param_groups"]] == [0.0123, 0.0123]         # used, not just recorded
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["lr"] == 0.0123


def test_resume_with_nothing_left_or_other_base_is_refused(run, tiny_base, tmp_path):
    before = tree(run)
    with pytest.raises(TrainError, match=r"last checkpoint is step 2 and train\.max_steps is 2"):
        train(_cfg(tiny_base, run), resume=True)
    from support.models import make_random_base
    twin = make_random_base(tmp_path / "twin", "gqa16", seed=5)
    with pytest.raises(TrainError, match="same config.json, different weights"):
        train(_cfg(twin, run, "train.max_steps=3"), resume=True)
    assert tree(run) == before


# -- #4 modes -------------------------------------------------------------------------------------------------

def test_run_and_checkpoints_follow_the_umask(tiny_base, tmp_path):
    old = os.umask(0o002)
    try:
        run = train(_cfg(tiny_base, tmp_path / "run", "train.max_steps=1")).run_dir
    finally:
        os.umask(old)
    for p in [run, *run.rglob("*")]:
        want = 0o775 if p.is_dir() else 0o664
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


# -- #10 inputs refused before any work ----------------------------------------------------------------------

def _no_tokenizer(tiny_base, tmp_path):
    b = tmp_path / "notok"
    b.mkdir()
    for f in tiny_base.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, b / f.name)
    return b


@pytest.mark.parametrize("case", ["no tokenizer", "anchor role", "targets", "jsonl utf8", "truncated base"])
def test_bad_inputs_fail_before_anything_is_written(case, tiny_base, tmp_path):
    extra, pattern, base = [], None, tiny_base
    if case == "no tokenizer":
        base, pattern = _no_tokenizer(tiny_base, tmp_path), "has no usable tokenizer"
    elif case == "anchor role":
        extra, pattern = ["train.scheme=sequential", "train.anchor_role=boss"], "anchor_role 'boss' is not one of"
    elif case == "targets":
        extra, pattern = ["lora.targets=q_proj,qkv_proj", "lora.share_a=q_proj"], r"\['qkv_proj'\] name no Linear"
    elif case == "jsonl utf8":
        data = tmp_path / "d.jsonl"
        data.write_bytes(b'{"role": "a", "prompt": "x", "completion": "y"}\n{"role": "a", "prompt": "\xff"}\n')
        extra, pattern = [f"data.train={data}"], r"d\.jsonl:2: not UTF-8"
    else:
        base = tmp_path / "trunc"
        shutil.copytree(tiny_base, base)
        w = base / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-100])
        pattern = "damaged or truncated"
    with pytest.raises(TrainError, match=pattern) as e:
        train(_cfg(base, tmp_path / "out" / "run", *extra))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_earlier_ones(tiny_base, tmp_path, monkeypatch):
    real, calls = ckpt_mod.save_file, {"n": 0}

    def full(tensors, filename):
        calls["n"] += 1
        if calls["n"] > 2:                          # step 1 (adapter + optimizer) succeeds, step 2 hits ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        real(tensors, filename)

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with pytest.raises(TrainError, match=r"cannot write checkpoint .*step-000002: No space left on device") as e:
        train(_cfg(tiny_base, tmp_path / "run"))
    assert "\n" not in str(e.value)
    run = tmp_path / "run"
    assert list_checkpoints(run) == [1] and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]


# -- #11 lock, SIGTERM, orphaned worker -------------------------------------------------------------------------

def test_second_writer_of_one_run_dir_is_refused(run, tiny_base):
    lock = RunLock(run)
    try:
        before = tree(run)
        for kw in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(TrainError, match=r"is being written by another lragent process \(pid \d+\)"):
                train(_cfg(tiny_base, run, "train.max_steps=3"), **kw)
        assert tree(run) == before
    finally:
        lock.release()


def test_sigterm_during_training_exits_cleanly(tiny_base, tmp_path, monkeypatch, capsys):
    import signal
    from lragent.cli import main
    from lragent.train import trainer

    real = trainer.save_checkpoint

    def save_then_term(run_dir, step, *a):
        out = real(run_dir, step, *a)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_term)
    run = tmp_path / "run"
    rc = main(["train", f"model.base={tiny_base}", f"output_dir={run}", "data.embedded_train_size=8", "data.eval=null",
               "train.batch_size=4", "lora.rank=4", "train.max_steps=3", "train.save_every=1"])
    err = capsys.readouterr().err
    assert rc == 143 and [line for line in err.splitlines() if line.startswith("error:")] == \
        [line for line in err.splitlines() if "terminated (SIGTERM)" in line]
    assert list_checkpoints(run) == [1]
    RunLock(run).release()                                            # the lock was released
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_worker_exits_when_its_launcher_dies(tmp_path):
    pid_file = tmp_path / "pid"
    child = (f"import os, time, sys; sys.path.insert(0, {str(REPO)!r}); from lragent.train.rundir import "
             f"watch_parent; watch_parent(0.1); open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    launcher = (f"import subprocess, sys, time, os; subprocess.Popen([sys.executable, '-c', {child!r}]); "
                f"[time.sleep(0.1) for _ in range(600) if not os.path.exists({str(pid_file)!r})]")
    env = dict(os.environ, LOCAL_RANK="0")
    subprocess.run([sys.executable, "-c", launcher], env=env, check=True, timeout=60)   # the launcher exits at once
    deadline = time.time() + 60
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    while time.time() < deadline and Path(f"/proc/{pid}").exists() and \
            "zombie" not in Path(f"/proc/{pid}/status").read_text().lower():
        time.sleep(0.1)
    alive = Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    if alive:
        os.kill(pid, 9)
    assert not alive, "the orphaned worker kept running"


def test_resume_with_other_roles_in_the_data_changes_nothing(run, tiny_base):
    record = json.dumps({"role": "critic", "prompt": "a", "completion": " b"}) + "\n"
    (run / "data" / "train.jsonl").write_text(record)                       # the data changed under the run
    before = tree(run)
    with pytest.raises(TrainError, match=r"--resume: the roles differ from the run's run\.json"):
        train(_cfg(tiny_base, run, "train.max_steps=3"), resume=True)
    assert tree(run) == before


@pytest.mark.parametrize("override, pattern", [
    ("train.log_every=0", r"train\.log_every: must be >= 1, got 0"),
    ("train.eval_batch_size=0", r"train\.eval_batch_size: must be >= 1, got 0"),
    ("lora.alpha=-16", r"lora\.alpha: must be > 0, got -16"),
    ("lora.alpha=0", r"lora\.alpha: must be > 0, got 0"),
    ("train.lr=.nan", r"train\.lr: must be a finite number"),
    ("train.seed=99999999999999", r"train\.seed: must be <= 4294967295"),
    ("train.max_steps=true", r"train\.max_steps: expected int, got True"),
    ("data.roles=[planner,actor]", None),
])
def test_config_ranges_are_checked_up_front(override, pattern):
    from lragent.train.config import ConfigError
    extra = [override, "train.anchor_role=boss"] if pattern is None else [override]
    with pytest.raises(ConfigError, match=pattern or r"train\.anchor_role: 'boss' is not one of data\.roles"):
        load_config(None, extra)


def test_stale_checkpoint_temp_dirs_are_cleaned(tiny_base, tmp_path):
    from lragent.bundle import fsutil
    ck = tmp_path / "run" / "checkpoints"
    stale = ck / ".step-000001.tmp-abcdefgh"
    stale.mkdir(parents=True)
    p = subprocess.Popen(["true"])
    p.wait()
    (stale / fsutil.MARKER).write_text(json.dumps({"host": os.uname().nodename, "pid": p.pid}))
    (stale / "adapter.safetensors").write_bytes(b"half")
    import torch
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt_mod.save_checkpoint(tmp_path / "run", 2, {"x": torch.zeros(2)}, opt, sched)
    assert sorted(x.name for x in ck.iterdir()) == ["step-000002"]
