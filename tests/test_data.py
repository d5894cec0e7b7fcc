"""The corpus layer: three sources, document-level splits, windows, caching."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest

from tests.conftest import refuse_connections
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
    attempts = refuse_connections(monkeypatch)
    with pytest.raises(DataSourceError) as info:
        load_documents("wikitext", "wikitext-2-raw-v1")
    message = str(info.value)
    assert "\n" not in message
    assert "--data" in message
    assert attempts == []  # offline means it fails at once: no connection is even tried (nothing to wait for)


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


def _wikitext_article(title: str, sections: int, words: int) -> str:
    """One article in WikiText's layout: ` = Title = ` heading, ` = = Section = = ` sub-headings, ` \\n` blank lines."""
    body = " ".join(f"{title.lower()}{i % 7}" for i in range(words)) + " ."
    parts = [f" = {title} = \n", " \n", f" {body}\n", " \n"]
    for s in range(sections):
        parts += [f" = = Section {s} of {title} = = \n", " \n", f" {body}\n", f" {body}\n", " \n"]
        parts += [f" = = = Sub {s} = = = \n", " \n", f" {body}\n", " \n"]
    return "".join(parts)


def test_wikitext_shaped_file_splits_into_its_articles(tmp_path):
    titles = [f"Article {chr(65 + i)}" for i in range(12)]
    path = tmp_path / "wiki.txt"
    path.write_text(" \n" + "".join(_wikitext_article(t, sections=2, words=60) for t in titles))
    docs = load_documents(str(path), doc_chars=200)  # articles stay whole, whatever doc_chars says
    assert len(docs) == len(titles)
    for text, title in zip(docs["text"], titles, strict=True):
        assert text.startswith(f"= {title} =")
        assert text.count("= = Section") == 2 and text.count(f"{title.lower()}0") > 10
        assert "\n\n\n" not in text
    split = split_documents(docs, 0.1, 0.1)
    assert len(split["validation"]) >= 1 and len(split["test"]) >= 1


def test_whitespace_only_lines_are_blank_lines(tmp_path):
    paragraph = "A sentence of plain prose about rivers and hills. " * 4
    path = tmp_path / "plain.txt"
    path.write_text(" \n\t\n".join([paragraph] * 30))  # blank lines holding spaces and tabs
    docs = load_documents(str(path), doc_chars=1000)
    assert 5 <= len(docs) <= 8  # cut at those blank lines into ~1000-character documents
    assert all(len(text) < 1500 for text in docs["text"])


def test_heading_rules():
    from tokencompress_env.data import is_wikitext_title, split_text

    assert is_wikitext_title(" = Homarus gammarus = ")
    assert is_wikitext_title("= A =")
    assert not is_wikitext_title(" = = Description = = ")
    assert not is_wikitext_title(" = = = Deeper = = = ")
    assert not is_wikitext_title("x = y = z")
    # Text before the first heading is its own document; a trailing heading stays with the last article.
    docs = split_text("f", "Preface text.\n\n = One = \n\nBody one.\n\n = Two = \n\nBody two.\n\n = Empty = \n", 10_000)
    assert [t for _, t in docs] == ["Preface text.", "= One =\n\nBody one.", "= Two =\n\nBody two.\n\n= Empty ="]


SHARED_WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-valid.txt"


@pytest.mark.skipif(not SHARED_WIKITEXT.is_file(), reason="the shared WikiText-2 file is not present")
def test_shared_wikitext_file_gives_its_articles_and_held_out_splits():
    docs = load_documents(str(SHARED_WIKITEXT))
    assert 50 <= len(docs) <= 70  # ~60 articles
    assert all(text.startswith("= ") for text in docs["text"])
    split = split_documents(docs)
    assert len(split["validation"]) >= 1 and len(split["test"]) >= 1
    assert len(split["train"]) > 40


def test_corpus_cache_with_an_empty_split_reloads(test_reconstructor, tmp_path, tc_home):
    """A corpus whose held-out documents are all shorter than a window: the cache reloads, the split stays empty."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(20):  # long documents, and three one-line ones
        (folder / f"long{i:02d}.txt").write_text(f"Document {i}. " + LOREM)
    spec = CorpusSpec(source=str(folder), seq_len=32, val_fraction=0.3, test_fraction=0.3)
    first = prepare_corpus(spec, test_reconstructor.tokenizer, cache_dir=tmp_path / "cache")
    assert all(len(first[s]) > 0 for s in ("train", "validation", "test"))
    for name in ("x", "y", "z"):
        (folder / f"{name}.txt").write_text("tiny")
    docs = split_documents(load_documents(str(folder)), 0.3, 0.3)
    docs["validation"] = docs["validation"].filter(lambda d: d["doc_id"].startswith(("x", "y", "z")))
    spec2 = CorpusSpec(source=str(folder), seq_len=32, val_fraction=0.31, test_fraction=0.3)
    made = prepare_corpus(spec2, test_reconstructor.tokenizer, cache_dir=tmp_path / "cache", documents=docs)
    assert len(made["validation"]) == 0 and len(made["train"]) > 0
    again = prepare_corpus(spec2, test_reconstructor.tokenizer, cache_dir=tmp_path / "cache")  # from the cache
    assert list(again) == ["train", "validation", "test"]
    assert len(again["validation"]) == 0 and window_array(again["validation"]).shape == (0, 0)
    assert np.array_equal(window_array(again["train"]), window_array(made["train"]))


def test_unreadable_corpus_cache_is_rebuilt(test_reconstructor, tmp_path, tc_home):
    spec = CorpusSpec(seq_len=32)
    first = prepare_corpus(spec, test_reconstructor.tokenizer, cache_dir=tmp_path)
    cached = next(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    for arrow in (cached / "test").glob("*.arrow"):  # what an older version wrote for an empty split
        arrow.unlink()
    second = prepare_corpus(spec, test_reconstructor.tokenizer, cache_dir=tmp_path)
    assert np.array_equal(window_array(first["test"]), window_array(second["test"]))


def test_pretraining_never_reports_training_windows_as_validation(tmp_path, monkeypatch):
    from tokencompress_env import pretrain as pretrain_module

    path = tmp_path / "articles.txt"
    path.write_text(" = Long = \n \n " + LOREM * 20 + "\n \n = Stub = \n \n Short .\n \n = Stub two = \n \n Short too .\n")

    def held_out_stubs(documents: datasets.Dataset) -> datasets.DatasetDict:  # the long article trains, the stubs are held out
        return datasets.DatasetDict({"train": documents.select([0]), "validation": documents.select([1]), "test": documents.select([2])})

    monkeypatch.setattr(pretrain_module, "split_documents", held_out_stubs)
    config = pretrain_module.BuildConfig(
        source=str(path),
        preset="test",
        vocab_size=300,
        seq_len=32,
        pretrain=pretrain_module.PretrainConfig(steps=1, eval_every=0, checkpoint_every=0),
    )
    monkeypatch.setenv("TOKENCOMPRESS_HOME", str(tmp_path / "home"))
    with pytest.raises(DataSourceError, match=r"validation split .* has no 32-token window") as info:
        pretrain_module.build_reconstructor(config, tmp_path / "recon", device="cpu", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "recon").exists() and not (tmp_path / "recon.partial").exists()
    with pytest.raises(ValueError, match="no validation windows"):
        pretrain_module.pretrain(None, np.zeros((4, 8), dtype=np.int64), np.zeros((0, 0), dtype=np.int64), config.pretrain)  # type: ignore[arg-type]
