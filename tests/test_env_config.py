"""EnvConfig: the one declaration of TokenMask-v0's options, shared by the envs, the reward and the training config."""

from __future__ import annotations

import dataclasses

import pytest

from experiments.config import parse_config_values
from experiments.train_ppo import ENV_OPTIONS, TrainConfig
from tokencompress_env.env_config import EnvConfig
from tokencompress_env.errors import ConfigError
from tokencompress_env.options import option_docs
from tokencompress_env.reward import RewardConfig


def test_every_option_is_documented_once_at_its_field() -> None:
    docs = option_docs(EnvConfig)
    assert all(docs.values()), [name for name, doc in docs.items() if not doc]
    assert set(option_docs(RewardConfig)) < set(docs)  # the reward coefficients are EnvConfig fields


def test_from_options_accepts_the_gymnasium_keywords_and_the_older_range_keyword() -> None:
    config = EnvConfig.from_options(seq_len=64, chunk_size=8, mask_rate_range=(0.3, 0.5), force_keep_strings=["abc"])
    assert (config.mask_rate_min, config.mask_rate_max) == (0.3, 0.5)
    assert config.force_keep_strings == ("abc",) and config.seq_len == 64
    assert EnvConfig.from_options(config, keep_digits=True) == dataclasses.replace(config, keep_digits=True)
    with pytest.raises(ConfigError, match="not both"):
        EnvConfig.from_options(mask_rate_range=(0.3, 0.5), mask_rate_min=0.1)
    with pytest.raises(ConfigError, match="mask_rate_range"):
        EnvConfig.from_options(mask_rate_range=(0.8, 0.2))
    with pytest.raises(ConfigError, match="did you mean 'seq_len'"):
        EnvConfig.from_options(seq_length=64)


def test_reward_config_is_the_reward_part_of_the_env_config() -> None:
    config = EnvConfig(bits_saved_per_mask=6.0, rate_penalty=20.0)
    assert config.reward_config() == RewardConfig(bits_saved_per_mask=6.0, rate_penalty=20.0)
    with pytest.raises(ConfigError, match="rate_penalty"):
        EnvConfig(rate_penalty=4.0)


def test_train_config_takes_its_env_options_from_env_config() -> None:
    train, env = TrainConfig(), EnvConfig()
    docs, env_docs = option_docs(TrainConfig), option_docs(EnvConfig)
    for name in ENV_OPTIONS:
        assert getattr(train, name) == getattr(env, name) and docs[name] == env_docs[name], name
    custom = dataclasses.replace(train, seq_len=64, mask_rate_min=0.1, keep_digits=True, rate_penalty=30.0)
    config = custom.env_config("validation")
    assert (config.split, config.seq_len, config.mask_rate_min, config.keep_digits, config.rate_penalty) == (
        "validation",
        64,
        0.1,
        True,
        30.0,
    )


def test_help_prints_each_field_doc(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config_values(TrainConfig, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "lowest per-episode target mask rate" in text and "(default: 0.2)" in text
    assert "PPO minibatch size (default: 128)" in text
