"""The main job on the embedded default, end to end on a CPU: the README's first Quickstart command.

1. the ``tiny`` reconstructor: built and cached on first use (BPE tokenizer + small GPT-2 pretrained on
   the embedded corpus under random masks), reused afterwards;
2. the agent, as ``--train_config`` says, into ``runs/quickstart``: by default
   ``experiments/configs/dev/quickstart.json``, distilled from the reconstructor's per-token surprisal
   with no RL (the recipe chosen on the validation split within the time budget);
   ``configs/dev/small_scale.json``, the earlier quickstart's, distils and then trains PPO jointly with
   the reconstructor. A finished run is reused, an interrupted one resumed, and one of another config
   refused;
3. evaluation on the held-out test split (documents never trained on): the policy against the
   baselines at matched mask rates, scored by the frozen reference reconstructor (and by the jointly
   trained one when RL fine-tuned it);
4. the results table, and where the plot and files are.

Examples::

    python -m experiments.quickstart
    python -m experiments.quickstart --data ../shared/data/wikitext2-valid.txt   # also evaluate on a text file
    python -m experiments.quickstart --train_config experiments/configs/dev/small_scale.json --run_name quickstart_ppo
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.config import build_config, cli_main, load_config_file, parse_config
from experiments.evaluate import EvaluateConfig, run_evaluation
from experiments.train_ppo import TrainConfig, resume_conflicts, saved_run_config, train
from tokencompress_env.baselines import BASELINE_NAMES
from tokencompress_env.errors import ConfigError
from tokencompress_env.options import option, option_factory
from tokencompress_env.presets import load_or_build
from tokencompress_env.run_folder import has_checkpoint, is_finished_run

ROOT = Path(__file__).resolve().parent


@dataclass
class QuickstartConfig:
    """Options of ``experiments.quickstart``.

    Each option is documented at its field (``--help`` prints the docs).
    """

    run_name: str = option("quickstart", "run folder name under 'runs_dir'")
    runs_dir: str = option("runs", "parent folder of runs")
    train_config: str = option(str(ROOT / "configs" / "dev" / "quickstart.json"), "JSON config of the training stage")
    mask_rates: list[float] = option_factory(lambda: [0.2, 0.4, 0.6, 0.8], "requested mask rates of the evaluation")
    max_windows: int = option(128, "held-out windows evaluated per data set")
    methods: list[str] = option_factory(
        lambda: ["policy", *[m for m in BASELINE_NAMES if m != "greedy_threshold"]],
        "methods evaluated ('greedy_threshold' is left out by default: minutes on a CPU)",
    )
    data: str | None = option(None, "an extra plain-text file to evaluate on (e.g. '../shared/data/wikitext2-valid.txt')")
    device: str = option("auto", "'auto', 'cpu', 'cuda' or 'mps'")
    progress_bar: bool = option(True, "show progress bars")


def _stage(title: str, started: float) -> None:
    """Print a stage banner with the elapsed time.

    :param title: the stage
    :param started: ``time.perf_counter()`` at the job's start
    """
    print(f"\n=== [{time.perf_counter() - started:6.0f}s] {title} ===", flush=True)


def describe_training(config: TrainConfig) -> str:
    """Say in words what a training config's stages are, for the quickstart's banner.

    :param config: the training stage's options
    :return: e.g. ``"distillation from the reconstructor (no RL)"``
    """
    stages = []
    if config.distill_steps > 0:
        stages.append(f"distillation from the reconstructor ({config.distill_steps} labelled batches)")
    if config.total_timesteps > 0:
        partner = "jointly with the reconstructor" if config.joint_training else "with a frozen reconstructor"
        stages.append(f"{config.algo.upper()} {partner} ({config.total_timesteps} steps)")
    if not stages:
        return "nothing to train (distill_steps and total_timesteps are both 0)"
    return ", then ".join(stages) + ("" if config.total_timesteps > 0 else " (no RL)")


def quickstart(config: QuickstartConfig) -> dict[str, Any]:
    """Run the whole job; returns where everything is and the wall time of each stage.

    :param config: the options
    :return: summary
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    # the training config is read first, so that a mistake in it fails before the reconstructor's build
    values = load_config_file(config.train_config) | {
        "run_name": config.run_name,
        "runs_dir": config.runs_dir,
        "device": config.device,
        "progress_bar": config.progress_bar,
    }
    train_config = build_config(TrainConfig, values, where=f"config file '{config.train_config}'")
    _stage("1/3 reconstructor (tiny preset: built on first use, then cached)", started)
    t = time.perf_counter()
    reconstructor = load_or_build("tiny", device=config.device)
    print(f"tiny reconstructor: {reconstructor.num_parameters() / 1e6:.1f}M parameters, vocabulary {reconstructor.vocab_size}")
    del reconstructor
    timings["reconstructor_s"] = time.perf_counter() - t

    _stage(f"2/3 agent: {describe_training(train_config)}", started)
    t = time.perf_counter()
    run_dir = train_config.run_dir
    saved = saved_run_config(run_dir)
    conflicts = resume_conflicts(train_config, saved) if saved is not None else []
    if conflicts:
        raise ConfigError(
            f"'{run_dir}' holds a run of another training config ({', '.join(conflicts)}), e.g. an earlier "
            "version's quickstart: delete it or pass another --run_name"
        )
    if is_finished_run(run_dir):
        print(f"reusing the finished run in {run_dir} (delete it to train again)")
    else:
        train_config.resume = has_checkpoint(run_dir)
        if train_config.resume:
            print(f"resuming the interrupted run in {run_dir}")
        summary = train(train_config)
        if summary["interrupted"]:
            raise KeyboardInterrupt
    timings["train_s"] = time.perf_counter() - t

    _stage("3/3 evaluation on held-out text at matched mask rates", started)
    t = time.perf_counter()
    outputs = {}
    datasets = [("embedded_test", None), *([("data", config.data)] if config.data else [])]
    for name, data in datasets:
        out = run_dir / "eval" / name
        run_evaluation(
            EvaluateConfig(
                run=[str(run_dir)],
                data=data,
                mask_rates=list(config.mask_rates),
                methods=list(config.methods),
                max_windows=config.max_windows,
                out=str(out),
                device=config.device,
            )
        )
        outputs[name] = {"table": str(out / "results.md"), "plot": str(out / "rate_distortion.png"), "json": str(out / "results.json")}
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    summary_out = {"run_dir": str(run_dir), "outputs": outputs, "timings": timings}
    (run_dir / "quickstart.json").write_text(json.dumps(summary_out, indent=2))
    print(json.dumps(summary_out, indent=2))
    plot = outputs["embedded_test"]["plot"]
    print(f"\nDone in {timings['total_s']:.0f}s. Plot: {plot}  TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    return summary_out


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m experiments.quickstart``.

    :param argv: command-line arguments
    """
    quickstart(parse_config(QuickstartConfig, argv, description=__doc__ or ""))


if __name__ == "__main__":
    raise SystemExit(main())
