"""Evaluation of masking methods at matched mask rates: metrics, bootstrap intervals, tables and plots.

For each method and requested rate the method's masks are computed once (timed: that is the
compressor's throughput) and then scored by every reconstructor given (the frozen ``reference`` one,
the primary table, and the jointly trained ``joint`` one) with :meth:`Reconstructor.score`. Per window
the evaluation keeps the sums it needs, so every metric is a ratio of sums over windows, and its 95 %
interval is a percentile bootstrap over windows (resampled with a seeded NumPy generator):

* ``achieved_mask_rate``: dropped tokens / real tokens;
* ``bits_per_masked_token``: surprisal of the dropped tokens given the compressed prefix / dropped tokens;
* ``masked_token_accuracy``: dropped tokens whose top guess is right / dropped tokens;
* ``token_recovery``: (kept tokens + correctly recovered dropped tokens) / real tokens;
* ``tokens_per_second``: real tokens / seconds spent computing the masks (scoring excluded).

Writers: :func:`write_results_json` (``results.json``, a list of records), :func:`write_results_markdown`
(``results.md``) and :func:`plot_rate_distortion` (``rate_distortion.png``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokencompress_env.baselines import BASELINE_NAMES, POLICY, MaskMethod, MethodContext
from tokencompress_env.errors import InputError
from tokencompress_env.reconstructor import Reconstructor

#: Names of the two scoring reconstructors.
RECONSTRUCTOR_NAMES = ("reference", "joint")

#: All method names, in report order.
METHOD_NAMES = (POLICY, *BASELINE_NAMES)

#: Metrics with a bootstrap interval (record field ``<metric>_ci95``).
INTERVAL_METRICS = ("achieved_mask_rate", "bits_per_masked_token", "masked_token_accuracy", "token_recovery")

#: Fields of every record, in order (plus ``<metric>_ci95`` for each of :data:`INTERVAL_METRICS`).
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


@dataclass
class WindowStats:
    """Per-window sums from which every metric is a ratio; ``[N]`` arrays.

    :param masked_bits: surprisal (bits) summed over the dropped tokens
    :param masked: dropped tokens
    :param masked_correct: dropped tokens whose top guess is right
    :param valid: real tokens
    """

    masked_bits: np.ndarray
    masked: np.ndarray
    masked_correct: np.ndarray
    valid: np.ndarray

    def ratios(self, index: np.ndarray | slice = slice(None)) -> dict[str, np.ndarray | float]:
        """The metrics as ratios of sums over the selected windows (along the last axis).

        :param index: windows to use; a ``[B, N]`` integer array gives ``B`` bootstrap replicates
        :return: metric name -> value (or ``[B]`` values)
        """
        bits, masked = self.masked_bits[index].sum(axis=-1), self.masked[index].sum(axis=-1)
        correct, valid = self.masked_correct[index].sum(axis=-1), self.valid[index].sum(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return {
                "achieved_mask_rate": masked / valid,
                "bits_per_masked_token": bits / masked,
                "masked_token_accuracy": correct / masked,
                "token_recovery": (valid - masked + correct) / valid,
            }


def score_masks(
    reconstructor: Reconstructor, input_ids: np.ndarray, masks: np.ndarray, valid: np.ndarray | None = None, batch_size: int = 64
) -> WindowStats:
    """Score masks with a reconstructor (:meth:`Reconstructor.score`) and keep the per-window sums.

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
    return stats


