"""Baseline compressors: every method picks which tokens of a window to drop, at an exact mask rate.

All methods share one signature (:class:`MaskMethod`)::

    masks = method(input_ids, rate, context, valid=None, force_keep=None)   # [N, L] bool, True = drop

and one rate rule (:func:`rate_budget`, the project's only one): a window with ``n`` real (``valid``)
tokens of which ``m`` are *maskable* (real and not ``force_keep``) drops exactly
``min(round_half_up(rate * n), m)`` of them, never a padding or force-kept position. The mask rate is the
fraction of the window's real tokens removed, as TokenMask-v0's reward counts it. Each method only
computes a *priority* per token (higher = drop first); the shared helper
:func:`budget_mask` turns priorities into the exact-budget mask by ranking, the way LLMLingua-2 keeps the
top-k tokens of its classifier. The learned policy plugs in through the same helper
(:func:`logits_to_mask`, :func:`policy_method`): its per-token mask logits are ranked under the budget.

Units: with ``context.units`` set (``"piece"``: whole characters, ``"word"``: whole words; see
:mod:`tokencompress_env.units`), every method drops whole units. The ranking methods rank units by the
mean priority of their tokens (:func:`budget_mask` with ``units``); the two that decide token by token
(``iterative_self_information``, ``greedy_oracle``) have their mask turned into whole units afterwards
(:func:`units_of_mask`). A unit of several tokens may not fit the budget exactly, so the achieved rate can
differ from ``rate_budget / n`` by part of a unit: the evaluation reports the achieved rate.

Methods (the keys of :data:`BASELINES`):

* ``random``: uniformly random positions (seeded).
* ``frequency``: the tokens most frequent in the training corpus first (:func:`token_frequencies`).
* ``length``: the shortest tokens first (decoded length in characters, surrounding whitespace not
  counted, so ``" the"`` has length 3 and a newline token length 0; :func:`token_char_lengths`).
* ``stride``: evenly spaced positions among the maskable ones.
* ``self_information``: Selective Context at token level: the tokens with the lowest surprisal under
  the reconstructor on the *original* text first (:meth:`Reconstructor.surprisal`, one forward pass).
* ``iterative_self_information``: LLMLingua style. The window is cut into segments of
  ``context.segment_len`` tokens; each segment is scored given the *already compressed* prefix (and its
  own original tokens, with :meth:`Reconstructor.score_chunk` and the KV cache), and its lowest-surprisal
  tokens are dropped. The budget is spread over the segments in proportion to their maskable tokens
  (cumulatively rounded, so the window total is exact), the fixed-rate analogue of LLMLingua's
  per-segment threshold.
* ``greedy_threshold`` (called ``greedy_oracle`` before; that name still works, with a deprecation
  warning): a strong heuristic, neither an oracle nor a bound. Token by token, left to right, with the KV cache: the
  exact cost of dropping token ``i``, its surprisal given the compressed prefix ``s_i``, is compared
  with the estimated costs of the maskable tokens still to come (their surprisal on the original text
  ``u_j``, rescaled by the ratio ``sum s / sum u`` observed so far in the window, since compression
  raises surprisal). Token ``i`` is dropped when fewer than ``r`` of those future estimates are cheaper,
  where ``r`` is the remaining budget: a threshold that tracks the remaining budget. When ``r`` equals
  the number of maskable tokens left every one of them is dropped, and at ``r = 0`` none is, so the
  budget is met exactly. Cost: one single-token forward pass per position (``L`` cached steps).

One more method, ``search`` (:func:`greedy_search_masks`, :data:`SEARCH`), is a *reference*, not a
baseline: greedy deletion under the scoring reconstructor with the window re-scored in full after every
drop. At each step every remaining maskable position of a window is tried as the next drop, all
candidates are scored in batched forward passes (the total bits of the dropped tokens given the
compressed window, :meth:`Reconstructor.score`), and the cheapest is kept, until the budget is met.
Greedy is not optimal, so the optimum costs at most what it finds (an upper bound on the best distortion,
found by a much stronger search than any method's one pass). It costs about ``m * k`` window forwards
for ``k`` drops among ``m`` maskable tokens, so the evaluation runs it on a subset of windows. Several
rates are searched *nested*: the masks at a higher rate continue from those at the lower one (greedy
passes through them anyway), so all rates cost as much as the highest alone.

Every reconstructor evaluation goes through :meth:`Reconstructor.score_chunk` or
:meth:`Reconstructor.surprisal`; nothing here re-implements scoring.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from tokencompress_env.errors import InputError
from tokencompress_env.reconstructor import Reconstructor
from tokencompress_env.units import check_units, unit_index, unit_starts

#: Names of all baseline methods, in the order they are reported.
BASELINE_NAMES = (
    "random",
    "frequency",
    "length",
    "stride",
    "self_information",
    "iterative_self_information",
    "greedy_threshold",
)

#: Name of the search reference (:func:`greedy_search_masks`): a bound row, not a baseline.
SEARCH = "search"

#: Old method names still accepted (with a deprecation warning): old name -> current name.
DEPRECATED_NAMES = {"greedy_oracle": "greedy_threshold"}

#: Name of the learned policy in every output.
POLICY = "policy"
#: The policy's masks as reinforcement learning samples them (independent drops at its rate-calibrated
#: probabilities; the rate is met on average, not per window): a diagnostic row, run only when named.
POLICY_SAMPLED = "policy_sampled"
#: Methods computed from a run's policy (never shared between runs).
RUN_METHODS = (POLICY, POLICY_SAMPLED)

#: A function ``(token ids [N, L], real positions [N, L], target mask rate) -> mask logits [N, L]``
#: (higher = drop first), such as an adapter around the agents package's ``token_mask_logits``.
LogitFn = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


@dataclass
class MethodContext:
    """What the methods may need besides the windows: models, corpus statistics, seeds, batch sizes.

    :param reconstructor: the reconstructor the scoring methods query (``self_information``,
        ``iterative_self_information``, ``greedy_threshold``, ``search``)
    :param token_counts: ``[V]`` occurrences of each token id in the training corpus (``frequency``)
    :param token_lengths: ``[V]`` decoded length in characters of each token id (``length``); computed
        from the reconstructor's tokenizer on first use when ``None``
    :param seed: seed of ``random`` and of the random tie-breaking of every method
    :param batch_size: windows per reconstructor forward pass
    :param segment_len: tokens per segment of ``iterative_self_information``
    :param units: what is dropped or kept together (:mod:`tokencompress_env.units`): ``"piece"`` (whole
        characters), ``"word"``, or ``None`` (single tokens, which may split a character)
    """

    reconstructor: Reconstructor | None = None
    token_counts: np.ndarray | None = None
    token_lengths: np.ndarray | None = None
    seed: int = 0
    batch_size: int = 64
    segment_len: int = 16
    units: str | None = None

    def unit_starts(self, input_ids: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray | None:
        """Where the units of the windows begin (:func:`~tokencompress_env.units.unit_starts`), ``None`` for single tokens.

        :param input_ids: ``[N, L]`` token ids
        :param valid: ``[N, L]`` real positions (``None``: all)
        :return: ``[N, L]`` bool, or ``None`` when ``units`` is ``None``
        """
        if self.units is None:
            return None
        return unit_starts(input_ids, valid, self.require_reconstructor(f"units={self.units!r}").tokenizer, check_units(self.units))

    def require_reconstructor(self, method: str) -> Reconstructor:
        """Return the reconstructor, or raise a clear error naming the method that needs it.

        :param method: the method's name
        :return: the reconstructor
        """
        if self.reconstructor is None:
            raise InputError(f"method '{method}' needs a reconstructor in its MethodContext")
        return self.reconstructor


class MaskMethod(Protocol):
    """The common signature of every masking method (baselines and the learned policy)."""

    def __call__(
        self,
        input_ids: np.ndarray,
        rate: float,
        context: MethodContext,
        valid: np.ndarray | None = None,
        force_keep: np.ndarray | None = None,
    ) -> np.ndarray:
        """Choose the dropped positions of each window.

        :param input_ids: ``[N, L]`` token ids
        :param rate: the fraction of maskable tokens to drop, in ``[0, 1]``
        :param context: models and statistics the method may use
        :param valid: ``[N, L]`` real (non-padding) positions (``None``: all)
        :param force_keep: ``[N, L]`` positions that must be kept (``None``: none)
        :return: ``[N, L]`` bool, ``True`` = dropped; exactly :func:`rate_budget` drops per row
        """
        ...


# ---------------------------------------------------------------------------- the shared rate rule
def maskable_positions(input_ids: np.ndarray, valid: np.ndarray | None = None, force_keep: np.ndarray | None = None) -> np.ndarray:
    """Positions a method may drop: real tokens that are not force-kept.

    :param input_ids: ``[N, L]`` token ids
    :param valid: ``[N, L]`` real positions (``None``: all)
    :param force_keep: ``[N, L]`` positions that must be kept (``None``: none)
    :return: ``[N, L]`` bool
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise InputError(f"input_ids must be [windows, length], got shape {ids.shape}")
    maskable = np.ones(ids.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool).copy()
    if maskable.shape != ids.shape:
        raise InputError(f"valid has shape {maskable.shape}, expected {ids.shape}")
    if force_keep is not None:
        keep = np.asarray(force_keep, dtype=bool)
        if keep.shape != ids.shape:
            raise InputError(f"force_keep has shape {keep.shape}, expected {ids.shape}")
        maskable &= ~keep
    return maskable


