"""Benchmark: tokens/s of ``Compressor.compress()`` against self-information scoring on the same texts.

Examples::

    python -m experiments.benchmark_compress --run runs/quickstart --out bench_compress.json
    python -m experiments.benchmark_compress --run runs/quickstart --data ../shared/data/wikitext2-valid.txt --out bench.json

Texts: the documents of ``--data`` (a ``.txt`` file or folder), or by default the held-out ``test`` split
of the run's corpus (the embedded corpus unless the run says otherwise), taken in order up to
``--max_tokens`` tokens (the last text is cut at a token boundary).

Timed, each the median of ``--repeats`` runs after one warm-up, on the same thread count; the methods
take turns within each repetition, so that a machine shared with other work slows them alike:

* ``compress``: ``Compressor.compress(texts, mask_rate)`` end to end (tokenisation, windows, force-keep,
  policy forward passes, ranking under the budget, decoding), all texts in one call, with the policy's
  matrix products in float32 (``--matmul_dtype``, the default and the trained network's arithmetic).
* ``self_information``: the Selective Context baseline (:func:`tokencompress_env.baselines.mask_self_information`:
  a reconstructor forward pass per window, ranking under the same budget) on the very windows
  ``compress`` built; tokenisation and decoding are *not* counted for it, so the ratio is conservative.
* ``policy_only``: the policy's part of ``compress`` on the same windows (logits and ranking), for an
  apples-to-apples comparison.
* ``compress_bfloat16`` (``--compare_bfloat16``): ``compress`` with the policy's matrix products in
  bfloat16 (opt-in, ``Compressor.load(..., matmul_dtype="bfloat16")``), with how many of the dropped
  tokens differ from float32's (``bfloat16_changed_drops``: the fraction of float32's dropped tokens
  that bfloat16 keeps).

``speedup`` is the ratio of the medians; ``speedup_best`` that of the fastest runs, the steadier figure
on a machine that other jobs share. ``stage_seconds`` breaks ``compress`` down
(:attr:`~tokencompress_env.compressor.Compressor.last_stage_seconds`, median over the repetitions:
tokenisation, units, windows, budgets, policy forward, ranking, decoding, results), and
``text_tokens_seconds`` is what reading every result's ``text_tokens`` costs afterwards (the compressed
texts tokenised again, which ``compress`` leaves until asked). ``long_text`` (``--long_tokens``, 0 to
skip) times one text of that many tokens (the documents joined, repeated if needed), ``compress``
against self-information with one timed run of the latter.

Writes the JSON to ``--out`` and prints it. The target is ``speedup`` (compress vs self-information) of at
least 50 on a CPU (issue 13); a run that observes surprisal needs a reconstructor forward inside
``compress`` and cannot reach it.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.config import cli_main, parse_config
from tokencompress_env.errors import ConfigError, InputError
from tokencompress_env.options import option


@dataclass
class BenchmarkConfig:
    """Options of ``experiments.benchmark_compress``.

    Each option is documented at its field (``--help`` prints the docs).
    """

    run: str = option("", "a run folder written by 'experiments.train_ppo'")
    out: str = option("benchmark_compress.json", "the JSON file to write")
    data: str | None = option(None, "a '.txt' file or folder of texts (default: the test split of the run's corpus)")
    mask_rate: float = option(0.4, "the mask rate of both methods")
    max_tokens: int = option(50_000, "stop adding documents once this many tokens are reached")
    repeats: int = option(3, "timed repetitions of each method (the median is reported)")
    batch_size: int = option(16, "windows per forward pass, for both methods")
    threads: int | None = option(
        1,
        "torch threads for both methods (default 1: on a shared machine more threads than free cores slow torch down "
        "several times; 'None': torch's default)",
    )
    device: str = option("auto", "'auto', 'cpu', 'cuda' or 'mps'")
    matmul_dtype: str = option("float32", "the policy's matrix products in the timed compress: 'float32' or 'bfloat16'")
    compare_bfloat16: bool = option(True, "also time compress with bfloat16 matrix products and count the masks that change")
    long_tokens: int = option(100_000, "tokens of the one long text also timed (0: skip)")

    def validate(self) -> None:
        """Reject unusable values with a message that says what to change."""
        if not self.run:
            raise ConfigError("pass --run DIR (a run folder written by experiments.train_ppo)")
        if not 0.0 <= self.mask_rate < 1.0:
            raise ConfigError(f"mask_rate must be in [0, 1), got {self.mask_rate}")
        if self.max_tokens < 1 or self.repeats < 1 or self.batch_size < 1 or (self.threads is not None and self.threads < 1):
            raise ConfigError("max_tokens, repeats, batch_size and threads must be positive")
        if self.long_tokens < 0:
            raise ConfigError(f"long_tokens must be 0 (skip) or positive, got {self.long_tokens}")
        if self.matmul_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"matmul_dtype must be 'float32' or 'bfloat16', got {self.matmul_dtype!r}")


def _documents(config: BenchmarkConfig, corpus: str) -> tuple[list[str], str]:
    """The non-blank documents of ``--data``, or of the run corpus's test split.

    :param config: the options
    :param corpus: the run's corpus source
    :return: the documents and a name for the data
    """
    from tokencompress_env.data import load_documents, local_documents, split_documents

    if config.data:
        docs = [text for _, text in local_documents(config.data)]
        name = config.data
    else:
        docs = list(split_documents(load_documents(corpus))["test"]["text"])
        name = f"{corpus} (test split)"
    return [text for text in docs if text.strip()], name


def _cut(text: str, tokenizer: Any, max_tokens: int) -> tuple[str, int]:
    """``text`` cut after its first ``max_tokens`` tokens (at a token boundary).

    :param text: the text
    :param tokenizer: the tokenizer
    :param max_tokens: tokens to keep at most
    :return: the text and its token count (at most ``max_tokens``)
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    if len(enc["input_ids"]) <= max_tokens:
        return text, len(enc["input_ids"])
    return text[: enc["offset_mapping"][max_tokens - 1][1]], max_tokens


