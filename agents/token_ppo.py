"""PPO with per-token credit: each keep/drop decision gets its own advantage.

In TokenMask-v0 a step decides ``chunk_size`` tokens at once and its reward sums their outcomes, so
plain PPO gives every decision of a chunk the same advantage: the credit of one token is buried in the
others' (on the planted pattern of ``tests/test_ppo_planted.py`` both learn; neither clearly faster). The env
also reports the reward split over the chunk's tokens (``info["token_rewards"]``, see
:class:`~tokencompress_env.reward.StepOutcome`): a token's share depends only on its own decision and
those before it (the reconstructor is causal, and the rate-shaping potential is counted token by token).

:class:`TokenPPO` reads the episode as a sequence of token decisions, one per position:

* the critic (:class:`TokenCreditPolicy`) predicts a value for every token of the chunk, from that
  token's features and the window summary;
* advantages are GAE over that token sequence (``gamma`` and ``gae_lambda`` apply per token): token
  ``j``'s advantage counts its own reward and everything after it, never the rewards of the tokens
  decided before it in the same chunk;
* the clipped objective uses one probability ratio per token.

Everything else is SB3's :class:`~stable_baselines3.PPO` (its ``train`` runs unchanged on the
per-token arrays). The actor is the same per-token head as :class:`~agents.policy.TokenActorCriticPolicy`'s,
so a distilled policy's weights load into it and ``compress()`` uses it unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import PyTorchObs
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from agents.policy import TokenActorCriticPolicy, TokenBernoulliDistribution

#: Info key of the per-token rewards (``[chunk_size]`` per env), written by TokenMask-v0.
TOKEN_REWARDS_KEY = "token_rewards"


def token_log_prob(distribution: TokenBernoulliDistribution, actions: th.Tensor) -> th.Tensor:
    """Log-probability of each position's action (0 at inactive positions, whose action is fixed).

    :param distribution: the chunk's distribution
    :param actions: ``[B, k]`` actions
    :return: ``[B, k]`` log-probabilities
    """
    bernoulli = distribution.distribution
    logits = bernoulli.logits
    active = distribution.active
    assert logits is not None and active is not None, "proba_distribution() must be called first"
    return bernoulli.log_prob(actions.reshape(logits.shape).to(logits.dtype)) * active.to(logits.dtype)


class TokenCreditPolicy(TokenActorCriticPolicy):
    """:class:`~agents.policy.TokenActorCriticPolicy` with a value per token of the chunk, for :class:`TokenPPO`.

    The value of token ``j`` is the return expected from that token's decision to the episode's end.
    It comes from a small MLP over the token's critic features and the window summary. ``forward``,
    ``evaluate_actions`` and ``predict_values`` return per-token values and log-probabilities
    (flattened where SB3's ``PPO.train`` compares them with the buffer's flattened arrays).

    :param args: as :class:`~agents.policy.TokenActorCriticPolicy`
    :param token_value_hidden: hidden units of the per-token value MLP
    :param kwargs: as :class:`~agents.policy.TokenActorCriticPolicy`
    """

    #: Parameter-name prefixes this class adds to its parent: they start fresh when a parent's weights are loaded.
    added_heads = ("token_value_net.",)

    def __init__(self, *args: Any, token_value_hidden: int = 64, **kwargs: Any) -> None:
        self.token_value_hidden = int(token_value_hidden)
        super().__init__(*args, **kwargs)

    def _build(self, lr_schedule: Any) -> None:
        """Build the parent's heads, then the per-token value MLP, then the optimizer again (over all).

        :param lr_schedule: learning-rate schedule
        """
        super()._build(lr_schedule)
        _, vf_input_dim = self._head_input_dims()
        self.token_value_net = nn.Sequential(
            nn.Linear(self._vf_tokens.token_dim + vf_input_dim, self.token_value_hidden),
            nn.Tanh(),
            nn.Linear(self.token_value_hidden, 1),
        )
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data["token_value_hidden"] = self.token_value_hidden
        return data

    def _token_values(self, h_vf: th.Tensor, pre: dict[str, th.Tensor]) -> th.Tensor:
        """Values of the chunk's tokens.

        :param h_vf: ``[B, L, D]`` critic token features
        :param pre: preprocessed observations
        :return: ``[B, k]``
        """
        index, _ = self._vf_tokens.chunk_index(pre["position"], self.chunk_size)
        chunk = h_vf.gather(1, index.unsqueeze(-1).expand(-1, -1, h_vf.shape[-1]))
        summary = self._summary(h_vf, pre)
        inputs = th.cat([chunk, summary.unsqueeze(1).expand(-1, chunk.shape[1], -1)], dim=-1)
        return self.token_value_net(inputs).squeeze(-1)

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Actions, per-token values and per-token log-probabilities.

        :param obs: observations
        :param deterministic: take the most likely actions
        :return: ``(actions [B, k], values [B, k], log_prob [B, k])``
        """
        pre = self._preprocess(obs)
        h_pi, h_vf = self._token_features(pre)
        distribution = self._distribution(*self._chunk_logits(h_pi, pre))
        actions = distribution.get_actions(deterministic=deterministic).reshape(-1, self.chunk_size)
        return actions, self._token_values(h_vf, pre), token_log_prob(distribution, actions)

    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """Per-token values and log-probabilities of given actions, flattened as the buffer's samples are.

        :param obs: observations
        :param actions: ``[B, k]`` actions
        :return: ``(values [B * k], log_prob [B * k], entropy [B])``
        """
        pre = self._preprocess(obs)
        h_pi, h_vf = self._token_features(pre)
        distribution = self._distribution(*self._chunk_logits(h_pi, pre))
        values = self._token_values(h_vf, pre).reshape(-1)
        return values, token_log_prob(distribution, actions).reshape(-1), distribution.entropy()

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        """Per-token values of the chunk each observation decides next.

        :param obs: observations
        :return: ``[B, k]``
        """
        pre = self._preprocess(obs)
        h_vf = self._vf_tokens.token_features(pre)
        return self._token_values(h_vf, pre)


