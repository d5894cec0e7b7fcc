"""The compression API: load a trained run and compress texts at an exact mask rate.

Example::

    from tokencompress_env import Compressor

    compressor = Compressor.load("runs/quickstart")
    result = compressor.compress("Some long text ...", mask_rate=0.4)
    print(result.text, result.achieved_mask_rate)
    print(compressor.reconstruct(result))  # the reconstructor's fill-in of the dropped tokens

How a text is compressed:

1. It is tokenised with the run's reconstructor tokenizer (no special tokens added) and cut into
   ``ceil(n / seq_len)`` consecutive windows of near-equal length (``seq_len``: the policy's window, from
   the run's ``config.json``); the last ones are right-padded. The windows of every text of a call go
   through the policy together, ``batch_size`` windows per forward pass.
2. Force-kept tokens: special tokens, tokens with a digit (``keep_digits``), and every token that
   overlaps an occurrence of a ``force_keep`` string in the text (matched on characters, so occurrences
   that cross a window boundary or start inside a word are found too).
3. The policy sees each window as TokenMask-v0 showed it in training, at the start of an episode
   (nothing decided yet, ``target_mask_rate`` = the requested rate, ``force_keep`` as above, and the
   ``surprisal`` feature when the run observed it) and returns one mask logit per token
   (:func:`window_mask_logits`, the one place that turns windows into policy logits; the evaluation uses
   it too, through :func:`agent_logit_fn`).
4. Exact rate control: in each window of ``n_w`` tokens, the ``min(round_half_up(rate * n_w),
   maskable)`` maskable tokens with the highest logits are dropped (the project's one rate rule,
   :func:`~tokencompress_env.baselines.rate_budget`, and the ranking step of
   :mod:`tokencompress_env.baselines`, :func:`~tokencompress_env.baselines.budget_mask`, that
   :func:`~tokencompress_env.baselines.logits_to_mask` also uses). The mask rate is the fraction of the
   text's tokens removed, as in the environment; this is exactly ``logits_to_mask``. With
   ``target_tokens=N`` the ``n - N`` drops are spread over the windows in
   proportion to their maskable tokens, so the compressed text has exactly ``N`` tokens whenever the
   force-kept tokens allow it.
5. Units (:mod:`tokencompress_env.units`): tokens are dropped in whole units, ``"piece"`` (whole
   characters, so the output is always valid text made of the input's characters) or ``"word"``; a
   unit is ranked by its tokens' mean logit, a unit with a force-kept token or cut by a window boundary
   is kept, and the budget is met as closely as whole units allow (exactly with single-token units).
   The kept tokens are decoded byte for byte (:func:`~tokencompress_env.units.decode_ids`).

Cost: one pass of the small policy network over the windows (its inference path: no observation dicts, no
value head; ``matmul_dtype="bfloat16"`` runs its matrix products in bfloat16, opt-in). ``stage_seconds``
of ``experiments.benchmark_compress`` (:attr:`Compressor.last_stage_seconds`) says where the time goes.
**If the run observed surprisal** (``observe_surprisal`` in its config), the policy needs the
reconstructor's surprisal of the original tokens, so :meth:`Compressor.compress` also runs one
reconstructor forward pass per window and is about as slow as self-information scoring.
"""

from __future__ import annotations

import math
import numbers
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokencompress_env.baselines import LogitFn, MaskMethod, budget_mask, mask_budget, rate_budget, segment_budgets
from tokencompress_env.env import force_keep_token_table
from tokencompress_env.errors import CheckpointError, ConfigError, InputError, ReconstructorLoadError
from tokencompress_env.observation import MAX_SURPRISAL_BITS, SURPRISAL, Decision, build_observation
from tokencompress_env.reconstructor import Reconstructor
from tokencompress_env.run_loading import load_run
from tokencompress_env.units import check_units, decode_ids, spread_to_units, unit_starts

#: Default mask rate when neither ``mask_rate`` nor ``target_tokens`` is given.
DEFAULT_MASK_RATE = 0.4
#: Default units of :meth:`Compressor.compress` (see :mod:`tokencompress_env.units`). Whole words read better
#: but cost 1 to 1.6 more bits per dropped token at the same rate in the evaluation (README, "Compressing text").
DEFAULT_UNITS = "piece"
#: dtypes of the policy's matrix products at inference (:func:`window_mask_logits`, :class:`Compressor`):
#: ``"float32"`` is the trained network's arithmetic (the default: masks are those of the evaluation);
#: ``"bfloat16"`` is faster on CPUs with AVX512-BF16 or AMX (and GPUs) and changes a few masks (about 0.1% of
#: the dropped tokens on WikiText at rate 0.4, README "Speed").
MATMUL_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: Shortfall of the achieved mask rate, caused by whole units, above which the result carries a warning.
UNIT_SHORTFALL_WARNING = 0.02


# ---------------------------------------------------------------------------- force-keep
#: Force-keep tables by tokenizer object, then by ``(vocab_size, keep_digits)``. Keyed by the object itself
#: (weakly), not by ``id()``: the id of a tokenizer that was garbage-collected can be reused by another one.
_TABLES: weakref.WeakKeyDictionary[Any, dict[tuple[int, bool], np.ndarray]] = weakref.WeakKeyDictionary()


def _cached_table(reconstructor: Reconstructor, keep_digits: bool) -> np.ndarray:
    """The env's per-token-id force-keep flags (:func:`~tokencompress_env.env.force_keep_token_table`), once per tokenizer and flag.

    :param reconstructor: the reconstructor
    :param keep_digits: flag digits
    :return: ``[vocab]`` bool
    """
    tables = _TABLES.setdefault(reconstructor.tokenizer, {})
    key = (int(reconstructor.vocab_size), bool(keep_digits))
    if key not in tables:
        tables[key] = force_keep_token_table(reconstructor, keep_digits)
    return tables[key]


