"""Ablations: what each part of the agent's training adds, on the validation split, over several seeds.

Each *variant* is the base training config with a few keys changed (:data:`VARIANTS`):

* ``distill_only``: the distillation warm start and no reinforcement learning;
* ``ppo_only``: PPO from a random policy, no warm start;
* ``distill_ppo``: the warm start, then PPO jointly with the reconstructor (the full method);
* ``distill_ppo_frozen``: the same with the reconstructor frozen (no joint fine-tuning);
* ``distill_ppo_decisions``: the full method with a policy that sees its earlier decisions;
* ``distill_token_ppo``: the warm start, then PPO with per-token advantages (:mod:`agents.token_ppo`)
  jointly with the reconstructor;
* ``cost_target_only``: the distillation regresses each token's surprisal (``distill_target="cost"``)
  instead of classifying the cheapest tokens at the window's rate, no RL;
* ``cost_fast_only``: ``cost_target_only`` with the fast policy: four depthwise-separable convolution
  blocks of kernel 7 (``separable_conv``, ``conv_kernel_size``, ``conv_dilations``: the same 49-token
  receptive field) and ReLU heads (``activation_fn``), for a ``compress()`` about twice as fast;
* ``cost_fast_ngram_only``: the fast policy whose tokens' inputs sum the projected embeddings of the 5
  tokens centred on them (``embed_kernel_size``: a linear convolution over the embeddings, looked up in
  a table at inference);
* ``cost_ngram_only``: ``cost_target_only`` with that token window (default network otherwise);
* ``cost_cosine_only``: ``cost_target_only`` with the distillation's learning rate decayed to 0 on a
  half cosine (``distill_lr_schedule="cosine"``) instead of held constant;
* ``cost_high_lr_only``: ``cost_target_only`` with twice the distillation's learning rate (``distill_lr=2e-3``);
* ``cost_replay_only``: ``cost_high_lr_only`` with four updates on each labelled batch
  (``distill_updates_per_batch=4``): four times the updates for about 1.7 times the time, as the labels'
  forward pass costs several times an update;
* ``cost_half_labels_only``: the same number of updates from half the labelled batches (500 batches,
  eight updates on each): whether labels or updates limit the distillation;
* ``cost_quick8_only`` and ``cost_quick16_only``: sized for the quickstart's time budget (5 to 6
  minutes of distillation on 2 cores): 250 labelled batches with eight updates on each, or 170 with
  sixteen; ``cost_quick8_only`` is the quickstart's;
* ``cost_target_ppo``: the ``cost_target_only`` warm start, then PPO jointly with the reconstructor;
* ``cost_calibrated_ppo``: PPO from the ``cost_target_only`` policy with rate-calibrated logits (each
  window's logits shifted so that the expected drops meet the target, ``rate_calibrated``): the same
  ranking at the start, and PPO can change only the order and the sharpness;
* ``distill_calibrated_ppo``: the same from the ``distill_only`` policy;
* ``cost_sharp_ppo``: ``cost_calibrated_ppo`` with the head's output layer scaled by 12 at the start
  (``init_logit_scale``): the same ranking, sampled almost as the ranked masks, so that PPO explores
  only near each rate's cut;
* ``cost_sharp_start``: that policy before PPO (no RL steps): the same ranked masks as ``cost_target_only``,
  and the sampled ones PPO starts from (``experiments.evaluate --methods policy policy_sampled``);
* ``greedy_teacher_only``: the warm start imitates the masks of the ``greedy_threshold`` heuristic
  (``distill_teacher``, :func:`agents.distill.teacher_masks`) instead of the surprisal labels, no RL;
* ``greedy_teacher_ppo``: that warm start, then PPO jointly with the reconstructor;
* ``search_teacher_only``: the warm start imitates the search bound's masks (``distill_teacher="search"``
  on 512 windows: slow on a CPU, seconds per window on a GPU; the masks are cached), no RL;
* ``distill_continuation_ppo``: the surprisal warm start, then PPO on the downstream reward
  (``reward_type="continuation"``) jointly with the reconstructor; evaluate it with the downstream
  reading (``--continuation_tokens``).

Every variant is trained with every seed (``runs/ablate/<variant>__s<seed>``; finished runs are reused, so
an interrupted ablation continues where it stopped) and evaluated with :mod:`experiments.evaluate` on the
**validation** split: the same windows, rates and exact rate control for every variant and baseline, the
masks scored by the frozen reference reconstructor. The table (``ablation.md``, ``ablation.json``) gives
each variant's bits per dropped token, mean ± standard deviation over the seeds, and its paired difference
to each baseline on the same windows (per-window figures averaged over the seeds, then a 95 % bootstrap
interval over documents: :mod:`tokencompress_env.evaluation`).

The base config defaults to ``configs/dev/small_scale.json``, the earlier quickstart's, so ``distill_ppo``
is the earlier quickstart's configuration; the quickstart's own (``configs/dev/quickstart.json``) is that
base with the keys of ``cost_quick8_only`` (a test keeps the two equal). The variants of
:data:`SHARED_DISTILLATION` continue the finished distillation-only run of their seed that it names
(``distill_ppo`` continues ``distill_only``), those of :data:`INIT_FROM_DISTILLATION` start from that
run's policy (``init_policy``; token_ppo's per-token critic starts fresh), and every other variant
distils its own policy.

Examples::

    python -m experiments.ablate                                          # every variant but the opt-in ones x 3 seeds
    for s in 0 1 2; do python -m experiments.ablate --seeds $s --train_only true & done; wait   # one process per seed
    python -m experiments.ablate                                          # then: evaluate the finished runs
    python -m experiments.ablate --base_config experiments/configs/dev/debug.json --seeds 0 --max_windows 8   # seconds
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from experiments.config import build_config, cli_main, load_config_file, parse_config
from experiments.evaluate import EvaluateConfig, run_evaluation
from experiments.train_ppo import TrainConfig, train
from tokencompress_env.errors import ConfigError
from tokencompress_env.evaluation import POOLED, WINDOW_STATS_FILE, paired_difference_between
from tokencompress_env.options import option, option_factory
from tokencompress_env.run_folder import CHECKPOINTS, CONFIG, REFERENCE_RECONSTRUCTOR, has_checkpoint, is_finished_run

ROOT = Path(__file__).resolve().parent

#: The fast policy's network: four depthwise-separable blocks of kernel 7 (the default's 49-token field), ReLU heads.
FAST_POLICY: dict[str, Any] = {"separable_conv": True, "conv_kernel_size": 7, "conv_dilations": [1, 2, 4, 1], "activation_fn": "relu"}
#: The cost-target distillation at twice the default learning rate, no RL: the base of the update/label variants.
COST_HIGH_LR: dict[str, Any] = {"total_timesteps": 0, "distill_target": "cost", "distill_lr": 2e-3}
#: Variant name -> the training keys it changes.
VARIANTS: dict[str, dict[str, Any]] = {
    "distill_only": {"total_timesteps": 0},
    "ppo_only": {"distill_steps": 0},
    "distill_ppo": {},
    "distill_ppo_frozen": {"joint_training": False},
    "distill_ppo_decisions": {"use_decisions": True},
    "distill_token_ppo": {"algo": "token_ppo", "distill_steps": 0},
    "cost_target_only": {"total_timesteps": 0, "distill_target": "cost"},
    "cost_fast_only": {"total_timesteps": 0, "distill_target": "cost", **FAST_POLICY},
    "cost_fast_ngram_only": {"total_timesteps": 0, "distill_target": "cost", **FAST_POLICY, "embed_kernel_size": 5},
    "cost_ngram_only": {"total_timesteps": 0, "distill_target": "cost", "embed_kernel_size": 5},
    "cost_cosine_only": {"total_timesteps": 0, "distill_target": "cost", "distill_lr_schedule": "cosine"},
    "cost_high_lr_only": {**COST_HIGH_LR},
    "cost_replay_only": {**COST_HIGH_LR, "distill_updates_per_batch": 4},
    "cost_half_labels_only": {**COST_HIGH_LR, "distill_updates_per_batch": 8, "distill_steps": 500},
    "cost_quick8_only": {**COST_HIGH_LR, "distill_updates_per_batch": 8, "distill_steps": 250},
    "cost_quick16_only": {**COST_HIGH_LR, "distill_updates_per_batch": 16, "distill_steps": 170},
    "cost_target_ppo": {"distill_target": "cost"},
    "cost_calibrated_ppo": {"distill_steps": 0, "rate_calibrated": True},
    "distill_calibrated_ppo": {"distill_steps": 0, "rate_calibrated": True},
    "cost_sharp_ppo": {"distill_steps": 0, "rate_calibrated": True, "init_logit_scale": 12.0},
    "cost_sharp_start": {"distill_steps": 0, "total_timesteps": 0, "rate_calibrated": True, "init_logit_scale": 12.0},
    "greedy_teacher_only": {"total_timesteps": 0, "distill_teacher": "greedy_threshold"},
    "greedy_teacher_ppo": {"distill_teacher": "greedy_threshold"},
    "search_teacher_only": {"total_timesteps": 0, "distill_teacher": "search", "distill_teacher_windows": 512},
    "distill_continuation_ppo": {"reward_type": "continuation"},
}

#: Variants that continue the finished distillation-only run of their seed (the value) rather than distilling again.
SHARED_DISTILLATION = {
    "distill_ppo": "distill_only",
    "distill_ppo_frozen": "distill_only",
    "greedy_teacher_ppo": "greedy_teacher_only",
    "cost_target_ppo": "cost_target_only",
    "distill_continuation_ppo": "distill_only",
}
#: Variants left out of the default list: the search teacher needs minutes of CPU per window (compute its
#: cached masks on a GPU first, see :func:`agents.distill.teacher_masks`).
OPT_IN_VARIANTS = ("search_teacher_only",)
#: Variants of another algorithm that start from the distilled policy of the seed's distillation-only run (the value).
INIT_FROM_DISTILLATION = {
    "distill_token_ppo": "distill_only",
    "cost_calibrated_ppo": "cost_target_only",
    "cost_sharp_ppo": "cost_target_only",
    "cost_sharp_start": "cost_target_only",
    "distill_calibrated_ppo": "distill_only",
}


@dataclass
class AblateConfig:
    """Options of ``experiments.ablate``.

    Each option is documented at its field (``--help`` prints the docs).
    """

    base_config: str = option(
        str(ROOT / "configs" / "dev" / "small_scale.json"),
        "JSON config of the training runs (the base every variant changes)",
    )
    variants: list[str] = option_factory(
        lambda: [v for v in VARIANTS if v not in OPT_IN_VARIANTS], "variants to run (see VARIANTS; the default leaves out OPT_IN_VARIANTS)"
    )
    seeds: list[int] = option_factory(lambda: [0, 1, 2], "seeds of each variant")
    runs_dir: str = option("runs/ablate", "parent folder of the ablation's runs")
    out: str | None = option(None, "folder of 'ablation.md' and 'ablation.json' (default: '<runs_dir>/results')")
    split: str = option("validation", "held-out split of the evaluation ('validation': the ablation chooses; never 'test')")
    mask_rates: list[float] = option_factory(lambda: [0.2, 0.4, 0.6, 0.8], "requested mask rates")
    max_windows: int = option(128, "evaluated windows")
    baselines: list[str] = option_factory(
        lambda: ["frequency", "self_information"], "baselines evaluated beside the variants (on the same windows)"
    )
    device: str = option("auto", "'auto', 'cpu', 'cuda' or 'mps'")
    progress_bar: bool = option(False, "show progress bars")
    train_only: bool = option(
        False,
        "train the runs and stop (e.g. one process per seed in parallel; a later call without it reuses the finished runs and evaluates)",
    )
    compare_to: str = option(
        "distill_only",
        "the variant every other one is compared with, paired by window (its policy's bits subtracted from theirs, "
        "interval over documents); ignored when it is not among the variants",
    )

    def validate(self) -> None:
        """Reject unknown variants and an empty seed list."""
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
        if not self.seeds:
            raise ConfigError("give at least one seed")
        if self.compare_to not in VARIANTS:
            raise ConfigError(f"compare_to must be a variant, got '{self.compare_to}'; valid: {', '.join(VARIANTS)}")
        if self.split == "test":
            print("warning: ablations choose configurations; run them on the validation split, not test", file=sys.stderr)


def run_name(variant: str, seed: int) -> str:
    """The run folder name of one variant and seed.

    :param variant: a key of :data:`VARIANTS`
    :param seed: the seed
    :return: ``<variant>__s<seed>``
    """
    return f"{variant}__s{seed}"


def _branch_from_distillation(source: Path, target: Path, values: dict[str, Any]) -> None:
    """Start a run from a finished distillation-only run: its checkpoint, with the variant's config.

    The distilled policy, the untouched reconstructor and the frozen reference are copied; the copy is an
    unfinished run (no published result at its root) whose ``config.json`` is the variant's, so that
    ``train_ppo``'s resume continues it with the variant's PPO settings.

    :param source: the finished ``distill_only`` run of the same seed
    :param target: the new run folder (must not exist)
    :param values: the variant's resolved training config
    """
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source / CHECKPOINTS, partial / CHECKPOINTS)
    shutil.copytree(source / REFERENCE_RECONSTRUCTOR, partial / REFERENCE_RECONSTRUCTOR)
    (partial / CONFIG).write_text(json.dumps(values, indent=2, sort_keys=True))
    partial.rename(target)


def train_variant(config: AblateConfig, variant: str, seed: int) -> Path:
    """Train one variant with one seed (reusing a finished run, resuming an interrupted one).

    The variants of :data:`SHARED_DISTILLATION` continue the finished distillation-only run of the same seed
    (trained first when missing) instead of distilling again: the same distilled policy, so that their
    differences come from what follows the distillation alone.

    :param config: the ablation's options
    :param variant: a key of :data:`VARIANTS`
    :param seed: the seed
    :return: the run folder
    """
    values = load_config_file(config.base_config) | VARIANTS[variant]
    values |= {"run_name": run_name(variant, seed), "runs_dir": config.runs_dir, "seed": seed, "device": config.device}
    values["progress_bar"] = config.progress_bar
    if variant in INIT_FROM_DISTILLATION:
        values["init_policy"] = str(train_variant(config, INIT_FROM_DISTILLATION[variant], seed))
    train_config = build_config(TrainConfig, values, where=f"variant '{variant}'")
    run_dir = train_config.run_dir
    if is_finished_run(run_dir):
        return run_dir
    if variant in SHARED_DISTILLATION and train_config.distill_steps > 0 and not run_dir.exists():
        source = train_variant(config, SHARED_DISTILLATION[variant], seed)
        resolved = asdict(train_config)
        resolved.pop("trust_agent_pickle", None)
        _branch_from_distillation(source, run_dir, resolved)
    train_config.resume = has_checkpoint(run_dir)
    summary = train(train_config)
    if summary["interrupted"]:
        raise KeyboardInterrupt
    return run_dir


def _pooled(records: list[dict[str, Any]], method: str, rate: float) -> dict[str, Any]:
    """The record of one method at one rate under the reference reconstructor, pooled over the runs.

    :param records: evaluation records of several runs (the pooled ones have ``run == "pooled"``)
    :param method: the method's name in the records
    :param rate: the requested rate
    :return: the record
    """
    matches = [
        r for r in records if r["method"] == method and r["reconstructor"] == "reference" and abs(r["requested_mask_rate"] - rate) < 1e-9
    ]
    pooled = [r for r in matches if r.get("run") == POOLED]
    if not (pooled or matches):
        raise KeyError(f"no record of {method} at rate {rate}")
    return (pooled or matches)[0]


def ablation_rows(results: dict[str, list[dict[str, Any]]], baselines: Sequence[str], rates: Sequence[float]) -> dict[str, Any]:
    """The ablation table: each variant's figures and its paired difference to each baseline, per rate.

    :param results: variant -> the records of its runs, evaluated together (``experiments.evaluate``)
    :param baselines: the baselines evaluated with them
    :param rates: requested rates
    :return: name -> rate -> figures (variants: ``mean``, ``std``, ``seeds`` and ``vs`` with each baseline's
        paired difference and interval; baselines: ``mean``)
    """
    rows: dict[str, Any] = {}
    for variant, records in results.items():
        rows[variant] = {}
        for rate in rates:
            policy = _pooled(records, "policy", rate)
            seeds = policy.get("bits_per_masked_token_per_seed") or [policy["bits_per_masked_token"]]
            versus = {}
            for name in baselines:
                other = _pooled(records, name, rate)
                versus[name] = {
                    "difference": other["policy_minus_method_bits_per_masked_token"],
                    "ci95": other["policy_minus_method_bits_per_masked_token_ci95"],
                }
            rows[variant][str(rate)] = {
                "mean": policy.get("bits_per_masked_token_seed_mean", policy["bits_per_masked_token"]),
                "std": policy.get("bits_per_masked_token_seed_std") or 0.0,
                "seeds": seeds,
                "vs": versus,
            }
    first = next(iter(results.values()))
    for name in baselines:
        rows[name] = {str(rate): {"mean": _pooled(first, name, rate)["bits_per_masked_token"]} for rate in rates}
    return rows


def variant_differences(out: Path, variants: Sequence[str], compare_to: str, rates: Sequence[float]) -> dict[str, dict[str, Any]]:
    """Each variant's policy minus ``compare_to``'s, paired by window, with an interval over documents.

    Both were evaluated on the same windows (same split, windows and seed), pooled over their seeds;
    the per-window sums come from each evaluation's ``window_stats.npz``.

    :param out: the ablation's output folder (one evaluation folder per variant)
    :param variants: the variants
    :param compare_to: the variant subtracted
    :param rates: requested rates
    :return: variant -> rate -> ``{"difference", "ci95"}`` (``compare_to`` itself left out)
    """
    base = out / compare_to / WINDOW_STATS_FILE
    table: dict[str, dict[str, Any]] = {}
    for variant in variants:
        if variant == compare_to:
            continue
        table[variant] = {}
        for rate in rates:
            difference, low, high = paired_difference_between(out / variant / WINDOW_STATS_FILE, base, rate)
            table[variant][str(rate)] = {"difference": difference, "ci95": [low, high]}
    return table


def _finished_evaluation(eval_config: EvaluateConfig) -> list[dict[str, Any]] | None:
    """The records of an earlier evaluation with the same options (its ``eval_config.json``), if one was written.

    :param eval_config: the evaluation about to run
    :return: its records, or ``None`` when they must be computed
    """
    folder = Path(str(eval_config.out))
    if not all((folder / name).is_file() for name in ("results.json", "eval_config.json", WINDOW_STATS_FILE)):
        return None
    saved = json.loads((folder / "eval_config.json").read_text())
    wanted = json.loads(json.dumps(asdict(eval_config)))
    if any(saved.get(k) != v for k, v in wanted.items() if k != "device"):
        return None
    records: list[dict[str, Any]] = json.loads((folder / "results.json").read_text())
    return records


def ablate(config: AblateConfig) -> dict[str, Any]:
    """Train and evaluate every variant with every seed; write and return the table.

    :param config: the options
    :return: the table and where it was written
    """
    config.validate()
    started = time.perf_counter()
    out = Path(config.out) if config.out else Path(config.runs_dir) / "results"
    results: dict[str, list[dict[str, Any]]] = {}
    for variant in config.variants:
        run_dirs = []
        for seed in config.seeds:
            print(f"=== {variant}, seed {seed} ===", flush=True)
            run_dirs.append(str(train_variant(config, variant, seed)))
        if config.train_only:
            continue
        eval_config = EvaluateConfig(
            run=run_dirs,
            split=config.split,
            mask_rates=list(config.mask_rates),
            methods=["policy", *config.baselines],
            max_windows=config.max_windows,
            continuation_tokens=0,
            out=str(out / variant),
            device=config.device,
        )
        results[variant] = _finished_evaluation(eval_config) or run_evaluation(eval_config)
    if config.train_only:
        return {"trained": [run_name(v, s) for v in config.variants for s in config.seeds]}
    rows = ablation_rows(results, config.baselines, config.mask_rates)
    if config.compare_to in config.variants:
        for variant, by_rate in variant_differences(out, config.variants, config.compare_to, config.mask_rates).items():
            for rate, figures in by_rate.items():
                rows[variant][rate]["vs_variant"] = {config.compare_to: figures}
    summary = {"config": asdict(config), "split": config.split, "rows": rows, "seconds": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    (out / "ablation.md").write_text(ablation_markdown(rows, config))
    print((out / "ablation.md").read_text())
    return summary


def _cell(row: dict[str, Any], baseline: str) -> str:
    """One table cell: mean ± std over seeds, then the paired difference to a baseline and its interval.

    :param row: a variant's figures at one rate
    :param baseline: the baseline of the difference
    :return: the cell's text
    """
    vs = row["vs"][baseline]
    lo, hi = vs["ci95"]
    diff = "n/a" if vs["difference"] is None else f"{vs['difference']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    return f"{row['mean']:.3f} ± {row['std']:.3f} ({diff})"


def ablation_markdown(rows: dict[str, Any], config: AblateConfig) -> str:
    """The ablation table as Markdown.

    :param rows: from :func:`ablation_rows`
    :param config: the options (split, seeds, rates)
    :return: the Markdown text
    """
    rates = [str(r) for r in config.mask_rates]
    against = config.baselines[-1]
    lines = [
        f"Bits per dropped token (reference reconstructor, {config.split} split, {config.max_windows} windows), mean ± std over "
        f"seeds {', '.join(map(str, config.seeds))}; lower is better. In brackets: the paired difference to `{against}` on the same "
        "windows (pooled over seeds) and its 95% interval over documents; negative means the variant drops cheaper tokens.",
        "",
        "| variant | " + " | ".join(rates) + " |",
        "|---|" + "---:|" * len(rates),
    ]
    for name in config.variants:
        lines.append(f"| {name} | " + " | ".join(_cell(rows[name][r], against) for r in rates) + " |")
    for name in config.baselines:
        lines.append(f"| {name} | " + " | ".join(f"{rows[name][r]['mean']:.3f}" for r in rates) + " |")
    compared = [v for v in config.variants if config.compare_to in rows[v][rates[0]].get("vs_variant", {})]
    if compared:
        lines += [
            "",
            f"Paired difference to `{config.compare_to}`: the variant's bits per dropped token minus `{config.compare_to}`'s on the "
            "same windows (pooled over seeds), and its 95% interval over documents; negative means the variant drops cheaper tokens.",
            "",
            "| variant | " + " | ".join(rates) + " |",
            "|---|" + "---:|" * len(rates),
        ]
        for name in compared:
            cells = []
            for r in rates:
                figures = rows[name][r]["vs_variant"][config.compare_to]
                lo, hi = figures["ci95"]
                cells.append(f"{figures['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            lines.append(f"| {name} − {config.compare_to} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m experiments.ablate``.

    :param argv: command-line arguments
    """
    ablate(parse_config(AblateConfig, argv, description=__doc__ or ""))


if __name__ == "__main__":
    raise SystemExit(main())
