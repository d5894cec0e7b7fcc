"""Every shipped config loads into the dataclass of the script it belongs to, so none rots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.config import build_config, load_config_file
from experiments.evaluate import EvaluateConfig
from experiments.prepare_data import PrepareDataConfig
from experiments.train_ppo import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"

#: Which script each config file belongs to.
OWNER = {
    "dev/debug.json": TrainConfig,
    "dev/small_scale.json": TrainConfig,
    "dev/quickstart.json": TrainConfig,
    "dev/quick_eval.json": EvaluateConfig,
    "dev/sample_data.json": PrepareDataConfig,
    "prod/standard.json": TrainConfig,
    "prod/apple_silicon.json": TrainConfig,
    "prod/data_prep.json": PrepareDataConfig,
    "prod/evaluation.json": EvaluateConfig,
    "prod/cpu_wikitext.json": TrainConfig,
}


def test_every_config_file_is_known():
    found = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.json")}
    assert found == set(OWNER)


@pytest.mark.parametrize("name", sorted(OWNER))
def test_config_loads_and_validates(name):
    values = load_config_file(CONFIGS / name)
    assert values, name
    config = build_config(OWNER[name], values, where=name)
    for key, value in values.items():
        loaded = getattr(config, key)
        assert loaded == value or list(loaded) == value, key
    assert "_comment" in json.loads((CONFIGS / name).read_text())