def benchmark_texts(config: BenchmarkConfig, corpus: str, tokenizer: Any) -> tuple[list[str], str]:
    """The texts to compress: documents of ``--data`` or of the run corpus's test split, up to ``max_tokens``.

    :param config: the options
    :param corpus: the run's corpus source
    :param tokenizer: the run's tokenizer (to count tokens)
    :return: the texts and a name for the data
    """
    docs, name = _documents(config, corpus)
    texts, total = [], 0
    for text in docs:
        text, count = _cut(text, tokenizer, config.max_tokens - total)  # cut the last text at a token boundary
        if not text.strip():
            break
        texts.append(text)
        total += count
        if total >= config.max_tokens:
            break
    if not texts:
        raise InputError(f"no text to benchmark in {name}")
    return texts, name


def long_text(config: BenchmarkConfig, corpus: str, tokenizer: Any) -> str:
    """One text of ``long_tokens`` tokens: the documents joined by blank lines (repeated if too few), cut there.

    :param config: the options
    :param corpus: the run's corpus source
    :param tokenizer: the run's tokenizer
    :return: the text
    """
    docs, name = _documents(config, corpus)
    if not docs:
        raise InputError(f"no text to benchmark in {name}")
    parts: list[str] = []
    chars_per_token = 2.0  # a lower bound on the average for English BPE text; refined below
    while True:
        while sum(map(len, parts)) < config.long_tokens * chars_per_token * 1.2:
            parts.extend(docs)
        text, count = _cut("\n\n".join(parts), tokenizer, config.long_tokens)
        if count >= config.long_tokens:
            return text
        chars_per_token *= 2.0


