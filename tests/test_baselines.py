"""Baselines: exact rate control (with padding and force-keep), ordering logic, determinism, the policy seam."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from tokencompress_env.baselines import (
    BASELINE_NAMES,
    BASELINES,
    MethodContext,
    budget_mask,
    canonical_method_name,
    greedy_search_masks,
    logits_to_mask,
    mask_budget,
    maskable_positions,
    policy_method,
    rate_budget,
    segment_budgets,
    stride_priority,
    token_char_lengths,
    token_frequencies,
)
from tokencompress_env.errors import InputError
from tokencompress_env.reconstructor import Reconstructor

N_WINDOWS = 8


@pytest.fixture(scope="module")
def windows(test_windows: dict[str, np.ndarray]) -> np.ndarray:
    return test_windows["test"][:N_WINDOWS]


@pytest.fixture(scope="module")
def context(test_reconstructor: Reconstructor, test_windows: dict[str, np.ndarray]) -> MethodContext:
    counts = token_frequencies(test_windows["train"], test_reconstructor.vocab_size)
    return MethodContext(reconstructor=test_reconstructor, token_counts=counts, seed=3, batch_size=8, segment_len=16)


@pytest.fixture(scope="module")
def padded(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right padding of varying length and a scattered force-keep pattern."""
    n, length = windows.shape
    lengths = np.linspace(length // 3, length, n).astype(int)
    valid = np.arange(length)[None, :] < lengths[:, None]
    ids = np.where(valid, windows, 0)
    force_keep = np.random.default_rng(1).random(windows.shape) < 0.2
    return ids, valid, force_keep


def test_mask_budget_rounds_half_up_and_checks_the_rate() -> None:
    assert mask_budget(0.3, np.array([10, 7, 0, 1])).tolist() == [3, 2, 0, 0]
    assert mask_budget(0.25, np.array([10, 2])).tolist() == [3, 1]
    assert mask_budget(1.0, np.ones((2, 5), dtype=bool)).tolist() == [5, 5]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InputError):
            mask_budget(bad, np.array([3]))


def test_budget_mask_takes_highest_priority_and_exact_budget() -> None:
    priority = np.array([[0.1, 0.9, 0.5, 0.7, 0.3], [5.0, 4.0, 3.0, 2.0, 1.0]])
    maskable = np.array([[True, True, True, False, True], [True, True, True, True, True]])
    out = budget_mask(priority, np.array([2, 3]), maskable)
    assert out.tolist() == [[False, True, True, False, False], [True, True, True, False, False]]
    # ties: earlier position first by default, or by the tiebreak key
    flat = np.zeros((1, 4))
    assert budget_mask(flat, np.array([2]), np.ones((1, 4), bool)).tolist() == [[True, True, False, False]]
    assert budget_mask(flat, np.array([2]), np.ones((1, 4), bool), np.array([[0, 1, 2, 3.0]])).tolist() == [[False, False, True, True]]
    with pytest.raises(InputError):
        budget_mask(priority, np.array([5, 1]), maskable)


def test_budget_mask_random_property() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n, length = rng.integers(1, 6), rng.integers(1, 40)
        maskable = rng.random((n, length)) < rng.random()
        budget = np.array([rng.integers(0, m + 1) for m in maskable.sum(1)])
        priority = rng.normal(size=(n, length))
        out = budget_mask(priority, budget, maskable)
        assert (out.sum(1) == budget).all() and not (out & ~maskable).any()
        for row in range(n):  # every dropped position outranks every kept maskable one
            dropped, kept = priority[row][out[row]], priority[row][maskable[row] & ~out[row]]
            if len(dropped) and len(kept):
                assert dropped.min() >= kept.max()


def test_registry_is_complete() -> None:
    assert tuple(BASELINES) == BASELINE_NAMES


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_rate_is_exact_with_padding_and_force_keep(name: str, context: MethodContext, windows: np.ndarray, padded: tuple) -> None:
    ids, valid, force_keep = padded
    method = BASELINES[name]
    maskable = maskable_positions(ids, valid, force_keep)
    for rate in (0.0, 0.3, 0.5, 0.8, 1.0):
        masks = method(ids, rate, context, valid=valid, force_keep=force_keep)
        assert masks.shape == ids.shape and masks.dtype == bool
        assert (masks.sum(1) == rate_budget(rate, valid, maskable)).all(), (name, rate)
        assert not (masks & ~valid).any() and not (masks & force_keep).any()
    plain = method(windows, 0.4, context)
    assert (plain.sum(1) == round(0.4 * windows.shape[1])).all()


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_deterministic(name: str, context: MethodContext, windows: np.ndarray) -> None:
    a = BASELINES[name](windows[:4], 0.5, context)
    b = BASELINES[name](windows[:4], 0.5, context)
    assert np.array_equal(a, b)


def test_random_depends_on_seed(windows: np.ndarray) -> None:
    a = BASELINES["random"](windows, 0.5, MethodContext(seed=0))
    b = BASELINES["random"](windows, 0.5, MethodContext(seed=1))
    assert not np.array_equal(a, b)


