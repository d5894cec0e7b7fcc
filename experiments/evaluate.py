"""Evaluate compressors at matched mask rates: the learned policy and the baselines, scored by two reconstructors.

Examples::

    # a trained run: policy + all baselines on the run's held-out test split
    python -m experiments.evaluate --run runs/quickstart --out runs/quickstart/eval
    python -m experiments.evaluate --run runs/quickstart --data ../shared/data/wikitext2-valid.txt --out eval_wikitext
    # baselines only, with a reconstructor directory or preset (no run)
    python -m experiments.evaluate --reconstructor tiny --methods random frequency self_information --out eval_baselines
    python -m experiments.evaluate --config experiments/configs/prod/evaluation.json --run runs/quickstart

Every method drops exactly ``round(rate * n)`` tokens of each window at every requested rate (see
:mod:`tokencompress_env.baselines`); the masks are scored by the frozen ``reference`` reconstructor (the
primary table) and, for a run, by the jointly trained ``joint`` one. Writes ``results.json``,
``results.md``, ``rate_distortion.png`` and the resolved ``eval_config.json`` to ``--out``.

A run folder (written by ``experiments.train_ppo``) holds ``config.json``, ``reference_reconstructor/``,
``reconstructor/`` and ``agent.zip``; :func:`load_run` reads it and reports what is missing. The policy
plugs in through :func:`tokencompress_env.baselines.policy_method`: its per-token mask logits (the
agents package's ``token_mask_logits``) are ranked under the same budget as every baseline.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from experiments.config import check_output_dir, cli_main, parse_config
from tokencompress_env.baselines import (
    BASELINE_NAMES,
    BASELINES,
    POLICY,
    MaskMethod,
    MethodContext,
    policy_method,
    token_frequencies,
)
from tokencompress_env.compressor import agent_logit_fn
from tokencompress_env.data import EMBEDDED, CorpusSpec, local_documents, make_windows, prepare_corpus, window_array
from tokencompress_env.errors import ConfigError, InputError, ReconstructorLoadError
from tokencompress_env.evaluation import METHOD_NAMES, evaluate, plot_rate_distortion, write_results_json, write_results_markdown
from tokencompress_env.reconstructor import BUILD_INFO, Reconstructor, parse_device, resolve_device
from tokencompress_env.units import check_units


@dataclass
class EvaluateConfig:
    """Options of ``experiments.evaluate`` (every key may be set in the JSON config or on the command line).

    :param run: a trained run folder (policy, reference and joint reconstructors, its corpus)
    :param reconstructor: baselines-only mode without a run: a reconstructor directory or preset (``tiny``)
    :param data: a plain text file (or folder of them) to evaluate on; default: the held-out split of the
        run's corpus, or of the reconstructor's training corpus
    :param split: held-out split used when ``data`` is not given (``test`` or ``validation``)
    :param mask_rates: requested mask rates (a repeated rate is evaluated once)
    :param methods: methods to evaluate (default: all; ``policy`` needs ``run``)
    :param max_windows: windows evaluated, evenly spread over the data (``None``: all)
    :param seq_len: tokens per window (default: the run's, or the reconstructor's training window)
    :param out: output folder
    :param seed: seed of the random baselines, tie-breaking and the bootstrap
    :param bootstrap: bootstrap replicates of the 95% intervals
    :param batch_size: windows per reconstructor forward pass
    :param segment_len: segment length of ``iterative_self_information``
    :param device: ``auto``, ``cpu``, ``cuda`` or ``mps``
    :param title: title of the table and plot (default: the data's name)
    :param units: what every method drops or keeps together: ``piece`` (whole characters) or ``word``
        (whole words); with words the achieved rate can differ from the requested one by part of a word
    """

    run: str | None = None
    reconstructor: str | None = None
    data: str | None = None
    split: str = "test"
    mask_rates: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    methods: list[str] | None = None
    max_windows: int | None = 256
    seq_len: int | None = None
    out: str = "eval"
    seed: int = 0
    bootstrap: int = 1000
    batch_size: int = 64
    segment_len: int = 16
    device: str = "auto"
    title: str = ""
    units: str = "piece"

    def validate(self) -> None:
        """Reject inconsistent values with a message that says what to change."""
        if self.run and self.reconstructor:
            raise ConfigError("give either --run (a trained run) or --reconstructor (baselines only), not both")
        bad = [r for r in self.mask_rates if not 0.0 <= r <= 1.0]
        if bad or not self.mask_rates:
            raise ConfigError(f"mask_rates must be non-empty values in [0, 1], got {self.mask_rates}")
        unknown = [m for m in self.methods or [] if m not in METHOD_NAMES]
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; choose from {list(METHOD_NAMES)}")
        if self.methods is not None and POLICY in self.methods and not self.run:
            raise ConfigError("method 'policy' needs a trained run: pass --run DIR (or leave 'policy' out of --methods)")
        if self.split not in {"test", "validation", "train"}:
            raise ConfigError(f"split must be 'test' or 'validation' (or 'train'), got '{self.split}'")
        for key in ("max_windows", "seq_len"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if self.bootstrap < 0 or self.batch_size <= 0 or self.segment_len <= 0:
            raise ConfigError("bootstrap must be >= 0, batch_size and segment_len > 0")
        check_units(self.units)
        parse_device(self.device)  # whether this machine has it: checked when the evaluation starts
        check_output_dir(self.out, "out")

    def method_names(self) -> list[str]:
        """The methods to run, in report order.

        :return: names
        """
        names = list(self.methods) if self.methods else ([POLICY] if self.run else []) + list(BASELINE_NAMES)
        return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------- runs
@dataclass
class RunBundle:
    """What a trained run folder provides to the evaluation.

    :param run_dir: the folder
    :param config: its ``config.json`` (empty when missing)
    :param reference: the frozen pretrained reconstructor (``reference_reconstructor/``)
    :param joint: the jointly trained reconstructor (``reconstructor/``), ``None`` when missing
    :param agent: the trained SB3 model (``agent.zip``), ``None`` when missing or unloadable
    :param problems: why a part is missing (shown to the user)
    """

    run_dir: Path
    config: dict[str, Any]
    reference: Reconstructor
    joint: Reconstructor | None = None
    agent: Any = None
    problems: list[str] = field(default_factory=list)


def load_run(run_dir: str | Path, device: str = "auto", load_agent: bool = True) -> RunBundle:
    """Load a run folder defensively: the reference reconstructor is required, the rest reported if missing.

    :param run_dir: the run folder
    :param device: where to put the models
    :param load_agent: load ``agent.zip`` (not needed for baselines)
    :return: the bundle
    """
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise InputError(f"run folder '{run_dir}' does not exist: pass a folder written by experiments.train_ppo")
    config: dict[str, Any] = {}
    problems: list[str] = []
    if (root / "config.json").is_file():
        try:
            loaded = json.loads((root / "config.json").read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError as exc:
            problems.append(f"config.json is not valid JSON ({exc})")
    else:
        problems.append("no config.json")
    if not (root / "reference_reconstructor").is_dir():
        raise InputError(f"run folder '{root}' holds no reference_reconstructor/: is it a run written by experiments.train_ppo?")
    reference = Reconstructor.from_pretrained(root / "reference_reconstructor", device=device)
    joint = None
    if (root / "reconstructor").is_dir():
        try:
            joint = Reconstructor.from_pretrained(root / "reconstructor", device=device)
        except ReconstructorLoadError as exc:
            problems.append(f"joint reconstructor not loaded: {exc}")
    else:
        problems.append("no reconstructor/ (the run has not finished?): scoring with the reference reconstructor only")
    agent = None
    if load_agent:
        if (root / "agent.zip").is_file():
            try:
                from agents.algorithms import get_algorithm

                spec = get_algorithm(str(config.get("algo", "ppo")))
                agent = spec.algo_class.load(str(root / "agent.zip"), device=str(reference.device))
            except Exception as exc:
                problems.append(f"agent.zip not loaded: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        else:
            problems.append("no agent.zip")
    return RunBundle(root, config, reference, joint, agent, problems)


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


def spread(windows: np.ndarray, max_windows: int | None) -> np.ndarray:
    """Keep at most ``max_windows`` windows, evenly spread over the data (deterministic).

    :param windows: ``[N, L]``
    :param max_windows: cap (``None``: all)
    :return: ``[min(N, max_windows), L]``
    """
    if max_windows is None or len(windows) <= max_windows:
        return windows
    return windows[np.linspace(0, len(windows) - 1, max_windows).round().astype(int)]


def file_windows(path: str, reconstructor: Reconstructor, seq_len: int) -> np.ndarray:
    """All ``seq_len``-token windows of a text file or folder, in the reconstructor's tokenizer.

    :param path: a ``.txt`` file or a folder
    :param reconstructor: the reconstructor (its tokenizer)
    :param seq_len: tokens per window
    :return: ``[N, seq_len]`` ids
    """
    docs = local_documents(path)
    dataset = datasets.Dataset.from_dict({"doc_id": [d for d, _ in docs], "text": [t for _, t in docs]})
    windows = window_array(make_windows(dataset, reconstructor.tokenizer, seq_len))
    if len(windows) == 0:
        raise InputError(f"'{path}' is shorter than one {seq_len}-token window: give more text or a smaller --seq_len")
    return windows


# ---------------------------------------------------------------------------- main
def run_evaluation(config: EvaluateConfig) -> list[dict[str, Any]]:
    """Evaluate as ``config`` says and write the outputs; returns the records.

    :param config: the options
    :return: the records written to ``results.json``
    """
    resolve_device(config.device)  # a device this machine lacks fails here, before any work
    methods_wanted = config.method_names()
    rates = list(dict.fromkeys(config.mask_rates))
    if len(rates) < len(config.mask_rates):
        print(f"note: repeated mask rates are evaluated once: {rates}", file=sys.stderr)
    if config.run and config.seq_len and POLICY in methods_wanted:
        run_seq_len = _run_seq_len(config.run)
        if run_seq_len is not None and run_seq_len != config.seq_len:
            raise ConfigError(
                f"the run's policy was trained on {run_seq_len}-token windows, not {config.seq_len}: leave out --seq_len "
                f"(or pass --seq_len {run_seq_len}), or leave 'policy' out of --methods to evaluate the baselines at {config.seq_len}"
            )
    if config.run:
        bundle = load_run(config.run, config.device, load_agent=POLICY in methods_wanted)
        for problem in bundle.problems:
            print(f"note: {problem}", file=sys.stderr)
        if POLICY in methods_wanted and bundle.agent is None:
            raise InputError(
                f"cannot evaluate 'policy': {'; '.join(bundle.problems)}. "
                "Finish the run (experiments.train_ppo --resume true) or leave 'policy' out of --methods"
            )
        reference = bundle.reference
        scorers = {"reference": reference} | ({"joint": bundle.joint} if bundle.joint is not None else {})
        corpus = str(bundle.config.get("corpus", EMBEDDED))
        default_seq_len = int(bundle.config.get("seq_len", 128))
        train_seq_len = default_seq_len
    else:
        name = config.reconstructor or "tiny"
        reference = Reconstructor.from_pretrained(name, device=config.device)
        scorers = {"reference": reference}
        path = Path(name).expanduser()
        info = build_info(path if path.is_dir() else _preset_dir(name))
        built = info.get("build_config", {}) if isinstance(info.get("build_config"), dict) else {}
        corpus = str(built.get("source", EMBEDDED))
        default_seq_len = int(built.get("seq_len", 128))
        train_seq_len = default_seq_len
        bundle = None
    seq_len = config.seq_len or default_seq_len
    if seq_len > reference.max_seq_len:
        raise ConfigError(
            f"seq_len {seq_len} exceeds the reconstructor's context of {reference.max_seq_len} tokens: "
            f"pass --seq_len {reference.max_seq_len} or less"
        )

    if config.data:
        windows = file_windows(config.data, reference, seq_len)
        data_name = config.data
    else:
        splits = prepare_corpus(CorpusSpec(source=corpus, seq_len=seq_len), reference.tokenizer)
        windows = window_array(splits[config.split])
        data_name = f"{corpus} ({config.split} split)"
        if len(windows) == 0:
            raise InputError(f"the {config.split} split of '{corpus}' has no {seq_len}-token window")
    total_windows = len(windows)
    windows = spread(windows, config.max_windows)

    context = MethodContext(
        reconstructor=reference, seed=config.seed, batch_size=config.batch_size, segment_len=config.segment_len, units=config.units
    )
    if "frequency" in methods_wanted:
        train = window_array(prepare_corpus(CorpusSpec(source=corpus, seq_len=train_seq_len), reference.tokenizer)["train"])
        context.token_counts = token_frequencies(train, reference.vocab_size)
    methods: dict[str, MaskMethod] = {}
    for name in methods_wanted:
        if name == POLICY:
            assert bundle is not None
            surprisal_rec = bundle.joint if bundle.joint is not None else reference
            keep_digits = bool(bundle.config.get("keep_digits", False))
            methods[name] = policy_method(agent_logit_fn(bundle.agent, surprisal_rec, config.batch_size, keep_digits))
        else:
            methods[name] = BASELINES[name]

    print(
        f"Evaluating {len(methods)} method(s) x {len(rates)} rate(s) on {len(windows)} of {total_windows} "
        f"{seq_len}-token windows of {data_name} ({config.units} units); scored by {', '.join(scorers)}",
        flush=True,
    )
    start = time.perf_counter()
    records = evaluate(methods, windows, scorers, rates, context, None, config.bootstrap, config.seed, config.batch_size, progress=True)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    title = config.title or f"Compression at matched mask rates: {Path(data_name).name if config.data else data_name}"
    write_results_json(records, out / "results.json")
    command = (
        "python -m experiments.evaluate " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith("evaluate.py") else ""
    )
    preamble = (
        f"Data: {data_name}, {len(windows)} of {total_windows} windows of {seq_len} tokens, {config.units} units. "
        "Rates are exact per window (round(rate x tokens)) up to whole units (see the achieved rate); "
        f"95% intervals: bootstrap over windows ({config.bootstrap} replicates, seed {config.seed}). "
        "tokens/s: the compressor alone (mask computation, including any reconstructor forward it needs), scoring excluded."
        + (f"\n\nCommand: `{command}`" if command else "")
    )
    write_results_markdown(records, out / "results.md", title=title, preamble=preamble)
    plot_rate_distortion(records, out / "rate_distortion.png", title=title)
    (out / "eval_config.json").write_text(json.dumps(asdict(config) | {"windows": len(windows), "seq_len_used": seq_len}, indent=2))
    print((out / "results.md").read_text())
    print(f"Wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'rate_distortion.png'} in {time.perf_counter() - start:.0f}s")
    return records


def _run_seq_len(run_dir: str) -> int | None:
    """The window length a run's ``config.json`` records, read before any work (``None`` when unknown).

    :param run_dir: the run folder
    :return: its ``seq_len``
    """
    try:
        saved = json.loads((Path(run_dir).expanduser() / "config.json").read_text())
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
    config = parse_config(EvaluateConfig, argv, description=__doc__.split("\n\n")[0] if __doc__ else "")
    return run_evaluation(config)


if __name__ == "__main__":
    sys.exit(cli_main(main)(None))
