"""Choose an SB3 / sb3-contrib algorithm by name, with the matching per-token policy.

=================  ==============================  ======================================
name               algorithm                       policy
=================  ==============================  ======================================
``ppo``            ``stable_baselines3.PPO``       :class:`TokenActorCriticPolicy`
``a2c``            ``stable_baselines3.A2C``       :class:`TokenActorCriticPolicy`
``trpo``           ``sb3_contrib.TRPO``            :class:`TokenActorCriticPolicy`
``maskable_ppo``   ``sb3_contrib.MaskablePPO``     :class:`MaskableTokenActorCriticPolicy`
``recurrent_ppo``  ``sb3_contrib.RecurrentPPO``    :class:`RecurrentTokenActorCriticPolicy`
=================  ==============================  ======================================

``maskable_ppo`` needs an environment with an ``action_masks()`` method (TokenMask-v0 has one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sb3_contrib import TRPO, MaskablePPO, RecurrentPPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv

from agents.policy import MaskableTokenActorCriticPolicy, RecurrentTokenActorCriticPolicy, TokenActorCriticPolicy
from agents.token_ppo import TokenCreditPolicy, TokenPPO
from tokencompress_env.errors import CheckpointError
from tokencompress_env.run_folder import verify_agent_zip


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm and the policy class it is used with.

    :param name: Canonical name (``ppo``, ``a2c``, ``trpo``, ``maskable_ppo``, ``recurrent_ppo``)
    :param algo_class: The SB3 / sb3-contrib algorithm class
    :param policy_class: The per-token policy class for it
    :param needs_action_masks: True when the environment must provide ``action_masks()``
    """

    name: str
    algo_class: type[BaseAlgorithm]
    policy_class: type[BasePolicy]
    needs_action_masks: bool = False


#: Every supported algorithm, by canonical name.
ALGORITHMS: dict[str, AlgorithmSpec] = {
    "ppo": AlgorithmSpec("ppo", PPO, TokenActorCriticPolicy),
    "a2c": AlgorithmSpec("a2c", A2C, TokenActorCriticPolicy),
    "trpo": AlgorithmSpec("trpo", TRPO, TokenActorCriticPolicy),
    "maskable_ppo": AlgorithmSpec("maskable_ppo", MaskablePPO, MaskableTokenActorCriticPolicy, needs_action_masks=True),
    "recurrent_ppo": AlgorithmSpec("recurrent_ppo", RecurrentPPO, RecurrentTokenActorCriticPolicy),
    "token_ppo": AlgorithmSpec("token_ppo", TokenPPO, TokenCreditPolicy),
}

#: Other spellings accepted by :func:`get_algorithm` (after lower-casing and ``-`` to ``_``).
ALIASES: dict[str, str] = {
    "ppo_mask": "maskable_ppo",
    "maskableppo": "maskable_ppo",
    "mppo": "maskable_ppo",
    "recurrentppo": "recurrent_ppo",
    "ppo_lstm": "recurrent_ppo",
    "rppo": "recurrent_ppo",
    "tokenppo": "token_ppo",
    "ppo_token": "token_ppo",
}


def canonical_name(algo_name: str) -> str:
    """Canonical algorithm name.

    :param algo_name: A name from :data:`ALGORITHMS` or :data:`ALIASES`, any case, ``-`` or ``_``
    :return: The key in :data:`ALGORITHMS`
    :raises ValueError: For an unknown name, listing the valid ones
    """
    key = algo_name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algo_name!r}; choose one of {sorted(ALGORITHMS)}")
    return key


def get_algorithm(algo_name: str) -> AlgorithmSpec:
    """The algorithm class and policy class for a name.

    :param algo_name: Algorithm name (see :func:`canonical_name`)
    :return: Its :class:`AlgorithmSpec`
    """
    return ALGORITHMS[canonical_name(algo_name)]


def make_model(
    algo_name: str,
    env: GymEnv | str,
    policy_kwargs: dict[str, Any] | None = None,
    features_extractor_kwargs: dict[str, Any] | None = None,
    **algo_kwargs: Any,
) -> BaseAlgorithm:
    """Build an algorithm with its per-token policy.

    :param algo_name: ``ppo``, ``a2c``, ``trpo``, ``maskable_ppo`` or ``recurrent_ppo`` (see :func:`canonical_name`)
    :param env: Environment (or its id) as SB3 accepts it; a ``VecEnv`` for several environments
    :param policy_kwargs: Policy keyword arguments (``net_arch``, ``lstm_hidden_size``, ``ortho_init``, ...)
    :param features_extractor_kwargs: Shortcut for ``policy_kwargs["features_extractor_kwargs"]``
        (``embed_dim``, ``kernel_size``, ``dilations``, ...); merged over what ``policy_kwargs`` holds
    :param algo_kwargs: Algorithm keyword arguments (``n_steps``, ``learning_rate``, ``seed``, ``device``,
        ``tensorboard_log``, ...)
    :return: The model, ready for ``learn()``
    """
    spec = get_algorithm(algo_name)
    kwargs = dict(policy_kwargs or {})
    if features_extractor_kwargs:
        kwargs["features_extractor_kwargs"] = {**kwargs.get("features_extractor_kwargs", {}), **features_extractor_kwargs}
    return spec.algo_class(spec.policy_class, env, policy_kwargs=kwargs, **algo_kwargs)


def load_model(algo_name: str, path: str | Path, env: GymEnv | None = None, trust_pickle: bool = False, **kwargs: Any) -> BaseAlgorithm:
    """Load a model saved with ``model.save(path)``: the one loader of a run's ``agent.zip``.

    ``agent.zip`` is a pickle that can run code when loaded, so by default it is unpickled only when its
    SHA-256 is the ``agent_sha256`` that the ``state.json`` beside it records (as every checkpoint and
    finished run folder does: :func:`tokencompress_env.run_folder.verify_agent_zip`). For inference, load
    the safe artifact instead (:func:`agents.artifact.load_policy_artifact`).

    :param algo_name: The algorithm it was trained with
    :param path: Path of the ``.zip``
    :param env: Environment to attach (needed to continue training)
    :param trust_pickle: skip the SHA-256 check (a file without a recorded hash); only for files you made yourself
    :param kwargs: Passed to the algorithm's ``load`` (``device``, ``custom_objects``, ...)
    :return: The model
    :raises CheckpointError: when the hash is missing or differs, or the file does not load as such an agent
    """
    verify_agent_zip(path, trust_pickle)
    spec = get_algorithm(algo_name)
    try:
        return spec.algo_class.load(path, env=env, **kwargs)
    except Exception as exc:  # truncated zip, wrong algorithm or spaces: the same user-facing problem
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"'{path}' does not load as a {spec.name} agent ({first}): it is damaged; restore it from a backup, "
            "or start a new run with another --run_name"
        ) from None
