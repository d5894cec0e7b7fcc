"""TokenMaskSB3VecEnv: the natively batched TokenMask-v0 as a Stable-Baselines3 ``VecEnv``.

SB3 does not take a ``gymnasium.vector.VectorEnv``; this adapter keeps the batch in one process (one
reconstructor forward for all rows per step) and speaks SB3's protocol: observations as a dict of
``[N, ...]`` arrays, ``float32`` rewards, ``dones``, a list of per-env info dicts with
``terminal_observation`` and ``TimeLimit.truncated`` at episode ends, and ``reset_infos``. It works
under ``VecMonitor`` and with PPO; ``env_method("action_masks")`` returns one mask per env, so
sb3-contrib's MaskablePPO works too.

Methods and attributes of the vector env are shared by all rows: ``set_attr`` and ``env_method``
act on the vector env once; ``get_attr`` returns its value for each requested index. A method that
returns one value per row (an array or list of length ``num_envs``, such as ``action_masks``) is
split by row; any other result is repeated for each requested index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from tokencompress_env.vector_env import TokenMaskVectorEnv


def _row_infos(infos: dict[str, Any], num_envs: int, skip: tuple[str, ...] = ("final_obs", "final_info")) -> list[dict[str, Any]]:
    """Split Gymnasium vector infos (``[N]`` arrays with ``_key`` masks) into one dict per env.

    :param infos: the vector infos
    :param num_envs: number of envs
    :param skip: keys not copied
    :return: one info dict per env
    """
    rows: list[dict[str, Any]] = [{} for _ in range(num_envs)]
    for key, value in infos.items():
        if key.startswith("_") or key in skip:
            continue
        present = infos.get(f"_{key}", np.ones(num_envs, dtype=bool))
        for i in range(num_envs):
            if present[i]:
                item = value[i]
                rows[i][key] = item.item() if isinstance(item, np.generic) else item
    return rows


class TokenMaskSB3VecEnv(VecEnv):
    """Adapter from :class:`~tokencompress_env.vector_env.TokenMaskVectorEnv` to SB3's ``VecEnv``.

    :param venv: the batched env, or ``None`` to build one from ``kwargs``
    :param num_envs: rows when building from ``kwargs``
    :param kwargs: arguments of :class:`TokenMaskVectorEnv` when ``venv`` is ``None``
    """

    def __init__(self, venv: TokenMaskVectorEnv | None = None, num_envs: int = 1, **kwargs: Any) -> None:
        if venv is None:
            venv = TokenMaskVectorEnv(num_envs=num_envs, **kwargs)
        elif kwargs:
            raise TypeError("pass either a TokenMaskVectorEnv or its keyword arguments, not both")
        self.venv = venv
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None

    # ------------------------------------------------------------------ stepping
    def reset(self) -> VecEnvObs:
        """Reset every env with the seeds of :meth:`seed` and the options of :meth:`set_options` (used once).

        :return: the batched observation
        """
        seeds = None if all(s is None for s in self._seeds) else list(self._seeds)
        options: dict[str, Any] = {}
        for key in ("target_mask_rate", "window_index"):
            values = [opts.get(key) for opts in self._options]
            if any(v is not None for v in values):
                options[key] = values
        obs, infos = self.venv.reset(seed=seeds, options=options or None)
        self.reset_infos = _row_infos(infos, self.num_envs)
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        """Store the actions of the next step.

        :param actions: ``[num_envs, chunk_size]`` binary decisions
        """
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        """Step every env; envs whose episode ended are reset and report ``terminal_observation``.

        :return: observations, rewards, dones, infos
        """
        if self._actions is None:
            raise RuntimeError("step_wait() called without step_async()")
        obs, rewards, terminated, truncated, infos = self.venv.step(self._actions)
        self._actions = None
        dones = terminated | truncated
        rows = _row_infos(infos, self.num_envs)
        if "final_obs" in infos:
            final_rows = _row_infos(infos["final_info"], self.num_envs)
            for i in np.flatnonzero(infos["_final_obs"]):
                self.reset_infos[i] = rows[i]
                rows[i] = final_rows[i]
                rows[i]["terminal_observation"] = infos["final_obs"][i]
        for i in np.flatnonzero(dones):
            rows[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
        return obs, rewards.astype(np.float32), dones, rows

    def close(self) -> None:
        """Close the vector env."""
        self.venv.close()

    # ------------------------------------------------------------------ attributes and methods
    def _indices(self, indices: VecEnvIndices) -> list[int]:
        return list(self._get_indices(indices))

    def has_attr(self, attr_name: str) -> bool:
        """Whether the vector env has an attribute (or method).

        :param attr_name: the name
        :return: ``True`` if present
        """
        return hasattr(self.venv, attr_name)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """An attribute of the vector env, once per requested index.

        :param attr_name: the name
        :param indices: envs asked for (``None``: all)
        :return: the values
        """
        value = getattr(self.venv, attr_name)
        return [value for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set an attribute of the vector env (shared by all rows, so only for all indices).

        :param attr_name: the name
        :param value: the value
        :param indices: must cover every env
        """
        if sorted(self._indices(indices)) != list(range(self.num_envs)):
            raise ValueError("TokenMaskSB3VecEnv rows share one vector env: set_attr applies to all envs at once")
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any) -> list[Any]:
        """Call a method of the vector env once and return its result for each requested index.

        :param method_name: the method
        :param method_args: positional arguments
        :param indices: envs asked for (``None``: all)
        :param method_kwargs: keyword arguments
        :return: per-row results for batched results (``action_masks``), else the result repeated
        """
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        idx = self._indices(indices)
        if isinstance(result, np.ndarray | list | tuple) and len(result) == self.num_envs:
            return [result[i] for i in idx]
        return [result for _ in idx]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        """Rows are not ``gymnasium.Env`` objects, so none is wrapped.

        :param wrapper_class: the wrapper type
        :param indices: envs asked for
        :return: ``False`` for each
        """
        return [False for _ in self._indices(indices)]

    def action_masks(self) -> np.ndarray:
        """Valid actions of every env (MaskablePPO's format for ``MultiBinary``).

        :return: ``[num_envs, 2 * chunk_size]`` bool
        """
        return self.venv.action_masks()

    def get_images(self) -> Sequence[np.ndarray | None]:
        """No image rendering.

        :return: ``None`` per env
        """
        return [None for _ in range(self.num_envs)]
