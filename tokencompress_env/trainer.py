"""The reconstructor's trainer (model, optimizer, counters) and the multi-process plumbing around it.

:class:`ReconstructorTrainer` owns what training the reconstructor needs: the model, its AdamW optimizer,
the optimizer-step and fine-tuning-round counters and the last loss. Pretraining
(:func:`tokencompress_env.pretrain.pretrain`), the joint fine-tuning callback and the checkpoint
callback all work through one trainer object, so no callback needs another.

Several processes. Launched by ``accelerate launch`` (or ``torchrun``), :func:`make_accelerator`
returns a Hugging Face :class:`accelerate.Accelerator` and the trainer wraps the model for
distributed data parallel training (``Accelerator.prepare``): every process draws its own batches, and
``accelerator.backward`` averages the gradients over the processes, so all copies of the model stay
identical. In one plain process there is no accelerator and the trainer runs exactly the loop it ran
before (same numbers). :func:`main_process_first`, :func:`is_main_process` and :func:`wait_for_everyone`
accept ``None`` for that case.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokencompress_env.errors import ConfigError
from tokencompress_env.reconstructor import Reconstructor, parse_device

if TYPE_CHECKING:
    from accelerate import Accelerator

#: A micro-batch: ``[B, L]`` token ids, ``[B, L]`` dropped positions, ``[B, L]`` real positions (``None``: all).
MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``, set by ``accelerate launch`` and ``torchrun``).

    :return: 1 in a plain ``python`` process
    """
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def make_accelerator(device: str | torch.device = "auto") -> Accelerator | None:
    """An :class:`accelerate.Accelerator` when this process is one of several, else ``None``.

    CPU processes use the ``gloo`` backend (``device="cpu"``, or ``"auto"`` without CUDA); GPU processes
    ``nccl``, one GPU each (``LOCAL_RANK``). The accelerator does not move models itself
    (``device_placement=False``): the caller builds the reconstructor on :attr:`Accelerator.device`.

    :param device: the run's device option
    :return: the accelerator, or ``None`` in a single process
    :raises ImportError: when several processes were launched but ``accelerate`` is not installed
    :raises ConfigError: when the processes could not be joined into one group on that device
    """
    if launched_processes() <= 1:
        return None
    from accelerate import Accelerator

    wanted = device if isinstance(device, torch.device) else parse_device(device) if device != "auto" else None
    cpu = (wanted is not None and wanted.type == "cpu") or (wanted is None and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu, device_placement=False)
    if accelerator.num_processes != launched_processes():  # e.g. --device cuda on a machine without CUDA
        raise ConfigError(
            f"{launched_processes()} processes were launched but accelerate joined {accelerator.num_processes} "
            f"(device {str(device)!r}): pass --device cpu on a machine without GPUs"
        )
    return accelerator


def is_main_process(accelerator: Accelerator | None) -> bool:
    """Whether this process writes files (checkpoints, reports, TensorBoard events).

    :param accelerator: the accelerator (``None``: a single process, which is the main one)
    :return: ``True`` in the main process
    """
    return accelerator is None or bool(accelerator.is_main_process)


def wait_for_everyone(accelerator: Accelerator | None) -> None:
    """A barrier across the processes (nothing in a single process).

    :param accelerator: the accelerator, or ``None``
    """
    if accelerator is not None:
        accelerator.wait_for_everyone()


def end_processes(accelerator: Accelerator | None) -> None:
    """Close the process group once every process has finished (nothing in a single process).

    Call it last, after dropping the references to the trainer (its distributed model holds the group):
    the wrappers are collected first, the processes meet at a barrier, then the group is destroyed. A group
    torn down while a distributed model still held it, or while the other process was still using it, made
    gloo processes abort at exit ("terminate called without an active exception") about one run in five on a
    loaded 2-core machine.

    :param accelerator: the accelerator, or ``None``
    """
    if accelerator is None:
        return
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main_process_first(accelerator: Accelerator | None, local: bool = True) -> Any:
    """A context in which the main process runs first and the others after it (e.g. to fill a cache once).

    :param accelerator: the accelerator, or ``None`` (an empty context)
    :param local: first on each machine (a per-machine cache) rather than first of all machines
    :return: the context manager
    """
    if accelerator is None:
        return nullcontext()
    return accelerator.local_main_process_first() if local else accelerator.main_process_first()


