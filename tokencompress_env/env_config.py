"""The configuration of TokenMask-v0, declared, defaulted and documented once: :class:`EnvConfig`.

The single env, the vector env and the reward all read their options from an :class:`EnvConfig`, and the
training script's config takes its environment options from its fields (:func:`~tokencompress_env.options.option_of`).
Gymnasium users keep passing plain keywords (``gymnasium.make("TokenMask-v0", seq_len=64)``): the env
constructors turn them into an :class:`EnvConfig` with :meth:`EnvConfig.from_options`.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokencompress_env.errors import ConfigError
from tokencompress_env.options import option
from tokencompress_env.reconstructor import SCORING_DTYPES
from tokencompress_env.reward import RewardConfig
from tokencompress_env.units import check_units

#: Older keyword of the target range, still accepted by the env constructors: ``mask_rate_range=(min, max)``.
MASK_RATE_RANGE = "mask_rate_range"


@dataclass(frozen=True)
class EnvConfig(RewardConfig):
    """Every option of TokenMask-v0 (the reward coefficients of :class:`RewardConfig` first), each documented at its field.

    Frozen; validated on construction (a :class:`~tokencompress_env.errors.ConfigError` says what to change).
    """

    corpus: str = option(
        "embedded", "corpus source ('embedded', a .txt path or folder, 'hf:NAME'), cut into windows in the reconstructor's tokenizer"
    )
    split: str = option("train", "corpus split: 'train', 'validation' or 'test' (documents never cross splits)")
    reconstructor: str = option("tiny", "the scoring reconstructor: a preset name (built and cached on first use) or a directory")
    seq_len: int = option(128, "tokens per window (at most the reconstructor's context)")
    chunk_size: int = option(16, "tokens decided per step (must divide seq_len)")
    mask_rate_min: float = option(0.2, "lowest per-episode target mask rate (the target is drawn uniformly in [min, max])")
    mask_rate_max: float = option(0.8, "highest per-episode target mask rate")
    observe_surprisal: bool = option(
        False, "add the 'surprisal' observation: the reconstructor's bits of each original token (one extra forward pass per episode)"
    )
    keep_digits: bool = option(False, "force-keep every token that contains an ASCII digit")
    force_keep_strings: tuple[str, ...] = option((), "strings whose occurrences are force-kept (every token of an occurrence)")
    units: str = option("piece", "what is dropped or kept together: 'piece' (whole characters) or 'word' (whole words)")
    device: str = option("auto", "where a named reconstructor runs: 'auto' (CUDA, MPS or CPU), 'cpu', 'cuda' or 'mps'")
    scoring_dtype: str = option(
        "auto",
        "precision of the reconstructor's forward passes: 'auto' (bfloat16 where the hardware multiplies it natively: CUDA, "
        "or a CPU with AMX; float32 elsewhere), 'float32', 'bfloat16' or 'float16'. Weights and their fine-tuning stay float32",
    )

    def __post_init__(self) -> None:
        check_option_types(
            {"seq_len": self.seq_len, "chunk_size": self.chunk_size, "continuation_tokens": self.continuation_tokens},
            {"observe_surprisal": self.observe_surprisal, "keep_digits": self.keep_digits},
            {"corpus": self.corpus, "split": self.split, "scoring_dtype": self.scoring_dtype, "device": self.device},
        )
        check_units(self.units)
        strings = self.force_keep_strings
        if not isinstance(strings, str) and (not isinstance(strings, Sequence) or not all(isinstance(x, str) for x in strings)):
            raise ConfigError(f"force_keep_strings must be a string or a list of strings, got {strings!r}")
        object.__setattr__(self, "force_keep_strings", (strings,) if isinstance(strings, str) else tuple(strings))
        object.__setattr__(self, "reconstructor", str(self.reconstructor))
        if self.seq_len < 1 or self.chunk_size < 1:
            raise ConfigError(f"seq_len and chunk_size must be positive, got {self.seq_len} and {self.chunk_size}")
        if self.seq_len % self.chunk_size != 0:
            raise ConfigError(f"seq_len ({self.seq_len}) must be a multiple of chunk_size ({self.chunk_size})")
        if self.reward_type == "continuation" and not 1 <= self.continuation_tokens < self.seq_len:
            raise ConfigError(
                f"continuation_tokens must be at least 1 and fewer than seq_len ({self.seq_len}) with reward_type='continuation', "
                f"got {self.continuation_tokens}: the reconstructor reads the window's last seq_len - continuation_tokens tokens "
                "before the continuation"
            )
        if self.scoring_dtype not in SCORING_DTYPES:
            raise ConfigError(f"scoring_dtype must be one of {SCORING_DTYPES}, got '{self.scoring_dtype}'")
        try:
            low, high = float(self.mask_rate_min), float(self.mask_rate_max)
        except (TypeError, ValueError):
            raise ConfigError(
                f"mask_rate_min and mask_rate_max must be numbers, got {self.mask_rate_min!r} and {self.mask_rate_max!r}"
            ) from None
        if not 0.0 <= low <= high <= 1.0:
            raise ConfigError(f"mask rates must satisfy 0 <= mask_rate_min <= mask_rate_max <= 1, got {low} and {high}")
        object.__setattr__(self, "mask_rate_min", low)
        object.__setattr__(self, "mask_rate_max", high)
        super().__post_init__()

    @classmethod
    def from_options(cls, config: EnvConfig | None = None, **options: Any) -> EnvConfig:
        """An :class:`EnvConfig` from keyword options (those of ``gymnasium.make``), over ``config`` or the defaults.

        ``mask_rate_range=(min, max)`` is accepted for ``mask_rate_min`` and ``mask_rate_max``.

        :param config: the config the options change (``None``: the defaults)
        :param options: field name -> value
        :return: the config
        """
        if MASK_RATE_RANGE in options:
            if "mask_rate_min" in options or "mask_rate_max" in options:
                raise ConfigError(f"give {MASK_RATE_RANGE} or mask_rate_min/mask_rate_max, not both")
            options["mask_rate_min"], options["mask_rate_max"] = check_mask_rate_range(options.pop(MASK_RATE_RANGE))
        names = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown TokenMask-v0 option '{key}'{hint}; valid options: {', '.join(sorted(names))}")
        return dataclasses.replace(config, **options) if config is not None else cls(**options)


def check_option_types(integers: dict[str, Any], flags: dict[str, Any], strings: dict[str, Any]) -> None:
    """Reject environment options of the wrong type (``gymnasium.make`` passes them through unchecked).

    :param integers: name -> value that must be an integer (not a bool)
    :param flags: name -> value that must be a bool (``"no"`` is not one)
    :param strings: name -> value that must be a string
    """
    for name, value in integers.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ConfigError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    for name, value in strings.items():
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r} ({type(value).__name__})")


def check_mask_rate_range(mask_rate_range: Sequence[float]) -> tuple[float, float]:
    """Validate a ``(low, high)`` target range given as ``mask_rate_range``.

    :param mask_rate_range: ``(low, high)``
    :return: the range as a tuple of floats
    """
    try:
        low, high = (float(x) for x in mask_rate_range)
    except (TypeError, ValueError):
        raise ConfigError(f"{MASK_RATE_RANGE} must be a pair (low, high), got {mask_rate_range!r}") from None
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"{MASK_RATE_RANGE} must satisfy 0 <= low <= high <= 1, got {tuple(mask_rate_range)}")
    return low, high
