"""Guards the handoff task's purpose on the shipped trained bundle (``tests/assets/handoff_bundle``, exported from
``recipes/tiny_handoff.yaml``; regenerate with the commands in tests/assets/README.md): on reader turns (a role
reading a tool output another role prefilled) fullshared must fail and lrshared must not, turn by turn."""
from pathlib import Path

import pytest

from lragent.serve import Engine
from lragent.serve.episodes import parse_episode
from lragent.serve.evaluate import evaluate, summarize
from lragent.toy import handoff

BUNDLE = Path(__file__).parent / "assets" / "handoff_bundle"


@pytest.fixture(scope="module")
def scores():
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)                  # module fixtures run before the per-test single-thread fixture
    try:
        eps = [parse_episode(e, f"episode {i}") for i, e in enumerate(handoff.held_out_episodes(16, seed=7))]
        engines = {m: Engine(BUNDLE, mode=m, base=handoff.base_path()) for m in ("nonshared", "fullshared", "lrshared")}
        return evaluate(engines, eps, list(engines["nonshared"].roles))
    finally:
        torch.set_num_threads(n)


def test_fullshared_never_matches_lrshared_on_reader_turns(scores):
    readers = {m: [s for s in ss if s.kind == "reader"] for m, ss in scores.items()}
    assert len(readers["lrshared"]) >= 20
    for full, lr in zip(readers["fullshared"], readers["lrshared"]):
        assert (full.episode, full.turn) == (lr.episode, lr.turn)
        assert full.text != lr.text, (full.episode, full.turn, full.text)
    s = summarize(scores)
    assert s["fullshared"]["kinds"]["reader"]["exact_match"] <= 0.05
    assert s["lrshared"]["kinds"]["reader"]["exact_match"] >= 0.95
    assert abs(s["lrshared"]["exact_match"] - s["nonshared"]["exact_match"]) <= 0.02
    assert s["lrshared"]["kl_max"] < 1e-4                                   # lrshared is exact on this recipe
