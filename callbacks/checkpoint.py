"""Checkpoints of a joint run: the agent, the reconstructor and its optimizer, the config, together.

A checkpoint is a folder ``<run>/checkpoints/latest`` written as a whole into a temporary folder and
renamed into place, so a run killed at any moment (even with SIGKILL) leaves the previous complete
checkpoint loadable. It holds ``agent.zip`` (SB3), ``policy.safetensors`` and ``policy.json`` (the
policy for inference, loaded without unpickling: :mod:`agents.artifact`), ``reconstructor/``
(safetensors), ``reconstructor_optimizer.pt`` (tensors only, read with ``weights_only=True``),
``config.json`` and ``state.json`` (timesteps, fine-tuning rounds, and ``agent_sha256``, the SHA-256 of
the ``agent.zip`` written with it). A checkpoint taken during distillation also holds
``distill_optimizer.pt`` and records ``phase: "distill"`` and ``distill_step`` in ``state.json``.

``agent.zip`` is a pickle, so it is unpickled only to resume training, and only after
:func:`verify_agent_file` has checked that its SHA-256 is the one recorded when this run wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback

from agents.artifact import save_policy_artifact
from tokencompress_env.errors import CheckpointError
from tokencompress_env.reconstructor import Reconstructor
from tokencompress_env.run_folder import (
    AGENT_ZIP,
    CONFIG,
    DISTILL_OPTIMIZER,
    RECONSTRUCTOR,
    RECONSTRUCTOR_OPTIMIZER,
    STATE,
    file_sha256,
    latest_checkpoint,
    publish_folder,
    recover_folder,
    temp_folder,
    verify_agent_zip,
)
from tokencompress_env.trainer import ReconstructorTrainer, is_main_process, wait_for_everyone


def save_run_artifacts(
    folder: Path,
    model: BaseAlgorithm,
    reconstructor: Reconstructor,
    trainer: ReconstructorTrainer | None,
    config: dict[str, Any],
    state: dict[str, Any] | None = None,
    distill_optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Write agent, safe policy artifact, reconstructor, optimizers, config and state into ``folder`` atomically.

    :param folder: destination folder (replaced as a whole)
    :param model: the SB3 agent
    :param reconstructor: the (jointly trained) reconstructor
    :param trainer: the reconstructor's trainer, whose optimizer and rounds are saved (``None``: no fine-tuning)
    :param config: the run's resolved config (its ``algo`` goes into ``policy.json``)
    :param state: extra facts for ``state.json``
    :param distill_optimizer: during distillation, its optimizer (saved as ``distill_optimizer.pt``)
    """
    tmp = temp_folder(folder)
    model.save(tmp / AGENT_ZIP)
    save_policy_artifact(model, str(config.get("algo", "ppo")), tmp)
    reconstructor.save_pretrained(tmp / RECONSTRUCTOR)
    if trainer is not None:
        trainer.save_optimizer(tmp / RECONSTRUCTOR_OPTIMIZER)
    if distill_optimizer is not None:
        torch.save(distill_optimizer.state_dict(), tmp / DISTILL_OPTIMIZER)
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    facts = {
        "num_timesteps": int(model.num_timesteps),
        "finetune_rounds": trainer.rounds if trainer else 0,
        "agent_sha256": file_sha256(tmp / AGENT_ZIP),
        **(state or {}),
    }
    (tmp / STATE).write_text(json.dumps(facts, indent=2))
    publish_folder(tmp, folder)


def _unusable(folder: Path, problem: str) -> str:
    """The one-line message for a checkpoint that cannot be resumed from.

    :param folder: the checkpoint folder (``<run>/checkpoints/latest``)
    :param problem: what is wrong with it
    :return: the message, saying what to do
    """
    return f"checkpoint '{folder}' {problem}: it cannot be resumed; start over with another --run_name (or delete '{folder.parent.parent}')"


def recover_checkpoint(folder: Path) -> None:
    """Finish what a process killed while publishing a checkpoint left undone, and drop stale temporary folders.

    A run killed between moving the previous checkpoint to ``<folder>.old`` and the new one into place
    still has its previous complete checkpoint in ``.old``, which is moved back
    (:func:`tokencompress_env.run_folder.recover_folder`).

    :param folder: the checkpoint folder (``<run>/checkpoints/latest``)
    """
    recover_folder(folder, complete=STATE)


