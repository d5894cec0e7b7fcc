"""Corpora: the embedded offline default, local text files, and Hugging Face datasets.

One function, :func:`load_documents`, turns a source name into a :class:`datasets.Dataset` of
documents (columns ``doc_id`` and ``text``). :func:`split_documents` assigns whole documents to
train/validation/test deterministically, so no window of a test document is ever trained on, and
:func:`make_windows` tokenises and cuts each split into fixed-length windows of ``seq_len`` tokens.
:func:`prepare_corpus` chains the three and caches the result on disk (Arrow, via ``datasets``).

Sources:

* ``"embedded"``: English prose that ships with every Python installation, the docstrings of the
  standard library (read with :mod:`ast`, nothing is imported) and the ``pydoc_data.topics`` help
  texts, extracted in a fixed order.
* a path to a ``.txt`` file or a folder of them, cut into documents as a reader would
  (:func:`split_text`): a WikiText top-level heading (a `` = Title = `` line) starts a new document,
  and a file without such headings is cut at blank lines (whitespace-only lines count as blank) into
  documents of about ``doc_chars`` characters.
* ``"hf:NAME[:CONFIG]"`` or a bare hub dataset name such as ``"wikitext"`` with ``dataset_config``:
  loaded with :func:`datasets.load_dataset`; offline this fails with a one-line
  :class:`~tokencompress_env.errors.DataSourceError`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import shutil
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from tokencompress_env.errors import DataSourceError
from tokencompress_env.paths import cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: Name of the embedded offline corpus.
EMBEDDED = "embedded"

_LOG = logging.getLogger(__name__)

_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "__pycache__",
    "turtledemo",
    "ensurepip",
    "tkinter",
    "config-3",
}


def _stdlib_docstring_documents() -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)``: one document per standard-library module, its docstrings joined.

    :return: an iterator over the documents, in sorted path order
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = Path(dirpath) / filename
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue
            parts = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc.split()) >= 4:
                        parts.append(doc.strip())
            if parts:
                rel = path.relative_to(root).with_suffix("")
                yield "stdlib:" + ".".join(rel.parts), "\n\n".join(parts)


def embedded_documents() -> list[tuple[str, str]]:
    """Return the embedded offline corpus as ``(doc_id, text)`` pairs.

    It is the standard library's docstrings (one document per module) followed by the
    ``pydoc_data.topics`` help texts (one document per topic), always in the same order.

    :return: the documents
    """
    from pydoc_data.topics import topics

    docs = list(_stdlib_docstring_documents())
    docs.extend((f"pydoc:{key}", topics[key].strip()) for key in sorted(topics) if topics[key].strip())
    return docs


def _read_text_file(path: Path) -> str:
    """Read a text file as UTF-8, replacing undecodable bytes rather than failing (with a one-line warning).

    :param path: the file
    :return: its text
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", errors="replace")
        _LOG.warning(
            "warning: '%s' is not valid UTF-8 (first bad byte at offset %d); undecodable bytes were replaced by U+FFFD. "
            "Re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8) to keep them.",
            path,
            exc.start,
        )
        return text


#: A WikiText top-level heading line: `` = Title = `` (exactly one ``=`` each side; `` = = Section = = `` is not one).
_WIKITEXT_TITLE = re.compile(r"= (?!=)\S(?:.*\S)?(?<!=) =")
#: Documents of a local or hub text are cut by these rules; part of the corpus cache key of such sources.
DOCUMENT_RULES_VERSION = 2


def is_wikitext_title(line: str) -> bool:
    """Whether a line is a WikiText top-level heading such as `` = Homarus gammarus = ``.

    Section headings (`` = = Description = = ``) and deeper ones are not.

    :param line: one line of text
    :return: ``True`` for a top-level heading
    """
    return _WIKITEXT_TITLE.fullmatch(line.strip()) is not None


