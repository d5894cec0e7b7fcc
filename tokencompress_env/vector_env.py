"""TokenMaskVectorEnv: TokenMask-v0 natively batched, one reconstructor forward for all windows per step.

``gymnasium.make_vec("TokenMask-v0", num_envs=N, vectorization_mode="vector_entry_point")`` builds it.
Every episode has ``seq_len / chunk_size`` steps, so the N rows stay synchronized: they start together,
are scored together (one :meth:`Reconstructor.score_chunk` call on ``[N, chunk_size]`` tokens per
step) and end together. Autoreset happens in the same step (:attr:`AutoresetMode.SAME_STEP`): the
step that ends the episodes returns the first observation of the next ones, with the final
observations in ``infos["final_obs"]`` (an object array of per-row dicts) and the final infos in
``infos["final_info"]``, as Gymnasium 1.x's ``SyncVectorEnv`` does.

Row ``i`` has its own random generator, seeded with ``seed + i`` by ``reset(seed=seed)``, the same
convention as ``SyncVectorEnv``: N single :class:`~tokencompress_env.env.TokenMaskEnv` reset with seeds
``seed + i`` play the same episodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from tokencompress_env.env import CoreAccess, build_core, check_mask_rate_range, check_reset_options, draw_episode
from tokencompress_env.errors import InputError
from tokencompress_env.reconstructor import Reconstructor
from tokencompress_env.reward import RewardConfig


def _per_row(value: Any, num_envs: int, name: str) -> list[Any]:
    """Broadcast a reset option (a scalar, or one value per row with ``None`` for "draw") to the rows.

    :param value: the option value
    :param num_envs: rows
    :param name: option name (for the error message)
    :return: one value per row
    """
    if value is None or np.isscalar(value):
        return [value] * num_envs
    values = list(value)
    if len(values) != num_envs:
        raise InputError(f"option '{name}' has {len(values)} values for {num_envs} environments")
    return values


class TokenMaskVectorEnv(CoreAccess, VectorEnv[dict[str, np.ndarray], np.ndarray, np.ndarray]):
    """N synchronized TokenMask-v0 episodes scored together (see :class:`~tokencompress_env.env.TokenMaskEnv` for the env).

    Takes the same keyword arguments as :class:`~tokencompress_env.env.TokenMaskEnv` plus ``num_envs``.
    Observations are the single env's ``Dict`` batched (``[N, ...]`` arrays), actions are ``[N,
    chunk_size]`` binary, rewards ``[N]`` float64, infos a dict of ``[N]`` arrays each with its ``_key``
    mask. :meth:`action_masks` returns ``[N, 2 * chunk_size]`` for MaskablePPO.

    :param num_envs: number of episodes run together
    :param corpus: corpus source
    :param split: corpus split
    :param reconstructor: preset name, directory, or (direct construction) a :class:`Reconstructor`
    :param seq_len: tokens per window
    :param chunk_size: tokens decided per step
    :param reward_type: ``"info_theoretic"`` or ``"simple"``
    :param mask_rate_range: range of the uniform target mask rate
    :param observe_surprisal: add the ``surprisal`` observation
    :param keep_digits: force-keep tokens containing digits
    :param force_keep_strings: strings whose occurrences are force-kept
    :param bits_saved_per_mask: info-theoretic price of a dropped token (bits)
    :param surprisal_clip: clip of a dropped token's surprisal (bits)
    :param mask_bonus: simple reward per dropped token
    :param wrong_penalty: simple penalty per unrecovered dropped token
    :param rate_penalty: cost per token of deviation from the target (``None``: default)
    :param reward_scale: divisor of every reward (``None``: ``seq_len``)
    :param device: where a named reconstructor runs
    :param scoring_dtype: precision of the reconstructor's forward passes: ``"auto"`` (bfloat16 where native), ``"float32"``,
        ``"bfloat16"`` or ``"float16"``
    :param windows: (direct construction) token-id windows replacing the corpus
    :param valid: (direct construction) real positions of ``windows``
    :param units: what is dropped or kept together: ``"piece"`` (whole characters) or ``"word"``
    """

    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}  # noqa: RUF012 - Gymnasium's convention

    def __init__(
        self,
        num_envs: int = 1,
        corpus: str = "embedded",
        split: str = "train",
        reconstructor: str | Path | Reconstructor = "tiny",
        seq_len: int = 128,
        chunk_size: int = 16,
        reward_type: str = "info_theoretic",
        mask_rate_range: Sequence[float] = (0.2, 0.8),
        observe_surprisal: bool = False,
        keep_digits: bool = False,
        force_keep_strings: Sequence[str] = (),
        bits_saved_per_mask: float = 8.0,
        surprisal_clip: float = 20.0,
        mask_bonus: float = 1.0,
        wrong_penalty: float = 2.0,
        rate_penalty: float | None = None,
        reward_scale: float | None = None,
        device: str = "auto",
        scoring_dtype: str = "auto",
        windows: np.ndarray | Sequence[Sequence[int]] | None = None,
        valid: np.ndarray | None = None,
        units: str = "piece",
    ) -> None:
        self.mask_rate_range = check_mask_rate_range(mask_rate_range)
        self.reward_config = RewardConfig(
            reward_type, bits_saved_per_mask, surprisal_clip, mask_bonus, wrong_penalty, rate_penalty, reward_scale
        )
        self.core = build_core(
            num_envs,
            corpus=corpus,
            split=split,
            reconstructor=reconstructor,
            seq_len=seq_len,
            chunk_size=chunk_size,
            reward_config=self.reward_config,
            observe_surprisal=observe_surprisal,
            scoring_dtype=scoring_dtype,
            keep_digits=keep_digits,
            force_keep_strings=force_keep_strings,
            device=device,
            windows=windows,
            valid=valid,
            units=units,
        )
        self.num_envs = num_envs
        self.seq_len, self.chunk_size = seq_len, chunk_size
        self.render_mode = None
        self.single_observation_space = self.core.observation_space
        self.single_action_space = self.core.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._row_rngs: list[np.random.Generator] = [seeding.np_random(None)[0] for _ in range(num_envs)]

    def _start(self, targets: list[Any], indices: list[Any]) -> None:
        """Draw each row's window and target from its own generator and begin the episodes.

        :param targets: per-row fixed target or ``None``
        :param indices: per-row fixed window index or ``None``
        """
        drawn = [draw_episode(rng, self.num_windows, self.mask_rate_range, t, w) for rng, t, w in zip(self._row_rngs, targets, indices)]
        self.core.start(np.array([d[0] for d in drawn]), np.array([d[1] for d in drawn]))

    def _infos(self) -> dict[str, Any]:
        """The vector infos: ``[N]`` arrays, each with an all-true ``_key`` mask.

        :return: the infos
        """
        infos: dict[str, Any] = {}
        every = np.ones(self.num_envs, dtype=bool)
        for key, value in self.core.infos().items():
            infos[key] = value
            infos[f"_{key}"] = every.copy()
        return infos

    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start new episodes in every row.

        :param seed: ``None``, an int (row ``i`` gets ``seed + i``) or one seed per row
        :param options: ``target_mask_rate`` and ``window_index``, each a scalar or one value per row (``None``: draw)
        :return: the batched observation and infos
        """
        options = check_reset_options(options)
        if isinstance(seed, int):
            seeds: list[int | None] = [seed + i for i in range(self.num_envs)]
        elif seed is None:
            seeds = [None] * self.num_envs
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise InputError(f"{len(seeds)} seeds given for {self.num_envs} environments")
        super().reset(seed=seeds[0])
        for i, s in enumerate(seeds):
            if s is not None:
                self._row_rngs[i] = seeding.np_random(s)[0]
        self._start(
            _per_row(options.get("target_mask_rate"), self.num_envs, "target_mask_rate"),
            _per_row(options.get("window_index"), self.num_envs, "window_index"),
        )
        return self.core.observation(), self._infos()

    def step(self, actions: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Decide the next chunk in every row; at the end of the episodes, reset them in the same step.

        :param actions: ``[num_envs, chunk_size]`` binary decisions (1 = drop)
        :return: observations, rewards, terminations, truncations, infos
        """
        outcome = self.core.step(np.asarray(actions))
        done = self.core.done
        terminated = np.full(self.num_envs, done, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        if not done:
            return self.core.observation(), outcome.reward, terminated, truncated, self._infos()
        final_obs_batch = self.core.observation()
        final_obs = np.empty(self.num_envs, dtype=object)
        for i in range(self.num_envs):
            final_obs[i] = {key: value[i] for key, value in final_obs_batch.items()}
        final_info = self._infos()
        self._start([None] * self.num_envs, [None] * self.num_envs)
        infos = self._infos()
        every = np.ones(self.num_envs, dtype=bool)
        infos.update({"final_obs": final_obs, "_final_obs": every.copy(), "final_info": final_info, "_final_info": every.copy()})
        return self.core.observation(), outcome.reward, terminated, truncated, infos

    def action_masks(self) -> np.ndarray:
        """Valid actions of the current chunk of every row, MaskablePPO's format for ``MultiBinary``.

        :return: ``[num_envs, 2 * chunk_size]`` bool (``[keep allowed, drop allowed]`` per position)
        """
        return self.core.action_masks()

    def close_extras(self, **kwargs: Any) -> None:
        """Nothing to release: the reconstructor is shared and freed with the env.

        :param kwargs: unused
        """
