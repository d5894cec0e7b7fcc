"""Reinforcement learning alone, on the real TokenMask-v0 dynamics, learns a planted pattern: drop the predictable token first.

The reconstructor is a stand-in bigram LM wrapped in :class:`Reconstructor`: after a *kept* token ``a``
it predicts ``b`` with near certainty, and it predicts nothing else. In every window three ``b`` follow an
``a`` (about 0 bits to drop) and two ``b`` follow other tokens (as dear as any token). At a target mask
rate of 3/32 the best policy drops exactly the three planted ``b``. Distillation learns this in 150 steps
(``tests/test_distill.py``); here PPO and PPO with per-token credit (``token_ppo``), from a random
initialisation and with no distillation, must move their top-3 drop logits onto them.

The tokens are whole words: the env decides in units (whole characters), so a token that is a fragment
of a character would be decided by the token before it and the pattern would be unlearnable.
"""

from __future__ import annotations

import re
import types
from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.vec_env import DummyVecEnv

from agents.algorithms import make_model
from tokencompress_env.env import TokenMaskEnv
from tokencompress_env.observation import build_observation
from tokencompress_env.reconstructor import Reconstructor

SEQ_LEN, CHUNK = 32, 8


def word_ids(tokenizer: Any, n: int) -> list[int]:
    """``n`` token ids made of ASCII letters (whole characters): each is a unit of its own in the env.

    :param tokenizer: the tokenizer
    :param n: how many
    :return: ids
    """
    ids = [i for i in range(len(tokenizer)) if re.fullmatch(r" ?[A-Za-z]{2,}", tokenizer.decode([i]))]
    assert len(ids) >= n, f"the tokenizer has {len(ids)} whole-word tokens, need {n}"
    return ids[:n]


class _BigramLM(th.nn.Module):
    """Logits that put almost all mass on ``b`` where the input token (the previous compressed token) is ``a``."""

    def __init__(self, vocab: int, a: int, b: int) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(model_type="toy", n_positions=512)
        self.vocab, self.a, self.b = vocab, a, b
        self.dtype = th.float32
        self.bias = th.nn.Parameter(th.zeros(1))  # a parameter, so that the model has a device and a dtype

    def get_output_embeddings(self) -> object:
        return types.SimpleNamespace(weight=th.empty(self.vocab, 1))  # what Reconstructor.vocab_size reads

    def forward(self, input_ids: th.Tensor, attention_mask: th.Tensor, use_cache: bool = False, **kwargs: object) -> object:
        logits = th.zeros((*input_ids.shape, self.vocab))
        logits[..., self.b] = th.where(input_ids == self.a, 20.0, 0.0)
        return types.SimpleNamespace(logits=logits, cache=None, past_key_values=None)  # a bigram needs no cache


def _windows(words: list[int], n: int, seed: int) -> np.ndarray:
    """Random words (``words[2:]``) with three ``a b`` pairs and two lone ``b`` in each window (``a, b = words[:2]``)."""
    rng = np.random.default_rng(seed)
    a, b, fillers = words[0], words[1], np.asarray(words[2:])
    windows = fillers[rng.integers(0, len(fillers), size=(n, SEQ_LEN))]
    for row in windows:
        starts = rng.choice(np.arange(0, SEQ_LEN - 1, 2), size=5, replace=False)
        for start in starts[:3]:
            row[start], row[start + 1] = a, b
        for start in starts[3:]:
            row[start + 1] = b
    return windows


def _planted_recall(model: Any, windows: np.ndarray, a: int, b: int) -> float:
    """Fraction of the policy's 3 highest drop logits per window that fall on a ``b`` right after an ``a``."""
    obs = build_observation(windows, np.ones(windows.shape, bool), np.zeros(windows.shape, bool), 3 / SEQ_LEN)
    with th.no_grad():
        logits = model.policy.token_mask_logits({k: th.as_tensor(v).float() for k, v in obs.items()})
    top = logits.topk(3, dim=1).indices
    ids = th.as_tensor(windows)
    planted = (ids == b) & (th.nn.functional.pad(ids, (1, 0), value=-1)[:, :-1] == a)
    return float(planted.gather(1, top).float().mean())


@pytest.fixture(autouse=True)
def one_torch_thread() -> Any:
    n = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(n)


def train_planted(
    test_reconstructor: Reconstructor, algo: str, timesteps: int, learning_rate: float = 3e-3, chunk_size: int = CHUNK
) -> tuple[float, float]:
    """Train ``algo`` from scratch on planted windows; the planted recall before and after.

    :param test_reconstructor: supplies the tokenizer
    :param algo: an algorithm name of :mod:`agents.algorithms`
    :param timesteps: env steps in total (8 envs, 4 steps per episode)
    :param learning_rate: Adam's learning rate
    :param chunk_size: tokens decided per step
    :return: recall before, recall after
    """
    tokenizer = test_reconstructor.tokenizer
    words = word_ids(tokenizer, 42)
    a, b = words[:2]
    lm = Reconstructor(_BigramLM(len(tokenizer), a, b), tokenizer, device="cpu")  # type: ignore[arg-type]
    train, held_out = _windows(words, 64, seed=0), _windows(words, 64, seed=1)

    def make() -> TokenMaskEnv:
        return TokenMaskEnv(
            reconstructor=lm,
            windows=train,
            seq_len=SEQ_LEN,
            chunk_size=chunk_size,
            mask_rate_range=(3 / SEQ_LEN, 3 / SEQ_LEN),
            scoring_dtype="float32",
        )

    env = DummyVecEnv([make for _ in range(8)])
    env.seed(0)
    extractor = {"embed_dim": 32, "hidden_dim": 32, "dilations": (1, 2), "use_decisions": False}
    model = make_model(
        algo,
        env,
        policy_kwargs={"net_arch": {"pi": [32], "vf": [32]}, "features_extractor_kwargs": extractor},
        seed=0,
        device="cpu",
        n_steps=64 * chunk_size // SEQ_LEN,
        batch_size=64,
        n_epochs=4,
        learning_rate=learning_rate,
    )
    before = _planted_recall(model, held_out, a, b)
    model.learn(total_timesteps=timesteps)
    return before, _planted_recall(model, held_out, a, b)


@pytest.mark.parametrize("algo", ["ppo", "token_ppo"])
def test_rl_learns_to_drop_a_planted_predictable_token_first(algo: str, test_reconstructor: Reconstructor) -> None:
    before, after = train_planted(test_reconstructor, algo, timesteps=4096)
    assert before < 0.5  # chance is 3/32 per pick
    assert after > 0.8, (before, after)
