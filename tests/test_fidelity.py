"""``lragent eval`` and ``lragent drift``: counts on a hand-checked case, intervals, output shapes, the drift
mechanism's invariants."""
import json

import pytest

from lragent.cli import main
from lragent.serve import Engine, SamplingParams
from lragent.serve.evaluate import wilson
from support.bundles import write_random_bundle
from support.models import make_random_base

ROLES = ("planner", "actor", "reflector")
USER = {"role": "user", "content": "find the value of k7 ."}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("fid")
    base = make_random_base(d / "base", "gqa16", seed=51)
    return {"dir": d, "bundle": write_random_bundle(base, d / "bundle", roles=ROLES, rank=4, seed=52),
            "same": write_random_bundle(base, d / "same", roles=ROLES, rank=4, seed=53, identical=True)}


def test_wilson_interval_known_values():
    lo, hi = wilson(2, 3)
    assert round(lo, 3) == 0.208 and round(hi, 3) == 0.939
    assert wilson(0, 10)[0] == 0.0 and round(wilson(0, 10)[1], 3) == 0.278
    assert wilson(10, 10)[1] == 1.0


def test_eval_counts_match_a_hand_checked_case(paths):
    """Two episodes, five scored turns: three references are what the model says (it stops at an EOS placed after
    its second token), two are not. The evaluator must count 3 of 5, per role 1/1, 1/2, 1/2."""
    from lragent.serve.episodes import Episode
    from lragent.serve.evaluate import evaluate, summarize

    eng = Engine(paths["bundle"], mode="nonshared")

    def says(messages, role):
        eng.clear_cache()
        return eng.generate(eng.render(messages, role), role, SamplingParams(max_new_tokens=3, ignore_eos=True))

    for key in range(20):          # a question for which the three stop tokens never occur inside the answers
        user = {"role": "user", "content": f"find the value of k{key} ."}
        ep1 = [user]
        a = says(ep1, "planner")
        ep1.append({"role": "planner", "content": eng.tokenizer.decode(a.token_ids[:2])})
        b = says(ep1, "actor")
        ep1 += [{"role": "actor", "content": eng.tokenizer.decode(b.token_ids[:2])},
                {"role": "reflector", "content": "k1 k2"}]                        # wrong on purpose
        ep2 = [user, {"role": "actor", "content": "k3 k4"}]                       # wrong
        c = says(ep2, "reflector")
        ep2.append({"role": "reflector", "content": eng.tokenizer.decode(c.token_ids[:2])})
        stops = {a.token_ids[2], b.token_ids[2], c.token_ids[2]}
        if not stops & set(a.token_ids[:2] + b.token_ids[:2] + c.token_ids[:2] + eng.encode("k1 k2 k3 k4")):
            break
    else:
        pytest.fail("no question gives non-overlapping stop tokens")
    eng.eos_ids, eng.scheduler.eos_ids = sorted(stops), stops
    s = summarize(evaluate({"nonshared": eng}, [Episode(ep1), Episode(ep2)], list(ROLES)))["nonshared"]
    assert s["n"] == 5 and s["exact_match"] == pytest.approx(3 / 5)
    assert [(s["roles"][r]["n"], s["roles"][r]["exact_match"]) for r in ROLES] == [(1, 1.0), (2, 0.5), (2, 0.5)]
    assert s["agreement"] == 1.0 and s["kl_max"] == 0.0                 # nonshared against itself
    assert s["ci95"] == pytest.approx(list(wilson(3, 5)))
    assert s["kinds"]["handoff"]["n"] == 3 and s["kinds"]["first"]["n"] == 2


def test_eval_all_modes_json_csv_and_chart(paths, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["eval", "--bundle", str(paths["bundle"]), "--task", "toy", "--episodes", "3", "--mode", "all",
               "--json", "--no-warmup", "--out", str(out)])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(doc["modes"]) == {"nonshared", "fullshared", "baseshared", "lrshared", "lrbase"}
    for m, d in doc["modes"].items():
        assert 0 <= d["exact_match"] <= 1 and set(d["roles"]) == set(ROLES)
        assert d["roles"]["actor"]["n"] == doc["modes"]["nonshared"]["roles"]["actor"]["n"] > 0
    assert (out / "eval.csv").read_text().count("\n") > 5 and (out / "eval.png").stat().st_size > 1000


def test_eval_bad_input_is_one_line(paths, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": [{"role": "actor"}]}\n')
    for task in ("nope", str(bad)):
        rc = main(["eval", "--bundle", str(paths["bundle"]), "--task", task, "--no-warmup"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error:")


def _drift(paths, key, capsys, tmp_path):
    traj = tmp_path / "t.json"
    traj.write_text(json.dumps({"defaults": {"max_new_tokens": 3, "ignore_eos": True},
                                "turns": [USER, {"role": "tool", "content": "db : k7 = 18 ; k3 = 41 ;"},
                                          {"role": "planner"}, {"role": "actor"}]}))
    rc = main(["drift", "--bundle", str(paths[key]), "--trajectory", str(traj), "--json", "--no-warmup"])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_drift_layer0_is_shared_and_later_layers_drift(paths, capsys, tmp_path):
    doc = _drift(paths, "bundle", capsys, tmp_path)
    first, last = doc["layers"][0], doc["layers"][-1]
    for n in ("cos_k", "cos_v", "cos_lr"):
        assert first[n] == pytest.approx(1.0, abs=1e-9)          # every role sees the same embeddings
    assert last["cos_v"] < 0.999                                  # the adapters of layer 0 moved the context
    assert all(first[f"rel_v_{r}"] > 0 for r in ROLES)


def test_identical_adapters_do_not_drift(paths, capsys, tmp_path):
    doc = _drift(paths, "same", capsys, tmp_path)
    for row in doc["layers"]:
        for n in ("cos_k", "cos_v", "cos_lr"):
            assert row[n] == pytest.approx(1.0, abs=1e-9)
