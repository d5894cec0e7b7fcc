"""The continuation reward of TokenMask-v0: its sign on a toy LM, its value, the two envs agreeing, its options."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from experiments.train_ppo import TrainConfig, train
from tests.conftest import TEST_SEQ_LEN, KeyTokenLM
from tokencompress_env.data import CorpusSpec, prepare_corpus, window_array, window_continuations, window_doc_ids
from tokencompress_env.env import TokenMaskEnv
from tokencompress_env.env_config import EnvConfig
from tokencompress_env.errors import ConfigError, InputError
from tokencompress_env.observation import Decision
from tokencompress_env.reconstructor import Reconstructor
from tokencompress_env.reward import RewardConfig
from tokencompress_env.units import unit_starts
from tokencompress_env.vector_env import TokenMaskVectorEnv

CHUNK = 16
T = 8  # continuation tokens: the context is the window's last TEST_SEQ_LEN - T = 56 tokens
PRICE = 8.0
DEBUG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "dev" / "debug.json"


def _options(**extra: object) -> dict[str, object]:
    options: dict[str, object] = {
        "seq_len": TEST_SEQ_LEN,
        "chunk_size": CHUNK,
        "reward_type": "continuation",
        "continuation_tokens": T,
        "bits_saved_per_mask": PRICE,
        "scoring_dtype": "float32",
    }
    options.update(extra)
    return options


def _play(env: TokenMaskEnv, window: int, target: float, dropped: np.ndarray) -> tuple[list[float], dict]:
    """Play one episode dropping the given positions; the rewards of its steps and its last info."""
    env.reset(seed=0, options={"window_index": window, "target_mask_rate": target})
    rewards, info = [], {}
    for start in range(0, TEST_SEQ_LEN, CHUNK):
        _, reward, terminated, _, info = env.step(dropped[start : start + CHUNK].astype(np.int64))
        rewards.append(reward)
    assert terminated
    return rewards, info


def _continuation_bits(lm: Reconstructor, window: np.ndarray, dropped: np.ndarray, continuation: np.ndarray) -> tuple[float, float]:
    """Bits of the continuation given the full and the deleted window, scored independently of the env."""
    keep = TEST_SEQ_LEN - T
    contexts = [window[-keep:], window[~dropped][-keep:]]
    bits = lm.continuation_bits(contexts, np.stack([continuation, continuation])).double().sum(dim=1).numpy()
    return float(bits[0]), float(bits[1])


@pytest.fixture(scope="module")
def windows(test_windows: dict[str, np.ndarray]) -> np.ndarray:
    return test_windows["validation"][:4]


@pytest.fixture(scope="module")
def continuations(test_windows: dict[str, np.ndarray]) -> np.ndarray:
    return test_windows["validation"][10:14, :T].copy()


def test_deleting_the_key_token_costs_its_continuation_bits(test_reconstructor: Reconstructor, windows: np.ndarray) -> None:
    """A toy LM that predicts the continuation once it has read the key: dropping the key costs what it told."""
    tok = test_reconstructor.tokenizer
    window = windows[0]
    single = unit_starts(window[None], np.ones((1, TEST_SEQ_LEN), dtype=bool), tok, "piece")[0]
    one_token_units = [p for p in range(8, TEST_SEQ_LEN - 1) if single[p] and single[p + 1]]
    key_at = next(p for p in reversed(one_token_units) if (window == window[p]).sum() == 1)
    other_at = next(p for p in one_token_units if window[p] != window[key_at] and p != key_at)
    answer = next(i for i in range(len(tok)) if i not in window and i != tok.mask_token_id)
    lm = Reconstructor(KeyTokenLM(len(tok), int(window[key_at]), answer), tok, device="cpu")  # type: ignore[arg-type]
    continuation = np.full((1, T), answer)
    env = TokenMaskEnv(reconstructor=lm, windows=window[None], continuations=continuation, **_options())  # type: ignore[arg-type]
    target = 1 / TEST_SEQ_LEN  # one drop is on target: the rate term telescopes to 0
    results = {}
    for name, position in (("key", key_at), ("other", other_at)):
        dropped = np.zeros(TEST_SEQ_LEN, dtype=bool)
        dropped[position] = True
        rewards, info = _play(env, 0, target, dropped)
        assert info["n_masked"] == 1
        full, deleted = _continuation_bits(lm, window, dropped, continuation[0])
        assert info["continuation_full"] == pytest.approx(full, abs=1e-3)
        assert info["continuation_deleted"] == pytest.approx(deleted, abs=1e-3)
        assert info["reward_continuation"] == pytest.approx(-(deleted - full) / TEST_SEQ_LEN, abs=1e-5)
        results[name] = (sum(rewards), full, deleted)
    key_total, key_full, key_deleted = results["key"]
    other_total, other_full, other_deleted = results["other"]
    assert key_full < 0.5 and key_deleted > T * 5  # the key read: near certain; deleted: ~log2(vocab) bits a token
    assert other_deleted == pytest.approx(other_full, abs=1e-4)  # another token deleted: the key still read
    assert other_total == pytest.approx(PRICE / TEST_SEQ_LEN, abs=1e-5)  # the price alone
    assert key_total == pytest.approx((PRICE - (key_deleted - key_full)) / TEST_SEQ_LEN, abs=1e-5)
    assert other_total - key_total == pytest.approx((key_deleted - key_full) / TEST_SEQ_LEN, abs=1e-5)
    assert key_total < 0 < other_total


def test_episode_return_is_price_minus_continuation_bits_plus_rate_term(
    test_reconstructor: Reconstructor, windows: np.ndarray, continuations: np.ndarray
) -> None:
    env = TokenMaskEnv(reconstructor=test_reconstructor, windows=windows, continuations=continuations, **_options())  # type: ignore[arg-type]
    rate_penalty = env.reward_config.effective_rate_penalty
    assert rate_penalty == 2 * PRICE
    rng = np.random.default_rng(0)
    for window, target in ((0, 0.4), (1, 0.6), (2, 0.25)):
        dropped = rng.random(TEST_SEQ_LEN) < target + 0.1  # off target on purpose: the rate term is not zero
        rewards, info = _play(env, window, target, dropped)
        actually = env.core.decisions[0] == Decision.MASKED  # force-kept tokens stay
        drops, n_valid = int(actually.sum()), int(env.core.valid[0].sum())
        assert info["n_masked"] == drops
        full, deleted = _continuation_bits(test_reconstructor, windows[window], actually, continuations[window])
        rate = -rate_penalty * abs(drops - target * n_valid)
        expected = (PRICE * drops - (deleted - full) + rate) / TEST_SEQ_LEN
        assert sum(rewards) == pytest.approx(expected, abs=1e-4)
        assert rewards[-1] - info["reward_tokens"] - info["reward_rate"] == pytest.approx(-(deleted - full) / TEST_SEQ_LEN, abs=1e-4)
        assert sum(info["token_rewards"]) == pytest.approx(rewards[-1], abs=1e-6)
        assert deleted != pytest.approx(full, abs=1e-3)  # the deleted context does read differently


def test_single_and_vector_env_agree(test_reconstructor: Reconstructor, windows: np.ndarray, continuations: np.ndarray) -> None:
    n = 3
    options = _options()
    vec = TokenMaskVectorEnv(n, reconstructor=test_reconstructor, windows=windows, continuations=continuations, **options)  # type: ignore[arg-type]
    single = TokenMaskEnv(reconstructor=test_reconstructor, windows=windows, continuations=continuations, **options)  # type: ignore[arg-type]
    targets = [0.3, 0.5, 0.7]
    rng = np.random.default_rng(1)
    actions = rng.integers(0, 2, size=(TEST_SEQ_LEN // CHUNK, n, CHUNK))
    _, reset_info = vec.reset(seed=0, options={"window_index": [0, 1, 2], "target_mask_rate": targets})
    assert (reset_info["continuation_full"] == 0).all()  # the keys are there from the reset on
    vec_rewards, final = [], {}
    for step_actions in actions:
        _, reward, terminated, _, infos = vec.step(step_actions)
        vec_rewards.append(reward)
    assert terminated.all()
    final = infos["final_info"]
    for row in range(n):
        single.reset(seed=0, options={"window_index": row, "target_mask_rate": targets[row]})
        for step, step_actions in enumerate(actions):
            _, reward, _, _, info = single.step(step_actions[row])
            assert reward == pytest.approx(vec_rewards[step][row], abs=1e-5)
        for key in ("continuation_full", "continuation_deleted", "reward_continuation", "n_masked"):
            assert info[key] == pytest.approx(final[key][row], abs=1e-4), key


def test_pickling_mid_episode_keeps_the_window_for_the_continuation(
    test_reconstructor: Reconstructor, windows: np.ndarray, continuations: np.ndarray
) -> None:
    env = TokenMaskEnv(reconstructor=test_reconstructor, windows=windows, continuations=continuations, **_options())  # type: ignore[arg-type]
    env.reset(seed=0, options={"window_index": 1, "target_mask_rate": 0.5})
    actions = np.random.default_rng(2).integers(0, 2, size=(TEST_SEQ_LEN // CHUNK, CHUNK))
    env.step(actions[0])
    env.step(actions[1])
    clone = pickle.loads(pickle.dumps(env))
    for action in actions[2:]:
        _, reward, _, _, info = env.step(action)
        _, clone_reward, _, _, clone_info = clone.step(action)
    assert clone_reward == pytest.approx(reward, abs=1e-5)
    assert clone_info["continuation_deleted"] == pytest.approx(info["continuation_deleted"], abs=1e-4)


def test_corpus_windows_are_those_with_a_continuation(test_reconstructor: Reconstructor) -> None:
    env = TokenMaskEnv(reconstructor=test_reconstructor, split="validation", **_options())  # type: ignore[arg-type]
    splits = prepare_corpus(CorpusSpec(seq_len=TEST_SEQ_LEN), test_reconstructor.tokenizer)
    all_windows, docs = window_array(splits["validation"]), window_doc_ids(splits["validation"])
    conts, available = window_continuations(all_windows, docs, T)
    assert 0 < available.sum() < len(all_windows)  # each document's last window is left out
    assert env.num_windows == available.sum()
    assert env.core.windows.continuations is not None
    np.testing.assert_array_equal(env.core.windows.token_ids, all_windows[available])
    np.testing.assert_array_equal(env.core.windows.continuations, conts[available])
    _, info = env.reset(seed=0)
    assert {"continuation_full", "continuation_deleted", "reward_continuation"} <= set(info)
    plain = TokenMaskEnv(reconstructor=test_reconstructor, split="validation", seq_len=TEST_SEQ_LEN, chunk_size=CHUNK)
    assert plain.num_windows == len(all_windows) and "continuation_full" not in plain.reset(seed=0)[1]


@pytest.mark.parametrize("value", [0, -3, True, 2.5, "8"])
def test_continuation_tokens_must_be_a_positive_integer(value: object) -> None:
    with pytest.raises(ConfigError, match="continuation_tokens"):
        EnvConfig(continuation_tokens=value)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="continuation_tokens"):
        RewardConfig(reward_type="continuation", continuation_tokens=value)  # type: ignore[arg-type]


def test_config_and_construction_errors(test_reconstructor: Reconstructor, windows: np.ndarray, continuations: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="fewer than seq_len"):
        EnvConfig(reward_type="continuation", seq_len=64, chunk_size=16, continuation_tokens=64)
    assert EnvConfig(seq_len=16, chunk_size=16).continuation_tokens == 32  # only the continuation reward reads it
    config = RewardConfig(reward_type="continuation")
    assert (config.token_price, config.effective_rate_penalty) == (8.0, 16.0)
    with pytest.raises(ConfigError, match="reward_type"):
        EnvConfig(reward_type="continuations")
    with pytest.raises(ConfigError, match="continuation_tokens"):
        TrainConfig(reward_type="continuation", seq_len=64, chunk_size=16, continuation_tokens=64).env_config()
    assert TrainConfig(reward_type="continuation", continuation_tokens=16).env_config().continuation_tokens == 16
    make = TokenMaskEnv
    with pytest.raises(InputError, match="needs continuations"):
        make(reconstructor=test_reconstructor, windows=windows, **_options())  # type: ignore[arg-type]
    with pytest.raises(InputError, match="shape"):
        make(reconstructor=test_reconstructor, windows=windows, continuations=continuations[:, :3], **_options())  # type: ignore[arg-type]
    with pytest.raises(InputError, match="lie in"):
        make(reconstructor=test_reconstructor, windows=windows, continuations=continuations + 10**6, **_options())  # type: ignore[arg-type]
    with pytest.raises(InputError, match="reward_type='continuation' only"):
        make(reconstructor=test_reconstructor, windows=windows, continuations=continuations, seq_len=TEST_SEQ_LEN, chunk_size=CHUNK)  # type: ignore[arg-type]


@pytest.mark.parametrize("algo", ["ppo", "token_ppo"])
def test_train_ppo_runs_on_the_continuation_reward(algo: str, tmp_path: Path, test_reconstructor_dir: Path) -> None:
    base = {k: v for k, v in json.loads(DEBUG.read_text()).items() if not k.startswith("_")}
    values = {"runs_dir": str(tmp_path), "reconstructor": str(test_reconstructor_dir), "total_timesteps": 64, "algo": algo}
    options = {"reward_type": "continuation", "continuation_tokens": T, "tensorboard": False, "device": "cpu"}
    summary = train(TrainConfig(**{**base, **values, **options}))
    assert summary["num_timesteps"] >= 64
    last = summary["last_rollout"]
    assert last["reward/continuation"] != 0.0 and "compression/continuation_cost" in last
    saved = json.loads((Path(summary["run_dir"]) / "config.json").read_text())
    assert (saved["reward_type"], saved["continuation_tokens"]) == ("continuation", T)
