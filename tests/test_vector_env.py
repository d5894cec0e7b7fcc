"""TokenMaskVectorEnv: make_vec, batched-equals-single, one forward per step, same-step autoreset."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from tests.conftest import TEST_SEQ_LEN
from tokencompress_env.env import TokenMaskEnv
from tokencompress_env.reconstructor import Reconstructor
from tokencompress_env.registration import ENV_ID
from tokencompress_env.vector_env import TokenMaskVectorEnv

CHUNK = 16
N = 4
STEPS = TEST_SEQ_LEN // CHUNK


@pytest.fixture(scope="module")
def windows(test_windows: dict[str, np.ndarray]) -> np.ndarray:
    return test_windows["validation"][:24]


def test_make_vec_returns_native_vector_env(test_reconstructor_dir: Path, test_windows: dict[str, np.ndarray]) -> None:
    venv = gym.make_vec(
        ENV_ID,
        num_envs=N,
        vectorization_mode="vector_entry_point",
        reconstructor=str(test_reconstructor_dir),
        seq_len=TEST_SEQ_LEN,
        chunk_size=CHUNK,
    )
    assert isinstance(venv, TokenMaskVectorEnv)
    assert venv.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    assert venv.spec is not None and '"num_envs": 4' in venv.spec.to_json()
    obs, infos = venv.reset(seed=0)
    assert obs["token_ids"].shape == (N, TEST_SEQ_LEN) and obs["position"].shape == (N, 1)
    assert obs in venv.observation_space
    assert venv.action_space.shape == (N, CHUNK)
    assert infos["mask_rate"].shape == (N,) and infos["_mask_rate"].all()
    assert venv.action_masks().shape == (N, 2 * CHUNK)


def _assert_obs_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-4, err_msg=key)


@pytest.mark.parametrize("observe_surprisal", [False, True])
def test_batched_equals_single(test_reconstructor: Reconstructor, windows: np.ndarray, observe_surprisal: bool) -> None:
    kwargs = {
        "reconstructor": test_reconstructor,
        "windows": windows,
        "seq_len": TEST_SEQ_LEN,
        "chunk_size": CHUNK,
        "observe_surprisal": observe_surprisal,
    }
    venv = TokenMaskVectorEnv(num_envs=N, **kwargs)  # type: ignore[arg-type]
    singles = [TokenMaskEnv(**kwargs) for _ in range(N)]  # type: ignore[arg-type]
    obs, infos = venv.reset(seed=42)
    for i, env in enumerate(singles):
        single_obs, single_info = env.reset(seed=42 + i)
        _assert_obs_equal({k: v[i] for k, v in obs.items()}, single_obs)
        assert infos["window_index"][i] == single_info["window_index"]
    rng = np.random.default_rng(0)
    for step in range(2 * STEPS + 1):  # crosses one autoreset
        actions = rng.integers(0, 2, (N, CHUNK))
        obs, rewards, terminated, truncated, infos = venv.step(actions)
        assert not truncated.any()
        for i, env in enumerate(singles):
            s_obs, s_reward, s_term, _, s_info = env.step(actions[i])
            assert terminated[i] == s_term == ((step + 1) % STEPS == 0)
            assert rewards[i] == pytest.approx(s_reward, abs=1e-5)
            if s_term:
                _assert_obs_equal(infos["final_obs"][i], s_obs)
                final = infos["final_info"]
                assert final["n_masked"][i] == s_info["n_masked"]
                assert final["masked_bits_total"][i] == pytest.approx(s_info["masked_bits_total"], abs=1e-3)
                s_obs, s_info = env.reset()  # what same-step autoreset does for a single env
            _assert_obs_equal({k: v[i] for k, v in obs.items()}, s_obs)
            assert infos["window_index"][i] == s_info["window_index"]
            assert infos["mask_rate"][i] == pytest.approx(s_info["mask_rate"])


@pytest.mark.parametrize("scoring_dtype", ["float32", "bfloat16"])
def test_one_reconstructor_forward_per_step(test_reconstructor: Reconstructor, windows: np.ndarray, scoring_dtype: str) -> None:
    venv = TokenMaskVectorEnv(
        num_envs=N, reconstructor=test_reconstructor, windows=windows, seq_len=TEST_SEQ_LEN, chunk_size=CHUNK, scoring_dtype=scoring_dtype
    )
    venv.reset(seed=0)
    # Every forward pass of the scoring model (the master, or its bfloat16 copy) starts at its token embedding.
    scoring_model = test_reconstructor.inference_model(venv.core.scorer.dtype)
    assert next(scoring_model.parameters()).dtype == getattr(torch, scoring_dtype)
    calls: list[tuple[int, ...]] = []
    hook = scoring_model.get_input_embeddings().register_forward_pre_hook(lambda _module, args: calls.append(tuple(args[0].shape)))
    try:
        for _ in range(STEPS - 1):
            venv.step(np.ones((N, CHUNK), dtype=np.int8))
    finally:
        hook.remove()
    assert calls == [(N, CHUNK)] * (STEPS - 1)


def test_same_step_autoreset_and_per_row_options(test_reconstructor: Reconstructor, windows: np.ndarray) -> None:
    venv = TokenMaskVectorEnv(num_envs=N, reconstructor=test_reconstructor, windows=windows, seq_len=TEST_SEQ_LEN, chunk_size=CHUNK)
    obs, infos = venv.reset(seed=3, options={"target_mask_rate": [0.1, None, 0.9, None], "window_index": 5})
    assert (infos["window_index"] == 5).all()
    assert infos["target_mask_rate"][0] == 0.1 and infos["target_mask_rate"][2] == 0.9
    for _ in range(STEPS):
        obs, _, terminated, _, infos = venv.step(np.ones((N, CHUNK), dtype=np.int8))
    assert terminated.all() and infos["_final_obs"].all() and infos["_final_info"].all()
    assert (obs["position"] == 0).all() and (obs["decisions"] == 0).all()
    assert all(o["position"][0] == TEST_SEQ_LEN for o in infos["final_obs"])
    assert (infos["final_info"]["mask_rate"] == 1.0).all() and (infos["mask_rate"] == 0.0).all()
    # After autoreset the next step is an ordinary first step (no final_obs).
    _, _, terminated, _, infos = venv.step(np.zeros((N, CHUNK), dtype=np.int8))
    assert not terminated.any() and "final_obs" not in infos
