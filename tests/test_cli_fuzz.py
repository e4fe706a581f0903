"""Fuzz the command line's inputs in-process through ``lragent.cli.main(argv)``: many seeded random mutations of
config overrides, recipe YAML, JSONL data, run.json, bundle manifests and bundle files.

Every attempt must end with exit 0 or exit 2; never an exception escaping ``main`` (``LRAGENT_DEBUG=1`` makes the
CLI's last-resort handler re-raise, so an unhandled bug fails here instead of hiding as "internal error"); on exit 2
exactly one stderr line starting with ``error:``; and on exit 2 nothing new in the watched output location.

To add inputs: write ``gen_x(rng, env) -> Attempt`` and append ``Case("x", n, gen_x)`` to :data:`CASES`. ``env``
holds a tiny base, a valid bundle, a valid run, a work dir, and for the serve commands a servable bundle on the tiny
base plus two broken copies of that base (no tokenizer; truncated weights). Training and export are stubbed after
their validation (``_train`` and the PEFT forward), which is what is fuzzed; ``generate`` and ``run`` really run
(a few tokens on the tiny base).
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from lragent.bundle import load_bundle, sha256_file, write_bundle
from lragent.cli import main
from support.bundles import write_random_bundle
from support.models import make_random_base
from test_bundle import synth_bundle
from test_bundle_helpers import make_run_dir

JUNK = ["0", "-1", "1e400", "nan", "-inf", "true", "abc", "[1, 2]", "{a: 1}", "", "null", "3.5", "2",
        "99999999999999999999", "k_proj", "x" * 300, "[", "'\u00ff'", "{", "- a", "0x10", "1_000"]
JSON_JUNK = [None, True, -1, 0, 8.9, 1e308, "", "x" * 300, "NaN", [], {}, [1, "a"], {"a": {"b": []}}, "../../etc"]


@dataclass
class Attempt:
    argv: list[str]
    watch: Path                          # nothing may appear under here when the command fails
    what: str = ""                       # the mutation, for the failure message


@dataclass
class Env:
    base: Path
    bundle: Path
    run: Path
    data: Path
    work: Path
    serve_bundle: Path | None = None     # a bundle generate / run can serve (on serve_base)
    serve_base: Path | None = None
    notok_base: Path | None = None       # serve_base without its tokenizer files
    trunc_base: Path | None = None       # serve_base with model.safetensors cut in half
    n: int = field(default=0)

    def fresh(self) -> Path:
        self.n += 1
        d = self.work / f"a{self.n}"
        d.mkdir()
        return d


@dataclass
class Case:
    name: str
    n: int
    gen: Callable[[random.Random, Env], Attempt]


# -- generators ------------------------------------------------------------------------------------------------

CONFIG_KEYS = ["lora.rank", "lora.alpha", "lora.dropout", "lora.targets", "lora.share_a", "lora.init", "lora.rslora",
               "train.max_steps", "train.batch_size", "train.lr", "train.seed", "train.log_every", "train.save_every",
               "train.eval_batch_size", "train.anchor_role", "train.scheme", "train.anchor_fraction",
               "train.schedule", "train.warmup_steps", "train.mixed_precision", "data.max_length", "data.roles",
               "model.dtype", "model.base", "data.train", "data.eval", "wandb.mode", "output_dir", "nope.key", "train"]


PLAUSIBLE = {"lora.rank": ["1", "4"], "lora.alpha": ["4", "0.5"], "lora.dropout": ["0.1"],
             "lora.targets": ["q_proj,v_proj"], "lora.share_a": ["", "v_proj"], "lora.rslora": ["true"],
             "train.lr": ["1e-3"], "train.seed": ["7"],
             "train.scheme": ["sequential"], "train.anchor_role": ["planner", "actor", "boss"],
             "train.schedule": ["cosine"], "data.max_length": ["8", "2"], "data.roles": ["planner,actor", "actor"],
             "train.log_every": ["1"], "train.eval_batch_size": ["1"], "model.dtype": ["bfloat16"]}


def _train_argv(env: Env, out: Path, extra: list[str]) -> list[str]:
    return ["train", f"model.base={env.base}", f"output_dir={out}", f"data.train={env.data}", "data.eval=null",
            "train.max_steps=1", "train.batch_size=2", "lora.rank=2", *extra]


def gen_overrides(rng: random.Random, env: Env) -> Attempt:
    d = env.fresh()
    extra = []
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        if r < 0.08:
            extra.append(rng.choice(["noequals", "=5", "train..lr=1", ".x=1", "train.lr.x=1"]))
        elif r < 0.5:
            key = rng.choice(list(PLAUSIBLE))
            extra.append(f"{key}={rng.choice(PLAUSIBLE[key])}")
        else:
            extra.append(f"{rng.choice(CONFIG_KEYS)}={rng.choice(JUNK)}")
    if any(e.startswith("output_dir=") for e in extra):
        extra = [e if not e.startswith("output_dir=") else f"output_dir={d / 'o'}{e[11:][:20]}" for e in extra]
    return Attempt(_train_argv(env, d / "run", extra), d, " ".join(extra))


def gen_recipe(rng: random.Random, env: Env) -> Attempt:
    d = env.fresh()
    recipe = {"output_dir": str(d / "run"), "model": {"base": str(env.base)},
              "lora": {"rank": 2, "targets": ["q_proj", "v_proj"], "share_a": ["v_proj"]},
              "data": {"train": str(env.data), "eval": None}, "train": {"max_steps": 1, "batch_size": 2}}
    what = []
    for _ in range(rng.randint(1, 3)):
        section = rng.choice(list(recipe))
        r = rng.random()
        if r < 0.25:
            if isinstance(recipe["lora"], dict) and isinstance(recipe["train"], dict):
                recipe["lora"]["rank"], recipe["train"]["lr"] = rng.choice([1, 3]), rng.choice([1e-3, 0.5])
                what.append("plausible rank/lr")
        elif r < 0.45 and isinstance(recipe[section], dict) and recipe[section]:
            key = rng.choice(list(recipe[section]))
            recipe[section][key] = rng.choice(JSON_JUNK)
            what.append(f"{section}.{key}=junk")
        elif r < 0.6:
            recipe[section] = rng.choice(JSON_JUNK)
            what.append(f"{section}=junk")
        elif r < 0.7:
            recipe[rng.choice(["extra", "lora_", "Train"])] = {"x": 1}
            what.append("unknown section")
        elif isinstance(recipe[section], dict):
            recipe[section][rng.choice(["x", "rank ", "lr"])] = rng.choice(JSON_JUNK)
            what.append(f"{section}: odd key")
    text = yaml.safe_dump(recipe).encode()
    r = rng.random()
    if r < 0.15:
        text = text[: rng.randint(0, len(text))] + rng.choice([b"\xff\xfe", b": : [", b"\t- {", b"\x00"])
        what.append("damaged bytes")
    elif r < 0.2:
        text = b"- just\n- a list\n"
    path = d / "recipe.yaml"
    path.write_bytes(text)
    return Attempt(["train", "--config", str(path)], d, "; ".join(what))


GOOD = [{"role": "planner", "prompt": "plan: a", "completion": " b"},
        {"role": "actor", "prompt": "act: c", "completion": " d"},
        {"role": "actor", "messages": [{"role": "user", "content": "x"}, {"role": "actor", "content": "y"}]}]


def gen_jsonl(rng: random.Random, env: Env) -> Attempt:
    d = env.fresh()
    recs = [dict(r) for r in GOOD * 2]
    lines, what = [json.dumps(r).encode() for r in recs], []
    for _ in range(rng.randint(1, 2)):
        i, r = rng.randrange(len(lines)), rng.random()
        if r < 0.2:
            rec = dict(recs[i])
            rec[rng.choice(["role", "prompt", "completion", "messages"])] = rng.choice(JSON_JUNK)
            lines[i] = json.dumps(rec).encode()
            what.append(f"line {i + 1}: field junk")
        elif r < 0.35:
            rec = dict(recs[i])
            rec.pop(rng.choice(list(rec)))
            lines[i] = json.dumps(rec).encode()
            what.append(f"line {i + 1}: field missing")
        elif r < 0.5:
            b = bytearray(lines[i])
            b[rng.randrange(len(b))] = rng.choice([0xFF, 0x80, 0xC3, ord("{"), ord('"')])
            lines[i] = bytes(b)
            what.append(f"line {i + 1}: byte flipped")
        elif r < 0.6:
            lines[i] = lines[i][: rng.randrange(len(lines[i]))]
            what.append(f"line {i + 1}: truncated")
        elif r < 0.7:
            lines[i] = b"[" * 100000 + b"]" * 100000
            what.append(f"line {i + 1}: deep nesting")
        elif r < 0.8:
            lines[i] = rng.choice([b"[]", b"7", b'"s"', b"null"])
            what.append(f"line {i + 1}: not an object")
        else:
            rec = dict(recs[i])
            rec["role"] = rng.choice(["Planner", "mlp", "a" * 300, "x-y", "_a"])
            lines[i] = json.dumps(rec).encode()
            what.append(f"line {i + 1}: bad role name")
    data = d / "data.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    return Attempt(_train_argv(env, d / "run", [f"data.train={data}"]), d, "; ".join(what))


def _mutate_json(rng: random.Random, obj, depth: int = 0) -> str:
    """Replace, delete or retype one random field somewhere in a JSON object (in place); returns what was done."""
    keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
    if not keys:
        return "empty"
    k = rng.choice(keys)
    if isinstance(obj[k], (dict, list)) and obj[k] and rng.random() < 0.6 and depth < 3:
        return f"{k}.{_mutate_json(rng, obj[k], depth + 1)}"
    r = rng.random()
    if r < 0.25 and isinstance(obj, dict):
        del obj[k]
        return f"{k} deleted"
    obj[k] = rng.choice(JSON_JUNK)
    return f"{k}={obj[k]!r}"[:60]


def gen_manifest(rng: random.Random, env: Env) -> Attempt:
    d = env.fresh()
    b = d / "bundle"
    shutil.copytree(env.bundle, b)
    r = rng.random()
    if r < 0.6:
        m = json.loads((b / "manifest.json").read_text())
        what = _mutate_json(rng, m)
        (b / "manifest.json").write_text(json.dumps(m))
    elif r < 0.8:
        files = sorted(p for p in b.rglob("*") if p.is_file())
        f = rng.choice(files)
        data = bytearray(f.read_bytes())
        if rng.random() < 0.5:
            data = data[: rng.randrange(len(data))]
        else:
            data[rng.randrange(len(data))] ^= 0xFF
        f.write_bytes(bytes(data))
        what = f"{f.relative_to(b)} damaged"
        if rng.random() < 0.5 and f.name != "manifest.json":       # relisted: only the content checks remain
            m = json.loads((b / "manifest.json").read_text())
            m["files"][f.relative_to(b).as_posix()] = sha256_file(f)
            (b / "manifest.json").write_text(json.dumps(m))
            what += " and relisted"
    else:
        victim = rng.choice(sorted(p for p in b.rglob("*") if p.is_file() and p.name != "manifest.json"))
        action = rng.choice(["delete", "link", "extra"])
        if action == "delete":
            victim.unlink()
        elif action == "link":
            outside = d / "outside"
            shutil.copy(victim, outside)
            victim.unlink()
            victim.symlink_to(outside)
        else:
            (victim.parent / rng.choice(["x.pt", "y.json", "z.safetensors"])).write_bytes(b"junk")
        what = f"{victim.relative_to(b)}: {action}"
    argv = ["inspect", str(b)] + (["--json"] if rng.random() < 0.5 else []) + \
        (["--base", str(env.base)] if rng.random() < 0.3 else [])
    return Attempt(argv, d, what)


def gen_run_json(rng: random.Random, env: Env) -> Attempt:
    d = env.fresh()
    run = d / "run"
    shutil.copytree(env.run, run)
    meta = json.loads((run / "run.json").read_text())
    what = _mutate_json(rng, meta)
    (run / "run.json").write_text(json.dumps(meta))
    return Attempt(["export", "--run", str(run), "--out", str(d / "out" / "bundle")], d, what)


# -- serve commands: trajectory JSON, generate / run flags -------------------------------------------------------

TRAJECTORY = {"name": "fuzz", "defaults": {"max_new_tokens": 2, "temperature": 0, "stop": []},
              "turns": [{"role": "user", "content": "find the value of k7 ."}, {"role": "planner"},
                        {"role": "tool", "content": "db : k7 = 18 ;"}, {"role": "actor", "max_new_tokens": 3}]}


def _serve_argv(env: Env, *args) -> list[str]:
    return [args[0], "--bundle", str(env.serve_bundle), "--no-warmup", *args[1:]]


def gen_trajectory(rng: random.Random, env: Env) -> Attempt:
    d = env.fresh()
    doc, what = json.loads(json.dumps(TRAJECTORY)), []
    r = rng.random()
    if r < 0.45:
        for _ in range(rng.randint(1, 2)):
            what.append(_mutate_json(rng, doc))
    elif r < 0.55:                           # outgrows the context (512) or, with --cache-tokens 128, the pool
        doc["defaults"] = {"max_new_tokens": rng.choice([40, 60]), "ignore_eos": True}
        doc["turns"] += [{"role": rl} for rl in ("planner", "actor") * 5]
        what.append("long")
    elif r < 0.65:
        doc["turns"][rng.randrange(4)][rng.choice(["role", "content", "seed", "stop", "top_p"])] = \
            rng.choice(["\ud800", "x" * 300, "Planner", [1.0, 2.5], 2 ** 64, ["\udcff"], 1e-320])
        what.append("odd turn value")
    elif r < 0.72:
        doc["base"] = rng.choice(JSON_JUNK[4:9] + ["../../etc", str(env.notok_base), str(env.trunc_base)])
        what.append(f"base={doc['base']!r}"[:40])
    elif r < 0.8:
        doc["turns"].append(rng.choice([{"role": "critic"}, {"role": "actor", "logprobs": 3}, [], "planner",
                                        {"role": "planner", "max_new_tokens": 1.0}]))
        what.append("odd extra turn")
    elif r < 0.88:                           # JSON allows lone surrogate escapes; tokenizers refuse them
        spot = rng.choice(["content", "role", "name", "stop", "key"])
        if spot == "name":
            doc["name"] = "a\ud800"
        elif spot == "stop":
            doc["defaults"]["stop"] = ["\udcff"]
        elif spot == "key":
            doc["turns"][1]["\ud800"] = 1
        else:
            doc["turns"][rng.choice([0, 2])][spot] = "x \udcff y"
        what.append(f"lone surrogate in {spot}")
    text = json.dumps(doc).encode()
    r = rng.random()
    if r < 0.1:
        text = text[: rng.randrange(len(text))]
        what.append("truncated")
    elif r < 0.2:
        b = bytearray(text)
        b[rng.randrange(len(b))] = rng.choice([0xFF, 0x80, 0xC3, 0x00])
        text = bytes(b)
        what.append("byte flipped")
    elif r < 0.25:
        n = rng.choice([900, 100000])
        text = text[:-1] + b', "description": ' + b"[" * n + b"]" * n + b"}"
        what.append(f"nested {n} deep")
    f = d / "trajectory.json"
    f.write_bytes(text)
    extra = (["--json"] if rng.random() < 0.4 else []) + (["--cache-tokens", "128"] if rng.random() < 0.2 else [])
    if rng.random() < 0.1:
        extra += ["--mode", rng.choice(["all", "nonshared", "x"])]
    return Attempt(_serve_argv(env, "run", "--trajectory", str(f), *extra), d, "; ".join(what))


SERVE_FLAGS = {
    "--device": ["cpu", "auto", "foo", "cuda", "cuda:7", "meta", "", "cpu:0"],
    "--attention": ["auto", "torch", "reference", "triton", "flash"],
    "--temperature": ["0", "0.7", "nan", "inf", "-1", "1e400"],
    "--top-p": ["0.5", "1", "0", "1.5", "nan"],
    "--threads": ["1", "0", "-1"],
    "--seed": ["0", "7", "-1", str(2 ** 63), str(2 ** 64)],
    "--max-new-tokens": ["1", "3", "0", "-5", "100000"],
    "--cache-tokens": ["64", "16", "1", "0", "10000000000", str(10 ** 20)],
    "--block-size": ["1", "16", "0", "-3", "1000000000"],
    "--max-batch-tokens": ["1", "8", "0"],
    "--max-num-seqs": ["1", "0"],
    "--dtype": ["float32", "bfloat16", "float16", "auto", "fp8", "int8", ""],
    "--mode": ["lrshared", "nonshared", "baseshared", "fullshared", "weird", "all"],
    "--stop": ["", ".", "\udcff", "k"],
    "--base": ["BASE", "NOTOK", "TRUNC", "/nonexistent"],
}
GENERATE_FLAGS = {"--role": ["planner", "actor", "bogus", "\udcff", "x" * 300],
                  "--prompt": ["x", "", "\udcff", "find the value of k7 .", "k7 " * 600, "caf\u00e9 \U0001f600"]}
RUN_FLAGS = {"--repeat": ["0", "2", "-1"]}
SWITCHES = ["--json", "--ignore-eos", "--raw"]


def gen_serve_flags(rng: random.Random, env: Env) -> Attempt:
    d = env.fresh()
    if rng.random() < 0.7:
        cmd, table, args = "generate", {**SERVE_FLAGS, **GENERATE_FLAGS}, ["--prompt", "find the value of k7 ."]
    else:
        f = d / "trajectory.json"
        f.write_text(json.dumps(TRAJECTORY))
        cmd, table, args = "run", {**SERVE_FLAGS, **RUN_FLAGS}, ["--trajectory", str(f)]
    bases = {"BASE": env.serve_base, "NOTOK": env.notok_base, "TRUNC": env.trunc_base}
    for _ in range(rng.randint(1, 3)):
        flag = rng.choice(list(table))
        value = rng.choice(table[flag])
        args += [flag, str(bases.get(value, value))]
    for switch in SWITCHES:
        if rng.random() < 0.2 and not (cmd == "run" and switch == "--raw"):
            args.append(switch)
    return Attempt(_serve_argv(env, cmd, *args), d, " ".join(args[2:])[:120])


CASES: list[Case] = [
    Case("config-overrides", 60, gen_overrides),
    Case("recipe-yaml", 40, gen_recipe),
    Case("jsonl-data", 40, gen_jsonl),
    Case("bundle-files", 150, gen_manifest),
    Case("run-json", 40, gen_run_json),
    Case("trajectory-json", 40, gen_trajectory),
    Case("serve-flags", 60, gen_serve_flags),
]


# -- runner ----------------------------------------------------------------------------------------------------

def _snapshot(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_base):
    work = tmp_path_factory.mktemp("fuzz")
    bundle = write_bundle(synth_bundle(), work / "valid_bundle")
    run = work / "valid_run"
    make_run_dir(run, tiny_base, roles=("planner", "actor"), steps=(1,), rank=2, targets=("q_proj", "v_proj"),
                 share_a=("v_proj",))
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    serve_base = make_random_base(work / "serve_base", "gqa16", seed=31)
    serve_bundle = write_random_bundle(serve_base, work / "serve_bundle", roles=("planner", "actor"), rank=2, seed=32)
    notok = work / "notok_base"
    notok.mkdir()
    for f in serve_base.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, notok / f.name)
    trunc = work / "trunc_base"
    shutil.copytree(serve_base, trunc)
    weights = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return Env(base=tiny_base, bundle=bundle, run=run, data=data, work=work, serve_bundle=serve_bundle,
               serve_base=serve_base, notok_base=notok, trunc_base=trunc)


@pytest.fixture
def stubbed(monkeypatch):
    """Skip the work after validation: the training loop and the PEFT forward comparison."""
    from lragent.train import export, trainer

    def no_training(acc, cfg, run_dir, resume, setup, embedded):
        return trainer.TrainResult(run_dir, None, list(setup.data[0]), None)

    monkeypatch.setattr(trainer, "_train", no_training)
    monkeypatch.setattr(export, "verify_peft", lambda tmp, base, **kw: (load_bundle(tmp, base_dir=base), {})[1])
    monkeypatch.setenv("LRAGENT_DEBUG", "1")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cli_inputs_fuzz(case, env, stubbed, capsys, monkeypatch):
    outcomes = {0: 0, 2: 0}
    for i in range(case.n):
        rng = random.Random(f"{case.name}-{i}")
        attempt = case.gen(rng, env)
        monkeypatch.chdir(attempt.watch)          # a mutated relative path (output_dir: -1) lands in here too
        before = _snapshot(attempt.watch)
        where = f"{case.name} #{i} ({attempt.what}): lragent {' '.join(attempt.argv)[:300]}"
        try:
            rc = main(attempt.argv)
        except SystemExit as e:                   # argparse's own usage errors are not what is fuzzed here
            pytest.fail(f"{where}: argparse exit {e.code}")
        except BaseException as e:  # noqa: BLE001
            pytest.fail(f"{where}: {type(e).__name__} escaped main: {e}")
        out, err = capsys.readouterr()
        assert rc in (0, 2), f"{where}: exit {rc}\n{err[-2000:]}"
        outcomes[rc] += 1
        if rc == 2:
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(errors) == 1, f"{where}: stderr has {len(errors)} 'error:' lines:\n{err[-2000:]}"
            assert "Traceback" not in err, f"{where}:\n{err[-2000:]}"
            new = sorted(_snapshot(attempt.watch) - before)
            assert not new, f"{where}: wrote {new[:5]} although it failed"
        monkeypatch.chdir(env.work)
        shutil.rmtree(attempt.watch, ignore_errors=True)
    print(f"{case.name}: {outcomes}")
    assert outcomes[2] > 0, f"{case.name}: no mutation was refused: the generator is not fuzzing anything"
