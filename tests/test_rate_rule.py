"""The one mask-rate rule: the env's reward, the baselines, the policy's rate control and the distillation labels agree."""

from __future__ import annotations

import numpy as np
import torch as th

from agents.distill import cheapest_tokens
from tests.conftest import TEST_SEQ_LEN
from tokencompress_env.baselines import BASELINES, MethodContext, logits_to_mask, mask_budget, rate_budget
from tokencompress_env.env import TokenMaskEnv
from tokencompress_env.reconstructor import Reconstructor

CHUNK = 16
TEXT = "On 12 May 2024 the 3 cats ate 45 fish, and 6 dogs ran 789 metres by 10 past 11 in the rain."


def test_env_baselines_and_distillation_labels_drop_the_same_number_of_tokens_with_force_kept_tokens(
    test_reconstructor: Reconstructor,
) -> None:
    ids = np.asarray(test_reconstructor.tokenizer.encode(TEXT, add_special_tokens=False), dtype=np.int64)[:TEST_SEQ_LEN]
    env = TokenMaskEnv(reconstructor=test_reconstructor, windows=ids[None], seq_len=TEST_SEQ_LEN, chunk_size=CHUNK, keep_digits=True)
    token_ids = env.core.windows.token_ids[:1]
    valid = env.core.windows.valid[:1]
    force_keep = env.core.windows.force_keep[:1]
    maskable = valid & ~force_keep
    n_valid, n_maskable = int(valid.sum()), int(maskable.sum())
    assert 0 < n_maskable < n_valid  # the window has force-kept digits
    rate = 0.5
    budget = int(rate_budget(rate, valid, maskable)[0])
    assert budget == min(int(np.floor(rate * n_valid + 0.5)), n_maskable)
    assert budget != int(mask_budget(rate, maskable)[0])  # the old maskable denominator would disagree

    # the env's rate term prefers exactly this count of drops: no other achievable count is closer to rate * n_valid
    assert all(abs(budget - rate * n_valid) <= abs(c - rate * n_valid) for c in range(n_maskable + 1))

    # a baseline and the policy's rate control drop the budget
    context = MethodContext(reconstructor=test_reconstructor, seed=0)
    stride = BASELINES["stride"](token_ids, rate, context, valid=valid, force_keep=force_keep)
    assert int(stride.sum()) == budget and not (stride & ~maskable).any()
    logits = np.random.default_rng(0).normal(size=token_ids.shape)
    assert int(logits_to_mask(logits, rate, valid, force_keep).sum()) == budget

    # the distillation labels mark as many tokens
    surprisal = th.as_tensor(np.random.default_rng(1).random(token_ids.shape))
    labels = cheapest_tokens(surprisal, th.as_tensor(valid), th.as_tensor(maskable), th.tensor([rate]))
    assert int(labels.sum()) == budget

    # the env, driven by the baseline's mask, drops them all and its rate term is the rounding remainder only
    env.reset(seed=0, options={"target_mask_rate": rate, "window_index": 0})
    rate_reward = 0.0
    info: dict = {}
    for start in range(0, TEST_SEQ_LEN, CHUNK):
        _, _, _, _, info = env.step(stride[0, start : start + CHUNK].astype(np.int8))
        rate_reward += info["reward_rate"]
    assert info["n_masked"] == budget and info["n_valid"] == n_valid
    penalty, scale = env.reward_config.effective_rate_penalty, env.reward_config.scale(TEST_SEQ_LEN)
    assert np.isclose(rate_reward, -penalty * abs(budget - rate * n_valid) / scale)
