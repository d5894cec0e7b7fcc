"""Train the compression agent on TokenMask-v0, jointly with the reconstructor.

Examples::

    python -m experiments.train_ppo --config experiments/configs/dev/debug.json
    python -m experiments.train_ppo --config experiments/configs/dev/small_scale.json --algo maskable_ppo --seed 1
    python -m experiments.train_ppo --config experiments/configs/dev/small_scale.json --resume true

A run writes ``<runs_dir>/<run_name>/``: ``config.json`` (the resolved config), ``tb/`` (TensorBoard),
``reference_reconstructor/`` (the frozen starting reconstructor), ``checkpoints/latest/`` (saved every
``save_freq`` steps, every ``distill_save_freq`` distillation steps and at the end of distillation, and
on Ctrl-C, atomically), and at the end ``policy.safetensors`` + ``policy.json`` (the policy for
inference, loaded without unpickling), ``agent.zip``, ``reconstructor/``, ``reconstructor_optimizer.pt``
and ``state.json``. ``--resume true`` continues from the latest checkpoint (distillation from its step
with its optimizer, then PPO: step counter, TensorBoard curves, agent, reconstructor and its optimizer);
it unpickles the checkpoint's ``agent.zip`` only if its SHA-256 is the one recorded in ``state.json``.
Only the budgets (``total_timesteps``, ``distill_steps``), ``save_freq``, ``distill_save_freq``, ``device``,
``tensorboard``, ``progress_bar``, ``verbose`` and ``trust_agent_pickle`` may
change on a resume: the run's own ``config.json`` supplies every other option, so ``--runs_dir``,
``--run_name`` and ``--resume true`` are enough.

Everything is validated (config, reconstructor, ``seq_len`` against its context, corpus, checkpoint)
before anything is written, so a run that fails validation leaves no run folder behind. Killed at any
moment (even SIGKILL), a run keeps its last complete checkpoint and loses at most ``save_freq`` steps.
Ctrl-C (SIGINT) saves a checkpoint, prints the summary and exits with code 130; user errors print one
line and exit with code 2; a finished run exits with 0.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.logger import HumanOutputFormat, Logger, configure
from stable_baselines3.common.vec_env import VecMonitor

from agents.algorithms import canonical_name, load_model, make_model
from agents.artifact import CLASSES as ARTIFACT_CLASSES
from agents.artifact import load_policy_artifact
from agents.distill import DISTILL_TARGETS, DISTILL_TEACHERS, LR_SCHEDULES, SURPRISAL_TEACHER, distill_policy
from callbacks.checkpoint import (
    JointCheckpointCallback,
    load_checkpoint_state,
    load_reconstructor_optimizer,
    recover_checkpoint,
    save_run_artifacts,
    verify_agent_file,
)
from callbacks.joint_training import ReconstructorFinetuneCallback
from callbacks.metrics import CompressionMetricsCallback
from experiments.config import build_config, check_output_dir, cli_main, config_fields, parse_config_values
from tokencompress_env.env_config import EnvConfig
from tokencompress_env.errors import CheckpointError, ConfigError, ReconstructorLoadError, TokenCompressError
from tokencompress_env.options import option, option_of
from tokencompress_env.presets import load_or_build
from tokencompress_env.reconstructor import SCORING_DTYPES, Reconstructor, parse_device, resolve_device
from tokencompress_env.run_folder import (
    AGENT_ZIP,
    CONFIG,
    DISTILL_OPTIMIZER,
    RECONSTRUCTOR,
    REFERENCE_RECONSTRUCTOR,
    TENSORBOARD,
    is_finished_run,
    latest_checkpoint,
    publish_run_result,
)
from tokencompress_env.sb3_vec_env import TokenMaskSB3VecEnv
from tokencompress_env.trainer import ReconstructorTrainer, launched_processes
from tokencompress_env.units import check_units
from tokencompress_env.vector_env import TokenMaskVectorEnv

#: Constant TensorBoard run name, so a resumed run continues the same curves.
TB_LOG_NAME = "train"
#: Integer options that must be at least 1.
POSITIVE_INTS = (
    "n_envs",
    "n_steps",
    "seq_len",
    "chunk_size",
    "batch_size",
    "n_epochs",
    "embed_dim",
    "hidden_dim",
    "distill_batch_size",
    "distill_updates_per_batch",
    "distill_teacher_windows",
    "distill_teacher_rates",
    "reconstructor_steps",
    "reconstructor_batch_size",
    "reconstructor_grad_accum",
    "joint_interval",
)
#: Activations of the policy's heads by option value (SB3's ``activation_fn``; PPO's default is tanh).
#: Taken from the classes a saved policy may name (agents.artifact.CLASSES), so that every choice can be saved.
HEAD_ACTIVATIONS: dict[str, type[torch.nn.Module]] = {name.lower(): ARTIFACT_CLASSES[name] for name in ("Tanh", "ReLU", "GELU")}
#: Options of a run that configure its environment (declared by :class:`EnvConfig`, whose defaults and docs they take).
ENV_OPTIONS = (
    "corpus",
    "reconstructor",
    "seq_len",
    "chunk_size",
    "reward_type",
    "mask_rate_min",
    "mask_rate_max",
    "bits_saved_per_mask",
    "rate_penalty",
    "continuation_tokens",
    "observe_surprisal",
    "keep_digits",
    "units",
    "scoring_dtype",
)
#: Options a resumed run may change; every other option comes from the run's ``config.json``.
RESUME_MAY_CHANGE = (
    "run_name",
    "runs_dir",
    "resume",
    "total_timesteps",
    "distill_steps",
    "save_freq",
    "distill_save_freq",
    "device",
    "tensorboard",
    "progress_bar",
    "verbose",
    "trust_agent_pickle",
)


@dataclass
class TrainConfig:
    """Options of ``experiments.train_ppo`` (every key may be set in the JSON config or on the command line).

    Each option is documented at its field (``--help`` prints the docs).
    """

    run_name: str = option("debug", "name of the run folder")
    runs_dir: str = option("runs", "parent folder of runs")
    algo: str = option(
        "ppo",
        "'ppo', 'a2c', 'trpo', 'maskable_ppo', 'recurrent_ppo' or 'token_ppo' (PPO with per-token advantages, agents.token_ppo)",
    )
    n_envs: int = option(16, "windows scored together (one batched reconstructor forward per step)")
    seed: int = option(0, "random seed (agent, env, reconstructor fine-tuning)")
    device: str = option("auto", "'auto', 'cpu', 'cuda' or 'mps' (agent and reconstructor)")
    total_timesteps: int = option(
        20_000,
        "environment steps to train for (summed over envs; one step decides 'chunk_size' tokens); 0 trains no "
        "reinforcement learning (the distillation warm start alone)",
    )
    corpus: str = option_of(EnvConfig, "corpus")
    reconstructor: str = option_of(EnvConfig, "reconstructor")
    seq_len: int = option_of(EnvConfig, "seq_len")
    chunk_size: int = option_of(EnvConfig, "chunk_size")
    reward_type: str = option_of(EnvConfig, "reward_type")
    mask_rate_min: float = option_of(EnvConfig, "mask_rate_min")
    mask_rate_max: float = option_of(EnvConfig, "mask_rate_max")
    bits_saved_per_mask: float = option_of(EnvConfig, "bits_saved_per_mask")
    rate_penalty: float | None = option_of(EnvConfig, "rate_penalty")
    continuation_tokens: int = option_of(EnvConfig, "continuation_tokens")
    observe_surprisal: bool = option_of(EnvConfig, "observe_surprisal")
    keep_digits: bool = option_of(EnvConfig, "keep_digits")
    units: str = option_of(EnvConfig, "units")
    scoring_dtype: str = option_of(EnvConfig, "scoring_dtype")
    policy_lr: float = option(3e-4, "learning rate of the agent")
    n_steps: int = option(32, "steps per env per rollout")
    batch_size: int = option(128, "PPO minibatch size")
    n_epochs: int = option(4, "PPO epochs per rollout")
    gamma: float = option(1.0, "discount factor")
    gae_lambda: float = option(0.95, "GAE lambda")
    ent_coef: float = option(0.0, "entropy bonus")
    clip_range: float = option(0.2, "PPO clip range")
    embed_dim: int = option(192, "width of the policy's token embedding")
    hidden_dim: int = option(64, "width of the policy's per-token features and convolution layers")
    conv_kernel_size: int = option(5, "kernel size of the policy's convolutions (odd)")
    conv_dilations: tuple[int, ...] = option((1, 2, 4, 1, 2, 2), "one convolution block per entry, with that dilation")
    activation_fn: str = option(
        "tanh",
        "activation between the layers of the policy's per-token and value heads: " + ", ".join(f"'{name}'" for name in HEAD_ACTIVATIONS),
    )
    embed_kernel_size: int = option(
        1, "each token's input sums the projected embeddings of this many tokens centred on it (odd; a table lookup per tap at inference)"
    )
    separable_conv: bool = option(
        False, "depthwise-separable convolutions in the policy: about 5 times fewer multiply-adds per block (faster compress())"
    )
    use_decisions: bool = option(
        False,
        "let the policy see the decisions made so far; 'False' (default) makes it a one-pass ranker whose whole-window "
        "logits (used by 'compress()' and the evaluation) are exactly those it acted on in training",
    )
    rate_calibrated: bool = option(
        False,
        "shift each window's mask logits so that the policy's expected drops equal the target rate (the order of the "
        "window's tokens, and so every ranked mask, is unchanged); PPO then changes the order and the sharpness only",
    )
    init_logit_scale: float = option(
        1.0,
        "multiply the per-token head's output layer by this factor when the run starts (after init_policy): the same "
        "ranking of every window's tokens, sampled more sharply (with rate_calibrated, closer to the ranked masks)",
    )
    use_copy_features: bool = option(
        False,
        "give the policy the copy features of each token (does it repeat a token, bigram or trigram seen earlier in the"
        " window: what a causal reconstructor can copy)",
    )
    init_policy: str | None = option(
        None,
        "a finished run folder whose policy ('policy.safetensors' + 'policy.json') initialises this run's policy before"
        " distillation and RL, e.g. a 'total_timesteps 0' (distillation-only) run; a head this run's algorithm adds "
        "(token_ppo's per-token critic) starts fresh",
    )
    distill_steps: int = option(0, "steps of policy warm start by distillation from the reconstructor before RL (0: none)")
    distill_batch_size: int = option(32, "windows per distillation step")
    distill_lr: float = option(1e-3, "learning rate of the distillation (the initial one when distill_lr_schedule decays it)")
    distill_lr_schedule: str = option(
        "constant", "learning-rate schedule of the distillation: 'constant', or 'linear' / 'cosine' decay to 0 over distill_steps"
    )
    distill_updates_per_batch: int = option(
        1, "optimizer updates on each labelled distillation batch (labels cost a reconstructor pass; updates are cheap)"
    )
    distill_target: str = option(
        "rank",
        "'rank' (learn the labels of the cheapest tokens at the window's rate) or 'cost' (regress each token's "
        "surprisal given a compressed context)",
    )
    distill_teacher: str = option(
        "surprisal",
        "'surprisal' (labels: the cheapest tokens under the reconstructor in compressed contexts) or a masking method that "
        "queries the reconstructor ('greedy_threshold', 'search', 'self_information', 'iterative_self_information') whose "
        "masks on training windows the policy learns to reproduce (needs distill_target 'rank'; masks cached on disk)",
    )
    distill_teacher_windows: int = option(
        1024, "training windows a method teacher masks (a fixed random subset, the same for every seed, so seeds share the cached masks)"
    )
    distill_teacher_rates: int = option(7, "rates of a method teacher's masks, evenly spaced over the mask rate range")
    distill_save_freq: int = option(100, "distillation steps between checkpoints (0: only at the end of distillation and on Ctrl-C)")
    joint_training: bool = option(True, "fine-tune the reconstructor between rollouts")
    reconstructor_lr: float = option(5e-5, "learning rate of the reconstructor fine-tuning")
    reconstructor_steps: int = option(4, "optimizer steps per fine-tuning round")
    reconstructor_batch_size: int = option(16, "windows per fine-tuning micro-batch")
    reconstructor_grad_accum: int = option(1, "micro-batches per fine-tuning step (gradient accumulation)")
    joint_interval: int = option(1, "fine-tune every this many rollouts")
    random_mask_fraction: float = option(0.25, "fraction of fine-tuning windows under random masks (against forgetting)")
    save_freq: int = option(10_000, "environment steps between checkpoints (0: only at the end)")
    tensorboard: bool = option(True, "write TensorBoard events to '<run>/tb'")
    progress_bar: bool = option(True, "show SB3's progress bar")
    resume: bool = option(
        False,
        "continue from '<run>/checkpoints/latest'; the run's own 'config.json' supplies every option not given (only "
        "the options of RESUME_MAY_CHANGE may differ from it)",
    )
    trust_agent_pickle: bool = option(
        False,
        "resume even when the checkpoint's 'agent.zip' (a pickle, which can run code when loaded) has no recorded "
        "SHA-256 (older versions) or another one; only for runs you made yourself. Never saved in 'config.json'",
    )
    verbose: int = option(0, "SB3 verbosity")

    def validate(self) -> None:
        """Reject inconsistent values with a message that says what to change."""
        try:
            canonical_name(self.algo)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for key in POSITIVE_INTS:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)}")
        for key in ("total_timesteps", "distill_steps", "save_freq", "verbose"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be 0 or more, got {getattr(self, key)}")
        for key in ("policy_lr", "distill_lr", "reconstructor_lr", "bits_saved_per_mask", "clip_range", "init_logit_scale"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        for key, low, high in (("gamma", 0.0, 1.0), ("gae_lambda", 0.0, 1.0), ("random_mask_fraction", 0.0, 1.0)):
            if not low <= getattr(self, key) <= high:
                raise ConfigError(f"{key} must be in [{low:g}, {high:g}], got {getattr(self, key)}")
        if self.ent_coef < 0:
            raise ConfigError(f"ent_coef must be 0 or more, got {self.ent_coef}")
        if not 0.0 <= self.mask_rate_min <= self.mask_rate_max < 1.0:
            raise ConfigError("mask rates must satisfy 0 <= mask_rate_min <= mask_rate_max < 1")
        if self.seq_len % self.chunk_size:
            raise ConfigError(f"seq_len ({self.seq_len}) must be a multiple of chunk_size ({self.chunk_size})")
        if self.distill_target not in DISTILL_TARGETS:
            raise ConfigError(f"distill_target must be one of {', '.join(DISTILL_TARGETS)}, got '{self.distill_target}'")
        if self.distill_lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"distill_lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got '{self.distill_lr_schedule}'")
        if self.distill_teacher not in DISTILL_TEACHERS:
            raise ConfigError(f"distill_teacher must be one of {', '.join(DISTILL_TEACHERS)}, got '{self.distill_teacher}'")
        if self.distill_teacher != SURPRISAL_TEACHER and self.distill_target != "rank":
            raise ConfigError(f"distill_teacher '{self.distill_teacher}' gives masks, not costs: use distill_target 'rank'")
        if self.activation_fn not in HEAD_ACTIVATIONS:
            raise ConfigError(f"activation_fn must be one of {', '.join(HEAD_ACTIVATIONS)}, got '{self.activation_fn}'")
        if self.embed_kernel_size < 1 or self.embed_kernel_size % 2 == 0:
            raise ConfigError(f"embed_kernel_size must be odd and positive, got {self.embed_kernel_size}")
        if self.conv_kernel_size < 1 or self.conv_kernel_size % 2 == 0 or not self.conv_dilations or min(self.conv_dilations) < 1:
            raise ConfigError(
                "conv_kernel_size must be odd and positive and conv_dilations positive and not empty, "
                f"got {self.conv_kernel_size} and {list(self.conv_dilations)}"
            )
        if self.scoring_dtype not in SCORING_DTYPES:
            raise ConfigError(f"scoring_dtype must be one of {', '.join(SCORING_DTYPES)}, got '{self.scoring_dtype}'")
        if self.distill_save_freq < 0:
            raise ConfigError(f"distill_save_freq must be >= 0 (0: only at the end of distillation), got {self.distill_save_freq}")
        check_units(self.units)
        self.env_config()  # the environment options together (e.g. continuation_tokens against seq_len), before anything runs
        if not self.run_name.strip() or self.run_name.strip() in {".", ".."} or Path(self.run_name).is_absolute():
            raise ConfigError(f"run_name must name a folder inside --runs_dir, got {self.run_name!r}: pass e.g. --run_name my_run")
        parse_device(self.device)  # whether this machine has it: checked when the run starts (train)
        check_output_dir(self.runs_dir, "runs_dir")
        check_output_dir(self.run_dir, "run_name")

    def env_config(self, split: str = "train") -> EnvConfig:
        """The environment options of this run (the fields it shares with :class:`EnvConfig`, :data:`ENV_OPTIONS`).

        :param split: corpus split
        :return: the env config
        """
        return EnvConfig(split=split, **{name: getattr(self, name) for name in ENV_OPTIONS})

    @property
    def run_dir(self) -> Path:
        """The run folder.

        :return: ``<runs_dir>/<run_name>``
        """
        return Path(self.runs_dir) / self.run_name


def _algo_kwargs(config: TrainConfig) -> dict[str, Any]:
    """Keyword arguments of the chosen algorithm's constructor (PPO-family or A2C/TRPO subsets).

    :param config: the run config
    :return: keyword arguments
    """
    name = canonical_name(config.algo)
    kwargs: dict[str, Any] = {
        "learning_rate": config.policy_lr,
        "n_steps": config.n_steps,
        "gamma": config.gamma,
        "gae_lambda": config.gae_lambda,
        "seed": config.seed,
        "device": str(resolve_device(config.device)),
        "verbose": config.verbose,
    }
    if name in {"ppo", "maskable_ppo", "recurrent_ppo"}:
        kwargs.update(batch_size=config.batch_size, n_epochs=config.n_epochs, ent_coef=config.ent_coef, clip_range=config.clip_range)
    elif name == "a2c":
        kwargs.update(ent_coef=config.ent_coef)
    elif name == "trpo":
        kwargs.update(batch_size=config.batch_size)
    return kwargs


def make_training_env(config: TrainConfig, reconstructor: Reconstructor, split: str = "train") -> VecMonitor:
    """The batched TokenMask-v0 environment for training, as an SB3 ``VecEnv`` under ``VecMonitor``.

    :param config: the run config
    :param reconstructor: the shared reconstructor object (injected, never copied)
    :param split: corpus split
    :return: the environment
    """
    venv = TokenMaskVectorEnv(config.n_envs, config.env_config(split), reconstructor=reconstructor)
    env = TokenMaskSB3VecEnv(venv)
    env.seed(config.seed)
    return VecMonitor(env)


def saved_run_config(run_dir: Path) -> dict[str, Any] | None:
    """The options a run was started with (its ``config.json``, known keys only), or ``None`` without one.

    :param run_dir: the run folder
    :return: key -> value as saved
    """
    path = run_dir / CONFIG
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot resume: '{path}' is unreadable ({exc})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"cannot resume: '{path}' must hold a JSON object")
    fields = config_fields(TrainConfig)
    return {k: v for k, v in saved.items() if k in fields}


def resume_conflicts(config: TrainConfig, saved: dict[str, Any], keys: Any = None) -> list[str]:
    """Options of ``config`` that differ from the run's saved ones and may not change on resume.

    :param config: the config of the resume
    :param saved: the run's saved options (:func:`saved_run_config`)
    :param keys: the options to compare (default: all)
    :return: ``"key=value (the run has saved)"`` for each conflict
    """
    given = json.loads(json.dumps(asdict(config)))
    names = saved if keys is None else [k for k in keys if k in saved]
    return [f"{k}={given[k]!r} (the run has {saved[k]!r})" for k in names if k not in RESUME_MAY_CHANGE and given[k] != saved[k]]


def resume_config(config: TrainConfig, explicit: dict[str, Any], where: str) -> TrainConfig:
    """The config of a resume: the run's own ``config.json``, with the explicitly given options that may change.

    :param config: the config built from the explicit options and the defaults
    :param explicit: the options given on the command line or in a ``--config`` file
    :param where: where they came from (for messages)
    :return: the merged config
    """
    saved = saved_run_config(config.run_dir)
    if saved is None:
        return config  # _prepare_run_dir says what is missing
    conflicts = resume_conflicts(config, saved, explicit)
    if conflicts:
        raise ConfigError(
            f"cannot resume '{config.run_dir}' with {', '.join(conflicts)}: a resume reads the run's config.json, "
            f"so leave these options out (only {', '.join(RESUME_MAY_CHANGE[3:])} may change)"
        )
    given = asdict(config)
    return build_config(TrainConfig, {**saved, **{k: given[k] for k in explicit}, "resume": True}, where=f"the run's config.json + {where}")


def _prepare_run_dir(config: TrainConfig) -> Reconstructor:
    """Check the run folder (and, for a resume, its checkpoint) and load the reconstructor to train; writes nothing.

    :param config: the run config
    :return: the reconstructor (from the checkpoint when resuming)
    """
    run_dir = config.run_dir
    latest = latest_checkpoint(run_dir)
    if config.resume:
        saved = saved_run_config(run_dir)
        conflicts = [] if saved is None else resume_conflicts(config, saved)
        if conflicts:
            raise ConfigError(
                f"cannot resume '{run_dir}' with {', '.join(conflicts)}: resume with the run's own options "
                f"(on the command line, leave them out: a resume reads the run's config.json)"
            )
        recover_checkpoint(latest)
        if not latest.exists():
            raise CheckpointError(f"cannot resume: '{latest}' does not exist (run without --resume to start '{config.run_name}')")
        load_checkpoint_state(latest)
        verify_agent_file(latest, config.trust_agent_pickle)
        try:
            reconstructor = Reconstructor.from_pretrained(latest / RECONSTRUCTOR, device=config.device)
        except ReconstructorLoadError as exc:
            raise CheckpointError(f"cannot resume from '{latest}': {exc}") from None
    elif latest.exists() or is_finished_run(run_dir):
        raise TokenCompressError(
            f"run folder '{run_dir}' already holds a run: pass --resume true to continue it, or choose another --run_name"
        )
    else:
        reconstructor = load_or_build(config.reconstructor, device=config.device)
    if reconstructor.max_seq_len < config.seq_len:
        fits = reconstructor.max_seq_len // config.chunk_size * config.chunk_size
        raise ConfigError(
            f"seq_len {config.seq_len} exceeds the reconstructor's context of {reconstructor.max_seq_len} tokens: "
            f"pass --seq_len {fits} or less"
        )
    return reconstructor


def quiet_logger(verbose: int) -> Logger:
    """An SB3 logger that writes no files: standard output when ``verbose``, else nothing.

    Without TensorBoard, SB3's ``learn`` configures its logger with ``configure(None, ...)``, which creates
    a folder ``SB3-<date>`` in the system's temporary directory and leaves it there; training sets this
    logger instead.

    :param verbose: SB3 verbosity (0: no output)
    :return: the logger
    """
    return Logger(folder=None, output_formats=[HumanOutputFormat(sys.stdout)] if verbose else [])


def _init_policy_from(model: BaseAlgorithm, folder: str) -> None:
    """Load a finished run's policy weights into a new model (see ``TrainConfig.init_policy``).

    :param model: the new model
    :param folder: the finished run folder
    :raises ConfigError: when the weights do not fit the model's policy
    """
    artifact = load_policy_artifact(folder, "cpu")
    fresh = tuple(getattr(model.policy, "added_heads", ()))
    try:
        missing, unexpected = model.policy.load_state_dict(artifact.policy.state_dict(), strict=False)
    except RuntimeError as exc:  # shapes differ: another vocabulary, window or architecture
        raise ConfigError(f"init_policy '{folder}' does not fit this run's policy: {str(exc).splitlines()[0][:200]}") from None
    unfit = [k for k in missing if not k.startswith(fresh)] + list(unexpected)
    if unfit:
        raise ConfigError(f"init_policy '{folder}' does not fit this run's policy (keys {sorted(unfit)[:4]})")


def _load_agent(config: TrainConfig, latest: Path, env: VecMonitor) -> BaseAlgorithm:
    """Load the checkpoint's agent for a resume, with a one-line error when the file is corrupt.

    :param config: the run config
    :param latest: the checkpoint folder
    :param env: the training environment
    :return: the agent
    """
    # load_model checks agent.zip's SHA-256 (recorded in state.json) right before unpickling it
    return load_model(
        config.algo, latest / AGENT_ZIP, env=env, trust_pickle=config.trust_agent_pickle, device=str(resolve_device(config.device))
    )


def _distill(
    config: TrainConfig,
    model: BaseAlgorithm,
    reconstructor: Reconstructor,
    trainer: ReconstructorTrainer | None,
    env: VecMonitor,
    resolved: dict[str, Any],
) -> tuple[dict[str, Any] | None, bool]:
    """Distil the policy (or continue a resumed distillation), checkpointing as PPO does.

    A checkpoint (``phase: "distill"``, the step, the distillation optimizer) is written every
    ``distill_save_freq`` steps, at the end of distillation and on Ctrl-C, which stops it after the
    current step. A resumed run continues from its checkpoint's step; a checkpoint taken during PPO
    (or by an older version, which checkpointed only during PPO) means distillation is done.

    :param config: the run config
    :param model: the agent whose policy is distilled
    :param reconstructor: the reconstructor (teacher)
    :param trainer: the reconstructor's trainer (its optimizer goes into the checkpoints), if any
    :param env: the training environment (its windows are the distillation data)
    :param resolved: the config saved with the checkpoints
    :return: the distillation report (``None`` when nothing was left to distil) and whether Ctrl-C stopped it
    """
    latest = latest_checkpoint(config.run_dir)
    start, optimizer_state = 0, None
    if config.resume:
        state = load_checkpoint_state(latest)
        if state.get("phase") != "distill":
            return None, False
        start = int(state.get("distill_step", 0))
        optimizer_state = torch.load(latest / DISTILL_OPTIMIZER, map_location="cpu", weights_only=True)
    if start >= config.distill_steps:
        return None, False
    stop = False

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True  # acted on at the end of the current step, so the checkpoint is consistent

    def on_step(step: int, optimizer: torch.optim.Optimizer) -> bool:
        due = config.distill_save_freq > 0 and step % config.distill_save_freq == 0
        if stop or due or step >= config.distill_steps:
            state = {"phase": "distill", "distill_step": step}
            save_run_artifacts(latest, model, reconstructor, trainer, resolved, state, distill_optimizer=optimizer)
        return not stop

    windows = env.venv.venv.core.windows  # type: ignore[attr-defined]
    distill_logger = configure(str(config.run_dir / TENSORBOARD / "distill"), ["tensorboard"]) if config.tensorboard else None
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        report = distill_policy(
            model.policy,
            reconstructor,
            windows.token_ids,
            windows.valid,
            windows.force_keep,
            steps=config.distill_steps,
            batch_size=config.distill_batch_size,
            learning_rate=config.distill_lr,
            lr_schedule=config.distill_lr_schedule,
            updates_per_batch=config.distill_updates_per_batch,
            target=config.distill_target,
            teacher=config.distill_teacher,
            teacher_windows=config.distill_teacher_windows,
            teacher_rates=config.distill_teacher_rates,
            units=config.units,
            scoring_dtype=config.scoring_dtype,
            mask_rate_min=config.mask_rate_min,
            mask_rate_max=config.mask_rate_max,
            observe_surprisal=config.observe_surprisal,
            seed=config.seed,
            progress=config.progress_bar,
            logger=distill_logger,
            start_step=start,
            optimizer_state=optimizer_state,
            callback=on_step,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
        if distill_logger is not None:
            distill_logger.close()
    report = {**report, "resumed_from_step": start}
    return report, stop


def train(config: TrainConfig) -> dict[str, Any]:
    """Train an agent (and fine-tune the reconstructor) as ``config`` says; returns a summary.

    :param config: the run config
    :return: summary with the run folder, timesteps, seconds and final rollout metrics
    :raises ConfigError: when launched as several processes (the agent is not distributed)
    """
    if launched_processes() > 1:  # every process would train its own agent into the same run folder
        raise ConfigError(
            f"train_ppo runs as one process, but {launched_processes()} were launched: start it with plain "
            "'python -m experiments.train_ppo' (the reconstructor's pretraining runs on several: "
            "'accelerate launch ... -m experiments.pretrain_reconstructor')"
        )
    torch.manual_seed(config.seed)
    resolve_device(config.device)  # a device this machine lacks fails here, before any work
    reconstructor = _prepare_run_dir(config)
    run_dir = config.run_dir
    resolved = asdict(config)
    resolved.pop("trust_agent_pickle")  # a trust given once on the command line is never inherited through config.json
    env = make_training_env(config, reconstructor)  # loads the corpus: fails before anything is written
    tensorboard_log = str(run_dir / TENSORBOARD) if config.tensorboard else None
    latest = latest_checkpoint(run_dir)
    model: BaseAlgorithm
    if config.resume:
        model = _load_agent(config, latest, env)
        model.tensorboard_log = tensorboard_log
    else:
        model = make_model(
            config.algo,
            env,
            features_extractor_kwargs={
                "embed_dim": config.embed_dim,
                "hidden_dim": config.hidden_dim,
                "use_decisions": config.use_decisions,
                "use_copy_features": config.use_copy_features,
                "kernel_size": config.conv_kernel_size,
                "dilations": list(config.conv_dilations),
                "separable": config.separable_conv,
                "embed_kernel_size": config.embed_kernel_size,
            },
            policy_kwargs={"rate_calibrated": config.rate_calibrated, "activation_fn": HEAD_ACTIVATIONS[config.activation_fn]},
            tensorboard_log=tensorboard_log,
            **_algo_kwargs(config),
        )
        if config.init_policy:
            _init_policy_from(model, config.init_policy)
        if config.init_logit_scale != 1.0:
            with torch.no_grad():  # a positive factor on the last linear layer: every logit scaled, no order changed
                for parameter in model.policy.action_net.parameters():  # type: ignore[union-attr]
                    parameter.mul_(config.init_logit_scale)
    if tensorboard_log is None:
        model.set_logger(quiet_logger(config.verbose))
    run_dir.mkdir(parents=True, exist_ok=True)
    if not config.resume:
        reconstructor.save_pretrained(run_dir / REFERENCE_RECONSTRUCTOR, build_info={"source": config.reconstructor})
    (run_dir / CONFIG).write_text(json.dumps(resolved, indent=2, sort_keys=True))
    # The reconstructor's trainer (model, optimizer, rounds) is shared by the fine-tuning and checkpoint callbacks.
    trainer = ReconstructorTrainer(reconstructor, learning_rate=config.reconstructor_lr) if config.joint_training else None
    finetune = (
        ReconstructorFinetuneCallback(
            trainer,
            gradient_steps=config.reconstructor_steps,
            batch_size=config.reconstructor_batch_size,
            gradient_accumulation=config.reconstructor_grad_accum,
            interval=config.joint_interval,
            random_mask_fraction=config.random_mask_fraction,
            seed=config.seed,
        )
        if trainer is not None
        else None
    )
    if trainer is not None and config.resume:
        load_reconstructor_optimizer(trainer, latest)
    distill_report, interrupted = _distill(config, model, reconstructor, trainer, env, resolved)
    checkpoint = JointCheckpointCallback(config.save_freq, run_dir, reconstructor, trainer, resolved, verbose=config.verbose)
    metrics = CompressionMetricsCallback()
    callbacks = [metrics, *([finetune] if finetune else []), checkpoint]

    def _on_sigint(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, _on_sigint)
    started = time.perf_counter()
    try:
        if not interrupted:
            model.learn(
                total_timesteps=max(0, config.total_timesteps - model.num_timesteps) if config.resume else config.total_timesteps,
                callback=CallbackList(callbacks),
                tb_log_name=TB_LOG_NAME,
                reset_num_timesteps=not config.resume,
                progress_bar=config.progress_bar,
            )
    except KeyboardInterrupt:
        interrupted = True
        checkpoint.save()
    finally:
        signal.signal(signal.SIGINT, previous)
        env.close()
    if interrupted:
        print(f"Interrupted: checkpoint saved to {checkpoint.path}; continue with --resume true")
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "algo": canonical_name(config.algo),
        "num_timesteps": int(model.num_timesteps),
        "seconds": seconds,
        "interrupted": interrupted,
        "scoring_dtype": str(env.venv.venv.core.scorer.dtype).removeprefix("torch."),  # type: ignore[attr-defined]
        "finetune_rounds": trainer.rounds if trainer else 0,
        "distillation": distill_report,
        "last_reconstructor_loss": trainer.last_loss if trainer else None,
        "last_rollout": metrics.last_values,
    }
    if not interrupted:
        # The final checkpoint is the run's result: publish a copy of it at the run's root.
        publish_run_result(checkpoint.save(), run_dir)
    return summary


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m experiments.train_ppo``.

    :param argv: command-line arguments
    """
    values, where = parse_config_values(TrainConfig, argv, description=__doc__ or "")
    config = build_config(TrainConfig, values, where=where)
    if config.resume:
        config = resume_config(config, values, where)
    summary = train(config)
    print(json.dumps(summary, indent=2, default=str))
    if summary["interrupted"]:
        raise SystemExit(130)  # the checkpoint is saved; 130 tells scripts the run has not finished


if __name__ == "__main__":
    raise SystemExit(main())
