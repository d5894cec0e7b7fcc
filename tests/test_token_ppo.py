"""Per-token credit (agents/token_ppo.py): the env's reward split by token, GAE over tokens, per-token ratios."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from agents.token_ppo import TokenCreditPolicy, TokenRolloutBuffer
from tests.test_agents import StandInTokenEnv, batch_obs
from tokencompress_env.env import TokenMaskEnv
from tokencompress_env.reconstructor import Reconstructor


def _buffer(n_steps: int, k: int, gae_lambda: float = 1.0) -> TokenRolloutBuffer:
    env = StandInTokenEnv(seq_len=8, chunk_size=k, vocab=16)
    return TokenRolloutBuffer(n_steps, env.observation_space, spaces.MultiBinary(k), "cpu", gae_lambda=gae_lambda, gamma=1.0, n_envs=1)


def _fill(buffer: TokenRolloutBuffer, rewards: list[list[float]], starts: list[bool], values: float = 0.0) -> None:
    obs = {k: s.sample()[None] for k, s in buffer.observation_space.spaces.items()}
    for step, (reward, start) in enumerate(zip(rewards, starts, strict=True)):
        value = th.full((1, buffer.tokens), values)
        buffer.add(obs, np.zeros((1, buffer.tokens)), np.asarray([reward]), np.array([start]), value, th.zeros((1, buffer.tokens)))
        assert buffer.pos == step + 1


def test_token_advantages_count_each_token_and_what_follows_it_never_what_precedes_it() -> None:
    buffer = _buffer(2, 2)
    _fill(buffer, [[1.0, 2.0], [3.0, 4.0]], [True, False])
    buffer.compute_returns_and_advantage(th.zeros((1, 2)), np.array([True]))
    # one episode of 4 token decisions, values 0, lambda = gamma = 1: the reward-to-go of each token
    assert buffer.advantages[:, 0].tolist() == [[10.0, 9.0], [7.0, 4.0]]
    assert np.array_equal(buffer.returns, buffer.advantages)


def test_token_advantages_stop_at_an_episode_boundary_and_bootstrap_from_the_next_token() -> None:
    buffer = _buffer(2, 2)
    _fill(buffer, [[1.0, 2.0], [3.0, 4.0]], [True, True])  # the second step starts a new episode
    buffer.compute_returns_and_advantage(th.full((1, 2), 5.0), np.array([False]))  # not done: bootstrap
    assert buffer.advantages[:, 0].tolist() == [[3.0, 2.0], [12.0, 9.0]]
    # with values, one-step TD (lambda 0): r_j + V(next token) - V(token)
    buffer = _buffer(2, 2, gae_lambda=0.0)
    _fill(buffer, [[1.0, 2.0], [3.0, 4.0]], [True, False], values=1.0)
    buffer.compute_returns_and_advantage(th.full((1, 2), 1.0), np.array([True]))
    assert buffer.advantages[:, 0].tolist() == [[1.0, 2.0], [3.0, 3.0]]


def test_token_credit_policy_gives_per_token_values_and_log_probs_that_sum_to_the_parent_s() -> None:
    env = StandInTokenEnv()
    policy = TokenCreditPolicy(env.observation_space, env.action_space, lambda _: 1e-3)
    obs = batch_obs(env, 3)
    actions, values, log_prob = policy(obs)
    assert actions.shape == values.shape == log_prob.shape == (3, env.chunk_size)
    values_flat, log_prob_flat, entropy = policy.evaluate_actions(obs, actions)
    assert values_flat.shape == log_prob_flat.shape == (3 * env.chunk_size,) and entropy is not None
    assert th.allclose(log_prob_flat.reshape(3, -1).sum(1), super(TokenCreditPolicy, policy).evaluate_actions(obs, actions)[1])
    assert policy.predict_values(obs).shape == (3, env.chunk_size)
    names = {name for name, _ in policy.named_parameters()}
    assert any(n.startswith("token_value_net.") for n in names)
    assert {id(p) for p in policy.token_value_net.parameters()} <= {id(p) for g in policy.optimizer.param_groups for p in g["params"]}


def test_the_env_splits_its_reward_by_token_causally(test_reconstructor: Reconstructor, test_windows: dict) -> None:
    """``info["token_rewards"]`` sums to the reward, and a token's share ignores the decisions after it."""

    def step(actions: np.ndarray) -> tuple[float, np.ndarray]:
        env = TokenMaskEnv(reconstructor=test_reconstructor, windows=test_windows["validation"][:1], seq_len=64, chunk_size=16)
        env.reset(seed=0, options={"target_mask_rate": 0.3, "window_index": 0})
        _, reward, _, _, info = env.step(actions)
        return reward, np.asarray(info["token_rewards"])

    first = np.zeros(16, dtype=np.int64)
    first[[2, 3, 9]] = 1
    second = first.copy()
    second[[12, 14]] = 1  # two more drops after position 9
    reward, split = step(first)
    reward2, split2 = step(second)
    assert split.shape == (16,) and split.sum() == pytest.approx(reward, abs=1e-9)
    assert split2.sum() == pytest.approx(reward2, abs=1e-9)
    assert np.allclose(split[:12], split2[:12])  # the first 12 tokens' shares do not see the later drops
    assert not np.allclose(split[12:], split2[12:])
