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

from tokencompress_env.env import CoreAccess, build_core, check_reset_options, draw_episode, env_config
from tokencompress_env.env_config import EnvConfig
from tokencompress_env.errors import InputError
from tokencompress_env.reconstructor import Reconstructor


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

    Takes the same arguments as :class:`~tokencompress_env.env.TokenMaskEnv` (an
    :class:`~tokencompress_env.env_config.EnvConfig` and/or its fields as keywords) plus ``num_envs``.
    Observations are the single env's ``Dict`` batched (``[N, ...]`` arrays), actions are ``[N,
    chunk_size]`` binary, rewards ``[N]`` float64, infos a dict of ``[N]`` arrays each with its ``_key``
    mask. :meth:`action_masks` returns ``[N, 2 * chunk_size]`` for MaskablePPO.

    :param num_envs: number of episodes run together
    :param config: the env's options (``None``: the defaults, changed by ``options``)
    :param reconstructor: preset name or directory (an option), or (direct construction) a :class:`Reconstructor`
    :param windows: (direct construction) token-id windows replacing the corpus
    :param valid: (direct construction) real positions of ``windows``
    :param continuations: (direct construction, continuation reward) ``[N, continuation_tokens]`` ids following each window
    :param options: fields of :class:`~tokencompress_env.env_config.EnvConfig` by name
    """

    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}  # noqa: RUF012 - Gymnasium's convention

    def __init__(
        self,
        num_envs: int = 1,
        config: EnvConfig | None = None,
        *,
        reconstructor: str | Path | Reconstructor | None = None,
        windows: np.ndarray | Sequence[Sequence[int]] | None = None,
        valid: np.ndarray | None = None,
        continuations: np.ndarray | None = None,
        **options: Any,
    ) -> None:
        self.config, model = env_config(config, reconstructor, options)
        self.core = build_core(num_envs, self.config, model, windows, valid, continuations)
        self.reward_config = self.core.reward_config
        self.num_envs = num_envs
        self.seq_len, self.chunk_size = self.config.seq_len, self.config.chunk_size
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
        drawn = [draw_episode(rng, self.num_windows, self.config, t, w) for rng, t, w in zip(self._row_rngs, targets, indices)]
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
