"""Whether PPO alone, on the real TokenMask-v0 dynamics, learns a planted pattern: drop the predictable token first.

The reconstructor is a stand-in bigram LM wrapped in :class:`Reconstructor`: after a *kept* token ``A``
it predicts ``B`` with near certainty, and it predicts nothing else. In every window three ``B`` follow an
``A`` (about 0 bits to drop) and two ``B`` follow other tokens (as dear as any token). At a target mask
rate of 3/32 the best policy drops exactly the three planted ``B``. Distillation learns this in 150
steps (``tests/test_distill.py``). The test asks whether PPO, from a random initialisation and with no
distillation, moves its top-3 drop logits onto them.

It does not today, and the test is a strict ``xfail`` that records the defect (issue #11): a step's
reward sums the outcomes of ``chunk_size`` decisions, so one token's credit is buried in the others'.
Measured by training this exact setup longer in a scratch script (8 envs, seed 0): the planted recall after
2k/4k/8k/16k timesteps was 0.43/0.18/0.14/0.23 at learning rate 3e-3 (8-token chunks), 0.07/0.06/0.13/0.07
with 1-token chunks, and 0.01/0.05/0.08/0.21 at 3e-4: the policy learns the rate, not which tokens.
When per-token credit lands, this test starts passing and its ``xfail`` must go.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.vec_env import DummyVecEnv

from agents.algorithms import make_model
from tokencompress_env.env import TokenMaskEnv
from tokencompress_env.reconstructor import Reconstructor

SEQ_LEN, CHUNK, A, B = 32, 8, 100, 101


class _BigramLM(th.nn.Module):
    """Logits that put almost all mass on ``B`` where the input token (the previous compressed token) is ``A``."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(model_type="toy", n_positions=512)
        self.vocab = vocab
        self.dtype = th.float32
        self.bias = th.nn.Parameter(th.zeros(1))  # a parameter, so that the model has a device and a dtype

    def get_output_embeddings(self) -> object:
        return types.SimpleNamespace(weight=th.empty(self.vocab, 1))  # what Reconstructor.vocab_size reads

    def forward(self, input_ids: th.Tensor, attention_mask: th.Tensor, use_cache: bool = False, **kwargs: object) -> object:
        logits = th.zeros((*input_ids.shape, self.vocab))
        logits[..., B] = th.where(input_ids == A, 20.0, 0.0)
        return types.SimpleNamespace(logits=logits, cache=None, past_key_values=None)  # a bigram needs no cache


def _windows(n: int, seed: int) -> np.ndarray:
    """Random tokens (ids 200-299) with three ``A B`` pairs and two lone ``B`` in each window."""
    rng = np.random.default_rng(seed)
    windows = rng.integers(200, 300, size=(n, SEQ_LEN))
    for row in windows:
        starts = rng.choice(np.arange(0, SEQ_LEN - 1, 2), size=5, replace=False)
        for start in starts[:3]:
            row[start], row[start + 1] = A, B
        for start in starts[3:]:
            row[start + 1] = B
    return windows


def _planted_recall(model: Any, windows: np.ndarray) -> float:
    """Fraction of the policy's 3 highest drop logits per window that fall on a ``B`` right after an ``A``."""
    n = len(windows)
    obs = {
        "token_ids": th.as_tensor(windows),
        "decisions": th.zeros((n, SEQ_LEN), dtype=th.long),
        "valid": th.ones((n, SEQ_LEN), dtype=th.long),
        "force_keep": th.zeros((n, SEQ_LEN), dtype=th.long),
        "position": th.zeros((n, 1), dtype=th.long),
        "target_mask_rate": th.full((n, 1), 3 / SEQ_LEN),
    }
    with th.no_grad():
        logits = model.policy.token_mask_logits({k: v.float() for k, v in obs.items()})
    top = logits.topk(3, dim=1).indices
    ids = th.as_tensor(windows)
    planted = (ids == B) & (th.nn.functional.pad(ids, (1, 0), value=0)[:, :-1] == A)
    return float(planted.gather(1, top).float().mean())


@pytest.fixture(autouse=True)
def one_torch_thread() -> Any:
    n = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(n)


@pytest.mark.xfail(strict=True, reason="PPO's chunk-summed reward does not assign per-token credit yet (issue #11)")
def test_ppo_learns_to_drop_a_planted_predictable_token_first(test_reconstructor: Reconstructor) -> None:
    tokenizer = test_reconstructor.tokenizer
    lm = Reconstructor(_BigramLM(len(tokenizer)), tokenizer, device="cpu")  # type: ignore[arg-type]
    train, held_out = _windows(64, seed=0), _windows(64, seed=1)

    def make() -> TokenMaskEnv:
        return TokenMaskEnv(
            reconstructor=lm,
            windows=train,
            seq_len=SEQ_LEN,
            chunk_size=CHUNK,
            mask_rate_range=(3 / SEQ_LEN, 3 / SEQ_LEN),
            scoring_dtype="float32",
        )

    env = DummyVecEnv([make for _ in range(8)])
    env.seed(0)
    extractor = {"embed_dim": 32, "hidden_dim": 32, "dilations": (1, 2), "use_decisions": False}
    model = make_model(
        "ppo",
        env,
        policy_kwargs={"net_arch": {"pi": [32], "vf": [32]}, "features_extractor_kwargs": extractor},
        seed=0,
        device="cpu",
        n_steps=16,
        batch_size=64,
        n_epochs=4,
        learning_rate=3e-3,
    )
    before = _planted_recall(model, held_out)
    model.learn(total_timesteps=4096)
    after = _planted_recall(model, held_out)
    assert before < 0.5  # chance is 3/32 per pick
    assert after > 0.8, (before, after)
