"""Joint training: fine-tune the reconstructor between PPO rollouts on the masks the agent produced.

At the end of each rollout the rollout buffer holds every observation and action of the rollout
(``[n_steps, n_envs, ...]``) and its rewards and advantages are already final, so the reconstructor
can be updated there without touching what PPO is about to learn from. The callback rebuilds the
complete mask of every window whose episode ended inside the rollout (the decisions observed at the
episode's last step plus that step's action, restricted as the environment restricts it), mixes in
windows under random masks so the reconstructor does not forget the general task, takes a few
optimizer steps through the shared :class:`~tokencompress_env.trainer.ReconstructorTrainer` (which owns
the reconstructor's AdamW), and leaves the model in eval mode for the next rollout. The
environments hold the same :class:`~tokencompress_env.reconstructor.Reconstructor` object, so the
next rollout is scored by the updated model.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

from tokencompress_env.observation import Decision
from tokencompress_env.pretrain import random_masks
from tokencompress_env.reconstructor import Reconstructor
from tokencompress_env.trainer import MicroBatch, ReconstructorTrainer


def masks_from_rollout(observations: dict[str, np.ndarray], actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rebuild the full masks of the windows whose last chunk was decided inside a rollout.

    :param observations: rollout-buffer observations, each ``[n_steps, n_envs, ...]`` (values may be floats)
    :param actions: rollout-buffer actions ``[n_steps, n_envs, chunk_size]``
    :return: ``(token_ids, mask, valid)``, each ``[n_windows, seq_len]``
    """
    token_ids = np.asarray(observations["token_ids"])
    seq_len = token_ids.shape[-1]
    chunk = actions.shape[-1]
    flat = {key: np.asarray(value).reshape(-1, *np.asarray(value).shape[2:]) for key, value in observations.items()}
    acts = np.asarray(actions).reshape(-1, chunk) > 0.5
    position = flat["position"].reshape(-1).round().astype(np.int64)
    last = np.flatnonzero(position == seq_len - chunk)
    ids = flat["token_ids"][last].round().astype(np.int64)
    valid = flat["valid"][last] > 0.5
    force_keep = flat["force_keep"][last] > 0.5
    mask = flat["decisions"][last].round().astype(np.int64) == Decision.MASKED
    mask[:, seq_len - chunk :] = acts[last]
    mask &= valid & ~force_keep
    return ids, mask, valid


class ReconstructorFinetuneCallback(BaseCallback):
    """Fine-tune the shared reconstructor at the end of rollouts on the agent's own masks.

    The reconstructor, its optimizer and the round counter belong to ``trainer``, which the checkpoint
    callback receives too (:class:`~callbacks.checkpoint.JointCheckpointCallback`): neither callback
    refers to the other. In a multi-process run (the trainer holds an accelerator) the gradients of each
    fine-tuning step are averaged over the processes.

    :param trainer: the reconstructor's trainer; its reconstructor is the object the environments score with
    :param gradient_steps: optimizer steps per fine-tuning round
    :param batch_size: windows per micro-batch
    :param gradient_accumulation: micro-batches per optimizer step
    :param interval: fine-tune every ``interval`` rollouts
    :param random_mask_fraction: fraction of each micro-batch given random masks instead of the agent's
    :param random_mask_range: range of the random masks' rates
    :param seed: seed of batch sampling and random masks
    :param verbose: verbosity
    """

    def __init__(
        self,
        trainer: ReconstructorTrainer,
        gradient_steps: int = 4,
        batch_size: int = 16,
        gradient_accumulation: int = 1,
        interval: int = 1,
        random_mask_fraction: float = 0.25,
        random_mask_range: tuple[float, float] = (0.0, 0.8),
        seed: int = 0,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.trainer = trainer
        self.gradient_steps = gradient_steps
        self.batch_size = batch_size
        self.gradient_accumulation = gradient_accumulation
        self.interval = max(1, interval)
        self.random_mask_fraction = random_mask_fraction
        self.random_mask_range = random_mask_range
        self.generator = torch.Generator().manual_seed(seed)
        self.rollouts = 0

    @property
    def reconstructor(self) -> Reconstructor:
        """The reconstructor being fine-tuned (the trainer's).

        :return: the reconstructor
        """
        return self.trainer.reconstructor

    @property
    def rounds(self) -> int:
        """Fine-tuning rounds done (kept by the trainer, so checkpoints and resumes see them).

        :return: the count
        """
        return self.trainer.rounds

    @property
    def last_loss(self) -> float | None:
        """Mean loss (nats) of the last round, ``None`` before the first.

        :return: the loss
        """
        return self.trainer.last_loss

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.rollouts += 1
        if self.gradient_steps <= 0 or self.rollouts % self.interval:
            return
        buffer = cast(OnPolicyAlgorithm, self.model).rollout_buffer
        observations: Any = buffer.observations
        if not isinstance(observations, dict):
            raise TypeError("ReconstructorFinetuneCallback needs the TokenMask-v0 dict observations")
        ids, mask, valid = masks_from_rollout(observations, buffer.actions)
        if len(ids) == 0:
            return
        self.logger.record("joint/reconstructor_loss", self.finetune(ids, mask, valid))
        self.logger.record("joint/windows_per_round", len(ids))
        self.logger.record("joint/agent_mask_rate", float(mask.sum() / max(valid.sum(), 1)))
        self.logger.record("joint/rounds", self.rounds)

    def finetune(self, ids: np.ndarray, mask: np.ndarray, valid: np.ndarray) -> float:
        """Take ``gradient_steps`` optimizer steps on these windows; returns the mean loss (nats).

        :param ids: ``[N, L]`` token ids
        :param mask: ``[N, L]`` the agent's masks
        :param valid: ``[N, L]`` real positions
        :return: mean training loss over the micro-batches
        """
        device = self.reconstructor.device
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        mask_t = torch.as_tensor(mask, dtype=torch.bool)
        valid_t = torch.as_tensor(valid, dtype=torch.bool)
        n_random = round(self.batch_size * self.random_mask_fraction)
        losses: list[float] = []
        for _ in range(self.gradient_steps):
            batches: list[MicroBatch] = []
            for _ in range(self.gradient_accumulation):
                idx = torch.randint(0, len(ids_t), (self.batch_size,), generator=self.generator)
                batch_ids, batch_mask, batch_valid = ids_t[idx], mask_t[idx].clone(), valid_t[idx]
                if n_random:
                    lo, hi = self.random_mask_range
                    batch_mask[:n_random] = random_masks((n_random, ids_t.shape[1]), self.generator, lo, hi)
                batches.append((batch_ids.to(device), batch_mask.to(device), batch_valid.to(device)))
            losses.append(self.trainer.step(batches))
        self.trainer.rounds += 1
        self.trainer.last_loss = float(np.mean(losses))
        return self.trainer.last_loss
