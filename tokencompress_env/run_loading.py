"""How a run folder is read for inference and evaluation: :func:`load_run`, the one reader.

The layout it reads is :mod:`tokencompress_env.run_folder`'s. This module sits above the ``agents``
package (it loads the safe policy artifact of :mod:`agents.artifact`), while :mod:`~tokencompress_env.run_folder`
sits below it (the agents package uses its file names and checks): keeping the two apart keeps the
import graph free of cycles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokencompress_env.errors import CheckpointError, ReconstructorLoadError, TokenCompressError
from tokencompress_env.reconstructor import Reconstructor, resolve_device
from tokencompress_env.run_folder import (
    AGENT_ZIP,
    CONFIG,
    POLICY_SPEC,
    POLICY_WEIGHTS,
    RECONSTRUCTOR,
    REFERENCE_RECONSTRUCTOR,
    latest_checkpoint,
    read_json_object,
    run_dir_of,
)


def _artifact_module() -> Any:
    """The agents package's safe policy artifact module (:mod:`agents.artifact`), imported on use.

    :return: the module
    :raises TokenCompressError: when the agents package cannot be imported
    """
    try:
        from agents import artifact
    except ImportError as exc:
        raise TokenCompressError(
            f"cannot import the agents package ({exc}): reinstall the project with 'pip install -e .' from its root"
        ) from None
    return artifact


@dataclass
class RunBundle:
    """What a run (or checkpoint) folder provides, read by :func:`load_run`.

    :param run_dir: the folder read (a run folder or its ``checkpoints/latest``)
    :param config: its ``config.json`` (empty when missing and not required)
    :param reference_dir: the run's frozen reference reconstructor folder, ``None`` when missing
    :param device: where the models go
    :param joint: the jointly trained reconstructor (``reconstructor/``), ``None`` when missing or not loaded
    :param agent: the trained policy (:class:`agents.artifact.PolicyArtifact`), ``None`` when missing or not loaded
    :param problems: why a part is missing (shown to the user)
    """

    run_dir: Path
    config: dict[str, Any]
    reference_dir: Path | None
    device: torch.device
    joint: Reconstructor | None = None
    agent: Any = None
    problems: list[str] = field(default_factory=list)
    _reference: Reconstructor | None = field(default=None, repr=False)

    @property
    def reference(self) -> Reconstructor:
        """The run's frozen reference reconstructor (loaded on first use).

        :return: the reconstructor
        :raises ReconstructorLoadError: when the run has no ``reference_reconstructor/``
        """
        if self._reference is None:
            if self.reference_dir is None:
                raise ReconstructorLoadError(f"this run folder has no {REFERENCE_RECONSTRUCTOR}/")
            self._reference = Reconstructor.from_pretrained(self.reference_dir, device=self.device)
        return self._reference


def _reference_dir(root: Path) -> Path | None:
    """The reference reconstructor folder of a run or checkpoint folder.

    :param root: a run folder or its ``checkpoints/latest``
    :return: the folder, ``None`` when missing
    """
    for folder in (root, run_dir_of(root)):
        if (folder / REFERENCE_RECONSTRUCTOR).is_dir():
            return folder / REFERENCE_RECONSTRUCTOR
    return None


def load_run(
    run_dir: str | Path,
    device: str | torch.device = "auto",
    *,
    strict: bool = True,
    load_agent: bool = True,
    load_reference: bool = False,
) -> RunBundle:
    """Read a run folder written by ``experiments.train_ppo`` (or its ``checkpoints/latest`` folder).

    Nothing is unpickled: the policy comes from ``policy.safetensors`` + ``policy.json``
    (:func:`agents.artifact.load_policy_artifact`), the reconstructors from safetensors, and ``agent.zip``
    is only looked at to tell a run of an older version.

    * ``strict=True`` (to compress): ``config.json``, the policy (when ``load_agent``) and
      ``reconstructor/`` are required; a missing one raises, naming every missing file (and the
      checkpoint to load instead when training has not finished).
    * ``strict=False`` (to evaluate): the reference reconstructor is required, every other part that is
      missing or unloadable is left ``None`` and said in ``problems``.

    :param run_dir: the run folder (or its ``checkpoints/latest``)
    :param device: ``"auto"`` (CUDA, MPS or CPU), ``"cpu"``, ``"cuda"``, ...
    :param strict: require the parts of a finished run (see above)
    :param load_agent: load the policy (not needed for baselines)
    :param load_reference: load the reference reconstructor now (else on first use of ``reference``)
    :return: the bundle
    :raises CheckpointError: when the folder, or a part it requires, is missing or corrupt (one line)
    """
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"run folder '{run_dir}' does not exist: pass a folder written by experiments.train_ppo")
    artifact = _artifact_module() if load_agent else None
    problems: list[str] = []
    if strict:
        required = [CONFIG, *((POLICY_WEIGHTS, POLICY_SPEC) if load_agent else ()), RECONSTRUCTOR]
        missing = [name for name in required if not (root / name).exists()]
        if missing:
            policy_files = {POLICY_WEIGHTS, POLICY_SPEC}
            if artifact is not None and set(missing) <= policy_files and (root / AGENT_ZIP).exists():  # an older version's run
                raise CheckpointError(artifact.missing_artifact_message(root))
            hint = ""
            if artifact is not None and policy_files & set(missing) and artifact.has_policy_artifact(latest_checkpoint(root)):
                hint = f"; training has not finished, but a checkpoint exists: load '{latest_checkpoint(root)}'"
            raise CheckpointError(f"run folder '{root}' is incomplete: missing {', '.join(missing)}{hint}")
    config: dict[str, Any] = {}
    if (root / CONFIG).is_file():
        try:
            config = read_json_object(root / CONFIG)
        except CheckpointError as exc:
            if strict:
                raise
            problems.append(f"config.json is not valid JSON ({exc})")
    else:
        problems.append("no config.json")
    reference_dir = _reference_dir(root)
    if reference_dir is None and not strict:
        raise CheckpointError(f"run folder '{root}' holds no reference_reconstructor/: is it a run written by experiments.train_ppo?")
    dev = resolve_device(device)
    bundle = RunBundle(root, config, reference_dir, dev, problems=problems)
    if load_reference:
        _ = bundle.reference
    if (root / RECONSTRUCTOR).is_dir():
        try:
            bundle.joint = Reconstructor.from_pretrained(root / RECONSTRUCTOR, device=dev)
        except ReconstructorLoadError as exc:
            if strict:
                raise CheckpointError(f"the run's reconstructor/ cannot be loaded: {exc}") from None
            problems.append(f"joint reconstructor not loaded: {exc}")
    else:
        problems.append("no reconstructor/ (the run has not finished?): scoring with the reference reconstructor only")
    if artifact is not None:
        if artifact.has_policy_artifact(root):
            try:
                bundle.agent = artifact.load_policy_artifact(root, dev)
            except CheckpointError as exc:
                if strict:
                    raise
                problems.append(f"policy not loaded: {exc}")
        elif (root / AGENT_ZIP).is_file():
            problems.append(artifact.missing_artifact_message(root))
        else:
            problems.append(f"no {POLICY_WEIGHTS}")
    return bundle