def _paragraphs(text: str) -> list[tuple[bool, str]]:
    """Cut a text into paragraphs at blank lines (whitespace-only lines are blank) and top-level headings.

    :param text: the text
    :return: ``(is_title, paragraph)`` pairs, in order; a WikiText top-level heading is its own paragraph
    """
    out: list[tuple[bool, str]] = []
    lines: list[str] = []

    def flush() -> None:
        if lines:
            out.append((False, "\n".join(lines)))
            lines.clear()

    for line in text.splitlines():
        if not line.strip():
            flush()
        elif is_wikitext_title(line):
            flush()
            out.append((True, line.strip()))
        else:
            lines.append(line)
    flush()
    return out


def split_text(doc_id: str, text: str, doc_chars: int) -> list[tuple[str, str]]:
    """Cut one long text into documents as a reader would.

    Paragraphs are separated by blank lines, and a line holding only whitespace is blank. When the text
    has WikiText top-level headings (`` = Title = `` lines; `` = = Section = = `` lines are sections of an
    article, not documents), each heading starts a new document that runs to the next one (an article,
    whatever its length); text before the first heading is a document of its own, and a heading with
    no text after it stays with the document before it. A text without such headings is cut at
    paragraph breaks into documents of about ``doc_chars`` characters.

    :param doc_id: prefix of the produced document ids (``<doc_id>#<index>``)
    :param text: the text
    :param doc_chars: target characters per document (texts without headings)
    :return: the documents, in order
    """
    paragraphs = _paragraphs(text)
    groups: list[list[str]] = []
    if any(is_title for is_title, _ in paragraphs):
        has_body = False
        for is_title, paragraph in paragraphs:
            if is_title and (not groups or has_body):
                groups.append([])
                has_body = False
            elif not groups:
                groups.append([])
            groups[-1].append(paragraph)
            has_body = has_body or not is_title
        if len(groups) > 1 and not has_body:  # a last heading with no text after it
            groups[-2].extend(groups.pop())
    else:
        size = doc_chars
        for _, paragraph in paragraphs:
            if size >= doc_chars:
                groups.append([])
                size = 0
            groups[-1].append(paragraph)
            size += len(paragraph)
    docs = ["\n\n".join(group).strip() for group in groups]
    return [(f"{doc_id}#{i}", doc) for i, doc in enumerate(d for d in docs if d)]


