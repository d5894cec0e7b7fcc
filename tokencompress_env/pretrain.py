"""Pretraining of the offline reconstructor, and the build settings of the presets (``"tiny"``, ``"test"``).

The reconstructor learns to predict each token from the compressed left context under random masks
at mixed mask rates (each window draws its own rate uniformly in ``[min_mask_rate, max_mask_rate]``),
so it is a usable reconstructor before joint training starts. Training is resumable: a checkpoint
folder holds the model (safetensors), the optimizer state (read back with ``weights_only=True``) and
the step counter. Validation bits per masked token go to TensorBoard.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tokencompress_env.data import EMBEDDED, CorpusSpec, count_tokens, load_documents, prepare_corpus, split_documents, window_array
from tokencompress_env.errors import DataSourceError
from tokencompress_env.reconstructor import Reconstructor
from tokencompress_env.run_folder import publish_folder, temp_folder
from tokencompress_env.tokenizer import train_bpe_tokenizer
from tokencompress_env.trainer import (
    MicroBatch,
    ReconstructorTrainer,
    broadcast_object,
    gather_objects,
    is_main_process,
    main_process_first,
    wait_for_everyone,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

#: Mask rates at which validation bits per masked token are reported.
EVAL_MASK_RATES = (0.2, 0.4, 0.6)


@dataclass
class PretrainConfig:
    """Hyper-parameters of reconstructor pretraining.

    :param steps: optimizer steps
    :param batch_size: windows per micro-batch
    :param grad_accum: micro-batches per optimizer step
    :param lr: peak learning rate (linear warm-up, cosine decay)
    :param warmup_steps: warm-up steps
    :param weight_decay: AdamW weight decay
    :param min_mask_rate: lowest per-window mask rate drawn
    :param max_mask_rate: highest per-window mask rate drawn
    :param eval_every: steps between validations (0: only at the end)
    :param eval_windows: validation windows scored per evaluation
    :param checkpoint_every: steps between checkpoints (0: only at the end)
    :param seed: seed of masks, batches and initialisation
    :param eval_mask_rates: mask rates of the validation report
    """

    steps: int = 1500
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    min_mask_rate: float = 0.0
    max_mask_rate: float = 0.8
    eval_every: int = 500
    eval_windows: int = 256
    checkpoint_every: int = 500
    seed: int = 0
    eval_mask_rates: tuple[float, ...] = field(default=EVAL_MASK_RATES)


def random_masks(shape: tuple[int, int], generator: torch.Generator, min_rate: float, max_rate: float) -> torch.Tensor:
    """Draw Bernoulli masks, each row at its own rate drawn uniformly in ``[min_rate, max_rate]``.

    :param shape: ``(batch, length)``
    :param generator: torch random generator
    :param min_rate: lowest row rate
    :param max_rate: highest row rate
    :return: ``[batch, length]`` bool, ``True`` = dropped
    """
    rates = min_rate + (max_rate - min_rate) * torch.rand((shape[0], 1), generator=generator)
    return torch.rand(shape, generator=generator) < rates


def fixed_rate_masks(shape: tuple[int, int], rate: float, seed: int) -> np.ndarray:
    """Masks with exactly ``round(rate * length)`` dropped positions per row, chosen uniformly.

    :param shape: ``(batch, length)``
    :param rate: mask rate
    :param seed: seed
    :return: ``[batch, length]`` bool
    """
    rng = np.random.default_rng(seed)
    _n, length = shape
    k = round(rate * length)
    order = np.argsort(rng.random(shape), axis=1)
    mask = np.zeros(shape, dtype=bool)
    np.put_along_axis(mask, order[:, :k], True, axis=1)
    return mask


def bits_per_masked_token(reconstructor: Reconstructor, windows: np.ndarray, rate: float, seed: int = 0, batch_size: int = 32) -> float:
    """Mean surprisal (bits) of the dropped tokens under uniformly random masks at ``rate``.

    :param reconstructor: the reconstructor
    :param windows: ``[N, L]`` token ids
    :param rate: mask rate
    :param seed: seed of the masks
    :param batch_size: windows per forward pass
    :return: bits per masked token
    """
    masks = fixed_rate_masks(windows.shape, rate, seed)
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        result = reconstructor.score(windows[start : start + batch_size], masks[start : start + batch_size], positions="masked")
        total += float(result.masked_bits.sum())
        count += int(result.mask.sum())
    return total / max(count, 1)


def evaluate_bits(
    reconstructor: Reconstructor, windows: np.ndarray, rates: tuple[float, ...] = EVAL_MASK_RATES, seed: int = 0
) -> dict[str, float]:
    """Bits per masked token at several random-mask rates.

    :param reconstructor: the reconstructor
    :param windows: ``[N, L]`` token ids
    :param rates: mask rates
    :param seed: seed of the masks
    :return: ``{"0.2": bits, ...}``
    """
    return {f"{r:g}": bits_per_masked_token(reconstructor, windows, r, seed) for r in rates}


def _lr_at(step: int, config: PretrainConfig) -> float:
    """Learning rate at ``step``: linear warm-up then cosine decay to 10 %.

    :param step: optimizer step
    :param config: the configuration
    :return: the learning rate
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return float(config.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))))