def broadcast_object(value: Any, accelerator: Accelerator | None) -> Any:
    """The main process's ``value`` in every process (pickled over the process group).

    :param value: the object (only the main process's is used)
    :param accelerator: the accelerator, or ``None`` (returns ``value``)
    :return: the main process's object
    """
    if accelerator is None:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def gather_objects(value: Any, accelerator: Accelerator | None) -> list[Any]:
    """Every process's ``value``, in process order.

    :param value: this process's object
    :param accelerator: the accelerator, or ``None`` (a one-element list)
    :return: the objects of all processes
    """
    if accelerator is None:
        return [value]
    from accelerate.utils import gather_object

    return list(gather_object([value]))


@contextmanager
def train_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put a module in train mode for the block and back in eval mode afterwards, even on error.

    :param module: the module
    :return: the module
    """
    module.train()
    try:
        yield module
    finally:
        module.eval()


class ReconstructorTrainer:
    """The reconstructor being trained, its optimizer and its counters (shared by the loops and callbacks).

    :param reconstructor: the reconstructor (trained in place; the envs may hold the same object)
    :param learning_rate: AdamW learning rate
    :param weight_decay: AdamW weight decay
    :param max_grad_norm: gradient clipping of each optimizer step
    :param accelerator: the accelerator of a multi-process run (``None``: one process, no wrapping)
    """

    def __init__(
        self,
        reconstructor: Reconstructor,
        learning_rate: float,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.reconstructor = reconstructor
        self.max_grad_norm = max_grad_norm
        self.accelerator = accelerator
        optimizer = torch.optim.AdamW(reconstructor.model.parameters(), lr=learning_rate, weight_decay=weight_decay)
        #: The module the training forward goes through (a DDP wrapper of ``reconstructor.model`` across processes).
        self.model: torch.nn.Module = reconstructor.model
        self.optimizer: torch.optim.Optimizer = optimizer
        if accelerator is not None:
            self.model, self.optimizer = accelerator.prepare(reconstructor.model, optimizer)
        #: Optimizer steps taken by this trainer (and the ones it resumed from, when restored).
        self.steps = 0
        #: Fine-tuning rounds (joint training), saved with the checkpoints.
        self.rounds = 0
        #: Mean loss (nats) of the last round or step, ``None`` before the first.
        self.last_loss: float | None = None

    @property
    def processes(self) -> int:
        """How many processes train together.

        :return: 1 without an accelerator
        """
        return 1 if self.accelerator is None else int(self.accelerator.num_processes)

    def set_learning_rate(self, learning_rate: float) -> None:
        """Set the learning rate of every parameter group (a schedule calls this before each step).

        :param learning_rate: the new rate
        """
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate

    def step(self, micro_batches: Sequence[MicroBatch]) -> float:
        """One optimizer step on ``micro_batches`` (gradient accumulation), the model left in eval mode.

        Each micro-batch's loss is divided by their number before its backward pass; across processes,
        the gradients are averaged too (synchronised on the last micro-batch only).

        :param micro_batches: the micro-batches of this step, on the model's device
        :return: the mean loss (nats) of the micro-batches, in this process
        """
        if not micro_batches:
            raise ValueError("an optimizer step needs at least one micro-batch")
        losses: list[float] = []
        n = len(micro_batches)
        with train_mode(self.reconstructor.model):
            for i, (ids, mask, valid) in enumerate(micro_batches):
                last = i == n - 1
                sync = nullcontext() if self.accelerator is None or last else self.accelerator.no_sync(self.model)
                with sync:
                    loss = self.reconstructor.training_loss(ids, mask, valid, model=self.model)
                    if self.accelerator is None:
                        (loss / n).backward()
                    else:
                        self.accelerator.backward(loss / n)
                losses.append(float(loss.detach()))
            if self.accelerator is None:
                torch.nn.utils.clip_grad_norm_(self.reconstructor.model.parameters(), self.max_grad_norm)
            else:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.last_loss = float(np.mean(losses))
        return self.last_loss

    def mean_over_processes(self, value: float) -> float:
        """Average a number over the processes (a collective: every process must call it).

        :param value: this process's number
        :return: the mean (``value`` itself in one process)
        """
        if self.accelerator is None:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="mean").item())

    def save_optimizer(self, path: str | Path) -> None:
        """Write the optimizer's state (tensors only) to ``path``.

        :param path: the file (``*.pt``)
        """
        torch.save(self.optimizer.state_dict(), path)

    def load_optimizer(self, path: str | Path) -> None:
        """Restore the optimizer's state from ``path``, read with ``weights_only=True`` (no pickled code).

        :param path: a file written by :meth:`save_optimizer`
        """
        self.optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
