"""The corpus layer: three sources, document-level splits, windows, caching."""

from __future__ import annotations

import time

import datasets
import numpy as np
import pytest

from tokencompress_env.data import (
    CorpusSpec,
    count_tokens,
    embedded_documents,
    load_documents,
    make_windows,
    prepare_corpus,
    split_documents,
    window_array,
)
from tokencompress_env.errors import DataSourceError

LOREM = "The quick brown fox jumps over the lazy dog. " * 40


def test_embedded_corpus_is_deterministic_prose():
    first = embedded_documents()
    second = embedded_documents()
    assert [d for d, _ in first] == [d for d, _ in second]
    assert len(first) > 100
    assert any(doc_id.startswith("pydoc:") for doc_id, _ in first)
    assert any(doc_id.startswith("stdlib:") for doc_id, _ in first)
    assert sum(len(text) for _, text in first) > 500_000


def test_local_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text(LOREM + "\n\n" + LOREM)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("Another document about something else entirely. " * 20)
    folder = load_documents(str(tmp_path))
    assert len(folder) == 2
    assert set(folder["doc_id"]) == {"a.txt#0", "sub/b.txt#0"}
    single = load_documents(str(tmp_path / "a.txt"))
    assert single["text"][0].startswith("The quick brown fox")


def test_local_file_with_invalid_utf8_is_read(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"valid text \xff\xfe more valid text " * 10)
    docs = load_documents(str(path))
    assert "valid text" in docs["text"][0]


def test_missing_path_and_empty_file_are_clear_errors(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        load_documents(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("   \n\n  ")
    with pytest.raises(DataSourceError, match="no text"):
        load_documents(str(tmp_path / "empty.txt"))


def test_hub_source_reads_a_local_dataset_directory(tmp_path):
    ds = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["First line of an article.", "", "Second line here.", " = Heading = "]})}
    )
    ds.save_to_disk(str(tmp_path / "hubcopy"))
    docs = load_documents(str(tmp_path / "hubcopy"))
    assert len(docs) == 1
    assert "Second line here." in docs["text"][0]


def test_hub_name_offline_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(DataSourceError) as info:
        load_documents("wikitext", "wikitext-2-raw-v1")
    message = str(info.value)
    assert "\n" not in message
    assert "--data" in message
    assert time.perf_counter() - started < 60


def test_splits_are_disjoint_by_document_and_deterministic():
    docs = datasets.Dataset.from_dict({"doc_id": [f"d{i}" for i in range(200)], "text": [f"text {i}" for i in range(200)]})
    a = split_documents(docs, 0.1, 0.1, seed=3)
    b = split_documents(docs, 0.1, 0.1, seed=3)
    ids = {split: set(a[split]["doc_id"]) for split in a}
    assert ids["train"].isdisjoint(ids["test"]) and ids["train"].isdisjoint(ids["validation"])
    assert ids["validation"].isdisjoint(ids["test"])
    assert sum(len(v) for v in ids.values()) == 200
    assert all(set(a[s]["doc_id"]) == set(b[s]["doc_id"]) for s in a)
    assert 5 <= len(ids["test"]) <= 40
    # A different seed moves documents.
    c = split_documents(docs, 0.1, 0.1, seed=4)
    assert set(c["test"]["doc_id"]) != ids["test"]


def test_small_corpus_still_gets_held_out_documents():
    docs = datasets.Dataset.from_dict({"doc_id": ["a", "b", "c"], "text": ["x", "y", "z"]})
    split = split_documents(docs, 0.05, 0.05)
    assert len(split["test"]) == 1 and len(split["validation"]) == 1 and len(split["train"]) == 1


def test_windows_never_cross_documents(test_reconstructor):
    tok = test_reconstructor.tokenizer
    docs = datasets.Dataset.from_dict({"doc_id": ["long", "short"], "text": [LOREM * 3, "too short"]})
    windows = make_windows(docs, tok, seq_len=16)
    assert set(windows["doc_id"]) == {"long"}
    arr = window_array(windows)
    assert arr.shape[1] == 16 and arr.dtype == np.int64
    full = tok(LOREM * 3, add_special_tokens=False)["input_ids"]
    assert arr[0].tolist() == full[:16]
    assert arr[1].tolist() == full[16:32]


def test_prepare_corpus_caches_and_no_test_window_in_train(test_reconstructor, tmp_path, tc_home):
    spec = CorpusSpec(seq_len=32, max_windows=None)
    first = prepare_corpus(spec, test_reconstructor.tokenizer, cache_dir=tmp_path)
    cached = list(tmp_path.iterdir())
    assert len([p for p in cached if not p.name.startswith(".")]) == 1
    second = prepare_corpus(spec, test_reconstructor.tokenizer, cache_dir=tmp_path)
    assert np.array_equal(window_array(first["test"]), window_array(second["test"]))
    train_docs = set(first["train"]["doc_id"])
    assert train_docs.isdisjoint(set(first["test"]["doc_id"]))
    assert train_docs.isdisjoint(set(first["validation"]["doc_id"]))
    tokens = count_tokens(first)
    assert tokens["train"] > 10 * tokens["test"] > 0


def test_a_file_is_cut_into_documents_at_blank_lines_holding_spaces(tmp_path) -> None:
    from tokencompress_env.data import local_documents

    paragraph = " A sentence of the article , with words . " * 20
    file = tmp_path / "wiki.txt"
    file.write_text(" \n = Title = \n \n" + " \n \n".join([paragraph] * 30) + " \n")  # WikiText's layout
    docs = local_documents(file, doc_chars=2000)
    assert len(docs) == 10  # 3 paragraphs of 840 characters reach 2,000 (the first one with its heading)
    assert docs[0][1].startswith("= Title =") and all(text.count("A sentence") == 60 for _, text in docs)
    plain = tmp_path / "plain.txt"
    plain.write_text("\n\n".join([paragraph] * 30))
    assert len(local_documents(plain, doc_chars=2000)) == 10  # the same cut as plain blank lines
