"""``lragent import-peft`` and ``inspect``: independently trained PEFT adapters -> one shared-A bundle."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lragent.bundle import load_bundle
from lragent.train.import_peft import combine, linear_shapes, read_peft_adapter, shared_basis
from test_bundle_helpers import assert_one_line_error, make_peft_adapter, run_cli, tree  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
SPECS = {  # three independently initialised adapters: different ranks, scaling rules and target sets
    "planner": dict(r=4, alpha=8, seed=0, targets=("q_proj", "k_proj", "v_proj")),
    "actor": dict(r=6, alpha=7, seed=1, targets=("q_proj", "v_proj", "o_proj")),
    "critic": dict(r=4, alpha=6, seed=2, targets=("k_proj", "v_proj"), rslora=True),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("peft")
    return {role: make_peft_adapter(root / role, tiny_base, **spec) for role, spec in SPECS.items()}


def role_args(adapters):
    return ["--role", *[f"{r}={p}" for r, p in adapters.items()]]


@pytest.fixture(scope="module")
def exact(adapters, tiny_base, tmp_path_factory):
    from lragent.cli.bundle import main
    out = tmp_path_factory.mktemp("imp") / "bundle"
    assert main(["import-peft", "--base", str(tiny_base), *role_args(adapters), "--out", str(out)]) == 0
    return out


def delta_w(adapter_dir) -> dict[str, torch.Tensor]:
    """dW = s B A straight from the PEFT files (independent of the importer)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
    t = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {k[len("base_model.model."):-len(".lora_A.weight")]: s * t[k.replace("lora_A", "lora_B")].double()
            @ t[k].double() for k in t if "lora_A" in k}


def test_exact_preserves_every_delta_w_with_one_shared_a(exact, adapters, tiny_base):
    bundle = load_bundle(exact, base_dir=tiny_base)
    assert bundle.share_a == ["k_proj", "v_proj"] and bundle.lrshared_ok and bundle.scaling == 1.0
    assert bundle.rank == 14                                               # v_proj: span of 4 + 6 + 4 A rows
    want_of = {}
    for role, path in adapters.items():
        want = want_of[role] = delta_w(path)
        for m in bundle.modules:
            got = bundle.delta_weight(m, role).double()
            if m in want:
                assert (got - want[m]).abs().max() <= 1e-5 * want[m].abs().max()
            else:
                assert got.abs().max() == 0                                # target the role does not have
    peft_a = {r: load_file(str(exact / "peft" / r / "adapter_model.safetensors")) for r in adapters}
    for m in bundle.modules:
        if bundle.shares_a(m):
            key = f"base_model.model.{m}.lora_A.weight"
            assert all(torch.equal(peft_a[r][key], peft_a["planner"][key]) for r in adapters)  # bitwise shared A
            # independent A rows (adapters trained apart): the basis is the roles' A rows stacked, and each role's
            # B is its own in its block of columns, zero elsewhere (a role reads only its block of L)
            have = [r for r in adapters if m in want_of[r]]
            rows = [load_file(str(adapters[r] / "adapter_model.safetensors"))[
                f"base_model.model.{m}.lora_A.weight"].double() for r in have]
            q = bundle.shared_a[m].double()
            assert torch.allclose(q[:sum(len(a) for a in rows)], torch.cat(rows), atol=1e-7)
            lo = 0
            for r, a in zip(have, rows):
                b = bundle.b(m, r).double()
                assert not b[:, :lo].any() and not b[:, lo + len(a):].any() and b[:, lo:lo + len(a)].any()
                lo += len(a)


@torch.no_grad()
def test_exact_bundle_reproduces_the_original_adapters_logits(exact, adapters, tiny_base):
    import peft
    import transformers
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)  # noqa
    for role, path in adapters.items():
        orig = peft.PeftModel.from_pretrained(load(), str(path))(input_ids=ids).logits
        ours = peft.PeftModel.from_pretrained(load(), str(exact / "peft" / role))(input_ids=ids).logits
        assert (orig - ours).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def read(adapters, tiny_base):
    return {r: read_peft_adapter(p) for r, p in adapters.items()}, linear_shapes(tiny_base)


