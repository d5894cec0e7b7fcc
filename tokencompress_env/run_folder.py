"""The run folder: its layout, its atomic publication and what makes a run finished (read by :mod:`~tokencompress_env.run_loading`).

``experiments.train_ppo`` writes a run folder ``<runs_dir>/<run_name>/``:

=================================  ==========================================================================
``config.json``                    the resolved training config (:data:`CONFIG`)
``tb/``                            TensorBoard events (:data:`TENSORBOARD`)
``reference_reconstructor/``       the frozen starting reconstructor (:data:`REFERENCE_RECONSTRUCTOR`)
``checkpoints/latest/``            the latest complete checkpoint (:func:`latest_checkpoint`), which holds
                                   the files of a result plus ``config.json`` and, during distillation,
                                   ``distill_optimizer.pt``
``policy.safetensors``             the policy for inference, loaded without unpickling (:data:`POLICY_WEIGHTS`)
``policy.json``                    what rebuilds the policy network around its weights (:data:`POLICY_SPEC`)
``reconstructor/``                 the jointly trained reconstructor (:data:`RECONSTRUCTOR`)
``reconstructor_optimizer.pt``     its optimizer (tensors only; :data:`RECONSTRUCTOR_OPTIMIZER`)
``state.json``                     timesteps, fine-tuning rounds, the SHA-256 of ``agent.zip`` (:data:`STATE`)
``agent.zip``                      the SB3 agent, a pickle read only to resume training (:data:`AGENT_ZIP`)
=================================  ==========================================================================

The files from ``policy.safetensors`` down are the run's *result* (:data:`RESULT_FILES`): they are
copied from the final checkpoint to the run's root when training ends (:func:`publish_run_result`),
``agent.zip`` last, so a run is *finished* exactly when its root holds ``agent.zip``
(:func:`is_finished_run`).

A folder is written whole into a temporary sibling and renamed into place (:func:`publish_folder`),
so a process killed at any moment leaves the previous complete folder (:func:`recover_folder` undoes a
swap it interrupted). :func:`tokencompress_env.run_loading.load_run` is the one reader of a run (or
checkpoint) folder for inference and evaluation; :func:`agents.algorithms.load_model` is the one loader of ``agent.zip`` (it checks the
SHA-256 recorded in ``state.json`` first).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from tokencompress_env.errors import CheckpointError

#: The resolved training config.
CONFIG = "config.json"
#: Facts of a checkpoint or result: ``num_timesteps``, ``finetune_rounds``, ``agent_sha256``, ...
STATE = "state.json"
#: The SB3 agent (a pickle; unpickled only to resume, after its SHA-256 is checked).
AGENT_ZIP = "agent.zip"
#: File of the policy's weights (the safe inference artifact, :mod:`agents.artifact`).
POLICY_WEIGHTS = "policy.safetensors"
#: File of the spec that rebuilds the policy network around its weights.
POLICY_SPEC = "policy.json"
#: The jointly trained reconstructor (a folder).
RECONSTRUCTOR = "reconstructor"
#: The fine-tuning optimizer's state of the jointly trained reconstructor.
RECONSTRUCTOR_OPTIMIZER = "reconstructor_optimizer.pt"
#: The frozen starting reconstructor (a folder at the run's root only).
REFERENCE_RECONSTRUCTOR = "reference_reconstructor"
#: The distillation optimizer's state, in a checkpoint taken during distillation.
DISTILL_OPTIMIZER = "distill_optimizer.pt"
#: TensorBoard events.
TENSORBOARD = "tb"
#: Folder of the checkpoints.
CHECKPOINTS = "checkpoints"
#: Name of the latest checkpoint folder inside :data:`CHECKPOINTS`.
LATEST = "latest"
#: What training publishes at the run's root, in this order: :data:`AGENT_ZIP` last marks a finished run.
RESULT_FILES = (POLICY_WEIGHTS, POLICY_SPEC, RECONSTRUCTOR, RECONSTRUCTOR_OPTIMIZER, STATE, AGENT_ZIP)
#: Suffix of the previous folder while :func:`publish_folder` swaps a new one in.
OLD_SUFFIX = ".old"
#: Folder at the run's root that :func:`publish_run_result` fills before moving its files into place.
RESULT_STAGING = "final.tmp"


# ---------------------------------------------------------------------------- layout
def latest_checkpoint(run_dir: str | Path) -> Path:
    """The latest checkpoint folder of a run.

    :param run_dir: the run folder
    :return: ``<run_dir>/checkpoints/latest``
    """
    return Path(run_dir) / CHECKPOINTS / LATEST


def is_checkpoint_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a run's ``checkpoints/latest`` (rather than a run folder).

    :param folder: a run or checkpoint folder
    :return: ``True`` for ``.../checkpoints/latest``
    """
    folder = Path(folder)
    return folder.name == LATEST and folder.parent.name == CHECKPOINTS