def mask_budget(rate: float | np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The rounding step of :func:`rate_budget`: ``round_half_up(rate * n)`` for ``n`` tokens per window.

    Half-up rounding (``0.5 -> 1``) with a tolerance of ``1e-9`` against float error, so ``0.3 * 10``
    gives 3 and ``0.25 * 10`` gives 3.

    :param rate: mask rate in ``[0, 1]``, one for all windows or ``[N]`` per window
    :param counts: ``[N, L]`` bool (the ``True`` positions are counted), or ``[N]`` counts
    :return: ``[N]`` int64 budgets
    """
    rates = np.asarray(rate, dtype=np.float64)
    if np.isnan(rates).any() or not ((rates >= 0.0) & (rates <= 1.0)).all():
        raise InputError(f"mask rate must be in [0, 1], got {rate}")
    n = np.asarray(counts)
    n = n.sum(axis=1) if n.ndim == 2 else n
    return np.floor(rates * n.astype(np.float64) + 0.5 + 1e-9).astype(np.int64).clip(0, n)


def rate_budget(rate: float | np.ndarray, valid: np.ndarray | None, maskable: np.ndarray) -> np.ndarray:
    """Tokens to drop per window at a mask rate: the project's one rate rule.

    The mask rate is the fraction of a window's *real* tokens removed (what TokenMask-v0's reward counts:
    its rate term is zero when ``rate * n`` of the ``n`` real tokens are dropped), so a window with ``n``
    real tokens of which ``m`` are maskable drops ``min(round_half_up(rate * n), m)``: force-kept tokens
    count in the denominator, and cap the budget when too many are kept. ``compress()``, every baseline,
    the search and the distillation labels budget with it.

    :param rate: mask rate in ``[0, 1]``, one for all windows or ``[N]`` per window
    :param valid: ``[N, L]`` real positions (``None``: every position is real)
    :param maskable: ``[N, L]`` positions that may be dropped (real and not force-kept)
    :return: ``[N]`` int64 budgets
    """
    maskable = np.asarray(maskable, dtype=bool)
    real = np.ones(maskable.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    return np.minimum(mask_budget(rate, real), maskable.sum(axis=1))


def budget_mask(
    priority: np.ndarray,
    budget: np.ndarray,
    maskable: np.ndarray,
    tiebreak: np.ndarray | None = None,
    units: np.ndarray | None = None,
) -> np.ndarray:
    """Drop the ``budget[i]`` maskable positions of highest priority in each row (the shared ranking step).

    Ties in priority are broken by ``tiebreak`` (higher first; default: earlier position first). Every
    baseline and the learned policy (:func:`logits_to_mask`) turn their scores into masks here.

    With ``units`` (the unit starts of :func:`~tokencompress_env.units.unit_starts`), whole units are
    dropped or kept: a unit may be dropped only when all its tokens are maskable, units are ranked by the
    mean priority of their tokens (ties: mean ``tiebreak``), and taken in that order while they fit the
    budget; then, if the budget is not met, the best remaining unit that brings the count strictly closer
    to it is added, unless it would leave no maskable token. The count is then as close to the budget as
    this ranking allows, not always equal: callers report the achieved rate. With single-token units it
    is the exact token ranking.

    :param priority: ``[N, L]`` float, higher = drop first (NaN counts as lowest)
    :param budget: ``[N]`` drops per row, at most the row's maskable count
    :param maskable: ``[N, L]`` bool, positions that may be dropped
    :param tiebreak: ``[N, L]`` secondary key, higher = drop first (``None``: earlier position first)
    :param units: ``[N, L]`` bool unit starts (``None``: every token is a unit)
    :return: ``[N, L]`` bool, ``True`` = dropped, exactly ``budget[i]`` per row (about, with multi-token
        units), only at maskable positions
    """
    priority = np.nan_to_num(np.asarray(priority, dtype=np.float64), nan=-np.inf)
    maskable = np.asarray(maskable, dtype=bool)
    budget = np.asarray(budget, dtype=np.int64)
    if priority.shape != maskable.shape:
        raise InputError(f"priority has shape {priority.shape}, expected {maskable.shape}")
    if np.any(budget > maskable.sum(axis=1)) or np.any(budget < 0):
        raise InputError("a budget exceeds the number of maskable positions of its row")
    n, length = priority.shape
    if tiebreak is None:
        tiebreak = np.broadcast_to(-np.arange(length, dtype=np.float64), (n, length))
    if units is not None:
        starts = np.asarray(units, dtype=bool)
        if starts.shape != maskable.shape:
            raise InputError(f"units has shape {starts.shape}, expected {maskable.shape}")
        multi = ~starts.all(axis=1)
        if multi.any():
            # Rows with multi-token units are ranked unit by unit; the others (most rows of most texts)
            # by the token ranking, which is what the unit ranking gives with single-token units
            # (with its clipping of infinite priorities, so that the order is the same).
            ties = np.asarray(np.broadcast_to(tiebreak, (n, length)), dtype=np.float64)
            out = np.empty((n, length), dtype=bool)
            out[multi] = _unit_budget_mask(priority[multi], budget[multi], maskable[multi], ties[multi], starts[multi])
            single = ~multi
            if single.any():
                out[single] = _token_budget_mask(np.clip(priority[single], -1e30, 1e30), budget[single], maskable[single], ties[single])
            return out
    return _token_budget_mask(priority, budget, maskable, tiebreak)


def _token_budget_mask(priority: np.ndarray, budget: np.ndarray, maskable: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """The token ranking of :func:`budget_mask`: the ``budget[i]`` maskable positions of highest priority.

    :param priority: ``[N, L]`` float64 (NaN already replaced)
    :param budget: ``[N]`` token budgets
    :param maskable: ``[N, L]`` bool
    :param tiebreak: ``[N, L]`` secondary key, higher first
    :return: ``[N, L]`` bool
    """
    n, length = priority.shape
    # np.lexsort: the last key is the primary one; all keys ascending.
    order = np.lexsort((-np.asarray(tiebreak, dtype=np.float64), -priority, ~maskable), axis=-1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(length), (n, length)), axis=1)
    return (rank < budget[:, None]) & maskable


def _unit_budget_mask(
    priority: np.ndarray, budget: np.ndarray, maskable: np.ndarray, tiebreak: np.ndarray, starts: np.ndarray
) -> np.ndarray:
    """The unit ranking of :func:`budget_mask` (see there).

    :param priority: ``[N, L]`` float64 (NaN already replaced)
    :param budget: ``[N]`` token budgets
    :param maskable: ``[N, L]`` bool
    :param tiebreak: ``[N, L]`` float64
    :param starts: ``[N, L]`` bool unit starts
    :return: ``[N, L]`` bool
    """
    index = unit_index(starts)
    bounded = np.clip(priority, -1e30, 1e30)
    out = np.zeros(maskable.shape, dtype=bool)
    for r in range(maskable.shape[0]):
        target = int(budget[r])
        if target == 0:
            continue
        idx = index[r]
        count = int(idx[-1]) + 1
        size = np.bincount(idx, minlength=count)
        droppable = np.bincount(idx, weights=maskable[r], minlength=count) == size
        mean = np.bincount(idx, weights=bounded[r], minlength=count) / size
        tie = np.bincount(idx, weights=tiebreak[r], minlength=count) / size
        candidates = np.flatnonzero(droppable)
        order = candidates[np.lexsort((-tie[candidates], -mean[candidates]))]
        n_maskable = int(size[droppable].sum())
        chosen = np.zeros(count, dtype=bool)
        total = 0
        for u in order:
            if total + size[u] <= target:
                chosen[u] = True
                total += int(size[u])
                if total == target:
                    break
        deficit = target - total
        if deficit > 0:
            for u in order:
                if not chosen[u] and size[u] < 2 * deficit and total + size[u] < n_maskable:
                    chosen[u] = True
                    break
        out[r] = chosen[idx] & maskable[r]
    return out


def units_of_mask(mask: np.ndarray, maskable: np.ndarray, units: np.ndarray | None, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Make a token mask drop whole units (for methods that decide token by token): the units most dropped win.

    Each unit's priority is the fraction of its tokens ``mask`` drops (:func:`budget_mask` averages
    per-token priorities), under a budget of the tokens ``mask`` drops.

    :param mask: ``[N, L]`` bool token mask
    :param maskable: ``[N, L]`` bool
    :param units: ``[N, L]`` unit starts (``None``: returns ``mask``)
    :param tiebreak: ``[N, L]`` secondary key (``None``: earlier first)
    :return: ``[N, L]`` bool
    """
    if units is None:
        return mask
    return budget_mask(mask.astype(np.float64), mask.sum(axis=1), maskable, tiebreak, units)


