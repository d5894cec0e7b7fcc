"""The safe inference artifact of a trained policy: weights in safetensors plus a JSON spec; no pickle.

SB3's ``agent.zip`` stores the policy's constructor arguments as pickled Python objects, and loading
it runs whatever code the pickle names. A run folder that people share and download must load without
that, so every checkpoint (see :mod:`callbacks.checkpoint`) also writes:

* ``policy.safetensors``: the policy network's weights (:func:`safetensors.torch.save_model`; tensors
  shared between the actor's and the critic's feature extractor are stored once);
* ``policy.json``: what rebuilds the network around them: the algorithm name, the policy class of the
  agents package for it, the TokenMask-v0 space parameters (``seq_len``, ``chunk_size``,
  ``vocab_size``, ``observe_surprisal``, rebuilt with :func:`tokencompress_env.env.make_spaces`) and the
  policy's keyword arguments as plain JSON (a class, such as the activation, by a name from a fixed list).

:func:`load_policy_artifact` reads only these two files: JSON and tensors, never code. ``agent.zip``
(optimizer state, step counter) is read only to resume training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch as th
from gymnasium import spaces
from safetensors.torch import load_model, save_model
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import BasePolicy
from torch import nn

from agents.algorithms import canonical_name, get_algorithm
from agents.extractor import LocalContextExtractor
from tokencompress_env.env import make_spaces
from tokencompress_env.errors import CheckpointError
from tokencompress_env.run_folder import POLICY_SPEC, POLICY_WEIGHTS, run_dir_of

#: Value of the spec's ``format`` key.
FORMAT = "tokencompress-policy"
#: Version of the spec format.
VERSION = 1

#: Classes a policy keyword argument may name, by the name written to the spec. Nothing else is loaded.
CLASSES: dict[str, type] = {
    "LocalContextExtractor": LocalContextExtractor,
    **{name: getattr(nn, name) for name in ("Tanh", "ReLU", "GELU", "ELU", "LeakyReLU", "SiLU", "Sigmoid", "Identity")},
}
#: Constructor arguments not written: the spaces (rebuilt from the spec), and what only training uses.
_NOT_SAVED = {"observation_space", "action_space", "lr_schedule", "optimizer_class", "optimizer_kwargs"}


@dataclass
class PolicyArtifact:
    """A policy rebuilt from its safe artifact, with the attributes of an SB3 model that inference uses.

    :param policy: the policy network (evaluation mode)
    :param observation_space: its observation space (TokenMask-v0's)
    :param action_space: its action space
    :param algo: the algorithm it was trained with
    :param spec: the ``policy.json`` it was built from
    """

    policy: BasePolicy
    observation_space: spaces.Dict
    action_space: spaces.Space[Any]
    algo: str
    spec: dict[str, Any]


def _encode(value: Any, key: str) -> Any:
    """A constructor argument as plain JSON (classes by their name in :data:`CLASSES`).

    :param value: the argument
    :param key: its name (for the error message)
    :return: the JSON value
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_encode(v, key) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v, key) for k, v in value.items()}
    for name, cls in CLASSES.items():
        if value is cls:
            return {"class": name}
    raise ValueError(f"policy argument '{key}' = {value!r} cannot be written to {POLICY_SPEC} (allowed classes: {sorted(CLASSES)})")


def _decode(value: Any, key: str) -> Any:
    """Inverse of :func:`_encode`; a class must be one of :data:`CLASSES`.

    :param value: the JSON value
    :param key: its name (for the error message)
    :return: the argument
    """
    if isinstance(value, list):
        return [_decode(v, key) for v in value]
    if isinstance(value, dict):
        if set(value) == {"class"}:
            if value["class"] not in CLASSES:
                raise CheckpointError(f"{POLICY_SPEC} names class {value['class']!r} for '{key}', which is not one of {sorted(CLASSES)}")
            return CLASSES[value["class"]]
        return {k: _decode(v, key) for k, v in value.items()}
    return value


def policy_spec(model: BaseAlgorithm, algo: str) -> dict[str, Any]:
    """The JSON spec that rebuilds ``model``'s policy network (see the module docstring).

    :param model: a trained SB3 model of the agents package on TokenMask-v0
    :param algo: the algorithm's name
    :return: the spec
    :raises ValueError: when the policy's spaces are not TokenMask-v0's or an argument has no JSON form
    """
    policy = model.policy
    obs_space, action_space = policy.observation_space, policy.action_space
    if not isinstance(obs_space, spaces.Dict) or "token_ids" not in obs_space.spaces or not isinstance(action_space, spaces.MultiBinary):
        raise ValueError("the safe policy artifact is for TokenMask-v0 policies (Dict observations with token_ids, MultiBinary actions)")
    token_space = obs_space["token_ids"]
    assert isinstance(token_space, spaces.Box)
    space_facts: dict[str, Any] = {
        "seq_len": int(token_space.shape[0]),
        "chunk_size": int(action_space.n),  # type: ignore[arg-type]
        "vocab_size": int(token_space.high.max()) + 1,
        "observe_surprisal": "surprisal" in obs_space.spaces,
    }
    rebuilt_obs, rebuilt_action = make_spaces(**space_facts)
    if rebuilt_obs != obs_space or rebuilt_action != action_space:
        raise ValueError("the policy's spaces differ from TokenMask-v0's make_spaces(); the safe artifact cannot rebuild them")
    kwargs = {k: v for k, v in policy._get_constructor_parameters().items() if k not in _NOT_SAVED}
    if hasattr(policy, "share_features_extractor"):
        kwargs["share_features_extractor"] = bool(policy.share_features_extractor)
    name = canonical_name(algo)
    return {
        "format": FORMAT,
        "version": VERSION,
        "algo": name,
        "policy_class": type(policy).__name__,
        "spaces": space_facts,
        "policy_kwargs": {k: _encode(v, k) for k, v in kwargs.items()},
    }


