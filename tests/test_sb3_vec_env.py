"""TokenMaskSB3VecEnv: SB3's VecEnv protocol, VecMonitor, PPO and MaskablePPO on the batched env."""

from __future__ import annotations

import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecMonitor

from tests.conftest import TEST_SEQ_LEN
from tokencompress_env.reconstructor import Reconstructor
from tokencompress_env.sb3_vec_env import TokenMaskSB3VecEnv
from tokencompress_env.vector_env import TokenMaskVectorEnv

CHUNK = 16
N = 4
STEPS = TEST_SEQ_LEN // CHUNK


@pytest.fixture()
def vec_env(test_reconstructor: Reconstructor, test_windows: dict[str, np.ndarray]) -> TokenMaskSB3VecEnv:
    return TokenMaskSB3VecEnv(
        num_envs=N,
        reconstructor=test_reconstructor,
        windows=test_windows["train"][:64],
        seq_len=TEST_SEQ_LEN,
        chunk_size=CHUNK,
        keep_digits=True,
    )


def test_vec_env_protocol(vec_env: TokenMaskSB3VecEnv) -> None:
    vec_env.seed(11)
    obs = vec_env.reset()
    assert obs["token_ids"].shape == (N, TEST_SEQ_LEN)
    assert [info["window_index"] for info in vec_env.reset_infos] == list(vec_env.venv.core.window_index)
    first_windows = [info["window_index"] for info in vec_env.reset_infos]
    vec_env.seed(11)
    vec_env.reset()
    assert [info["window_index"] for info in vec_env.reset_infos] == first_windows
    for step in range(STEPS):
        obs, rewards, dones, infos = vec_env.step(np.ones((N, CHUNK), dtype=np.int8))
        assert rewards.dtype == np.float32 and rewards.shape == (N,) and len(infos) == N
        assert dones.all() == (step == STEPS - 1)
    for info, reset_info in zip(infos, vec_env.reset_infos):
        assert info["terminal_observation"]["position"][0] == TEST_SEQ_LEN
        assert info["TimeLimit.truncated"] is False
        assert info["n_decided"] > 0 and reset_info["n_decided"] == 0
    assert (obs["position"] == 0).all()
    masks = vec_env.env_method("action_masks")
    assert len(masks) == N and all(m.shape == (2 * CHUNK,) for m in masks)
    np.testing.assert_array_equal(np.stack(masks), vec_env.action_masks())
    assert vec_env.env_method("action_masks", indices=[2])[0].shape == (2 * CHUNK,)
    assert vec_env.has_attr("action_masks") and not vec_env.has_attr("no_such_thing")
    assert vec_env.get_attr("chunk_size") == [CHUNK] * N
    assert vec_env.get_attr("chunk_size", indices=[0, 3]) == [CHUNK, CHUNK]
    vec_env.set_attr("extra", 5)
    assert vec_env.get_attr("extra", indices=1) == [5]
    with pytest.raises(ValueError, match="all envs"):
        vec_env.set_attr("extra", 6, indices=[0])
    assert vec_env.env_is_wrapped(Monitor) == [False] * N
    vec_env.set_options({"target_mask_rate": 0.3})
    vec_env.reset()
    assert all(info["target_mask_rate"] == 0.3 for info in vec_env.reset_infos)
    vec_env.close()


def test_vec_monitor_reports_episode_return(vec_env: TokenMaskSB3VecEnv) -> None:
    monitored = VecMonitor(vec_env)
    monitored.reset()
    totals = np.zeros(N)
    for _ in range(STEPS):
        _, rewards, _, infos = monitored.step(np.zeros((N, CHUNK), dtype=np.int8))
        totals += rewards
    for i, info in enumerate(infos):
        assert info["episode"]["l"] == STEPS
        assert info["episode"]["r"] == pytest.approx(totals[i], abs=1e-4)
    assert len(monitored.env_method("action_masks")) == N


def test_ppo_smoke_2000_steps(vec_env: TokenMaskSB3VecEnv) -> None:
    env = VecMonitor(vec_env)
    model = PPO("MultiInputPolicy", env, n_steps=64, batch_size=128, n_epochs=1, seed=0, device="cpu", policy_kwargs={"net_arch": [32]})
    model.learn(total_timesteps=2000)
    assert model.num_timesteps >= 2000
    assert len(model.ep_info_buffer) == model.ep_info_buffer.maxlen  # 500 episodes ended, the last 100 are kept
    assert all(ep["l"] == STEPS for ep in model.ep_info_buffer)
    returns = [ep["r"] for ep in model.ep_info_buffer]
    assert np.isfinite(returns).all()
    actions, _ = model.predict(env.reset(), deterministic=True)
    assert actions.shape == (N, CHUNK)


def test_maskable_ppo_never_drops_protected_tokens(test_reconstructor: Reconstructor, test_windows: dict[str, np.ndarray]) -> None:
    from sb3_contrib import MaskablePPO

    windows = test_windows["train"][:64].copy()
    windows[:, ::3] = test_reconstructor.pad_token_id  # special tokens: force-kept, so many drops are forbidden
    venv = TokenMaskVectorEnv(num_envs=N, reconstructor=test_reconstructor, windows=windows, seq_len=TEST_SEQ_LEN, chunk_size=CHUNK)
    model = MaskablePPO("MultiInputPolicy", TokenMaskSB3VecEnv(venv), n_steps=32, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=N * 32)
    buffer = model.rollout_buffer
    actions = buffer.actions.reshape(-1, CHUNK)
    drop_allowed = buffer.action_masks.reshape(-1, CHUNK, 2)[:, :, 1].astype(bool)
    assert (~drop_allowed).any() and drop_allowed.any()
    assert not (actions.astype(bool) & ~drop_allowed).any()