def _tiebreak(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Uniform random secondary keys, so that ties do not favour early positions.

    :param shape: ``(N, L)``
    :param seed: seed
    :return: ``[N, L]`` floats
    """
    return np.random.default_rng(seed).random(shape)


def logits_to_mask(
    logits: np.ndarray | torch.Tensor,
    rate: float,
    valid: np.ndarray | None = None,
    force_keep: np.ndarray | None = None,
    units: np.ndarray | None = None,
) -> np.ndarray:
    """Exact-rate masks from per-token mask logits (higher = drop first): the learned policy's rate control.

    :param logits: ``[N, L]`` mask logits (or drop probabilities: only their order matters)
    :param rate: mask rate
    :param valid: ``[N, L]`` real positions (``None``: all)
    :param force_keep: ``[N, L]`` positions that must be kept (``None``: none)
    :param units: ``[N, L]`` unit starts (see :func:`budget_mask`; ``None``: single tokens)
    :return: ``[N, L]`` bool, ``True`` = dropped
    """
    scores = logits.detach().float().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits, dtype=np.float64)
    maskable = maskable_positions(scores, valid, force_keep)
    return budget_mask(scores, rate_budget(rate, valid, maskable), maskable, units=units)


#: Turns a policy's logits into masks: ``(logits, rate, valid, force_keep, unit starts) -> [N, L] bool``.
MasksFromLogits = Callable[[np.ndarray, float, np.ndarray, "np.ndarray | None", "np.ndarray | None"], np.ndarray]


def policy_method(logit_fn: LogitFn, masks_from_logits: MasksFromLogits = logits_to_mask) -> MaskMethod:
    """Wrap a per-token mask-logit function (the learned policy) as a :class:`MaskMethod`.

    :param logit_fn: ``(input_ids [N, L], valid [N, L], rate) -> logits [N, L]``, higher = drop first
    :param masks_from_logits: how the logits become masks (default :func:`logits_to_mask`: ranked under
        the exact budget; the evaluation's ``policy_sampled`` passes a sampler)
    :return: the method
    """

    def method(
        input_ids: np.ndarray,
        rate: float,
        context: MethodContext,
        valid: np.ndarray | None = None,
        force_keep: np.ndarray | None = None,
    ) -> np.ndarray:
        ids = np.asarray(input_ids)
        valid_np = np.ones(ids.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        logits = logit_fn(ids, valid_np, float(rate))
        return masks_from_logits(logits, rate, valid_np, force_keep, None if context is None else context.unit_starts(ids, valid_np))

    return method


# ---------------------------------------------------------------------------- corpus statistics
def token_frequencies(windows: np.ndarray, vocab_size: int) -> np.ndarray:
    """Count each token id in the training windows.

    :param windows: ``[N, L]`` token ids of the training split
    :param vocab_size: number of token ids
    :return: ``[vocab_size]`` int64 counts
    """
    return np.bincount(np.asarray(windows, dtype=np.int64).ravel(), minlength=vocab_size)[:vocab_size]


def token_char_lengths(tokenizer: object, vocab_size: int) -> np.ndarray:
    """Decoded length in characters of every token id, surrounding whitespace not counted.

    :param tokenizer: a Hugging Face tokenizer (with ``decode``)
    :param vocab_size: number of token ids
    :return: ``[vocab_size]`` int64 lengths
    """
    decode = tokenizer.decode  # type: ignore[attr-defined]
    return np.array([len(decode([i]).strip()) for i in range(vocab_size)], dtype=np.int64)


# ---------------------------------------------------------------------------- methods
def mask_random(
    input_ids: np.ndarray, rate: float, context: MethodContext, valid: np.ndarray | None = None, force_keep: np.ndarray | None = None
) -> np.ndarray:
    """Drop uniformly random positions (seeded by ``context.seed``).

    :param input_ids: ``[N, L]`` token ids
    :param rate: mask rate
    :param context: the context (its ``seed``)
    :param valid: ``[N, L]`` real positions
    :param force_keep: ``[N, L]`` positions to keep
    :return: ``[N, L]`` bool masks
    """
    maskable = maskable_positions(input_ids, valid, force_keep)
    priority = np.random.default_rng(context.seed).random(maskable.shape)
    return budget_mask(priority, rate_budget(rate, valid, maskable), maskable, units=context.unit_starts(input_ids, valid))


def mask_frequency(
    input_ids: np.ndarray, rate: float, context: MethodContext, valid: np.ndarray | None = None, force_keep: np.ndarray | None = None
) -> np.ndarray:
    """Drop the tokens most frequent in the training corpus first (ties: random).

    :param input_ids: ``[N, L]`` token ids
    :param rate: mask rate
    :param context: the context (its ``token_counts``)
    :param valid: ``[N, L]`` real positions
    :param force_keep: ``[N, L]`` positions to keep
    :return: ``[N, L]`` bool masks
    """
    if context.token_counts is None:
        raise InputError("method 'frequency' needs token_counts (see token_frequencies) in its MethodContext")
    ids = np.asarray(input_ids, dtype=np.int64)
    maskable = maskable_positions(ids, valid, force_keep)
    counts = np.asarray(context.token_counts)
    priority = counts[np.clip(ids, 0, len(counts) - 1)].astype(np.float64)
    budget = rate_budget(rate, valid, maskable)
    return budget_mask(priority, budget, maskable, _tiebreak(ids.shape, context.seed), context.unit_starts(ids, valid))


def mask_length(
    input_ids: np.ndarray, rate: float, context: MethodContext, valid: np.ndarray | None = None, force_keep: np.ndarray | None = None
) -> np.ndarray:
    """Drop the shortest tokens (fewest decoded characters) first (ties: random).

    :param input_ids: ``[N, L]`` token ids
    :param rate: mask rate
    :param context: the context (its ``token_lengths``, or its reconstructor's tokenizer)
    :param valid: ``[N, L]`` real positions
    :param force_keep: ``[N, L]`` positions to keep
    :return: ``[N, L]`` bool masks
    """
    if context.token_lengths is None:
        rec = context.require_reconstructor("length")
        context.token_lengths = token_char_lengths(rec.tokenizer, rec.vocab_size)
    ids = np.asarray(input_ids, dtype=np.int64)
    maskable = maskable_positions(ids, valid, force_keep)
    lengths = np.asarray(context.token_lengths)
    priority = -lengths[np.clip(ids, 0, len(lengths) - 1)].astype(np.float64)
    budget = rate_budget(rate, valid, maskable)
    return budget_mask(priority, budget, maskable, _tiebreak(ids.shape, context.seed), context.unit_starts(ids, valid))


def stride_priority(maskable: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Priority 1 at ``budget`` evenly spaced maskable positions of each row, 0 elsewhere.

    With ``m`` maskable positions numbered ``r = 0 .. m-1`` and budget ``k``, position ``r`` is chosen
    when ``floor((r + 1) k / m + 1/2) > floor(r k / m + 1/2)`` (integer arithmetic): exactly ``k``
    positions, spaced ``m / k`` apart, centred.

    :param maskable: ``[N, L]`` bool
    :param budget: ``[N]`` drops per row
    :return: ``[N, L]`` float priorities
    """
    r = np.cumsum(maskable, axis=1) - 1
    m = np.maximum(maskable.sum(axis=1, keepdims=True), 1)
    k = np.asarray(budget, dtype=np.int64)[:, None]
    chosen = (2 * (r + 1) * k + m) // (2 * m) > (2 * r * k + m) // (2 * m)
    return (chosen & maskable).astype(np.float64)


def mask_stride(
    input_ids: np.ndarray, rate: float, context: MethodContext, valid: np.ndarray | None = None, force_keep: np.ndarray | None = None
) -> np.ndarray:
    """Drop evenly spaced positions among the maskable ones (every ``1/rate``-th token).

    :param input_ids: ``[N, L]`` token ids
    :param rate: mask rate
    :param context: the context (unused)
    :param valid: ``[N, L]`` real positions
    :param force_keep: ``[N, L]`` positions to keep
    :return: ``[N, L]`` bool masks
    """
    maskable = maskable_positions(input_ids, valid, force_keep)
    budget = rate_budget(rate, valid, maskable)
    return budget_mask(stride_priority(maskable, budget), budget, maskable, units=context.unit_starts(input_ids, valid))


def _trivial(maskable: np.ndarray, budget: np.ndarray) -> np.ndarray | None:
    """The mask when no choice is left (every budget 0, or every budget all maskable), else ``None``.

    :param maskable: ``[N, L]`` bool
    :param budget: ``[N]`` drops per row
    :return: the mask or ``None``
    """
    if not budget.any():
        return np.zeros(maskable.shape, dtype=bool)
    if (budget == maskable.sum(axis=1)).all():
        return maskable.copy()
    return None


def _batches(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` over ``range(n)``.

    :param n: total
    :param size: batch size
    :return: the slices
    """
    return [slice(start, min(start + size, n)) for start in range(0, n, max(1, size))]


def _valid_or_all(input_ids: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """The real positions as a bool array.

    :param input_ids: ``[N, L]`` ids
    :param valid: ``[N, L]`` or ``None``
    :return: ``[N, L]`` bool
    """
    return np.ones(np.asarray(input_ids).shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)


def self_information(
    reconstructor: Reconstructor, input_ids: np.ndarray, valid: np.ndarray | None = None, batch_size: int = 64
) -> np.ndarray:
    """Surprisal in bits of every token given the original prefix, batched (:meth:`Reconstructor.surprisal`).

    :param reconstructor: the reconstructor
    :param input_ids: ``[N, L]`` ids
    :param valid: ``[N, L]`` real positions
    :param batch_size: windows per forward pass
    :return: ``[N, L]`` float64 bits (0 at padding)
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    valid_np = _valid_or_all(ids, valid)
    out = np.zeros(ids.shape, dtype=np.float64)
    for sl in _batches(len(ids), batch_size):
        out[sl] = reconstructor.surprisal(ids[sl], valid_np[sl]).double().cpu().numpy()
    return out


def mask_self_information(
    input_ids: np.ndarray, rate: float, context: MethodContext, valid: np.ndarray | None = None, force_keep: np.ndarray | None = None
) -> np.ndarray:
    """Selective Context at token level: drop the lowest-surprisal tokens of the original text first.

    :param input_ids: ``[N, L]`` token ids
    :param rate: mask rate
    :param context: the context (its reconstructor)
    :param valid: ``[N, L]`` real positions
    :param force_keep: ``[N, L]`` positions to keep
    :return: ``[N, L]`` bool masks
    """
    rec = context.require_reconstructor("self_information")
    maskable = maskable_positions(input_ids, valid, force_keep)
    budget = rate_budget(rate, valid, maskable)
    if (trivial := _trivial(maskable, budget)) is not None:
        return trivial
    bits = self_information(rec, input_ids, valid, context.batch_size)
    return budget_mask(-bits, budget, maskable, _tiebreak(maskable.shape, context.seed), context.unit_starts(input_ids, valid))


def segment_budgets(maskable: np.ndarray, budget: np.ndarray, segment_len: int) -> np.ndarray:
    """Spread each row's budget over its segments in proportion to their maskable tokens.

    The cumulative budget up to the end of segment ``s`` is ``floor(k * M_s / m + 1/2)`` (``M_s``:
    maskable tokens up to there, ``m``: in the row), so the per-segment budgets sum to ``k`` exactly and
    never exceed a segment's maskable tokens.

    :param maskable: ``[N, L]`` bool
    :param budget: ``[N]`` drops per row
    :param segment_len: tokens per segment
    :return: ``[N, S]`` int64 budgets, ``S = ceil(L / segment_len)``
    """
    n, length = maskable.shape
    ends = np.minimum(np.arange(segment_len, length + segment_len, segment_len), length)
    cum = np.cumsum(maskable, axis=1)[:, ends - 1]
    m = np.maximum(cum[:, -1:], 1)
    k = np.asarray(budget, dtype=np.int64)[:, None]
    target = (2 * k * cum + m) // (2 * m)
    return np.diff(np.concatenate([np.zeros((n, 1), dtype=np.int64), target], axis=1), axis=1)


def mask_iterative_self_information(
    input_ids: np.ndarray, rate: float, context: MethodContext, valid: np.ndarray | None = None, force_keep: np.ndarray | None = None
) -> np.ndarray:
    """LLMLingua style: segment by segment, drop the tokens with the lowest surprisal given the compressed prefix.

    Each segment is scored once on a copy of the KV cache with the segment itself uncompressed, its
    mask chosen, then scored again with that mask to extend the cache (about two forward passes over
    the window in total).

    :param input_ids: ``[N, L]`` token ids
    :param rate: mask rate
    :param context: the context (its reconstructor and ``segment_len``)
    :param valid: ``[N, L]`` real positions
    :param force_keep: ``[N, L]`` positions to keep
    :return: ``[N, L]`` bool masks
    """
    rec = context.require_reconstructor("iterative_self_information")
    ids = np.asarray(input_ids, dtype=np.int64)
    valid_np = _valid_or_all(ids, valid)
    maskable = maskable_positions(ids, valid_np, force_keep)
    seg = max(1, int(context.segment_len))
    budget = rate_budget(rate, valid_np, maskable)
    if (trivial := _trivial(maskable, budget)) is not None:
        return trivial
    seg_budget = segment_budgets(maskable, budget, seg)
    tiebreak = _tiebreak(ids.shape, context.seed)
    masks = np.zeros(ids.shape, dtype=bool)
    for sl in _batches(len(ids), context.batch_size):
        state = rec.begin_scoring(sl.stop - sl.start)
        for s, start in enumerate(range(0, ids.shape[1], seg)):
            cols = slice(start, min(start + seg, ids.shape[1]))
            chunk, chunk_valid = ids[sl, cols], valid_np[sl, cols]
            probe = copy.deepcopy(state)
            bits = rec.score_chunk(probe, chunk, np.zeros(chunk.shape, dtype=bool), chunk_valid).surprisal.double().cpu().numpy()
            chunk_mask = budget_mask(-bits, seg_budget[sl, s], maskable[sl, cols], tiebreak[sl, cols])
            masks[sl, cols] = chunk_mask
            rec.score_chunk(state, chunk, chunk_mask, chunk_valid)
    return units_of_mask(masks, maskable, context.unit_starts(ids, valid_np), tiebreak)


def mask_greedy_threshold(
    input_ids: np.ndarray, rate: float, context: MethodContext, valid: np.ndarray | None = None, force_keep: np.ndarray | None = None
) -> np.ndarray:
    """Token by token, drop a token when its surprisal given the compressed prefix is among the lowest left.

    See the module docstring for the budget-tracking threshold; the budget is met exactly.

    :param input_ids: ``[N, L]`` token ids
    :param rate: mask rate
    :param context: the context (its reconstructor)
    :param valid: ``[N, L]`` real positions
    :param force_keep: ``[N, L]`` positions to keep
    :return: ``[N, L]`` bool masks
    """
    rec = context.require_reconstructor("greedy_threshold")
    ids = np.asarray(input_ids, dtype=np.int64)
    valid_np = _valid_or_all(ids, valid)
    maskable = maskable_positions(ids, valid_np, force_keep)
    budget = rate_budget(rate, valid_np, maskable)
    if (trivial := _trivial(maskable, budget)) is not None:
        return trivial
    prior = self_information(rec, ids, valid_np, context.batch_size)  # u_j: cost estimates of future tokens
    masks = np.zeros(ids.shape, dtype=bool)
    length = ids.shape[1]
    for sl in _batches(len(ids), context.batch_size):
        n = sl.stop - sl.start
        state = rec.begin_scoring(n)
        remaining = budget[sl].copy()
        seen_s, seen_u = np.zeros(n), np.zeros(n)
        u = np.where(maskable[sl], prior[sl], np.inf)
        for i in range(length):
            col = slice(i, i + 1)
            s_i = (
                rec.score_chunk(state, ids[sl, col], np.zeros((n, 1), dtype=bool), valid_np[sl, col]).surprisal[:, 0].double().cpu().numpy()
            )
            ratio = (seen_s + 1e-6) / (seen_u + 1e-6)
            cheaper_later = (u[:, i + 1 :] * ratio[:, None] < s_i[:, None]).sum(axis=1)
            drop = maskable[sl, i] & (remaining > 0) & (cheaper_later < remaining)
            masks[sl, i] = drop
            remaining -= drop
            seen_s += np.where(valid_np[sl, i], s_i, 0.0)
            seen_u += np.where(valid_np[sl, i], prior[sl, i], 0.0)
            # The scored token is now known to be dropped or kept: it is the next position's input.
            drop_t = torch.as_tensor(drop, device=state.last_input.device)
            state.last_input = torch.where(drop_t, torch.full_like(state.last_input, rec.mask_token_id), state.last_input)
    return units_of_mask(masks, maskable, context.unit_starts(ids, valid_np))


def greedy_search_masks(
    reconstructor: Reconstructor,
    input_ids: np.ndarray,
    budgets: np.ndarray,
    valid: np.ndarray | None = None,
    force_keep: np.ndarray | None = None,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Greedy deletion with full re-scoring: the search reference, nested over several budgets.

    For each window, starting from no drop, every remaining maskable position is tried as the next drop;
    the candidates' masks are scored with :meth:`Reconstructor.score` (``batch_size`` candidate windows
    per forward pass, output layer at dropped positions only) and the one whose dropped tokens cost the
    fewest bits in total given the compressed window is kept (ties: the earliest position). After the
    ``r``-th budget of a window is reached its mask is recorded as the ``r``-th result, and the search
    continues from it towards the next (larger) budget.

    :param reconstructor: the scoring reconstructor
    :param input_ids: ``[N, L]`` token ids
    :param budgets: ``[R, N]`` drops per window for each of ``R`` masks, non-decreasing along ``R``
        (e.g. :func:`rate_budget` of increasing rates)
    :param valid: ``[N, L]`` real positions (``None``: all)
    :param force_keep: ``[N, L]`` positions to keep (``None``: none)
    :param batch_size: candidate windows per forward pass
    :param progress: called with 1 after each window (e.g. a progress bar's ``update``)
    :return: ``[R, N, L]`` bool masks, ``True`` = dropped, ``budgets[r, i]`` drops in row ``i`` of mask ``r``
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    valid_np = _valid_or_all(ids, valid)
    maskable = maskable_positions(ids, valid_np, force_keep)
    budgets = np.atleast_2d(np.asarray(budgets, dtype=np.int64))
    if budgets.shape[1] != len(ids) or np.any(np.diff(budgets, axis=0) < 0):
        raise InputError(f"budgets must be [rates, {len(ids)}] and non-decreasing along the rates, got shape {budgets.shape}")
    if np.any(budgets > maskable.sum(axis=1)) or np.any(budgets < 0):
        raise InputError("a budget exceeds the number of maskable positions of its window")
    out = np.zeros((len(budgets), *ids.shape), dtype=bool)
    for i in range(len(ids)):
        mask = np.zeros(ids.shape[1], dtype=bool)
        for r in range(len(budgets)):
            while mask.sum() < budgets[r, i]:
                candidates = np.flatnonzero(maskable[i] & ~mask)
                trial = np.repeat(mask[None], len(candidates), axis=0)
                trial[np.arange(len(candidates)), candidates] = True
                cost = np.empty(len(candidates), dtype=np.float64)
                for sl in _batches(len(candidates), batch_size):
                    rows = sl.stop - sl.start
                    result = reconstructor.score(
                        np.repeat(ids[i : i + 1], rows, axis=0), trial[sl], np.repeat(valid_np[i : i + 1], rows, axis=0), positions="masked"
                    )
                    cost[sl] = result.masked_bits.double().sum(dim=1).cpu().numpy()
                mask[candidates[int(np.argmin(cost))]] = True
            out[r, i] = mask
        if progress is not None:
            progress(1)
    return out


def mask_search(
    input_ids: np.ndarray, rate: float, context: MethodContext, valid: np.ndarray | None = None, force_keep: np.ndarray | None = None
) -> np.ndarray:
    """The search reference at one rate (:func:`greedy_search_masks`); slow: use it on a few windows.

    :param input_ids: ``[N, L]`` token ids
    :param rate: mask rate
    :param context: the context (its reconstructor and ``batch_size``)
    :param valid: ``[N, L]`` real positions
    :param force_keep: ``[N, L]`` positions to keep
    :return: ``[N, L]`` bool masks
    """
    rec = context.require_reconstructor(SEARCH)
    maskable = maskable_positions(input_ids, valid, force_keep)
    budget = rate_budget(rate, valid, maskable)
    return greedy_search_masks(rec, input_ids, budget[None], valid, force_keep, max(context.batch_size, 64))[0]


#: The registry: method name -> masking function, all with the :class:`MaskMethod` signature.
BASELINES: dict[str, MaskMethod] = {
    "random": mask_random,
    "frequency": mask_frequency,
    "length": mask_length,
    "stride": mask_stride,
    "self_information": mask_self_information,
    "iterative_self_information": mask_iterative_self_information,
    "greedy_threshold": mask_greedy_threshold,
}


def canonical_method_name(name: str) -> str:
    """The current name of a method, warning (:class:`DeprecationWarning`) when an old name is used.

    :param name: a method name, possibly deprecated (``greedy_oracle``)
    :return: the current name (``greedy_threshold``), or ``name`` unchanged
    """
    if name in DEPRECATED_NAMES:
        warnings.warn(
            f"method '{name}' is now called '{DEPRECATED_NAMES[name]}' (it is a threshold heuristic, not an oracle)",
            DeprecationWarning,
            stacklevel=2,
        )
        return DEPRECATED_NAMES[name]
    return name


def needs_reconstructor(method: str) -> bool:
    """Whether a baseline queries the reconstructor (its cost then includes forward passes).

    :param method: a key of :data:`BASELINES` (or ``search``)
    :return: ``True`` for the scoring baselines and the search
    """
    return canonical_method_name(method) in {"self_information", "iterative_self_information", "greedy_threshold", SEARCH}
