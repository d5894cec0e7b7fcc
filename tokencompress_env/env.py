"""TokenMask-v0: decide, chunk by chunk, which tokens of a window to drop so that the reconstructor can still recover them.

This module holds the single environment :class:`TokenMaskEnv` and what it shares with the natively
batched :class:`~tokencompress_env.vector_env.TokenMaskVectorEnv`: the window data
(:class:`WindowSet`, :func:`load_windows`), the force-keep rules (:func:`force_keep_mask`) and the
batched dynamics (:class:`TokenMaskCore`). The single env is a :class:`TokenMaskCore` of batch size one,
so both envs run exactly the same code. The observation (its spaces, decision codes and construction)
is owned by :mod:`tokencompress_env.observation`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.error import ResetNeeded

from tokencompress_env.data import CorpusSpec, prepare_corpus, tokenizer_id, window_array, window_continuations, window_doc_ids
from tokencompress_env.env_config import EnvConfig, check_option_types
from tokencompress_env.errors import ConfigError, DataSourceError, InputError
from tokencompress_env.observation import MAX_SURPRISAL_BITS, Decision, build_observation, make_spaces
from tokencompress_env.paths import cache_root
from tokencompress_env.presets import load_or_build
from tokencompress_env.reconstructor import PRESETS, Reconstructor, default_reconstructor_dir, resolve_device
from tokencompress_env.reward import EpisodeScorer, RewardConfig, StepOutcome
from tokencompress_env.units import spread_to_units, unit_heads, unit_starts

#: Splits a corpus provides.
SPLITS = ("train", "validation", "test")
#: Options of ``reset(options=...)``.
RESET_OPTIONS = ("target_mask_rate", "window_index")

_RECONSTRUCTORS: dict[tuple[str, str], Reconstructor] = {}
_CORPORA: dict[tuple[str, str, int, str, str], tuple[np.ndarray, np.ndarray]] = {}


# ---------------------------------------------------------------------------------------------- data
@dataclass
class WindowSet:
    """The windows an environment draws its episodes from; every array is ``[N, seq_len]``.

    :param token_ids: true token ids (the padding id at padded positions)
    :param valid: ``True`` at real tokens, ``False`` at right padding
    :param force_keep: ``True`` where a token must be kept (always ``False`` at padding; covers whole units)
    :param heads: position of the first token of each token's unit (:mod:`tokencompress_env.units`);
        ``None``: every token is a unit of its own
    :param continuations: ``[N, continuation_tokens]`` the tokens following each window (continuation
        reward only; ``None`` otherwise)
    """

    token_ids: np.ndarray
    valid: np.ndarray
    force_keep: np.ndarray
    heads: np.ndarray | None = None
    continuations: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


def load_reconstructor(name_or_path: str | Path, device: str = "auto") -> Reconstructor:
    """Load a reconstructor by preset name or directory, once per process (envs share it read-only); builds a preset not cached yet.

    :param name_or_path: a preset (``"tiny"``) or a directory written by ``save_pretrained``
    :param device: where to run (``"auto"``: CUDA, MPS or CPU)
    :return: the (shared) reconstructor
    """
    name = str(name_or_path)
    resolved = str(default_reconstructor_dir(name)) if name in PRESETS else str(Path(name).expanduser().resolve())
    key = (resolved, str(resolve_device(device)))
    if key not in _RECONSTRUCTORS:
        _RECONSTRUCTORS[key] = load_or_build(name, device=device)
    return _RECONSTRUCTORS[key]


def corpus_windows_with_docs(corpus: str, split: str, seq_len: int, reconstructor: Reconstructor) -> tuple[np.ndarray, np.ndarray]:
    """Windows of one split of a corpus in the reconstructor's tokenizer and their documents (prepared and cached on disk once).

    :param corpus: corpus source (see :func:`tokencompress_env.data.load_documents`)
    :param split: ``"train"``, ``"validation"`` or ``"test"``
    :param seq_len: tokens per window
    :param reconstructor: whose tokenizer cuts the windows
    :return: ``[N, seq_len]`` int64 token ids, in document order, and ``[N]`` their document ids
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got '{split}'")
    key = (corpus, split, seq_len, tokenizer_id(reconstructor.tokenizer), str(cache_root()))
    if key not in _CORPORA:
        windows = prepare_corpus(CorpusSpec(source=corpus, seq_len=seq_len), reconstructor.tokenizer)
        _CORPORA[key] = (window_array(windows[split]), window_doc_ids(windows[split]))
    array, docs = _CORPORA[key]
    if array.shape[0] == 0:
        raise DataSourceError(f"corpus '{corpus}' has no {seq_len}-token window in its '{split}' split: use a shorter seq_len or more text")
    return array, docs


