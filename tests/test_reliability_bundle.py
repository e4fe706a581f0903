"""Issue 10, bundle side: modes follow the umask, export races, readers during --force, base weights fingerprint,
non-finite tensors, typed manifests, peft/ copies, links, leftovers, full disk. Tiny synthetic bundles; no PEFT run
except where the command itself is the subject."""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from lragent.bundle import (BundleError, base_info, check_base, fsutil, load_bundle, sha256_file, validate_role_name,
                            weights_fingerprint, write_bundle)
from lragent.bundle import load as bundle_load
from lragent.bundle import write as bundle_write
from test_bundle import synth_bundle
from test_bundle_helpers import tree


@pytest.fixture
def path(tmp_path):
    return write_bundle(synth_bundle(), tmp_path / "out" / "bundle")


def _relist(p, rel):
    m = json.loads((p / "manifest.json").read_text())
    m["files"][rel] = sha256_file(p / rel)
    (p / "manifest.json").write_text(json.dumps(m))


def _edit_manifest(p, fn):
    m = json.loads((p / "manifest.json").read_text())
    fn(m)
    (p / "manifest.json").write_text(json.dumps(m))


def _edit_tensors(p, rel, fn):
    t = load_file(str(p / rel))
    save_file(fn(t), str(p / rel))
    _relist(p, rel)


def _modes(root):
    return {(p.relative_to(root).as_posix(), "d" if p.is_dir() else "f"): stat.S_IMODE(p.stat().st_mode)
            for p in [root, *root.rglob("*")]}


# -- #4: modes follow the umask -----------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_written_bundle_follows_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        out = write_bundle(synth_bundle(), tmp_path / "b")
    finally:
        os.umask(old)
    modes = _modes(out)
    assert modes[(".", "d")] == 0o777 & ~mask
    assert all(m == (0o777 if k[1] == "d" else 0o666) & ~mask for k, m in modes.items()), modes


# -- #6: races at the exchange -------------------------------------------------------------------------------

