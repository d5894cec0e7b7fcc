"""Reliability (issue 6): bad input, crash safety, safe loading and determinism.

* Bad input: every user mistake listed in the issue, table-driven, through the API (a
  :class:`~tokencompress_env.errors.TokenCompressError` naming the problem) and through the command line
  (one ``error:`` line, exit code 2, no traceback, nothing written half-way). The whole table runs
  through each script's real entry point in-process (the same ``parse_config`` + ``cli_main`` path as
  ``python -m``); a representative subset also runs as real subprocesses, since each costs seconds of
  imports on a 2-core machine.
* Crash safety: SIGKILL mid-training leaves a loadable checkpoint and ``--resume true`` continues the
  step counter; SIGINT saves a checkpoint and exits with 130; a run killed inside the checkpoint swap is
  recovered.
* Safe loading: a source scan for ``trust_remote_code``, ``torch.load`` without ``weights_only=True``,
  pickle, and model weights read without ``use_safetensors=True``.
* Determinism: two evaluation processes with the same seed and config give the same numbers.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from callbacks.checkpoint import load_checkpoint_state, recover_checkpoint
from experiments import compress as compress_script
from experiments import evaluate as evaluate_script
from experiments import prepare_data as prepare_script
from experiments import pretrain_reconstructor as pretrain_script
from experiments import train_ppo as train_script
from experiments.config import build_config, cli_main
from experiments.evaluate import file_windows
from experiments.train_ppo import TrainConfig, train
from tokencompress_env.baselines import mask_budget
from tokencompress_env.compressor import CompressionResult, Compressor
from tokencompress_env.data import CorpusSpec, load_documents, prepare_corpus
from tokencompress_env.env import TokenMaskEnv
from tokencompress_env.errors import CheckpointError, ConfigError, DataSourceError, InputError, ReconstructorLoadError, TokenCompressError
from tokencompress_env.reconstructor import Reconstructor

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "experiments" / "configs" / "dev" / "debug.json"
DEBUG_CONFIG = {k: v for k, v in json.loads(DEBUG.read_text()).items() if not k.startswith("_")}
#: Hub names that no cache holds (a real name such as "gpt2" could be cached on a developer's machine).
NO_SUCH_MODEL = "tokencompress-no-such-model"
NO_SUCH_DATASET = "tokencompress_no_such_dataset"
#: Tokens in the "very long text" input.
LONG_TOKENS = 100_000


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Two shared cores: oversubscribed torch threads make everything several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _subprocess_env(tc_home: Path, hf_home: Path | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "TOKENCOMPRESS_HOME": str(tc_home),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if hf_home is not None:  # an empty hub cache: real hub names cannot be served from a local cache
        env["HF_HOME"] = str(hf_home)
    return env


def _run_module(
    module: str, args: list[str], tc_home: Path, timeout: int = 180, hf_home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=_subprocess_env(tc_home, hf_home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _error_line(stderr: str) -> str:
    """The single ``error:`` line of a failed command (asserting there is exactly one and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class Paths:
    """Files and folders the bad-input table refers to (as ``{name}`` placeholders)."""

    inputs: Path
    runs: Path
    out: Path
    recon: Path
    values: dict[str, str] = field(default_factory=dict)

    def fill(self, args: list[str]) -> list[str]:
        return [a.format(**self.values) for a in args]


def _long_text(tokenizer: Any, tokens: int) -> str:
    """Prose of at least ``tokens`` tokens in ``tokenizer`` (paragraphs of varied sentences)."""
    phrase = "the reconstructor recovers dropped tokens from context while the agent learns which ones carry little information"
    words = phrase.split(" ")
    rng = np.random.default_rng(0)
    paragraphs: list[str] = []
    count = 0
    while count < tokens:
        sentence = " ".join(rng.choice(words, size=int(rng.integers(8, 20)))).capitalize() + "."
        paragraph = " ".join([sentence] * 6)
        paragraphs.append(paragraph)
        count += len(tokenizer.encode(paragraph, add_special_tokens=False))
    return "\n\n".join(paragraphs)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, test_reconstructor: Reconstructor) -> Path:
    """Bad (and very long) input files."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "empty.txt").write_text("")
    (folder / "whitespace.txt").write_text("   \n\n\t  \n ")
    (folder / "short.txt").write_text("Hello world, this is far too short.")
    long_text = _long_text(test_reconstructor.tokenizer, LONG_TOKENS)
    (folder / "long.txt").write_text(long_text)
    raw = long_text[:20_000].encode() + b" caf\xe9 \xff\xfe broken bytes " + long_text[20_000:40_000].encode()
    (folder / "bad_utf8.txt").write_bytes(raw)
    (folder / "typo.json").write_text(json.dumps({**DEBUG_CONFIG, "n_env": 2}))
    (folder / "broken.json").write_text('{"max_length": 64')
    return folder


def _corrupt(run: Path, kind: str) -> None:
    """Damage a finished run's latest checkpoint in one of the ways a crash or a disk can."""
    latest = run / "checkpoints" / "latest"
    if kind == "missing_state":
        (latest / "state.json").unlink()
    elif kind == "truncated_agent":
        data = (latest / "agent.zip").read_bytes()
        (latest / "agent.zip").write_bytes(data[: len(data) // 3])
    elif kind == "garbage_weights":
        (latest / "reconstructor" / "model.safetensors").write_bytes(os.urandom(4096))
    elif kind == "garbage_state":
        (latest / "state.json").write_text("{not json")
    elif kind == "truncated_optimizer":
        data = (latest / "reconstructor_optimizer.pt").read_bytes()
        (latest / "reconstructor_optimizer.pt").write_bytes(data[: len(data) // 2])
    elif kind == "partial_run":  # a run folder with a config but nothing else
        for child in run.iterdir():
            if child.name != "config.json":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    elif kind == "garbage_reference":
        (run / "reference_reconstructor" / "model.safetensors").write_bytes(b"\x00" * 100)
    elif kind == "reference_only":
        for name in ("agent.zip", "policy.safetensors", "policy.json", "reconstructor", "checkpoints"):
            target = run / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    elif kind == "unfinished":  # killed before the end: a checkpoint but no final artifacts
        for name in ("agent.zip", "policy.safetensors", "policy.json"):
            (run / name).unlink()
        shutil.rmtree(run / "reconstructor")
    elif kind == "truncated_final_policy":
        data = (run / "policy.safetensors").read_bytes()
        (run / "policy.safetensors").write_bytes(data[: len(data) // 3])
    elif kind == "old_version_run":  # written before the safe artifact: the policy only in the pickle agent.zip
        for folder in (run, run / "checkpoints" / "latest"):
            for name in ("policy.safetensors", "policy.json"):
                (folder / name).unlink()
            state = json.loads((folder / "state.json").read_text())
            del state["agent_sha256"]
            (folder / "state.json").write_text(json.dumps(state))
    elif kind == "swapped_agent":  # another agent.zip put in the checkpoint (e.g. a crafted pickle)
        (run / "checkpoints" / "latest" / "agent.zip").write_bytes((run / "agent.zip").read_bytes() + b"\0")
    elif kind == "garbage_final_weights":
        (run / "reconstructor" / "model.safetensors").write_bytes(os.urandom(4096))
    else:
        raise ValueError(kind)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, test_reconstructor_dir: Path) -> Path:
    """A complete tiny run (one rollout) whose copies the checkpoint cases damage."""
    runs = tmp_path_factory.mktemp("finished")
    train(TrainConfig(**{**DEBUG_CONFIG, "runs_dir": str(runs), "total_timesteps": 64, "save_freq": 64, "tensorboard": False}))
    return runs / "debug"


@pytest.fixture()
def paths(tmp_path: Path, inputs: Path, finished_run: Path, test_reconstructor_dir: Path) -> Paths:
    """Per-test folders and one damaged copy of the finished run per checkpoint kind."""
    runs = tmp_path / "runs"
    runs.mkdir()
    values = {
        "inputs": str(inputs),
        "runs": str(runs),
        "out": str(tmp_path / "out"),
        "recon": str(test_reconstructor_dir),
        "finished": str(finished_run),
    }
    return Paths(inputs, runs, tmp_path / "out", test_reconstructor_dir, values)


def _damaged_run(paths: Paths, finished_run: Path, kind: str) -> str:
    """Copy the finished run to ``<runs>/<kind>`` and damage it; returns the run name."""
    shutil.copytree(finished_run, paths.runs / kind)
    _corrupt(paths.runs / kind, kind)
    return kind


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    """One bad input for one script.

    :param id: test id
    :param script: ``train_ppo``, ``evaluate``, ``prepare_data`` or ``pretrain_reconstructor``
    :param args: command-line arguments with ``{inputs}``, ``{runs}``, ``{out}``, ``{recon}`` placeholders
    :param expect: fragments the one-line message must contain
    :param damaged: a checkpoint damage (see :func:`_corrupt`) applied to a copy of a finished run
    :param subprocess: also run it as a real ``python -m`` subprocess
    :param cpu_only: the case is an error only on a machine without a CUDA GPU (``--device cuda``)
    """

    id: str
    script: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    damaged: str | None = None
    subprocess: bool = False
    cpu_only: bool = False


TRAIN = ("--config", str(DEBUG), "--runs_dir", "{runs}", "--run_name", "new")
EVAL = ("--reconstructor", "{recon}", "--out", "{out}", "--bootstrap", "10", "--max_windows", "8")
PREP = ("--reconstructor", "{recon}", "--output_dir", "{out}", "--max_length", "64")
PRETRAIN = ("--preset", "test", "--output_dir", "{out}", "--steps", "2", "--tensorboard_log", "none", "--progress_bar", "false")

CASES = [
    # ---- unknown or mistyped config keys: the closest valid key and the list of all
    Case(
        "train-typo-cli",
        "train_ppo",
        (*TRAIN, "--total_timestep", "10"),
        ("did you mean 'total_timesteps'", "valid keys: activation_fn, algo,"),
    ),
    Case(
        "train-typo-file",
        "train_ppo",
        ("--config", "{inputs}/typo.json", "--runs_dir", "{runs}"),
        ("'n_env'", "did you mean 'n_envs'", "valid keys:"),
        subprocess=True,
    ),
    Case("train-wrong-type", "train_ppo", (*TRAIN, "--n_envs", "four"), ("'n_envs' expects int", "'four'")),
    Case("eval-typo", "evaluate", (*EVAL, "--methdos", "random"), ("did you mean 'methods'", "valid keys:")),
    Case("prep-typo", "prepare_data", (*PREP, "--max_lenght", "64"), ("did you mean 'max_length'", "valid keys:")),
    Case("pretrain-typo", "pretrain_reconstructor", (*PRETRAIN, "--learning_rate", "1e-3"), ("unknown key 'learning_rate'", "valid keys:")),
    Case("config-missing", "prepare_data", ("--config", "{inputs}/nope.json"), ("config file", "does not exist")),
    Case("config-not-json", "prepare_data", ("--config", "{inputs}/broken.json"), ("is not valid JSON",)),
    # ---- mask rates outside [0, 1) or NaN
    Case("train-rate-1", "train_ppo", (*TRAIN, "--mask_rate_max", "1.0"), ("mask_rate_max < 1",)),
    Case("train-rate-negative", "train_ppo", (*TRAIN, "--mask_rate_min", "-0.1"), ("0 <= mask_rate_min",)),
    Case(
        "train-rate-inverted",
        "train_ppo",
        (*TRAIN, "--mask_rate_min", "0.7", "--mask_rate_max", "0.3"),
        ("mask_rate_min <= mask_rate_max",),
    ),
    Case("train-scoring-dtype", "train_ppo", (*TRAIN, "--scoring_dtype", "fp8"), ("scoring_dtype must be one of", "bfloat16", "'fp8'")),
    Case("train-rate-nan", "train_ppo", (*TRAIN, "--mask_rate_min", "nan"), ("'mask_rate_min' expects float", "'nan'")),
    Case("train-rate-inf", "train_ppo", (*TRAIN, "--mask_rate_max", "inf"), ("mask_rate_max < 1",)),
    Case("eval-rate-high", "evaluate", (*EVAL, "--mask_rates", "0.5", "1.5"), ("mask_rates must be", "[0, 1]", "1.5")),
    Case("eval-rate-negative", "evaluate", (*EVAL, "--mask_rates", "-0.2"), ("mask_rates must be",)),
    Case("eval-rate-nan", "evaluate", (*EVAL, "--mask_rates", "nan"), ("'mask_rates' expects float",)),
    Case("pretrain-rate-1", "pretrain_reconstructor", (*PRETRAIN, "--max_mask_rate", "1.0"), ("max_mask_rate < 1",)),
    Case("pretrain-rate-nan", "pretrain_reconstructor", (*PRETRAIN, "--min_mask_rate", "NaN"), ("'min_mask_rate' expects float",)),
    # ---- seq_len larger than the reconstructor's context
    Case(
        "train-seq-len",
        "train_ppo",
        (*TRAIN, "--seq_len", "1024"),
        ("seq_len 1024 exceeds the reconstructor's context of 255", "--seq_len 240"),
        subprocess=True,
    ),
    Case("eval-seq-len", "evaluate", (*EVAL, "--seq_len", "4096"), ("seq_len 4096 exceeds the reconstructor's context", "--seq_len 255")),
    Case("prep-seq-len", "prepare_data", (*PREP, "--max_length", "1000"), ("max_length 1000 exceeds", "--max_length 255")),
    Case("pretrain-seq-len", "pretrain_reconstructor", (*PRETRAIN, "--seq_len", "1000"), ("seq_len must be in [2, 255]",)),
    # ---- a hub model or dataset name while offline
    Case("train-hub-model", "train_ppo", (*TRAIN, "--reconstructor", NO_SUCH_MODEL), (NO_SUCH_MODEL, "Offline?", "'tiny'")),
    Case(
        "train-hub-dataset",
        "train_ppo",
        (*TRAIN, "--corpus", NO_SUCH_DATASET),
        (NO_SUCH_DATASET, "Offline?", "'embedded'"),
    ),
    Case("eval-hub-model", "evaluate", ("--reconstructor", NO_SUCH_MODEL, "--out", "{out}"), ("Offline?",)),
    Case("prep-hub-dataset", "prepare_data", (*PREP, "--dataset_name", NO_SUCH_DATASET), ("Offline?",)),
    Case("prep-hub-dataset-prefixed", "prepare_data", (*PREP, "--dataset_name", f"hf:{NO_SUCH_DATASET}"), ("Offline?",)),
    Case("prep-hub-model", "prepare_data", ("--reconstructor", NO_SUCH_MODEL, "--output_dir", "{out}"), ("Offline?",)),
    Case("pretrain-hub-dataset", "pretrain_reconstructor", (*PRETRAIN, "--data", NO_SUCH_DATASET), ("Offline?",)),
    Case("eval-missing-reconstructor-dir", "evaluate", ("--reconstructor", "{inputs}/no_such_dir", "--out", "{out}"), ("does not exist",)),
    # ---- empty, whitespace-only and too-short text
    Case("train-empty-corpus", "train_ppo", (*TRAIN, "--corpus", "{inputs}/empty.txt"), ("holds no text",)),
    Case("train-whitespace-corpus", "train_ppo", (*TRAIN, "--corpus", "{inputs}/whitespace.txt"), ("holds no text",)),
    Case("train-short-corpus", "train_ppo", (*TRAIN, "--corpus", "{inputs}/short.txt"), ("shorter than one 64-token window",)),
    Case("train-missing-corpus", "train_ppo", (*TRAIN, "--corpus", "{inputs}/nope.txt"), ("does not exist",)),
    Case("eval-empty", "evaluate", (*EVAL, "--data", "{inputs}/empty.txt"), ("holds no text",)),
    Case("eval-whitespace", "evaluate", (*EVAL, "--data", "{inputs}/whitespace.txt"), ("holds no text",)),
    Case(
        "eval-short",
        "evaluate",
        (*EVAL, "--data", "{inputs}/short.txt"),
        ("shorter than one 64-token window", "--seq_len"),
        subprocess=True,
    ),
    Case("prep-empty", "prepare_data", (*PREP, "--dataset_name", "{inputs}/empty.txt"), ("holds no text",)),
    Case("prep-short", "prepare_data", (*PREP, "--dataset_name", "{inputs}/short.txt"), ("shorter than one 64-token window",)),
    Case(
        "pretrain-short",
        "pretrain_reconstructor",
        (*PRETRAIN, "--data", "{inputs}/short.txt", "--seq_len", "64"),
        ("shorter than one 64-token window",),
    ),
    # ---- missing or partial run directories
    Case("resume-missing-run", "train_ppo", (*TRAIN, "--resume", "true"), ("cannot resume", "run without --resume")),
    Case(
        "resume-partial-checkpoint",
        "train_ppo",
        (*TRAIN[:-1], "missing_state", "--resume", "true"),
        ("incomplete (missing state.json)", "--run_name"),
        damaged="missing_state",
    ),
    Case(
        "resume-partial-run",
        "train_ppo",
        (*TRAIN[:-1], "partial_run", "--resume", "true"),
        ("cannot resume", "does not exist"),
        damaged="partial_run",
    ),
    Case("eval-missing-run", "evaluate", ("--run", "{runs}/nope", "--out", "{out}"), ("run folder", "does not exist")),
    Case(
        "eval-partial-run",
        "evaluate",
        ("--run", "{runs}/partial_run", "--out", "{out}"),
        ("holds no reference_reconstructor",),
        damaged="partial_run",
    ),
    Case(
        "eval-unfinished-run",
        "evaluate",
        ("--run", "{runs}/reference_only", "--out", "{out}", "--max_windows", "4"),
        ("cannot evaluate 'policy'", "no policy.safetensors", "--resume true"),
        damaged="reference_only",
    ),
    # ---- a corrupt checkpoint
    Case(
        "resume-truncated-agent",
        "train_ppo",
        (*TRAIN[:-1], "truncated_agent", "--resume", "true"),
        ("agent.zip' is not the file this run wrote",),
        damaged="truncated_agent",
        subprocess=True,
    ),
    Case(
        "resume-truncated-agent-trusted",
        "train_ppo",
        (*TRAIN[:-1], "truncated_agent", "--resume", "true", "--trust_agent_pickle", "true"),
        ("agent.zip' does not load as a ppo agent",),
        damaged="truncated_agent",
    ),
    Case("train-distill-save-freq", "train_ppo", (*TRAIN, "--distill_save_freq", "-1"), ("distill_save_freq must be >= 0",)),
    Case(
        "resume-garbage-weights",
        "train_ppo",
        (*TRAIN[:-1], "garbage_weights", "--resume", "true"),
        ("cannot resume from", "corrupt or partial"),
        damaged="garbage_weights",
    ),
    Case(
        "resume-garbage-state",
        "train_ppo",
        (*TRAIN[:-1], "garbage_state", "--resume", "true"),
        ("unreadable state.json",),
        damaged="garbage_state",
    ),
    Case(
        "resume-truncated-optimizer",
        "train_ppo",
        (*TRAIN[:-1], "truncated_optimizer", "--resume", "true"),
        ("reconstructor_optimizer.pt",),
        damaged="truncated_optimizer",
    ),
    Case(
        "eval-garbage-reference",
        "evaluate",
        ("--run", "{runs}/garbage_reference", "--out", "{out}"),
        ("corrupt or partial",),
        damaged="garbage_reference",
    ),
    Case(
        "train-existing-run",
        "train_ppo",
        (*TRAIN[:-1], "truncated_agent"),
        ("already holds a run", "--resume true"),
        damaged="truncated_agent",
    ),
]

COMPRESS = ("--run", "{finished}")
CASES += [
    # ---- compress(): the CLI reads a file (or stdin) and loads a finished run
    Case("compress-empty", "compress", (*COMPRESS, "{inputs}/empty.txt"), ("empty or only whitespace",)),
    Case("compress-whitespace", "compress", (*COMPRESS, "{inputs}/whitespace.txt"), ("empty or only whitespace",)),
    Case("compress-missing-input", "compress", (*COMPRESS, "{inputs}/nope.txt"), ("does not exist",)),
    Case("compress-rate-1", "compress", (*COMPRESS, "--mask_rate", "1.0", "{inputs}/short.txt"), ("mask_rate must be in [0, 1)",)),
    Case("compress-rate-negative", "compress", (*COMPRESS, "--mask_rate", "-0.1", "{inputs}/short.txt"), ("mask_rate must be in [0, 1)",)),
    Case(
        "compress-rate-nan",
        "compress",
        (*COMPRESS, "--mask_rate", "nan", "{inputs}/short.txt"),
        ("mask_rate must be in [0, 1)", "nan"),
        subprocess=True,
    ),
    Case("compress-rate-inf", "compress", (*COMPRESS, "--mask_rate", "inf", "{inputs}/short.txt"), ("mask_rate must be in [0, 1)",)),
    Case("compress-rate-text", "compress", (*COMPRESS, "--mask_rate", "half", "{inputs}/short.txt"), ("invalid float value", "--help")),
    Case(
        "compress-target-too-many",
        "compress",
        (*COMPRESS, "--target_tokens", "100000", "{inputs}/short.txt"),
        ("target_tokens must be in [1,",),
    ),
    Case("compress-typo", "compress", (*COMPRESS, "--mask_rat", "0.4", "{inputs}/short.txt"), ("unrecognized arguments: --mask_rat",)),
    Case("compress-missing-run", "compress", ("--run", "{runs}/nope", "{inputs}/short.txt"), ("does not exist", "experiments.train_ppo")),
    Case(
        "compress-partial-run",
        "compress",
        ("--run", "{runs}/partial_run", "{inputs}/short.txt"),
        ("incomplete: missing policy.safetensors, policy.json, reconstructor",),
        damaged="partial_run",
    ),
    Case(
        "compress-unfinished-run",
        "compress",
        ("--run", "{runs}/unfinished", "{inputs}/short.txt"),
        ("incomplete", "checkpoints/latest"),
        damaged="unfinished",
    ),
    Case(
        "compress-truncated-policy",
        "compress",
        ("--run", "{runs}/truncated_final_policy", "{inputs}/short.txt"),
        ("policy.safetensors' (corrupt or partial?)",),
        damaged="truncated_final_policy",
    ),
    # ---- a run folder that could run code (issue 14): agent.zip is never unpickled to compress or evaluate
    Case(
        "compress-old-version-run",
        "compress",
        ("--run", "{runs}/old_version_run", "{inputs}/short.txt"),
        ("has no policy.safetensors and policy.json", "--resume true --trust_agent_pickle true"),
        damaged="old_version_run",
    ),
    Case(
        "eval-old-version-run",
        "evaluate",
        ("--run", "{runs}/old_version_run", "--out", "{out}", "--max_windows", "4"),
        ("cannot evaluate 'policy'", "has no policy.safetensors", "--trust_agent_pickle true"),
        damaged="old_version_run",
    ),
    Case(
        "resume-old-version-run",
        "train_ppo",
        (*TRAIN[:-1], "old_version_run", "--resume", "true"),
        ("records no SHA-256 of its agent.zip", "--trust_agent_pickle true"),
        damaged="old_version_run",
    ),
    Case(
        "resume-swapped-agent",
        "train_ppo",
        (*TRAIN[:-1], "swapped_agent", "--resume", "true"),
        ("is not the file this run wrote", "SHA-256"),
        damaged="swapped_agent",
        subprocess=True,
    ),
    Case(
        "compress-garbage-weights",
        "compress",
        ("--run", "{runs}/garbage_final_weights", "{inputs}/short.txt"),
        ("cannot be loaded",),
        damaged="garbage_final_weights",
    ),
]

# ---- issue 14: every case one line, exit 2, nothing left behind, validated before any work
CASES += [
    Case(
        "train-device-cuda",
        "train_ppo",
        (*TRAIN, "--device", "cuda"),
        ("device 'cuda' is not available on this machine", "--device cpu"),
        cpu_only=True,
        subprocess=True,
    ),
    Case("train-device-mps", "train_ppo", (*TRAIN, "--device", "mps"), ("device 'mps' is not available", "--device cpu or auto")),
    Case("train-device-banana", "train_ppo", (*TRAIN, "--device", "banana"), ("unknown device 'banana'", "use auto, cpu, cuda")),
    Case("train-chunk-size-0", "train_ppo", (*TRAIN, "--chunk_size", "0"), ("chunk_size must be a positive integer, got 0",)),
    Case("train-batch-size-negative", "train_ppo", (*TRAIN, "--batch_size", "-1"), ("batch_size must be a positive integer, got -1",)),
    Case(
        "train-reconstructor-batch-size-0",
        "train_ppo",
        (*TRAIN, "--reconstructor_batch_size", "0"),
        ("reconstructor_batch_size must be a positive integer, got 0",),
        subprocess=True,
    ),
    Case("train-embed-dim-0", "train_ppo", (*TRAIN, "--embed_dim", "0"), ("embed_dim must be a positive integer, got 0",)),
    Case("train-grad-accum-0", "train_ppo", (*TRAIN, "--reconstructor_grad_accum", "0"), ("reconstructor_grad_accum must be a positive",)),
    Case("train-gamma", "train_ppo", (*TRAIN, "--gamma", "1.5"), ("gamma must be in [0, 1], got 1.5",)),
    Case("train-run-name-empty", "train_ppo", (*TRAIN, "--run_name", ""), ("run_name must name a folder inside --runs_dir", "''")),
    Case("train-runs-dir-file", "train_ppo", (*TRAIN, "--runs_dir", "{inputs}/short.txt"), ("--runs_dir", "is a file, not a folder")),
    Case(
        "train-run-name-file",
        "train_ppo",
        (*TRAIN, "--runs_dir", "{inputs}", "--run_name", "short.txt"),
        ("--run_name", "short.txt' is a file, not a folder"),
    ),
    Case("train-units", "train_ppo", (*TRAIN, "--units", "token"), ("units must be one of 'piece', 'word'", "'token'")),
    Case(
        "resume-other-options",
        "train_ppo",
        (*TRAIN[:-1], "missing_state", "--resume", "true", "--seq_len", "32"),
        ("cannot resume", "seq_len=32 (the run has 64)", "reads the run's config.json", "leave these options out"),
        damaged="missing_state",
    ),
    Case(
        "eval-device-cuda",
        "evaluate",
        (*EVAL, "--device", "cuda"),
        ("device 'cuda' is not available on this machine", "--device cpu"),
        cpu_only=True,
    ),
    Case("eval-device-banana", "evaluate", (*EVAL, "--device", "banana"), ("unknown device 'banana'",)),
    Case("eval-out-file", "evaluate", (*EVAL[:2], "--out", "{inputs}/short.txt"), ("--out", "is a file, not a folder")),
    Case("eval-out-under-file", "evaluate", (*EVAL[:2], "--out", "{inputs}/short.txt/eval"), ("--out", "cannot be created", "is a file")),
    Case("eval-units", "evaluate", (*EVAL, "--units", "letters"), ("units must be one of",)),
    Case(
        "eval-run-seq-len",
        "evaluate",
        ("--run", "{finished}", "--out", "{out}", "--seq_len", "32"),
        ("trained on 64-token windows, not 32", "leave out --seq_len", "--seq_len 64", "leave 'policy' out of --methods"),
        subprocess=True,
    ),
    Case(
        "compress-device-cuda",
        "compress",
        (*COMPRESS, "--device", "cuda", "{inputs}/short.txt"),
        ("device 'cuda' is not available",),
        cpu_only=True,
    ),
    Case("compress-device-mps", "compress", (*COMPRESS, "--device", "mps", "{inputs}/short.txt"), ("device 'mps' is not available",)),
    Case(
        "compress-device-banana",
        "compress",
        (*COMPRESS, "--device", "banana", "{inputs}/short.txt"),
        ("unknown device 'banana'",),
        subprocess=True,
    ),
    Case(
        "compress-rate-removes-all",
        "compress",
        (*COMPRESS, "--mask_rate", "0.9999999", "{inputs}/short.txt"),
        ("mask_rate 0.9999999 would remove every token of the text", "use a mask_rate in [0,"),
        subprocess=True,
    ),
    Case("compress-target-0", "compress", (*COMPRESS, "--target_tokens", "0", "{inputs}/short.txt"), ("target_tokens must be in [1,",)),
    Case("compress-units", "compress", (*COMPRESS, "--units", "token", "{inputs}/short.txt"), ("invalid choice: 'token'",)),
]

MAINS: dict[str, Callable[[list[str]], int]] = {
    "compress": compress_script.main,
    "train_ppo": train_script.main,
    "evaluate": cli_main(evaluate_script.main),
    "prepare_data": prepare_script.main,
    "pretrain_reconstructor": pretrain_script.main,
}


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _check_nothing_written(case: Case, paths: Paths, runs_before: set[str]) -> None:
    """A failed command leaves no output folder, no new run folder and no half-written checkpoint."""
    assert not paths.out.exists(), f"{case.id} left {paths.out}"
    assert not paths.out.with_name(paths.out.name + ".partial").exists()
    assert _snapshot(paths.runs) == runs_before, f"{case.id} changed the runs folder"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_cli(case: Case, paths: Paths, finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if case.cpu_only and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    if case.damaged:
        _damaged_run(paths, finished_run, case.damaged)
    before = _snapshot(paths.runs)
    code = MAINS[case.script](paths.fill(list(case.args)))
    stderr = capsys.readouterr().err
    assert code == 2, stderr[-3000:]
    line = _error_line(stderr)
    for fragment in case.expect:
        assert fragment in line, line
    _check_nothing_written(case, paths, before)


SUBPROCESS_CASES = [c for c in CASES if c.subprocess]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c.id for c in SUBPROCESS_CASES])
def test_bad_input_subprocess(case: Case, paths: Paths, finished_run: Path, tc_home: Path, tmp_path: Path) -> None:
    if case.cpu_only and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    if case.damaged:
        _damaged_run(paths, finished_run, case.damaged)
    before = _snapshot(paths.runs)
    result = _run_module(f"experiments.{case.script}", paths.fill(list(case.args)), tc_home, hf_home=tmp_path / "empty_hf_home")
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result.stderr)
    for fragment in case.expect:
        assert fragment in line, line
    _check_nothing_written(case, paths, before)


def test_real_hub_names_offline_subprocess(paths: Paths, tc_home: Path, tmp_path: Path) -> None:
    """Real hub names (with an empty hub cache) fail with the one-line offline message (that they try no connection
    is checked in-process, by test_data and test_reconstructor; here ``_run_module``'s timeout guards against a hang)."""
    result = _run_module(
        "experiments.prepare_data", ["--reconstructor", "gpt2", "--output_dir", str(paths.out)], tc_home, hf_home=tmp_path / "hf"
    )
    assert result.returncode == 2
    assert "'gpt2'" in _error_line(result.stderr) and "Offline?" in result.stderr
    result = _run_module("experiments.train_ppo", [*paths.fill(list(TRAIN)), "--corpus", "wikitext"], tc_home, hf_home=tmp_path / "hf")
    assert result.returncode == 2
    assert "'wikitext'" in _error_line(result.stderr) and "Offline?" in result.stderr
    assert not (paths.runs / "new").exists()


# ---------------------------------------------------------------------------------------------- the same through the API
def test_api_empty_whitespace_and_missing_text(inputs: Path) -> None:
    for name in ("empty.txt", "whitespace.txt"):
        with pytest.raises(DataSourceError, match="holds no text"):
            load_documents(str(inputs / name))
    with pytest.raises(DataSourceError, match="does not exist"):
        load_documents(str(inputs / "nope.txt"))


def test_api_text_shorter_than_a_window(inputs: Path, test_reconstructor: Reconstructor, tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="shorter than one 64-token window"):
        prepare_corpus(CorpusSpec(source=str(inputs / "short.txt"), seq_len=64), test_reconstructor.tokenizer, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing cached half-way
    with pytest.raises(InputError, match="shorter than one 64-token window"):
        file_windows(str(inputs / "short.txt"), test_reconstructor, 64)


def test_api_very_long_text_works(inputs: Path, test_reconstructor: Reconstructor) -> None:
    windows = file_windows(str(inputs / "long.txt"), test_reconstructor, 64)
    assert windows.shape[1] == 64
    assert windows.shape[0] >= 0.95 * LONG_TOKENS // 64  # only each document's tail shorter than a window is dropped
    env = TokenMaskEnv(windows=windows, reconstructor=test_reconstructor, seq_len=64)
    env.reset(seed=0, options={"window_index": len(windows) - 1})
    assert env.num_windows == len(windows)


def test_api_invalid_utf8_is_replaced_with_a_warning(inputs: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tokencompress_env.data"):
        docs = load_documents(str(inputs / "bad_utf8.txt"))
    text = "\n\n".join(docs["text"])
    assert "\ufffd" in text and "caf\ufffd" in text
    warnings = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "bad_utf8.txt" in warnings[0] and "iconv" in warnings[0]


def test_cli_long_text_with_invalid_utf8_works_subprocess(
    inputs: Path, tc_home: Path, test_reconstructor_dir: Path, tmp_path: Path
) -> None:
    """Long text with a few invalid bytes is evaluated, with one warning line and exit code 0."""
    bad = inputs / "bad_utf8.txt"
    long = tmp_path / "long_bad.txt"
    long.write_bytes((inputs / "long.txt").read_bytes() + b"\n\n" + bad.read_bytes())
    out = tmp_path / "eval"
    result = _run_module(
        "experiments.evaluate",
        [
            "--reconstructor",
            str(test_reconstructor_dir),
            "--data",
            str(long),
            "--methods",
            "random",
            "stride",
            "--mask_rates",
            "0.5",
            "--max_windows",
            "8",
            "--bootstrap",
            "10",
            "--out",
            str(out),
        ],
        tc_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "not valid UTF-8" in line]) == 1
    records = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in records} == {"random", "stride"}


def test_api_mask_rates(test_reconstructor: Reconstructor, test_windows: dict[str, np.ndarray]) -> None:
    windows = test_windows["validation"][:4]
    for bad in (1.0, 1.5, -0.1, math.nan):
        with pytest.raises(ConfigError, match=r"mask.rate"):
            build_config(TrainConfig, {"mask_rate_max": bad} if bad != -0.1 else {"mask_rate_min": bad})
    for bad_range in ((0.2, 1.5), (-0.1, 0.5), (math.nan, 0.5), (0.7, 0.3)):
        with pytest.raises(ConfigError, match="mask_rate_range"):
            TokenMaskEnv(windows=windows, reconstructor=test_reconstructor, seq_len=64, mask_rate_range=bad_range)
    env = TokenMaskEnv(windows=windows, reconstructor=test_reconstructor, seq_len=64)
    for bad in (1.5, -0.2, math.inf):
        with pytest.raises(InputError, match="target_mask_rate"):
            env.reset(seed=0, options={"target_mask_rate": bad})
    maskable = np.ones((2, 8), dtype=bool)
    for bad in (1.5, -0.1, math.nan):
        with pytest.raises(InputError, match=r"mask.rate"):
            mask_budget(bad, maskable)


def test_api_unknown_config_keys() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'total_timesteps'\?\); valid keys: .*seq_len"):
        build_config(TrainConfig, {"total_timestep": 5})
    with pytest.raises(ConfigError, match="expects int"):
        build_config(TrainConfig, {"n_envs": "four"})


def test_api_seq_len_beyond_context(test_reconstructor: Reconstructor, test_windows: dict[str, np.ndarray], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exceeds the reconstructor's context"):
        TokenMaskEnv(windows=test_windows["validation"][:2], reconstructor=test_reconstructor, seq_len=512, chunk_size=16)
    with pytest.raises(ConfigError, match="exceeds the reconstructor's context"):
        train(TrainConfig(**{**DEBUG_CONFIG, "runs_dir": str(tmp_path), "seq_len": 512}))
    assert not (tmp_path / "debug").exists()


def test_api_windows_empty_or_too_long(test_reconstructor: Reconstructor) -> None:
    with pytest.raises(InputError, match="no windows"):
        TokenMaskEnv(windows=[], reconstructor=test_reconstructor, seq_len=64)
    with pytest.raises(InputError, match="longer than seq_len"):
        TokenMaskEnv(windows=np.arange(LONG_TOKENS) % 100, reconstructor=test_reconstructor, seq_len=64)
    with pytest.raises(InputError, match="token ids"):
        TokenMaskEnv(windows=[[5, 6, test_reconstructor.vocab_size]], reconstructor=test_reconstructor, seq_len=64)


def test_api_hub_names_offline(tmp_path: Path) -> None:
    with pytest.raises(ReconstructorLoadError, match=r"Offline\?"):
        Reconstructor.from_pretrained(NO_SUCH_MODEL)
    with pytest.raises(DataSourceError, match=r"Offline\?"):
        load_documents(NO_SUCH_DATASET)
    with pytest.raises(ReconstructorLoadError, match="does not exist"):
        Reconstructor.from_pretrained(tmp_path / "no_such_dir")


def test_api_corrupt_reconstructor_dirs(test_reconstructor_dir: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    shutil.copytree(test_reconstructor_dir, garbage)
    (garbage / "model.safetensors").write_bytes(os.urandom(2048))
    with pytest.raises(ReconstructorLoadError, match="corrupt or partial"):
        Reconstructor.from_pretrained(garbage)
    pickled = tmp_path / "pickled"
    shutil.copytree(test_reconstructor_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ReconstructorLoadError, match="only safetensors"):
        Reconstructor.from_pretrained(pickled)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ReconstructorLoadError, match=r"no config\.json"):
        Reconstructor.from_pretrained(tmp_path / "empty_dir")


@pytest.mark.parametrize("kind", ["missing_state", "garbage_state"])
def test_api_corrupt_checkpoint_state(kind: str, finished_run: Path, tmp_path: Path) -> None:
    shutil.copytree(finished_run, tmp_path / "run")
    _corrupt(tmp_path / "run", kind)
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        load_checkpoint_state(tmp_path / "run" / "checkpoints" / "latest")


@pytest.fixture(scope="module")
def compressor(finished_run: Path) -> Compressor:
    """The finished run's compressor."""
    return Compressor.load(finished_run, device="cpu")


COMPRESS_API_CASES: list[tuple[str, Any, dict[str, Any], str]] = [
    ("empty", "", {}, "empty or only whitespace"),
    ("whitespace", " \n\t ", {}, "empty or only whitespace"),
    ("no-texts", [], {}, "no text given"),
    ("empty-in-batch", ["fine text", "  "], {}, r"empty or only whitespace \(text 1\)"),
    ("not-a-string", 42, {}, "pass a text"),
    ("bytes-in-batch", ["fine", b"bytes"], {}, "texts must be strings"),
    ("rate-1", "Some text.", {"mask_rate": 1.0}, r"\[0, 1\)"),
    ("rate-1.5", "Some text.", {"mask_rate": 1.5}, r"\[0, 1\)"),
    ("rate-negative", "Some text.", {"mask_rate": -0.1}, r"\[0, 1\)"),
    ("rate-nan", "Some text.", {"mask_rate": math.nan}, r"\[0, 1\)"),
    ("rate-inf", "Some text.", {"mask_rate": math.inf}, r"\[0, 1\)"),
    ("rate-string", "Some text.", {"mask_rate": "0.4"}, "must be a number"),
    ("rate-bool", "Some text.", {"mask_rate": True}, "must be a number"),
    ("rate-and-target", "Some text.", {"mask_rate": 0.4, "target_tokens": 2}, "not both"),
    ("target-negative", "Some text.", {"target_tokens": -1}, "target_tokens must be in"),
    ("target-too-many", "Some text.", {"target_tokens": 10_000}, "target_tokens must be in"),
    ("target-float", "Some text.", {"target_tokens": 2.5}, "target_tokens must be an integer"),
    ("force-keep-not-str", "Some text.", {"force_keep": [3]}, "force_keep must be"),
    ("target-0", "Some text.", {"target_tokens": 0}, r"target_tokens must be in \[1, "),
    (
        "rate-removes-all",
        "Some text.",
        {"mask_rate": 0.9999999},
        r"would remove every token of the text \(\d+ tokens\): use a mask_rate in \[0, ",
    ),
    ("units-unknown", "Some text.", {"units": "token"}, "units must be one of"),
]


@pytest.mark.parametrize(("text", "kwargs", "match"), [c[1:] for c in COMPRESS_API_CASES], ids=[c[0] for c in COMPRESS_API_CASES])
def test_api_compress_bad_inputs(compressor: Compressor, text: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        compressor.compress(text, **kwargs)
    assert "\n" not in str(info.value)


def test_api_compress_short_and_very_long_text(compressor: Compressor, inputs: Path) -> None:
    short = compressor.compress("Hello world.", mask_rate=0.5)
    assert isinstance(short, CompressionResult)
    assert short.windows == 1 and 0 < short.origin_tokens < compressor.seq_len
    long = compressor.compress((inputs / "long.txt").read_text(), mask_rate=0.5)
    assert isinstance(long, CompressionResult)
    assert long.origin_tokens >= LONG_TOKENS
    assert long.windows == math.ceil(long.origin_tokens / compressor.seq_len)
    assert abs(long.achieved_mask_rate - 0.5) < 0.01


def test_cli_compress_invalid_utf8_file_works(finished_run: Path, inputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = compress_script.main(["--run", str(finished_run), "--mask_rate", "0.3", "--json", str(inputs / "bad_utf8.txt")])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out)
    assert result["origin_tokens"] > 1000 and abs(result["achieved_mask_rate"] - 0.3) < 0.01


def test_cli_compress_force_keep_is_repeatable_and_leaves_the_file(
    finished_run: Path, inputs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--force_keep X file`` takes one string: the file is the input (it used to be swallowed as a second string)."""
    text = (inputs / "short.txt").read_text()
    code = compress_script.main(
        [
            "--run",
            str(finished_run),
            "--mask_rate",
            "0.5",
            "--force_keep",
            "Hello",
            "--force_keep",
            "too short",
            "--json",
            str(inputs / "short.txt"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out)
    assert "Hello" in result["text"] and "too short" in result["text"] and result["text"] != text
    # Force-keep covering the whole text: the rate is not reached, and a warning line says so.
    code = compress_script.main(["--run", str(finished_run), "--mask_rate", "0.5", "--force_keep", text.strip(), str(inputs / "short.txt")])
    captured = capsys.readouterr()
    assert code == 0 and captured.out.strip() == text.strip()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "force-kept tokens" in warnings[0] and "instead of the requested 0.500" in warnings[0]


def test_resume_reads_the_runs_own_config(finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--resume true`` needs no ``--config``: the run's config.json supplies the options."""
    runs = tmp_path / "runs"
    shutil.copytree(finished_run, runs / "debug")
    before = load_checkpoint_state(runs / "debug" / "checkpoints" / "latest")["num_timesteps"]
    args = ["--runs_dir", str(runs), "--run_name", "debug", "--resume", "true", "--total_timesteps", str(before + 64)]
    code = train_script.main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert json.loads(captured.out[captured.out.index("{") :])["num_timesteps"] == before + 64
    saved = json.loads((runs / "debug" / "config.json").read_text())
    assert saved["seq_len"] == DEBUG_CONFIG["seq_len"] and saved["total_timesteps"] == before + 64


def test_evaluate_runs_a_repeated_rate_once(paths: Paths, capsys: pytest.CaptureFixture[str]) -> None:
    args = [*paths.fill(list(EVAL)), "--methods", "random", "--mask_rates", "0.5", "0.5", "0.3", "--max_windows", "4"]
    code = cli_main(evaluate_script.main)(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "note: repeated mask rates are evaluated once: [0.5, 0.3]" in captured.err
    records = json.loads((paths.out / "results.json").read_text())
    assert sorted(r["requested_mask_rate"] for r in records) == [0.3, 0.5]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_output_folders_fail_before_any_work(paths: Paths, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = cli_main(evaluate_script.main)([*paths.fill(list(EVAL[:2])), "--out", str(locked / "eval")])
        assert code == 2 and "is not writable" in _error_line(capsys.readouterr().err)
        code = train_script.main([*paths.fill(list(TRAIN[:2])), "--runs_dir", str(locked), "--run_name", "new"])
        assert code == 2 and "is not writable" in _error_line(capsys.readouterr().err)
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_every_user_error_is_a_tokencompress_error() -> None:
    for cls in (CheckpointError, ConfigError, DataSourceError, InputError, ReconstructorLoadError):
        assert issubclass(cls, TokenCompressError)


# ---------------------------------------------------------------------------------------------- crash safety
def _wait_for(predicate: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}: {log.read_text()[-3000:]}")
        time.sleep(0.05)


def _start_training(runs: Path, tc_home: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "experiments.train_ppo", "--config", str(DEBUG), "--runs_dir", str(runs), *args],
            cwd=ROOT,
            env=_subprocess_env(tc_home),
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


def _tb_steps(tb_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: list[int] = []
    for events_dir in sorted({p.parent for p in tb_dir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events_dir))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps.extend(e.step for e in acc.Scalars(tag))
    return steps


def test_sigkill_then_resume(tmp_path: Path, tc_home: Path, test_reconstructor_dir: Path) -> None:
    from agents.algorithms import get_algorithm

    run = tmp_path / "debug"
    latest = run / "checkpoints" / "latest"
    log = tmp_path / "train.log"
    proc = _start_training(tmp_path, tc_home, log, "--total_timesteps", "1000000", "--save_freq", "64")
    try:
        _wait_for(lambda: (latest / "state.json").exists(), proc, 240, "the first checkpoint", log)
        time.sleep(0.3)  # let it run on into the next rollout (and possibly the next checkpoint swap)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    recover_checkpoint(latest)  # what --resume does first: undo a swap the kill interrupted
    state = load_checkpoint_state(latest)
    killed_at = int(state["num_timesteps"])
    assert killed_at > 0 and killed_at % 64 == 0
    agent = get_algorithm("ppo").algo_class.load(latest / "agent.zip", device="cpu")
    assert agent.num_timesteps == killed_at
    reconstructor = Reconstructor.from_pretrained(latest / "reconstructor", device="cpu")
    assert reconstructor.max_seq_len >= 64
    assert not (run / "agent.zip").exists()  # the final artifacts of an unfinished run are never written

    result = _run_module(
        "experiments.train_ppo",
        [
            "--config",
            str(DEBUG),
            "--runs_dir",
            str(tmp_path),
            "--total_timesteps",
            str(killed_at + 128),
            "--save_freq",
            "64",
            "--resume",
            "true",
        ],
        tc_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["num_timesteps"] == killed_at + 128  # the counter continued from the checkpoint
    assert json.loads((run / "state.json").read_text())["num_timesteps"] == killed_at + 128
    assert json.loads((latest / "state.json").read_text())["finetune_rounds"] > int(state["finetune_rounds"])
    get_algorithm("ppo").algo_class.load(run / "agent.zip", device="cpu")
    Reconstructor.from_pretrained(run / "reconstructor", device="cpu")
    steps = _tb_steps(run / "tb", "train/entropy_loss")
    assert max(steps) >= killed_at + 64
    assert len([d for d in (run / "tb").iterdir() if d.is_dir()]) == 1  # the same TensorBoard run continued
    assert not list(latest.parent.glob("latest.tmp-*"))  # stale temporary folders of the killed run were removed


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path: Path, tc_home: Path, test_reconstructor_dir: Path) -> None:
    run = tmp_path / "debug"
    log = tmp_path / "train.log"
    proc = _start_training(tmp_path, tc_home, log, "--total_timesteps", "1000000", "--save_freq", "0")
    try:
        _wait_for(lambda: any((run / "tb").rglob("events.out.tfevents.*")), proc, 240, "training to start", log)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    assert "Interrupted: checkpoint saved" in output and "--resume true" in output
    state = load_checkpoint_state(run / "checkpoints" / "latest")
    assert state["num_timesteps"] > 0
    Reconstructor.from_pretrained(run / "checkpoints" / "latest" / "reconstructor", device="cpu")
    assert not (run / "agent.zip").exists()  # interrupted runs are continued with --resume, not finished


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupted_distillation_checkpoints_and_resumes(sig: int, tmp_path: Path, tc_home: Path, test_reconstructor_dir: Path) -> None:
    """Ctrl-C and SIGKILL during distillation behave as during PPO: a checkpoint, and a resume that continues."""
    run = tmp_path / "debug"
    latest = run / "checkpoints" / "latest"
    log = tmp_path / "train.log"
    save_freq = "0" if sig == signal.SIGINT else "2"  # Ctrl-C: its own checkpoint; SIGKILL: the last periodic one
    proc = _start_training(tmp_path, tc_home, log, "--total_timesteps", "64", "--distill_steps", "100000", "--distill_save_freq", save_freq)
    try:
        if sig == signal.SIGINT:
            _wait_for(lambda: any((run / "tb" / "distill").rglob("events.out.tfevents.*")), proc, 240, "distillation to start", log)
            time.sleep(1.0)
        else:
            _wait_for(lambda: (latest / "state.json").exists(), proc, 240, "the first distillation checkpoint", log)
            time.sleep(0.3)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    if sig == signal.SIGINT:
        assert proc.returncode == 130, output[-3000:]
        assert "Traceback" not in output
        assert "Interrupted: checkpoint saved" in output and "--resume true" in output
    else:
        assert proc.returncode == -signal.SIGKILL
    recover_checkpoint(latest)
    state = load_checkpoint_state(latest)
    assert state["phase"] == "distill" and state["num_timesteps"] == 0
    stopped = int(state["distill_step"])
    assert 0 < stopped < 100_000
    assert (latest / "distill_optimizer.pt").exists() and not (run / "agent.zip").exists()
    Compressor.load(latest, device="cpu")  # the distilled policy is usable from the checkpoint

    args = ["--config", str(DEBUG), "--runs_dir", str(tmp_path), "--total_timesteps", "64", "--resume", "true"]
    result = _run_module("experiments.train_ppo", [*args, "--distill_steps", str(stopped + 3)], tc_home)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["distillation"]["resumed_from_step"] == stopped
    assert summary["distillation"]["steps_done"] == stopped + 3  # distillation continued, then PPO ran
    assert summary["num_timesteps"] >= 64 and not summary["interrupted"]
    final = json.loads((run / "state.json").read_text())
    assert "phase" not in final and final["num_timesteps"] == summary["num_timesteps"]
    Compressor.load(run, device="cpu")


def test_resume_after_kill_inside_the_checkpoint_swap(finished_run: Path, tmp_path: Path) -> None:
    """Killed between moving ``latest`` aside and moving the new one in: resume uses the previous checkpoint."""
    runs = tmp_path / "runs"
    shutil.copytree(finished_run, runs / "debug")
    checkpoints = runs / "debug" / "checkpoints"
    before = load_checkpoint_state(checkpoints / "latest")["num_timesteps"]
    os.replace(checkpoints / "latest", checkpoints / "latest.old")
    (checkpoints / "latest.tmp-99999").mkdir()
    (checkpoints / "latest.tmp-99999" / "agent.zip").write_bytes(b"half written")
    summary = train(
        TrainConfig(**{**DEBUG_CONFIG, "runs_dir": str(runs), "total_timesteps": before + 64, "resume": True, "tensorboard": False})
    )
    assert summary["num_timesteps"] == before + 64
    assert not (checkpoints / "latest.old").exists() and not (checkpoints / "latest.tmp-99999").exists()
    assert load_checkpoint_state(checkpoints / "latest")["num_timesteps"] == before + 64


# ---------------------------------------------------------------------------------------------- safe loading
SOURCE_DIRS = ("agents", "callbacks", "experiments", "tokencompress_env")


def _source_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_safe_loading_source_scan() -> None:
    """No remote code, no pickles: torch files with weights_only=True, model weights from safetensors only."""
    files = _source_files()
    assert len(files) > 20
    problems: list[str] = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            remote = _keyword(node, "trust_remote_code")
            if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
                problems.append(f"{where}:{node.lineno}: trust_remote_code must be the constant False")
            if owner == "torch" and name == "load":
                weights_only = _keyword(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            if owner in {"pickle", "cloudpickle", "dill", "joblib"} and name in {"load", "loads"}:
                problems.append(f"{where}:{node.lineno}: {owner}.{name} (pickles run code)")
            if name == "from_pretrained" and owner.startswith(("AutoModel", "GPT2LMHeadModel")):
                safetensors = _keyword(node, "use_safetensors")
                if not (isinstance(safetensors, ast.Constant) and safetensors.value is True):
                    problems.append(f"{where}:{node.lineno}: model weights loaded without use_safetensors=True")
    assert not problems, "\n".join(problems)


class _Payload:
    """A pickle that runs code when unpickled: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('payload ran')",)


def _craft_agent_zip(source: Path, target: Path, marker: Path) -> None:
    """Copy an SB3 ``agent.zip``, replacing its serialized ``policy_class`` with a pickle that runs a payload."""
    import base64
    import pickle
    import zipfile

    with zipfile.ZipFile(source) as zin:
        members = {name: zin.read(name) for name in zin.namelist()}
    data = json.loads(members["data"])
    data["policy_class"][":serialized:"] = base64.b64encode(pickle.dumps(_Payload(marker))).decode()
    members["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(target, "w") as zout:
        for name, blob in members.items():
            zout.writestr(name, blob)


def test_crafted_agent_zip_is_never_unpickled(finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run folder whose agent.zip would run code: compress and evaluate never unpickle it, resume refuses it."""
    from agents.algorithms import get_algorithm

    marker = tmp_path / "payload_ran"
    run = tmp_path / "runs" / "debug"
    shutil.copytree(finished_run, run)
    for folder in (run, run / "checkpoints" / "latest"):
        _craft_agent_zip(finished_run / "agent.zip", folder / "agent.zip", marker)
    # The control: unpickling the crafted file does run the payload.
    with contextlib.suppress(Exception):  # whatever SB3 makes of the payload's return value: it has run by then
        get_algorithm("ppo").algo_class.load(run / "agent.zip", device="cpu")
    assert marker.exists()
    marker.unlink()

    compressor = Compressor.load(run, device="cpu")
    assert compressor.compress("A short text to compress, safely.", mask_rate=0.5).compressed_tokens > 0
    assert compress_script.main(["--run", str(run), "--mask_rate", "0.5", str(ROOT / "README.md")]) == 0
    out = tmp_path / "eval"
    argv = ["--run", str(run), "--methods", "policy", "--mask_rates", "0.5", "--max_windows", "4", "--bootstrap", "10"]
    records = evaluate_script.main([*argv, "--device", "cpu", "--out", str(out)])
    assert {r["method"] for r in records} == {"policy"}
    code = train_script.main(["--config", str(DEBUG), "--runs_dir", str(run.parent), "--resume", "true", "--total_timesteps", "128"])
    assert code == 2
    assert "is not the file this run wrote" in _error_line(capsys.readouterr().err)
    assert not marker.exists()


@pytest.mark.parametrize("algo", ["ppo", "a2c", "trpo", "maskable_ppo", "recurrent_ppo"])
@pytest.mark.parametrize("observe_surprisal", [False, True])
def test_policy_artifact_round_trips_to_identical_logits(algo: str, observe_surprisal: bool, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from agents.algorithms import get_algorithm
    from agents.artifact import load_policy_artifact, save_policy_artifact
    from tokencompress_env.observation import make_spaces

    obs_space, action_space = make_spaces(32, 8, 300, observe_surprisal)
    torch.manual_seed(0)
    kwargs = {"features_extractor_kwargs": {"embed_dim": 16, "dilations": (1, 2)}, "net_arch": {"pi": [8], "vf": [12]}}
    policy = get_algorithm(algo).policy_class(obs_space, action_space, lambda _: 1e-3, activation_fn=torch.nn.ReLU, **kwargs)
    with torch.no_grad():  # weights unlike any fresh initialisation
        for param in policy.parameters():
            param.add_(torch.randn_like(param))
    save_policy_artifact(SimpleNamespace(policy=policy), algo, tmp_path)  # type: ignore[arg-type]
    loaded = load_policy_artifact(tmp_path, "cpu")
    assert loaded.algo == algo and type(loaded.policy) is type(policy)
    assert loaded.observation_space == obs_space and loaded.action_space == action_space
    obs_space.seed(0)
    batch = {key: np.stack([obs_space[key].sample() for _ in range(5)]) for key in obs_space.spaces}
    policy.set_training_mode(False)
    with torch.no_grad():
        expected = policy.token_mask_logits(batch)
        got = loaded.policy.token_mask_logits(batch)
    assert torch.equal(expected, got)
    for name, tensor in policy.state_dict().items():
        assert torch.equal(tensor, loaded.policy.state_dict()[name]), name


def test_trained_run_artifact_gives_the_agents_logits(finished_run: Path) -> None:
    """The run's policy.safetensors + policy.json give the same logits as its (trusted) agent.zip."""
    from agents.algorithms import get_algorithm
    from agents.artifact import load_policy_artifact
    from tokencompress_env.compressor import window_mask_logits

    agent = get_algorithm("ppo").algo_class.load(finished_run / "agent.zip", device="cpu")
    artifact = load_policy_artifact(finished_run, "cpu")
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 512, size=(6, 64))
    valid = np.ones_like(ids, dtype=bool)
    valid[0, 40:] = False
    keep = rng.random(ids.shape) < 0.1
    a = window_mask_logits(agent, ids, valid, keep, 0.4)
    b = window_mask_logits(artifact, ids, valid, keep, 0.4)
    assert np.array_equal(a, b)


def test_old_version_run_is_converted_with_the_printed_command(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run written before the safe artifact: compress says how to write it; that command does, and then it loads."""
    run = tmp_path / "runs" / "old"
    shutil.copytree(finished_run, run)
    _corrupt(run, "old_version_run")
    with pytest.raises(CheckpointError, match=r"has no policy\.safetensors") as info:
        Compressor.load(run, device="cpu")
    command = str(info.value).split("write them with: ")[1]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "experiments.train_ppo"]
    assert train_script.main([*argv[3:], "--tensorboard", "false"]) == 0, capsys.readouterr().err[-2000:]
    assert "trust_agent_pickle" not in json.loads((run / "config.json").read_text())  # never inherited
    compressor = Compressor.load(run, device="cpu")
    assert compressor.compress("Some text to compress after the conversion.", mask_rate=0.3).compressed_tokens > 0
    assert json.loads((run / "state.json").read_text())["agent_sha256"]


# ---------------------------------------------------------------------------------------------- determinism
def _numbers(records: list[dict[str, Any]]) -> list[tuple[str, str, float, str, Any]]:
    """Every result except timings, keyed by method, scorer and rate."""
    out = []
    for r in records:
        for key, value in sorted(r.items()):
            if "per_second" in key or "seconds" in key:
                continue
            out.append((r["method"], r["reconstructor"], r["requested_mask_rate"], key, value))
    return sorted(out, key=lambda t: (t[0], t[1], t[2], t[3]))


def test_evaluation_is_deterministic_across_processes(tmp_path: Path, tc_home: Path, test_reconstructor_dir: Path) -> None:
    records = []
    for i in range(2):
        out = tmp_path / f"eval{i}"
        result = _run_module(
            "experiments.evaluate",
            [
                "--reconstructor",
                str(test_reconstructor_dir),
                "--device",
                "cpu",
                "--max_windows",
                "16",
                "--mask_rates",
                "0.3",
                "0.6",
                "--bootstrap",
                "50",
                "--seed",
                "3",
                "--out",
                str(out),
            ],
            tc_home,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        records.append(json.loads((out / "results.json").read_text()))
    first, second = _numbers(records[0]), _numbers(records[1])
    assert len(first) == len(second) > 50
    methods = {t[0] for t in first}
    assert {"random", "self_information", "frequency"} <= methods
    assert first == second  # bit for bit, not just close
