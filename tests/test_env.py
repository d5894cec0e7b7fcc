"""TokenMask-v0, the single environment: registration, checkers, determinism, reward, force-keep."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.envs.registration import EnvSpec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokencompress_env
from tests.conftest import TEST_SEQ_LEN
from tokencompress_env.env import TokenMaskEnv
from tokencompress_env.errors import ConfigError, InputError, TokenCompressError
from tokencompress_env.observation import Decision
from tokencompress_env.reconstructor import Reconstructor
from tokencompress_env.registration import ENV_ID, register_envs

CHUNK = 16

#: Warnings the checkers may emit for this env and that are expected (none is known today).
ALLOWED_WARNINGS: tuple[str, ...] = (r"is different from the unwrapped version",)


def _unexpected(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if not any(re.search(p, str(w.message)) for p in ALLOWED_WARNINGS)]


def make_env(reconstructor: Reconstructor, windows: np.ndarray, **kwargs: object) -> TokenMaskEnv:
    return TokenMaskEnv(reconstructor=reconstructor, windows=windows, seq_len=TEST_SEQ_LEN, chunk_size=CHUNK, **kwargs)  # type: ignore[arg-type]


def run_episode(env: gym.Env, actions: list[np.ndarray]) -> tuple[list[dict], list[float], list[dict]]:
    observations, rewards, infos = [], [], []
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        observations.append(obs)
        rewards.append(reward)
        infos.append(info)
        if terminated or truncated:
            break
    return observations, rewards, infos


@pytest.fixture(scope="module")
def windows(test_windows: dict[str, np.ndarray]) -> np.ndarray:
    return test_windows["validation"][:32]


@pytest.fixture(scope="module")
def env(test_reconstructor: Reconstructor, windows: np.ndarray) -> TokenMaskEnv:
    return make_env(test_reconstructor, windows)


# ---------------------------------------------------------------------------------------------- registration
def test_registration_is_idempotent_with_both_entry_points() -> None:
    spec = gym.spec(ENV_ID)
    register_envs()
    register_envs()
    assert gym.spec(ENV_ID) is spec
    assert spec.entry_point == "tokencompress_env.env:TokenMaskEnv"
    assert spec.vector_entry_point == "tokencompress_env.vector_env:TokenMaskVectorEnv"
    assert tokencompress_env.ENV_ID == ENV_ID


def test_make_spec_to_json_round_trip(test_reconstructor_dir: Path, test_windows: dict[str, np.ndarray]) -> None:
    env = gym.make(ENV_ID, reconstructor=str(test_reconstructor_dir), seq_len=TEST_SEQ_LEN, chunk_size=CHUNK, mask_rate_range=(0.3, 0.5))
    text = env.spec.to_json()
    assert json.loads(text)["kwargs"]["mask_rate_range"] == [0.3, 0.5]
    again = gym.make(EnvSpec.from_json(text))
    obs_a, info_a = env.reset(seed=5)
    obs_b, info_b = again.reset(seed=5)
    assert info_a == info_b
    for key in obs_a:
        np.testing.assert_array_equal(obs_a[key], obs_b[key])
    assert 0.3 <= info_a["target_mask_rate"] <= 0.5


def test_make_without_arguments_in_fresh_subprocess(test_reconstructor_dir: Path, tc_home: Path) -> None:
    code = (
        "import gymnasium, numpy as np\n"
        "env = gymnasium.make('tokencompress_env:TokenMask-v0')\n"
        "obs, info = env.reset(seed=0)\n"
        "obs, r, term, trunc, info = env.step(np.zeros(16, dtype=np.int8))\n"
        "print(obs['token_ids'].shape[0], env.unwrapped.chunk_size, type(r).__name__, info['n_decided'])\n"
    )
    child_env = {**os.environ, "TOKENCOMPRESS_HOME": str(tc_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["128", "16", "float", "16"]


# ---------------------------------------------------------------------------------------------- checkers
def test_gymnasium_check_env(test_reconstructor_dir: Path, test_windows: dict[str, np.ndarray]) -> None:
    from gymnasium.utils.env_checker import check_env

    for kwargs in ({}, {"observe_surprisal": True, "reward_type": "simple", "keep_digits": True}):
        env = gym.make(
            ENV_ID, reconstructor=str(test_reconstructor_dir), seq_len=TEST_SEQ_LEN, chunk_size=CHUNK, render_mode="ansi", **kwargs
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(env.unwrapped)
        assert _unexpected(caught) == []


def test_sb3_check_env(test_reconstructor_dir: Path, test_windows: dict[str, np.ndarray]) -> None:
    from stable_baselines3.common.env_checker import check_env

    env = gym.make(ENV_ID, reconstructor=str(test_reconstructor_dir), seq_len=TEST_SEQ_LEN, chunk_size=CHUNK, observe_surprisal=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, warn=True)
    assert _unexpected(caught) == []


# ---------------------------------------------------------------------------------------------- determinism, pickle
def test_same_seed_same_episode(test_reconstructor: Reconstructor, windows: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    actions = [rng.integers(0, 2, CHUNK) for _ in range(TEST_SEQ_LEN // CHUNK)]
    runs = []
    for _ in range(2):
        env = make_env(test_reconstructor, windows)
        first, info = env.reset(seed=123)
        runs.append((first, info, *run_episode(env, actions)))
    (obs_a, info_a, steps_a, rewards_a, infos_a), (obs_b, info_b, steps_b, rewards_b, infos_b) = runs
    assert info_a == info_b and rewards_a == rewards_b and infos_a == infos_b
    for a, b in zip([obs_a, *steps_a], [obs_b, *steps_b]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = make_env(test_reconstructor, windows)
    _, info_c = other.reset(seed=124)
    assert (info_c["window_index"], info_c["target_mask_rate"]) != (info_a["window_index"], info_a["target_mask_rate"])


def test_pickle_mid_episode_continues_identically(env: TokenMaskEnv) -> None:
    env.reset(seed=7)
    rng = np.random.default_rng(1)
    env.step(rng.integers(0, 2, CHUNK))
    clone = pickle.loads(pickle.dumps(env))
    actions = [rng.integers(0, 2, CHUNK) for _ in range(3)]
    _, rewards_a, infos_a = run_episode(env, actions)
    _, rewards_b, infos_b = run_episode(clone, actions)
    np.testing.assert_allclose(rewards_a, rewards_b, rtol=1e-5, atol=1e-6)
    assert [i["n_masked"] for i in infos_a] == [i["n_masked"] for i in infos_b]
    assert env.reset()[1] == clone.reset()[1]  # the random generator travelled too


# ---------------------------------------------------------------------------------------------- dynamics
def test_episode_length_decisions_and_info(env: TokenMaskEnv) -> None:
    obs, info = env.reset(seed=0, options={"target_mask_rate": 0.25, "window_index": 3})
    assert info["window_index"] == 3 and info["target_mask_rate"] == 0.25
    assert obs["position"][0] == 0 and (obs["decisions"] == 0).all()
    assert obs["target_mask_rate"][0] == np.float32(0.25)
    steps = 0
    terminated = False
    while not terminated:
        obs, _, terminated, truncated, info = env.step(np.tile([1, 0], CHUNK // 2))
        steps += 1
        assert not truncated
        assert obs["position"][0] == steps * CHUNK
    assert steps == TEST_SEQ_LEN // CHUNK
    dropped = obs["decisions"] == Decision.MASKED
    assert ((obs["decisions"] == Decision.KEPT) | dropped).all()
    assert info["n_masked"] == dropped.sum() and info["n_decided"] == TEST_SEQ_LEN
    assert info["mask_rate"] == pytest.approx(dropped.sum() / TEST_SEQ_LEN)
    with pytest.raises(gym.error.ResetNeeded):
        env.step(np.zeros(CHUNK, dtype=np.int8))


def test_padding_is_kept_and_excluded_from_the_rate(test_reconstructor: Reconstructor, windows: np.ndarray) -> None:
    short = [windows[0, :40], windows[1, :64]]
    env = make_env(test_reconstructor, short)  # type: ignore[arg-type]
    obs, info = env.reset(seed=0, options={"window_index": 0})
    assert obs["valid"].sum() == 40 and info["n_valid"] == 40
    for _ in range(TEST_SEQ_LEN // CHUNK):
        obs, _, _, _, info = env.step(np.ones(CHUNK, dtype=np.int8))
    assert (obs["decisions"][40:] == Decision.KEPT).all() and (obs["decisions"][:40] == Decision.MASKED).all()
    assert info["mask_rate"] == 1.0 and info["n_masked"] == 40
    assert (obs["token_ids"][40:] == test_reconstructor.pad_token_id).all()


def test_invalid_arguments_raise_clear_errors(test_reconstructor: Reconstructor, windows: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="multiple of chunk_size"):
        TokenMaskEnv(reconstructor=test_reconstructor, windows=windows, seq_len=64, chunk_size=24)
    with pytest.raises(TokenCompressError, match="context"):
        TokenMaskEnv(reconstructor=test_reconstructor, seq_len=test_reconstructor.max_seq_len + 1, chunk_size=1)
    with pytest.raises(ConfigError, match="rate_penalty"):
        make_env(test_reconstructor, windows, rate_penalty=4.0)
    with pytest.raises(ConfigError, match="reward_type"):
        make_env(test_reconstructor, windows, reward_type="bleu")
    with pytest.raises(ConfigError, match="mask_rate_range"):
        make_env(test_reconstructor, windows, mask_rate_range=(0.8, 0.2))
    env = make_env(test_reconstructor, windows)
    env.reset(seed=0)
    with pytest.raises(InputError, match="shape"):
        env.step(np.zeros(CHUNK + 1, dtype=np.int8))


#: Arguments of the wrong type or value (issue 14): ``gymnasium.make`` passes them through, the env rejects them.
BAD_KWARGS: list[tuple[str, dict[str, object], str]] = [
    ("seq-len-str", {"seq_len": "128"}, r"seq_len must be an integer, got '128' \(str\)"),
    ("chunk-size-float", {"chunk_size": 16.0}, "chunk_size must be an integer"),
    ("chunk-size-0", {"chunk_size": 0}, "must be positive"),
    ("keep-digits-no", {"keep_digits": "no"}, r"keep_digits must be True or False, got 'no'"),
    ("observe-surprisal-1", {"observe_surprisal": 1}, "observe_surprisal must be True or False"),
    ("units-unknown", {"units": "token"}, "units must be one of 'piece', 'word'"),
    ("force-keep-not-str", {"force_keep_strings": [3]}, "force_keep_strings must be a string or a list of strings"),
    ("split-not-str", {"split": 1}, "split must be a string"),
]


@pytest.mark.parametrize(("kwargs", "match"), [c[1:] for c in BAD_KWARGS], ids=[c[0] for c in BAD_KWARGS])
def test_make_rejects_ill_typed_arguments(test_reconstructor_dir: Path, kwargs: dict[str, object], match: str) -> None:
    base = {"reconstructor": str(test_reconstructor_dir), "seq_len": TEST_SEQ_LEN, "chunk_size": CHUNK}
    with pytest.raises(ConfigError, match=match):
        gym.make(ENV_ID, **{**base, **kwargs})


#: Malformed actions (issue 14): never reshaped, never read as "drop".
BAD_ACTIONS: list[tuple[str, object, str]] = [
    ("reshaped-4x4", np.zeros((4, 4), dtype=np.int8), r"shape \(16,\)"),
    ("batched", np.zeros((1, CHUNK), dtype=np.int8), r"shape \(16,\)"),
    ("too-short", [0, 1], r"shape \(16,\)"),
    ("two", np.full(CHUNK, 2), "must be 0 .keep. or 1 .drop., got 2"),
    ("negative", np.full(CHUNK, -1), "got -1"),
    ("nan", np.full(CHUNK, np.nan), "got nan"),
    ("half", np.full(CHUNK, 0.5), "got 0.5"),
    ("strings", np.array(["1"] * CHUNK), "must be 0 .keep. or 1 .drop., got '1'"),
    ("objects", np.array([None] * CHUNK), "must be 0 .keep. or 1 .drop."),
]


@pytest.mark.parametrize(("action", "match"), [c[1:] for c in BAD_ACTIONS], ids=[c[0] for c in BAD_ACTIONS])
def test_step_rejects_malformed_actions(env: TokenMaskEnv, action: object, match: str) -> None:
    env.reset(seed=0)
    with pytest.raises(InputError, match=match):
        env.step(action)  # type: ignore[arg-type]
    obs, *_ = env.step(np.ones(CHUNK, dtype=np.float32))  # the episode goes on: 0.0 and 1.0 floats are fine
    assert obs["position"][0] == CHUNK


def test_vector_env_rejects_malformed_actions_and_options(test_reconstructor: Reconstructor, windows: np.ndarray) -> None:
    from tokencompress_env.vector_env import TokenMaskVectorEnv

    venv = TokenMaskVectorEnv(num_envs=2, reconstructor=test_reconstructor, windows=windows, seq_len=TEST_SEQ_LEN, chunk_size=CHUNK)
    venv.reset(seed=0)
    with pytest.raises(InputError, match=r"shape \(2, 16\)"):
        venv.step(np.zeros(2 * CHUNK, dtype=np.int8))
    with pytest.raises(InputError, match="got nan"):
        venv.step(np.full((2, CHUNK), np.nan))
    with pytest.raises(InputError, match=r"unknown reset option.*'window'.*valid options: target_mask_rate, window_index"):
        venv.reset(options={"window": 1})


def test_reset_rejects_unknown_options(env: TokenMaskEnv) -> None:
    with pytest.raises(InputError, match=r"unknown reset option\(s\) \['target'\]; valid options: target_mask_rate, window_index"):
        env.reset(seed=0, options={"target": 0.5})
    with pytest.raises(InputError, match="must be a dict"):
        env.reset(seed=0, options=[("target_mask_rate", 0.5)])  # type: ignore[arg-type]


@pytest.mark.parametrize("units", ["piece", "word"])
def test_units_are_dropped_or_kept_whole(test_reconstructor: Reconstructor, units: str) -> None:
    from tokencompress_env.units import unit_index, unit_starts

    tok = test_reconstructor.tokenizer
    text = "Michigan in 1926 for several reasons: 你好，世界！ naïve café 🎉 and John's notes " * 3
    ids = tok(text, add_special_tokens=False)["input_ids"][:TEST_SEQ_LEN]
    env = make_env(test_reconstructor, np.array([ids]), units=units)
    index = unit_index(unit_starts(np.array(ids), None, tok, units)[None])[0]
    assert index[-1] + 1 < len(ids)  # some units have several tokens
    rng = np.random.default_rng(0)
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        done = False
        while not done:
            masks = env.action_masks().reshape(CHUNK, 2)
            action = (rng.random(CHUNK) < 0.5).astype(np.int8)
            action = np.where(masks[:, 1], np.where(masks[:, 0], action, 1), 0)  # a masked policy obeys action_masks
            obs, _, done, _, _ = env.step(action)
        dropped = obs["decisions"][: len(ids)] == Decision.MASKED
        for u in np.unique(index):
            assert len(set(dropped[index == u].tolist())) == 1, f"unit {u} split"
        kept = np.asarray(ids)[~dropped]
        assert "\ufffd" not in tok.decode(kept.tolist())


def test_set_reconstructor_applies_from_next_episode(
    test_reconstructor: Reconstructor, fresh_reconstructor: Reconstructor, windows: np.ndarray
) -> None:
    env = make_env(test_reconstructor, windows)
    env.reset(seed=0)
    env.set_reconstructor(fresh_reconstructor)
    assert env.reconstructor is test_reconstructor
    env.reset(seed=0)
    assert env.reconstructor is fresh_reconstructor


# ---------------------------------------------------------------------------------------------- reward
def _one_token_reward(env: TokenMaskEnv, window: int, position: int) -> tuple[float, dict]:
    env.reset(seed=0, options={"window_index": window, "target_mask_rate": 0.5})
    action = np.zeros(CHUNK, dtype=np.int8)
    action[position] = 1
    _, reward, _, _, info = env.step(action)
    return reward, info


def test_reward_sign_near_certain_drop_beats_surprising_drop(fresh_reconstructor: Reconstructor, windows: np.ndarray) -> None:
    # Make the reconstructor predict one token, `certain`, with near certainty at every position.
    window = windows[0]
    certain, position_certain = int(window[3]), 3
    position_other = next(j for j in range(CHUNK) if int(window[j]) != certain)
    model = fresh_reconstructor.model
    head = torch.nn.Linear(model.config.n_embd, fresh_reconstructor.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-20.0)
        head.bias[certain] = 20.0
    model.lm_head = head
    env = make_env(fresh_reconstructor, windows[:1])
    reward_certain, info_certain = _one_token_reward(env, 0, position_certain)
    reward_other, info_other = _one_token_reward(env, 0, position_other)
    assert info_certain["masked_bits"] < 1e-3 and info_other["masked_bits"] > 20.0
    assert reward_certain > reward_other
    assert info_certain["reward_rate"] == info_other["reward_rate"]  # one drop each: same rate term
    assert info_certain["reward_tokens"] == pytest.approx(8.0 / TEST_SEQ_LEN, abs=1e-4)
    assert info_other["reward_tokens"] == pytest.approx((8.0 - 20.0) / TEST_SEQ_LEN)  # clipped at 20 bits
    assert info_certain["recovery_accuracy"] == 1.0 and info_other["recovery_accuracy"] == 0.0


def test_reward_tracks_reconstructor_surprisal(test_reconstructor: Reconstructor, windows: np.ndarray) -> None:
    env = make_env(test_reconstructor, windows, scoring_dtype="float32")  # compared with float32 scores to 1e-4 bits
    bits = test_reconstructor.surprisal(windows[:, :CHUNK]).cpu().numpy()  # nothing masked before: same context as the env
    low = np.unravel_index(np.argmin(bits), bits.shape)
    high = np.unravel_index(np.argmax(bits), bits.shape)
    assert bits[high] - bits[low] > 2.0
    reward_low, info_low = _one_token_reward(env, int(low[0]), int(low[1]))
    reward_high, info_high = _one_token_reward(env, int(high[0]), int(high[1]))
    assert reward_low > reward_high
    assert info_low["reward_rate"] == pytest.approx(info_high["reward_rate"])  # one drop each: same rate term
    assert info_low["reward_tokens"] == pytest.approx((8.0 - bits[low]) / TEST_SEQ_LEN, abs=1e-4)
    assert info_high["reward_tokens"] == pytest.approx((8.0 - min(bits[high], 20.0)) / TEST_SEQ_LEN, abs=1e-4)
    assert info_low["masked_bits"] == pytest.approx(bits[low], abs=1e-4)


def test_bfloat16_scoring_moves_rewards_by_hundredths_of_a_bit(test_reconstructor: Reconstructor, windows: np.ndarray) -> None:
    envs = {dtype: make_env(test_reconstructor, windows, scoring_dtype=dtype) for dtype in ("float32", "bfloat16")}
    assert envs["bfloat16"].core.scorer.dtype == torch.bfloat16 and envs["float32"].core.scorer.dtype == torch.float32
    rng = np.random.default_rng(5)
    plans = [rng.integers(0, 2, (TEST_SEQ_LEN // CHUNK, CHUNK)) for _ in range(6)]
    bits: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for dtype, env in envs.items():
        for w, plan in enumerate(plans):
            env.reset(seed=0, options={"window_index": w, "target_mask_rate": 0.5})
            _, _, infos = run_episode(env, list(plan))
            bits[dtype].append(infos[-1]["masked_bits_total"] / max(infos[-1]["n_masked"], 1))
    gap = np.abs(np.array(bits["bfloat16"]) - np.array(bits["float32"]))
    assert np.mean(bits["float32"]) > 1.0  # real distortion, not a degenerate zero
    assert gap.max() < 0.1  # bits per dropped token, per episode
    assert not np.array_equal(bits["bfloat16"], bits["float32"])  # the copy really scores in bfloat16


def test_simple_reward_counts_recovered_and_wrong_drops(test_reconstructor: Reconstructor, windows: np.ndarray) -> None:
    env = make_env(test_reconstructor, windows, reward_type="simple")
    env.reset(seed=0, options={"window_index": 0})
    _, _, _, _, info = env.step(np.ones(CHUNK, dtype=np.int8))
    n, recovered = info["n_masked"], round(info["recovery_accuracy"] * info["n_masked"])
    assert info["reward_tokens"] == pytest.approx((n * 1.0 - 2.0 * (n - recovered)) / TEST_SEQ_LEN)


@pytest.mark.parametrize("reward_type", ["info_theoretic", "simple"])
def test_rate_shaping_telescopes_and_collapse_does_not_pay(
    test_reconstructor: Reconstructor, windows: np.ndarray, reward_type: str
) -> None:
    env = make_env(test_reconstructor, windows, reward_type=reward_type)
    penalty = env.reward_config.effective_rate_penalty
    target = 0.5
    bits = test_reconstructor.surprisal(windows).cpu().numpy()
    returns = {}
    for name in ("keep_all", "mask_all", "lowest_surprisal_at_target"):
        returns[name] = []
        for w in range(4):
            if name == "keep_all":
                plan = np.zeros(TEST_SEQ_LEN, dtype=np.int8)
            elif name == "mask_all":
                plan = np.ones(TEST_SEQ_LEN, dtype=np.int8)
            else:
                plan = np.zeros(TEST_SEQ_LEN, dtype=np.int8)
                plan[np.argsort(bits[w])[: int(target * TEST_SEQ_LEN)]] = 1
            env.reset(seed=0, options={"window_index": w, "target_mask_rate": target})
            _, rewards, infos = run_episode(env, list(plan.reshape(-1, CHUNK)))
            rate_total = sum(i["reward_rate"] for i in infos)
            expected = -penalty * abs(infos[-1]["mask_rate"] - target) * infos[-1]["n_valid"] / TEST_SEQ_LEN
            assert rate_total == pytest.approx(expected, abs=1e-9)
            returns[name].append(sum(rewards))
    best = np.mean(returns["lowest_surprisal_at_target"])
    assert best > np.mean(returns["keep_all"]) and best > np.mean(returns["mask_all"])


# ---------------------------------------------------------------------------------------------- force-keep
@pytest.fixture(scope="module")
def guarded_env(test_reconstructor: Reconstructor, windows: np.ndarray) -> TokenMaskEnv:
    digits = test_reconstructor.tokenizer.encode(" 2024 and 7", add_special_tokens=False)
    rows = [np.concatenate([digits, windows[i]])[: TEST_SEQ_LEN - (i % 3) * 7] for i in range(8)]
    return make_env(test_reconstructor, rows, keep_digits=True, force_keep_strings=("the",))  # type: ignore[arg-type]


def test_force_keep_strings_match_every_occurrence(test_reconstructor: Reconstructor, windows: np.ndarray) -> None:
    env = make_env(test_reconstructor, windows, force_keep_strings=("the", "function"))
    kept = env.core.windows.force_keep
    expected = np.isin(windows, test_reconstructor.tokenizer.all_special_ids)
    for text in ("the", " the", "function", " function"):
        pattern = test_reconstructor.tokenizer.encode(text, add_special_tokens=False)
        for row in range(windows.shape[0]):  # a plain loop, independent of the vectorised search
            for start in range(TEST_SEQ_LEN - len(pattern) + 1):
                if list(windows[row, start : start + len(pattern)]) == pattern:
                    expected[row, start : start + len(pattern)] = True
    assert expected.sum() > 0
    np.testing.assert_array_equal(kept, expected)


def test_force_keep_digits(guarded_env: TokenMaskEnv, test_reconstructor: Reconstructor) -> None:
    windows = guarded_env.core.windows
    tokens = test_reconstructor.tokenizer.convert_ids_to_tokens(windows.token_ids[0].tolist())
    has_digit = np.array([re.search("[0-9]", t) is not None for t in tokens]) & windows.valid[0]
    assert has_digit.any()
    assert windows.force_keep[0][has_digit].all()
    assert not windows.force_keep[~windows.valid].any()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), p_drop=st.floats(0.0, 1.0))
def test_force_keep_never_violated_under_random_actions(guarded_env: TokenMaskEnv, seed: int, p_drop: float) -> None:
    rng = np.random.default_rng(seed)
    obs, _ = guarded_env.reset(seed=seed)
    terminated = False
    while not terminated:
        masks = guarded_env.action_masks().reshape(CHUNK, 2)
        p = obs["position"][0]
        protected = (obs["force_keep"][p : p + CHUNK] == 1) | (obs["valid"][p : p + CHUNK] == 0)
        np.testing.assert_array_equal(masks[:, 1], ~protected)
        assert masks[:, 0].all()
        obs, _, terminated, _, info = guarded_env.step((rng.random(CHUNK) < p_drop).astype(np.int8))
        dropped = obs["decisions"] == Decision.MASKED
        assert not (dropped & ((obs["force_keep"] == 1) | (obs["valid"] == 0))).any()
        assert info["n_masked"] == dropped.sum()
    assert info["n_decided"] == obs["valid"].sum()
