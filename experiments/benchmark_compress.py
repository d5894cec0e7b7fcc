"""Benchmark: tokens/s of ``Compressor.compress()`` against self-information scoring on the same texts.

Examples::

    python -m experiments.benchmark_compress --run runs/quickstart --out bench_compress.json
    python -m experiments.benchmark_compress --run runs/quickstart --data ../shared/data/wikitext2-valid.txt --out bench.json

Texts: the documents of ``--data`` (a ``.txt`` file or folder), or by default the held-out ``test`` split
of the run's corpus (the embedded corpus unless the run says otherwise), taken in order up to
``--max_tokens`` tokens (the last text is cut at a token boundary).

Timed, each the median of ``--repeats`` runs after one warm-up, on the same thread count:

* ``compress``: ``Compressor.compress(texts, mask_rate)`` end to end (tokenisation, windows, force-keep,
  policy forward passes, ranking under the budget, decoding), all texts in one call.
* ``self_information``: the Selective Context baseline (:func:`tokencompress_env.baselines.mask_self_information`:
  a reconstructor forward pass per window, ranking under the same budget) on the very windows
  ``compress`` built; tokenisation and decoding are *not* counted for it, so the ratio is conservative.
* ``policy_only``: the policy's part of ``compress`` on the same windows (logits and ranking), for an
  apples-to-apples comparison.

Writes the JSON to ``--out`` and prints it. The target is ``speedup`` (compress vs self-information) of at
least 20 on a CPU; a run that observes surprisal needs a reconstructor forward inside ``compress`` and
cannot reach it.
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

    def validate(self) -> None:
        """Reject unusable values with a message that says what to change."""
        if not self.run:
            raise ConfigError("pass --run DIR (a run folder written by experiments.train_ppo)")
        if not 0.0 <= self.mask_rate < 1.0:
            raise ConfigError(f"mask_rate must be in [0, 1), got {self.mask_rate}")
        if self.max_tokens < 1 or self.repeats < 1 or self.batch_size < 1 or (self.threads is not None and self.threads < 1):
            raise ConfigError("max_tokens, repeats, batch_size and threads must be positive")


def benchmark_texts(config: BenchmarkConfig, corpus: str, tokenizer: Any) -> tuple[list[str], str]:
    """The texts to compress: documents of ``--data`` or of the run corpus's test split, up to ``max_tokens``.

    :param config: the options
    :param corpus: the run's corpus source
    :param tokenizer: the run's tokenizer (to count tokens)
    :return: the texts and a name for the data
    """
    from tokencompress_env.data import load_documents, local_documents, split_documents

    if config.data:
        docs = [text for _, text in local_documents(config.data)]
        name = config.data
    else:
        docs = list(split_documents(load_documents(corpus))["test"]["text"])
        name = f"{corpus} (test split)"
    texts, total = [], 0
    for text in docs:
        if not text.strip():
            continue
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        room = config.max_tokens - total
        if len(enc["input_ids"]) > room:  # cut the last text at a token boundary
            text = text[: enc["offset_mapping"][room - 1][1]]
            if not text.strip():
                break
        texts.append(text)
        total += min(len(enc["input_ids"]), room)
        if total >= config.max_tokens:
            break
    if not texts:
        raise InputError(f"no text to benchmark in {name}")
    return texts, name


def _median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Run ``fn`` once to warm up, then ``repeats`` timed times.

    :param fn: the work
    :param repeats: timed runs
    :return: the median and all timings in seconds
    """
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    """Time both methods as ``config`` says, write and return the results.

    :param config: the options
    :return: the results
    """
    from tokencompress_env.baselines import MethodContext, budget_mask, mask_budget, mask_self_information
    from tokencompress_env.compressor import Compressor, window_bounds, window_mask_logits

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    compressor = Compressor.load(config.run, device=config.device, batch_size=config.batch_size)
    texts, data_name = benchmark_texts(config, str(compressor.config.get("corpus", "embedded")), compressor.tokenizer)
    rate = config.mask_rate

    results = compressor.compress(texts, mask_rate=rate)
    assert isinstance(results, list)
    n_tokens = sum(r.origin_tokens for r in results)
    # The windows compress() built, for the two comparisons on identical inputs.
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
    windows, valid, force_keep = np.stack(rows_ids), np.stack(rows_valid), np.stack(rows_keep)
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
        )
        return budget_mask(logits, np.minimum(mask_budget(rate, valid), maskable.sum(axis=1)), maskable)

    def self_information() -> np.ndarray:
        with torch.inference_mode():
            return mask_self_information(windows, rate, context, valid, force_keep)

    t_compress, all_compress = _median_seconds(lambda: compressor.compress(texts, mask_rate=rate), config.repeats)
    t_policy, all_policy = _median_seconds(policy_only, config.repeats)
    t_si, all_si = _median_seconds(self_information, config.repeats)
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
        "compress_tokens_per_s": n_tokens / t_compress,
        "policy_only_tokens_per_s": n_tokens / t_policy,
        "self_information_tokens_per_s": n_tokens / t_si,
        "speedup": t_si / t_compress,
        "speedup_policy_only": t_si / t_policy,
        "target_speedup": 20.0,
        "seconds": {"compress": all_compress, "policy_only": all_policy, "self_information": all_si},
        "policy_parameters": int(sum(p.numel() for p in compressor.agent.policy.parameters())),
        "reconstructor_parameters": int(compressor.reconstructor.num_parameters()),
        "device": str(compressor.reconstructor.device),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "config": asdict(config),
    }
    path = Path(config.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return out


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m experiments.benchmark_compress``.

    :param argv: command-line arguments (default ``sys.argv[1:]``)
    """
    config = parse_config(BenchmarkConfig, argv, description=__doc__.split("\n\n")[0] if __doc__ else "")
    print(json.dumps(run_benchmark(config), indent=2))


if __name__ == "__main__":
    sys.exit(main(None))
