"""Property-based fuzzing (issue 6) of TokenMask-v0 and of ``Compressor.compress``.

Random window contents (empty, padded, special and mask tokens, any id), random seeds, targets and
actions for the environment; random Unicode text, rates (valid and invalid) and force-keep strings for
``compress()``. Nothing may crash with anything but a one-line :class:`InputError`, force-kept tokens
are never dropped, and the bookkeeping (decisions, rates, budgets, ids) stays exact. Example counts are
small so that the file runs in well under a minute on two shared cores.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experiments.train_ppo import TrainConfig, train
from tokencompress_env.baselines import mask_budget
from tokencompress_env.compressor import CompressionResult, Compressor, window_bounds
from tokencompress_env.env import TokenMaskEnv
from tokencompress_env.errors import InputError
from tokencompress_env.observation import Decision
from tokencompress_env.reconstructor import Reconstructor
from tokencompress_env.units import unit_heads, unit_index, unit_starts

DEBUG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "dev" / "debug.json"
SEQ_LEN = 64
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------- the environment
@st.composite
def window_sets(draw: st.DrawFn, vocab_size: int) -> list[list[int]]:
    """1 to 4 windows of 0 to 64 ids, biased towards special ids (0, 1, 2) and digits-free small ids."""
    ids = st.one_of(st.integers(0, vocab_size - 1), st.sampled_from([0, 1, 2, 3, vocab_size - 1]))
    return draw(st.lists(st.lists(ids, min_size=0, max_size=SEQ_LEN), min_size=1, max_size=4))


@FUZZ
@given(data=st.data())
def test_env_fuzz(test_reconstructor: Reconstructor, data: st.DataObject) -> None:
    vocab = test_reconstructor.vocab_size
    windows = data.draw(window_sets(vocab), label="windows")
    chunk_size = data.draw(st.sampled_from([8, 16, 32, 64]), label="chunk_size")
    low = data.draw(st.floats(0.0, 1.0), label="low")
    high = data.draw(st.floats(low, 1.0), label="high")
    env = TokenMaskEnv(
        windows=windows,
        reconstructor=test_reconstructor,
        seq_len=SEQ_LEN,
        chunk_size=chunk_size,
        mask_rate_range=(low, high),
        reward_type=data.draw(st.sampled_from(["info_theoretic", "simple"]), label="reward_type"),
        keep_digits=data.draw(st.booleans(), label="keep_digits"),
        observe_surprisal=data.draw(st.booleans(), label="observe_surprisal"),
    )
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    options: dict[str, float | int] = {}
    if data.draw(st.booleans(), label="fix_target"):
        options["target_mask_rate"] = data.draw(st.floats(0.0, 1.0), label="target")
    if data.draw(st.booleans(), label="fix_window"):
        options["window_index"] = data.draw(st.integers(0, len(windows) - 1), label="window_index")
    obs, info = env.reset(seed=seed, options=options)
    assert env.observation_space.contains(obs)
    valid = obs["valid"].astype(bool)
    keep = obs["force_keep"].astype(bool)
    assert info["n_valid"] == int(valid.sum()) == len(windows[info["window_index"]])
    assert not (keep & ~valid).any()
    rng = np.random.default_rng(seed)
    p_drop = data.draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]), label="p_drop")
    steps = SEQ_LEN // chunk_size
    for step in range(steps):
        mask = env.action_masks()
        assert mask.shape == (2 * chunk_size,)
        action = (rng.random(chunk_size) < p_drop).astype(np.int8)
        obs, reward, terminated, truncated, info = env.step(action)
        assert env.observation_space.contains(obs)
        assert math.isfinite(reward) and not truncated
        assert terminated == (step == steps - 1)
        decisions = obs["decisions"]
        decided = slice(0, (step + 1) * chunk_size)
        assert (decisions[decided] != Decision.UNDECIDED).all() and (decisions[(step + 1) * chunk_size :] == Decision.UNDECIDED).all()
        assert not (decisions[keep] == Decision.MASKED).any(), "a force-kept token was dropped"
        assert not (decisions[~valid] == Decision.MASKED).any(), "padding was dropped"
        chunk = slice(step * chunk_size, (step + 1) * chunk_size)
        droppable = valid[chunk] & ~keep[chunk]
        # A token follows the decision of its unit's first token (whole characters: units="piece").
        heads = unit_heads(unit_starts(obs["token_ids"], valid, test_reconstructor.tokenizer, "piece")[None])[0][chunk]
        start = step * chunk_size
        follows = np.where(
            heads >= start, action[np.clip(heads - start, 0, chunk_size - 1)].astype(bool), decisions[heads] == Decision.MASKED
        )
        assert ((decisions[chunk] == Decision.MASKED) == (follows & droppable)).all()
        n_masked = int((decisions[valid] == Decision.MASKED).sum())
        assert info["n_masked"] == n_masked
        assert math.isfinite(info["masked_bits_total"]) and info["masked_bits_total"] >= 0
        n_decided = int(valid[decided].sum())
        assert info["n_decided"] == n_decided
        assert info["mask_rate"] == pytest.approx(n_masked / n_decided if n_decided else 0.0)
    assert set(np.unique(obs["decisions"])) <= {Decision.KEPT, Decision.MASKED}


# ---------------------------------------------------------------------------------------------- compress()
@pytest.fixture(scope="module")
def compressor(tmp_path_factory: pytest.TempPathFactory, test_reconstructor_dir: Path) -> Compressor:
    """A compressor from a one-rollout debug run (the policy is barely trained: rankings are arbitrary, which suits fuzzing)."""
    base = {k: v for k, v in json.loads(DEBUG.read_text()).items() if not k.startswith("_")}
    runs = tmp_path_factory.mktemp("fuzz_runs")
    train(TrainConfig(**{**base, "runs_dir": str(runs), "total_timesteps": 64, "tensorboard": False}))
    return Compressor.load(runs / "debug", device="cpu")


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
VALID_RATE = st.floats(0.0, 1.0, exclude_max=True)
INVALID_RATE = st.one_of(st.floats(max_value=0.0, exclude_max=True), st.floats(min_value=1.0), st.just(math.nan), st.just(math.inf))


def _is_subsequence(small: str, big: str) -> bool:
    it = iter(big)
    return all(ch in it for ch in small)


def _check_result(compressor: Compressor, text: str, rate: float, result: CompressionResult, force_keep: list[str]) -> None:
    n = result.origin_tokens
    ids = np.asarray(result.origin_ids)
    kept = np.asarray(result.kept_mask, dtype=bool)
    assert n == len(ids) == len(kept) == len(result.force_kept) > 0
    assert np.array_equal(result.ids, ids[kept])
    assert result.compressed_tokens == int(kept.sum())
    assert result.achieved_mask_rate == pytest.approx(1.0 - kept.sum() / n)
    assert not (np.asarray(result.force_kept) & ~kept).any(), "a force-kept token was dropped"
    assert result.text == compressor.tokenizer.decode(result.ids.tolist())
    # Exact budgets: each window drops round_half_up(rate * its tokens), or all it may drop if fewer.
    bounds = window_bounds(n, compressor.seq_len)
    sizes = np.diff(bounds)
    maskable = np.array([(~np.asarray(result.force_kept)[a:b]).sum() for a, b in itertools.pairwise(bounds)])
    assert result.windows == len(sizes)
    budget = int(np.minimum(mask_budget(rate, sizes), maskable).sum())
    starts = unit_starts(ids, None, compressor.tokenizer, result.units)
    if starts.all():  # every unit a single token: exact budgets
        assert int((~kept).sum()) == budget
    else:  # whole characters (at most 4 tokens each): the closest whole-unit count, per window
        assert abs(int((~kept).sum()) - budget) < 4 * len(sizes)
    index = unit_index(starts[None])[0]
    assert all(len(set(kept[index == u].tolist())) == 1 for u in np.unique(index)), "a unit was split"
    assert _is_subsequence(result.text, text) and result.text_tokens is not None and result.text_tokens <= n
    for s in force_keep:
        if s and s in text:
            assert s in result.text, f"force-kept {s!r} missing from {result.text!r}"


@FUZZ
@given(text=TEXT, rate=VALID_RATE, data=st.data())
def test_compress_fuzz(compressor: Compressor, text: str, rate: float, data: st.DataObject) -> None:
    if data.draw(st.booleans(), label="long"):
        text = text * data.draw(st.integers(2, 40), label="repeat")
    force_keep: list[str] = []
    if text and data.draw(st.booleans(), label="force"):
        start = data.draw(st.integers(0, len(text) - 1), label="start")
        force_keep.append(text[start : start + data.draw(st.integers(1, 12), label="length")])
    if not text.strip():
        with pytest.raises(InputError, match="empty or only whitespace"):
            compressor.compress(text, mask_rate=rate, force_keep=force_keep)
        return
    try:
        result = compressor.compress(text, mask_rate=rate, force_keep=force_keep)
    except InputError as exc:  # a text of characters the tokenizer drops entirely, or a rate that removes all
        assert ("has no tokens" in str(exc) or "would remove every token" in str(exc)) and "\n" not in str(exc)
        return
    assert isinstance(result, CompressionResult)
    _check_result(compressor, text, rate, result, force_keep)


@FUZZ
@given(texts=st.lists(TEXT.filter(lambda t: t.strip() != ""), min_size=1, max_size=4), rate=VALID_RATE)
def test_compress_batch_fuzz(compressor: Compressor, texts: list[str], rate: float) -> None:
    try:
        results = compressor.compress(texts, mask_rate=rate)
    except InputError as exc:
        assert "has no tokens" in str(exc) or "would remove every token" in str(exc)
        return
    assert isinstance(results, list) and len(results) == len(texts)
    for text, result in zip(texts, results, strict=True):
        _check_result(compressor, text, rate, result, [])
        assert np.array_equal(result.kept_mask, compressor.compress(text, mask_rate=rate).kept_mask)  # batching changes nothing


@settings(max_examples=20, deadline=None)
@given(rate=INVALID_RATE)
def test_compress_rejects_bad_rates(compressor: Compressor, rate: float) -> None:
    with pytest.raises(InputError, match=r"mask_rate must be in \[0, 1\)") as info:
        compressor.compress("Some perfectly ordinary text to compress.", mask_rate=rate)
    assert "\n" not in str(info.value)
