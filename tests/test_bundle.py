"""Bundle v1: writing (atomic, --force) and loading (every bad input fails with one clear line and writes nothing)."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lragent import bundle as bundle_mod
from lragent.bundle import write as bundle_write
from lragent.bundle import Bundle, BundleError, load_bundle, sha256_file, write_bundle
from test_bundle_helpers import tree

SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32)}   # (in, out) of the tiny gqa16 model


def synth_bundle(roles=("planner", "actor"), rank=4, share=("k_proj", "v_proj"), seed=0, base=None) -> Bundle:
    g = torch.Generator().manual_seed(seed)
    modules = [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in SHAPES]
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    shared_a = {m: rnd(rank, SHAPES[m[-6:]][0]) for m in modules if m[-6:] in share}
    role_a = {r: {m: rnd(rank, SHAPES[m[-6:]][0]) for m in modules if m[-6:] not in share} for r in roles}
    role_b = {r: {m: rnd(SHAPES[m[-6:]][1], rank) for m in modules} for r in roles}
    return Bundle(roles=list(roles), rank=rank, alpha=8.0, targets=list(SHAPES), share_a=list(share),
                  shared_a=shared_a, role_a=role_a, role_b=role_b, base=base or {})


@pytest.fixture
def fake_base(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}\n')
    return base


@pytest.fixture
def written(tmp_path, fake_base):
    b = synth_bundle(base={"name": "fake", "path": str(fake_base),
                           "config_sha256": bundle_mod.base_fingerprint(fake_base)})
    return b, write_bundle(b, tmp_path / "out" / "bundle")


def test_round_trip_identical_tensors(written, fake_base):
    b, path = written
    got = load_bundle(path, base_dir=fake_base)
    assert got.roles == b.roles and got.modules == b.modules and got.a_family_hash == b.a_family_hash
    for m in b.modules:
        for r in b.roles:
            assert torch.equal(got.a(m, r), b.a(m, r)) and torch.equal(got.b(m, r), b.b(m, r))
            assert torch.allclose(got.delta_weight(m, r), 2.0 * b.b(m, r) @ b.a(m, r))
    k = "model.layers.1.self_attn.v_proj"
    assert got.a(k, "planner") is got.a(k, "actor")                          # one shared A
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["lora"]["lrshared_ok"] and "lrshared" in manifest["modes"]
    assert manifest["lora"]["share_a"] == ["k_proj", "v_proj"] and manifest["version"] == 1


def test_no_shared_a_means_no_lrshared(tmp_path):
    path = write_bundle(synth_bundle(share=()), tmp_path / "b")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["lora"]["share_a"] == [] and manifest["lora"]["lrshared_ok"] is False
    assert manifest["modes"] == ["nonshared", "fullshared", "baseshared"] and manifest["a_family_hash"] is None
    assert not (path / "shared_a.safetensors").exists() and load_bundle(path).lrshared_ok is False


def _manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    for key, value in changes.items():
        *head, last = key.split(".")
        d = m
        for h in head:
            d = d[h]
        d[last] = value
    (path / "manifest.json").write_text(json.dumps(m))


def _relist(path, rel):
    m = json.loads((path / "manifest.json").read_text())
    m["files"][rel] = sha256_file(path / rel)
    (path / "manifest.json").write_text(json.dumps(m))


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF                                                         # tensor data, header stays valid
    path.write_bytes(bytes(data))


def _wrong_shape(p):
    tensors = load_file(str(p / "roles/actor.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.lora_B"] = torch.zeros(48, 4)
    save_file(tensors, str(p / "roles/actor.safetensors"))
    _relist(p, "roles/actor.safetensors")


def _outside_link(p):
    outside = p.parent / "outside.safetensors"
    shutil.copy(p / "roles/actor.safetensors", outside)
    (p / "roles/actor.safetensors").unlink()
    (p / "roles/actor.safetensors").symlink_to(outside)


def _pickle_as_safetensors(p):
    (p / "roles/actor.safetensors").write_bytes(pickle.dumps({"x": 1}))
    _relist(p, "roles/actor.safetensors")


def _listed_bin(p):
    (p / "roles/actor.bin").write_bytes(pickle.dumps({"x": 1}))
    _relist(p, "roles/actor.bin")


BAD = {
    "missing file": (lambda p: (p / "roles/actor.safetensors").unlink(), r"is missing roles/actor\.safetensors"),
    "extra file": (lambda p: (p / "notes.json").write_text("{}"), r"unlisted file notes\.json"),
    "no manifest": (lambda p: (p / "manifest.json").unlink(), r"has no manifest\.json"),
    "bad json": (lambda p: (p / "manifest.json").write_text("{oops"), r"manifest\.json is not valid JSON"),
    "format version": (lambda p: _manifest(p, version=2), r"unknown bundle format version 2"),
    "tensor sha256": (lambda p: _flip_byte(p / "roles/planner.safetensors"),
                      r"roles/planner\.safetensors: sha256 does not match manifest\.json"),
    "rank vs manifest": (lambda p: _manifest(p, **{"lora.rank": 8}), r"lora_A has shape \[8, 64\]|expected \[rank=8"),
    "shape across roles": (_wrong_shape, r"roles disagree on the \[in, out\] shape"),
    "modules vs manifest": (lambda p: _manifest(p, **{"lora.modules": ["model.layers.0.self_attn.q_proj"]}),
                            r"lora\.modules do not match"),
    "dtype vs manifest": (lambda p: _manifest(p, dtype="bfloat16"), r"dtype 'bfloat16' does not match the tensors"),
    "a-family hash": (lambda p: _manifest(p, a_family_hash="0" * 64), r"a_family_hash does not match"),
    "lrshared claim": (lambda p: _manifest(p, **{"lora.lrshared_ok": False}), r"lrshared_ok/modes do not match"),
    "path escapes": (lambda p: _manifest(p, files={"../evil.safetensors": "0" * 64}),
                     r"manifest path '\.\./evil\.safetensors' escapes the bundle directory"),
    "absolute path": (lambda p: _manifest(p, files={"/etc/passwd": "0" * 64}), r"escapes the bundle directory"),
    "escape through link": (_outside_link, r"escapes the bundle directory .* \(through a link\)"),
    "unlisted pickle": (lambda p: (p / "roles/actor.pt").write_bytes(b"x"),
                        r"roles/actor\.pt is not a safetensors or JSON file.*never unpickles"),
    "listed pickle": (_listed_bin, r"roles/actor\.bin is not a safetensors or JSON file"),
    "pickle named safetensors": (_pickle_as_safetensors, r"roles/actor\.safetensors is not a readable safetensors"),
    "invalid role name": (lambda p: _manifest(p, roles=["Planner", "actor"]), r"invalid role name 'Planner'"),
    "reserved role name": (lambda p: _manifest(p, roles=["mlp", "actor"]), r"invalid role name 'mlp'.*module-path"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_load_rejects_bad_bundle_with_one_line(case, written):
    _, path = written
    mutate, pattern = BAD[case]
    mutate(path)
    before, parent_before = tree(path), sorted(p.name for p in path.parent.parent.iterdir())
    with pytest.raises(BundleError, match=pattern) as e:
        load_bundle(path)
    assert "\n" not in str(e.value)
    assert tree(path) == before and sorted(p.name for p in path.parent.parent.iterdir()) == parent_before


def test_load_rejects_other_base_model(written, tmp_path):
    _, path = written
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama", "hidden_size": 128}\n')
    before = tree(path)
    with pytest.raises(BundleError, match=r"base model .*other does not match the bundle \(config\.json sha256"):
        load_bundle(path, base_dir=other)
    assert tree(path) == before


def test_write_refuses_existing_and_force_replaces_atomically(written, monkeypatch):
    b, path = written
    before = tree(path)
    with pytest.raises(BundleError, match="already exists.*--force"):
        write_bundle(synth_bundle(seed=1), path)
    assert tree(path) == before
    for exchange in (True, False):                                          # renameat2 swap, then 2-rename fallback
        if not exchange:
            monkeypatch.setattr(bundle_write, "_exchange", lambda a, b: False)
        new = synth_bundle(seed=2 + exchange, roles=("critic",))
        write_bundle(new, path, force=True)
        assert load_bundle(path).roles == ["critic"] and load_bundle(path).a_family_hash == new.a_family_hash
        assert sorted(p.name for p in path.parent.iterdir()) == ["bundle"]   # no temp or old dirs left


def test_force_never_replaces_non_bundle(tmp_path):
    data = tmp_path / "precious"
    data.mkdir()
    (data / "thesis.txt").write_text("years of work")
    with pytest.raises(BundleError, match="is not an lragent bundle: refusing to replace it, even with --force"):
        write_bundle(synth_bundle(), data, force=True)
    assert tree(data) == {"thesis.txt": b"years of work"} and sorted(tmp_path.iterdir()) == [data]


def test_failed_verify_or_bad_role_writes_nothing(written):
    b, path = written
    before = tree(path)

    def verify(tmp):
        assert load_bundle(tmp).roles == ["planner", "actor"]               # sees the complete temp bundle
        raise BundleError("probe mismatch")

    with pytest.raises(BundleError, match="probe mismatch"):
        write_bundle(synth_bundle(seed=5), path, force=True, verify=verify)
    with pytest.raises(BundleError, match="probe mismatch"):
        write_bundle(synth_bundle(seed=5), path.parent / "new", verify=verify)
    with pytest.raises(BundleError, match="invalid role name 'model'"):
        write_bundle(synth_bundle(roles=("model", "actor")), path.parent / "new2")
    assert tree(path) == before and sorted(p.name for p in path.parent.iterdir()) == ["bundle"]