def _string_spans(text: str, strings: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of every occurrence (overlapping ones included) of each string in ``text``.

    :param text: the text
    :param strings: the strings to find
    :return: ``(start, end)`` spans
    """
    spans = []
    for s in strings:
        if not s:
            continue
        start = text.find(s)
        while start != -1:
            spans.append((start, start + len(s)))
            start = text.find(s, start + 1)
    return spans


# ---------------------------------------------------------------------------- policy logits (the one place)
def window_mask_logits(
    agent: Any,
    token_ids: np.ndarray,
    valid: np.ndarray,
    force_keep: np.ndarray,
    rate: float | np.ndarray,
    surprisal_reconstructor: Reconstructor | None = None,
    batch_size: int = 16,
    decisions: np.ndarray | None = None,
    matmul_dtype: str = "float32",
) -> np.ndarray:
    """Per-token mask logits of a trained agent for whole windows, from the observation it saw in training.

    Each window is shown as at the start of a TokenMask-v0 episode: nothing decided yet, ``position`` 0,
    ``target_mask_rate`` = ``rate``, ``force_keep`` as given, and, when the policy observes it, the
    ``surprisal`` of the original tokens under ``surprisal_reconstructor`` (clipped to ``[0, 64]`` bits,
    as the environment does: one reconstructor forward pass per window). The policy's
    ``token_mask_logits`` (agents package) gives one logit per position, ``-inf`` at padding and
    force-kept positions. Batched: ``batch_size`` windows per forward pass, under ``torch.inference_mode``.

    Policies of the agents package with an inference path (feed-forward, local-context extractor:
    ``has_inference_path``) are run through ``inference_mask_logits``, which computes the same logits
    (bitwise, in float32 on a CPU) without building observation dicts, SB3 preprocessing or the value
    head; other policies through ``token_mask_logits`` on the observation of
    :func:`~tokencompress_env.observation.build_observation`.

    :param agent: a :class:`agents.artifact.PolicyArtifact` (or an SB3 model) whose policy has ``token_mask_logits``
    :param token_ids: ``[N, seq_len]`` ids (padding id at padding)
    :param valid: ``[N, seq_len]`` real positions
    :param force_keep: ``[N, seq_len]`` force-kept positions
    :param rate: target mask rate, one for all windows or ``[N]`` per window
    :param surprisal_reconstructor: the reconstructor whose surprisal the policy observed (required
        when the policy's observation space has ``surprisal``)
    :param batch_size: windows per policy forward pass
    :param decisions: ``[N, seq_len]`` decisions taken so far (:class:`~tokencompress_env.observation.Decision`), for a
        policy that sees its earlier decisions (``use_decisions``); ``None``: nothing decided
    :param matmul_dtype: ``"float32"`` (the trained network's arithmetic) or ``"bfloat16"`` (the policy's
        matrix products in bfloat16 on the inference path: about 1.5x faster on CPUs with AVX512-BF16 or
        AMX, logits within about 0.05 of float32's; see :data:`MATMUL_DTYPES`)
    :return: ``[N, seq_len]`` float32 mask logits (higher = drop first)
    """
    policy = agent.policy
    space = agent.observation_space
    keys = list(space.spaces)
    ids = np.asarray(token_ids, dtype=np.int64)
    seq_len = int(space["token_ids"].shape[0])
    if ids.ndim != 2 or ids.shape[1] != seq_len:
        raise InputError(f"the policy was trained on {seq_len}-token windows, got windows of shape {ids.shape}")
    n = ids.shape[0]
    rates = np.array(np.broadcast_to(np.asarray(rate, dtype=np.float32).reshape(-1), (n,)), dtype=np.float32)
    observes_surprisal = SURPRISAL in keys
    if observes_surprisal and surprisal_reconstructor is None:
        raise InputError("this policy observes the reconstructor's surprisal: pass surprisal_reconstructor")
    if matmul_dtype not in MATMUL_DTYPES:
        raise InputError(f"matmul_dtype must be one of {sorted(MATMUL_DTYPES)}, got {matmul_dtype!r}")
    device = policy.device
    out = np.empty(ids.shape, dtype=np.float32)
    policy.set_training_mode(False)
    fast = bool(getattr(policy, "has_inference_path", False))
    if not fast and matmul_dtype != "float32":
        raise InputError(f"matmul_dtype={matmul_dtype!r} needs a feed-forward policy of the agents package (has_inference_path)")
    with torch.inference_mode():
        if fast:
            all_ids = torch.from_numpy(ids).to(device)
            all_valid = torch.from_numpy(np.ascontiguousarray(valid, dtype=bool)).to(device)
            all_keep = torch.from_numpy(np.ascontiguousarray(force_keep, dtype=bool)).to(device)
            all_rates = torch.from_numpy(rates).to(device)
            all_decisions = None if decisions is None else torch.from_numpy(np.asarray(decisions, dtype=np.int64)).to(device)
        for start in range(0, n, max(1, batch_size)):
            sl = slice(start, min(start + batch_size, n))
            valid_np = np.asarray(valid[sl], dtype=bool)
            bits = None
            if surprisal_reconstructor is not None and observes_surprisal:
                bits = surprisal_reconstructor.surprisal(ids[sl], valid_np).float().cpu().numpy()
            if fast:
                clipped = None if bits is None else torch.from_numpy(np.clip(bits.astype(np.float32), 0.0, MAX_SURPRISAL_BITS)).to(device)
                logits = policy.inference_mask_logits(
                    all_ids[sl],
                    all_valid[sl],
                    all_keep[sl],
                    all_rates[sl],
                    clipped,
                    None if all_decisions is None else all_decisions[sl],
                    matmul_dtype=MATMUL_DTYPES[matmul_dtype],
                )
                out[sl] = logits.cpu().numpy()
                continue
            built = build_observation(ids[sl], valid_np, force_keep[sl], rates[sl], bits, None if decisions is None else decisions[sl])
            obs = {k: torch.from_numpy(v).to(device) for k, v in built.items()}
            missing = [k for k in keys if k not in obs]
            if missing:
                raise InputError(f"the policy expects observation keys {missing} that TokenMask-v0 does not provide")
            out[sl] = policy.token_mask_logits({k: obs[k] for k in keys}).float().cpu().numpy()
    return out


def agent_logit_fn(agent: Any, reconstructor: Reconstructor, batch_size: int = 64, keep_digits: bool = False) -> LogitFn:
    """The agent as a :data:`~tokencompress_env.baselines.LogitFn` for the evaluation (see :func:`window_mask_logits`).

    The ``force_keep`` observation follows the training environment's rule (special tokens, and digits
    when the run was trained with ``keep_digits``).

    :param agent: a :class:`agents.artifact.PolicyArtifact` (or an SB3 model) whose policy has ``token_mask_logits``
    :param reconstructor: the run's reconstructor: its tokenizer defines the special tokens, and its
        surprisal is the policy's ``surprisal`` feature when observed
    :param batch_size: windows per policy forward pass
    :param keep_digits: the run's ``keep_digits`` setting
    :return: ``(input_ids, valid, rate) -> logits``
    """

    def logits(input_ids: np.ndarray, valid: np.ndarray, rate: float) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        valid_np = np.asarray(valid, dtype=bool)
        table = _cached_table(reconstructor, keep_digits)
        keep = table[np.clip(ids, 0, table.shape[0] - 1)] & valid_np
        return window_mask_logits(agent, ids, valid_np, keep, rate, reconstructor, batch_size).astype(np.float64)

    return logits


def agent_sequential_method(agent: Any, reconstructor: Reconstructor, batch_size: int = 64, keep_digits: bool = False) -> MaskMethod:
    """The agent as a :class:`~tokencompress_env.baselines.MaskMethod` that decides chunk by chunk, as in an episode.

    For a policy that sees its earlier decisions (``use_decisions``), one forward pass over a window with
    nothing decided is not what it acted on in training. This method replays the episode: for each chunk
    of ``chunk_size`` tokens (the action size), the policy's logits are computed with the decisions of the
    chunks before it, and the chunk's share of the window's budget (spread over chunks in proportion to
    their maskable tokens, :func:`~tokencompress_env.baselines.segment_budgets`) goes to its highest
    logits. The rate is exact per window, as for every method; the cost is one policy pass per chunk.

    :param agent: an SB3 model whose policy has ``token_mask_logits`` (agents package)
    :param reconstructor: the run's reconstructor (special tokens, and the ``surprisal`` feature when observed)
    :param batch_size: windows per policy forward pass
    :param keep_digits: the run's ``keep_digits`` setting
    :return: the masking method
    """
    chunk = int(agent.action_space.n)

    def method(
        input_ids: np.ndarray, rate: float, context: Any, valid: np.ndarray | None = None, force_keep: np.ndarray | None = None
    ) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        valid_np = np.ones(ids.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        table = _cached_table(reconstructor, keep_digits)
        keep = table[np.clip(ids, 0, table.shape[0] - 1)] & valid_np
        if force_keep is not None:
            keep |= np.asarray(force_keep, dtype=bool)
        maskable = valid_np & ~keep
        budgets = segment_budgets(maskable, rate_budget(rate, valid_np, maskable), chunk)
        decisions = np.zeros(ids.shape, dtype=np.int64)
        masks = np.zeros(ids.shape, dtype=bool)
        for s, start in enumerate(range(0, ids.shape[1], chunk)):
            cols = slice(start, min(start + chunk, ids.shape[1]))
            logits = window_mask_logits(agent, ids, valid_np, keep, rate, reconstructor, batch_size, decisions=decisions)
            masks[:, cols] = budget_mask(logits[:, cols].astype(np.float64), budgets[:, s], maskable[:, cols])
            decisions[:, cols] = np.where(masks[:, cols], Decision.MASKED, np.where(valid_np[:, cols], Decision.KEPT, Decision.UNDECIDED))
        return masks

    return method


# ---------------------------------------------------------------------------- windows
def window_bounds(n_tokens: int, seq_len: int) -> np.ndarray:
    """Cut ``n_tokens`` into ``ceil(n / seq_len)`` consecutive windows of near-equal length.

    :param n_tokens: tokens of the text (at least 1)
    :param seq_len: the longest window
    :return: ``[W + 1]`` int64 boundaries (window ``w`` is ``[b[w], b[w+1])``)
    """
    n_windows = max(1, math.ceil(n_tokens / seq_len))
    base, extra = divmod(n_tokens, n_windows)
    sizes = np.full(n_windows, base, dtype=np.int64)
    sizes[:extra] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


# ---------------------------------------------------------------------------- results
class TokenCounts:
    """Token counts of a batch of texts, computed on first use (all texts in one tokenizer call).

    :param count: texts -> their token counts
    :param texts: the texts
    """

    def __init__(self, count: Callable[[Sequence[str]], list[int]], texts: Sequence[str]) -> None:
        self._count: Callable[[Sequence[str]], list[int]] | None = count
        self._texts: Sequence[str] | None = texts
        self._values: list[int] | None = None

    def __getitem__(self, i: int) -> int:
        """The count of text ``i`` (tokenising all texts the first time).

        :param i: the text's index
        :return: its token count
        """
        if self._values is None:
            assert self._count is not None and self._texts is not None
            self._values = self._count(self._texts)
            self._count = self._texts = None  # free the texts
        return self._values[i]


@dataclass
class PendingCount:
    """A token count not computed yet: entry ``index`` of ``counts``.

    :param counts: the batch's counts
    :param index: which text
    """

    counts: TokenCounts
    index: int


class _LazyCount:
    """A dataclass field descriptor whose value may be a :class:`PendingCount`, resolved (once) when read."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = "_lazy_" + name

    def __get__(self, obj: Any, objtype: type | None = None) -> int | None:
        if obj is None:
            return None  # the field's default
        value = obj.__dict__.get(self._slot)
        if isinstance(value, PendingCount):
            value = value.counts[value.index]
            obj.__dict__[self._slot] = value
        return value

    def __set__(self, obj: Any, value: int | PendingCount | None) -> None:
        obj.__dict__[self._slot] = value


@dataclass
class CompressionResult:
    """One compressed text.

    :param text: the compressed text (the kept tokens decoded)
    :param ids: ``[compressed_tokens]`` ids of the kept tokens
    :param kept_mask: ``[origin_tokens]`` bool, ``True`` where the original token is **kept**: the complement
        of every other mask of the project (the env's actions, the baselines' masks, the reconstructor's
        ``mask``), which are ``True`` where a token is dropped; :attr:`dropped_mask` is that one
    :param origin_ids: ``[origin_tokens]`` ids of the original text
    :param origin_tokens: tokens of the original text
    :param compressed_tokens: tokens kept
    :param requested_mask_rate: the requested fraction of tokens to remove (with ``target_tokens``:
        ``1 - target_tokens / origin_tokens``)
    :param achieved_mask_rate: the fraction actually removed, over the whole text
    :param target_tokens: the requested compressed length, when given
    :param windows: policy windows the text was cut into
    :param force_kept: ``[origin_tokens]`` bool, tokens that could not be dropped
    :param placeholder: the string that marks each run of dropped tokens in ``text`` (``None``: the
        dropped tokens are deleted without a trace)
    :param units: what was dropped or kept together: ``"piece"`` (whole characters) or ``"word"``
    :param text_tokens: tokens of ``text`` when tokenised again (BPE may merge the kept tokens
        differently; at most ``origin_tokens``). :meth:`Compressor.compress` passes a
        :class:`PendingCount`: the texts of a call are tokenised again, together, the first time one of
        their ``text_tokens`` is read, so a caller that never reads it does not pay for it
    :param warning: why the achieved rate falls short of the request (force-kept tokens, or whole units
        short by more than :data:`UNIT_SHORTFALL_WARNING`), else ``None``
    """

    text: str
    ids: np.ndarray
    kept_mask: np.ndarray
    origin_ids: np.ndarray
    origin_tokens: int
    compressed_tokens: int
    requested_mask_rate: float
    achieved_mask_rate: float
    target_tokens: int | None = None
    windows: int = 1
    force_kept: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    placeholder: str | None = None
    units: str = DEFAULT_UNITS
    text_tokens: _LazyCount = _LazyCount()
    warning: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        """The state for pickling and copying, with the token count computed (not the compressor behind it).

        :return: the attributes
        """
        _ = self.text_tokens
        return dict(self.__dict__)

    @property
    def dropped_mask(self) -> np.ndarray:
        """Where the original tokens were dropped: the project's usual mask, the complement of :attr:`kept_mask`.

        :return: ``[origin_tokens]`` bool, ``True`` where the original token is dropped
        """
        return ~np.asarray(self.kept_mask, dtype=bool)

    def to_dict(self, arrays: bool = True) -> dict[str, Any]:
        """The fields as JSON-ready values.

        :param arrays: include the id and mask arrays (as lists)
        :return: the dict
        """
        out: dict[str, Any] = {
            "text": self.text,
            "origin_tokens": self.origin_tokens,
            "compressed_tokens": self.compressed_tokens,
            "requested_mask_rate": self.requested_mask_rate,
            "achieved_mask_rate": self.achieved_mask_rate,
            "target_tokens": self.target_tokens,
            "windows": self.windows,
            "placeholder": self.placeholder,
            "units": self.units,
            "text_tokens": self.text_tokens,
            "warning": self.warning,
        }
        if arrays:
            out["ids"] = self.ids.tolist()
            out["kept_mask"] = self.kept_mask.astype(int).tolist()
        return out


def text_with_placeholders(tokenizer: Any, ids: np.ndarray, kept: np.ndarray, placeholder: str) -> str:
    """Decode a compressed text with ``placeholder`` in place of each run of consecutive dropped tokens.

    Each run of kept tokens is decoded on its own, so a reader sees where (but not how much) text was dropped.

    :param tokenizer: the tokenizer
    :param ids: ``[n]`` ids of the original text
    :param kept: ``[n]`` bool, ``True`` where a token is kept
    :param placeholder: the marker of a dropped run
    :return: the text
    """
    dropped = ~np.asarray(kept, dtype=bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], dropped.astype(np.int8), [0]])))
    parts, start = [], 0
    for run_start, run_end in zip(edges[::2], edges[1::2], strict=True):
        parts.append(decode_ids(tokenizer, ids[start:run_start]))
        start = run_end
    parts.append(decode_ids(tokenizer, ids[start:]))
    return placeholder.join(parts)