def run_dir_of(folder: str | Path) -> Path:
    """The run folder of a run or checkpoint folder.

    :param folder: a run folder or its ``checkpoints/latest``
    :return: the run folder
    """
    folder = Path(folder)
    return folder.parent.parent if is_checkpoint_folder(folder) else folder


def is_finished_run(run_dir: str | Path) -> bool:
    """Whether a run has finished: its result is published at its root (``agent.zip``, moved last).

    :param run_dir: the run folder
    :return: ``True`` when training ended and published its result
    """
    return (Path(run_dir) / AGENT_ZIP).is_file()


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether a run has a complete checkpoint to resume from (an unfinished or interrupted run).

    :param run_dir: the run folder
    :return: ``True`` when ``checkpoints/latest/state.json`` exists
    """
    return (latest_checkpoint(run_dir) / STATE).exists()


# ---------------------------------------------------------------------------- atomic publication
def temp_folder(target: str | Path) -> Path:
    """A fresh, empty temporary sibling of ``target`` (``<target>.tmp-<pid>``) to write a folder into.

    :param target: the folder's final place (its parent is created)
    :return: the temporary folder (created; whatever a killed process left there is removed)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish_folder(tmp: str | Path, target: str | Path) -> None:
    """Move a finished folder to ``target``, replacing what was there as atomically as the file system allows.

    The previous folder is first renamed to ``<target>.old`` and deleted once the new one is in place:
    a process killed between the two renames leaves it there, and :func:`recover_folder` restores it.

    :param tmp: the finished folder (e.g. from :func:`temp_folder`)
    :param target: its final place
    """
    tmp, target = Path(tmp), Path(target)
    old = target.with_name(target.name + OLD_SUFFIX)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(target: str | Path, complete: str = STATE) -> None:
    """Finish what a process killed inside :func:`publish_folder` left undone, and drop stale temporary folders.

    Between moving the previous folder to ``<target>.old`` and the new one into place there is no
    ``target``; when ``.old`` is complete (holds ``complete``) it is moved back.

    :param target: the published folder
    :param complete: the file whose presence marks a complete folder
    """
    target = Path(target)
    old = target.with_name(target.name + OLD_SUFFIX)
    if not target.exists() and (old / complete).exists():
        os.replace(old, target)
    if target.parent.is_dir():
        for stale in target.parent.glob(f"{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def publish_run_result(checkpoint: str | Path, run_dir: str | Path) -> None:
    """Publish a copy of the final checkpoint's :data:`RESULT_FILES` at the run's root, ``agent.zip`` last.

    The root also holds ``config.json``, ``tb/`` and the checkpoints, so it cannot be swapped whole: the
    files are copied into a staging folder first and then each is moved into place. Since ``agent.zip``
    is moved last, :func:`is_finished_run` is never true of a half-published result.

    :param checkpoint: the final checkpoint folder
    :param run_dir: the run folder
    """
    run_dir = Path(run_dir)
    staging = run_dir / RESULT_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint, staging)
    for name in RESULT_FILES:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        source = staging / name
        if source.exists():
            source.rename(target)
    shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------- the agent's pickle
def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes.

    :param path: the file
    :return: 64 hex digits
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_agent_zip(path: str | Path, trust_pickle: bool = False) -> None:
    """Check that an ``agent.zip`` is the file its run wrote, before it is unpickled.

    ``agent.zip`` holds pickled Python objects: unpickling a replaced file could run any code. Its
    SHA-256 must equal ``agent_sha256`` in the ``state.json`` beside it (recorded when it was written).

    :param path: the ``agent.zip``
    :param trust_pickle: skip the check (files of older versions record no hash, and files saved outside
        a run have no ``state.json``); only for files you made yourself
    :raises CheckpointError: when the hash is missing or differs
    """
    if trust_pickle:
        return
    path = Path(path)
    folder = path.parent
    try:
        state = json.loads((folder / STATE).read_text())
        recorded = state.get("agent_sha256") if isinstance(state, dict) else None
    except (OSError, ValueError, UnicodeDecodeError):
        recorded = None
    if not recorded:
        raise CheckpointError(
            f"checkpoint '{folder}' records no SHA-256 of its {path.name} (written by an older version), and {path.name} is a "
            "pickle that can run code when loaded: if you made this run yourself, add --trust_agent_pickle true to resume it"
        )
    if file_sha256(path) != recorded:
        raise CheckpointError(
            f"'{path}' is not the file this run wrote (its SHA-256 differs from the one in state.json): "
            "it was replaced or damaged, and it is a pickle that can run code, so it is not loaded; restore the original "
            "or start over with another --run_name"
        )


# ---------------------------------------------------------------------------- reading
def read_json_object(path: str | Path) -> dict[str, Any]:
    """Read a JSON object (a run's ``config.json`` or ``state.json``), with a clear error when it is unreadable.

    :param path: the file
    :return: the object
    :raises CheckpointError: when the file is unreadable or not a JSON object
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"'{path}' is not a readable JSON file (corrupt?): {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' must hold a JSON object")
    return data