def test_dir_appearing_during_verify_is_not_replaced_without_force(tmp_path):
    out = tmp_path / "b"

    def someone_else(tmp):
        out.mkdir()
        (out / "theirs.txt").write_text("mine")

    with pytest.raises(BundleError, match="appeared while the bundle was being written"):
        write_bundle(synth_bundle(), out, verify=someone_else)
    assert tree(out) == {"theirs.txt": b"mine"} and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_foreign_dir_swapped_in_during_verify_survives_force(path):
    def swap_in_foreign(tmp):
        shutil.rmtree(path)
        path.mkdir()
        (path / "thesis.txt").write_text("years of work")

    with pytest.raises(BundleError, match="not an lragent bundle"):
        write_bundle(synth_bundle(seed=3), path, force=True, verify=swap_in_foreign)
    assert tree(path) == {"thesis.txt": b"years of work"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["bundle"]


def test_two_exports_without_force_only_one_succeeds(tmp_path):
    out, results = tmp_path / "b", []

    def second_export_finishes_first(tmp):
        write_bundle(synth_bundle(seed=9, roles=("critic",)), out)
        results.append("second ok")

    with pytest.raises(BundleError, match="appeared while the bundle was being written"):
        write_bundle(synth_bundle(seed=1), out, verify=second_export_finishes_first)
    assert results == ["second ok"] and load_bundle(out).roles == ["critic"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# -- #7: readers during --force replacement see old or new, never "corrupted" --------------------------------

def _replace_during_read(monkeypatch, path, every_attempt: bool):
    real, state = bundle_load.BundleDir.read, {"reads": 0, "done": 0}

    def read(self, rel):
        state["reads"] += 1
        if rel.startswith("roles/") and (every_attempt or not state["done"]):
            state["done"] += 1
            write_bundle(synth_bundle(seed=10 + state["done"], roles=("planner", "actor")), path, force=True)
        return real(self, rel)

    monkeypatch.setattr(bundle_load.BundleDir, "read", read)
    return state


def test_load_during_force_replacement_returns_the_new_bundle(path, monkeypatch):
    old_hash = load_bundle(path).a_family_hash
    _replace_during_read(monkeypatch, path, every_attempt=False)
    got = load_bundle(path)
    monkeypatch.undo()
    assert got.a_family_hash != old_hash and got.a_family_hash == load_bundle(path).a_family_hash


def test_replaced_on_every_attempt_says_so_not_corrupted(path, monkeypatch):
    _replace_during_read(monkeypatch, path, every_attempt=True)
    with pytest.raises(BundleError, match="was replaced while it was being read") as e:
        load_bundle(path)
    assert "corrupt" not in str(e.value)


def test_concurrent_force_writer_and_readers_never_fail(tmp_path):
    import threading
    out = write_bundle(synth_bundle(seed=0), tmp_path / "b")
    hashes = {synth_bundle(seed=s).a_family_hash for s in (0, 1, 2)}
    stop, failures, seen = threading.Event(), [], set()

    def writer():
        for i in range(12):
            write_bundle(synth_bundle(seed=1 + i % 2), out, force=True)
        stop.set()

    t = threading.Thread(target=writer)
    t.start()
    while not stop.is_set():
        try:
            seen.add(load_bundle(out).a_family_hash)
        except BundleError as e:
            failures.append(str(e))
    t.join()
    assert not failures and seen <= hashes and seen


# -- #8: base weights fingerprint -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def twin_base(tmp_path_factory, tiny_base):
    """Same config.json as tiny_base, other weights."""
    from support.models import make_random_base
    twin = make_random_base(tmp_path_factory.mktemp("twin"), "gqa16", seed=1)
    assert (twin / "config.json").read_bytes() == (tiny_base / "config.json").read_bytes()
    return twin


def test_weights_fingerprint_tells_same_config_bases_apart(tiny_base, twin_base, tmp_path):
    assert weights_fingerprint(tiny_base) != weights_fingerprint(twin_base)
    assert weights_fingerprint(tiny_base) == weights_fingerprint(tiny_base)
    b = synth_bundle(base=base_info(tiny_base))
    out = write_bundle(b, tmp_path / "b")
    assert load_bundle(out, base_dir=tiny_base).base["weights_fingerprint"].startswith("w1:")
    with pytest.raises(BundleError, match="same config.json, different weights"):
        load_bundle(out, base_dir=twin_base)
    with pytest.raises(BundleError, match="same config.json, different weights"):
        check_base(b.base, twin_base)
    legacy = {k: v for k, v in b.base.items() if k != "weights_fingerprint"}   # older manifests: config only
    check_base(legacy, twin_base)


def test_sampled_digest_covers_large_files(tmp_path, monkeypatch):
    from lragent.bundle import basefp
    monkeypatch.setattr(basefp, "FULL_BYTES", 1024)
    monkeypatch.setattr(basefp, "CHUNK", 64)
    d = tmp_path / "m"
    d.mkdir()
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(d / "model.safetensors"))
    first = weights_fingerprint(d)
    save_file({"w": torch.arange(4096, dtype=torch.float32).flip(0)}, str(d / "model.safetensors"))
    assert weights_fingerprint(d) != first


def test_truncated_base_weights_are_refused(tiny_base, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_base, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(BundleError, match=r"model\.safetensors is damaged or truncated"):
        weights_fingerprint(bad)


# -- #9, #10, #12: bad tensors and manifest fields ------------------------------------------------------------

def _nan_b(t):
    k = next(k for k in t if k.endswith("lora_B"))
    t[k][0, 0] = float("nan")
    return t


BAD = {
    "nan B": (lambda p: _edit_tensors(p, "roles/actor.safetensors", _nan_b), r"non-finite values"),
    "string scaling": (lambda p: _edit_manifest(p, lambda m: m["lora"].update(scaling="2.0x")),
                       r"lora\.scaling must be a finite number, got '2\.0x'"),
    "rank 8.9": (lambda p: _edit_manifest(p, lambda m: m["lora"].update(rank=8.9)),
                 r"lora\.rank must be a positive integer, got 8\.9"),
    "rank true": (lambda p: _edit_manifest(p, lambda m: m["lora"].update(rank=True)), r"lora\.rank must be"),
    "alpha -16": (lambda p: _edit_manifest(p, lambda m: m["lora"].update(alpha=-16)), r"lora\.alpha must be .*> 0"),
    "alpha 0": (lambda p: _edit_manifest(p, lambda m: m["lora"].update(alpha=0)), r"lora\.alpha must be .*> 0"),
    "fp16 role file": (lambda p: _edit_tensors(p, "roles/actor.safetensors",
                                               lambda t: {k: v.half() for k, v in t.items()}),
                       r"one floating dtype .*\['float16', 'float32'\]"),
    "peft copy differs": (lambda p: _edit_tensors(p, "peft/actor/adapter_model.safetensors",
                                                  lambda t: {k: v * 1.5 if "lora_B" in k else v for k, v in t.items()}),
                          r"peft/actor does not match the bundle's own tensors"),
    "peft copy missing module": (lambda p: _edit_tensors(p, "peft/actor/adapter_model.safetensors",
                                                         lambda t: dict(list(t.items())[2:])),
                                 r"does not hold exactly the bundle's modules"),
    "files not a dict of digests": (lambda p: _edit_manifest(p, lambda m: m["files"].update(
        {"roles/actor.safetensors": 7})), r"files\['roles/actor\.safetensors'\] must be a sha256"),
    "roles not a list": (lambda p: _edit_manifest(p, lambda m: m.update(roles="planner")), r"roles must be"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_bundle_is_refused_in_one_line(case, path):
    mutate, pattern = BAD[case]
    mutate(path)
    before = tree(path)
    with pytest.raises(BundleError, match=pattern) as e:
        load_bundle(path)
    assert "\n" not in str(e.value) and tree(path) == before


def test_manifest_symlink_out_of_the_bundle_is_refused(path, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(path / "manifest.json", outside)
    (path / "manifest.json").symlink_to(outside)
    with pytest.raises(BundleError, match=r"manifest\.json is a symbolic link"):
        load_bundle(path)


def test_writer_refuses_nan_and_bad_alpha(tmp_path):
    b = synth_bundle()
    b.role_b["actor"][b.modules[0]][0, 0] = float("inf")
    with pytest.raises(BundleError, match="non-finite"):
        write_bundle(b, tmp_path / "b")
    for alpha in (-16.0, 0.0, float("nan")):
        b = synth_bundle()
        b.alpha = alpha
        with pytest.raises(BundleError, match="alpha must be a finite number > 0"):
            write_bundle(b, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_long_role_name_is_refused():
    with pytest.raises(BundleError, match="at most 64 characters"):
        validate_role_name("a" * 300)
    assert validate_role_name("a" * 64) == "a" * 64


# -- #10, #11: full disk, leftovers ---------------------------------------------------------------------------

def test_full_disk_leaves_nothing(path, monkeypatch):
    before = tree(path)
    calls = {"n": 0}
    real = bundle_write.save_file

    def full(tensors, filename):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        real(tensors, filename)

    monkeypatch.setattr(bundle_write, "save_file", full)
    for out, force in ((path, True), (path.parent / "new", False)):
        calls["n"] = 0
        with pytest.raises(BundleError, match=r"cannot write bundle .*No space left on device.*nothing was written"):
            write_bundle(synth_bundle(seed=4), out, force=force)
    assert tree(path) == before and sorted(p.name for p in path.parent.iterdir()) == ["bundle"]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_temp_dirs_of_ours_are_cleaned_others_kept(tmp_path):
    parent = tmp_path
    dead = parent / ".b.tmp-dead1234"
    dead.mkdir()
    (dead / fsutil.MARKER).write_text(json.dumps({"host": os.uname().nodename, "pid": _dead_pid()}))
    (dead / "manifest.json").write_text("{}")
    alive = parent / ".b.tmp-alive123"
    alive.mkdir()
    (alive / fsutil.MARKER).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    foreign = parent / ".b.tmp-notours"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("user data")
    os.utime(foreign, (0, 0))                                   # old, but not ours: kept
    swapped_out = parent / ".b.old-abcdefgh"                    # a replaced bundle left by a kill: ours, old
    write_bundle(synth_bundle(), swapped_out / "bundle")
    os.utime(swapped_out, (0, 0))
    write_bundle(synth_bundle(), parent / "b")
    names = sorted(p.name for p in parent.iterdir())
    assert names == [".b.tmp-alive123", ".b.tmp-notours", "b"], names


def test_non_finite_adapters_are_refused_at_export_and_import(tiny_base, tmp_path):
    from lragent.train.export import bundle_from_run
    from lragent.train.import_peft import read_peft_adapter
    from test_bundle_helpers import make_run_dir

    make_run_dir(tmp_path / "run", tiny_base, roles=("planner",), steps=(1,), rank=2)
    ck = tmp_path / "run" / "checkpoints" / "step-000001" / "adapter.safetensors"
    t = load_file(str(ck))
    t[next(k for k in t if "lora_B" in k)][0, 0] = float("nan")
    save_file(t, str(ck))
    with pytest.raises(BundleError, match="non-finite values"):
        bundle_from_run(tmp_path / "run")
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    m = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{m}.lora_A.weight": torch.zeros(2, 64), f"{m}.lora_B.weight": torch.full((64, 2), float("inf"))},
              str(peft / "adapter_model.safetensors"))
    with pytest.raises(BundleError, match="non-finite values"):
        read_peft_adapter(peft)