def bootstrap_intervals(stats: WindowStats, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every metric, resampling windows with replacement.

    :param stats: per-window sums
    :param n_boot: bootstrap replicates
    :param seed: seed of the resampling
    :param level: coverage of the interval
    :return: metric name -> ``(low, high)`` (NaN where undefined)
    """
    n = len(stats.valid)
    if n == 0 or n_boot <= 0:
        return {k: (math.nan, math.nan) for k in INTERVAL_METRICS}
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(n_boot, n))
    replicates = stats.ratios(index)
    tail = 100 * (1 - level) / 2
    out: dict[str, tuple[float, float]] = {}
    for key in INTERVAL_METRICS:
        values = np.asarray(replicates[key], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[key] = (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))) if len(values) else (math.nan, math.nan)
    return out


def _clean(value: float) -> float | None:
    """A float for JSON: ``None`` instead of NaN or infinity.

    :param value: the value
    :return: the value or ``None``
    """
    value = float(value)
    return value if math.isfinite(value) else None


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
    """Run one method at every rate and score its masks with every reconstructor.

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
    n_tokens = int(valid_np.sum())
    records: list[dict[str, Any]] = []
    for rate in rates:
        start = time.perf_counter()
        masks = np.asarray(method(ids, float(rate), context, valid=valid_np, force_keep=force_keep), dtype=bool)
        elapsed = time.perf_counter() - start
        if masks.shape != ids.shape:
            raise InputError(f"method '{name}' returned masks of shape {masks.shape}, expected {ids.shape}")
        for rec_name, reconstructor in reconstructors.items():
            stats = score_masks(reconstructor, ids, masks, valid_np, batch_size)
            point = stats.ratios()
            ci = bootstrap_intervals(stats, n_boot, seed)
            record: dict[str, Any] = {
                "method": name,
                "reconstructor": rec_name,
                "requested_mask_rate": float(rate),
                **{k: _clean(float(point[k])) for k in INTERVAL_METRICS},
                "tokens_per_second": _clean(n_tokens / elapsed) if elapsed > 0 else None,
            }
            record = {k: record[k] for k in RECORD_FIELDS}
            record.update({f"{k}_ci95": [_clean(lo), _clean(hi)] for k, (lo, hi) in ci.items()})
            record["windows"] = len(ids)
            record["tokens"] = n_tokens
            records.append(record)
    return records


def evaluate(
    methods: Mapping[str, MaskMethod],
    input_ids: np.ndarray,
    reconstructors: Mapping[str, Reconstructor],
    rates: Sequence[float],
    context: MethodContext,
    valid: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate several methods at several rates with several reconstructors.

    :param methods: name -> masking function
    :param input_ids: ``[N, L]`` windows
    :param reconstructors: name -> scoring reconstructor
    :param rates: requested mask rates
    :param context: what the methods may use
    :param valid: ``[N, L]`` real positions (``None``: all)
    :param n_boot: bootstrap replicates
    :param seed: seed of the bootstrap
    :param batch_size: windows per scoring forward pass
    :param progress: print one line per method
    :return: all records
    """
    records: list[dict[str, Any]] = []
    for name, method in methods.items():
        start = time.perf_counter()
        records.extend(evaluate_method(name, method, input_ids, reconstructors, rates, context, valid, None, n_boot, seed, batch_size))
        if progress:
            print(f"  {name}: {time.perf_counter() - start:.1f}s", flush=True)
    return records


# ---------------------------------------------------------------------------- writers
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
    return _fmt(record[key], digits) + interval


def results_markdown(records: Sequence[Mapping[str, Any]], title: str = "Results") -> str:
    """Markdown tables, one per reconstructor, rows sorted by rate then method.

    :param records: the records
    :param title: heading of the document
    :return: the markdown text
    """
    lines = [f"# {title}", ""]
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    for rec_name in dict.fromkeys(r["reconstructor"] for r in records):
        rows = sorted(
            (r for r in records if r["reconstructor"] == rec_name),
            key=lambda r: (r["requested_mask_rate"], order.get(r["method"], 99), r["method"]),
        )
        lines += [
            f"## Reconstructor: {rec_name}",
            "",
            "| method | requested rate | achieved rate | bits / masked token [95% CI] "
            "| masked-token accuracy [95% CI] | token recovery [95% CI] | tokens/s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            tps = r["tokens_per_second"]
            lines.append(
                f"| {r['method']} | {r['requested_mask_rate']:.2f} | {_fmt(r['achieved_mask_rate'])} "
                f"| {_fmt_ci(r, 'bits_per_masked_token')} | "
                f"{_fmt_ci(r, 'masked_token_accuracy')} | {_fmt_ci(r, 'token_recovery')} | {'-' if tps is None else f'{tps:,.0f}'} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_results_markdown(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = "Results", preamble: str = "") -> Path:
    """Write :func:`results_markdown` to a file.

    :param records: the records
    :param path: the file
    :param title: heading
    :param preamble: text placed under the heading (data, windows, command)
    :return: the path
    """
    text = results_markdown(records, title)
    if preamble:
        head, _, rest = text.partition("\n\n")
        text = f"{head}\n\n{preamble.strip()}\n\n{rest}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def plot_rate_distortion(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Plot bits per masked token against achieved mask rate, one line per method with its 95% band.

    One panel per reconstructor. Uses matplotlib's non-interactive Agg backend.

    :param records: the records
    :param path: the PNG file
    :param title: figure title
    :return: the path
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            style = {"linewidth": 2.5, "zorder": 3} if method == POLICY else {"linewidth": 1.5}
            (line,) = ax.plot(x, y, marker="o", label=method, **style)
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
