"""Training loop: runs end to end, resumes exactly, DDP keeps the shared A identical across ranks."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lragent.train.checkpoint import checkpoint_dir, list_checkpoints
from lragent.train.config import load_config
from lragent.train.trainer import TrainError, train as train_lib
from lragent.cli.embedded import EMBEDDED


def train(cfg, **kw):
    """The trainer with the embedded default resolved, as the command line does."""
    return train_lib(cfg, embedded=EMBEDDED, **kw)

REPO = Path(__file__).resolve().parents[1]


def _cfg(base, out, *extra):
    return load_config(None, [f"model.base={base}", f"output_dir={out}", "data.embedded_train_size=24",
                              "data.embedded_eval_size=4", "train.batch_size=4", "train.log_every=1",
                              "lora.rank=4", *extra])


def test_joint_training_writes_a_run_and_lowers_loss(tiny_base, tmp_path):
    res = train(_cfg(tiny_base, tmp_path / "run", "train.max_steps=8", "train.lr=5e-3"))
    run = res.run_dir
    for f in ("run.json", "config.yaml", "metrics.jsonl", "eval.json", "data/train.jsonl"):
        assert (run / f).is_file(), f
    assert list_checkpoints(run) == [8]
    ck = checkpoint_dir(run, 8)
    assert sorted(p.name for p in ck.iterdir()) == ["adapter.safetensors", "optimizer.safetensors", "state.json"]
    assert not list(run.rglob("*.bin")) and not list(run.rglob("*.pt"))
    tensors = load_file(str(ck / "adapter.safetensors"))
    assert "model.layers.0.self_attn.v_proj.lora_A" in tensors            # shared A: one tensor
    assert "model.layers.0.self_attn.q_proj.lora_A.actor" in tensors       # per-role A elsewhere
    assert all(tensors[f"model.layers.1.self_attn.v_proj.lora_B.{r}"].abs().sum() > 0 for r in res.roles)
    for role in res.roles:   # training reduced held-out loss below the base model's
        assert res.eval["adapted"][role]["loss"] < res.eval["base"][role]["loss"]


def test_existing_run_is_not_overwritten(tiny_base, tmp_path):
    train(_cfg(tiny_base, tmp_path / "run", "train.max_steps=1", "data.eval=null"))
    with pytest.raises(TrainError, match="already holds a run"):
        train(_cfg(tiny_base, tmp_path / "run", "train.max_steps=1", "data.eval=null"))


@pytest.mark.parametrize("scheme", ["joint", "sequential"])
def test_resume_is_exact(tiny_base, tmp_path, scheme):
    """3 steps, a crash (only the step-3 checkpoint survives), resume 3 steps == 6 uninterrupted steps."""
    extra = ["train.max_steps=6", "train.save_every=3", "lora.dropout=0.1", "train.schedule=cosine",
             "train.warmup_steps=2", "data.eval=null", f"train.scheme={scheme}", "train.loraplus_ratio=4"]
    full = train(_cfg(tiny_base, tmp_path / "full", *extra)).run_dir
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(checkpoint_dir(crashed, 6))   # what a kill between step 3 and step 6 leaves behind
    (crashed / "run.json").write_text((full / "run.json").read_text())
    res = train(_cfg(tiny_base, crashed, *extra), resume=True)
    assert list_checkpoints(res.run_dir) == [3, 6]
    for name in ("adapter.safetensors", "optimizer.safetensors"):
        want = load_file(str(checkpoint_dir(full, 6) / name))
        got = load_file(str(checkpoint_dir(crashed, 6) / name))
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(want[k], got[k]), f"{name}:{k} differs after resume"


def test_sequential_freezes_shared_a_after_the_anchor(tiny_base, tmp_path):
    extra = ["train.max_steps=4", "train.save_every=2", "train.scheme=sequential", "train.anchor_fraction=0.5",
             "data.eval=null", "train.anchor_role=actor"]
    run = train(_cfg(tiny_base, tmp_path / "run", *extra)).run_dir
    at2, at4 = (load_file(str(checkpoint_dir(run, s) / "adapter.safetensors")) for s in (2, 4))
    shared = [k for k in at2 if k.endswith("k_proj.lora_A") or k.endswith("v_proj.lora_A")]
    assert shared and all(torch.equal(at2[k], at4[k]) for k in shared)          # frozen in phase 2
    assert all(torch.equal(at2[k], at4[k]) for k in at2 if k.endswith(".actor"))  # the anchor is done
    assert any(not torch.equal(at2[k], at4[k]) for k in at2 if k.endswith(".planner"))  # others train
    assert all(at2[k].abs().sum() == 0 for k in at2 if k.endswith("lora_B.planner"))  # untouched in phase 1


@pytest.mark.slow
def test_ddp_two_processes_keep_shared_a_identical(tiny_base, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with socket.socket() as s:   # a free port, so that concurrent runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(REPO / "tests" / "scripts" / "ddp_train.py"), str(tiny_base), str(tmp_path / "run")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "shared A identical across 2 ranks" in out.stdout
