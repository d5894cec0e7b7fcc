"""Shared fixtures: a private cache folder and a small reconstructor built once per test session.

The ``test`` preset (a 2-layer, 64-wide GPT-2 with a 512-token BPE vocabulary, 60 pretraining steps on
the embedded corpus) is built by the same code path as the ``tiny`` default, in seconds. It is also
copied to where the ``tiny`` default is cached, so code that asks for the default reconstructor (for
example ``gymnasium.make("TokenMask-v0")`` with no arguments) finds a cached one instead of spending
minutes building the real default; building itself is covered by ``test_reconstructor.py``.
"""

from __future__ import annotations

import os
import shutil
import socket
import types
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokencompress_env.data import CorpusSpec, prepare_corpus, window_array
from tokencompress_env.reconstructor import CACHE_ARG, Reconstructor, default_reconstructor_dir

#: Window length used with the test reconstructor.
TEST_SEQ_LEN = 64


@pytest.fixture(scope="session", autouse=True)
def tc_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point the tokencompress cache at a fresh folder for the whole session."""
    home = tmp_path_factory.mktemp("tokencompress_home")
    os.environ["TOKENCOMPRESS_HOME"] = str(home)
    return home


@pytest.fixture(scope="session", autouse=True)
def sb3_logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Give SB3's logger a folder inside the session's temporary folder (subprocesses inherit it).

    Without a folder, SB3 makes an empty ``SB3-<date>`` folder in the system's temporary folder for every
    model that logs to stdout only; the suite left hundreds of them behind.
    """
    folder = tmp_path_factory.mktemp("sb3_logs")
    os.environ["SB3_LOGDIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def test_reconstructor_dir(tc_home: Path) -> Path:
    """Build the ``test`` preset once; also cache it as the ``tiny`` default (see module docstring)."""
    from tokencompress_env.presets import ensure_preset

    path = ensure_preset("test", device="cpu", progress=False)
    tiny = default_reconstructor_dir("tiny")
    if not tiny.exists():
        shutil.copytree(path, tiny)
    return path


@pytest.fixture(scope="session")
def test_reconstructor(test_reconstructor_dir: Path) -> Reconstructor:
    """The session's small pretrained reconstructor (shared: tests must not train it in place)."""
    return Reconstructor.from_pretrained(test_reconstructor_dir, device="cpu")


@pytest.fixture()
def fresh_reconstructor(test_reconstructor_dir: Path) -> Reconstructor:
    """A private copy of the test reconstructor that a test may train or modify."""
    return Reconstructor.from_pretrained(test_reconstructor_dir, device="cpu")


@pytest.fixture(scope="session")
def test_windows(test_reconstructor: Reconstructor) -> dict[str, np.ndarray]:
    """Windows of the embedded corpus in the test tokenizer, per split (``[N, TEST_SEQ_LEN]``)."""
    windows = prepare_corpus(CorpusSpec(seq_len=TEST_SEQ_LEN), test_reconstructor.tokenizer)
    return {split: window_array(ds) for split, ds in windows.items()}


def refuse_connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Make every socket connection attempt fail at once, and record it (a deterministic stand-in for timing).

    :param monkeypatch: the test's monkeypatch
    :return: the list the attempted addresses are appended to
    """
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError(f"network connections are refused in this test ({address!r})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


class KeyTokenLM(torch.nn.Module):
    """A toy causal LM: once ``key`` has been read, it predicts ``answer`` with near certainty; before, uniform.

    It takes the reconstructor's KV-cache protocol too (the cache is whether each row has read ``key``),
    so that an env can score windows with it chunk by chunk.
    """

    def __init__(self, vocab: int, key: int, answer: int) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(model_type="toy", n_positions=512)
        self.vocab, self.key, self.answer = vocab, key, answer
        self.dtype = torch.float32
        self.head = torch.nn.Linear(1, vocab, bias=False)  # its weight gives the vocabulary size only

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool = False, **kwargs: object) -> object:
        read = attention_mask[:, -input_ids.shape[1] :].bool()
        seen = ((input_ids == self.key) & read).long().cumsum(dim=1) > 0
        past = kwargs.get(CACHE_ARG)
        if isinstance(past, torch.Tensor):
            seen = seen | past[:, None]
        logits = torch.zeros((*input_ids.shape, self.vocab))
        logits[..., self.answer] = torch.where(seen, 12.0, 0.0)
        out = types.SimpleNamespace(logits=logits)
        setattr(out, CACHE_ARG, seen[:, -1] if use_cache else None)
        return out
