"""Stable-Baselines3 callbacks of tokencompress: joint reconstructor training, metrics, checkpoints."""

from callbacks.checkpoint import JointCheckpointCallback, load_checkpoint_state, save_run_artifacts
from callbacks.joint_training import ReconstructorFinetuneCallback, masks_from_rollout
from callbacks.metrics import CompressionMetricsCallback

__all__ = [
    "CompressionMetricsCallback",
    "JointCheckpointCallback",
    "ReconstructorFinetuneCallback",
    "load_checkpoint_state",
    "masks_from_rollout",
    "save_run_artifacts",
]