# ---------------------------------------------------------------------------- the compressor
class _Stages:
    """A stopwatch that adds the time since the last lap to a named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Close a stage.

        :param name: the stage that just ended
        """
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


class Compressor:
    """A trained compression policy with its reconstructor, ready to compress texts.

    Build it with :meth:`load`. See the module docstring for how texts are compressed.

    :param agent: the trained policy: an :class:`agents.artifact.PolicyArtifact` (or an SB3 model), whose
        ``policy`` has ``token_mask_logits`` and whose ``observation_space`` is TokenMask-v0's
    :param reconstructor: the run's jointly trained reconstructor (tokenizer, surprisal, fill-in)
    :param config: the run's ``config.json``
    :param reference_dir: the run's frozen reference reconstructor folder (loaded on first use)
    :param batch_size: windows per policy forward pass
    :param matmul_dtype: the policy's matrix products at inference, ``"float32"`` (default: the trained
        network's arithmetic) or ``"bfloat16"`` (faster on CPUs with AVX512-BF16 or AMX, a few masks
        differ; see :data:`MATMUL_DTYPES`)
    """

    def __init__(
        self,
        agent: Any,
        reconstructor: Reconstructor,
        config: dict[str, Any],
        reference_dir: Path | None = None,
        batch_size: int = 16,
        matmul_dtype: str = "float32",
    ) -> None:
        self.agent = agent
        self.reconstructor = reconstructor
        self.tokenizer = reconstructor.tokenizer
        self.config = config
        self.reference_dir = reference_dir
        self._reference: Reconstructor | None = None
        self.batch_size = int(batch_size)
        if matmul_dtype not in MATMUL_DTYPES:
            raise ConfigError(f"matmul_dtype must be one of {sorted(MATMUL_DTYPES)}, got {matmul_dtype!r}")
        self.matmul_dtype = matmul_dtype
        #: Seconds spent in each stage of the last :meth:`compress` call (tokenize, units, windows, budgets,
        #: policy, ranking, decode, results), for profiling.
        self.last_stage_seconds: dict[str, float] = {}
        space = agent.observation_space
        self.seq_len = int(space["token_ids"].shape[0])
        self.observe_surprisal = "surprisal" in space.spaces
        self.keep_digits = bool(config.get("keep_digits", False))
        if self.seq_len > reconstructor.max_seq_len:
            raise CheckpointError(
                f"the policy's {self.seq_len}-token window exceeds the reconstructor's context of {reconstructor.max_seq_len}"
            )

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto", batch_size: int = 16, matmul_dtype: str = "float32") -> Compressor:
        """Load a run folder written by ``experiments.train_ppo`` (or its ``checkpoints/latest`` folder).

        Needs ``config.json``, ``policy.safetensors`` + ``policy.json`` (the policy, rebuilt without
        unpickling anything: :mod:`agents.artifact`) and ``reconstructor/`` (the jointly trained
        reconstructor, safetensors); ``reference_reconstructor/`` is only needed for
        ``reconstruct(..., reference=True)``. ``agent.zip`` (a pickle) is never read. The folder is read
        by :func:`tokencompress_env.run_loading.load_run`.

        :param run_dir: the run folder
        :param device: ``"auto"`` (CUDA, MPS or CPU), ``"cpu"``, ``"cuda"``, ...
        :param batch_size: windows per policy forward pass
        :param matmul_dtype: the policy's matrix products, ``"float32"`` or ``"bfloat16"`` (see :class:`Compressor`)
        :return: the compressor
        :raises CheckpointError: when the folder is missing, incomplete or corrupt (the message says
            what is missing; a :class:`TokenCompressError`)
        """
        run = load_run(run_dir, device, strict=True)
        config, reconstructor, agent = run.config, run.joint, run.agent
        assert reconstructor is not None and agent is not None  # strict: required
        space = agent.observation_space
        seq_len = int(space["token_ids"].shape[0])
        if "seq_len" in config and int(config["seq_len"]) != seq_len:
            raise CheckpointError(f"config.json says seq_len={config['seq_len']} but the agent was trained on {seq_len}-token windows")
        if bool(config.get("observe_surprisal", False)) != ("surprisal" in space.spaces):
            raise CheckpointError("config.json's observe_surprisal does not match the agent's observation space")
        vocab = int(space["token_ids"].high.max()) + 1
        if vocab != reconstructor.vocab_size:
            raise CheckpointError(f"the agent's vocabulary ({vocab}) differs from the reconstructor's ({reconstructor.vocab_size})")
        return cls(agent, reconstructor, config, run.reference_dir, batch_size, matmul_dtype)

    @property
    def reference(self) -> Reconstructor:
        """The run's frozen reference reconstructor (loaded on first use).

        :return: the reconstructor
        """
        if self._reference is None:
            if self.reference_dir is None:
                raise ReconstructorLoadError("this run folder has no reference_reconstructor/")
            self._reference = Reconstructor.from_pretrained(self.reference_dir, device=self.reconstructor.device)
        return self._reference

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_texts(text_or_texts: str | Sequence[str]) -> tuple[list[str], bool]:
        """Validate the input texts.

        :param text_or_texts: one text or a sequence of them
        :return: the texts and whether a single text was given
        """
        single = isinstance(text_or_texts, str)
        if not single and not isinstance(text_or_texts, Sequence):
            raise InputError(f"pass a text (str) or a list of texts, got {type(text_or_texts).__name__}")
        texts: list[Any] = [text_or_texts] if single else list(text_or_texts)
        if not texts:
            raise InputError("no text given: pass a non-empty string or a list of them")
        for i, t in enumerate(texts):
            where = "" if single else f" (text {i})"
            if not isinstance(t, str):
                raise InputError(f"texts must be strings, got {type(t).__name__}{where}")
            if not t.strip():
                raise InputError(f"the text is empty or only whitespace{where}: give some text to compress")
        return texts, single

    @staticmethod
    def _check_rate(mask_rate: float) -> float:
        """Validate a mask rate.

        :param mask_rate: the rate
        :return: it as a float
        """
        if isinstance(mask_rate, bool) or not isinstance(mask_rate, numbers.Real):
            raise InputError(f"mask_rate must be a number in [0, 1), got {mask_rate!r}")
        rate = float(mask_rate)
        if math.isnan(rate) or not 0.0 <= rate < 1.0:
            raise InputError(f"mask_rate must be in [0, 1) (the fraction of tokens to remove), got {mask_rate}")
        return rate

    @staticmethod
    def _check_targets(target_tokens: int | Sequence[int], counts: list[int], single: bool) -> list[int]:
        """Validate ``target_tokens`` against each text's token count.

        :param target_tokens: one target or one per text
        :param counts: tokens of each text
        :param single: a single text was given
        :return: one target per text
        """
        targets: list[Any]
        if isinstance(target_tokens, numbers.Integral):
            targets = [target_tokens] * len(counts)
        elif isinstance(target_tokens, Sequence) and not isinstance(target_tokens, str):
            targets = list(target_tokens)
        else:
            raise InputError(f"target_tokens must be an integer (or one per text), got {target_tokens!r}")
        if len(targets) != len(counts):
            raise InputError(f"target_tokens has {len(targets)} values for {len(counts)} texts: give one, or one per text")
        for i, (target, count) in enumerate(zip(targets, counts, strict=True)):
            where = "" if single else f" (text {i})"
            if isinstance(target, bool) or not isinstance(target, numbers.Integral):
                raise InputError(f"target_tokens must be an integer, got {target!r}{where}")
            if not 1 <= int(target) <= count:
                raise InputError(
                    f"target_tokens must be in [1, {count}] (at least one token, at most the text's token count){where}, got {target}"
                )
        return [int(t) for t in targets]

    # ------------------------------------------------------------------ compression
    def tokenize(
        self, texts: Sequence[str], force_keep: Sequence[str] = (), keep_digits: bool = False
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Token ids of each text and which of them are force-kept.

        :param texts: the texts
        :param force_keep: strings whose occurrences are kept (every token overlapping one)
        :param keep_digits: keep every token that contains a digit
        :return: per text, ``[n]`` int64 ids and ``[n]`` bool force-keep flags
        """
        want_offsets = bool(force_keep) and self.tokenizer.is_fast
        fast = None if want_offsets else self._encode_ids(texts)
        enc: Any = None
        if fast is None:
            enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=want_offsets, verbose=False)
            fast = [np.asarray(ids, dtype=np.int64) for ids in enc["input_ids"]]
        table = _cached_table(self.reconstructor, keep_digits)
        ids_list, keep_list = [], []
        for i, text in enumerate(texts):
            ids = fast[i]
            keep = table[np.clip(ids, 0, table.shape[0] - 1)]
            if force_keep:
                if want_offsets:
                    offsets = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
                    for s, e in _string_spans(text, force_keep):
                        keep |= (offsets[:, 0] < e) & (offsets[:, 1] > s)
                else:  # slow tokenizers have no offsets: match token sequences as the environment does
                    from tokencompress_env.env import force_keep_mask

                    keep |= force_keep_mask(ids[None], np.ones((1, len(ids)), dtype=bool), self.reconstructor, False, tuple(force_keep))[0]
            ids_list.append(ids)
            keep_list.append(keep)
        return ids_list, keep_list

    def _backend(self) -> Any:
        """The fast tokenizer's Rust backend when calling it directly gives what ``tokenizer(...)`` gives, else ``None``.

        That is when it has no truncation or padding set and encodes special tokens as the wrapper would
        (``split_special_tokens``); the wrapper call then only adds Python objects around the ids.

        :return: the backend or ``None``
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if self.tokenizer.is_fast else None
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            return None
        if backend.truncation is not None or backend.padding is not None:
            return None
        if bool(getattr(backend, "encode_special_tokens", False)) != bool(getattr(self.tokenizer, "split_special_tokens", False)):
            return None
        return backend

    def _encode_ids(self, texts: Sequence[str]) -> list[np.ndarray] | None:
        """Token ids of each text (no special tokens added) from the Rust backend, without offsets.

        :param texts: the texts
        :return: per text ``[n]`` int64 ids, or ``None`` when the backend cannot be called directly
        """
        backend = self._backend()
        if backend is None:
            return None
        return [np.array(e.ids, dtype=np.int64) for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def _count_tokens(self, texts: Sequence[str]) -> list[int]:
        """How many tokens each text has (no special tokens added).

        :param texts: the texts
        :return: the counts
        """
        backend = self._backend()
        if backend is None:
            return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]
        return [len(e) for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def compress(
        self,
        text_or_texts: str | Sequence[str],
        mask_rate: float | None = None,
        target_tokens: int | Sequence[int] | None = None,
        force_keep: str | Sequence[str] = (),
        keep_digits: bool | None = None,
        placeholder: str | None = None,
        units: str | None = None,
    ) -> CompressionResult | list[CompressionResult]:
        """Compress one text or a batch of texts at an exact mask rate (or to an exact token count).

        Texts longer than the policy's window are compressed window by window (the budget applies per
        window; the achieved rate is reported over the whole text); the windows of all texts go through
        the policy in batched forward passes. If the run observed surprisal, this also runs the
        reconstructor once per window (see the module docstring).

        :param text_or_texts: a text, or a sequence of texts
        :param mask_rate: fraction of tokens to remove, in ``[0, 1)`` (default 0.4 when ``target_tokens``
            is not given either)
        :param target_tokens: instead of ``mask_rate``: tokens to keep, one value for every text or one
            per text, in ``[1, token count]``
        :param force_keep: strings whose every occurrence is kept verbatim
        :param keep_digits: keep every token with a digit (``None``: the run's training setting)
        :param placeholder: a string that replaces each run of consecutive dropped tokens in the output
            text (e.g. ``"…"``), so that a reader knows where text was removed (``None``: dropped tokens
            are deleted; ``ids`` holds the kept tokens either way)
        :param units: what is dropped or kept together (:mod:`tokencompress_env.units`): ``"piece"``
            (whole characters: the output is always valid text made of the input's characters) or
            ``"word"`` (whole words); ``None``: :data:`DEFAULT_UNITS`. Units are ranked by their tokens'
            mean logit; with words the budget is met as closely as whole words allow (see
            ``achieved_mask_rate``). A unit cut by a window boundary is kept.
        :return: a :class:`CompressionResult` for a single text, else a list of them in input order
        :raises InputError: for an empty text, a mask rate outside ``[0, 1)`` or NaN or one that would
            remove every token, both or invalid ``target_tokens``
        """
        try:
            unit_kind = check_units(DEFAULT_UNITS if units is None else units)
        except ConfigError as exc:
            raise InputError(str(exc)) from None
        texts, single = self._check_texts(text_or_texts)
        if mask_rate is not None and target_tokens is not None:
            raise InputError("give either mask_rate or target_tokens, not both")
        if mask_rate is None:
            mask_rate = DEFAULT_MASK_RATE if target_tokens is None else 0.0
        rate = self._check_rate(mask_rate)
        strings = (force_keep,) if isinstance(force_keep, str) else tuple(force_keep)
        if any(not isinstance(s, str) for s in strings):
            raise InputError("force_keep must be a string or a list of strings")
        digits = self.keep_digits if keep_digits is None else bool(keep_digits)
        stages = _Stages()
        ids_list, keep_list = self.tokenize(texts, strings, digits)
        stages.lap("tokenize")
        counts = [len(ids) for ids in ids_list]
        for i, count in enumerate(counts):
            if count == 0:
                raise InputError(f"the text{'' if single else f' (text {i})'} has no tokens: give some text to compress")
        targets = self._check_targets(target_tokens, counts, single) if target_tokens is not None else None
        bounds = [window_bounds(n, self.seq_len) for n in counts]

        # Units: force-keep covers whole units, and a unit cut by a window boundary is kept.
        starts_list = []
        for i, (ids, b) in enumerate(zip(ids_list, bounds, strict=True)):
            starts = unit_starts(ids, None, self.tokenizer, unit_kind)
            flags = keep_list[i].copy()
            edges = b[1:-1]
            cut = edges[~starts[edges]]  # window boundaries inside a unit: keep the tokens on both sides
            flags[cut - 1] = True
            flags[cut] = True
            keep_list[i] = spread_to_units(flags[None], starts[None])[0]
            starts_list.append(starts)
        stages.lap("units")

        # Windows of all texts, padded to seq_len: token j of window w goes to row w, column j - b[w].
        n_windows = [len(b) - 1 for b in bounds]
        total = sum(n_windows)
        pad = self.reconstructor.pad_token_id
        first_row = np.concatenate([[0], np.cumsum(n_windows)])
        window_of = [np.repeat(np.arange(len(b) - 1), np.diff(b)) for b in bounds]
        flat = np.concatenate(
            [(first_row[i] + w) * self.seq_len + np.arange(len(w)) - b[w] for i, (w, b) in enumerate(zip(window_of, bounds, strict=True))]
        )
        flat_ids = np.full(total * self.seq_len, pad, dtype=np.int64)
        flat_valid = np.zeros(total * self.seq_len, dtype=bool)
        flat_keep = np.zeros(total * self.seq_len, dtype=bool)
        flat_starts = np.ones(total * self.seq_len, dtype=bool)
        flat_ids[flat] = np.concatenate(ids_list)
        flat_keep[flat] = np.concatenate(keep_list)
        flat_starts[flat] = np.concatenate(starts_list)
        flat_valid[flat] = True
        shape = (total, self.seq_len)
        win_ids, win_valid, win_keep = flat_ids.reshape(shape), flat_valid.reshape(shape), flat_keep.reshape(shape)
        win_starts = flat_starts.reshape(shape)
        win_starts[:, 0] = True
        maskable = win_valid & ~win_keep
        stages.lap("windows")

        # Budgets per window, and the rate each window's policy observation carries.
        text_of_window = np.repeat(np.arange(len(texts)), n_windows)
        first = np.concatenate([[0], np.cumsum(n_windows)])
        wanted = np.zeros(len(texts), dtype=np.int64)  # drops asked for, before force-keep limits them
        if targets is None:
            requested = np.full(len(texts), rate)
            win_rate = np.full(total, rate)
            asked = mask_budget(rate, win_valid)
            for i, count in enumerate(counts):
                wanted[i] = int(asked[first[i] : first[i + 1]].sum())
                if wanted[i] >= count:
                    sizes = np.diff(bounds[i])
                    limit = float(((sizes - 0.5) / sizes).max())
                    raise InputError(
                        f"mask_rate {rate} would remove every token of the text{'' if single else f' (text {i})'} "
                        f"({count} tokens): use a mask_rate in [0, {limit:.4g})"
                    )
            budget = rate_budget(rate, win_valid, maskable)
        else:
            requested = np.array([1.0 - t / n for t, n in zip(targets, counts, strict=True)])
            win_rate = requested[text_of_window]
            budget = np.zeros(total, dtype=np.int64)
            for i, (ids, keep, target) in enumerate(zip(ids_list, keep_list, targets, strict=True)):
                wanted[i] = len(ids) - target
                drops = min(len(ids) - target, int((~keep).sum()))
                # Spread the text's drops over its windows in proportion to their maskable tokens.
                rows = slice(first[i], first[i + 1])
                budget[rows] = segment_budgets(maskable[rows].reshape(1, -1), np.array([drops]), self.seq_len)[0]

        stages.lap("budgets")
        logits = window_mask_logits(
            self.agent,
            win_ids,
            win_valid,
            win_keep,
            win_rate.astype(np.float32),
            self.reconstructor if self.observe_surprisal else None,
            self.batch_size,
            matmul_dtype=self.matmul_dtype,
        )
        stages.lap("policy")
        dropped = budget_mask(logits, budget, maskable, units=win_starts)
        stages.lap("ranking")

        # Back to texts.
        results: list[CompressionResult] = []
        kept_all, row = [], 0
        for b in bounds:
            w = len(b) - 1
            sizes = np.diff(b)
            real = np.arange(self.seq_len)[None, :] < sizes[:, None]
            kept_all.append(~dropped[row : row + w][real])
            row += w
        compressed_ids = [ids[kept] for ids, kept in zip(ids_list, kept_all, strict=True)]
        decoded = [decode_ids(self.tokenizer, c) for c in compressed_ids]  # whole characters: exact text
        stages.lap("decode")
        text_tokens = TokenCounts(self._count_tokens, decoded)  # counted when first read
        if placeholder is not None:
            decoded = [text_with_placeholders(self.tokenizer, ids, kept, placeholder) for ids, kept in zip(ids_list, kept_all, strict=True)]
        for i, ids in enumerate(ids_list):
            kept = kept_all[i]
            n_kept = int(kept.sum())
            removable = int(budget[first[i] : first[i + 1]].sum())
            warning = None
            if removable < wanted[i]:
                warning = (
                    f"force-kept tokens let only {removable} of the {wanted[i]} requested drops of {len(ids)} tokens happen"
                    f"{'' if single else f' (text {i})'}: achieved mask rate {1.0 - n_kept / len(ids):.3f} "
                    f"instead of the requested {float(requested[i]):.3f}"
                )
            elif (len(ids) - n_kept) < wanted[i] - UNIT_SHORTFALL_WARNING * len(ids):
                warning = (
                    f"whole {unit_kind}s let only {len(ids) - n_kept} of the {wanted[i]} requested drops of {len(ids)} tokens "
                    f"happen{'' if single else f' (text {i})'}: achieved mask rate {1.0 - n_kept / len(ids):.3f} instead of "
                    f"the requested {float(requested[i]):.3f}" + (" (units='piece' gets closer)" if unit_kind == "word" else "")
                )
            results.append(
                CompressionResult(
                    text=decoded[i],
                    ids=compressed_ids[i],
                    kept_mask=kept,
                    origin_ids=ids,
                    origin_tokens=len(ids),
                    compressed_tokens=n_kept,
                    requested_mask_rate=float(requested[i]),
                    achieved_mask_rate=1.0 - n_kept / len(ids),
                    target_tokens=None if targets is None else targets[i],
                    windows=n_windows[i],
                    force_kept=keep_list[i],
                    placeholder=placeholder,
                    units=unit_kind,
                    text_tokens=PendingCount(text_tokens, i),
                    warning=warning,
                )
            )
        stages.lap("results")
        self.last_stage_seconds = stages.seconds
        return results[0] if single else results

    # ------------------------------------------------------------------ reconstruction
    def reconstruct_ids(self, result: CompressionResult, reference: bool = False) -> np.ndarray:
        """The reconstructor's greedy fill-in of the dropped tokens, as ids of the whole text.

        The text is cut into the same windows as in :meth:`compress`; each dropped token is replaced by
        the reconstructor's top guess given the compressed prefix of its window. Kept tokens are unchanged.

        :param result: a result of :meth:`compress`
        :param reference: use the frozen reference reconstructor instead of the jointly trained one
        :return: ``[origin_tokens]`` int64 ids
        """
        model = self.reference if reference else self.reconstructor
        ids = np.asarray(result.origin_ids, dtype=np.int64)
        kept = np.asarray(result.kept_mask, dtype=bool)
        if ids.shape != kept.shape or ids.ndim != 1 or len(ids) == 0:
            raise InputError("result.origin_ids and result.kept_mask must be non-empty and of the same length")
        b = window_bounds(len(ids), self.seq_len)
        sizes = np.diff(b)
        real = np.arange(self.seq_len)[None, :] < sizes[:, None]
        win_ids = np.full(real.shape, model.pad_token_id, dtype=np.int64)
        win_mask = np.zeros(real.shape, dtype=bool)
        win_ids[real], win_mask[real] = ids, ~kept
        out = np.empty(real.shape, dtype=np.int64)
        with torch.inference_mode():
            for start in range(0, len(win_ids), self.batch_size):
                sl = slice(start, start + self.batch_size)
                out[sl] = model.fill(win_ids[sl], win_mask[sl], real[sl]).cpu().numpy()
        return out[real]

    def reconstruct(self, result: CompressionResult, reference: bool = False) -> str:
        """The reconstructor's fill-in of a compressed text, decoded (kept tokens unchanged).

        :param result: a result of :meth:`compress`
        :param reference: use the frozen reference reconstructor instead of the jointly trained one
        :return: the reconstructed text
        """
        return str(self.tokenizer.decode(self.reconstruct_ids(result, reference).tolist()))
