"""Reward of TokenMask-v0, computed for a batch of synchronized episodes (the single env is a batch of one).

An episode decides the tokens of one window chunk by chunk. :class:`EpisodeScorer` keeps, for a batch
of ``B`` windows, the reconstructor's KV cache (:meth:`Reconstructor.score_chunk`), so that the whole
episode costs one forward pass over the window, and the running counters the reward and the ``info``
dict are made of. The same object serves :class:`~tokencompress_env.env.TokenMaskEnv` (``B = 1``) and
:class:`~tokencompress_env.vector_env.TokenMaskVectorEnv` (``B = num_envs``).

Reward of one step, for each window (all in bits before the division by ``reward_scale``):

* ``info_theoretic``: ``sum over masked tokens of (bits_saved_per_mask - min(surprisal, surprisal_clip))``
  where the surprisal is ``-log2 p(x_i | compressed prefix)`` under the reconstructor, the distortion
  the drop causes.
* ``simple``: ``sum over masked tokens of (mask_bonus - wrong_penalty * [reconstructor's guess is wrong])``.
* both: the rate-keeping shaping term ``-rate_penalty * (|D_t| - |D_{t-1}|)`` with
  ``D_t = masked_so_far - target * decided_so_far`` (valid tokens only). It is potential-based, so over
  an episode it telescopes to ``-rate_penalty * |achieved - target| * n_valid``: every token masked
  beyond the target, or kept short of it, costs ``rate_penalty``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from tokencompress_env.errors import ConfigError
from tokencompress_env.options import option
from tokencompress_env.reconstructor import Reconstructor, ScoringState, resolve_scoring_dtype

#: Reward types understood by :class:`RewardConfig`.
REWARD_TYPES = ("info_theoretic", "simple")


@dataclass(frozen=True)
class RewardConfig:
    """Coefficients of the TokenMask-v0 reward (see the module docstring for the formulas), each documented at its field.

    :class:`~tokencompress_env.env_config.EnvConfig` extends it with the environment's other options.
    """

    reward_type: str = option("info_theoretic", "'info_theoretic' (bits) or 'simple' (bonus and penalty counts)")
    bits_saved_per_mask: float = option(8.0, "info-theoretic price of one dropped token, in bits")
    surprisal_clip: float = option(20.0, "the surprisal of a dropped token is clipped at this many bits (info-theoretic)")
    mask_bonus: float = option(1.0, "simple reward per dropped token")
    wrong_penalty: float = option(2.0, "simple penalty per dropped token the reconstructor does not recover")
    rate_penalty: float | None = option(
        None,
        "cost of each token of deviation from the target mask rate; None: 2 * bits_saved_per_mask (info-theoretic) "
        "or mask_bonus + wrong_penalty (simple). It must exceed the price of a token",
    )
    reward_scale: float | None = option(
        None, "every reward is divided by this; None: the window length, so an episode's return is in bits per window token"
    )

    def __post_init__(self) -> None:
        if self.reward_type not in REWARD_TYPES:
            raise ConfigError(f"reward_type must be one of {REWARD_TYPES}, got '{self.reward_type}'")
        if self.surprisal_clip <= 0:
            raise ConfigError(f"surprisal_clip must be positive, got {self.surprisal_clip}")
        if self.reward_scale is not None and self.reward_scale <= 0:
            raise ConfigError(f"reward_scale must be positive, got {self.reward_scale}")
        if self.wrong_penalty < 0:
            raise ConfigError(f"wrong_penalty must be non-negative, got {self.wrong_penalty}")
        price = self.token_price
        if self.effective_rate_penalty <= price:
            raise ConfigError(
                f"rate_penalty ({self.effective_rate_penalty}) must exceed the reward of one dropped token ({price}), "
                "or masking everything beyond the target would pay"
            )

    def reward_config(self) -> RewardConfig:
        """The reward coefficients alone, as a plain :class:`RewardConfig` (of a subclass such as ``EnvConfig`` too).

        :return: the coefficients
        """
        return RewardConfig(**{f.name: getattr(self, f.name) for f in fields(RewardConfig)})

    @property
    def token_price(self) -> float:
        """The most a single dropped token can earn (before scaling).

        :return: ``bits_saved_per_mask`` or ``mask_bonus``
        """
        return self.bits_saved_per_mask if self.reward_type == "info_theoretic" else self.mask_bonus

    @property
    def effective_rate_penalty(self) -> float:
        """The rate penalty in use (``rate_penalty`` or its default).

        :return: cost per token of deviation from the target
        """
        if self.rate_penalty is not None:
            return float(self.rate_penalty)
        if self.reward_type == "info_theoretic":
            return 2.0 * self.bits_saved_per_mask
        return self.mask_bonus + self.wrong_penalty

    def scale(self, seq_len: int) -> float:
        """The divisor applied to every reward.

        :param seq_len: window length of the environment
        :return: ``reward_scale`` or ``seq_len``
        """
        return float(self.reward_scale) if self.reward_scale is not None else float(seq_len)


def token_rewards(surprisal: torch.Tensor, correct: torch.Tensor, mask: torch.Tensor, config: RewardConfig) -> torch.Tensor:
    """Per-token reward of dropped tokens (zero at kept ones), before scaling.

    :param surprisal: ``[B, k]`` bits of each true token given the compressed prefix
    :param correct: ``[B, k]`` whether the reconstructor's top guess is the true token
    :param mask: ``[B, k]`` dropped positions (valid ones only)
    :param config: the reward coefficients
    :return: ``[B, k]`` reward of each position
    """
    if config.reward_type == "info_theoretic":
        per_token = config.bits_saved_per_mask - surprisal.clamp(max=config.surprisal_clip)
    else:
        per_token = config.mask_bonus - config.wrong_penalty * (~correct).to(surprisal.dtype)
    return torch.where(mask, per_token, torch.zeros_like(per_token))


def rate_shaping(
    masked_before: np.ndarray,
    decided_before: np.ndarray,
    masked_after: np.ndarray,
    decided_after: np.ndarray,
    target: np.ndarray,
    rate_penalty: float,
) -> np.ndarray:
    """Potential-based rate-keeping term ``-rate_penalty * (|D_t| - |D_{t-1}|)``, ``D = masked - target * decided``.

    :param masked_before: ``[B]`` valid tokens masked before this step
    :param decided_before: ``[B]`` valid tokens decided before this step
    :param masked_after: ``[B]`` valid tokens masked after this step
    :param decided_after: ``[B]`` valid tokens decided after this step
    :param target: ``[B]`` target mask rates
    :param rate_penalty: cost per token of deviation
    :return: ``[B]`` shaping reward (before scaling)
    """
    before = np.abs(masked_before - target * decided_before)
    after = np.abs(masked_after - target * decided_after)
    return -rate_penalty * (after - before)


@dataclass
class StepOutcome:
    """What one step of a batch of episodes produced; every array is ``[B]`` except ``token_reward``.

    :param reward: total reward (scaled)
    :param reward_tokens: the per-token part (scaled)
    :param reward_rate: the rate-shaping part (scaled)
    :param masked_bits: surprisal summed over the tokens dropped this step (unclipped bits)
    :param token_reward: ``[B, k]`` the reward split over the chunk's tokens (scaled; sums to ``reward``):
        each token's own term, plus the change of the rate-shaping potential when the chunk's tokens are
        counted one after another. A token's share depends only on its own decision and those before
        it, which is what per-token credit assignment needs (:class:`agents.token_ppo.TokenPPO`)
    """

    reward: np.ndarray
    reward_tokens: np.ndarray
    reward_rate: np.ndarray
    masked_bits: np.ndarray
    token_reward: np.ndarray


class EpisodeScorer:
    """Scores a batch of synchronized episodes chunk by chunk and computes their rewards.

    :param reconstructor: the reconstructor whose surprisal defines the distortion
    :param config: the reward coefficients
    :param seq_len: window length
    :param batch_size: number of windows scored together
    :param scoring_dtype: precision of the reconstructor's forward passes (see
        :func:`~tokencompress_env.reconstructor.resolve_scoring_dtype`)
    """

    def __init__(
        self, reconstructor: Reconstructor, config: RewardConfig, seq_len: int, batch_size: int, scoring_dtype: str = "auto"
    ) -> None:
        self.reconstructor = reconstructor
        self.config = config
        self.scoring_dtype = scoring_dtype
        self.seq_len = seq_len
        self.batch_size = batch_size
        self._scale = config.scale(seq_len)
        self._rate_penalty = config.effective_rate_penalty
        self.state: ScoringState | None = None
        self.target = np.zeros(batch_size, dtype=np.float64)
        self.n_valid = np.zeros(batch_size, dtype=np.int64)
        self.masked = np.zeros(batch_size, dtype=np.int64)
        self.decided = np.zeros(batch_size, dtype=np.int64)
        self.masked_correct = np.zeros(batch_size, dtype=np.int64)
        self.masked_bits_total = np.zeros(batch_size, dtype=np.float64)

    @property
    def dtype(self) -> torch.dtype:
        """The precision the current reconstructor scores in (``scoring_dtype`` resolved for its device).

        :return: the dtype
        """
        return resolve_scoring_dtype(self.scoring_dtype, self.reconstructor.device)

    def begin(self, target: np.ndarray, n_valid: np.ndarray) -> None:
        """Start new episodes for every row: empty KV cache, zero counters.

        :param target: ``[B]`` target mask rates
        :param n_valid: ``[B]`` real tokens in each window
        """
        self.state = self.reconstructor.begin_scoring(self.batch_size, self.dtype)
        self.target = np.asarray(target, dtype=np.float64).copy()
        self.n_valid = np.asarray(n_valid, dtype=np.int64).copy()
        for counter in (self.masked, self.decided, self.masked_correct):
            counter.fill(0)
        self.masked_bits_total.fill(0.0)

    def step(self, token_ids: np.ndarray, mask: np.ndarray, valid: np.ndarray) -> StepOutcome:
        """Score the next chunk of every window and return the step's rewards; advances the counters.

        :param token_ids: ``[B, k]`` true ids of the chunk
        :param mask: ``[B, k]`` dropped positions (already restricted to maskable ones)
        :param valid: ``[B, k]`` real positions
        :return: the rewards and the chunk's masked bits
        """
        if self.state is None:
            raise RuntimeError("EpisodeScorer.step called before begin()")
        # Only dropped tokens cost bits (and only their recovery counts): the output layer runs there alone.
        result = self.reconstructor.score_chunk(self.state, token_ids, mask, valid, positions="masked")
        dropped = result.mask
        per_token = token_rewards(result.surprisal, result.correct, dropped, self.config)
        per_token_host = per_token.to("cpu", torch.float64).numpy()
        dropped_host = dropped.to("cpu").numpy()
        valid_host = result.valid.to("cpu").numpy()
        bits = torch.where(dropped, result.surprisal, torch.zeros_like(result.surprisal))
        # One device->host transfer for all per-row sums.
        sums = (
            torch.stack(
                [
                    per_token.sum(1),
                    bits.sum(1),
                    dropped.sum(1).to(bits.dtype),
                    result.masked_correct.sum(1).to(bits.dtype),
                    result.valid.sum(1).to(bits.dtype),
                ],
                dim=1,
            )
            .to("cpu", torch.float64)
            .numpy()
        )
        reward_tokens_raw, masked_bits, n_masked, n_correct, n_valid = sums.T
        masked_before, decided_before = self.masked.copy(), self.decided.copy()
        self.masked += n_masked.astype(np.int64)
        self.decided += n_valid.astype(np.int64)
        self.masked_correct += n_correct.astype(np.int64)
        self.masked_bits_total += masked_bits
        shaping = rate_shaping(masked_before, decided_before, self.masked, self.decided, self.target, self._rate_penalty)
        reward_tokens = reward_tokens_raw / self._scale
        reward_rate = shaping / self._scale
        total = reward_tokens + reward_rate
        # the shaping split token by token: the potential after each token of the chunk, in order
        masked_after = masked_before[:, None] + np.cumsum(dropped_host, axis=1)
        decided_after = decided_before[:, None] + np.cumsum(valid_host, axis=1)
        potential = np.abs(masked_after - self.target[:, None] * decided_after)
        start = np.abs(masked_before - self.target * decided_before)[:, None]
        token_shaping = -self._rate_penalty * np.diff(np.concatenate([start, potential], axis=1), axis=1)
        token_reward = (per_token_host + token_shaping) / self._scale
        return StepOutcome(
            reward=total, reward_tokens=reward_tokens, reward_rate=reward_rate, masked_bits=masked_bits, token_reward=token_reward
        )

    @property
    def mask_rate(self) -> np.ndarray:
        """Achieved mask rate so far: masked over decided valid tokens (0 before any decision).

        :return: ``[B]`` rates
        """
        return np.where(self.decided > 0, self.masked / np.maximum(self.decided, 1), 0.0)

    @property
    def recovery_accuracy(self) -> np.ndarray:
        """Fraction of the dropped tokens so far that the reconstructor's top guess recovers (0 if none dropped).

        :return: ``[B]`` fractions
        """
        return np.where(self.masked > 0, self.masked_correct / np.maximum(self.masked, 1), 0.0)
