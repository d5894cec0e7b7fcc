"""Pretrain the offline reconstructor: BPE tokenizer + small GPT-2 on random masks (0 to 0.8).

Resumable: an interrupted run continues from ``<output_dir>.partial/checkpoint``. Validation bits per
masked token go to TensorBoard (``--tensorboard_log``) and to the JSON report printed at the end.

Runs on several processes (GPUs, or CPU processes) with Hugging Face ``accelerate``: each process
draws its own ``batch_size`` windows per micro-batch, the gradients are averaged, and only the main
process writes the checkpoints, the model and the report.

Examples::

    python -m experiments.pretrain_reconstructor                       # the 'tiny' default, cached
    python -m experiments.pretrain_reconstructor --steps 50 --output_dir /tmp/recon
    accelerate launch --multi_gpu --num_processes 4 -m experiments.pretrain_reconstructor --output_dir /data/recon
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from experiments.config import cli_main, parse_config
from tokencompress_env.data import EMBEDDED
from tokencompress_env.errors import ConfigError
from tokencompress_env.pretrain import PRESET_BUILDS, BuildConfig, PretrainConfig, build_reconstructor
from tokencompress_env.reconstructor import PRESETS, default_reconstructor_dir
from tokencompress_env.trainer import end_processes, is_main_process, make_accelerator

_DEFAULT = PRESET_BUILDS["tiny"]


@dataclass
class PretrainReconstructorConfig:
    """Options of ``experiments.pretrain_reconstructor``.

    :param preset: model size (``tiny`` default, ``test`` for seconds-long runs)
    :param data: corpus the tokenizer and model learn from (``embedded``, a path or a hub dataset)
    :param vocab_size: BPE vocabulary size
    :param seq_len: window length
    :param steps: optimizer steps
    :param batch_size: windows per micro-batch
    :param grad_accum: micro-batches per optimizer step (gradient accumulation)
    :param lr: peak learning rate
    :param warmup_steps: warm-up steps
    :param min_mask_rate: lowest random mask rate
    :param max_mask_rate: highest random mask rate
    :param eval_every: steps between validations
    :param checkpoint_every: steps between resumable checkpoints
    :param seed: random seed
    :param device: ``auto``, ``cpu``, ``cuda`` or ``mps`` (several processes: ``cpu`` or ``auto``, which gives each process its own GPU)
    :param num_proc: processes that tokenise the corpus (``datasets.map``; ``None``: one)
    :param output_dir: where the reconstructor is written (``None``: the cache of ``preset``, used by default everywhere)
    :param tensorboard_log: TensorBoard folder (``None``: no events)
    :param progress_bar: show a progress bar
    """

    preset: str = _DEFAULT.preset
    data: str = EMBEDDED
    vocab_size: int = _DEFAULT.vocab_size
    seq_len: int = _DEFAULT.seq_len
    steps: int = _DEFAULT.pretrain.steps
    batch_size: int = _DEFAULT.pretrain.batch_size
    grad_accum: int = _DEFAULT.pretrain.grad_accum
    lr: float = _DEFAULT.pretrain.lr
    warmup_steps: int = _DEFAULT.pretrain.warmup_steps
    min_mask_rate: float = _DEFAULT.pretrain.min_mask_rate
    max_mask_rate: float = _DEFAULT.pretrain.max_mask_rate
    eval_every: int = _DEFAULT.pretrain.eval_every
    checkpoint_every: int = _DEFAULT.pretrain.checkpoint_every
    seed: int = 0
    device: str = "auto"
    num_proc: int | None = None
    output_dir: str | None = None
    tensorboard_log: str | None = "runs/pretrain_reconstructor"
    progress_bar: bool = True

    def validate(self) -> None:
        """Reject out-of-range values."""
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset '{self.preset}': choose one of {sorted(PRESETS)}")
        if not 0 <= self.min_mask_rate <= self.max_mask_rate < 1:
            raise ConfigError("mask rates must satisfy 0 <= min_mask_rate <= max_mask_rate < 1")
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError("num_proc must be positive (or left out)")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("steps, batch_size and grad_accum must be positive")
        context = PRESETS[self.preset]["n_positions"] - 1
        if not 2 <= self.seq_len <= context:
            raise ConfigError(f"seq_len must be in [2, {context}] (the '{self.preset}' preset's context), got {self.seq_len}")


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m experiments.pretrain_reconstructor``.

    :param argv: command-line arguments
    """
    c = parse_config(PretrainReconstructorConfig, argv, description=__doc__ or "")
    build = BuildConfig(
        source=c.data,
        preset=c.preset,
        vocab_size=c.vocab_size,
        seq_len=c.seq_len,
        seed=c.seed,
        pretrain=PretrainConfig(
            steps=c.steps,
            batch_size=c.batch_size,
            grad_accum=c.grad_accum,
            lr=c.lr,
            warmup_steps=c.warmup_steps,
            min_mask_rate=c.min_mask_rate,
            max_mask_rate=c.max_mask_rate,
            eval_every=c.eval_every,
            checkpoint_every=c.checkpoint_every,
            seed=c.seed,
        ),
    )
    output = Path(c.output_dir) if c.output_dir else default_reconstructor_dir(c.preset)
    accelerator = make_accelerator(c.device)  # None in a plain process
    reconstructor, report = build_reconstructor(
        build,
        output,
        device=c.device,
        progress=c.progress_bar,
        tensorboard_dir=c.tensorboard_log,
        num_proc=c.num_proc,
        accelerator=accelerator,
    )
    report.pop("build_config", None)
    if is_main_process(accelerator):
        print(json.dumps({"output_dir": str(output), **report}, indent=2))
    del reconstructor
    end_processes(accelerator)  # closes the process group


if __name__ == "__main__":
    raise SystemExit(main())
