"""Checkpoints of a joint run: the agent, the reconstructor and its optimizer, the config, together.

A checkpoint is a folder ``<run>/checkpoints/latest`` written as a whole into a temporary folder and
renamed into place, so a run killed at any moment (even with SIGKILL) leaves the previous complete
checkpoint loadable. It holds ``agent.zip`` (SB3), ``reconstructor/`` (safetensors),
``reconstructor_optimizer.pt`` (tensors only, read with ``weights_only=True``), ``config.json`` and
``state.json`` (timesteps and fine-tuning rounds).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback

from callbacks.joint_training import ReconstructorFinetuneCallback
from tokencompress_env.errors import CheckpointError
from tokencompress_env.reconstructor import Reconstructor

#: Name of the latest checkpoint folder inside ``<run>/checkpoints``.
LATEST = "latest"


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished temporary folder to ``target``, replacing what was there as atomically as possible.

    :param tmp: the finished folder
    :param target: its final place
    """
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def save_run_artifacts(
    folder: Path,
    model: BaseAlgorithm,
    reconstructor: Reconstructor,
    finetune: ReconstructorFinetuneCallback | None,
    config: dict[str, Any],
    state: dict[str, Any] | None = None,
) -> None:
    """Write agent, reconstructor, its optimizer, config and state into ``folder`` atomically.

    :param folder: destination folder (replaced as a whole)
    :param model: the SB3 agent
    :param reconstructor: the (jointly trained) reconstructor
    :param finetune: the fine-tuning callback whose optimizer is saved (``None``: none)
    :param config: the run's resolved config
    :param state: extra facts for ``state.json``
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save(tmp / "agent.zip")
    reconstructor.save_pretrained(tmp / "reconstructor")
    if finetune is not None:
        torch.save(finetune.optimizer.state_dict(), tmp / "reconstructor_optimizer.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    facts = {"num_timesteps": int(model.num_timesteps), "finetune_rounds": finetune.rounds if finetune else 0, **(state or {})}
    (tmp / "state.json").write_text(json.dumps(facts, indent=2))
    _replace_dir(tmp, folder)


def _unusable(folder: Path, problem: str) -> str:
    """The one-line message for a checkpoint that cannot be resumed from.

    :param folder: the checkpoint folder (``<run>/checkpoints/latest``)
    :param problem: what is wrong with it
    :return: the message, saying what to do
    """
    return f"checkpoint '{folder}' {problem}: it cannot be resumed; start over with another --run_name (or delete '{folder.parent.parent}')"


def recover_checkpoint(folder: Path) -> None:
    """Finish what a process killed inside :func:`_replace_dir` left undone, and drop stale temporary folders.

    Between moving the previous checkpoint to ``<folder>.old`` and the new one into place there is no
    ``folder``; a run killed exactly then still has its previous complete checkpoint in ``.old``,
    which is moved back.

    :param folder: the checkpoint folder (``<run>/checkpoints/latest``)
    """
    folder = Path(folder)
    old = folder.with_name(folder.name + ".old")
    if not folder.exists() and (old / "state.json").exists():
        os.replace(old, folder)
    if folder.parent.is_dir():
        for stale in folder.parent.glob(f"{folder.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint_state(folder: Path) -> dict[str, Any]:
    """Read a checkpoint's ``state.json``, checking that the checkpoint is complete.

    :param folder: the checkpoint folder
    :return: its state
    """
    required = ["agent.zip", "reconstructor/model.safetensors", "config.json", "state.json"]
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        raise CheckpointError(_unusable(folder, f"is incomplete (missing {', '.join(missing)})"))
    try:
        state = json.loads((folder / "state.json").read_text())
        int(state["num_timesteps"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(_unusable(folder, "is corrupt (unreadable state.json)")) from None
    optimizer = folder / "reconstructor_optimizer.pt"
    if optimizer.exists():  # read it now, so a resume fails before it writes anything
        try:
            torch.load(optimizer, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or garbage file
            first = str(exc).strip().splitlines()[0].split(". ")[0][:200] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(_unusable(folder, f"is corrupt (reconstructor_optimizer.pt: {first})")) from None
    return dict(state)


def load_reconstructor_optimizer(finetune: ReconstructorFinetuneCallback, folder: Path) -> None:
    """Restore the fine-tuning optimizer from a checkpoint, if it saved one.

    :param finetune: the callback whose optimizer to restore
    :param folder: the checkpoint folder
    """
    path = folder / "reconstructor_optimizer.pt"
    if path.exists():
        try:
            finetune.optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # truncated file, wrong shapes: the same user-facing problem
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(_unusable(folder, f"is corrupt (reconstructor_optimizer.pt: {first})")) from None
    state = load_checkpoint_state(folder)
    finetune.rounds = int(state.get("finetune_rounds", 0))


class JointCheckpointCallback(BaseCallback):
    """Save a complete joint checkpoint every ``save_freq`` environment steps (and on demand).

    :param save_freq: environment steps (summed over envs) between checkpoints (0: never periodically)
    :param run_dir: the run folder; checkpoints go to ``<run_dir>/checkpoints/latest``
    :param reconstructor: the jointly trained reconstructor
    :param finetune: the fine-tuning callback (for its optimizer), if any
    :param config: the run's resolved config, saved beside the weights
    :param verbose: verbosity
    """

    def __init__(
        self,
        save_freq: int,
        run_dir: Path,
        reconstructor: Reconstructor,
        finetune: ReconstructorFinetuneCallback | None,
        config: dict[str, Any],
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.save_freq = save_freq
        self.run_dir = Path(run_dir)
        self.reconstructor = reconstructor
        self.finetune = finetune
        self.config = config
        self._last_saved = 0

    @property
    def path(self) -> Path:
        """The latest checkpoint folder.

        :return: ``<run_dir>/checkpoints/latest``
        """
        return self.run_dir / "checkpoints" / LATEST

    def _init_callback(self) -> None:
        self._last_saved = self.num_timesteps

    def save(self) -> Path:
        """Write a checkpoint now.

        :return: its folder
        """
        save_run_artifacts(self.path, self.model, self.reconstructor, self.finetune, self.config)
        self._last_saved = self.num_timesteps
        if self.verbose:
            print(f"Saved checkpoint at {self.num_timesteps} steps to {self.path}")
        return self.path

    def _on_step(self) -> bool:
        # Checkpoint between rollouts only (see _on_rollout_end): mid-rollout the reconstructor and
        # the buffer would disagree. _on_step only notes that a checkpoint is due.
        return True

    def _on_rollout_end(self) -> None:
        if self.save_freq > 0 and self.num_timesteps - self._last_saved >= self.save_freq:
            self.save()
