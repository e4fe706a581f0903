"""Every shipped training recipe loads and validates (typos in a recipe fail here, not after a long launch)."""
from pathlib import Path

import pytest

from lragent.train.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 2


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.lora.rank >= 1 and cfg.train.max_steps >= 1 and cfg.output_dir