class TokenRolloutBuffer(DictRolloutBuffer):
    """A rollout buffer whose rewards, values, log-probabilities and advantages are ``[steps, envs, k]``.

    :param buffer_size: steps per env
    :param observation_space: the ``Dict`` observation space
    :param action_space: ``MultiBinary(k)``
    :param device: where samples go
    :param gae_lambda: GAE's lambda, per token
    :param gamma: discount, per token
    :param n_envs: envs
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Dict,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        gae_lambda: float = 1.0,
        gamma: float = 0.99,
        n_envs: int = 1,
    ) -> None:
        if not isinstance(action_space, spaces.MultiBinary):
            raise ValueError(f"TokenRolloutBuffer needs a MultiBinary action space, got {action_space}")
        self.tokens = int(np.prod(action_space.shape))
        super().__init__(buffer_size, observation_space, action_space, device, gae_lambda=gae_lambda, gamma=gamma, n_envs=n_envs)

    def reset(self) -> None:
        """Empty the buffer, with per-token arrays."""
        super().reset()
        shape = (self.buffer_size, self.n_envs, self.tokens)
        self.rewards = np.zeros(shape, dtype=np.float32)
        self.values = np.zeros(shape, dtype=np.float32)
        self.log_probs = np.zeros(shape, dtype=np.float32)
        self.advantages = np.zeros(shape, dtype=np.float32)
        self.returns = np.zeros(shape, dtype=np.float32)

    def add(  # type: ignore[override]
        self,
        obs: dict[str, np.ndarray],
        action: np.ndarray,
        reward: np.ndarray,
        episode_start: np.ndarray,
        value: th.Tensor,
        log_prob: th.Tensor,
    ) -> None:
        """Store one step of every env.

        :param obs: observations ``[envs, ...]``
        :param action: ``[envs, k]`` actions
        :param reward: ``[envs, k]`` per-token rewards
        :param episode_start: ``[envs]`` whether ``obs`` starts an episode
        :param value: ``[envs, k]`` per-token values
        :param log_prob: ``[envs, k]`` per-token log-probabilities
        """
        for key in self.observations:
            self.observations[key][self.pos] = np.asarray(obs[key]).reshape((self.n_envs, *self.obs_shape[key]))
        self.actions[self.pos] = np.asarray(action).reshape((self.n_envs, self.action_dim))
        self.rewards[self.pos] = np.asarray(reward).reshape(self.n_envs, self.tokens)
        self.episode_starts[self.pos] = np.asarray(episode_start)
        self.values[self.pos] = value.detach().cpu().numpy().reshape(self.n_envs, self.tokens)
        self.log_probs[self.pos] = log_prob.detach().cpu().numpy().reshape(self.n_envs, self.tokens)
        self.pos += 1
        self.full = self.pos == self.buffer_size

    def compute_returns_and_advantage(self, last_values: th.Tensor, dones: np.ndarray) -> None:
        """GAE over the token sequence of each env.

        Token ``j`` bootstraps from token ``j + 1``, the chunk's last token from the next step's first
        token (0 after the episode's end).

        :param last_values: ``[envs, k]`` values of the observation after the last step
        :param dones: ``[envs]`` whether the last step ended an episode
        """
        last = last_values.detach().cpu().numpy().reshape(self.n_envs, self.tokens)
        gae = np.zeros(self.n_envs, dtype=np.float32)
        for step in reversed(range(self.buffer_size)):
            for j in reversed(range(self.tokens)):
                if j < self.tokens - 1:
                    next_non_terminal = np.ones(self.n_envs, dtype=np.float32)
                    next_values = self.values[step, :, j + 1]
                elif step == self.buffer_size - 1:
                    next_non_terminal = 1.0 - dones.astype(np.float32)
                    next_values = last[:, 0]
                else:
                    next_non_terminal = 1.0 - self.episode_starts[step + 1]
                    next_values = self.values[step + 1, :, 0]
                delta = self.rewards[step, :, j] + self.gamma * next_values * next_non_terminal - self.values[step, :, j]
                gae = delta + self.gamma * self.gae_lambda * next_non_terminal * gae
                self.advantages[step, :, j] = gae
        self.returns = self.advantages + self.values


class TokenPPO(PPO):
    """PPO with per-token advantages and ratios (see the module docstring); any PPO argument works.

    It needs TokenMask-v0 (``info["token_rewards"]``) and :class:`TokenCreditPolicy`.

    :param policy: the policy class (:class:`TokenCreditPolicy`) or its registered name
    :param env: the environment
    :param kwargs: :class:`~stable_baselines3.PPO` arguments
    """

    def __init__(self, policy: Any, env: Any, **kwargs: Any) -> None:
        kwargs.setdefault("rollout_buffer_class", TokenRolloutBuffer)
        super().__init__(policy, env, **kwargs)

    def collect_rollouts(self, env: VecEnv, callback: BaseCallback, rollout_buffer: Any, n_rollout_steps: int) -> bool:
        """Fill the buffer with ``n_rollout_steps`` steps of every env, storing per-token rewards and values.

        The same protocol as SB3's on-policy collection (callbacks, episode info, the last values for
        GAE); TokenMask-v0 has no truncation, so no time-limit bootstrapping is needed.

        :param env: the training env
        :param callback: called every step
        :param rollout_buffer: a :class:`TokenRolloutBuffer`
        :param n_rollout_steps: steps per env
        :return: ``False`` when a callback stopped the rollout
        """
        if not isinstance(rollout_buffer, TokenRolloutBuffer):
            raise TypeError("TokenPPO needs rollout_buffer_class=TokenRolloutBuffer")
        assert self._last_obs is not None, "no previous observation"
        self.policy.set_training_mode(False)
        rollout_buffer.reset()
        callback.on_rollout_start()
        new_obs: Any = self._last_obs
        dones: np.ndarray = np.asarray(self._last_episode_starts)
        for _ in range(n_rollout_steps):
            with th.no_grad():
                actions, values, log_probs = self.policy(obs_as_tensor(self._last_obs, self.device))
            actions_np = actions.cpu().numpy()
            new_obs, _, dones, infos = env.step(actions_np)
            self.num_timesteps += env.num_envs
            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)
            if any(info.get("TimeLimit.truncated", False) for info in infos):
                raise RuntimeError("TokenPPO expects episodes that end by termination only (TokenMask-v0 never truncates)")
            try:
                token_rewards = np.stack([np.asarray(info[TOKEN_REWARDS_KEY], dtype=np.float32) for info in infos])
            except KeyError:
                raise RuntimeError(f"TokenPPO needs info['{TOKEN_REWARDS_KEY}'] from the env (TokenMask-v0 writes it)") from None
            rollout_buffer.add(self._last_obs, actions_np, token_rewards, self._last_episode_starts, values, log_probs)  # type: ignore[arg-type]
            self._last_obs = new_obs
            self._last_episode_starts = dones
        with th.no_grad():
            last_values = self.policy.predict_values(obs_as_tensor(new_obs, self.device))
        rollout_buffer.compute_returns_and_advantage(last_values=last_values, dones=dones)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True
