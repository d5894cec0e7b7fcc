"""Registration of TokenMask-v0 with Gymnasium (done once when :mod:`tokencompress_env` is imported)."""

from __future__ import annotations

import gymnasium

#: The environment's id.
ENV_ID = "TokenMask-v0"


def register_envs() -> None:
    """Register ``TokenMask-v0`` with a single-env ``entry_point`` and a batched ``vector_entry_point``; idempotent."""
    if ENV_ID in gymnasium.registry:
        return
    gymnasium.register(
        id=ENV_ID,
        entry_point="tokencompress_env.env:TokenMaskEnv",
        vector_entry_point="tokencompress_env.vector_env:TokenMaskVectorEnv",
    )