def test_rank_r_errors_shrink_as_r_grows(read):
    ads, shapes = read
    table = {}
    for rank in (1, 2, 4, 8, 12, 14):
        bundle, report = combine(ads, shapes, "rank", rank)
        assert bundle.rank == max(rank, 6) and report["shared_rank"]["v_proj"] == rank
        table[rank] = {r: v["rel_err_shared"] for r, v in report["roles"].items()}
        assert all(v["rel_max_err"] < 1e-6 for v in report["roles"].values())   # unshared targets stay exact
    for lo, hi in zip(list(table)[:-1], list(table)[1:]):
        assert all(table[hi][r] <= table[lo][r] + 1e-9 for r in ads), (lo, hi, table)
    assert min(table[1].values()) > 0.3 and max(table[14].values()) < 1e-6


def test_rank_r_weighting_beats_plain_svd_of_a(read):
    ads, _ = read
    m = "model.layers.0.self_attn.v_proj"
    pairs = [(ad.modules[m][0].double(), ad.scaling * ad.modules[m][1].double()) for ad in ads.values()]
    deltas = [sb @ a for a, sb in pairs]
    objective = lambda q: sum(((d - d @ q.T @ q).norm() / d.norm()) ** 2 for d in deltas).item()  # noqa
    for rank in (2, 4, 8):
        q, exact = shared_basis(pairs, rank)
        plain = torch.linalg.svd(torch.cat([a for a, _ in pairs]), full_matrices=False)[2][:rank]
        assert not exact and objective(q) <= objective(plain) + 1e-12


def test_already_shared_a_is_kept_bitwise(adapters, tiny_base, tmp_path, read):
    src = adapters["planner"]
    twin = tmp_path / "twin"
    shutil.copytree(src, twin)
    t = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: (v * 3 + 1 if "lora_B" in k else v) for k, v in t.items()}, str(twin / "adapter_model.safetensors"))
    ads = {"planner": read_peft_adapter(src), "twin": read_peft_adapter(twin)}
    bundle, report = combine(ads, read[1], "exact")
    assert report["shared_targets"] == {"k_proj": "bitwise", "v_proj": "bitwise"} and bundle.rank == 4
    m = "model.layers.1.self_attn.k_proj"
    assert torch.equal(bundle.shared_a[m], t[f"base_model.model.{m}.lora_A.weight"])


def test_none_mode_and_inspect(adapters, exact, tiny_base, tmp_path, capsys):
    rc, out, err = run_cli(["import-peft", "--base", tiny_base, *role_args(adapters), "--out", tmp_path / "n",
                            "--share-a", "none"], capsys)
    assert rc == 0, err
    manifest = json.loads((tmp_path / "n" / "manifest.json").read_text())
    assert manifest["lora"]["share_a"] == [] and manifest["lora"]["lrshared_ok"] is False
    assert manifest["modes"] == ["nonshared", "fullshared", "baseshared"] and manifest["lora"]["rank"] == 6
    rc, out, _ = run_cli(["inspect", tmp_path / "n"], capsys)
    assert rc == 0 and "lrshared unavailable" in out and "A-family   none" in out
    rc, out, _ = run_cli(["inspect", exact, "--base", tiny_base], capsys)
    bundle = load_bundle(exact)
    for text in ("planner, actor, critic", "rank 14", "q_proj, k_proj, v_proj, o_proj", "shared A   k_proj, v_proj",
                 bundle.a_family_hash, bundle.base["config_sha256"], "sizes      total", "lrshared"):
        assert text in out, text
    rc, out, _ = run_cli(["inspect", exact, "--json"], capsys)
    s = json.loads(out)
    assert rc == 0 and s["bytes"]["total"] > s["bytes"]["shared_a"] > 0 and s["lr_cache_per_token"]["lrshared"] == 56


