"""Evaluation of masking methods at matched mask rates: metrics, paired document-level intervals, tables and plots.

For each method and requested rate the method's masks are computed once (timed: that is the
compressor's throughput) and then scored by every reconstructor given (the frozen ``reference`` one,
the primary table, and the jointly trained ``joint`` one) with :meth:`Reconstructor.score`. Per window
the evaluation keeps the sums it needs (:class:`WindowStats`), so every metric is a ratio of sums over
windows:

* ``achieved_mask_rate``: dropped tokens / real tokens;
* ``bits_per_masked_token``: surprisal of the dropped tokens given the compressed window (mask tokens in
  place of the dropped ones) / dropped tokens. **It assumes the reader knows where tokens were dropped**;
* ``position_bits_per_window``: mean over windows of ``log2 C(m, k)``, the bits needed to say which ``k``
  of the ``m`` maskable positions were dropped; ``position_bits_per_masked_token``: the same sum / dropped
  tokens; ``bits_per_masked_token_with_positions``: (surprisal + position bits) / dropped tokens, the
  cost when the positions must be transmitted too;
* ``masked_token_accuracy``: dropped tokens whose top guess is right / dropped tokens;
* ``token_recovery``: (kept tokens + correctly recovered dropped tokens) / real tokens;
* ``tokens_per_second``: real tokens / seconds spent computing the masks (scoring excluded).

**Downstream reading** (:class:`DownstreamReader`): each window is followed by the next ``T`` tokens of
its document; a downstream causal LM scores that continuation given (a) the full window, (b) the window
with the dropped tokens deleted (what ``compress()`` returns), (c) the window with one placeholder (the
LM's mask token) per run of dropped tokens, (d) no window (``<bos>`` alone). ``continuation_bits_full``,
``_deleted``, ``_placeholder`` and ``_none`` are bits per continuation token, and ``context_kept`` =
(d - b) / (d - a) is the share of what the window tells about the continuation that survives deletion
(``context_kept_with_placeholders`` uses c). Windows whose continuation is not in the same document are
skipped (``continuation_windows_skipped``).

**Intervals.** Windows of one document are not independent, so every 95 % interval is a percentile
bootstrap over *documents* (all windows of a resampled document come along) when document ids are given,
over windows otherwise (``bootstrap_unit`` says which). The **paired difference** of a method is
``policy - method`` in bits per dropped token on the same windows: ``sum(policy bits) / sum(policy drops)
- sum(method bits) / sum(method drops)`` (with exact budgets the drops are equal, so this is
``sum_i (policy_i - method_i) / sum_i drops_i``), its interval from the same document resamples for
both methods; below zero the policy is better.

**Several runs** (seeds of one configuration): :func:`build_records` writes one record set per run and,
for two or more, a ``pooled`` set: per window, every sum is averaged over the runs, and the pooled metrics,
paired differences and document bootstrap are computed on those averages (the interval covers the
sampling of documents for these trained seeds; the spread across seeds is reported separately as
``<metric>_seed_mean``, ``<metric>_seed_std`` (sample standard deviation) and ``<metric>_per_seed``).

**The search bound** (method ``search``, :func:`~tokencompress_env.baselines.greedy_search_masks`) runs on a
subset of the windows; its records carry ``policy_bits_per_masked_token_same_windows`` and
``policy_to_search_ratio`` on that subset, the best baseline there (``best_baseline_same_windows``,
``best_baseline_bits_per_masked_token_same_windows``), and ``mask_seconds``, the search's cost for all
rates together.

Writers: :func:`write_results_json` (``results.json``, a list of records), :func:`write_results_markdown`
(``results.md``, opening with one verdict line per rate) and :func:`plot_rate_distortion`
(``rate_distortion.png``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tokencompress_env.baselines import (
    BASELINE_NAMES,
    POLICY,
    POLICY_SAMPLED,
    RUN_METHODS,
    SEARCH,
    MaskMethod,
    MethodContext,
    greedy_search_masks,
    maskable_positions,
    rate_budget,
)
from tokencompress_env.errors import InputError
from tokencompress_env.reconstructor import Reconstructor

#: Names of the two scoring reconstructors.
RECONSTRUCTOR_NAMES = ("reference", "joint")

#: All method names, in report order (the search reference last).
METHOD_NAMES = (POLICY, POLICY_SAMPLED, *BASELINE_NAMES, SEARCH)

#: Metrics with a bootstrap interval in every record (field ``<metric>_ci95``).
INTERVAL_METRICS = (
    "achieved_mask_rate",
    "bits_per_masked_token",
    "masked_token_accuracy",
    "token_recovery",
    "bits_per_masked_token_with_positions",
)

#: Downstream-reading metrics (``None`` when no continuation was scored); the last two have intervals too.
CONTINUATION_METRICS = (
    "continuation_bits_full",
    "continuation_bits_placeholder",
    "continuation_bits_none",
    "context_kept_with_placeholders",
    "continuation_bits_deleted",
    "context_kept",
)

#: Metrics reported per seed and as mean ± std across seeds in the pooled records.
SEED_METRICS = (
    "bits_per_masked_token",
    "bits_per_masked_token_with_positions",
    "masked_token_accuracy",
    "token_recovery",
    "continuation_bits_deleted",
    "context_kept",
    "policy_minus_method_bits_per_masked_token",
)

#: Fields of every record, in order (more follow: intervals, positions, continuation, pairing, run).
RECORD_FIELDS = (
    "method",
    "reconstructor",
    "requested_mask_rate",
    "achieved_mask_rate",
    "bits_per_masked_token",
    "masked_token_accuracy",
    "token_recovery",
    "tokens_per_second",
)

#: ``run`` of the records pooled over several runs.
POOLED = "pooled"


def log2_binomial(n: np.ndarray | float, k: np.ndarray | float) -> np.ndarray:
    """``log2 C(n, k)``: the bits that say which ``k`` of ``n`` positions were chosen.

    :param n: positions (array or number)
    :param k: chosen positions, ``0 <= k <= n``
    :return: bits (float64 array)
    """
    n_arr, k_arr = np.asarray(n, dtype=np.float64), np.asarray(k, dtype=np.float64)
    lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
    return np.asarray((lgamma(n_arr + 1) - lgamma(k_arr + 1) - lgamma(n_arr - k_arr + 1)) / math.log(2.0))


@dataclass
class WindowStats:
    """Per-window sums from which every metric is a ratio of sums; ``[N]`` arrays.

    :param masked_bits: surprisal (bits) summed over the dropped tokens
    :param masked: dropped tokens
    :param masked_correct: dropped tokens whose top guess is right
    :param valid: real tokens
    :param position_bits: ``log2 C(maskable, dropped)`` (``None``: not computed)
    :param windows: windows behind each entry (1 each; a document's count after :meth:`grouped`)
    :param continuation_tokens: continuation tokens scored after the window (0: skipped; ``None``: no
        downstream reading)
    :param continuation_full: continuation bits given the full window
    :param continuation_deleted: continuation bits given the window with the dropped tokens deleted
    :param continuation_placeholder: continuation bits given the window with placeholders
    :param continuation_none: continuation bits given no window
    """

    masked_bits: np.ndarray
    masked: np.ndarray
    masked_correct: np.ndarray
    valid: np.ndarray
    position_bits: np.ndarray | None = None
    windows: np.ndarray | None = None
    continuation_tokens: np.ndarray | None = None
    continuation_full: np.ndarray | None = None
    continuation_deleted: np.ndarray | None = None
    continuation_placeholder: np.ndarray | None = None
    continuation_none: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-window arrays that are set, by field name.

        :return: name -> ``[N]`` float64 array
        """
        out = {f.name: np.asarray(getattr(self, f.name), dtype=np.float64) for f in fields(self) if getattr(self, f.name) is not None}
        out.setdefault("windows", np.ones(len(self.valid)))
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> WindowStats:
        """Build from :meth:`arrays`-style name -> array.

        :param arrays: the arrays
        :return: the stats
        """
        return cls(**{k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()})

    def subset(self, index: np.ndarray) -> WindowStats:
        """The stats of some windows.

        :param index: window indices
        :return: the stats of those windows
        """
        return WindowStats.from_arrays({k: v[index] for k, v in self.arrays().items()})

    def grouped(self, groups: np.ndarray) -> WindowStats:
        """Sum the windows of each group (document) into one entry.

        :param groups: ``[N]`` group number of each window, ``0 .. G-1``
        :return: ``[G]`` stats
        """
        groups = np.asarray(groups, dtype=np.int64)
        size = int(groups.max()) + 1 if len(groups) else 0
        return WindowStats.from_arrays({k: np.bincount(groups, weights=v, minlength=size) for k, v in self.arrays().items()})

    @staticmethod
    def mean(stats: Sequence[WindowStats]) -> WindowStats:
        """Per-window mean of several runs' stats (same windows): the pooled stats.

        :param stats: one per run
        :return: the per-window means
        """
        keys = set.intersection(*(set(s.arrays()) for s in stats))
        return WindowStats.from_arrays({k: np.mean([s.arrays()[k] for s in stats], axis=0) for k in keys})

    def sums(self, index: np.ndarray | slice = slice(None)) -> dict[str, np.ndarray]:
        """Sums over the selected entries (along the last axis).

        :param index: entries to use; a ``[B, N]`` integer array gives ``B`` bootstrap replicates
        :return: name -> sum (or ``[B]`` sums)
        """
        return {k: v[index].sum(axis=-1) for k, v in self.arrays().items()}

    def ratios(self, index: np.ndarray | slice = slice(None)) -> dict[str, np.ndarray | float]:
        """The metrics as ratios of sums over the selected windows (along the last axis).

        :param index: windows to use; a ``[B, N]`` integer array gives ``B`` bootstrap replicates
        :return: metric name -> value (or ``[B]`` values); NaN where undefined or not computed
        """
        return metrics_from_sums(self.sums(index))


def metrics_from_sums(s: Mapping[str, np.ndarray]) -> dict[str, np.ndarray | float]:
    """Every metric from sums over windows (see the module docstring).

    :param s: sums by :class:`WindowStats` field name
    :return: metric name -> value (NaN where undefined or not computed)
    """
    nan = np.full(np.shape(s["valid"]), np.nan)
    bits, masked, correct, valid = s["masked_bits"], s["masked"], s["masked_correct"], s["valid"]
    pos = s.get("position_bits", nan)
    tokens = s.get("continuation_tokens", nan)
    full, deleted = s.get("continuation_full", nan), s.get("continuation_deleted", nan)
    placeholder, none = s.get("continuation_placeholder", nan), s.get("continuation_none", nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "achieved_mask_rate": masked / valid,
            "bits_per_masked_token": bits / masked,
            "masked_token_accuracy": correct / masked,
            "token_recovery": (valid - masked + correct) / valid,
            "position_bits_per_window": pos / s["windows"],
            "position_bits_per_masked_token": pos / masked,
            "bits_per_masked_token_with_positions": (bits + pos) / masked,
            "continuation_bits_full": full / tokens,
            "continuation_bits_deleted": deleted / tokens,
            "continuation_bits_placeholder": placeholder / tokens,
            "continuation_bits_none": none / tokens,
            "context_kept": (none - deleted) / (none - full),
            "context_kept_with_placeholders": (none - placeholder) / (none - full),
        }


def group_numbers(doc_ids: Sequence[Any] | np.ndarray | None, n: int) -> np.ndarray:
    """Group number of each window: its document's (first-seen order), or its own without documents.

    :param doc_ids: ``[N]`` document ids, or ``None``
    :param n: number of windows
    :return: ``[N]`` int64 group numbers ``0 .. G-1``
    """
    if doc_ids is None:
        return np.arange(n, dtype=np.int64)
    ids = np.asarray(doc_ids, dtype=object)
    if len(ids) != n:
        raise InputError(f"{len(ids)} document ids for {n} windows")
    numbers: dict[Any, int] = {}
    return np.array([numbers.setdefault(d, len(numbers)) for d in ids], dtype=np.int64)


def score_masks(
    reconstructor: Reconstructor, input_ids: np.ndarray, masks: np.ndarray, valid: np.ndarray | None = None, batch_size: int = 64
) -> WindowStats:
    """Score masks with a reconstructor (:meth:`Reconstructor.score`) and keep the per-window sums.

    The position bits take every real position as maskable (the evaluation uses no force-kept tokens).

    :param reconstructor: the scoring reconstructor
    :param input_ids: ``[N, L]`` ids
    :param masks: ``[N, L]`` dropped positions
    :param valid: ``[N, L]`` real positions (``None``: all)
    :param batch_size: windows per forward pass
    :return: the per-window sums
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    valid_np = np.ones(ids.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    n = len(ids)
    stats = WindowStats(np.zeros(n), np.zeros(n), np.zeros(n), valid_np.sum(axis=1).astype(np.float64))
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        result = reconstructor.score(ids[sl], masks[sl], valid_np[sl], positions="masked")  # only dropped tokens are counted
        stats.masked_bits[sl] = result.masked_bits.double().sum(dim=1).cpu().numpy()
        stats.masked[sl] = result.mask.sum(dim=1).cpu().numpy()
        stats.masked_correct[sl] = result.masked_correct.sum(dim=1).cpu().numpy()
    stats.position_bits = log2_binomial(stats.valid, stats.masked)
    return stats


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of the finite values.

    :param values: bootstrap replicates
    :param level: coverage
    :return: ``(low, high)``, NaN when no value is finite
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap indices: ``n_boot`` resamples of ``n`` units with replacement (seeded).

    :param n: units (documents or windows)
    :param n_boot: replicates
    :param seed: seed
    :return: ``[n_boot, n]`` indices
    """
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_intervals(
    stats: WindowStats,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | None = None,
    metrics: Sequence[str] = INTERVAL_METRICS,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of metrics, resampling documents (``groups``) or windows with replacement.

    With ``groups`` the windows of each document are summed first and documents are resampled, so a
    resampled document brings all its windows: the interval accounts for windows of one document being
    alike.

    :param stats: per-window sums
    :param n_boot: bootstrap replicates
    :param seed: seed of the resampling
    :param level: coverage of the interval
    :param groups: ``[N]`` document number of each window (:func:`group_numbers`); ``None``: windows
    :param metrics: which metrics
    :return: metric name -> ``(low, high)`` (NaN where undefined, or with fewer than two units)
    """
    units = stats if groups is None else stats.grouped(groups)
    n = len(units.valid)
    if n < 2 or n_boot <= 0:  # one document alone says nothing about the spread
        return {k: (math.nan, math.nan) for k in metrics}
    replicates = units.ratios(_resamples(n, n_boot, seed))
    return {k: _percentiles(np.asarray(replicates[k]), level) for k in metrics}


def paired_difference(
    a: WindowStats,
    b: WindowStats,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | None = None,
    metric: str = "bits_per_masked_token",
) -> tuple[float, float, float]:
    """``metric(a) - metric(b)`` on the same windows, with a paired bootstrap interval over documents.

    Each replicate resamples documents (``groups``; windows when ``None``) once and evaluates both ``a``
    and ``b`` on that resample, so what the two share (the same hard or easy documents) cancels.

    :param a: per-window sums of the first method (the policy)
    :param b: per-window sums of the second method, same windows
    :param n_boot: bootstrap replicates
    :param seed: seed of the resampling
    :param level: coverage of the interval
    :param groups: ``[N]`` document number of each window; ``None``: windows are the units
    :param metric: a metric of :func:`metrics_from_sums`
    :return: ``(difference, low, high)`` (NaN where undefined)
    """
    if len(a.valid) != len(b.valid):
        raise InputError(f"paired difference needs the same windows, got {len(a.valid)} and {len(b.valid)}")
    point = float(np.asarray(a.ratios()[metric])) - float(np.asarray(b.ratios()[metric]))
    ua, ub = (a, b) if groups is None else (a.grouped(groups), b.grouped(groups))
    n = len(ua.valid)
    if n < 2 or n_boot <= 0:
        return point, math.nan, math.nan
    index = _resamples(n, n_boot, seed)
    diff = np.asarray(ua.ratios(index)[metric]) - np.asarray(ub.ratios(index)[metric])
    lo, hi = _percentiles(diff, level)
    return point, lo, hi


def _clean(value: Any) -> float | None:
    """A float for JSON: ``None`` instead of NaN, infinity or ``None``.

    :param value: the value
    :return: the value or ``None``
    """
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------- downstream reading
class DownstreamReader:
    """Scores the continuation of each window with a downstream causal LM given four contexts.

    Uses :meth:`Reconstructor.continuation_bits` (one batched, left-padded forward pass per batch). When
    the downstream LM's tokenizer differs from the windows' one, the kept runs and the continuation are
    decoded to text and re-encoded with the downstream tokenizer (bits are then per downstream token).
    Contexts (a) full and (d) none do not depend on the masks and are scored once.

    Every context is cut to its last ``max_context`` downstream tokens, so that context plus continuation
    stay within the positions the LM was trained on: a model pretrained on 128-token windows reads a
    32-token continuation after at most 96 context tokens. Past its trained length a small LM's
    predictions degrade, and a longer context can then *raise* the continuation bits.

    :param lm: the downstream LM (any causal LM loaded as a :class:`Reconstructor`)
    :param source_tokenizer: the tokenizer of the windows
    :param continuations: ``[N, T]`` continuation ids of the windows (source tokenizer)
    :param available: ``[N]`` windows whose continuation is in their document
    :param batch_size: windows per forward pass
    :param name: the LM's name in the records
    :param max_context: most recent context tokens the LM reads (``None``: its whole context less the
        continuation)
    """

    def __init__(
        self,
        lm: Reconstructor,
        source_tokenizer: Any,
        continuations: np.ndarray,
        available: np.ndarray,
        batch_size: int = 64,
        name: str = "reference",
        max_context: int | None = None,
    ) -> None:
        from tokencompress_env.data import tokenizer_id

        self.lm = lm
        self.source_tokenizer = source_tokenizer
        self.same_tokenizer = tokenizer_id(lm.tokenizer) == tokenizer_id(source_tokenizer)
        self.available = np.asarray(available, dtype=bool)
        self.continuations = np.asarray(continuations, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.name = name
        room = lm.max_seq_len - self.horizon
        self.max_context = room if max_context is None else min(int(max_context), room)
        if self.max_context < 0:
            raise ValueError(f"a {self.horizon}-token continuation exceeds the downstream LM's context of {lm.max_seq_len}")
        self._fixed: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def horizon(self) -> int:
        """Continuation tokens per window (source tokenizer).

        :return: ``T``
        """
        return int(self.continuations.shape[1])

    def _to_lm(self, segments: Sequence[np.ndarray], placeholder: bool) -> np.ndarray:
        """Source-tokenizer segments (kept runs) as downstream ids, joined by placeholders if asked.

        :param segments: runs of kept ids, in order (a placeholder goes between consecutive runs, and
            before/after when a segment is empty)
        :param placeholder: insert the downstream mask token between segments
        :return: downstream ids
        """
        out: list[int] = []
        for j, seg in enumerate(segments):
            if j and placeholder:
                out.append(self.lm.mask_token_id)
            if len(seg):
                if self.same_tokenizer:
                    out.extend(int(t) for t in seg)
                else:
                    text = self.source_tokenizer.decode([int(t) for t in seg])
                    out.extend(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        return np.asarray(out, dtype=np.int64)

    def _context(self, window: np.ndarray, dropped: np.ndarray, mode: str) -> np.ndarray:
        """One context: ``full``, ``deleted``, ``placeholder`` or ``none``.

        :param window: ``[L]`` ids
        :param dropped: ``[L]`` dropped positions
        :param mode: which context
        :return: downstream ids
        """
        if mode == "none" or self.max_context == 0:
            return np.zeros(0, dtype=np.int64)
        if mode == "full":
            return self._to_lm([window], False)[-self.max_context :]
        if mode == "deleted":
            return self._to_lm([window[~dropped]], False)[-self.max_context :]
        # placeholders: the kept runs, one placeholder between consecutive ones for each dropped run
        edges = np.flatnonzero(np.diff(np.concatenate([[0], dropped.astype(np.int8), [0]])))
        segments, start = [], 0
        for run_start, run_end in zip(edges[::2], edges[1::2], strict=True):
            segments.append(window[start:run_start])
            start = run_end
        segments.append(window[start:])
        return self._to_lm(segments, True)[-self.max_context :]

    def _score(
        self, windows: np.ndarray, masks: np.ndarray, mode: str, rows: np.ndarray, index: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Continuation bits (summed per window) and continuation tokens of the given rows.

        :param windows: ``[N, L]`` ids
        :param masks: ``[N, L]`` dropped positions
        :param mode: which context
        :param rows: the windows to score (those with a continuation)
        :param index: ``[N]`` position of each window in ``continuations``
        :return: ``[N]`` bits and ``[N]`` tokens (0 elsewhere)
        """
        n = len(windows)
        bits, tokens = np.zeros(n), np.zeros(n)
        contexts = {int(i): self._context(windows[i], masks[i], mode) for i in rows}
        conts = {int(i): self._to_lm([self.continuations[index[i]]], False) for i in rows}
        by_len: dict[int, list[int]] = {}
        for i in rows:
            by_len.setdefault(len(conts[int(i)]), []).append(int(i))
        for length, members in by_len.items():
            if length == 0:
                continue
            order = sorted(members, key=lambda i: len(contexts[i]))  # similar lengths together: less padding
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                out = self.lm.continuation_bits([contexts[i] for i in chunk], np.stack([conts[i] for i in chunk]))
                bits[chunk] = out.double().sum(dim=1).cpu().numpy()
                tokens[chunk] = length
        return bits, tokens

    def read(self, windows: np.ndarray, masks: np.ndarray, window_index: np.ndarray) -> dict[str, np.ndarray]:
        """The four continuation readings of some windows under their masks.

        :param windows: ``[n, L]`` ids (the windows ``window_index`` of the reader's continuations)
        :param masks: ``[n, L]`` dropped positions
        :param window_index: ``[n]`` positions of the windows in ``continuations``
        :return: :class:`WindowStats` fields ``continuation_*`` -> ``[n]`` arrays
        """
        index = np.asarray(window_index, dtype=np.int64)
        rows = np.flatnonzero(self.available[index])
        key = hash(index.tobytes())
        if key not in self._fixed:
            full, tokens = self._score(windows, masks, "full", rows, index)
            none, _ = self._score(windows, masks, "none", rows, index)
            self._fixed[key] = (full, none, tokens)
        full, none, tokens = self._fixed[key]
        deleted, _ = self._score(windows, masks, "deleted", rows, index)
        placeholder, _ = self._score(windows, masks, "placeholder", rows, index)
        return {
            "continuation_tokens": tokens,
            "continuation_full": full,
            "continuation_deleted": deleted,
            "continuation_placeholder": placeholder,
            "continuation_none": none,
        }


# ---------------------------------------------------------------------------- computing
@dataclass
class MethodRate:
    """One method at one rate in one run: its timing and the per-window stats under each reconstructor.

    :param method: the method's name
    :param rate: the requested mask rate
    :param seconds: seconds spent computing the masks (for the nested search: all rates together)
    :param window_index: which of the evaluation's windows were used (all, or the search subset)
    :param stats: reconstructor name -> per-window stats (continuation included when read)
    :param tokens: real tokens of those windows
    """

    method: str
    rate: float
    seconds: float
    window_index: np.ndarray
    stats: dict[str, WindowStats]
    tokens: int


def _method_masks(
    name: str,
    method: MaskMethod | None,
    ids: np.ndarray,
    rates: Sequence[float],
    context: MethodContext,
    valid: np.ndarray,
    force_keep: np.ndarray | None,
    progress: bool,
) -> list[tuple[np.ndarray, float]]:
    """Masks and seconds of one method at every rate (the search nested: one pass for all rates).

    :param name: the method's name
    :param method: its masking function (``None`` for the search)
    :param ids: ``[N, L]`` windows
    :param rates: requested rates
    :param context: what the method may use
    :param valid: ``[N, L]`` real positions
    :param force_keep: positions to keep
    :param progress: show a progress bar for the search
    :return: per rate, the masks and the seconds spent
    """
    if name == SEARCH:
        rec = context.require_reconstructor(SEARCH)
        maskable = maskable_positions(ids, valid, force_keep)
        order = np.argsort(rates, kind="stable")
        budgets = np.stack([rate_budget(float(rates[i]), valid, maskable) for i in order])
        start = time.perf_counter()
        with tqdm(total=len(ids), desc="search (nested over rates)", unit="window", disable=not progress, leave=False) as bar:
            nested = greedy_search_masks(rec, ids, budgets, valid, force_keep, max(context.batch_size, 64), bar.update)
        elapsed = time.perf_counter() - start
        by_rate: list[np.ndarray] = [np.empty(0)] * len(rates)
        for j, i in enumerate(order):
            by_rate[int(i)] = nested[j]
        return [(m, elapsed) for m in by_rate]
    assert method is not None
    out = []
    for rate in rates:
        start = time.perf_counter()
        masks = np.asarray(method(ids, float(rate), context, valid=valid, force_keep=force_keep), dtype=bool)
        out.append((masks, time.perf_counter() - start))
        if masks.shape != ids.shape:
            raise InputError(f"method '{name}' returned masks of shape {masks.shape}, expected {ids.shape}")
    return out


def compute_method_stats(
    methods: Mapping[str, MaskMethod | None],
    input_ids: np.ndarray,
    reconstructors: Mapping[str, Reconstructor],
    rates: Sequence[float],
    context: MethodContext,
    valid: np.ndarray | None = None,
    batch_size: int = 64,
    progress: bool = False,
    reader: DownstreamReader | None = None,
    search_index: np.ndarray | None = None,
    mask_cache: dict[tuple[str, float], tuple[np.ndarray, float]] | None = None,
) -> list[MethodRate]:
    """Run every method at every rate and keep the per-window stats under every reconstructor.

    :param methods: name -> masking function (``search``: ``None``, the nested search is used)
    :param input_ids: ``[N, L]`` windows
    :param reconstructors: name -> scoring reconstructor
    :param rates: requested mask rates
    :param context: what the methods may use
    :param valid: ``[N, L]`` real positions (``None``: all)
    :param batch_size: windows per scoring forward pass
    :param progress: show a progress bar over methods and rates
    :param reader: the downstream reader (``None``: no continuation figures)
    :param search_index: the windows the search runs on (``None``: all)
    :param mask_cache: (method, rate) -> (masks, seconds), filled and reused (e.g. the baselines of
        several runs that share their reference reconstructor); the policy's methods are never cached
    :return: one :class:`MethodRate` per method and rate
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or len(ids) == 0:
        raise InputError(f"no windows to evaluate (input_ids of shape {ids.shape})")
    valid_np = np.ones(ids.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    out: list[MethodRate] = []
    bar = tqdm(total=len(methods) * len(rates), desc="methods x rates", unit="rate", disable=not progress)
    for name, method in methods.items():
        index = np.arange(len(ids)) if name != SEARCH or search_index is None else np.asarray(search_index, dtype=np.int64)
        sub_ids, sub_valid = ids[index], valid_np[index]
        bar.set_postfix_str(name)
        cached = mask_cache is not None and name not in RUN_METHODS and all((name, float(r)) in mask_cache for r in rates)
        if cached:
            assert mask_cache is not None
            results = [mask_cache[(name, float(r))] for r in rates]
        else:
            results = _method_masks(name, method, sub_ids, rates, context, sub_valid, None, progress)
            if mask_cache is not None and name not in RUN_METHODS:
                mask_cache.update({(name, float(r)): res for r, res in zip(rates, results, strict=True)})
        for rate, (masks, seconds) in zip(rates, results, strict=True):
            stats = {rec_name: score_masks(rec, sub_ids, masks, sub_valid, batch_size) for rec_name, rec in reconstructors.items()}
            if reader is not None:
                continuation = reader.read(sub_ids, masks, index)
                for s in stats.values():
                    for key, value in continuation.items():
                        setattr(s, key, value)
            out.append(MethodRate(name, float(rate), seconds, index, stats, int(sub_valid.sum())))
            bar.update(1)
    bar.close()
    return out


# ---------------------------------------------------------------------------- records
def _record(
    item: MethodRate,
    rec_name: str,
    stats: WindowStats,
    policy: WindowStats | None,
    groups: np.ndarray,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """One record: point values, document-level intervals, position bits, continuation, pairing.

    :param item: the method at the rate
    :param rec_name: the scoring reconstructor's name
    :param stats: per-window stats of ``item`` under it
    :param policy: the policy's per-window stats on the same windows (``None``: no policy evaluated)
    :param groups: ``[n]`` document numbers of the windows (window numbers when documents are unknown)
    :param n_boot: bootstrap replicates
    :param seed: seed of the bootstrap
    :return: the record
    """
    point = stats.ratios()
    ci = bootstrap_intervals(stats, n_boot, seed, groups=groups, metrics=(*INTERVAL_METRICS, "continuation_bits_deleted", "context_kept"))
    record: dict[str, Any] = {
        "method": item.method,
        "reconstructor": rec_name,
        "requested_mask_rate": item.rate,
        **{k: _clean(point[k]) for k in ("achieved_mask_rate", "bits_per_masked_token", "masked_token_accuracy", "token_recovery")},
        "tokens_per_second": _clean(item.tokens / item.seconds) if item.seconds > 0 else None,
    }
    record = {k: record[k] for k in RECORD_FIELDS}
    record.update({f"{k}_ci95": [_clean(lo), _clean(hi)] for k, (lo, hi) in ci.items() if k in INTERVAL_METRICS})
    record["position_bits_per_window"] = _clean(point["position_bits_per_window"])
    record["position_bits_per_masked_token"] = _clean(point["position_bits_per_masked_token"])
    record["bits_per_masked_token_with_positions"] = _clean(point["bits_per_masked_token_with_positions"])
    for key in CONTINUATION_METRICS:
        record[key] = _clean(point[key])
    for key in ("continuation_bits_deleted", "context_kept"):
        record[f"{key}_ci95"] = [_clean(ci[key][0]), _clean(ci[key][1])]
    has_continuation = stats.continuation_tokens is not None
    with_cont = int((np.asarray(stats.continuation_tokens) > 0).sum()) if has_continuation else 0
    record["continuation_windows"] = with_cont if has_continuation else None
    record["continuation_windows_skipped"] = len(stats.valid) - with_cont if has_continuation else None
    if policy is not None and item.method != POLICY:
        diff, lo, hi = paired_difference(policy, stats, n_boot, seed, groups=groups)
        record["policy_minus_method_bits_per_masked_token"] = _clean(diff)
        record["policy_minus_method_bits_per_masked_token_ci95"] = [_clean(lo), _clean(hi)]
        record["policy_minus_method_excludes_zero"] = bool(np.isfinite(lo) and np.isfinite(hi) and (lo > 0 or hi < 0))
    else:
        record["policy_minus_method_bits_per_masked_token"] = None
        record["policy_minus_method_bits_per_masked_token_ci95"] = [None, None]
        record["policy_minus_method_excludes_zero"] = None
    if item.method == SEARCH:
        policy_bits = _clean(policy.ratios()["bits_per_masked_token"]) if policy is not None else None
        bound = record["bits_per_masked_token"]
        record["policy_bits_per_masked_token_same_windows"] = policy_bits
        record["policy_to_search_ratio"] = policy_bits / bound if policy_bits is not None and bound else None
    record["mask_seconds"] = round(item.seconds, 3)
    record["windows"] = len(stats.valid)
    record["documents"] = len(np.unique(groups))
    record["tokens"] = item.tokens
    return record


def _records_of_run(items: Sequence[MethodRate], groups_all: np.ndarray, n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Records of one run (or of the pooled runs), each method paired with the policy on the same windows.

    :param items: the run's :class:`MethodRate` list
    :param groups_all: ``[N]`` document numbers of all evaluated windows
    :param n_boot: bootstrap replicates
    :param seed: seed of the bootstrap
    :return: one record per (method, rate, reconstructor)
    """

    def on_windows(other: MethodRate, rec_name: str, windows: np.ndarray) -> WindowStats | None:
        """``other``'s stats restricted to ``windows`` (``None`` when it did not score them all)."""
        position = {int(w): j for j, w in enumerate(other.window_index)}
        if rec_name not in other.stats or not all(int(w) in position for w in windows):
            return None
        return other.stats[rec_name].subset(np.array([position[int(w)] for w in windows], dtype=np.int64))

    policy = {it.rate: it for it in items if it.method == POLICY}
    records = []
    for item in items:
        groups = groups_all[item.window_index]
        for rec_name, stats in item.stats.items():
            paired = on_windows(policy[item.rate], rec_name, item.window_index) if item.rate in policy else None
            record = _record(item, rec_name, stats, paired, groups, n_boot, seed)
            if item.method == SEARCH:  # the best baseline on the search's windows, for a like-for-like reading
                best: tuple[float, str] | None = None
                for other in items:
                    if other.rate == item.rate and other.method not in (*RUN_METHODS, SEARCH):
                        sub = on_windows(other, rec_name, item.window_index)
                        bits = float(np.asarray(sub.ratios()["bits_per_masked_token"])) if sub is not None else math.nan
                        if math.isfinite(bits) and (best is None or bits < best[0]):
                            best = (bits, other.method)
                record["best_baseline_same_windows"] = best[1] if best else None
                record["best_baseline_bits_per_masked_token_same_windows"] = best[0] if best else None
            records.append(record)
    return records


def build_records(
    runs: Sequence[Sequence[MethodRate]],
    doc_ids: Sequence[Any] | np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    run_names: Sequence[str] | None = None,
    run_seeds: Sequence[int | None] | None = None,
) -> list[dict[str, Any]]:
    """Records of one or several runs of one configuration, plus the pooled records for several.

    :param runs: per run, its :class:`MethodRate` list (same methods, rates and windows in every run)
    :param doc_ids: ``[N]`` document id of every evaluated window (``None``: windows are the bootstrap unit)
    :param n_boot: bootstrap replicates
    :param seed: seed of the bootstrap
    :param run_names: a name per run (default ``run0``, ``run1``, ..)
    :param run_seeds: the training seed of each run, when known
    :return: the records; each has ``run`` and ``seed``; pooled ones have ``run`` = ``pooled``
    """
    if not runs:
        return []
    n = max(int(it.window_index.max()) + 1 for it in runs[0]) if runs[0] else 0
    if doc_ids is not None:
        n = len(doc_ids)
    groups_all = group_numbers(doc_ids, n)
    unit = "document" if doc_ids is not None else "window"
    names = list(run_names) if run_names is not None else [f"run{i}" for i in range(len(runs))]
    seeds = list(run_seeds) if run_seeds is not None else [None] * len(runs)
    per_run: list[list[dict[str, Any]]] = []
    for items, name, run_seed in zip(runs, names, seeds, strict=True):
        records = _records_of_run(items, groups_all, n_boot, seed)
        for r in records:
            r.update(run=name, seed=run_seed, bootstrap_unit=unit)
        per_run.append(records)
    out = [r for records in per_run for r in records]
    if len(runs) < 2:
        return out
    pooled_items = []
    for j, item in enumerate(runs[0]):
        group = [items[j] for items in runs]
        if any(g.method != item.method or g.rate != item.rate or not np.array_equal(g.window_index, item.window_index) for g in group):
            raise InputError("runs to pool must evaluate the same methods, rates and windows")
        stats = {rec: WindowStats.mean([g.stats[rec] for g in group]) for rec in item.stats if all(rec in g.stats for g in group)}
        seconds = float(np.mean([g.seconds for g in group]))
        pooled_items.append(MethodRate(item.method, item.rate, seconds, item.window_index, stats, item.tokens))
    pooled = _records_of_run(pooled_items, groups_all, n_boot, seed)
    for k, r in enumerate(pooled):
        same = [records[k] for records in per_run]
        r.update(run=POOLED, seed=None, bootstrap_unit=unit, runs=names, seeds=seeds)
        for key in SEED_METRICS:
            values = [s.get(key) for s in same]
            finite = [float(v) for v in values if v is not None]
            r[f"{key}_per_seed"] = values
            r[f"{key}_seed_mean"] = _clean(np.mean(finite)) if finite else None
            r[f"{key}_seed_std"] = _clean(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return out + pooled


def evaluate_method(
    name: str,
    method: MaskMethod,
    input_ids: np.ndarray,
    reconstructors: Mapping[str, Reconstructor],
    rates: Sequence[float],
    context: MethodContext,
    valid: np.ndarray | None = None,
    force_keep: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Run one method at every rate and score its masks with every reconstructor (window-level intervals).

    :param name: the method's name in the records
    :param method: the masking function
    :param input_ids: ``[N, L]`` windows
    :param reconstructors: name (``reference``, ``joint``) -> scoring reconstructor
    :param rates: requested mask rates
    :param context: what the method may use (its reconstructor computes the scoring baselines' masks)
    :param valid: ``[N, L]`` real positions (``None``: all)
    :param force_keep: ``[N, L]`` positions the method must keep (``None``: none)
    :param n_boot: bootstrap replicates
    :param seed: seed of the bootstrap
    :param batch_size: windows per scoring forward pass
    :return: one record per (rate, reconstructor)
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or len(ids) == 0:
        raise InputError(f"no windows to evaluate (input_ids of shape {ids.shape})")
    valid_np = np.ones(ids.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    items = []
    for rate, (masks, seconds) in zip(rates, _method_masks(name, method, ids, rates, context, valid_np, force_keep, False), strict=True):
        stats = {rec_name: score_masks(rec, ids, masks, valid_np, batch_size) for rec_name, rec in reconstructors.items()}
        items.append(MethodRate(name, float(rate), seconds, np.arange(len(ids)), stats, int(valid_np.sum())))
    return build_records([items], None, n_boot, seed)


def evaluate(
    methods: Mapping[str, MaskMethod | None],
    input_ids: np.ndarray,
    reconstructors: Mapping[str, Reconstructor],
    rates: Sequence[float],
    context: MethodContext,
    valid: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    doc_ids: Sequence[Any] | np.ndarray | None = None,
    reader: DownstreamReader | None = None,
    search_index: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Evaluate several methods at several rates with several reconstructors (one run).

    :param methods: name -> masking function (``search``: ``None``)
    :param input_ids: ``[N, L]`` windows
    :param reconstructors: name -> scoring reconstructor
    :param rates: requested mask rates
    :param context: what the methods may use
    :param valid: ``[N, L]`` real positions (``None``: all)
    :param n_boot: bootstrap replicates
    :param seed: seed of the bootstrap
    :param batch_size: windows per scoring forward pass
    :param progress: show a progress bar
    :param doc_ids: ``[N]`` document ids (the bootstrap unit; ``None``: windows)
    :param reader: downstream reader (``None``: no continuation figures)
    :param search_index: windows the search runs on (``None``: all)
    :return: all records
    """
    items = compute_method_stats(methods, input_ids, reconstructors, rates, context, valid, batch_size, progress, reader, search_index)
    return build_records([items], doc_ids, n_boot, seed)


# ---------------------------------------------------------------------------- writers
#: File of the per-window sums beside ``results.json`` (:func:`write_window_stats`).
WINDOW_STATS_FILE = "window_stats.npz"


def _stats_key(method: str, rate: float, reconstructor: str) -> str:
    """The key prefix of one method, rate and reconstructor in :data:`WINDOW_STATS_FILE`.

    :param method: the method's name
    :param rate: the requested mask rate
    :param reconstructor: the scoring reconstructor's name
    :return: the prefix
    """
    return f"{method}|{rate:.6g}|{reconstructor}|"


def write_window_stats(runs: Sequence[Sequence[MethodRate]], doc_ids: Sequence[Any] | np.ndarray | None, path: str | Path) -> Path:
    """Save the per-window sums of every method, rate and reconstructor, pooled over the runs (their mean).

    Two evaluations of the same windows (e.g. two ablation variants) can then be compared with a paired
    interval over documents (:func:`paired_difference_between`), which their records alone do not allow.

    :param runs: per run, its :class:`MethodRate` list (as given to :func:`build_records`)
    :param doc_ids: ``[N]`` document id of every evaluated window (``None``: windows are the units)
    :param path: the ``.npz`` file
    :return: the path
    """
    arrays: dict[str, np.ndarray] = {}
    if doc_ids is not None:
        arrays["doc_ids"] = np.asarray([str(d) for d in doc_ids])
    for j, item in enumerate(runs[0] if runs else []):
        group = [items[j] for items in runs]
        for rec in item.stats:
            if not all(rec in g.stats for g in group):
                continue
            prefix = _stats_key(item.method, item.rate, rec)
            arrays[prefix + "window_index"] = np.asarray(item.window_index, dtype=np.int64)
            for name, values in WindowStats.mean([g.stats[rec] for g in group]).arrays().items():
                arrays[prefix + name] = values
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]  # numpy types **kwds like allow_pickle
    return path


def read_window_stats(path: str | Path, method: str, rate: float, reconstructor: str = "reference") -> tuple[np.ndarray, WindowStats]:
    """The pooled per-window sums of one method at one rate from :func:`write_window_stats`'s file.

    :param path: the ``.npz`` file
    :param method: the method's name
    :param rate: the requested mask rate
    :param reconstructor: the scoring reconstructor's name
    :return: ``(window_index, stats)``
    :raises InputError: when the file holds no such entry
    """
    prefix = _stats_key(method, rate, reconstructor)
    with np.load(Path(path), allow_pickle=False) as data:
        if prefix + "window_index" not in data.files:
            raise InputError(f"{path} holds no per-window figures of {method} at rate {rate:g} ({reconstructor})")
        arrays = {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}
    index = arrays.pop("window_index")
    return index, WindowStats.from_arrays(arrays)


def paired_difference_between(
    path_a: str | Path,
    path_b: str | Path,
    rate: float,
    method: str = POLICY,
    reconstructor: str = "reference",
    n_boot: int = 1000,
    seed: int = 0,
    metric: str = "bits_per_masked_token",
) -> tuple[float, float, float]:
    """``metric`` (bits per dropped token) of ``method`` in evaluation ``a`` minus in evaluation ``b``, paired by window.

    Both evaluations must have scored the same windows of the same documents (same split, windows and
    seed); the interval resamples documents.

    :param path_a: :data:`WINDOW_STATS_FILE` of the first evaluation
    :param path_b: that of the second
    :param rate: the requested mask rate
    :param method: the method compared (the policy of each evaluation's runs)
    :param reconstructor: the scoring reconstructor's name
    :param n_boot: bootstrap replicates
    :param seed: seed of the bootstrap
    :param metric: a metric of :func:`metrics_from_sums` (e.g. ``context_kept`` of evaluations with a
        downstream reading)
    :return: ``(difference, low, high)``
    :raises InputError: when the two evaluations did not score the same windows
    """
    index_a, stats_a = read_window_stats(path_a, method, rate, reconstructor)
    index_b, stats_b = read_window_stats(path_b, method, rate, reconstructor)
    with np.load(Path(path_a), allow_pickle=False) as data_a, np.load(Path(path_b), allow_pickle=False) as data_b:
        docs_a = data_a["doc_ids"] if "doc_ids" in data_a.files else None
        docs_b = data_b["doc_ids"] if "doc_ids" in data_b.files else None
    same_docs = (docs_a is None and docs_b is None) or (docs_a is not None and docs_b is not None and np.array_equal(docs_a, docs_b))
    same_masked = np.array_equal(stats_a.valid, stats_b.valid)
    if not (np.array_equal(index_a, index_b) and same_docs and same_masked):
        raise InputError(f"{path_a} and {path_b} did not evaluate the same windows: no paired difference")
    groups = None if docs_a is None else group_numbers(docs_a, len(docs_a))[index_a]
    return paired_difference(stats_a, stats_b, n_boot, seed, groups=groups, metric=metric)


def write_results_json(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write the records as a JSON list.

    :param records: the records
    :param path: the file (its folder is created)
    :return: the path
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(records), indent=2) + "\n")
    return path


def _fmt(value: float | None, digits: int = 3) -> str:
    """Format a number for the table (``-`` when missing).

    :param value: the number
    :param digits: decimals
    :return: the text
    """
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_ci(record: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """Format ``value [lo, hi]``.

    :param record: a record
    :param key: the metric
    :param digits: decimals
    :return: the text
    """
    lo, hi = record.get(f"{key}_ci95", [None, None])
    interval = "" if lo is None or hi is None else f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return _fmt(record.get(key), digits) + interval


def headline_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records the tables and the plot show: the pooled ones when several runs were evaluated.

    :param records: all records
    :return: the pooled records, or all when there are none
    """
    pooled = [r for r in records if r.get("run") == POOLED]
    return pooled or list(records)


def verdict_lines(records: Sequence[Mapping[str, Any]], reconstructor: str = "reference") -> list[str]:
    """One line per rate: the best baseline, the policy's paired difference to it and its interval.

    :param records: the records (pooled ones are used when present)
    :param reconstructor: the scoring reconstructor of the verdict
    :return: markdown bullet lines (empty without a policy)
    """
    rows = [r for r in headline_records(records) if r["reconstructor"] == reconstructor]
    lines = []
    for rate in sorted({r["requested_mask_rate"] for r in rows}):
        at = [r for r in rows if r["requested_mask_rate"] == rate]
        policy = next((r for r in at if r["method"] == POLICY), None)
        baselines = [r for r in at if r["method"] not in (*RUN_METHODS, SEARCH) and r["bits_per_masked_token"] is not None]
        if policy is None or not baselines:
            continue
        best = min(baselines, key=lambda r: r["bits_per_masked_token"])
        diff = best.get("policy_minus_method_bits_per_masked_token")
        lo, hi = best.get("policy_minus_method_bits_per_masked_token_ci95") or [None, None]
        if diff is None or lo is None or hi is None:
            verdict = f"no interval ({best.get('documents', '?')} document(s))"
        elif hi < 0:
            verdict = "interval excludes 0: the policy is better"
        elif lo > 0:
            verdict = "interval excludes 0: the policy is worse"
        else:
            verdict = "interval includes 0: no detectable difference"
        line = (
            f"- **rate {rate:.2f}**: best baseline `{best['method']}` ({_fmt(best['bits_per_masked_token'])} bits); "
            f"policy {_fmt(policy['bits_per_masked_token'])}; policy − {best['method']} = {_fmt(diff)} bits per dropped token "
            f"[{_fmt(lo)}, {_fmt(hi)}], {verdict}."
        )
        search = next((r for r in at if r["method"] == SEARCH), None)
        if search is not None and search.get("policy_to_search_ratio") is not None:
            best_there = search.get("best_baseline_same_windows")
            line += (
                f" Search bound on {search['windows']} windows: {_fmt(search['bits_per_masked_token'])} bits "
                f"(policy {_fmt(search['policy_bits_per_masked_token_same_windows'])} there, ratio {search['policy_to_search_ratio']:.2f}"
                + (
                    f"; best baseline there `{best_there}` {_fmt(search['best_baseline_bits_per_masked_token_same_windows'])})."
                    if best_there
                    else ")."
                )
            )
        lines.append(line)
    return lines


def results_markdown(records: Sequence[Mapping[str, Any]], title: str = "Results", preamble: str = "") -> str:
    """Markdown: verdict lines, then per reconstructor the main table, the downstream table, and per-seed figures.

    :param records: the records
    :param title: heading of the document
    :param preamble: text placed after the verdict lines (data, split, runs, command)
    :return: the markdown text
    """
    lines = [f"# {title}", ""]
    verdicts = verdict_lines(records)
    if verdicts:
        lines += ["Verdict (reference reconstructor; lower bits are better; paired bootstrap over documents):", "", *verdicts, ""]
    if preamble:
        lines += [preamble.strip(), ""]
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    shown = headline_records(records)
    several = any(r.get("run") == POOLED for r in records)
    for rec_name in dict.fromkeys(r["reconstructor"] for r in shown):
        rows = sorted(
            (r for r in shown if r["reconstructor"] == rec_name),
            key=lambda r: (r["requested_mask_rate"], order.get(r["method"], 99), r["method"]),
        )
        lines += [
            f"## Reconstructor: {rec_name}{' (pooled over runs)' if several else ''}",
            "",
            "| method | requested rate | achieved rate | bits / masked token [95% CI] | policy − method [95% CI] "
            "| + position bits | masked-token accuracy [95% CI] | token recovery [95% CI] | windows | tokens/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            tps = r["tokens_per_second"]
            name = f"{r['method']} (bound)" if r["method"] == SEARCH else r["method"]
            lines.append(
                f"| {name} | {r['requested_mask_rate']:.2f} | {_fmt(r['achieved_mask_rate'])} "
                f"| {_fmt_ci(r, 'bits_per_masked_token')} | {_fmt_ci(r, 'policy_minus_method_bits_per_masked_token')} "
                f"| {_fmt(r.get('bits_per_masked_token_with_positions'))} "
                f"| {_fmt_ci(r, 'masked_token_accuracy')} | {_fmt_ci(r, 'token_recovery')} | {r.get('windows', '-')} "
                f"| {'-' if tps is None else f'{tps:,.0f}'} |"
            )
        lines.append("")
        if any(r.get("continuation_bits_deleted") is not None for r in rows):
            first = next(r for r in rows if r.get("continuation_bits_deleted") is not None)
            lines += [
                f"### Downstream reading ({first.get('downstream_lm', 'downstream LM')}; "
                f"{first.get('continuation_tokens', '?')} continuation tokens after at most "
                f"{first.get('downstream_context', '?')} context tokens; "
                f"{first['continuation_windows']} windows with a continuation, {first['continuation_windows_skipped']} skipped)",
                "",
                "| method | requested rate | full window | deleted | placeholders | no window | context kept [95% CI] "
                "| context kept with placeholders |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in rows:
                if r.get("continuation_bits_deleted") is None:
                    continue
                lines.append(
                    f"| {r['method']} | {r['requested_mask_rate']:.2f} | {_fmt(r['continuation_bits_full'])} "
                    f"| {_fmt(r['continuation_bits_deleted'])} | {_fmt(r['continuation_bits_placeholder'])} "
                    f"| {_fmt(r['continuation_bits_none'])} | {_fmt_ci(r, 'context_kept')} | {_fmt(r['context_kept_with_placeholders'])} |"
                )
            lines.append("")
        if several:
            lines += [
                f"### Per seed ({rec_name}): bits per masked token, and mean ± std across seeds",
                "",
                "| method | requested rate | per seed | mean ± std | policy − method per seed |",
                "|---|---:|---|---:|---|",
            ]
            for r in rows:
                per_seed = ", ".join(_fmt(v) for v in r.get("bits_per_masked_token_per_seed", []))
                diffs = ", ".join(_fmt(v) for v in r.get("policy_minus_method_bits_per_masked_token_per_seed", []))
                std = r.get("bits_per_masked_token_seed_std")
                lines.append(
                    f"| {r['method']} | {r['requested_mask_rate']:.2f} | {per_seed} "
                    f"| {_fmt(r.get('bits_per_masked_token_seed_mean'))} ± {_fmt(std)} | {diffs} |"
                )
            lines.append("")
    return "\n".join(lines)


def write_results_markdown(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = "Results", preamble: str = "") -> Path:
    """Write :func:`results_markdown` to a file.

    :param records: the records
    :param path: the file
    :param title: heading
    :param preamble: text placed under the verdict lines (data, split, runs, command)
    :return: the path
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(results_markdown(records, title, preamble))
    return path


def plot_rate_distortion(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Plot bits per masked token against achieved mask rate, one line per method with its 95% band.

    One panel per reconstructor (the pooled records when several runs were evaluated); the search is
    drawn as a dashed black bound. Uses matplotlib's non-interactive Agg backend.

    :param records: the records
    :param path: the PNG file
    :param title: figure title
    :return: the path
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = headline_records(records)
    rec_names = list(dict.fromkeys(r["reconstructor"] for r in records)) or ["reference"]
    fig, axes = plt.subplots(1, len(rec_names), figsize=(6.5 * len(rec_names), 4.5), squeeze=False, sharey=True)
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    for ax, rec_name in zip(axes[0], rec_names, strict=True):
        rows = [r for r in records if r["reconstructor"] == rec_name]
        for method in sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: (order.get(m, 99), m)):
            pts = sorted(
                (r for r in rows if r["method"] == method and r["bits_per_masked_token"] is not None), key=lambda r: r["achieved_mask_rate"]
            )
            if not pts:
                continue
            x = np.array([p["achieved_mask_rate"] for p in pts], dtype=float)
            y = np.array([p["bits_per_masked_token"] for p in pts], dtype=float)
            ci = np.array(
                [[np.nan if v is None else v for v in p.get("bits_per_masked_token_ci95", [None, None])] for p in pts], dtype=float
            )
            style: dict[str, Any] = {"linewidth": 2.5, "zorder": 3} if method == POLICY else {"linewidth": 1.5}
            label = method
            if method == SEARCH:
                style = {"linewidth": 1.5, "linestyle": "--", "color": "black", "zorder": 4}
                label = f"search bound ({pts[0].get('windows', '?')} windows)"
            (line,) = ax.plot(x, y, marker="x" if method == SEARCH else "o", label=label, **style)
            if np.isfinite(ci).all():
                ax.fill_between(x, ci[:, 0], ci[:, 1], color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(f"reconstructor: {rec_name}")
        ax.set_xlabel("mask rate (fraction of tokens dropped)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("bits per masked token (lower is better)")
    axes[0][-1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
