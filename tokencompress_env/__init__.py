"""tokencompress: learn which tokens of a text can be dropped, and prove the text stays recoverable.

Importing the package registers the Gymnasium environment ``TokenMask-v0``. The environment classes
are imported lazily (``tokencompress_env.TokenMaskEnv`` and friends) so that a bare import stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from tokencompress_env.reconstructor import Reconstructor, ScoreResult
from tokencompress_env.registration import ENV_ID, register_envs

register_envs()

_LAZY = {
    "TokenMaskEnv": "tokencompress_env.env",
    "TokenMaskVectorEnv": "tokencompress_env.vector_env",
    "TokenMaskSB3VecEnv": "tokencompress_env.sb3_vec_env",
    "RewardConfig": "tokencompress_env.reward",
    "EnvConfig": "tokencompress_env.env_config",
    "Compressor": "tokencompress_env.compressor",
    "CompressionResult": "tokencompress_env.compressor",
}


def __getattr__(name: str) -> Any:
    """Import the environment classes on first access.

    :param name: attribute name
    :return: the attribute
    """
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokencompress_env' has no attribute '{name}'")


__all__ = [
    "ENV_ID",
    "CompressionResult",
    "Compressor",
    "EnvConfig",
    "Reconstructor",
    "RewardConfig",
    "ScoreResult",
    "TokenMaskEnv",
    "TokenMaskSB3VecEnv",
    "TokenMaskVectorEnv",
    "register_envs",
]
__version__ = "0.1.0"