def test_frequency_masks_most_frequent_first(context: MethodContext, windows: np.ndarray) -> None:
    masks = BASELINES["frequency"](windows, 0.4, context)
    counts = context.token_counts[windows]
    for row in range(len(windows)):
        assert counts[row][masks[row]].min() >= counts[row][~masks[row]].max()


def test_token_frequencies_counts() -> None:
    assert token_frequencies(np.array([[1, 1, 3], [3, 3, 0]]), 5).tolist() == [1, 2, 0, 3, 0]


def test_length_masks_shortest_first(context: MethodContext, windows: np.ndarray, test_reconstructor: Reconstructor) -> None:
    lengths = token_char_lengths(test_reconstructor.tokenizer, test_reconstructor.vocab_size)
    some = [i for i in range(test_reconstructor.vocab_size) if re.fullmatch(r" \S+", test_reconstructor.tokenizer.decode([i]))][:5]
    assert len(some) == 5
    assert all(lengths[i] == len(test_reconstructor.tokenizer.decode([i])) - 1 for i in some)
    masks = BASELINES["length"](windows, 0.4, context)
    tok_len = lengths[windows]
    for row in range(len(windows)):
        assert tok_len[row][masks[row]].max() <= tok_len[row][~masks[row]].min()


def test_stride_is_evenly_spaced(context: MethodContext, windows: np.ndarray) -> None:
    masks = BASELINES["stride"](windows, 0.25, context)
    for row in masks:
        gaps = np.diff(np.flatnonzero(row))
        assert (gaps == 4).all()
    # among maskable positions only: the chosen ranks are evenly spaced too
    maskable = np.ones((1, 20), dtype=bool)
    maskable[0, [0, 1, 2, 10]] = False
    chosen = stride_priority(maskable, np.array([4])).astype(bool)[0]
    ranks = np.flatnonzero(chosen[maskable[0]])
    assert len(ranks) == 4 and set(np.diff(ranks)) == {4}


def test_self_information_masks_lowest_surprisal(context: MethodContext, windows: np.ndarray, test_reconstructor: Reconstructor) -> None:
    masks = BASELINES["self_information"](windows, 0.5, context)
    bits = test_reconstructor.surprisal(windows).numpy()
    for row in range(len(windows)):
        assert bits[row][masks[row]].max() <= bits[row][~masks[row]].min() + 1e-4


def test_segment_budgets_sum_and_fit() -> None:
    rng = np.random.default_rng(0)
    maskable = rng.random((5, 50)) < 0.7
    budget = mask_budget(0.45, maskable)
    seg = segment_budgets(maskable, budget, 16)
    assert seg.shape == (5, 4) and (seg.sum(1) == budget).all() and (seg >= 0).all()
    per_segment = np.add.reduceat(maskable, [0, 16, 32, 48], axis=1)
    assert (seg <= per_segment).all()


