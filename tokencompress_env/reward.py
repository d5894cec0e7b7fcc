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
* ``continuation`` (a downstream reward): each step pays ``bits_saved_per_mask`` per token dropped in it,
  and the episode's last step adds ``-(C_deleted - C_full)``, where ``C`` are the bits of the ``continuation_tokens``
  tokens that follow the window in its document under the reconstructor read as a plain causal LM
  (:meth:`Reconstructor.continuation_bits`), given the window with the dropped tokens *deleted*
  (``C_deleted``) or the full window (``C_full``). Both contexts are cut to their last ``seq_len -
  continuation_tokens`` tokens, the evaluation's downstream-reading rule
  (:func:`~tokencompress_env.reconstructor.downstream_context_tokens` with the env's window as the LM's
  trained one), in the env's ``scoring_dtype``. The episode's return is ``price * drops - (C_deleted - C_full)`` plus the rate term. The
  per-step price keeps the rate decisions' credit local; the continuation term, a function of the whole
  mask, comes at the end (in ``token_reward``, on the chunk's last position).
* all: the rate-keeping shaping term ``-rate_penalty * (|D_t| - |D_{t-1}|)`` with
  ``D_t = masked_so_far - target * decided_so_far`` (valid tokens only). It is potential-based, so over
  an episode it telescopes to ``-rate_penalty * |achieved - target| * n_valid``: every token masked
  beyond the target, or kept short of it, costs ``rate_penalty``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

import numpy as np
import torch

from tokencompress_env.errors import ConfigError
from tokencompress_env.options import option
from tokencompress_env.reconstructor import Reconstructor, ScoringState, downstream_context_tokens, resolve_scoring_dtype

#: Reward types understood by :class:`RewardConfig`.
REWARD_TYPES = ("info_theoretic", "simple", "continuation")
#: Reward types priced in bits (``bits_saved_per_mask`` per dropped token).
BITS_REWARD_TYPES = ("info_theoretic", "continuation")


@dataclass(frozen=True)
class RewardConfig:
    """Coefficients of the TokenMask-v0 reward (see the module docstring for the formulas), each documented at its field.

    :class:`~tokencompress_env.env_config.EnvConfig` extends it with the environment's other options.
    """

    reward_type: str = option(
        "info_theoretic",
        "'info_theoretic' (bits), 'simple' (bonus and penalty counts) or 'continuation' (bits of the next "
        "'continuation_tokens' tokens given the window with the dropped tokens deleted, minus given the full window)",
    )
    bits_saved_per_mask: float = option(8.0, "price of one dropped token, in bits (info-theoretic and continuation rewards)")
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
    continuation_tokens: int = option(
        32,
        "continuation reward: tokens after the window (in its document) whose bits it charges; fewer than seq_len, "
        "whose remainder is the context the reconstructor reads (only windows with such a continuation are played)",
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
        tokens = self.continuation_tokens
        if isinstance(tokens, (bool, np.bool_)) or not isinstance(tokens, numbers.Integral) or tokens < 1:
            raise ConfigError(f"continuation_tokens must be a positive integer, got {tokens!r}")
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

        :return: ``bits_saved_per_mask`` (bits rewards) or ``mask_bonus``
        """
        return self.bits_saved_per_mask if self.reward_type in BITS_REWARD_TYPES else self.mask_bonus

    @property
    def effective_rate_penalty(self) -> float:
        """The rate penalty in use (``rate_penalty`` or its default).

        :return: cost per token of deviation from the target
        """
        if self.rate_penalty is not None:
            return float(self.rate_penalty)
        if self.reward_type in BITS_REWARD_TYPES:
            return 2.0 * self.bits_saved_per_mask
        return self.mask_bonus + self.wrong_penalty

    def scale(self, seq_len: int) -> float:
        """The divisor applied to every reward.

        :param seq_len: window length of the environment
        :return: ``reward_scale`` or ``seq_len``
        """
        return float(self.reward_scale) if self.reward_scale is not None else float(seq_len)


def token_rewards(surprisal: torch.Tensor, correct: torch.Tensor, mask: torch.Tensor, config: RewardConfig) -> torch.Tensor:
    """Per-token reward of dropped tokens (zero at kept ones), before scaling; the continuation reward's is its price alone.

    :param surprisal: ``[B, k]`` bits of each true token given the compressed prefix
    :param correct: ``[B, k]`` whether the reconstructor's top guess is the true token
    :param mask: ``[B, k]`` dropped positions (valid ones only)
    :param config: the reward coefficients
    :return: ``[B, k]`` reward of each position
    """
    if config.reward_type == "info_theoretic":
        per_token = config.bits_saved_per_mask - surprisal.clamp(max=config.surprisal_clip)
    elif config.reward_type == "continuation":
        per_token = torch.full_like(surprisal, config.bits_saved_per_mask)
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
        counted one after another, plus (continuation reward, last step) the continuation term on the
        chunk's last position. A token's share depends only on its own decision and those before
        it, which is what per-token credit assignment needs (:class:`agents.token_ppo.TokenPPO`)
    :param reward_continuation: the continuation part ``-(C_deleted - C_full)`` (scaled; continuation
        reward, episode's last step; 0 otherwise)
    :param continuation_full: bits of the continuation given the full window (summed over its tokens;
        continuation reward, episode's last step; 0 otherwise)
    :param continuation_deleted: the same given the window with the dropped tokens deleted
    """

    reward: np.ndarray
    reward_tokens: np.ndarray
    reward_rate: np.ndarray
    masked_bits: np.ndarray
    token_reward: np.ndarray
    reward_continuation: np.ndarray
    continuation_full: np.ndarray
    continuation_deleted: np.ndarray

    @classmethod
    def zeros(cls, batch_size: int, chunk_size: int) -> StepOutcome:
        """The outcome of no step (what ``info`` reports at reset).

        :param batch_size: rows
        :param chunk_size: tokens per step
        :return: all-zero arrays
        """
        zeros = np.zeros(batch_size, dtype=np.float64)
        return cls(
            reward=zeros,
            reward_tokens=zeros,
            reward_rate=zeros,
            masked_bits=zeros,
            token_reward=np.zeros((batch_size, chunk_size), dtype=np.float64),
            reward_continuation=zeros,
            continuation_full=zeros,
            continuation_deleted=zeros,
        )


class EpisodeScorer:
    """Scores a batch of synchronized episodes chunk by chunk and computes their rewards.

    With the continuation reward the scorer also keeps the episode's window and decisions, and after the
    chunk that completes the window scores the continuations given in :meth:`begin`.

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
        self.continuation = config.reward_type == "continuation"
        if self.continuation and self.context_tokens < 1:  # fails here, not at the first episode's end
            raise ConfigError(
                f"continuation_tokens ({config.continuation_tokens}) must be fewer than seq_len ({seq_len}): "
                "the rest of the window is the context the continuation is read after"
            )
        shape = (batch_size, seq_len) if self.continuation else (batch_size, 0)
        self.window_ids = np.zeros(shape, dtype=np.int64)
        self.window_dropped = np.zeros(shape, dtype=bool)
        self.window_valid = np.zeros(shape, dtype=bool)
        self.continuations: np.ndarray | None = None
        self.position = 0

    @property
    def context_tokens(self) -> int:
        """Continuation reward: the most recent window tokens the reconstructor reads before the continuation.

        The evaluation's downstream-reading rule (:func:`downstream_context_tokens`) with the env's window
        as the window the reconstructor is trained on: ``seq_len - continuation_tokens``.

        :return: context tokens
        """
        trained = {"build_config": {"seq_len": self.seq_len}}
        return downstream_context_tokens(self.reconstructor, trained, self.config.continuation_tokens, None)

    @property
    def dtype(self) -> torch.dtype:
        """The precision the current reconstructor scores in (``scoring_dtype`` resolved for its device).

        :return: the dtype
        """
        return resolve_scoring_dtype(self.scoring_dtype, self.reconstructor.device)

    def begin(self, target: np.ndarray, n_valid: np.ndarray, continuations: np.ndarray | None = None) -> None:
        """Start new episodes for every row: empty KV cache, zero counters.

        :param target: ``[B]`` target mask rates
        :param n_valid: ``[B]`` real tokens in each window
        :param continuations: ``[B, continuation_tokens]`` ids following each window (continuation reward only)
        """
        if self.continuation:
            if continuations is None:
                raise ValueError("the continuation reward needs each window's continuation")
            conts = np.asarray(continuations, dtype=np.int64)
            if conts.shape != (self.batch_size, self.config.continuation_tokens):
                raise ValueError(f"continuations must be [{self.batch_size}, {self.config.continuation_tokens}], got {conts.shape}")
            self.continuations = conts.copy()
            self.window_ids.fill(0)
            self.window_dropped.fill(False)
            self.window_valid.fill(False)
        self.position = 0
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
        width = dropped_host.shape[1]
        if self.continuation:
            span = slice(self.position, self.position + width)
            self.window_ids[:, span], self.window_dropped[:, span], self.window_valid[:, span] = token_ids, dropped_host, valid_host
        self.position += width
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
        zeros = np.zeros(self.batch_size, dtype=np.float64)
        full, deleted, reward_continuation = zeros, zeros, zeros
        if self.continuation and self.position >= self.seq_len:
            full, deleted = self.continuation_bits()
            reward_continuation = -(deleted - full) / self._scale
            total = total + reward_continuation
            token_reward[:, -1] += reward_continuation
        return StepOutcome(
            reward=total,
            reward_tokens=reward_tokens,
            reward_rate=reward_rate,
            masked_bits=masked_bits,
            token_reward=token_reward,
            reward_continuation=reward_continuation,
            continuation_full=full,
            continuation_deleted=deleted,
        )

    def continuation_bits(self) -> tuple[np.ndarray, np.ndarray]:
        """Bits of each row's continuation given its full window and given the window with its dropped tokens deleted.

        One :meth:`Reconstructor.continuation_bits` pass over both contexts of every row, each cut to its
        last :attr:`context_tokens` tokens (padding is never part of a context).

        :return: ``[B]`` bits given the full window and ``[B]`` bits given the deleted one (summed over the continuation)
        """
        if self.continuations is None:
            raise RuntimeError("EpisodeScorer.continuation_bits called before begin()")
        keep = self.context_tokens
        full = [self.window_ids[b][self.window_valid[b]] for b in range(self.batch_size)]
        deleted = [self.window_ids[b][self.window_valid[b] & ~self.window_dropped[b]] for b in range(self.batch_size)]
        contexts = [c[len(c) - keep :] if keep < len(c) else c for c in full + deleted]
        bits = self.reconstructor.continuation_bits(contexts, np.concatenate([self.continuations, self.continuations]), dtype=self.dtype)
        sums = bits.to("cpu", torch.float64).sum(dim=1).numpy()
        return sums[: self.batch_size], sums[self.batch_size :]

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
