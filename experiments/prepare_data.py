"""Prepare a corpus: load, split by document, tokenise into fixed windows, cache on disk, report sizes.

Examples::

    python -m experiments.prepare_data --config experiments/configs/dev/sample_data.json
    python -m experiments.prepare_data --dataset_name ../shared/data/wikitext2-valid.txt --max_length 128
    python -m experiments.prepare_data --config experiments/configs/prod/data_prep.json   # needs the hub
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from experiments.config import cli_main, parse_config
from tokencompress_env.data import EMBEDDED, CorpusSpec, count_tokens, load_documents, prepare_corpus, split_documents
from tokencompress_env.errors import ConfigError
from tokencompress_env.options import option
from tokencompress_env.presets import load_or_build


@dataclass
class PrepareDataConfig:
    """Options of ``experiments.prepare_data``.

    Each option is documented at its field (``--help`` prints the docs).
    """

    dataset_name: str = option(EMBEDDED, "corpus source: 'embedded', a local .txt file or folder, or a hub dataset name")
    dataset_config: str | None = option(None, "hub dataset configuration (e.g. 'wikitext-2-raw-v1')")
    reconstructor: str = option("tiny", "reconstructor whose tokenizer cuts the windows (preset, directory or hub name)")
    max_length: int = option(128, "tokens per window ('seq_len')")
    max_sequences: int | None = option(None, "keep at most this many windows per split ('None': all)")
    val_fraction: float = option(0.05, "fraction of documents held out for validation")
    test_fraction: float = option(0.05, "fraction of documents held out for test")
    split_seed: int = option(0, "seed of the document split")
    output_dir: str | None = option(None, "cache folder for the prepared windows ('None': the tokencompress cache)")
    num_proc: int | None = option(None, "processes for tokenisation ('None': one)")

    def validate(self) -> None:
        """Reject out-of-range values."""
        if self.max_length < 2:
            raise ConfigError("max_length must be at least 2")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise ConfigError("max_sequences must be positive")


def prepare(config: PrepareDataConfig) -> dict[str, Any]:
    """Prepare the corpus described by ``config`` and return a report.

    :param config: the options
    :return: report with the cache folder and tokens per split
    """
    reconstructor = load_or_build(config.reconstructor, device="cpu")
    if config.max_length > reconstructor.max_seq_len:
        raise ConfigError(
            f"max_length {config.max_length} exceeds the reconstructor's context of {reconstructor.max_seq_len} tokens: "
            f"pass --max_length {reconstructor.max_seq_len} or less"
        )
    documents = split_documents(
        load_documents(config.dataset_name, config.dataset_config), config.val_fraction, config.test_fraction, config.split_seed
    )
    spec = CorpusSpec(
        source=config.dataset_name,
        dataset_config=config.dataset_config,
        seq_len=config.max_length,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        split_seed=config.split_seed,
        max_windows=config.max_sequences,
    )
    windows = prepare_corpus(spec, reconstructor.tokenizer, cache_dir=config.output_dir, num_proc=config.num_proc, documents=documents)
    return {
        "config": asdict(config),
        "documents": {split: len(docs) for split, docs in documents.items()},
        "windows": {split: len(ds) for split, ds in windows.items()},
        "tokens": count_tokens(windows),
        "cache_dir": str(Path(windows["train"].cache_files[0]["filename"]).parent.parent) if windows["train"].cache_files else None,
    }


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m experiments.prepare_data``.

    :param argv: command-line arguments
    """
    config = parse_config(PrepareDataConfig, argv, description=__doc__ or "")
    print(json.dumps(prepare(config), indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