def save_policy_artifact(model: BaseAlgorithm, algo: str, folder: Path) -> None:
    """Write ``policy.safetensors`` and ``policy.json`` of ``model`` into ``folder``.

    Called by :func:`callbacks.checkpoint.save_run_artifacts` (the one writer of run artifacts) inside
    its temporary folder, so the pair appears atomically with the rest of a checkpoint.

    :param model: the SB3 model
    :param algo: its algorithm's name
    :param folder: an existing folder
    """
    spec = policy_spec(model, algo)
    save_model(model.policy, str(folder / POLICY_WEIGHTS), metadata={"format": FORMAT, "version": str(VERSION)})
    (folder / POLICY_SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True))


def missing_artifact_message(folder: Path) -> str:
    """The one-line message for a run folder without the safe artifact (written by an older version).

    :param folder: the run folder (or its ``checkpoints/latest``)
    :return: the message, with the command that writes the artifact
    """
    run = run_dir_of(folder)
    return (
        f"'{folder}' has no {POLICY_WEIGHTS} and {POLICY_SPEC} (a run of an older version, whose policy is only in the "
        f"pickle agent.zip, which can run code when loaded); if you made this run yourself, write them with: python -m "
        f"experiments.train_ppo --config '{run / 'config.json'}' --runs_dir '{run.parent}' --run_name '{run.name}' "
        "--resume true --trust_agent_pickle true"
    )


def has_policy_artifact(folder: Path) -> bool:
    """Whether ``folder`` holds both files of the safe artifact.

    :param folder: a run or checkpoint folder
    :return: ``True`` when both exist
    """
    return (folder / POLICY_WEIGHTS).is_file() and (folder / POLICY_SPEC).is_file()


def load_policy_artifact(folder: str | Path, device: str | th.device = "cpu") -> PolicyArtifact:
    """Rebuild a policy from ``policy.json`` and ``policy.safetensors`` without unpickling anything.

    :param folder: a run or checkpoint folder
    :param device: where to put the policy
    :return: the policy and its spaces
    :raises CheckpointError: when a file is missing, unreadable or does not fit the spec (one line)
    """
    folder = Path(folder)
    if not has_policy_artifact(folder):
        raise CheckpointError(missing_artifact_message(folder))
    spec_path = folder / POLICY_SPEC
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        if not isinstance(spec, dict) or spec.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} spec")
        if spec.get("version") != VERSION:
            raise ValueError(f"format version {spec.get('version')!r}, this version reads {VERSION}")
        algo = get_algorithm(str(spec["algo"]))
        if spec["policy_class"] != algo.policy_class.__name__:
            raise ValueError(f"policy class {spec['policy_class']!r} is not {algo.policy_class.__name__} of {algo.name}")
        facts = spec["spaces"]
        obs_space, action_space = make_spaces(
            int(facts["seq_len"]), int(facts["chunk_size"]), int(facts["vocab_size"]), bool(facts["observe_surprisal"])
        )
        kwargs = {str(k): _decode(v, str(k)) for k, v in dict(spec["policy_kwargs"]).items()}
    except CheckpointError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"'{spec_path}' is not a usable policy spec (corrupt?): {first}") from None
    try:
        policy = algo.policy_class(obs_space, action_space, lambda _: 0.0, **kwargs)
    except Exception as exc:  # arguments the policy class rejects: a hand-edited or mismatched spec
        raise CheckpointError(f"'{spec_path}' does not build a {algo.policy_class.__name__}: {type(exc).__name__}: {exc}") from None
    try:
        missing, unexpected = load_model(policy, str(folder / POLICY_WEIGHTS), strict=False, device="cpu")
    except Exception as exc:  # truncated or garbage file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"could not read '{folder / POLICY_WEIGHTS}' (corrupt or partial?): {first}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"'{folder / POLICY_WEIGHTS}' does not fit {POLICY_SPEC} (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    policy = policy.to(th.device(device))
    policy.set_training_mode(False)
    return PolicyArtifact(policy, obs_space, action_space, algo.name, spec)
