"""Pretraining of the offline reconstructor, and the build settings of the presets (``"tiny"``, ``"test"``).

The reconstructor learns to predict each token from the compressed left context under random masks
at mixed mask rates (each window draws its own rate uniformly in ``[min_mask_rate, max_mask_rate]``),
so it is a usable reconstructor before joint training starts. Training is resumable: a checkpoint
folder holds the model (safetensors), the optimizer state (read back with ``weights_only=True``) and
the step counter. Validation bits per masked token go to TensorBoard.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tokencompress_env.data import EMBEDDED, CorpusSpec, count_tokens, load_documents, prepare_corpus, split_documents, window_array
from tokencompress_env.errors import DataSourceError
from tokencompress_env.reconstructor import Reconstructor
from tokencompress_env.tokenizer import train_bpe_tokenizer

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
    reconstructor: Reconstructor, optimizer: torch.optim.Optimizer, step: int, path: Path, extra: dict[str, Any] | None = None
) -> None:
    """Write a training checkpoint atomically (a temporary folder renamed into place).

    :param reconstructor: the model and tokenizer
    :param optimizer: its optimizer
    :param step: optimizer steps done
    :param path: checkpoint folder
    :param extra: more facts for ``state.json``
    """
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    reconstructor.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Restore an optimizer's state saved by :func:`save_checkpoint` (tensors only, no pickled code).

    :param optimizer: the optimizer
    :param path: the ``optimizer.pt`` file
    """
    optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def pretrain(
    reconstructor: Reconstructor,
    train_windows: np.ndarray,
    val_windows: np.ndarray,
    config: PretrainConfig,
    checkpoint_dir: str | Path | None = None,
    tensorboard_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain ``reconstructor`` in place on random masks; resumes from ``checkpoint_dir`` if it holds one.

    :param reconstructor: the reconstructor to train
    :param train_windows: ``[N, L]`` training windows
    :param val_windows: ``[M, L]`` validation windows (held-out documents; at least one)
    :param config: hyper-parameters
    :param checkpoint_dir: folder for the resumable checkpoint (``None``: no checkpoints)
    :param tensorboard_dir: folder for TensorBoard events (``None``: none)
    :param progress: show a progress bar
    :return: a report: steps, seconds, tokens per second, validation bits per masked token
    """
    if len(train_windows) == 0:
        raise ValueError("no training windows: the corpus is smaller than one window")
    if len(val_windows) == 0:  # never report training windows as validation
        raise ValueError("no validation windows: validation bits must come from held-out documents")
    model = reconstructor.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start_step = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt is not None and (ckpt / "state.json").exists():
        resumed = Reconstructor.from_pretrained(ckpt, device=reconstructor.device)
        model.load_state_dict(resumed.model.state_dict())
        load_optimizer_state(optimizer, ckpt / "optimizer.pt")
        start_step = int(json.loads((ckpt / "state.json").read_text())["step"])
    writer = None
    if tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tensorboard_dir))
    generator = torch.Generator().manual_seed(config.seed + start_step)
    eval_windows = val_windows[: config.eval_windows]
    started = time.perf_counter()
    tokens = 0
    bar = tqdm(total=config.steps, initial=start_step, desc="Pretraining reconstructor", disable=not progress, unit="step")
    for step in range(start_step, config.steps):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        loss_value = 0.0
        for _ in range(config.grad_accum):
            idx = torch.randint(0, len(train_windows), (config.batch_size,), generator=generator)
            ids = torch.from_numpy(train_windows[idx.numpy()]).to(reconstructor.device)
            shape = (ids.shape[0], ids.shape[1])
            mask = random_masks(shape, generator, config.min_mask_rate, config.max_mask_rate).to(reconstructor.device)
            loss = reconstructor.training_loss(ids, mask) / config.grad_accum
            loss.backward()
            loss_value += float(loss.detach())
            tokens += ids.numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if writer is not None and step % 10 == 0:
            writer.add_scalar("pretrain/loss_nats", loss_value, step)
            writer.add_scalar("pretrain/lr", optimizer.param_groups[0]["lr"], step)
        done = step + 1
        if config.eval_every and done % config.eval_every == 0 and done < config.steps and writer is not None:
            for rate, bits in evaluate_bits(reconstructor, eval_windows, config.eval_mask_rates).items():
                writer.add_scalar(f"pretrain/val_bits_per_masked_token@{rate}", bits, done)
        if ckpt is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
            save_checkpoint(reconstructor, optimizer, done, ckpt)
    bar.close()
    seconds = time.perf_counter() - started
    model.eval()
    val_bits = evaluate_bits(reconstructor, eval_windows, config.eval_mask_rates)
    if writer is not None:
        for rate, bits in val_bits.items():
            writer.add_scalar(f"pretrain/val_bits_per_masked_token@{rate}", bits, config.steps)
        writer.close()
    if ckpt is not None:
        save_checkpoint(reconstructor, optimizer, config.steps, ckpt)
    return {
        "steps": config.steps,
        "resumed_from_step": start_step,
        "seconds": seconds,
        "train_tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "val_bits_per_masked_token": val_bits,
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
) -> tuple[Reconstructor, dict[str, Any]]:
    """Build a reconstructor from scratch: split the corpus, train the tokenizer, pretrain, save.

    The tokenizer is trained on the training split only. Resumes an interrupted build from
    ``<output_dir>.partial`` (its checkpoint), and writes ``output_dir`` only when complete.

    :param config: build settings
    :param output_dir: final directory of the reconstructor
    :param device: where to train
    :param progress: show progress bars
    :param tensorboard_dir: folder for TensorBoard events (``None``: none)
    :return: the reconstructor and the build report
    """
    output_dir = Path(output_dir)
    partial = output_dir.with_name(output_dir.name + ".partial")  # created by the first checkpoint, not before
    documents = split_documents(load_documents(config.source))
    ckpt = partial / "checkpoint"
    if (ckpt / "state.json").exists():
        reconstructor = Reconstructor.from_pretrained(ckpt, device=device)
    else:
        tokenizer = train_bpe_tokenizer(documents["train"]["text"], vocab_size=config.vocab_size)
        reconstructor = Reconstructor.new(tokenizer, config.preset, device=device, seed=config.seed)
    spec = CorpusSpec(source=config.source, seq_len=config.seq_len)
    windows = prepare_corpus(spec, reconstructor.tokenizer, documents=documents)
    train, val = window_array(windows["train"]), window_array(windows["validation"])
    if len(train) and not len(val):
        held_out = len(documents["validation"])
        raise DataSourceError(
            f"the validation split of corpus '{config.source}' has no {config.seq_len}-token window "
            f"({held_out} of {sum(len(d) for d in documents.values())} documents held out, all shorter): "
            "give more text (more documents) or a shorter --seq_len"
        )
    report = pretrain(reconstructor, train, val, config.pretrain, checkpoint_dir=ckpt, tensorboard_dir=tensorboard_dir, progress=progress)
    report.update(
        {
            "corpus_tokens": count_tokens(windows),
            "parameters": reconstructor.num_parameters(),
            "build_config": asdict(config),
        }
    )
    tmp = output_dir.with_name(output_dir.name + f".tmp-{os.getpid()}")
    reconstructor.save_pretrained(tmp, build_info=report)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
    shutil.rmtree(partial, ignore_errors=True)
    return reconstructor, report
