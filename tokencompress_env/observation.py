"""TokenMask-v0's observation, owned here: its keys and spaces, the decision codes, and the function that builds it.

The environment (:class:`~tokencompress_env.env.TokenMaskCore`), the compression API
(:func:`~tokencompress_env.compressor.window_mask_logits`), the distillation warm start
(:func:`agents.distill.distill_policy`) and the policy's feature extractor (:data:`OBSERVATION_KEYS`)
all build or read the observation through this module, so that a policy sees in use exactly what it saw
in training.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import numpy as np
from gymnasium import spaces

#: Upper bound of the ``surprisal`` observation, in bits (values are clipped to it).
MAX_SURPRISAL_BITS = 64.0
#: Keys every observation has (``surprisal`` is added with ``observe_surprisal``).
OBSERVATION_KEYS = ("token_ids", "decisions", "valid", "force_keep", "position", "target_mask_rate")
#: The optional key of the reconstructor's surprisal of the original tokens.
SURPRISAL = "surprisal"


class Decision(IntEnum):
    """Codes of the ``decisions`` observation."""

    #: not decided yet
    UNDECIDED = 0
    #: kept (padding reads kept once decided)
    KEPT = 1
    #: dropped (replaced by the reconstructor's mask token)
    MASKED = 2


def make_spaces(seq_len: int, chunk_size: int, vocab_size: int, observe_surprisal: bool) -> tuple[spaces.Dict, spaces.MultiBinary]:
    """The observation and action space of one TokenMask-v0 environment.

    :param seq_len: window length
    :param chunk_size: tokens decided per step
    :param vocab_size: number of token ids
    :param observe_surprisal: include the ``surprisal`` feature
    :return: observation space and action space
    """
    obs: dict[str, spaces.Space[Any]] = {
        "token_ids": spaces.Box(0, vocab_size - 1, (seq_len,), np.int64),
        "decisions": spaces.Box(0, int(max(Decision)), (seq_len,), np.int64),
        "valid": spaces.Box(0, 1, (seq_len,), np.int64),
        "force_keep": spaces.Box(0, 1, (seq_len,), np.int64),
        "position": spaces.Box(0, seq_len, (1,), np.int64),
        "target_mask_rate": spaces.Box(0.0, 1.0, (1,), np.float32),
    }
    if observe_surprisal:
        obs[SURPRISAL] = spaces.Box(0.0, MAX_SURPRISAL_BITS, (seq_len,), np.float32)
    return spaces.Dict(obs), spaces.MultiBinary(chunk_size)


def build_observation(
    token_ids: np.ndarray,
    valid: np.ndarray,
    force_keep: np.ndarray,
    target_mask_rate: float | np.ndarray,
    surprisal: np.ndarray | None = None,
    decisions: np.ndarray | None = None,
    position: int = 0,
) -> dict[str, np.ndarray]:
    """A batch of observations (fresh arrays); with the defaults, the observation at the start of an episode.

    :param token_ids: ``[B, L]`` ids (padding id at padding)
    :param valid: ``[B, L]`` real positions
    :param force_keep: ``[B, L]`` force-kept positions
    :param target_mask_rate: the target rate, one for all rows or ``[B]``
    :param surprisal: ``[B, L]`` bits of each original token given the uncompressed prefix (clipped to
        ``[0, MAX_SURPRISAL_BITS]``); ``None``: no ``surprisal`` key
    :param decisions: ``[B, L]`` :class:`Decision` codes so far (``None``: nothing decided)
    :param position: first token of the chunk decided next
    :return: key -> ``[B, ...]`` array, with the dtypes of :func:`make_spaces`
    """
    ids = np.array(token_ids, dtype=np.int64)
    batch = ids.shape[0]
    rates = np.broadcast_to(np.asarray(target_mask_rate, dtype=np.float32).reshape(-1), (batch,))
    obs = {
        "token_ids": ids,
        "decisions": np.full(ids.shape, Decision.UNDECIDED, dtype=np.int64) if decisions is None else np.array(decisions, dtype=np.int64),
        "valid": np.asarray(valid, dtype=bool).astype(np.int64),
        "force_keep": np.asarray(force_keep, dtype=bool).astype(np.int64),
        "position": np.full((batch, 1), position, dtype=np.int64),
        "target_mask_rate": rates[:, None].copy(),
    }
    if surprisal is not None:
        obs[SURPRISAL] = np.clip(np.asarray(surprisal, dtype=np.float32), 0.0, MAX_SURPRISAL_BITS)
    return obs
