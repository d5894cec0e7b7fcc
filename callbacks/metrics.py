"""TensorBoard metrics of compression: achieved vs target mask rate, distortion, recovery, reward parts.

Scalars (means over the episodes that ended in the rollout):

* ``compression/achieved_mask_rate``, ``compression/target_mask_rate``, ``compression/rate_error``
  (mean absolute difference), ``compression/keep_all_fraction`` and ``compression/mask_all_fraction``
  (episodes that collapsed to keeping or dropping everything);
* ``compression/bits_per_masked_token`` and ``compression/recovery_accuracy`` (of the dropped tokens);
* ``reward/tokens`` and ``reward/rate`` (per step, the two parts of the reward), and with the continuation
  reward ``reward/continuation`` (per step: nonzero at episodes' ends) and ``compression/continuation_cost``
  (per episode, bits of the continuation given the deleted window minus given the full window);
* ``system/rss_mb`` and ``system/steps_per_second``.

SB3 itself logs the policy entropy (``train/entropy_loss``), losses and ``time/fps``.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback


def resident_memory_mb() -> float:
    """Resident memory of this process in MiB (0 where ``/proc`` is not available).

    :return: MiB
    """
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class CompressionMetricsCallback(BaseCallback):
    """Log per-episode compression statistics from the TokenMask-v0 infos to the SB3 logger.

    :param verbose: verbosity
    """

    def __init__(self, verbose: int = 0) -> None:
        super().__init__(verbose)
        self._episodes: dict[str, list[float]] = defaultdict(list)
        self._steps: dict[str, list[float]] = defaultdict(list)
        self._started = time.perf_counter()
        self._start_timesteps = 0
        #: The scalars logged at the end of the last rollout (for summaries after training).
        self.last_values: dict[str, float] = {}

    def _on_rollout_start(self) -> None:
        self._started = time.perf_counter()
        self._start_timesteps = self.num_timesteps

    def _on_step(self) -> bool:
        infos: list[dict[str, Any]] = self.locals.get("infos", [])
        dones = self.locals.get("dones", np.zeros(len(infos), dtype=bool))
        for info, done in zip(infos, dones):
            for key in ("reward_tokens", "reward_rate", "reward_continuation"):
                if key in info:
                    self._steps[key].append(float(info[key]))
            if not done or "mask_rate" not in info:
                continue
            rate, target = float(info["mask_rate"]), float(info.get("target_mask_rate", np.nan))
            self._episodes["achieved_mask_rate"].append(rate)
            self._episodes["target_mask_rate"].append(target)
            self._episodes["rate_error"].append(abs(rate - target))
            self._episodes["keep_all_fraction"].append(float(rate == 0.0))
            self._episodes["mask_all_fraction"].append(float(rate == 1.0))
            if "continuation_deleted" in info:
                self._episodes["continuation_cost"].append(float(info["continuation_deleted"]) - float(info["continuation_full"]))
            n_masked = float(info.get("n_masked", 0))
            if n_masked > 0:
                self._episodes["bits_per_masked_token"].append(float(info["masked_bits_total"]) / n_masked)
                self._episodes["recovery_accuracy"].append(float(info["recovery_accuracy"]))
        return True

    def _on_rollout_end(self) -> None:
        means = {f"compression/{key}": float(np.mean(values)) for key, values in self._episodes.items() if values}
        means |= {f"reward/{key.removeprefix('reward_')}": float(np.mean(values)) for key, values in self._steps.items() if values}
        for key, value in means.items():
            self.logger.record(key, value)
        self.last_values = means
        elapsed = time.perf_counter() - self._started
        if elapsed > 0:
            self.logger.record("system/steps_per_second", (self.num_timesteps - self._start_timesteps) / elapsed)
        self.logger.record("system/rss_mb", resident_memory_mb())
        self._episodes.clear()
        self._steps.clear()