def load_checkpoint_state(folder: Path) -> dict[str, Any]:
    """Read a checkpoint's ``state.json``, checking that the checkpoint is complete.

    :param folder: the checkpoint folder
    :return: its state
    """
    required = [AGENT_ZIP, f"{RECONSTRUCTOR}/model.safetensors", CONFIG, STATE]
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        raise CheckpointError(_unusable(folder, f"is incomplete (missing {', '.join(missing)})"))
    try:
        state = json.loads((folder / STATE).read_text())
        int(state["num_timesteps"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(_unusable(folder, "is corrupt (unreadable state.json)")) from None
    for name in (RECONSTRUCTOR_OPTIMIZER, DISTILL_OPTIMIZER):
        optimizer = folder / name
        if optimizer.exists():  # read it now, so a resume fails before it writes anything
            try:
                torch.load(optimizer, map_location="cpu", weights_only=True)
            except Exception as exc:  # truncated or garbage file
                first = str(exc).strip().splitlines()[0].split(". ")[0][:200] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(_unusable(folder, f"is corrupt ({name}: {first})")) from None
    if state.get("phase") == "distill" and not (folder / DISTILL_OPTIMIZER).exists():
        raise CheckpointError(_unusable(folder, f"is incomplete (missing {DISTILL_OPTIMIZER})"))
    return dict(state)


def verify_agent_file(folder: Path, trust_pickle: bool = False) -> None:
    """Check that a checkpoint's ``agent.zip`` is the file this run wrote, before it is unpickled to resume.

    ``agent.zip`` holds pickled Python objects: unpickling a replaced file could run any code. Its
    SHA-256 must equal ``agent_sha256`` in the checkpoint's ``state.json`` (recorded when it was written).

    :param folder: the checkpoint folder
    :param trust_pickle: skip the check (checkpoints of older versions record no hash); only for runs
        you made yourself
    :raises CheckpointError: when the hash is missing or differs
    """
    if not trust_pickle:
        load_checkpoint_state(folder)
    verify_agent_zip(folder / AGENT_ZIP, trust_pickle)


def load_reconstructor_optimizer(trainer: ReconstructorTrainer, folder: Path) -> None:
    """Restore the reconstructor trainer's optimizer (if the checkpoint saved one) and its rounds.

    :param trainer: the trainer whose optimizer and round counter to restore
    :param folder: the checkpoint folder
    """
    path = folder / RECONSTRUCTOR_OPTIMIZER
    if path.exists():
        try:
            trainer.load_optimizer(path)
        except Exception as exc:  # truncated file, wrong shapes: the same user-facing problem
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(_unusable(folder, f"is corrupt (reconstructor_optimizer.pt: {first})")) from None
    state = load_checkpoint_state(folder)
    trainer.rounds = int(state.get("finetune_rounds", 0))


class JointCheckpointCallback(BaseCallback):
    """Save a complete joint checkpoint every ``save_freq`` environment steps (and on demand).

    :param save_freq: environment steps (summed over envs) between checkpoints (0: never periodically)
    :param run_dir: the run folder; checkpoints go to ``<run_dir>/checkpoints/latest``
    :param reconstructor: the jointly trained reconstructor
    :param trainer: the reconstructor's trainer (for its optimizer and rounds; shared with the fine-tuning
        callback), if the reconstructor is fine-tuned
    :param config: the run's resolved config, saved beside the weights
    :param verbose: verbosity
    """

    def __init__(
        self,
        save_freq: int,
        run_dir: Path,
        reconstructor: Reconstructor,
        trainer: ReconstructorTrainer | None,
        config: dict[str, Any],
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.save_freq = save_freq
        self.run_dir = Path(run_dir)
        self.reconstructor = reconstructor
        self.trainer = trainer
        self.config = config
        self._last_saved = 0

    @property
    def path(self) -> Path:
        """The latest checkpoint folder.

        :return: ``<run_dir>/checkpoints/latest``
        """
        return latest_checkpoint(self.run_dir)

    def _init_callback(self) -> None:
        self._last_saved = self.num_timesteps

    def save(self) -> Path:
        """Write a checkpoint now (in the main process only, when several processes train the reconstructor).

        :return: its folder
        """
        accelerator = self.trainer.accelerator if self.trainer is not None else None
        if is_main_process(accelerator):
            save_run_artifacts(self.path, self.model, self.reconstructor, self.trainer, self.config)
        wait_for_everyone(accelerator)
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
