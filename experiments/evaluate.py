"""Evaluate compressors at matched mask rates: the learned policy and the baselines, scored by two reconstructors.

Examples::

    # choices are made on the validation split; the test split is reported once per final configuration
    python -m experiments.evaluate --run runs/seed0 runs/seed1 runs/seed2 --split validation --out eval_val
    python -m experiments.evaluate --run runs/seed0 runs/seed1 runs/seed2 --split test --methods policy frequency search --out eval_test
    # a trained run: policy + all baselines on the run's held-out test split
    python -m experiments.evaluate --run runs/quickstart --out runs/quickstart/eval
    python -m experiments.evaluate --run runs/quickstart --data ../shared/data/wikitext2-valid.txt --out eval_wikitext
    # baselines only, with a reconstructor directory or preset (no run)
    python -m experiments.evaluate --reconstructor tiny --methods random frequency self_information --out eval_baselines
    python -m experiments.evaluate --config experiments/configs/prod/evaluation.json --run runs/quickstart

Every method drops exactly ``round(rate * n)`` tokens of each window at every requested rate (see
:mod:`tokencompress_env.baselines`); the masks are scored by the frozen ``reference`` reconstructor (the
primary table) and, for a run whose RL fine-tuned its reconstructor, by that jointly trained ``joint`` one
(a run that never fine-tuned it, e.g. distillation only, is scored once). Writes ``results.json``,
``results.md``, ``rate_distortion.png``, the per-window sums (``window_stats.npz``, for paired comparisons
between evaluations) and the resolved ``eval_config.json`` to ``--out``.

Several ``--run`` folders (seeds of one configuration) are evaluated on the same windows; the records
hold each run's figures and the pooled ones (see :mod:`tokencompress_env.evaluation`). Every interval is
a bootstrap over the documents the windows come from. A downstream LM (``--downstream_lm``, default: the
first run's reference reconstructor read as a plain causal LM) scores the ``--continuation_tokens``
tokens after each window given the full, compressed (deleted / placeholders) and empty window, each
context cut to its last ``--downstream_context`` tokens (default: what fits in the LM's training window). The
``search`` reference (greedy deletion with full re-scoring) is slow: it runs only when named in
``--methods``, on ``--search_windows`` windows spread over the evaluated ones.

A run folder (written by ``experiments.train_ppo``) holds ``config.json``, ``reference_reconstructor/``,
``reconstructor/`` and ``policy.safetensors`` + ``policy.json``; :func:`load_run` reads it (never the
pickle ``agent.zip``) and reports what is missing. The policy
plugs in through :func:`tokencompress_env.baselines.policy_method`: its per-token mask logits (the
agents package's ``token_mask_logits``) are ranked under the same budget as every baseline.
``policy_sampled`` (only when named) is the diagnostic row of what reinforcement learning optimises: the
policy's masks sampled as in training, each token dropped independently with its rate-calibrated
probability (:func:`sampled_policy_method`), so its rate is met on average, not per window.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from experiments.config import check_output_dir, cli_main, parse_config
from tokencompress_env import run_folder, run_loading
from tokencompress_env.baselines import (
    BASELINE_NAMES,
    BASELINES,
    DEPRECATED_NAMES,
    POLICY,
    POLICY_SAMPLED,
    RUN_METHODS,
    SEARCH,
    LogitFn,
    MaskMethod,
    MethodContext,
    canonical_method_name,
    maskable_positions,
    policy_method,
    token_frequencies,
)
from tokencompress_env.compressor import agent_logit_fn, agent_sequential_method
from tokencompress_env.data import (
    EMBEDDED,
    CorpusSpec,
    local_documents,
    make_windows,
    prepare_corpus,
    window_array,
    window_continuations,
    window_doc_ids,
)
from tokencompress_env.errors import CheckpointError, ConfigError, InputError
from tokencompress_env.evaluation import (
    METHOD_NAMES,
    WINDOW_STATS_FILE,
    DownstreamReader,
    MethodRate,
    build_records,
    compute_method_stats,
    plot_rate_distortion,
    write_results_json,
    write_results_markdown,
    write_window_stats,
)
from tokencompress_env.options import option, option_factory
from tokencompress_env.presets import load_or_build
from tokencompress_env.reconstructor import BUILD_INFO, Reconstructor, downstream_context_tokens, parse_device, resolve_device
from tokencompress_env.run_loading import RunBundle
from tokencompress_env.units import check_units


@dataclass
class EvaluateConfig:
    """Options of ``experiments.evaluate`` (every key may be set in the JSON config or on the command line).

    Each option is documented at its field (``--help`` prints the docs).
    """

    run: list[str] | None = option(
        None,
        "one or several trained run folders of one configuration (e.g. three seeds): policy, reference and joint "
        "reconstructors, corpus; several are evaluated on the same windows and pooled",
    )
    reconstructor: str | None = option(None, "baselines-only mode without a run: a reconstructor directory or preset ('tiny')")
    data: str | None = option(
        None,
        "a plain text file (or folder of them) to evaluate on; default: the held-out split of the run's corpus, or of "
        "the reconstructor's training corpus",
    )
    split: str = option(
        "test",
        "held-out split used when 'data' is not given: 'validation' for every choice (configs, steps, rates), 'test' "
        "only to report a final configuration",
    )
    mask_rates: list[float] = option_factory(lambda: [0.2, 0.4, 0.6, 0.8], "requested mask rates (a repeated rate is evaluated once)")
    methods: list[str] | None = option(
        None,
        "methods to evaluate (default: all but 'search'; 'policy' needs 'run'; 'search' is the slow bound and runs only when named)",
    )
    max_windows: int | None = option(128, "windows evaluated, evenly spread over the data ('None': all)")
    seq_len: int | None = option(None, "tokens per window (default: the run's, or the reconstructor's training window)")
    out: str = option("eval", "output folder")
    seed: int = option(0, "seed of the random baselines, tie-breaking and the bootstrap")
    bootstrap: int = option(1000, "bootstrap replicates of the 95% intervals")
    batch_size: int = option(64, "windows per reconstructor forward pass")
    segment_len: int = option(16, "segment length of 'iterative_self_information'")
    device: str = option("auto", "'auto', 'cpu', 'cuda' or 'mps'")
    title: str = option("", "title of the table and plot (default: the data's name)")
    continuation_tokens: int = option(32, "tokens after each window scored by the downstream LM (0: no downstream reading)")
    downstream_lm: str | None = option(
        None,
        "the downstream causal LM: a local directory or hub name (default: the run's reference reconstructor read as a "
        "plain causal LM; in baselines-only mode, the given reconstructor)",
    )
    downstream_context: int | None = option(
        None,
        "most recent context tokens the downstream LM reads before the continuation (default: the window length it was "
        "trained on less 'continuation_tokens', e.g. 96 for the 'tiny' preset's 128-token windows; without build facts,"
        " its whole context less the continuation)",
    )
    search_windows: int = option(
        32,
        "windows the 'search' bound runs on (spread over the evaluated ones); about 'm * k' window forward passes each "
        "(minutes per 128-token window on a CPU)",
    )
    units: str = option(
        "piece",
        "what every method drops or keeps together: 'piece' (whole characters) or 'word' (whole words); with words the "
        "achieved rate can differ from the requested one by part of a word",
    )

    def validate(self) -> None:
        """Reject inconsistent values with a message that says what to change."""
        if isinstance(self.run, str):  # a single folder given programmatically
            self.run = [self.run]
        if self.methods is not None:
            self.methods = [canonical_method_name(m) if m in DEPRECATED_NAMES else m for m in self.methods]
        if self.run and self.reconstructor:
            raise ConfigError("give either --run (a trained run) or --reconstructor (baselines only), not both")
        bad = [r for r in self.mask_rates if not 0.0 <= r <= 1.0]
        if bad or not self.mask_rates:
            raise ConfigError(f"mask_rates must be non-empty values in [0, 1], got {self.mask_rates}")
        unknown = [m for m in self.methods or [] if m not in METHOD_NAMES]
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; choose from {list(METHOD_NAMES)}")
        for name in RUN_METHODS:
            if self.methods is not None and name in self.methods and not self.run:
                raise ConfigError(f"method '{name}' needs a trained run: pass --run DIR (or leave '{name}' out of --methods)")
        if self.methods is not None and POLICY_SAMPLED in self.methods and self.units != "piece":
            raise ConfigError(f"method '{POLICY_SAMPLED}' samples single tokens: use --units piece")
        if self.split not in {"test", "validation", "train"}:
            raise ConfigError(f"split must be 'test' or 'validation' (or 'train'), got '{self.split}'")
        if self.downstream_context is not None and self.downstream_context < 0:
            raise ConfigError(f"downstream_context must be >= 0, got {self.downstream_context}")
        for key in ("max_windows", "seq_len"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if self.bootstrap < 0 or self.batch_size <= 0 or self.segment_len <= 0:
            raise ConfigError("bootstrap must be >= 0, batch_size and segment_len > 0")
        if self.continuation_tokens < 0 or self.search_windows <= 0:
            raise ConfigError("continuation_tokens must be >= 0 and search_windows > 0")
        if self.run is not None and len(set(self.run)) != len(self.run):
            raise ConfigError(f"--run lists a folder twice: {self.run}")
        check_units(self.units)
        parse_device(self.device)  # whether this machine has it: checked when the evaluation starts
        check_output_dir(self.out, "out")

    def method_names(self) -> list[str]:
        """The methods to run, in report order.

        :return: names
        """
        # search and policy_sampled only when named
        names = list(self.methods) if self.methods else ([POLICY] if self.run else []) + list(BASELINE_NAMES)
        return list(dict.fromkeys(names))


def sampled_policy_method(logit_fn: LogitFn, seed: int) -> MaskMethod:
    """The policy's masks as reinforcement learning samples them, as a :class:`MaskMethod` (``policy_sampled``).

    Each window's logits are shifted so that the expected number of drops is the rate times its real
    tokens (at most its maskable tokens; :func:`agents.policy.rate_calibrated_logits`, the shift of a
    ``rate_calibrated`` policy) and each maskable token is dropped independently with
    ``sigmoid(logit - shift)``. The rate is met on average, not per window. Against ``policy`` (the same
    logits ranked under the exact budget) it tells how far the sampled policy that PPO improves is from
    the ranked one that compresses. Seeded by ``seed`` and the rate, so a rerun draws the same masks.

    :param logit_fn: the policy's ``(input_ids, valid, rate) -> logits`` (``-inf`` where a token may not be dropped)
    :param seed: seed of the draws
    :return: the masking method
    """
    import torch

    from agents.policy import rate_calibrated_logits

    generators: dict[float, np.random.Generator] = {}

    def sample(scores: np.ndarray, rate: float, valid: np.ndarray, force_keep: np.ndarray | None, units: np.ndarray | None) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        maskable = maskable_positions(scores, valid, force_keep) & np.isfinite(scores)
        rates = torch.full((len(scores),), float(rate), dtype=torch.float64)
        with torch.no_grad():
            shifted = rate_calibrated_logits(torch.as_tensor(scores), torch.as_tensor(valid), torch.as_tensor(maskable), rates)
        rng = generators.setdefault(float(rate), np.random.default_rng([seed, round(float(rate) * 1_000_000)]))
        return (rng.random(scores.shape) < torch.sigmoid(shifted).numpy()) & maskable

    return policy_method(logit_fn, sample)


# ---------------------------------------------------------------------------- runs
def load_run(run_dir: str | Path, device: str = "auto", load_agent: bool = True) -> RunBundle:
    """Load a run folder defensively: the reference reconstructor is required, the rest reported if missing.

    The one reader of run folders, :func:`tokencompress_env.run_loading.load_run`, in its non-strict mode.

    :param run_dir: the run folder
    :param device: where to put the models
    :param load_agent: load the policy (not needed for baselines); from its safe artifact, never from ``agent.zip``
    :return: the bundle
    :raises InputError: when the folder or its reference reconstructor is missing
    """
    try:
        return run_loading.load_run(run_dir, device, strict=False, load_agent=load_agent, load_reference=True)
    except CheckpointError as exc:
        raise InputError(str(exc)) from None


# ---------------------------------------------------------------------------- data
def build_info(reconstructor_dir: Path | None) -> dict[str, Any]:
    """The build facts a preset reconstructor records (``tokencompress.json``), or ``{}``.

    :param reconstructor_dir: the reconstructor folder
    :return: the facts
    """
    if reconstructor_dir is None or not (reconstructor_dir / BUILD_INFO).is_file():
        return {}
    try:
        info = json.loads((reconstructor_dir / BUILD_INFO).read_text())
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def spread_index(n: int, max_windows: int | None) -> np.ndarray:
    """Indices of at most ``max_windows`` of ``n`` windows, evenly spread (deterministic).

    :param n: windows
    :param max_windows: cap (``None``: all)
    :return: sorted indices
    """
    if max_windows is None or n <= max_windows:
        return np.arange(n)
    return np.linspace(0, n - 1, max_windows).round().astype(int)


def spread(windows: np.ndarray, max_windows: int | None) -> np.ndarray:
    """Keep at most ``max_windows`` windows, evenly spread over the data (deterministic).

    :param windows: ``[N, L]``
    :param max_windows: cap (``None``: all)
    :return: ``[min(N, max_windows), L]``
    """
    return windows[spread_index(len(windows), max_windows)]


def file_windows_with_docs(path: str, reconstructor: Reconstructor, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """All ``seq_len``-token windows of a text file or folder and their document ids.

    A file is cut into documents as :func:`~tokencompress_env.data.local_documents` does (about 20,000
    characters at paragraph breaks; each file of a folder is at least one document).

    :param path: a ``.txt`` file or a folder
    :param reconstructor: the reconstructor (its tokenizer)
    :param seq_len: tokens per window
    :return: ``[N, seq_len]`` ids and ``[N]`` document ids
    """
    docs = local_documents(path)
    dataset = datasets.Dataset.from_dict({"doc_id": [d for d, _ in docs], "text": [t for _, t in docs]})
    cut = make_windows(dataset, reconstructor.tokenizer, seq_len)
    windows = window_array(cut)
    if len(windows) == 0:
        raise InputError(f"'{path}' is shorter than one {seq_len}-token window: give more text or a smaller --seq_len")
    return windows, window_doc_ids(cut)


def file_windows(path: str, reconstructor: Reconstructor, seq_len: int) -> np.ndarray:
    """All ``seq_len``-token windows of a text file or folder, in the reconstructor's tokenizer.

    :param path: a ``.txt`` file or a folder
    :param reconstructor: the reconstructor (its tokenizer)
    :param seq_len: tokens per window
    :return: ``[N, seq_len]`` ids
    """
    return file_windows_with_docs(path, reconstructor, seq_len)[0]


def weights_fingerprint(reconstructor: Reconstructor) -> str:
    """A hash of a reconstructor's weights: runs whose reference reconstructors match share baseline masks.

    :param reconstructor: the reconstructor
    :return: hex digest
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(reconstructor.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- main
def _run_seed(bundle: RunBundle) -> int | None:
    """The training seed a run folder records, if any.

    :param bundle: the run
    :return: the seed or ``None``
    """
    seed = bundle.config.get("seed")
    return int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None


def run_evaluation(config: EvaluateConfig, command: str = "") -> list[dict[str, Any]]:
    """Evaluate as ``config`` says and write the outputs; returns the records.

    :param config: the options
    :param command: the command line that asked for it (written to ``results.md``)
    :return: the records written to ``results.json``
    """
    config.validate()
    resolve_device(config.device)  # a device this machine lacks fails here, before any work
    methods_wanted = config.method_names()
    rates = list(dict.fromkeys(config.mask_rates))
    if len(rates) < len(config.mask_rates):
        print(f"note: repeated mask rates are evaluated once: {rates}", file=sys.stderr)
    uses_policy = any(name in methods_wanted for name in RUN_METHODS)
    if config.run and config.seq_len and uses_policy:
        run_seq_len = _run_seq_len(config.run[0])
        if run_seq_len is not None and run_seq_len != config.seq_len:
            raise ConfigError(
                f"the run's policy was trained on {run_seq_len}-token windows, not {config.seq_len}: leave out --seq_len "
                f"(or pass --seq_len {run_seq_len}), or leave 'policy' out of --methods to evaluate the baselines at {config.seq_len}"
            )
    bundles: list[RunBundle] = []
    if config.run:
        for run_dir in config.run:
            bundle = load_run(run_dir, config.device, load_agent=uses_policy)
            for problem in bundle.problems:
                print(f"note ({bundle.run_dir.name}): {problem}", file=sys.stderr)
            if uses_policy and bundle.agent is None:
                named = ", ".join(f"'{m}'" for m in RUN_METHODS if m in methods_wanted)
                raise InputError(
                    f"cannot evaluate {named} of '{run_dir}': {'; '.join(bundle.problems)}. "
                    f"Finish the run (experiments.train_ppo --resume true) or leave {named} out of --methods"
                )
            bundles.append(bundle)
        first = bundles[0]
        keys = ("corpus", "seq_len", "keep_digits")
        for other in bundles[1:]:
            differ = [k for k in keys if other.config.get(k) != first.config.get(k)]
            if differ:
                raise ConfigError(
                    f"runs '{first.run_dir}' and '{other.run_dir}' differ in {differ}: --run takes several runs of one configuration"
                )
        reference = first.reference
        corpus = str(first.config.get("corpus", EMBEDDED))
        default_seq_len = int(first.config.get("seq_len", 128))
    else:
        name = config.reconstructor or "tiny"
        reference = load_or_build(name, device=config.device)
        path = Path(name).expanduser()
        info = build_info(path if path.is_dir() else _preset_dir(name))
        built = info.get("build_config", {}) if isinstance(info.get("build_config"), dict) else {}
        corpus = str(built.get("source", EMBEDDED))
        default_seq_len = int(built.get("seq_len", 128))
    train_seq_len = default_seq_len
    seq_len = config.seq_len or default_seq_len
    if seq_len > reference.max_seq_len:
        raise ConfigError(
            f"seq_len {seq_len} exceeds the reconstructor's context of {reference.max_seq_len} tokens: "
            f"pass --seq_len {reference.max_seq_len} or less"
        )

    downstream = None
    downstream_info: dict[str, Any] = {}
    if config.continuation_tokens > 0 and config.downstream_lm:  # loaded first: a wrong name fails fast
        downstream = load_or_build(config.downstream_lm, device=config.device)
        path = Path(config.downstream_lm).expanduser()
        downstream_info = build_info(path if path.is_dir() else _preset_dir(config.downstream_lm))

    if config.data:
        all_windows, all_docs = file_windows_with_docs(config.data, reference, seq_len)
        data_name = config.data
    else:
        splits = prepare_corpus(CorpusSpec(source=corpus, seq_len=seq_len), reference.tokenizer)
        all_windows, all_docs = window_array(splits[config.split]), window_doc_ids(splits[config.split])
        data_name = f"{corpus} ({config.split} split)"
        if len(all_windows) == 0:
            raise InputError(f"the {config.split} split of '{corpus}' has no {seq_len}-token window")
    total_windows = len(all_windows)
    index = spread_index(total_windows, config.max_windows)
    windows, doc_ids = all_windows[index], all_docs[index]
    search_index = spread_index(len(windows), config.search_windows)

    reader = None
    downstream_name = ""
    downstream_context = 0
    if config.continuation_tokens > 0:
        if downstream is not None:
            downstream_name = str(config.downstream_lm)
        else:
            downstream = reference
            downstream_info = {"build_config": {"seq_len": train_seq_len}}  # the reference's training window
            downstream_name = (
                f"reference reconstructor of {bundles[0].run_dir.name}" if bundles else f"reconstructor {config.reconstructor or 'tiny'}"
            )
        downstream_context = downstream_context_tokens(downstream, downstream_info, config.continuation_tokens, config.downstream_context)
        continuations, available = window_continuations(all_windows, all_docs, config.continuation_tokens)
        reader = DownstreamReader(
            downstream,
            reference.tokenizer,
            continuations[index],
            available[index],
            config.batch_size,
            downstream_name,
            max_context=downstream_context,
        )

    token_counts = None
    if "frequency" in methods_wanted:
        train = window_array(prepare_corpus(CorpusSpec(source=corpus, seq_len=train_seq_len), reference.tokenizer)["train"])
        token_counts = token_frequencies(train, reference.vocab_size)

    print(
        f"Evaluating {len(methods_wanted)} method(s) x {len(rates)} rate(s) on {len(windows)} of {total_windows} "
        f"{seq_len}-token windows ({len(set(doc_ids))} documents) of {data_name} ({config.units} units)"
        + (f"; {len(bundles)} run(s): {', '.join(b.run_dir.name for b in bundles)}" if bundles else "; baselines only"),
        flush=True,
    )
    start = time.perf_counter()
    mask_caches: dict[str, dict[tuple[str, float], tuple[np.ndarray, float]]] = {}
    runs: list[list[MethodRate]] = []
    run_list: list[RunBundle | None] = list(bundles) if bundles else [None]
    for bundle_or_none in run_list:
        rec = bundle_or_none.reference if bundle_or_none is not None else reference
        scorers = {"reference": rec}
        if bundle_or_none is not None and bundle_or_none.joint is not None:
            if bundle_or_none.joint.has_same_weights(rec):
                print(f"{bundle_or_none.run_dir.name}: its reconstructor was never fine-tuned (no RL steps): scored by the reference only")
            else:
                scorers["joint"] = bundle_or_none.joint
        context = MethodContext(
            reconstructor=rec,
            token_counts=token_counts,
            seed=config.seed,
            batch_size=config.batch_size,
            segment_len=config.segment_len,
            units=config.units,
        )
        methods: dict[str, MaskMethod | None] = {}
        for name in methods_wanted:
            if name in RUN_METHODS:
                assert bundle_or_none is not None
                surprisal_rec = bundle_or_none.joint if bundle_or_none.joint is not None else rec
                keep_digits = bool(bundle_or_none.config.get("keep_digits", False))
                sees_decisions = bool(bundle_or_none.config.get("use_decisions", False))
                if sees_decisions and name == POLICY_SAMPLED:
                    raise ConfigError(f"'{POLICY_SAMPLED}' samples a one-pass policy; '{bundle_or_none.run_dir}' sees its decisions")
                if sees_decisions:  # it acted chunk by chunk on its own decisions: replay that
                    methods[name] = agent_sequential_method(bundle_or_none.agent, surprisal_rec, config.batch_size, keep_digits)
                    continue
                logit_fn = agent_logit_fn(bundle_or_none.agent, surprisal_rec, config.batch_size, keep_digits)
                methods[name] = policy_method(logit_fn) if name == POLICY else sampled_policy_method(logit_fn, config.seed)
            else:
                methods[name] = None if name == SEARCH else BASELINES[name]
        if bundle_or_none is not None:
            print(f"run {bundle_or_none.run_dir} (seed {_run_seed(bundle_or_none)})", flush=True)
        cache = mask_caches.setdefault(weights_fingerprint(rec), {})
        runs.append(
            compute_method_stats(methods, windows, scorers, rates, context, None, config.batch_size, True, reader, search_index, cache)
        )
    records = build_records(
        runs,
        doc_ids,
        config.bootstrap,
        config.seed,
        [str(b.run_dir) for b in bundles] or [f"reconstructor:{config.reconstructor or 'tiny'}"],
        [_run_seed(b) for b in bundles] or [None],
    )
    split_name = "data file" if config.data else config.split
    for r in records:
        r.update(
            data=data_name,
            split=split_name,
            downstream_lm=downstream_name or None,
            continuation_tokens=config.continuation_tokens,
            downstream_context=downstream_context,
        )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    title = config.title or f"Compression at matched mask rates: {Path(data_name).name if config.data else data_name}"
    write_results_json(records, out / "results.json")
    write_window_stats(runs, doc_ids, out / WINDOW_STATS_FILE)
    seeds = [_run_seed(b) for b in bundles]
    preamble = (
        f"Data: {data_name} (split: {split_name}), {len(windows)} of {total_windows} windows of {seq_len} tokens "
        f"from {len(set(doc_ids))} documents, {config.units} units. "
        + (
            f"Runs: {', '.join(str(b.run_dir) for b in bundles)} (seeds {', '.join(str(x) for x in seeds)}); "
            + ("tables pooled over the runs (per-window mean), per-seed figures below. " if len(bundles) > 1 else "")
            if bundles
            else f"Baselines only, reconstructor {config.reconstructor or 'tiny'}. "
        )
        + "Rates are exact per window (round(rate x tokens)) up to whole units (see the achieved rate)"
        + (f"; '{POLICY_SAMPLED}' meets them on average only" if POLICY_SAMPLED in methods_wanted else "")
        + "; "
        f"95% intervals: bootstrap over documents ({config.bootstrap} replicates, seed {config.seed}). "
        "Bits per masked token assume the reader knows where tokens were dropped; '+ position bits' adds log2 C(n, k) per window. "
        + (f"Search bound: {min(config.search_windows, len(windows))} windows. " if SEARCH in methods_wanted else "")
        + "tokens/s: the compressor alone (mask computation, including any reconstructor forward it needs), scoring excluded."
        + (f"\n\nCommand: `{command}`" if command else "")
    )
    write_results_markdown(records, out / "results.md", title=title, preamble=preamble)
    plot_rate_distortion(records, out / "rate_distortion.png", title=title)
    (out / "eval_config.json").write_text(
        json.dumps(asdict(config) | {"windows": len(windows), "seq_len_used": seq_len, "command": command}, indent=2)
    )
    print((out / "results.md").read_text())
    print(f"Wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'rate_distortion.png'} in {time.perf_counter() - start:.0f}s")
    return records


def _run_seq_len(run_dir: str) -> int | None:
    """The window length a run's ``config.json`` records, read before any work (``None`` when unknown).

    :param run_dir: the run folder
    :return: its ``seq_len``
    """
    try:
        saved = json.loads((Path(run_dir).expanduser() / run_folder.CONFIG).read_text())
        return int(saved["seq_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # load_run reports a missing or broken config.json


def _preset_dir(name: str) -> Path | None:
    """The cache folder of a preset reconstructor name, else ``None``.

    :param name: a preset name or anything else
    :return: the folder or ``None``
    """
    from tokencompress_env.reconstructor import PRESETS, default_reconstructor_dir

    return default_reconstructor_dir(name) if name in PRESETS else None


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parse the options and run the evaluation.

    :param argv: command-line arguments (default ``sys.argv[1:]``)
    :return: the records
    """
    args = list(sys.argv[1:] if argv is None else argv)
    config = parse_config(EvaluateConfig, args, description=__doc__.split("\n\n")[0] if __doc__ else "")
    return run_evaluation(config, "python -m experiments.evaluate " + shlex.join(args))


if __name__ == "__main__":
    sys.exit(cli_main(main)(None))
