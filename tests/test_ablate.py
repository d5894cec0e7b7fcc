"""experiments.ablate: variants x seeds trained, evaluated together on the validation split, one table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from experiments.ablate import VARIANTS, AblateConfig, ablate
from tokencompress_env.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "experiments" / "configs" / "dev" / "debug.json"


def test_ablation_trains_each_variant_and_tabulates(tmp_path: Path, test_reconstructor_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import experiments.train_ppo as train_ppo

    distillations: list[int] = []
    real_distill = train_ppo.distill_policy

    def counting_distill(*args: Any, **kwargs: Any) -> Any:
        distillations.append(kwargs["seed"])
        return real_distill(*args, **kwargs)

    monkeypatch.setattr(train_ppo, "distill_policy", counting_distill)
    base = json.loads(DEBUG.read_text()) | {"distill_steps": 2, "total_timesteps": 64, "tensorboard": False}
    config_file = tmp_path / "base.json"
    config_file.write_text(json.dumps(base))
    config = AblateConfig(
        base_config=str(config_file),
        variants=["distill_only", "distill_ppo", "distill_ppo_decisions", "distill_token_ppo"],
        seeds=[0, 1],
        runs_dir=str(tmp_path / "runs"),
        max_windows=6,
        mask_rates=[0.4],
        device="cpu",
    )
    summary = ablate(config)
    rows = summary["rows"]
    for variant in config.variants:
        cell = rows[variant]["0.4"]
        assert len(cell["seeds"]) == 2 and cell["std"] >= 0
        for baseline in ("frequency", "self_information"):
            assert cell["vs"][baseline]["difference"] is not None
    # distill_ppo continued each seed's distill_only run; the decision-aware policy distilled its own;
    # distill_token_ppo started from the distilled policy without distilling again
    assert sorted(distillations) == [0, 0, 1, 1]
    token_config = json.loads((tmp_path / "runs" / "distill_token_ppo__s1" / "config.json").read_text())
    assert token_config["algo"] == "token_ppo" and token_config["distill_steps"] == 0
    assert Path(token_config["init_policy"]) == tmp_path / "runs" / "distill_only__s1"
    runs = tmp_path / "runs"
    branched = json.loads((runs / "distill_ppo__s1" / "state.json").read_text())
    assert branched["num_timesteps"] >= 64
    assert json.loads((runs / "distill_ppo__s1" / "config.json").read_text())["total_timesteps"] == 64
    # the variants really differ in what was trained
    distill_only = json.loads((runs / "distill_only__s1" / "config.json").read_text())
    assert distill_only["total_timesteps"] == 0 and distill_only["seed"] == 1
    assert json.loads((runs / "distill_ppo_decisions__s0" / "config.json").read_text())["use_decisions"] is True
    table = (runs / "results" / "ablation.md").read_text()
    assert "validation split" in table and "| distill_ppo_decisions |" in table and "| self_information |" in table
    # each variant against distill_only, paired by window: the difference of the two pooled policies
    assert "distill_only" not in rows["distill_only"]["0.4"].get("vs_variant", {})
    for variant in ("distill_ppo", "distill_token_ppo"):
        pooled = {}
        for name in (variant, "distill_only"):
            records = json.loads((runs / "results" / name / "results.json").read_text())
            [policy] = [r for r in records if r["method"] == "policy" and r["run"] == "pooled" and r["reconstructor"] == "reference"]
            pooled[name] = policy["bits_per_masked_token"]
        versus = rows[variant]["0.4"]["vs_variant"]["distill_only"]
        assert versus["difference"] == pytest.approx(pooled[variant] - pooled["distill_only"])
        assert versus["ci95"][0] <= versus["difference"] <= versus["ci95"][1]
        assert f"| {variant} − distill_only |" in table
    # a run whose reconstructor was never fine-tuned is scored once; a jointly trained one by both
    scored_by = {
        name: {r["reconstructor"] for r in json.loads((runs / "results" / name / "results.json").read_text())}
        for name in ("distill_only", "distill_ppo")
    }
    assert scored_by == {"distill_only": {"reference"}, "distill_ppo": {"reference", "joint"}}
    # a second call reuses the finished runs and their evaluations
    import experiments.ablate as ablate_module

    evaluations: list[object] = []
    real_evaluation = ablate_module.run_evaluation

    def counting_evaluation(eval_config: Any) -> Any:
        evaluations.append(eval_config)
        return real_evaluation(eval_config)

    monkeypatch.setattr(ablate_module, "run_evaluation", counting_evaluation)
    assert ablate(config)["rows"]["distill_only"]["0.4"]["mean"] == pytest.approx(rows["distill_only"]["0.4"]["mean"])
    assert evaluations == []
    # other evaluation options: evaluated again
    config.max_windows = 4
    ablate(config)
    assert len(evaluations) == len(config.variants)


def test_unknown_variant_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown variant"):
        AblateConfig(variants=["distil_only"]).validate()
    with pytest.raises(ConfigError, match="compare_to"):
        AblateConfig(compare_to="distill").validate()
    assert set(VARIANTS) >= {"distill_only", "ppo_only", "distill_ppo", "distill_ppo_frozen", "distill_ppo_decisions"}


def test_the_default_variants_leave_out_the_opt_in_ones() -> None:
    from experiments.ablate import OPT_IN_VARIANTS

    default = AblateConfig().variants
    assert "search_teacher_only" in OPT_IN_VARIANTS and "search_teacher_only" not in default
    assert set(default) | set(OPT_IN_VARIANTS) == set(VARIANTS)