def _variant(src, dst, cfg=None, tensors=None, drop_safetensors=False):
    shutil.copytree(src, dst)
    if cfg:
        c = json.loads((dst / "adapter_config.json").read_text())
        c.update(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(c))
    if tensors:
        t = load_file(str(dst / "adapter_model.safetensors"))
        save_file(tensors(t), str(dst / "adapter_model.safetensors"))
    if drop_safetensors:
        (dst / "adapter_model.safetensors").unlink()
        (dst / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    return dst


def _rename(t, old, new):
    return {k.replace(old, new): v for k, v in t.items()}


BAD = {  # name: (variant of the planner adapter, extra argv, message pattern)
    "pickle only": (dict(drop_safetensors=True), [], r"only a pickle weight file .*never unpickles"),
    "rank_pattern": (dict(cfg={"rank_pattern": {"q_proj": 8}}), [], r"uses rank_pattern/alpha_pattern"),
    "fan_in_fan_out": (dict(cfg={"fan_in_fan_out": True}), [], r"sets fan_in_fan_out=True"),
    "dora": (dict(cfg={"use_dora": True}), [], r"sets use_dora=True"),
    "pissa init": (dict(cfg={"init_lora_weights": "pissa"}), [], r"init_lora_weights='pissa', which changes the base"),
    "not LoRA": (dict(cfg={"peft_type": "IA3"}), [], r"peft_type 'IA3' is not LORA"),
    "extra tensor": (dict(tensors=lambda t: {**t, "base_model.model.x.lora_magnitude_vector": torch.ones(2)}), [],
                     r"holds tensor 'base_model\.model\.x\.lora_magnitude_vector', which is not a plain LoRA"),
    "not a layer Linear": (dict(tensors=lambda t: _rename(t, "model.layers.0.self_attn.q_proj", "lm_head")), [],
                           r"module lm_head is not an nn\.Linear inside the base model's decoder layers"),
    "wrong shape": (dict(tensors=lambda t: {k: (v[:, :32].contiguous() if k.endswith("q_proj.lora_A.weight") else v)
                                            for k, v in t.items()}), [], r"has \[in, out\] \[32, 64\].*wrong --base"),
    "bad role name": ({}, ["--role", "Planner=X"], r"invalid role name 'Planner'"),
    "reserved role name": ({}, ["--role", "mlp=X"], r"invalid role name 'mlp'"),
    "duplicate role": ({}, ["--role", "actor=X"], r"role 'actor' is given twice"),
    "role syntax": ({}, ["--role", "critic"], r"--role 'critic': use NAME=PEFT_DIR"),
    "share-a": ({}, ["--share-a", "rank=0"], r"--share-a 'rank=0': use exact, rank=R"),
    "missing dir": ({}, ["--role", "critic=/nonexistent"], r"/nonexistent: no adapter_config\.json"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_writes_nothing(case, adapters, tiny_base, tmp_path, capsys):
    variant, extra, pattern = BAD[case]
    src = _variant(adapters["planner"], tmp_path / "src" / "planner", **variant)
    argv = ["import-peft", "--base", tiny_base, "--role", f"actor={adapters['actor']}"]
    if "--role" not in extra or case == "duplicate role":
        argv += ["--role", f"planner={src}"]
    before = tree(tmp_path)
    rc, _, err = run_cli(argv + extra + ["--out", tmp_path / "out" / "b"], capsys)
    assert rc == 2
    assert_one_line_error(err, pattern)
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()


def test_other_base_or_existing_out_writes_nothing(adapters, exact, tiny_base, tmp_path, capsys):
    from support.models import make_random_base
    other = make_random_base(tmp_path / "mha", "mha16")                      # k/v are [64, 64] here, not [32, 64]
    before = tree(exact)
    for base, out, pattern in ((other, tmp_path / "b", r"module model\.layers\.0\.self_attn\.k_proj has \[in, out\]"),
                               (tmp_path / "nobase", tmp_path / "b", r"has no config\.json"),
                               (tiny_base, exact, r"already exists: choose another --out or pass --force")):
        rc, _, err = run_cli(["import-peft", "--base", base, *role_args(adapters), "--out", out], capsys)
        assert rc == 2
        assert_one_line_error(err, pattern)
    assert tree(exact) == before and not (tmp_path / "b").exists()
