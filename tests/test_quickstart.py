"""The quickstart's job end to end on a tiny config, and how it describes its training stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.ablate import VARIANTS
from experiments.config import build_config, load_config_file
from experiments.quickstart import QuickstartConfig, describe_training, quickstart
from experiments.train_ppo import TrainConfig
from tokencompress_env.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def test_quickstart_config_is_its_validated_ablation_variant() -> None:
    """The quickstart trains what the ablation measured: its base config plus the variant's keys."""
    file = CONFIGS / "dev" / "quickstart.json"
    quick = load_config_file(file)
    base = load_config_file(CONFIGS / "dev" / "small_scale.json")
    expected = base | VARIANTS[json.loads(file.read_text())["_ablation_variant"]]
    for values in (quick, expected):
        values.pop("run_name")
    assert quick == expected


def test_describe_training_names_each_stage() -> None:
    both = build_config(TrainConfig, {"distill_steps": 10, "total_timesteps": 64}, where="test")
    assert describe_training(both) == (
        "distillation from the reconstructor (10 labelled batches), then PPO jointly with the reconstructor (64 steps)"
    )
    distill_only = build_config(TrainConfig, {"distill_steps": 10, "total_timesteps": 0}, where="test")
    assert describe_training(distill_only).endswith("(no RL)")
    frozen = build_config(TrainConfig, {"distill_steps": 0, "total_timesteps": 64, "joint_training": False}, where="test")
    assert describe_training(frozen) == "PPO with a frozen reconstructor (64 steps)"


def test_quickstart_trains_evaluates_and_reuses_the_run(
    tmp_path: Path, test_reconstructor_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    debug = load_config_file(CONFIGS / "dev" / "debug.json")
    train_config = tmp_path / "train.json"
    train_config.write_text(json.dumps(debug | {"distill_steps": 3, "total_timesteps": 0, "tensorboard": False}))
    config = QuickstartConfig(
        runs_dir=str(tmp_path / "runs"),
        train_config=str(train_config),
        mask_rates=[0.4],
        max_windows=4,
        methods=["policy", "frequency"],
        device="cpu",
        progress_bar=False,
    )
    summary = quickstart(config)
    out = capsys.readouterr().out
    assert "2/3 agent: distillation from the reconstructor (3 labelled batches) (no RL)" in out
    run_dir = Path(summary["run_dir"])
    assert run_dir == tmp_path / "runs" / "quickstart"
    records = json.loads(Path(summary["outputs"]["embedded_test"]["json"]).read_text())
    # the held-out test split, both methods at the requested rate; no RL, so scored by the reference only
    assert {r["method"] for r in records} == {"policy", "frequency"}
    assert {r["split"] for r in records} == {"test"} and {r["reconstructor"] for r in records} == {"reference"}
    assert all(r["requested_mask_rate"] == 0.4 for r in records)
    assert json.loads((run_dir / "quickstart.json").read_text())["timings"]["total_s"] > 0
    # a second call reuses the finished run instead of training again
    quickstart(config)
    assert "reusing the finished run" in capsys.readouterr().out
    # a run folder of another training config (e.g. the earlier quickstart's) is refused, not reused
    other = debug | {"distill_steps": 3, "total_timesteps": 0, "tensorboard": False, "distill_target": "cost"}
    train_config.write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"another training config.*distill_target"):
        quickstart(config)