def local_documents(path: str | Path, doc_chars: int = 20_000) -> list[tuple[str, str]]:
    """Read a local ``.txt`` file or every ``.txt``/``.md`` file below a folder as documents.

    Each file is cut into documents by :func:`split_text` (WikiText articles at their top-level
    headings; otherwise about ``doc_chars`` characters at blank lines), so that a single large file
    still gives many documents to split by.

    :param path: a file or a folder
    :param doc_chars: target characters per document
    :return: the documents
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataSourceError(f"data path '{path}' does not exist: pass an existing .txt file or folder")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in {".txt", ".md"})
    docs: list[tuple[str, str]] = []
    for file in files:
        doc_id = str(file.relative_to(root)) if root.is_dir() else file.name
        docs.extend(split_text(doc_id, _read_text_file(file), doc_chars))
    if not any(text.strip() for _, text in docs):
        raise DataSourceError(f"data path '{path}' holds no text: give a non-empty .txt file or folder")
    return docs


def hub_documents(name: str, config: str | None = None, split: str = "train", doc_chars: int = 20_000) -> list[tuple[str, str]]:
    """Load a Hugging Face dataset's ``text`` column as documents (consecutive lines grouped).

    ``name`` may also be a local directory written by :meth:`datasets.DatasetDict.save_to_disk` or
    a dataset script/data folder that :func:`datasets.load_dataset` accepts.

    :param name: hub dataset name (``"wikitext"``) or local dataset directory
    :param config: the dataset configuration (``"wikitext-2-raw-v1"``)
    :param split: the split whose text is read
    :param doc_chars: target characters per document when grouping lines
    :return: the documents
    """
    try:
        if Path(name).is_dir() and (Path(name) / "dataset_dict.json").exists():
            loaded: Any = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name, config) if config else datasets.load_dataset(name)
    except Exception as exc:  # any failure to reach the hub is the same user error
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataSourceError(
            f"could not load dataset '{name}'{f' ({config})' if config else ''}: {first_line[:200]}. "
            "Offline? Give 'embedded' or a local .txt file or folder as the corpus (--data, --corpus or --dataset_name) instead."
        ) from None
    table = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if "text" not in table.column_names:
        raise DataSourceError(f"dataset '{name}' has no 'text' column (columns: {table.column_names})")
    return split_text(f"{name}:{split}", "\n\n".join(t for t in table["text"] if t and t.strip()), doc_chars)


def load_documents(source: str = EMBEDDED, dataset_config: str | None = None, doc_chars: int = 20_000) -> datasets.Dataset:
    """Load a corpus as a :class:`datasets.Dataset` with columns ``doc_id`` and ``text``.

    :param source: ``"embedded"``, a local path, ``"hf:NAME[:CONFIG]"`` or a hub dataset name
    :param dataset_config: hub dataset configuration (for a bare hub name)
    :param doc_chars: target characters per document when a long text is cut into documents
    :return: the documents, in a deterministic order
    """
    if source == EMBEDDED:
        docs = embedded_documents()
    elif source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        docs = hub_documents(name, config or dataset_config, doc_chars=doc_chars)
    elif (Path(source).expanduser() / "dataset_dict.json").exists():
        docs = hub_documents(str(Path(source).expanduser()), dataset_config, doc_chars=doc_chars)
    elif Path(source).expanduser().exists():
        docs = local_documents(source, doc_chars=doc_chars)
    elif "/" in source or os.sep in source or source.endswith(".txt"):
        raise DataSourceError(f"data path '{source}' does not exist: pass an existing .txt file or folder")
    else:
        docs = hub_documents(source, dataset_config, doc_chars=doc_chars)
    return datasets.Dataset.from_dict({"doc_id": [d for d, _ in docs], "text": [t for _, t in docs]})


def _split_of(doc_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Assign a document to a split by a stable hash of its id.

    :param doc_id: the document id
    :param seed: the split seed
    :param val_fraction: fraction of documents in validation
    :param test_fraction: fraction of documents in test
    :return: ``"train"``, ``"validation"`` or ``"test"``
    """
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def split_documents(
    documents: datasets.Dataset, val_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0
) -> datasets.DatasetDict:
    """Split documents into train/validation/test by document, deterministically.

    Each split gets at least one document when there are three or more.

    :param documents: dataset with ``doc_id`` and ``text``
    :param val_fraction: fraction of documents for validation
    :param test_fraction: fraction of documents for test
    :param seed: seed of the assignment hash
    :return: a :class:`datasets.DatasetDict` with ``train``, ``validation`` and ``test``
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataSourceError("split fractions must be in [0, 1) and sum to less than 1")
    ids = documents["doc_id"]
    labels = [_split_of(d, seed, val_fraction, test_fraction) for d in ids]
    if len(ids) >= 3:
        # Guarantee non-empty held-out splits on small corpora: move the last train documents.
        for split, fraction in (("test", test_fraction), ("validation", val_fraction)):
            if fraction > 0 and split not in labels:
                train_idx = [i for i, lab in enumerate(labels) if lab == "train"]
                labels[train_idx[-1]] = split
    return datasets.DatasetDict(
        {split: documents.select([i for i, lab in enumerate(labels) if lab == split]) for split in ("train", "validation", "test")}
    )


def _empty_windows() -> datasets.Dataset:
    """A split without windows, with the columns and types of :func:`make_windows`'s output.

    :return: an empty dataset
    """
    features = {"doc_id": datasets.Value("string"), "input_ids": datasets.Sequence(datasets.Value("int64"))}
    return datasets.Dataset.from_dict({"doc_id": [], "input_ids": []}, features=datasets.Features(features))


def make_windows(
    documents: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    num_proc: int | None = None,
    max_windows: int | None = None,
) -> datasets.Dataset:
    """Tokenise documents and cut each into non-overlapping windows of exactly ``seq_len`` tokens.

    A document's remainder shorter than ``seq_len`` is dropped, so windows never cross documents.

    :param documents: dataset with ``doc_id`` and ``text``
    :param tokenizer: the reconstructor's tokenizer
    :param seq_len: tokens per window
    :param num_proc: processes for :meth:`datasets.Dataset.map`
    :param max_windows: keep at most this many windows (the first ones)
    :return: dataset with columns ``doc_id`` and ``input_ids`` (``seq_len`` int64 each)
    """

    def tokenize_and_cut(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out_ids: list[list[int]] = []
        out_docs: list[str] = []
        encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        for doc_id, ids in zip(batch["doc_id"], encoded, strict=True):
            for start in range(0, len(ids) - seq_len + 1, seq_len):
                out_ids.append(ids[start : start + seq_len])
                out_docs.append(doc_id)
        return {"doc_id": out_docs, "input_ids": out_ids}

    windows = documents.map(
        tokenize_and_cut,
        batched=True,
        remove_columns=documents.column_names,
        num_proc=num_proc if num_proc and len(documents) >= 2 * num_proc else None,
        desc=f"Cutting {seq_len}-token windows",
    )
    if len(windows) == 0:  # every document shorter than one window: datasets keeps the input columns then
        windows = _empty_windows()
    windows = windows.cast_column("input_ids", datasets.Sequence(datasets.Value("int64")))
    if max_windows is not None and len(windows) > max_windows:
        windows = windows.select(range(max_windows))
    return windows.with_format("numpy", columns=["input_ids"], output_all_columns=True)


@dataclass(frozen=True)
class CorpusSpec:
    """What identifies a prepared corpus; its hash names the cache folder.

    :param source: corpus source (see :func:`load_documents`)
    :param dataset_config: hub dataset configuration, if any
    :param seq_len: tokens per window
    :param val_fraction: fraction of documents for validation
    :param test_fraction: fraction of documents for test
    :param split_seed: seed of the document split
    :param tokenizer_id: a string identifying the tokenizer (its name or path and vocabulary size)
    :param max_windows: cap on windows per split (``None``: all)
    """

    source: str = EMBEDDED
    dataset_config: str | None = None
    seq_len: int = 128
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 0
    tokenizer_id: str = ""
    max_windows: int | None = None

    def key(self) -> str:
        """Return a short stable hash of the spec.

        :return: 16 hex digits
        """
        facts: dict[str, Any] = asdict(self)
        if self.source != EMBEDDED:  # documents of other sources are cut by rules that have changed
            facts["document_rules"] = DOCUMENT_RULES_VERSION
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_id(tokenizer: PreTrainedTokenizerBase) -> str:
    """Return a string that identifies a tokenizer's vocabulary.

    :param tokenizer: the tokenizer
    :return: its name or path, vocabulary size and a hash of its vocabulary
    """
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:12]
    return f"{type(tokenizer).__name__}:{len(vocab)}:{digest}"


def prepare_corpus(
    spec: CorpusSpec,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    documents: datasets.DatasetDict | None = None,
) -> datasets.DatasetDict:
    """Return the windows of every split for ``spec``, from the on-disk cache when present.

    :param spec: what to prepare (``tokenizer_id`` is filled in from ``tokenizer`` if empty)
    :param tokenizer: the tokenizer to cut windows with
    :param cache_dir: folder of the cache (default ``<cache root>/corpora``)
    :param num_proc: processes for tokenisation
    :param documents: already split documents (skips loading them again)
    :return: a :class:`datasets.DatasetDict` of windows (``train``, ``validation``, ``test``)
    """
    if not spec.tokenizer_id:
        spec = CorpusSpec(**{**asdict(spec), "tokenizer_id": tokenizer_id(tokenizer)})
    folder = Path(cache_dir) if cache_dir else cache_root() / "corpora"
    target = folder / spec.key()
    if (target / "dataset_dict.json").exists():
        cached = _load_cached_windows(target)
        if cached is not None:
            return cached
    if documents is None:
        documents = split_documents(
            load_documents(spec.source, spec.dataset_config), spec.val_fraction, spec.test_fraction, spec.split_seed
        )
    windows = datasets.DatasetDict(
        {split: make_windows(docs, tokenizer, spec.seq_len, num_proc, spec.max_windows) for split, docs in documents.items()}
    )
    if all(len(ds) == 0 for ds in windows.values()):
        raise DataSourceError(
            f"corpus '{spec.source}' is shorter than one {spec.seq_len}-token window: give more text or a shorter window length"
        )
    tmp = folder / f".{spec.key()}.tmp-{os.getpid()}"
    # datasets cannot read back a split saved without rows: only splits with windows are saved, and
    # spec.json lists all splits, so the empty ones are recreated on loading.
    datasets.DatasetDict({k: v for k, v in windows.items() if len(v)}).save_to_disk(str(tmp))
    (tmp / "spec.json").write_text(json.dumps({**asdict(spec), "splits": list(windows)}, indent=2))
    if target.exists():  # another process prepared the same corpus meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return windows


def _load_cached_windows(target: Path) -> datasets.DatasetDict | None:
    """Read a corpus cache folder written by :func:`prepare_corpus`; an unreadable one is removed.

    :param target: the cache folder
    :return: the windows of every split, or ``None`` when the cache is unreadable (it is then rebuilt)
    """
    try:
        loaded = datasets.load_from_disk(str(target))
        splits = json.loads((target / "spec.json").read_text()).get("splits", list(loaded))
        assert isinstance(loaded, datasets.DatasetDict)
    except Exception as exc:  # e.g. a cache of an older version with an empty split (IndexError in datasets)
        _LOG.warning("warning: the corpus cache '%s' is unreadable (%s); rebuilding it", target, type(exc).__name__)
        shutil.rmtree(target, ignore_errors=True)
        return None
    return datasets.DatasetDict(
        {
            split: (loaded[split] if split in loaded else _empty_windows()).with_format(
                "numpy", columns=["input_ids"], output_all_columns=True
            )
            for split in splits
        }
    )


def count_tokens(windows: datasets.DatasetDict) -> dict[str, int]:
    """Count the tokens in each split of a windowed corpus.

    :param windows: the windows
    :return: tokens per split
    """
    return {split: int(len(ds) * (len(ds[0]["input_ids"]) if len(ds) else 0)) for split, ds in windows.items()}


def window_array(windows: datasets.Dataset) -> np.ndarray:
    """Return all windows of a split as one ``[N, seq_len]`` int64 array.

    :param windows: one split of a windowed corpus
    :return: the token ids
    """
    if len(windows) == 0:
        return np.zeros((0, 0), dtype=np.int64)
    return np.asarray(windows.with_format("numpy")["input_ids"], dtype=np.int64)


def window_doc_ids(windows: datasets.Dataset) -> np.ndarray:
    """Return the document id of every window of a split, aligned with :func:`window_array`.

    :param windows: one split of a windowed corpus (column ``doc_id``)
    :return: ``[N]`` object array of document ids
    """
    if len(windows) == 0:
        return np.zeros(0, dtype=object)
    return np.asarray(windows.with_format(None)["doc_id"], dtype=object)


def window_continuations(windows: np.ndarray, doc_ids: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``horizon`` tokens that follow each window in its document, where the windows hold them.

    :func:`make_windows` cuts each document into consecutive non-overlapping windows, in order, so the
    tokens after window ``i`` are the first tokens of windows ``i + 1, i + 2, ..`` when those belong to the
    same document. A window without ``horizon`` following tokens in its document's windows (the last
    window of a document: the remainder shorter than a window is not kept) has none.

    :param windows: ``[N, L]`` all windows of a split, in :func:`make_windows` order (not subsampled)
    :param doc_ids: ``[N]`` their document ids
    :param horizon: continuation length in tokens
    :return: ``[N, horizon]`` int64 continuations (zeros where unavailable) and ``[N]`` bool availability
    """
    ids = np.asarray(windows, dtype=np.int64)
    docs = np.asarray(doc_ids, dtype=object)
    n = len(ids)
    length = ids.shape[1] if ids.ndim == 2 else 0
    out = np.zeros((n, max(horizon, 0)), dtype=np.int64)
    available = np.zeros(n, dtype=bool)
    if n == 0 or horizon <= 0 or length == 0:
        return out, available if horizon > 0 else np.ones(n, dtype=bool)
    needed = -(-horizon // length)  # following windows holding the continuation
    for i in range(n - needed):
        if all(docs[i + j] == docs[i] for j in range(1, needed + 1)):
            out[i] = ids[i + 1 : i + 1 + needed].reshape(-1)[:horizon]
            available[i] = True
    return out, available
