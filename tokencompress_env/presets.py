"""The offline preset reconstructors (``tiny``, ``test``): where they are cached and how they are built.

Loading only loads: :meth:`Reconstructor.from_pretrained("tiny") <tokencompress_env.reconstructor.Reconstructor.from_pretrained>`
reads the cached preset and fails with a one-line error naming :data:`BUILD_COMMAND` when it is absent.
Building is an explicit step that the entry points ask for: :func:`ensure_preset` builds a preset that is
not cached yet, and :func:`load_or_build` does that for a preset name and then loads any name or path.
``gymnasium.make("TokenMask-v0")``, ``experiments.train_ppo``, ``experiments.quickstart`` and the other
scripts go through :func:`load_or_build`, so their first use still builds the default.

This module sits above :mod:`tokencompress_env.pretrain` (which trains) and
:mod:`tokencompress_env.reconstructor` (which loads); neither of them imports it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tokencompress_env.pretrain import PRESET_BUILDS, build_reconstructor
from tokencompress_env.reconstructor import PRESETS, Reconstructor, default_reconstructor_dir

#: The command that builds a preset (``{preset}`` is replaced by its name).
BUILD_COMMAND = "python -m experiments.pretrain_reconstructor --preset {preset}"


def is_built(preset: str) -> bool:
    """Whether a preset reconstructor is in the cache.

    :param preset: a key of :data:`~tokencompress_env.reconstructor.PRESETS`
    :return: ``True`` when its ``model.safetensors`` exists
    """
    return (default_reconstructor_dir(preset) / "model.safetensors").exists()


def ensure_preset(preset: str = "tiny", device: str | torch.device = "auto", progress: bool = True) -> Path:
    """Build a preset reconstructor into the cache unless it is there already (minutes for ``tiny``).

    :param preset: ``"tiny"`` (the default) or ``"test"``
    :param device: where to train when it must be built
    :param progress: show progress while building
    :return: the preset's folder (``default_reconstructor_dir(preset)``)
    :raises KeyError: for a name that is not a preset
    """
    if preset not in PRESET_BUILDS:
        raise KeyError(f"unknown preset '{preset}': choose one of {sorted(PRESET_BUILDS)}")
    path = default_reconstructor_dir(preset)
    if not is_built(preset):
        print(f"Building the '{preset}' reconstructor in {path} (first use only; later runs reuse it)...", flush=True)
        build_reconstructor(PRESET_BUILDS[preset], path, device=str(device), progress=progress)
    return path


def load_or_build(name_or_path: str | Path = "tiny", device: str | torch.device = "auto", progress: bool = True) -> Reconstructor:
    """Load a reconstructor, first building it when ``name_or_path`` is a preset not cached yet.

    :param name_or_path: a preset (``"tiny"``, ``"test"``), a directory or a hub name
    :param device: where to run (and to train, when a preset is built)
    :param progress: show progress while building
    :return: the reconstructor
    """
    name = str(name_or_path)
    if name in PRESETS:
        ensure_preset(name, device=device, progress=progress)
    return Reconstructor.from_pretrained(name_or_path, device=device)