def save_checkpoint(
    reconstructor: Reconstructor, trainer: ReconstructorTrainer, step: int, path: Path, extra: dict[str, Any] | None = None
) -> None:
    """Write a training checkpoint atomically (a temporary folder renamed into place).

    :param reconstructor: the model and tokenizer
    :param trainer: its trainer (the optimizer's state is saved)
    :param step: optimizer steps done
    :param path: checkpoint folder
    :param extra: more facts for ``state.json``
    """
    tmp = temp_folder(path)
    reconstructor.save_pretrained(tmp)
    trainer.save_optimizer(tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
    publish_folder(tmp, path)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's parameters (equal hashes: the same weights, bit for bit).

    :param model: the model
    :return: 16 hex digits
    """
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _batch_generator(seed: int, start_step: int, process: int) -> torch.Generator:
    """The random generator of batches and masks: its own stream per process, and per resumed step.

    Process 0 keeps the single-process stream (``seed + start_step``), so one process reproduces the
    numbers of a plain run.

    :param seed: the configuration's seed
    :param start_step: the step training (re)starts at
    :param process: this process's index
    :return: the generator
    """
    if process == 0:
        return torch.Generator().manual_seed(seed + start_step)
    state = np.random.SeedSequence([seed, start_step, process]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def pretrain(
    reconstructor: Reconstructor,
    train_windows: np.ndarray,
    val_windows: np.ndarray,
    config: PretrainConfig,
    checkpoint_dir: str | Path | None = None,
    tensorboard_dir: str | Path | None = None,
    progress: bool = True,
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """Pretrain ``reconstructor`` in place on random masks; resumes from ``checkpoint_dir`` if it holds one.

    With an ``accelerator`` (several processes), each process draws its own batches of ``batch_size``
    windows, the gradients are averaged over the processes, and only the main process validates and
    writes checkpoints and TensorBoard events.

    :param reconstructor: the reconstructor to train
    :param train_windows: ``[N, L]`` training windows
    :param val_windows: ``[M, L]`` validation windows (held-out documents; at least one)
    :param config: hyper-parameters
    :param checkpoint_dir: folder for the resumable checkpoint (``None``: no checkpoints)
    :param tensorboard_dir: folder for TensorBoard events (``None``: none)
    :param progress: show a progress bar
    :param accelerator: the accelerator of a multi-process run (``None``: one process)
    :return: a report: steps, seconds, tokens per second, the first and last step's training loss (mean
        over processes), validation bits per masked token (main process; ``{}`` elsewhere), processes,
        ``batch_fingerprints`` (a hash of each process's first batch: they differ between processes) and
        ``weights_fingerprints`` (a hash of each process's final weights: synchronised, they are equal)
    """
    if len(train_windows) == 0:
        raise ValueError("no training windows: the corpus is smaller than one window")
    if len(val_windows) == 0:  # never report training windows as validation
        raise ValueError("no validation windows: validation bits must come from held-out documents")
    main = is_main_process(accelerator)
    trainer = ReconstructorTrainer(reconstructor, config.lr, config.weight_decay, max_grad_norm=1.0, accelerator=accelerator)
    start_step = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt is not None and (ckpt / "state.json").exists():
        resumed = Reconstructor.from_pretrained(ckpt, device=reconstructor.device)
        reconstructor.model.load_state_dict(resumed.model.state_dict())
        trainer.load_optimizer(ckpt / "optimizer.pt")
        start_step = int(json.loads((ckpt / "state.json").read_text())["step"])
    trainer.steps = start_step
    writer = None
    if tensorboard_dir is not None and main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tensorboard_dir))
    process = 0 if accelerator is None else int(accelerator.process_index)
    generator = _batch_generator(config.seed, start_step, process)
    eval_windows = val_windows[: config.eval_windows]
    started = time.perf_counter()
    tokens = 0
    first_batch = ""
    losses: dict[str, float] = {}
    bar = tqdm(total=config.steps, initial=start_step, desc="Pretraining reconstructor", disable=not (progress and main), unit="step")
    for step in range(start_step, config.steps):
        trainer.set_learning_rate(_lr_at(step, config))
        batches: list[MicroBatch] = []
        for _ in range(config.grad_accum):
            idx = torch.randint(0, len(train_windows), (config.batch_size,), generator=generator)
            ids = torch.from_numpy(train_windows[idx.numpy()]).to(reconstructor.device)
            shape = (ids.shape[0], ids.shape[1])
            mask = random_masks(shape, generator, config.min_mask_rate, config.max_mask_rate).to(reconstructor.device)
            batches.append((ids, mask, None))
            tokens += ids.numel()
            if not first_batch:
                first_batch = hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]
        loss_value = trainer.step(batches)
        if step == start_step:
            losses["first"] = trainer.mean_over_processes(loss_value)
        if step == config.steps - 1:
            losses["last"] = trainer.mean_over_processes(loss_value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if writer is not None and step % 10 == 0:
            writer.add_scalar("pretrain/loss_nats", loss_value, step)
            writer.add_scalar("pretrain/lr", trainer.optimizer.param_groups[0]["lr"], step)
        done = step + 1
        if config.eval_every and done % config.eval_every == 0 and done < config.steps and writer is not None:
            for rate, bits in evaluate_bits(reconstructor, eval_windows, config.eval_mask_rates).items():
                writer.add_scalar(f"pretrain/val_bits_per_masked_token@{rate}", bits, done)
        if ckpt is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
            if main:
                save_checkpoint(reconstructor, trainer, done, ckpt)
            wait_for_everyone(accelerator)
    bar.close()
    seconds = time.perf_counter() - started
    reconstructor.model.eval()
    val_bits = evaluate_bits(reconstructor, eval_windows, config.eval_mask_rates) if main else {}
    if writer is not None:
        for rate, bits in val_bits.items():
            writer.add_scalar(f"pretrain/val_bits_per_masked_token@{rate}", bits, config.steps)
        writer.close()
    if ckpt is not None and main:
        save_checkpoint(reconstructor, trainer, config.steps, ckpt)
    fingerprints = gather_objects(first_batch, accelerator)
    weights = gather_objects(weights_fingerprint(reconstructor.model), accelerator)
    wait_for_everyone(accelerator)
    return {
        "steps": config.steps,
        "resumed_from_step": start_step,
        "seconds": seconds,
        "train_tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "train_loss_nats": losses,
        "val_bits_per_masked_token": val_bits,
        "processes": trainer.processes,
        "batch_fingerprints": fingerprints,
        "weights_fingerprints": weights,
    }


@dataclass
class BuildConfig:
    """How the offline preset reconstructor is built: corpus, tokenizer and pretraining.

    :param source: corpus to train the tokenizer and model on (the embedded corpus by default)
    :param preset: model size, a key of :data:`~tokencompress_env.reconstructor.PRESETS`
    :param vocab_size: BPE vocabulary size
    :param seq_len: window length used in pretraining
    :param pretrain: pretraining hyper-parameters
    :param seed: seed of the initialisation
    """

    source: str = EMBEDDED
    preset: str = "tiny"
    vocab_size: int = 4096
    seq_len: int = 128
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    seed: int = 0


#: Build settings of each offline preset (``test`` is for the test-suite: seconds, not minutes).
PRESET_BUILDS: dict[str, BuildConfig] = {
    "tiny": BuildConfig(pretrain=PretrainConfig(steps=600, warmup_steps=50, eval_every=200, checkpoint_every=100)),
    "test": BuildConfig(
        preset="test",
        vocab_size=512,
        seq_len=64,
        pretrain=PretrainConfig(steps=60, batch_size=16, warmup_steps=10, lr=3e-3, eval_every=0, eval_windows=32, checkpoint_every=0),
    ),
}


def build_reconstructor(
    config: BuildConfig,
    output_dir: str | Path,
    device: str = "auto",
    progress: bool = True,
    tensorboard_dir: str | Path | None = None,
    num_proc: int | None = None,
    accelerator: Accelerator | None = None,
) -> tuple[Reconstructor, dict[str, Any]]:
    """Build a reconstructor from scratch: split the corpus, train the tokenizer, pretrain, save.

    The tokenizer is trained on the training split only. Resumes an interrupted build from
    ``<output_dir>.partial`` (its checkpoint), and writes ``output_dir`` only when complete.

    With an ``accelerator`` (several processes, see :func:`~tokencompress_env.trainer.make_accelerator`),
    the main process trains the tokenizer and sends it to the others, the corpus is prepared by the
    first process of each machine while the others wait (then read the cache it wrote), the model is
    trained with synchronised gradients on ``accelerator.device``, and only the main process writes the
    checkpoints and ``output_dir``. Resuming reads ``<output_dir>.partial`` in every process, so on
    several machines it must be on a shared filesystem.

    :param config: build settings
    :param output_dir: final directory of the reconstructor
    :param device: where to train (a multi-process run uses each process's own device)
    :param progress: show progress bars
    :param tensorboard_dir: folder for TensorBoard events (``None``: none)
    :param num_proc: processes for tokenising the corpus (:meth:`datasets.Dataset.map`; ``None``: one)
    :param accelerator: the accelerator of a multi-process run (``None``: one process)
    :return: the reconstructor and the build report
    """
    output_dir = Path(output_dir)
    main = is_main_process(accelerator)
    where: str | torch.device = device if accelerator is None else accelerator.device
    partial = output_dir.with_name(output_dir.name + ".partial")  # created by the first checkpoint, not before
    documents = split_documents(load_documents(config.source))
    ckpt = partial / "checkpoint"
    if (ckpt / "state.json").exists():
        reconstructor = Reconstructor.from_pretrained(ckpt, device=where)
    else:
        tokenizer = train_bpe_tokenizer(documents["train"]["text"], vocab_size=config.vocab_size) if main else None
        tokenizer = broadcast_object(tokenizer, accelerator)  # one tokenizer for all processes
        reconstructor = Reconstructor.new(tokenizer, config.preset, device=where, seed=config.seed)
    spec = CorpusSpec(source=config.source, seq_len=config.seq_len)
    with main_process_first(accelerator):  # the first process fills the corpus cache; the others read it
        windows = prepare_corpus(spec, reconstructor.tokenizer, documents=documents, num_proc=num_proc)
    train, val = window_array(windows["train"]), window_array(windows["validation"])
    if len(train) and not len(val):
        held_out = len(documents["validation"])
        raise DataSourceError(
            f"the validation split of corpus '{config.source}' has no {config.seq_len}-token window "
            f"({held_out} of {sum(len(d) for d in documents.values())} documents held out, all shorter): "
            "give more text (more documents) or a shorter --seq_len"
        )
    report = pretrain(
        reconstructor,
        train,
        val,
        config.pretrain,
        checkpoint_dir=ckpt,
        tensorboard_dir=tensorboard_dir,
        progress=progress,
        accelerator=accelerator,
    )
    report.update(
        {
            "corpus_tokens": count_tokens(windows),
            "parameters": reconstructor.num_parameters(),
            "build_config": asdict(config),
        }
    )
    if main:
        tmp = temp_folder(output_dir)
        info = {k: v for k, v in report.items() if not k.endswith("_fingerprints")}
        reconstructor.save_pretrained(tmp, build_info=info)
        publish_folder(tmp, output_dir)
        shutil.rmtree(partial, ignore_errors=True)
    wait_for_everyone(accelerator)
    return reconstructor, report
