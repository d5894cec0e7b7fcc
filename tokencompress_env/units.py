r"""Units: the groups of tokens that are dropped or kept together, so that compressed text stays whole.

The tokenizer is byte-level: a character of several UTF-8 bytes (accented letters, CJK, emoji) can be
spread over several tokens, and dropping one of them leaves half a character. Every compressor of the
project therefore decides per *unit*, never per token:

* ``"piece"``: the minimal token spans that decode to whole characters. A token starts a new piece
  unless its first byte is a UTF-8 continuation byte (``0b10xxxxxx``), which belongs to a character
  begun by the token before. Most tokens are a piece of their own; a CJK character split over two
  tokens is one piece of two tokens. Special tokens are pieces of their own.
* ``"word"``: pieces grouped into words, close to how GPT-2's pre-tokenizer cuts text, so that dropping
  a word never glues its neighbours together. A new word starts at a piece that begins with
  whitespace, or whose first character is of another class than the last character of the piece
  before (classes: letters and combining marks, digits, whitespace, anything else), except that
  (a) a whitespace-only piece (``" "``, a newline, indentation) starts the word that follows it, as in
  the pre-tokenizer's ``" ?\p{L}+"``; (b) punctuation right after a letter or digit stays with that
  word (``"reasons."``, ``"os."``, ``"你好，"``); (c) letters after a lone apostrophe go on its word
  (``"John's"``). So ``" Michigan"`` (``" Mich"`` + ``"igan"``) is one unit, ``" 1926,"`` one,
  ``"\n\nThe"`` ends in the unit ``"\nThe"``; a run of CJK characters up to its punctuation is one
  word, as for the pre-tokenizer.

:func:`unit_starts` marks where units begin (from token ids alone, so the environment, the evaluation
and :meth:`~tokencompress_env.compressor.Compressor.compress` group the same windows the same way);
:func:`unit_index` numbers them; :func:`spread_to_units` makes a flag (force-keep) cover whole units;
:func:`decode_ids` turns kept ids back into text byte for byte.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokencompress_env.errors import ConfigError

#: The unit kinds, finest first.
UNIT_KINDS = ("piece", "word")

# Character classes of the word rule (UNKNOWN: the character is not complete inside one token).
_UNKNOWN, _SPACE, _LETTER, _NUMBER, _OTHER, _SPECIAL = range(6)


def check_units(units: Any) -> str:
    """Validate a unit kind.

    :param units: ``"piece"`` or ``"word"``
    :return: the kind
    """
    if not isinstance(units, str) or units not in UNIT_KINDS:
        raise ConfigError(f"units must be one of {', '.join(repr(u) for u in UNIT_KINDS)}, got {units!r}")
    return units


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character map (how byte-level BPE spells bytes).

    :return: character -> byte
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _char_class(ch: str) -> int:
    """The word-rule class of a character.

    :param ch: one character
    :return: ``_SPACE``, ``_LETTER``, ``_NUMBER`` or ``_OTHER``
    """
    if ch.isspace():
        return _SPACE
    category = unicodedata.category(ch)
    if category[0] in "LM":
        return _LETTER
    if category[0] == "N":
        return _NUMBER
    return _OTHER


@dataclass
class TokenTable:
    """Per-vocabulary-entry facts of a tokenizer that the unit rules need.

    :param raw: the bytes of each token id (special tokens: their text in UTF-8)
    :param special: ``[V]`` bool, special (added) tokens
    :param continues: ``[V]`` bool, the token's first byte is a UTF-8 continuation byte
    :param first_class: ``[V]`` class of the token's first character (``_UNKNOWN`` when incomplete)
    :param last_class: ``[V]`` class of the token's last character (``_UNKNOWN`` when it starts in an earlier token)
    :param all_space: ``[V]`` bool, the token is whitespace only (a space, a newline, indentation)
    :param apostrophe: ``[V]`` bool, the token is exactly an apostrophe (``'`` or ``’``)
    """

    raw: list[bytes]
    special: np.ndarray
    continues: np.ndarray
    first_class: np.ndarray
    last_class: np.ndarray
    all_space: np.ndarray
    apostrophe: np.ndarray


_TABLES: dict[int, tuple[Any, TokenTable]] = {}


def token_table(tokenizer: Any) -> TokenTable:
    """The :class:`TokenTable` of a tokenizer, computed once per tokenizer object.

    Byte-level tokens are read through GPT-2's byte alphabet; a token outside it (another tokenizer
    family) is taken as its decoded text in UTF-8.

    :param tokenizer: a Hugging Face tokenizer
    :return: the table
    """
    key = id(tokenizer)
    cached = _TABLES.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    size = len(tokenizer)
    decoder = _byte_decoder()
    special_ids = {i for i in tokenizer.all_special_ids if i is not None}
    special_ids |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    raw: list[bytes] = []
    special = np.zeros(size, dtype=bool)
    continues = np.zeros(size, dtype=bool)
    first = np.full(size, _UNKNOWN, dtype=np.int8)
    last = np.full(size, _UNKNOWN, dtype=np.int8)
    spaces = np.zeros(size, dtype=bool)
    apostrophe = np.zeros(size, dtype=bool)
    for i, tok in enumerate(tokens):
        if i in special_ids or tok is None:
            raw.append((tok or "").encode("utf-8"))
            special[i] = True
            first[i] = last[i] = _SPECIAL
            continue
        if all(c in decoder for c in tok):
            data = bytes(decoder[c] for c in tok)
        else:
            data = tokenizer.decode([i]).encode("utf-8")
        raw.append(data)
        if not data:
            continue
        continues[i] = 0x80 <= data[0] < 0xC0
        text = data.decode("utf-8", errors="ignore")
        spaces[i] = data.isspace()
        apostrophe[i] = data in (b"'", "\u2019".encode())
        if not text:
            continue
        if not continues[i] and text[0].encode("utf-8") == data[: len(text[0].encode("utf-8"))]:
            first[i] = _char_class(text[0])
        if data.endswith(text[-1].encode("utf-8")):
            last[i] = _char_class(text[-1])
    table = TokenTable(raw, special, continues, first, last, spaces, apostrophe)
    _TABLES[key] = (tokenizer, table)
    return table


def _group_text(table: TokenTable, ids: np.ndarray, start: int, stop: int) -> str:
    """The text of tokens ``[start, stop)`` of one row (whole characters only).

    :param table: the token table
    :param ids: the row's ids
    :param start: first token
    :param stop: one past the last token
    :return: the decoded text (incomplete bytes ignored)
    """
    return b"".join(table.raw[int(i)] for i in ids[start:stop]).decode("utf-8", errors="ignore")


def unit_starts(token_ids: np.ndarray, valid: np.ndarray | None, tokenizer: Any, units: str = "piece") -> np.ndarray:
    """Where each unit begins: ``True`` at the first token of every unit.

    Padding positions (``valid`` false) are units of their own, and position 0 always starts one. A
    window cut in the middle of a character (a corpus window) starts with a unit of the orphan bytes.

    :param token_ids: ``[N, L]`` ids (or ``[L]``)
    :param valid: ``[N, L]`` real positions (``None``: all)
    :param tokenizer: the tokenizer of the ids
    :param units: ``"piece"`` or ``"word"`` (see the module docstring)
    :return: bool array of ``token_ids``' shape
    """
    check_units(units)
    ids = np.asarray(token_ids, dtype=np.int64)
    squeeze = ids.ndim == 1
    ids = ids[None] if squeeze else ids
    real = np.ones(ids.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool).reshape(ids.shape)
    table = token_table(tokenizer)
    safe = np.clip(ids, 0, len(table.raw) - 1)
    special = table.special[safe]
    starts = ~table.continues[safe] | special
    starts[:, 1:] |= special[:, :-1]
    if units == "word" and ids.shape[1] > 1:
        first = table.first_class[safe]
        last = table.last_class[safe]
        # At a piece start i > 0: does the word go on from the piece that ends at i - 1?
        prev_last = last[:, :-1]
        cur_first = first[:, 1:]
        piece_start = starts[:, 1:].copy()
        unknown = piece_start & ((prev_last == _UNKNOWN) | (cur_first == _UNKNOWN))
        for r, j in zip(*np.nonzero(unknown), strict=True):  # characters spread over tokens: decode them
            i = j + 1
            row = ids[r]
            stop = i + 1
            while stop < ids.shape[1] and not starts[r, stop]:
                stop += 1
            begin = i - 1
            while begin > 0 and not starts[r, begin]:
                begin -= 1
            head, tail = _group_text(table, row, i, stop), _group_text(table, row, begin, i)
            cur_first[r, j] = _char_class(head[0]) if head else _OTHER
            prev_last[r, j] = _char_class(tail[-1]) if tail else _OTHER
        space_before = table.all_space[safe[:, :-1]] & starts[:, :-1]
        goes_on = (cur_first == prev_last) & (cur_first != _SPACE) & (cur_first != _SPECIAL)
        goes_on |= space_before & (cur_first != _SPACE) & (cur_first != _SPECIAL)
        goes_on |= (cur_first == _OTHER) & ((prev_last == _LETTER) | (prev_last == _NUMBER))
        goes_on |= table.apostrophe[safe[:, :-1]] & starts[:, :-1] & (cur_first == _LETTER)
        starts[:, 1:] = piece_start & ~goes_on
    starts |= ~real
    starts[:, 1:] |= ~real[:, :-1]
    starts[:, 0] = True
    return starts[0] if squeeze else starts


def unit_index(starts: np.ndarray) -> np.ndarray:
    """Number the units of each row from 0, left to right.

    :param starts: ``[N, L]`` bool from :func:`unit_starts`
    :return: ``[N, L]`` int64 unit number of every position
    """
    return np.cumsum(np.asarray(starts, dtype=np.int64), axis=-1) - 1


def unit_heads(starts: np.ndarray) -> np.ndarray:
    """The position of the first token of each position's unit.

    :param starts: ``[N, L]`` bool from :func:`unit_starts`
    :return: ``[N, L]`` int64 positions
    """
    positions = np.where(np.asarray(starts, dtype=bool), np.arange(starts.shape[-1]), 0)
    return np.maximum.accumulate(positions, axis=-1)


def spread_to_units(flags: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Extend a per-token flag to every token of a unit that has it anywhere (force-keep covers whole units).

    :param flags: ``[N, L]`` bool
    :param starts: ``[N, L]`` bool from :func:`unit_starts`
    :return: ``[N, L]`` bool
    """
    flags = np.asarray(flags, dtype=bool)
    index = unit_index(starts)
    n, length = flags.shape
    flat = (index + (np.arange(n) * length)[:, None]).ravel()
    any_flag = np.bincount(flat, weights=flags.ravel(), minlength=n * length) > 0
    return any_flag[flat].reshape(n, length)


def decode_ids(tokenizer: Any, ids: Sequence[int] | np.ndarray) -> str:
    """Decode token ids byte for byte (no clean-up of spaces): the text the tokens spell.

    Bytes that do not form whole characters (only possible when units were not respected) become
    U+FFFD.

    :param tokenizer: the tokenizer of the ids
    :param ids: token ids
    :return: the text
    """
    raw = token_table(tokenizer).raw
    return b"".join([raw[i] for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist()]).decode("utf-8", errors="replace")