def test_iterative_self_information_conditions_on_compressed_prefix(
    context: MethodContext, windows: np.ndarray, test_reconstructor: Reconstructor
) -> None:
    ids = windows[:4]
    masks = BASELINES["iterative_self_information"](ids, 0.5, context)
    seg = context.segment_len
    for s in range(ids.shape[1] // seg):
        cols = slice(s * seg, (s + 1) * seg)
        probe = masks.copy()
        probe[:, cols.start :] = False  # compressed prefix, this segment (and after) original
        bits = test_reconstructor.score(ids, probe).surprisal.numpy()[:, cols]
        seg_mask = masks[:, cols]
        for row in range(len(ids)):
            if seg_mask[row].any() and (~seg_mask[row]).any():
                assert bits[row][seg_mask[row]].max() <= bits[row][~seg_mask[row]].min() + 1e-4


def test_greedy_threshold_beats_random(context: MethodContext, windows: np.ndarray, test_reconstructor: Reconstructor) -> None:
    def bits_per_masked(masks: np.ndarray) -> float:
        result = test_reconstructor.score(windows, masks)
        return float(result.masked_bits.sum() / result.mask.sum())

    threshold = bits_per_masked(BASELINES["greedy_threshold"](windows, 0.4, context))
    random = bits_per_masked(BASELINES["random"](windows, 0.4, context))
    assert threshold < random


def test_old_greedy_oracle_name_warns() -> None:
    with pytest.warns(DeprecationWarning, match="greedy_threshold"):
        assert canonical_method_name("greedy_oracle") == "greedy_threshold"
    assert canonical_method_name("random") == "random"


def _masked_bits(reconstructor: Reconstructor, ids: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Total bits of the dropped tokens of each mask (one row of ``ids`` repeated)."""
    result = reconstructor.score(np.repeat(ids, len(masks), axis=0), masks)
    return result.masked_bits.double().sum(dim=1).numpy()


def test_search_lies_between_brute_force_and_random(test_reconstructor: Reconstructor, windows: np.ndarray) -> None:
    ids = windows[:1, :10]  # C(10, 3) = 120 masks: brute force is cheap
    all_masks = np.array([np.isin(np.arange(10), combo) for combo in itertools.combinations(range(10), 3)])
    every_cost = _masked_bits(test_reconstructor, ids, all_masks)
    best, mean_random = every_cost.min(), every_cost.mean()  # a uniformly random mask costs the mean on average
    (search,) = greedy_search_masks(test_reconstructor, ids, np.array([[3]]))
    assert search.sum() == 3
    cost = _masked_bits(test_reconstructor, ids, search)[0]
    assert best - 1e-6 <= cost <= mean_random
    assert cost < np.median(every_cost)  # and better than most masks, not just the average


def test_search_with_one_drop_is_the_brute_force_optimum(test_reconstructor: Reconstructor, windows: np.ndarray) -> None:
    ids = windows[:1, :12]
    singles = np.eye(12, dtype=bool)  # with one drop, greedy tries every mask: it must be optimal
    every_cost = _masked_bits(test_reconstructor, ids, singles)
    (search,) = greedy_search_masks(test_reconstructor, ids, np.array([[1]]))
    assert np.array_equal(search[0], singles[int(np.argmin(every_cost))])


def test_search_is_nested_and_exact(test_reconstructor: Reconstructor, windows: np.ndarray, padded: tuple) -> None:
    ids, valid, force_keep = padded
    ids, valid, force_keep = ids[:2, :24], valid[:2, :24], force_keep[:2, :24]
    maskable = maskable_positions(ids, valid, force_keep)
    budgets = np.stack([mask_budget(r, maskable) for r in (0.2, 0.5)])
    nested = greedy_search_masks(test_reconstructor, ids, budgets, valid, force_keep)
    assert (nested.sum(axis=2) == budgets).all() and not (nested & ~maskable[None]).any()
    assert not (nested[0] & ~nested[1]).any()  # the 0.5 masks continue from the 0.2 ones
    alone = greedy_search_masks(test_reconstructor, ids, budgets[1:], valid, force_keep)
    assert np.array_equal(alone[0], nested[1])  # nesting changes nothing: greedy passes through the lower budget


def test_scoring_baselines_need_a_reconstructor(windows: np.ndarray) -> None:
    for name in ("self_information", "iterative_self_information", "greedy_threshold", "length"):
        with pytest.raises(InputError):
            BASELINES[name](windows, 0.5, MethodContext())
    with pytest.raises(InputError):
        BASELINES["frequency"](windows, 0.5, MethodContext())


def test_policy_seam_ranks_logits_under_the_budget(context: MethodContext, padded: tuple) -> None:
    ids, valid, force_keep = padded
    logits = np.random.default_rng(0).normal(size=ids.shape)
    masks = logits_to_mask(logits, 0.6, valid, force_keep)
    maskable = maskable_positions(ids, valid, force_keep)
    assert (masks.sum(1) == rate_budget(0.6, valid, maskable)).all() and not (masks & ~maskable).any()
    for row in range(len(ids)):
        assert logits[row][masks[row]].min() >= logits[row][maskable[row] & ~masks[row]].max()
    method = policy_method(lambda x, v, r: np.where(v, logits, -1e9))
    assert np.array_equal(method(ids, 0.6, context, valid=valid, force_keep=force_keep), masks)


# ---------------------------------------------------------------------------- units (issue 14)
def test_budget_mask_with_single_token_units_is_the_token_ranking() -> None:
    rng = np.random.default_rng(0)
    priority = rng.random((5, 20))
    maskable = rng.random((5, 20)) < 0.8
    budget = mask_budget(0.4, maskable)
    plain = budget_mask(priority, budget, maskable)
    assert np.array_equal(budget_mask(priority, budget, maskable, units=np.ones((5, 20), dtype=bool)), plain)


def test_budget_mask_drops_whole_units_by_mean_priority() -> None:
    starts = np.array([[1, 0, 0, 1, 1, 0, 1, 0]], dtype=bool)  # units: [0-2] [3] [4-5] [6-7]
    priority = np.array([[5.0, 5.0, 5.0, 9.0, 1.0, 1.0, 3.0, 2.0]])
    maskable = np.ones((1, 8), dtype=bool)
    mask = budget_mask(priority, np.array([3]), maskable, units=starts)
    assert mask[0].tolist() == [False, False, False, True, False, False, True, True]  # 9, then (3+2)/2; 5 no longer fits
    # A unit with a force-kept token is kept whole; the closest count is reached with the next unit.
    maskable[0, 7] = False
    mask = budget_mask(priority, np.array([3]), maskable, units=starts)
    assert not mask[0, 6:].any() and mask[0, 3] and mask.sum() in (3, 4)


@pytest.mark.parametrize("units", ["piece", "word"])
@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_baselines_drop_whole_units(name: str, units: str, context: MethodContext, windows: np.ndarray) -> None:
    from dataclasses import replace

    from tokencompress_env.units import unit_index, unit_starts

    ctx = replace(context, units=units)
    ids = windows[:3]
    masks = BASELINES[name](ids, 0.5, ctx)
    index = unit_index(unit_starts(ids, None, context.require_reconstructor("t").tokenizer, units))
    for row in range(len(ids)):
        for u in np.unique(index[row]):
            assert len(set(masks[row][index[row] == u].tolist())) == 1
    assert abs(masks.mean() - 0.5) < 0.1