def _interleaved_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Run each ``fn`` once to warm up, then ``repeats`` rounds in which every ``fn`` runs once, timed.

    Taking turns within each round exposes the methods alike to what else the machine runs.

    :param fns: the work by name
    :param repeats: timed rounds
    :return: the timings in seconds by name
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _windows(compressor: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The windows ``compress`` builds for ``texts`` (ids, real positions, force-kept positions).

    :param compressor: the compressor
    :param texts: the texts
    :return: ``[N, seq_len]`` ids, valid and force-keep arrays
    """
    from tokencompress_env.compressor import window_bounds

    ids_list, keep_list = compressor.tokenize(texts, (), compressor.keep_digits)
    rows_ids, rows_valid, rows_keep = [], [], []
    for ids, keep in zip(ids_list, keep_list, strict=True):
        b = window_bounds(len(ids), compressor.seq_len)
        for w in range(len(b) - 1):
            row = np.full(compressor.seq_len, compressor.reconstructor.pad_token_id, dtype=np.int64)
            real = np.zeros(compressor.seq_len, dtype=bool)
            fk = np.zeros(compressor.seq_len, dtype=bool)
            size = int(b[w + 1] - b[w])
            row[:size], real[:size], fk[:size] = ids[b[w] : b[w + 1]], True, keep[b[w] : b[w + 1]]
            rows_ids.append(row)
            rows_valid.append(real)
            rows_keep.append(fk)
    return np.stack(rows_ids), np.stack(rows_valid), np.stack(rows_keep)


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    """Time both methods as ``config`` says, write and return the results.

    :param config: the options
    :return: the results
    """
    from tokencompress_env.baselines import MethodContext, budget_mask, mask_budget, mask_self_information
    from tokencompress_env.compressor import Compressor, window_mask_logits

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    compressor = Compressor.load(config.run, device=config.device, batch_size=config.batch_size, matmul_dtype=config.matmul_dtype)
    corpus = str(compressor.config.get("corpus", "embedded"))
    texts, data_name = benchmark_texts(config, corpus, compressor.tokenizer)
    rate = config.mask_rate

    results = compressor.compress(texts, mask_rate=rate)
    assert isinstance(results, list)
    n_tokens = sum(r.origin_tokens for r in results)
    # The windows compress() built, for the two comparisons on identical inputs.
    windows, valid, force_keep = _windows(compressor, texts)
    maskable = valid & ~force_keep
    context = MethodContext(reconstructor=compressor.reconstructor, batch_size=config.batch_size)

    def policy_only() -> np.ndarray:
        logits = window_mask_logits(
            compressor.agent,
            windows,
            valid,
            force_keep,
            rate,
            compressor.reconstructor if compressor.observe_surprisal else None,
            config.batch_size,
            matmul_dtype=compressor.matmul_dtype,
        )
        return budget_mask(logits, np.minimum(mask_budget(rate, valid), maskable.sum(axis=1)), maskable)

    def self_information() -> np.ndarray:
        with torch.inference_mode():
            return mask_self_information(windows, rate, context, valid, force_keep)

    stage_runs: list[dict[str, float]] = []

    def compress() -> None:
        compressor.compress(texts, mask_rate=rate)
        stage_runs.append(dict(compressor.last_stage_seconds))

    fns: dict[str, Callable[[], object]] = {"compress": compress, "policy_only": policy_only, "self_information": self_information}
    other = "bfloat16" if compressor.matmul_dtype == "float32" else "float32"
    compare = config.compare_bfloat16 and bool(getattr(compressor.agent.policy, "has_inference_path", False))
    if compare:
        twin = Compressor(
            compressor.agent, compressor.reconstructor, compressor.config, compressor.reference_dir, config.batch_size, matmul_dtype=other
        )
        fns[f"compress_{other}"] = lambda: twin.compress(texts, mask_rate=rate)
    times = _interleaved_seconds(fns, config.repeats)
    stage_runs = stage_runs[1:]  # the timed runs, not the warm-up
    t_compress, t_policy, t_si = (statistics.median(times[k]) for k in ("compress", "policy_only", "self_information"))
    start = time.perf_counter()
    for r in results:
        _ = r.text_tokens
    t_text_tokens = time.perf_counter() - start

    out: dict[str, Any] = {
        "run": str(config.run),
        "data": data_name,
        "texts": len(texts),
        "tokens": int(n_tokens),
        "windows": len(windows),
        "seq_len": compressor.seq_len,
        "mask_rate": rate,
        "achieved_mask_rate": 1.0 - sum(r.compressed_tokens for r in results) / n_tokens,
        "observe_surprisal": compressor.observe_surprisal,
        "matmul_dtype": compressor.matmul_dtype,
        "compress_tokens_per_s": n_tokens / t_compress,
        "policy_only_tokens_per_s": n_tokens / t_policy,
        "self_information_tokens_per_s": n_tokens / t_si,
        "speedup": t_si / t_compress,
        "speedup_policy_only": t_si / t_policy,
        "speedup_best": min(times["self_information"]) / min(times["compress"]),
        "target_speedup": 50.0,
        "seconds": times,
        "stage_seconds": {k: statistics.median(run.get(k, 0.0) for run in stage_runs) for k in stage_runs[0]},
        "text_tokens_seconds": t_text_tokens,
    }
    if compare:
        t_other = statistics.median(times[f"compress_{other}"])
        twin_results = twin.compress(texts, mask_rate=rate)
        assert isinstance(twin_results, list)
        fp32, bf16 = (results, twin_results) if other == "bfloat16" else (twin_results, results)
        dropped = sum(int((~r.kept_mask).sum()) for r in fp32)
        changed = sum(int((~a.kept_mask & b.kept_mask).sum()) for a, b in zip(fp32, bf16, strict=True))
        out[f"compress_{other}_tokens_per_s"] = n_tokens / t_other
        out[f"speedup_{other}"] = t_si / t_other
        out[f"speedup_{other}_best"] = min(times["self_information"]) / min(times[f"compress_{other}"])
        out["bfloat16_changed_drops"] = changed / max(dropped, 1)
    if config.long_tokens:
        out["long_text"] = _long_text_figures(config, compressor, corpus, context)
    out.update(
        {
            "policy_parameters": int(sum(p.numel() for p in compressor.agent.policy.parameters())),
            "reconstructor_parameters": int(compressor.reconstructor.num_parameters()),
            "device": str(compressor.reconstructor.device),
            "torch_threads": torch.get_num_threads(),
            "cpu": _cpu_name(),
            "config": asdict(config),
        }
    )
    path = Path(config.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return out


def _long_text_figures(config: BenchmarkConfig, compressor: Any, corpus: str, context: Any) -> dict[str, Any]:
    """``compress`` on one text of ``long_tokens`` tokens against self-information on its windows.

    ``compress`` is timed as the main figures (median of ``repeats`` after a warm-up); self-information
    once (the reconstructor is warm by then: this is the slow side, and one run of it is long).

    :param config: the options
    :param compressor: the compressor
    :param corpus: the run's corpus source
    :param context: the self-information baseline's context
    :return: the figures
    """
    from tokencompress_env.baselines import mask_self_information

    text = long_text(config, corpus, compressor.tokenizer)
    result = compressor.compress(text, mask_rate=config.mask_rate)
    times = _interleaved_seconds({"compress": lambda: compressor.compress(text, mask_rate=config.mask_rate)}, config.repeats)["compress"]
    stages = dict(compressor.last_stage_seconds)
    windows, valid, force_keep = _windows(compressor, [text])
    start = time.perf_counter()
    with torch.inference_mode():
        mask_self_information(windows, config.mask_rate, context, valid, force_keep)
    t_si = time.perf_counter() - start
    t_compress = statistics.median(times)
    return {
        "tokens": int(result.origin_tokens),
        "windows": len(windows),
        "compress_tokens_per_s": result.origin_tokens / t_compress,
        "self_information_tokens_per_s": result.origin_tokens / t_si,
        "speedup": t_si / t_compress,
        "seconds": {"compress": times, "self_information": [t_si]},
        "stage_seconds_last_run": stages,
    }


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` says.

    :return: the name
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m experiments.benchmark_compress``.

    :param argv: command-line arguments (default ``sys.argv[1:]``)
    """
    config = parse_config(BenchmarkConfig, argv, description=__doc__.split("\n\n")[0] if __doc__ else "")
    print(json.dumps(run_benchmark(config), indent=2))


if __name__ == "__main__":
    sys.exit(main(None))