def corpus_windows(corpus: str, split: str, seq_len: int, reconstructor: Reconstructor) -> np.ndarray:
    """Windows of one split of a corpus in the reconstructor's tokenizer (:func:`corpus_windows_with_docs` without the documents).

    :param corpus: corpus source (see :func:`tokencompress_env.data.load_documents`)
    :param split: ``"train"``, ``"validation"`` or ``"test"``
    :param seq_len: tokens per window
    :param reconstructor: whose tokenizer cuts the windows
    :return: ``[N, seq_len]`` int64 token ids
    """
    return corpus_windows_with_docs(corpus, split, seq_len, reconstructor)[0]


def pad_windows(
    windows: np.ndarray | Sequence[Sequence[int]], seq_len: int, pad_id: int, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad windows (a 2-D array or a list of id sequences of at most ``seq_len`` tokens) to ``seq_len``.

    :param windows: ``[N, L]`` ids with ``L <= seq_len``, one 1-D window, or a list of sequences
    :param seq_len: the environment's window length
    :param pad_id: id written at padded positions
    :param valid: ``[N, L]`` real positions of a 2-D ``windows`` (``None``: all real)
    :return: ``[N, seq_len]`` int64 ids and ``[N, seq_len]`` bool valid
    """
    if isinstance(windows, np.ndarray) and windows.ndim == 1:
        windows = windows[None, :]
        valid = None if valid is None else np.asarray(valid)[None, :]
    if isinstance(windows, np.ndarray) and windows.ndim == 2:
        rows = np.asarray(windows, dtype=np.int64)
        real = np.ones(rows.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        if real.shape != rows.shape:
            raise InputError(f"valid has shape {real.shape}, windows have shape {rows.shape}")
    elif isinstance(windows, np.ndarray):
        raise InputError(f"windows must be a 1-D or 2-D array of token ids, got shape {windows.shape}")
    else:
        seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in windows]
        width = max((len(s) for s in seqs), default=0)
        rows = np.full((len(seqs), width), pad_id, dtype=np.int64)
        real = np.zeros((len(seqs), width), dtype=bool)
        for i, s in enumerate(seqs):
            rows[i, : len(s)], real[i, : len(s)] = s, True
    if rows.shape[0] == 0:
        raise InputError("no windows given")
    if rows.shape[1] > seq_len:
        raise InputError(f"windows of {rows.shape[1]} tokens are longer than seq_len={seq_len}")
    out = np.full((rows.shape[0], seq_len), pad_id, dtype=np.int64)
    out_valid = np.zeros((rows.shape[0], seq_len), dtype=bool)
    out[:, : rows.shape[1]] = np.where(real, rows, pad_id)
    out_valid[:, : rows.shape[1]] = real
    return out, out_valid


def force_keep_token_table(reconstructor: Reconstructor, keep_digits: bool) -> np.ndarray:
    """Per-vocabulary-entry force-keep flags: special tokens, and tokens with an ASCII digit if asked.

    :param reconstructor: whose tokenizer defines the vocabulary
    :param keep_digits: also force-keep every token that contains a digit
    :return: ``[vocab_size]`` bool
    """
    tokenizer = reconstructor.tokenizer
    size = max(reconstructor.vocab_size, len(tokenizer))
    table = np.zeros(size, dtype=bool)
    special = [i for i in tokenizer.all_special_ids if i is not None and 0 <= i < size]
    table[special] = True
    if keep_digits:
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        digit = re.compile(r"[0-9]")
        table[: len(tokens)] |= np.array([bool(t) and digit.search(t) is not None for t in tokens], dtype=bool)
    return table


def force_keep_mask(
    token_ids: np.ndarray,
    valid: np.ndarray,
    reconstructor: Reconstructor,
    keep_digits: bool = False,
    force_keep_strings: Sequence[str] = (),
) -> np.ndarray:
    """Which tokens must never be dropped: special tokens, digits (optional) and occurrences of user strings.

    A string is found as its token sequence, tokenised both alone and after a space (byte-level BPE
    spells a word differently at the start of a text and after a space); every token of an occurrence
    is kept. Vectorised over all windows.

    :param token_ids: ``[N, L]`` ids
    :param valid: ``[N, L]`` real positions
    :param reconstructor: whose tokenizer defines the tokens
    :param keep_digits: keep every token containing an ASCII digit
    :param force_keep_strings: strings whose occurrences are kept
    :return: ``[N, L]`` bool (``False`` at padding)
    """
    table = force_keep_token_table(reconstructor, keep_digits)
    keep = table[np.clip(token_ids, 0, table.shape[0] - 1)]
    length = token_ids.shape[1]
    for text in force_keep_strings:
        if not text:
            continue
        for variant in {text, " " + text.lstrip()}:
            pattern = np.asarray(reconstructor.tokenizer.encode(variant, add_special_tokens=False), dtype=np.int64)
            m = len(pattern)
            if m == 0 or m > length:
                continue
            starts = np.ones((token_ids.shape[0], length - m + 1), dtype=bool)
            for j in range(m):
                starts &= token_ids[:, j : length - m + 1 + j] == pattern[j]
            for j in range(m):
                keep[:, j : length - m + 1 + j] |= starts
    return keep & valid


def draw_episode(
    rng: np.random.Generator,
    n_windows: int,
    config: EnvConfig,
    target: float | None = None,
    window_index: int | None = None,
) -> tuple[int, float]:
    """Draw an episode's window and target rate; both are always drawn so that options never shift the random stream.

    :param rng: the episode's random generator
    :param n_windows: windows to choose from
    :param config: the env's config (the target is uniform in ``[mask_rate_min, mask_rate_max]``)
    :param target: a fixed target (overrides the draw)
    :param window_index: a fixed window (overrides the draw)
    :return: window index and target mask rate
    """
    index = int(rng.integers(n_windows))
    rate = float(rng.uniform(config.mask_rate_min, config.mask_rate_max))
    if target is not None and not (isinstance(target, float) and np.isnan(target)):
        if not 0.0 <= float(target) <= 1.0:
            raise InputError(f"target_mask_rate must be in [0, 1], got {target}")
        rate = float(target)
    if window_index is not None and int(window_index) >= 0:
        if int(window_index) >= n_windows:
            raise InputError(f"window_index {window_index} out of range: {n_windows} windows")
        index = int(window_index)
    return index, rate


# ---------------------------------------------------------------------------------------------- batched dynamics
class TokenMaskCore:
    """The dynamics of a batch of synchronized TokenMask-v0 episodes (the single env uses a batch of one).

    :param reconstructor: the scoring reconstructor
    :param windows: the windows episodes are drawn from
    :param reward_config: reward coefficients
    :param seq_len: window length
    :param chunk_size: tokens decided per step
    :param batch_size: episodes run together
    :param observe_surprisal: compute the ``surprisal`` observation at each episode start
    :param scoring_dtype: precision of the reconstructor's forward passes (``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``)
    """

    def __init__(
        self,
        reconstructor: Reconstructor,
        windows: WindowSet,
        reward_config: RewardConfig,
        seq_len: int,
        chunk_size: int,
        batch_size: int,
        observe_surprisal: bool = False,
        scoring_dtype: str = "auto",
    ) -> None:
        self.reconstructor = reconstructor
        self.windows = windows
        self.reward_config = reward_config
        self.seq_len = seq_len
        self.chunk_size = chunk_size
        self.batch_size = batch_size
        self.observe_surprisal = observe_surprisal
        self.vocab_size = reconstructor.vocab_size
        self.observation_space, self.action_space = make_spaces(seq_len, chunk_size, self.vocab_size, observe_surprisal)
        self.scorer = EpisodeScorer(reconstructor, reward_config, seq_len, batch_size, scoring_dtype)
        shape = (batch_size, seq_len)
        self.token_ids = np.zeros(shape, dtype=np.int64)
        self.valid = np.zeros(shape, dtype=bool)
        self.force_keep = np.zeros(shape, dtype=bool)
        self.maskable = np.zeros(shape, dtype=bool)
        self.heads = np.zeros(shape, dtype=np.int64)
        self.decisions = np.zeros(shape, dtype=np.int64)
        self.surprisal = np.zeros(shape, dtype=np.float32)
        self.window_index = np.zeros(batch_size, dtype=np.int64)
        self.position = 0
        self.started = False
        self._last = self._zero_outcome()
        self._pending: Reconstructor | None = None
        self._needs_rebuild = False

    def _zero_outcome(self) -> StepOutcome:
        return StepOutcome.zeros(self.batch_size, self.chunk_size)

    @property
    def steps_per_episode(self) -> int:
        """Steps of every episode: ``seq_len / chunk_size``.

        :return: steps
        """
        return self.seq_len // self.chunk_size

    @property
    def done(self) -> bool:
        """Whether the current episodes have decided every token.

        :return: ``True`` at the end of the episodes
        """
        return self.position >= self.seq_len

    def set_reconstructor(self, reconstructor: Reconstructor) -> None:
        """Score with another reconstructor from the next episode on (joint training).

        :param reconstructor: the new reconstructor, with the same tokenizer vocabulary
        """
        if len(reconstructor.tokenizer) != len(self.reconstructor.tokenizer):
            raise ConfigError("the new reconstructor's tokenizer differs from the environment's (token ids would not match)")
        if reconstructor.max_seq_len < self.seq_len:
            raise ConfigError(f"seq_len={self.seq_len} exceeds the new reconstructor's context of {reconstructor.max_seq_len} tokens")
        self._pending = reconstructor

    def start(self, window_index: np.ndarray, target: np.ndarray) -> None:
        """Begin new episodes in every row.

        :param window_index: ``[B]`` window of each row
        :param target: ``[B]`` target mask rate of each row
        """
        if self._pending is not None:
            self.reconstructor = self.scorer.reconstructor = self._pending
            self._pending = None
        idx = np.asarray(window_index, dtype=np.int64)
        self.window_index[:] = idx
        self.token_ids[:] = self.windows.token_ids[idx]
        self.valid[:] = self.windows.valid[idx]
        self.force_keep[:] = self.windows.force_keep[idx]
        self.heads[:] = np.arange(self.seq_len) if self.windows.heads is None else self.windows.heads[idx]
        np.logical_and(self.valid, ~self.force_keep, out=self.maskable)
        self.decisions.fill(Decision.UNDECIDED)
        self.position = 0
        continuations = None if self.windows.continuations is None else self.windows.continuations[idx]
        self.scorer.begin(np.asarray(target, dtype=np.float64), self.valid.sum(1), continuations)
        if self.observe_surprisal:
            bits = self.reconstructor.surprisal(self.token_ids, self.valid, dtype=self.scorer.dtype)
            self.surprisal[:] = bits.clamp(0.0, MAX_SURPRISAL_BITS).cpu().numpy()
        self._last = self._zero_outcome()
        self._needs_rebuild = False
        self.started = True

    def _rebuild_cache(self) -> None:
        """Re-score the decided prefix to rebuild the KV cache (after unpickling)."""
        self.scorer.state = self.reconstructor.begin_scoring(self.batch_size, self.scorer.dtype)
        if self.position > 0:
            p = self.position
            dropped = self.decisions[:, :p] == Decision.MASKED
            self.reconstructor.score_chunk(self.scorer.state, self.token_ids[:, :p], dropped, self.valid[:, :p], positions="masked")
        self._needs_rebuild = False

    def step(self, actions: np.ndarray) -> StepOutcome:
        """Apply one chunk of decisions to every row and score it.

        :param actions: ``[B, chunk_size]`` of 0 (keep) and 1 (drop); padding and force-keep positions are kept
            anyway, and a token that is not the first of its unit follows the decision of that first token
        :return: the step's rewards and masked bits
        """
        if not self.started or self.done:
            raise ResetNeeded("the episode is over (or never began): call reset() before step()")
        act = np.asarray(actions)
        if act.shape != (self.batch_size, self.chunk_size):
            raise InputError(f"actions must have shape {(self.batch_size, self.chunk_size)}, got {act.shape}")
        if act.dtype.kind not in "biuf" or not np.isin(act, (0, 1)).all():
            bad = act.ravel()[0] if act.dtype.kind not in "biuf" else act[~np.isin(act, (0, 1))].ravel()[0]
            raise InputError(f"actions must be 0 (keep) or 1 (drop), got {getattr(bad, 'item', lambda: bad)()!r} (dtype {act.dtype})")
        if self._needs_rebuild:
            self._rebuild_cache()
        p, k = self.position, self.chunk_size
        heads = self.heads[:, p : p + k]
        rows = np.arange(self.batch_size)[:, None]
        drop = np.where(heads >= p, act[rows, np.clip(heads - p, 0, k - 1)] != 0, self.decisions[rows, heads] == Decision.MASKED)
        mask = drop & self.maskable[:, p : p + k]
        self.decisions[:, p : p + k] = np.where(mask, Decision.MASKED, Decision.KEPT)
        outcome = self.scorer.step(self.token_ids[:, p : p + k], mask, self.valid[:, p : p + k])
        self.position += k
        self._last = outcome
        return outcome

    def observation(self) -> dict[str, np.ndarray]:
        """The batched observation (fresh arrays, safe to keep).

        :return: a dict of ``[B, ...]`` arrays keyed like the observation space
        """
        surprisal = self.surprisal if self.observe_surprisal else None
        return build_observation(self.token_ids, self.valid, self.force_keep, self.scorer.target, surprisal, self.decisions, self.position)

    def infos(self) -> dict[str, np.ndarray]:
        """Deterministic per-row facts of the episodes so far (no timings).

        :return: a dict of ``[B]`` arrays
        """
        s = self.scorer
        continuation = {}
        if s.continuation:
            continuation = {
                "continuation_full": self._last.continuation_full.copy(),
                "continuation_deleted": self._last.continuation_deleted.copy(),
                "reward_continuation": self._last.reward_continuation.copy(),
            }
        return {
            "window_index": self.window_index.copy(),
            "target_mask_rate": s.target.copy(),
            "mask_rate": s.mask_rate,
            "n_valid": s.n_valid.copy(),
            "n_decided": s.decided.copy(),
            "n_masked": s.masked.copy(),
            "masked_bits": self._last.masked_bits.copy(),
            "masked_bits_total": s.masked_bits_total.copy(),
            "recovery_accuracy": s.recovery_accuracy,
            "reward_tokens": self._last.reward_tokens.copy(),
            "reward_rate": self._last.reward_rate.copy(),
            "token_rewards": self._last.token_reward.copy(),
            **continuation,
        }

    def action_masks(self) -> np.ndarray:
        """Valid actions of the current chunk for sb3-contrib's MaskablePPO.

        For ``MultiBinary(k)`` MaskablePPO expects ``2 * k`` flags per row, ``[keep allowed, drop allowed]``
        for each position of the chunk: keeping is always allowed, dropping only at real, not force-kept
        tokens. A token whose unit began in an earlier chunk may only follow that unit's decision. After the
        last chunk every drop is disallowed.

        :return: ``[B, 2 * chunk_size]`` bool
        """
        masks = np.ones((self.batch_size, self.chunk_size, 2), dtype=bool)
        if self.done or not self.started:
            masks[:, :, 1] = False
        else:
            p = self.position
            maskable = self.maskable[:, p : p + self.chunk_size]
            heads = self.heads[:, p : p + self.chunk_size]
            decided = heads < p
            head_dropped = self.decisions[np.arange(self.batch_size)[:, None], heads] == Decision.MASKED
            masks[:, :, 1] = maskable & (~decided | head_dropped)
            masks[:, :, 0] = ~(maskable & decided & head_dropped)
        return masks.reshape(self.batch_size, 2 * self.chunk_size)

    def render_text(self, row: int = 0) -> str:
        """The current window of one row as text, dropped tokens shown as the mask token.

        :param row: which row
        :return: the text
        """
        ids = np.where(self.decisions[row] == Decision.MASKED, self.reconstructor.mask_token_id, self.token_ids[row])[self.valid[row]]
        return str(self.reconstructor.tokenizer.decode(ids.tolist()))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["scorer"] = _scorer_without_cache(self.scorer)
        state["_needs_rebuild"] = self.started and not self.done
        return state


def _scorer_without_cache(scorer: EpisodeScorer) -> EpisodeScorer:
    """A shallow copy of a scorer without its KV cache (which is rebuilt from the decisions after unpickling).

    :param scorer: the scorer
    :return: the copy
    """
    clone = EpisodeScorer.__new__(EpisodeScorer)
    clone.__dict__.update(scorer.__dict__)
    clone.state = None
    return clone


def build_core(
    batch_size: int,
    config: EnvConfig,
    reconstructor: Reconstructor | None = None,
    windows: np.ndarray | Sequence[Sequence[int]] | None = None,
    valid: np.ndarray | None = None,
    continuations: np.ndarray | None = None,
) -> TokenMaskCore:
    """Load what a config names (reconstructor, corpus windows) and build the core of the single or the vector env.

    With ``reward_type="continuation"`` the corpus windows are those whose next ``continuation_tokens``
    tokens lie in their document (:func:`~tokencompress_env.data.window_continuations`): the last window
    of a document has no continuation to read, so it is not played.

    :param batch_size: episodes run together
    :param config: the env's options
    :param reconstructor: a reconstructor object to use instead of loading ``config.reconstructor``
    :param windows: token-id windows to use instead of the corpus
    :param valid: real positions of ``windows``
    :param continuations: ``[N, continuation_tokens]`` ids following each of ``windows`` (the continuation
        reward's, needed with it and direct windows)
    :return: the core
    """
    check_option_types({"num_envs": batch_size}, {}, {})
    if batch_size < 1:
        raise ConfigError(f"num_envs must be at least 1, got {batch_size}")
    seq_len = config.seq_len
    model = reconstructor if reconstructor is not None else load_reconstructor(config.reconstructor, config.device)
    if seq_len > model.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} exceeds the reconstructor's context of {model.max_seq_len} tokens: use a smaller seq_len")
    uses_continuations = config.reward_type == "continuation"
    if continuations is not None and not uses_continuations:
        raise InputError("continuations are read by reward_type='continuation' only")
    conts = None
    if windows is None:
        if continuations is not None:
            raise InputError("continuations go with direct windows; the corpus's windows take theirs from their documents")
        token_ids, docs = corpus_windows_with_docs(config.corpus, config.split, seq_len, model)
        if uses_continuations:
            conts, available = window_continuations(token_ids, docs, config.continuation_tokens)
            if not available.any():
                raise DataSourceError(
                    f"no {seq_len}-token window of the '{config.split}' split of '{config.corpus}' is followed by "
                    f"{config.continuation_tokens} tokens of its document: use fewer continuation_tokens or longer documents"
                )
            token_ids, conts = token_ids[available], conts[available]
        real = np.ones(token_ids.shape, dtype=bool)
    else:
        token_ids, real = pad_windows(windows, seq_len, model.pad_token_id, valid)
        if uses_continuations:
            conts = check_continuations(continuations, len(token_ids), config.continuation_tokens, model.vocab_size)
    if token_ids.min() < 0 or token_ids.max() >= model.vocab_size:
        raise InputError(f"token ids must lie in [0, {model.vocab_size}) for this reconstructor")
    keep = force_keep_mask(token_ids, real, model, config.keep_digits, config.force_keep_strings)
    starts = unit_starts(token_ids, real, model.tokenizer, config.units)
    windows_set = WindowSet(token_ids, real, spread_to_units(keep, starts) & real, unit_heads(starts), conts)
    return TokenMaskCore(
        model, windows_set, config.reward_config(), seq_len, config.chunk_size, batch_size, config.observe_surprisal, config.scoring_dtype
    )


def check_continuations(continuations: np.ndarray | None, n_windows: int, horizon: int, vocab_size: int) -> np.ndarray:
    """Validate the continuations given with direct windows (continuation reward).

    :param continuations: ``[N, horizon]`` ids, or ``None``
    :param n_windows: windows given
    :param horizon: ``continuation_tokens``
    :param vocab_size: the reconstructor's vocabulary
    :return: the continuations as an int64 array
    """
    if continuations is None:
        raise InputError(
            "reward_type='continuation' with direct windows needs continuations=[N, continuation_tokens] ids "
            "(the tokens that follow each window)"
        )
    conts = np.asarray(continuations)
    if conts.dtype.kind not in "iu" or conts.shape != (n_windows, horizon):
        raise InputError(f"continuations must be integer ids of shape ({n_windows}, {horizon}), got {conts.dtype} {conts.shape}")
    if conts.size and (conts.min() < 0 or conts.max() >= vocab_size):
        raise InputError(f"continuation ids must lie in [0, {vocab_size}) for this reconstructor")
    return conts.astype(np.int64)


def env_config(
    config: EnvConfig | None, reconstructor: str | Path | Reconstructor | None, options: dict[str, Any]
) -> tuple[EnvConfig, Reconstructor | None]:
    """The config of an env constructor's arguments, and the reconstructor object it was given (if any).

    :param config: a config (``None``: the defaults)
    :param reconstructor: a preset name or directory (a config option), or a :class:`Reconstructor` object
    :param options: the other keyword options (:meth:`EnvConfig.from_options`)
    :return: the config and the reconstructor object or ``None``
    """
    if isinstance(reconstructor, Reconstructor):
        return EnvConfig.from_options(config, **options), reconstructor
    if reconstructor is not None:
        options = {**options, "reconstructor": reconstructor}
    return EnvConfig.from_options(config, **options), None


def check_reset_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Reject unknown ``reset`` options.

    :param options: the options (``None``: none)
    :return: the options as a dict
    """
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InputError(f"reset options must be a dict, got {type(options).__name__}")
    unknown = sorted(str(k) for k in options if k not in RESET_OPTIONS)
    if unknown:
        raise InputError(f"unknown reset option(s) {unknown}; valid options: {', '.join(RESET_OPTIONS)}")
    return options


class CoreAccess:
    """What the single and the vector env both expose of their :class:`TokenMaskCore` (``self.core``)."""

    core: TokenMaskCore

    @property
    def reconstructor(self) -> Reconstructor:
        """The reconstructor scoring the current episodes.

        :return: the reconstructor
        """
        return self.core.reconstructor

    @property
    def num_windows(self) -> int:
        """Number of windows episodes are drawn from.

        :return: the count
        """
        return len(self.core.windows)

    def set_reconstructor(self, reconstructor: Reconstructor) -> None:
        """Score with another reconstructor from the next episodes on (joint training).

        :param reconstructor: the new reconstructor, with the same tokenizer
        """
        self.core.set_reconstructor(reconstructor)


class TokenMaskEnv(CoreAccess, gym.Env[dict[str, np.ndarray], np.ndarray]):
    r"""TokenMask-v0: learn which tokens of a text window can be dropped and still be recovered.

    ## Description

    An episode is one window of ``seq_len`` tokens drawn from a corpus split, and a target mask rate
    drawn uniformly from ``[mask_rate_min, mask_rate_max]``. The agent walks through the window left to right,
    ``chunk_size`` tokens per step, and decides for each token whether to keep it or drop (mask) it.
    A dropped token is replaced by the reconstructor's mask token; the reconstructor, a small causal LM,
    must then recover it from the compressed prefix. Its surprisal ``-log2 p(x_i | compressed x_<i)``
    is the distortion the drop causes, in bits.

    ## Action Space

    ``MultiBinary(chunk_size)``: entry ``j`` is 1 to drop token ``position + j``, 0 to keep it (anything
    else, another shape, NaN or a string is an :class:`~tokencompress_env.errors.InputError`). Padding
    positions and force-kept tokens (special tokens; digits with ``keep_digits=True``; occurrences of
    ``force_keep_strings``) are kept whatever the action says. Tokens are decided in *units*
    (``units``, :mod:`tokencompress_env.units`): with ``"piece"`` (default) the tokens of one character
    (a CJK character or an emoji can take several byte-level tokens), with ``"word"`` the tokens of one
    word. The action at a unit's first token decides the whole unit; the actions at its other tokens are
    ignored, as at force-kept tokens, and a unit with a force-kept token is force-kept whole. :meth:`action_masks` gives the valid
    actions in sb3-contrib's format for ``MultiBinary``: ``2 * chunk_size`` flags, ``[keep allowed,
    drop allowed]`` per position.

    ## Observation Space

    A ``Dict`` (Gymnasium sorts its keys; index by name):

    | key | space | meaning |
    |---|---|---|
    | ``token_ids`` | ``Box(0, vocab_size-1, (seq_len,), int64)`` | the window's true token ids (padding id at padding) |
    | ``decisions`` | ``Box(0, 2, (seq_len,), int64)`` | 0 = not decided yet, 1 = kept, 2 = dropped (padding reads 1 once decided) |
    | ``valid`` | ``Box(0, 1, (seq_len,), int64)`` | 1 at real tokens, 0 at padding |
    | ``force_keep`` | ``Box(0, 1, (seq_len,), int64)`` | 1 where the token must be kept |
    | ``position`` | ``Box(0, seq_len, (1,), int64)`` | first token of the chunk decided now (``seq_len`` at the end) |
    | ``target_mask_rate`` | ``Box(0, 1, (1,), float32)`` | the episode's target fraction of dropped tokens |
    | ``surprisal`` (optional) | ``Box(0, 64, (seq_len,), float32)`` | bits of each original token given the *uncompressed* prefix |

    ``surprisal`` is present only with ``observe_surprisal=True`` (:meth:`Reconstructor.surprisal`, clipped at 64).

    ## Rewards

    Each step scores the new chunk with the reconstructor's cached-prefix scoring
    (:meth:`Reconstructor.score_chunk`: one forward pass over the window per episode in total). The
    output layer runs at the dropped tokens only, the only ones whose surprisal the reward uses. With
    ``scoring_dtype="auto"`` the forward passes run in bfloat16 where the hardware multiplies it natively
    (CUDA, or a CPU with AMX) and in float32 elsewhere; bfloat16 moves a token's surprisal by about 0.01
    bits on average (``experiments.benchmark_env`` measures it). Pass ``scoring_dtype="float32"`` for
    float32 rewards.

    * ``info_theoretic`` (default): each dropped token earns ``bits_saved_per_mask`` (the price of a
      token, default 8 bits) and pays its surprisal under the reconstructor given the compressed
      context, clipped at ``surprisal_clip`` (20 bits). Dropping a token the reconstructor predicts
      with near certainty earns almost the full price; dropping a surprising one costs.
    * ``simple``: ``+mask_bonus`` per dropped token, ``-wrong_penalty`` per dropped token whose
      reconstruction (the reconstructor's top guess) is wrong.
    * ``continuation`` (downstream): each dropped token earns ``bits_saved_per_mask`` at its step; the
      episode's last step charges ``C_deleted - C_full``, the bits of the ``continuation_tokens`` (T, 32)
      tokens that follow the window in its document under the reconstructor read as a causal LM
      (:meth:`Reconstructor.continuation_bits`) given the window with the dropped tokens deleted, minus
      those given the full window. Both contexts are their last ``seq_len - T`` tokens (the evaluation's
      downstream-reading rule). Only windows followed by T tokens of their document are played (the
      last window of a document is not); direct windows need ``continuations``. No per-token score
      optimises this: what a dropped token costs depends on what else is deleted.
    * Rate keeping (all types): with ``D_t = masked_so_far - target * decided_so_far`` over real
      tokens, each step adds ``-rate_penalty * (|D_t| - |D_{t-1}|)``. This potential-based shaping
      telescopes to ``-rate_penalty * |achieved - target| * n_valid`` over the episode: every token
      dropped beyond the target, or kept short of it, costs ``rate_penalty``. It must exceed the price
      of a token (checked), so neither keep-all nor drop-all pays; its default (``2 *
      bits_saved_per_mask`` = 16 bits, or ``mask_bonus + wrong_penalty`` for ``simple``) also exceeds
      ``surprisal_clip - bits_saved_per_mask``, so reaching the target always pays too.
    * Every reward is divided by ``reward_scale`` (default ``seq_len``): an episode's return is in bits
      per window token, O(1) for PPO.

    ``info`` (deterministic, no timings; same keys at reset): ``window_index``, ``target_mask_rate``,
    ``mask_rate`` (achieved so far: dropped / decided real tokens; the mask rate everywhere is the
    fraction of real tokens removed), ``n_valid``, ``n_decided``, ``n_masked``, ``masked_bits`` (this
    step, unclipped), ``masked_bits_total``, ``recovery_accuracy`` (dropped tokens whose top guess is
    right / dropped tokens so far, 0 when none dropped), ``reward_tokens`` and ``reward_rate`` (the two
    parts of this step's reward), and ``token_rewards``: this step's reward split over the chunk's
    ``chunk_size`` tokens (a list; ``[num_envs, chunk_size]`` in the vector env), each token's own term plus
    the rate shaping counted token by token, so that a token's share depends only on its own decision and
    those before it (what ``algo="token_ppo"`` uses for per-token credit). With the continuation reward also
    ``continuation_full`` and ``continuation_deleted`` (the continuation's bits given the full and the
    deleted window, summed over its tokens) and ``reward_continuation`` (``-(deleted - full)``, scaled), 0 before
    the episode's last step; the continuation term goes to the last position of ``token_rewards``.

    ## Starting State

    ``reset`` draws the window and the target from the env's ``np_random`` (both are always drawn).
    ``reset(options={"target_mask_rate": r})`` fixes the target, ``options={"window_index": i}`` the window;
    any other option is an error.

    ## Episode End

    The episode terminates after ``seq_len / chunk_size`` steps, when every token is decided. There is
    no truncation.

    ## Arguments

    ``gymnasium.make("TokenMask-v0", **kwargs)`` with plain values: the keywords are the fields of
    :class:`~tokencompress_env.env_config.EnvConfig`, where each is documented and defaulted (corpus and
    split, reconstructor, ``seq_len`` and ``chunk_size``, the target range ``mask_rate_min`` /
    ``mask_rate_max`` (``mask_rate_range=(min, max)`` is accepted too), ``observe_surprisal``, the
    force-keep rules, ``units``, the reward coefficients of Rewards, ``device`` and ``scoring_dtype``).
    A ready :class:`~tokencompress_env.env_config.EnvConfig` may be passed as ``config``; keywords then
    change it.

    Direct construction only (never through ``gymnasium.make``, whose kwargs are deep-copied and must
    serialise): ``reconstructor`` may be a :class:`Reconstructor` object, and ``windows`` (``[N, L]``
    ids with ``L <= seq_len``, or a list of id sequences, right-padded) with optional ``valid`` replaces
    the corpus. :meth:`set_reconstructor` swaps the reconstructor for joint training from the next
    episode on (a reconstructor trained in place is used at once).

    ## Vectorized environment

    ``gymnasium.make_vec("TokenMask-v0", num_envs=N, vectorization_mode="vector_entry_point")`` returns
    :class:`~tokencompress_env.vector_env.TokenMaskVectorEnv`: all N windows are scored by one
    reconstructor forward per step, episodes stay synchronized (same length), and it autoresets in the
    same step. :class:`~tokencompress_env.sb3_vec_env.TokenMaskSB3VecEnv` makes it an SB3 ``VecEnv``.

    ## Version History

    * v0: initial version.

    :param config: the env's options (``None``: the defaults, changed by ``options``)
    :param reconstructor: preset name or directory (an option), or (direct construction) a :class:`Reconstructor`
    :param windows: (direct construction) token-id windows replacing the corpus
    :param valid: (direct construction) real positions of ``windows``
    :param continuations: (direct construction, continuation reward) ``[N, continuation_tokens]`` ids following each window
    :param render_mode: ``None`` or ``"ansi"`` (the window as text, dropped tokens as the mask token)
    :param options: fields of :class:`~tokencompress_env.env_config.EnvConfig` by name
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi"], "render_fps": 4}  # noqa: RUF012 - Gymnasium's convention

    def __init__(
        self,
        config: EnvConfig | None = None,
        *,
        reconstructor: str | Path | Reconstructor | None = None,
        windows: np.ndarray | Sequence[Sequence[int]] | None = None,
        valid: np.ndarray | None = None,
        continuations: np.ndarray | None = None,
        render_mode: str | None = None,
        **options: Any,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(f"render_mode must be None or one of {self.metadata['render_modes']}, got '{render_mode}'")
        self.render_mode = render_mode
        self.config, model = env_config(config, reconstructor, options)
        self.core = build_core(1, self.config, model, windows, valid, continuations)
        self.reward_config = self.core.reward_config
        self.seq_len, self.chunk_size, self.units = self.config.seq_len, self.config.chunk_size, self.config.units
        self.observation_space = self.core.observation_space  # type: ignore[assignment]
        self.action_space = self.core.action_space

    def _obs(self) -> dict[str, np.ndarray]:
        return {key: value[0] for key, value in self.core.observation().items()}

    def _info(self) -> dict[str, Any]:
        return {key: value[0].item() if value.ndim == 1 else value[0].tolist() for key, value in self.core.infos().items()}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start an episode: draw a window and a target mask rate.

        :param seed: seed of the env's random generator
        :param options: ``{"target_mask_rate": r, "window_index": i}``, both optional
        :return: the first observation and the info
        """
        options = check_reset_options(options)
        super().reset(seed=seed)
        index, target = draw_episode(
            self.np_random, self.num_windows, self.config, options.get("target_mask_rate"), options.get("window_index")
        )
        self.core.start(np.array([index]), np.array([target]))
        return self._obs(), self._info()

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Decide the next chunk: drop the tokens whose action is 1 (unless force-kept or padding).

        :param action: ``chunk_size`` binary decisions, shape ``(chunk_size,)``
        :return: observation, reward, terminated, truncated, info
        """
        act = np.asarray(action)
        if act.shape != (self.chunk_size,):
            raise InputError(f"action must have shape ({self.chunk_size},): one 0 (keep) or 1 (drop) per token, got {act.shape}")
        outcome = self.core.step(act[None])
        return self._obs(), float(outcome.reward[0]), bool(self.core.done), False, self._info()

    def action_masks(self) -> np.ndarray:
        """Valid actions of the current chunk for MaskablePPO: ``[keep allowed, drop allowed]`` per position.

        :return: ``[2 * chunk_size]`` bool
        """
        return self.core.action_masks()[0]

    def render(self) -> str | None:
        """Render the window as text with dropped tokens shown as the mask token (``render_mode="ansi"``).

        :return: the text, or ``None`` without a render mode
        """
        if self.render_mode != "ansi":
            return None
        return self.core.render_text(0) + "\n"
