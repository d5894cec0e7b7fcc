"""The reconstructor: a GPT-2-family causal LM that recovers dropped tokens, and the scoring function.

A window ``x_0 .. x_{L-1}`` compressed by a boolean mask (``True`` = dropped) is shown to the model
as ``<bos>, x~_0, .., x~_{L-2}`` where ``x~_i`` is ``x_i`` when kept and the mask token when dropped.
The logits at input position ``i`` predict ``x_i`` from the compressed prefix ``x~_{<i}``, so one
forward pass gives, for every position, the **surprisal** ``-log2 p(x_i | x~_{<i})`` in bits and the
model's top guess. The distortion of a compression is the surprisal summed over the *dropped*
positions only (:attr:`ScoreResult.masked_bits`); kept tokens cost nothing.

:meth:`Reconstructor.score` is the one scoring function of the project: the environment, the vector
environment, the baselines and the evaluation all call it (or its cached-prefix twin
:meth:`Reconstructor.score_chunk`, which scores the next chunk of a window given a KV cache of the
chunks before it, so that scoring a whole episode chunk by chunk costs about one forward pass over
the window). :meth:`Reconstructor.training_loss` trains on exactly the same inputs.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase

from tokencompress_env.errors import ReconstructorLoadError
from tokencompress_env.paths import cache_root
from tokencompress_env.tokenizer import ensure_special_tokens

LN2 = math.log(2.0)

#: Offline presets: name -> GPT-2 configuration of the model the package trains itself.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 512},
    "test": {"n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 256},
}

#: File written beside the model that records how a preset reconstructor was built.
BUILD_INFO = "tokencompress.json"

ArrayLike = torch.Tensor | np.ndarray

# transformers 5 renamed ``past_key_values`` to ``cache`` (argument and output); support both.
_CACHE_ARG = "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Pick the torch device: ``"auto"`` prefers CUDA, then Apple's MPS, then the CPU.

    :param device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a device
    :return: the device
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


@dataclass
class ScoreResult:
    """What the reconstructor makes of a compressed batch; every tensor is ``[B, L]``.

    :param surprisal: bits of each true token given the compressed prefix (0 at padding)
    :param prediction: the reconstructor's top guess for each position
    :param correct: whether the top guess equals the true token (``False`` at padding)
    :param mask: the dropped positions (``False`` at padding)
    :param valid: the real (non-padding) positions
    """

    surprisal: torch.Tensor
    prediction: torch.Tensor
    correct: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor

    @property
    def masked_bits(self) -> torch.Tensor:
        """Distortion per position: the surprisal where a token was dropped, zero where it was kept.

        :return: ``[B, L]`` bits
        """
        return torch.where(self.mask, self.surprisal, torch.zeros_like(self.surprisal))

    @property
    def masked_correct(self) -> torch.Tensor:
        """Recovered dropped tokens: ``correct`` restricted to dropped positions.

        :return: ``[B, L]`` bool
        """
        return self.correct & self.mask


@dataclass
class ScoringState:
    """KV cache of a batch of windows being scored chunk by chunk (see :meth:`Reconstructor.score_chunk`).

    :param cache: the model's ``past_key_values`` (``None`` before the first chunk)
    :param last_input: ``[B]`` the compressed token that precedes the next chunk (``<bos>`` at first)
    :param position: tokens of each window scored so far
    """

    cache: Any
    last_input: torch.Tensor
    position: int = 0


def _as_tensor(x: ArrayLike, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Convert an array or tensor to a tensor of ``dtype`` on ``device`` (no copy when possible).

    :param x: the array
    :param dtype: the dtype
    :param device: the device
    :return: the tensor
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x.to(device=device, dtype=dtype)


class Reconstructor:
    """A causal LM plus its tokenizer that scores and fills compressed token windows.

    :param model: a GPT-2-family causal LM whose vocabulary includes the tokenizer's mask token
    :param tokenizer: its tokenizer, with ``mask_token`` and ``eos_token`` set
    :param device: where to run (``"auto"``: CUDA, MPS or CPU)
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str | torch.device = "auto") -> None:
        if tokenizer.mask_token_id is None:
            raise ReconstructorLoadError("the reconstructor's tokenizer has no mask token")
        self.device = resolve_device(device)
        self.model: PreTrainedModel = cast(Any, model).to(self.device)
        self.model.eval()
        self.tokenizer = tokenizer
        self.mask_token_id: int = int(tokenizer.mask_token_id)
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.bos_token_id: int = int(bos)
        self.pad_token_id: int = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos)

    # ------------------------------------------------------------------ construction
    @property
    def vocab_size(self) -> int:
        """Size of the model's output vocabulary.

        :return: number of token ids
        """
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_seq_len(self) -> int:
        """Longest window the model can score (its context minus the ``<bos>`` slot).

        :return: tokens
        """
        return int(self.model.config.n_positions) - 1

    @classmethod
    def new(
        cls, tokenizer: PreTrainedTokenizerBase, preset: str = "tiny", device: str | torch.device = "auto", seed: int = 0
    ) -> Reconstructor:
        """Create an untrained reconstructor of a preset size for ``tokenizer``.

        :param tokenizer: the tokenizer (with a mask token)
        :param preset: a key of :data:`PRESETS`
        :param device: where to run
        :param seed: seed of the weight initialisation
        :return: the reconstructor
        """
        if preset not in PRESETS:
            raise ReconstructorLoadError(f"unknown preset '{preset}': choose one of {sorted(PRESETS)}")
        config = GPT2Config(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **PRESETS[preset],
        )
        torch.manual_seed(seed)
        return cls(GPT2LMHeadModel(config), tokenizer, device)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "tiny", device: str | torch.device = "auto") -> Reconstructor:
        """Load a reconstructor from a preset name, a local directory, or a Hugging Face hub name.

        * ``"tiny"`` (the offline default): the package's own small GPT-2, built and cached on first
          use (see :func:`tokencompress_env.pretrain.default_reconstructor`).
        * a directory written by :meth:`save_pretrained` (or any local GPT-2 checkpoint).
        * a hub name such as ``"gpt2"`` or ``"distilgpt2"`` (needs the network); a mask token is
          added to its tokenizer and its embeddings grow by one.

        Weights are read from safetensors only; remote code is never trusted.

        :param name_or_path: preset, directory or hub name
        :param device: where to run
        :return: the reconstructor
        """
        name = str(name_or_path)
        if name in PRESETS:
            from tokencompress_env.pretrain import default_reconstructor

            return default_reconstructor(name, device=device)
        path = Path(name).expanduser()
        if path.exists():
            return cls._load_local(path, device)
        if name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise ReconstructorLoadError(f"reconstructor directory '{name}' does not exist")
        return cls._load_hub(name, device)

    @classmethod
    def _load_local(cls, path: Path, device: str | torch.device) -> Reconstructor:
        """Load a reconstructor directory, with a clear error when it is incomplete or corrupt.

        :param path: the directory
        :param device: where to run
        :return: the reconstructor
        """
        if not path.is_dir() or not (path / "config.json").exists():
            raise ReconstructorLoadError(f"'{path}' is not a reconstructor directory (no config.json)")
        if not (path / "model.safetensors").exists():
            raise ReconstructorLoadError(f"'{path}' holds no model.safetensors: only safetensors weights are loaded")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, use_safetensors=True, trust_remote_code=False)
        except Exception as exc:
            raise ReconstructorLoadError(
                f"could not load reconstructor from '{path}' (corrupt or partial?): {str(exc).splitlines()[0][:200]}"
            ) from None
        if ensure_special_tokens(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return cls(model, tokenizer, device)

    @classmethod
    def _load_hub(cls, name: str, device: str | torch.device) -> Reconstructor:
        """Load a GPT-2-family model and tokenizer from the Hugging Face hub and add a mask token.

        :param name: hub model name
        :param device: where to run
        :return: the reconstructor
        """
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, trust_remote_code=False)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ReconstructorLoadError(
                f"could not load reconstructor '{name}' from the Hugging Face hub ({first}). "
                "Offline? Use reconstructor 'tiny' (built locally) or a local directory."
            ) from None
        if ensure_special_tokens(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return cls(model, tokenizer, device)

    def save_pretrained(self, path: str | Path, build_info: dict[str, Any] | None = None) -> None:
        """Write the model (safetensors) and tokenizer to a directory.

        :param path: the directory (created)
        :param build_info: optional facts about how it was built, written to ``tokencompress.json``
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))
        if build_info is not None:
            (path / BUILD_INFO).write_text(json.dumps(build_info, indent=2, sort_keys=True))

    # ------------------------------------------------------------------ inputs shared by scoring and training
    def compressed_inputs(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Build the model input for a compressed batch: ``<bos>`` then the window with drops masked, minus its last token.

        :param input_ids: ``[B, L]`` true token ids
        :param mask: ``[B, L]`` ``True`` where a token is dropped
        :return: ``[B, L]`` input ids; position ``i`` of the output predicts ``input_ids[:, i]``
        """
        compressed = input_ids.masked_fill(mask, self.mask_token_id)
        bos = torch.full((input_ids.shape[0], 1), self.bos_token_id, dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([bos, compressed[:, :-1]], dim=1)

    def _result(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> ScoreResult:
        """Turn logits predicting ``targets`` into a :class:`ScoreResult`.

        :param logits: ``[B, L, V]``
        :param targets: ``[B, L]`` true ids
        :param mask: ``[B, L]`` dropped positions
        :param valid: ``[B, L]`` real positions
        :return: the scores
        """
        logits = logits.float()
        logits[..., self.mask_token_id] = -torch.inf  # the mask token is never a true token
        nats = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        surprisal = torch.where(valid, nats / LN2, torch.zeros_like(nats))
        prediction = logits.argmax(dim=-1)
        return ScoreResult(
            surprisal=surprisal,
            prediction=prediction,
            correct=(prediction == targets) & valid,
            mask=mask & valid,
            valid=valid,
        )

    def _prepare(self, input_ids: ArrayLike, mask: ArrayLike, valid: ArrayLike | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Move a batch to the device with the right dtypes; padding is never masked.

        :param input_ids: ``[B, L]`` ids
        :param mask: ``[B, L]`` dropped positions
        :param valid: ``[B, L]`` real positions (``None``: all)
        :return: ids, mask, valid as tensors
        """
        ids = _as_tensor(input_ids, torch.long, self.device)
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(ids.shape)}")
        valid_t = torch.ones_like(ids, dtype=torch.bool) if valid is None else _as_tensor(valid, torch.bool, self.device)
        mask_t = _as_tensor(mask, torch.bool, self.device) & valid_t
        if ids.shape[1] > self.max_seq_len:
            raise ValueError(f"window of {ids.shape[1]} tokens exceeds the reconstructor's context of {self.max_seq_len}")
        # Padding sits at the end of a window, so causal attention never lets it reach a real token.
        ids = torch.where(valid_t, ids, torch.full_like(ids, self.pad_token_id))
        return ids, mask_t, valid_t

    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the model on full compressed inputs (no cache) and return its logits.

        :param inputs: ``[B, L]`` from :meth:`compressed_inputs`
        :return: ``[B, L, V]`` logits
        """
        return self.model(input_ids=inputs, attention_mask=torch.ones_like(inputs), use_cache=False).logits

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, input_ids: ArrayLike, mask: ArrayLike, valid: ArrayLike | None = None) -> ScoreResult:
        """Score a batch of compressed windows in one forward pass.

        :param input_ids: ``[B, L]`` true token ids
        :param mask: ``[B, L]`` ``True`` where the token is dropped
        :param valid: ``[B, L]`` ``True`` at real tokens, ``False`` at right padding (``None``: all real)
        :return: surprisal, top guess and correctness of every position
        """
        ids, mask_t, valid_t = self._prepare(input_ids, mask, valid)
        logits = self._forward(self.compressed_inputs(ids, mask_t))
        return self._result(logits, ids, mask_t, valid_t)

    def begin_scoring(self, batch_size: int) -> ScoringState:
        """Start scoring ``batch_size`` windows chunk by chunk.

        :param batch_size: number of windows
        :return: an empty scoring state
        """
        return ScoringState(cache=None, last_input=torch.full((batch_size,), self.bos_token_id, dtype=torch.long, device=self.device))

    @torch.no_grad()
    def score_chunk(self, state: ScoringState, input_ids: ArrayLike, mask: ArrayLike, valid: ArrayLike | None = None) -> ScoreResult:
        """Score the next chunk of each window given the cached compressed prefix; updates ``state``.

        Scoring a window chunk by chunk gives the same numbers as :meth:`score` on the whole window
        (up to float rounding) at the cost of about one forward pass over the window in total.

        :param state: from :meth:`begin_scoring`, advanced by each call
        :param input_ids: ``[B, k]`` true ids of the chunk
        :param mask: ``[B, k]`` dropped positions in the chunk
        :param valid: ``[B, k]`` real positions in the chunk (``None``: all)
        :return: the chunk's scores, ``[B, k]`` each
        """
        ids, mask_t, valid_t = self._prepare(input_ids, mask, valid)
        if state.position + ids.shape[1] > self.max_seq_len:
            raise ValueError(f"scoring past the reconstructor's context of {self.max_seq_len} tokens")
        compressed = ids.masked_fill(mask_t, self.mask_token_id)
        inputs = torch.cat([state.last_input[:, None], compressed[:, :-1]], dim=1)
        attention = torch.ones((ids.shape[0], state.position + ids.shape[1]), dtype=torch.long, device=self.device)
        out = self.model(input_ids=inputs, attention_mask=attention, use_cache=True, **{_CACHE_ARG: state.cache})
        state.cache = getattr(out, _CACHE_ARG)
        state.last_input = compressed[:, -1]
        state.position += ids.shape[1]
        return self._result(out.logits, ids, mask_t, valid_t)

    @torch.no_grad()
    def surprisal(self, input_ids: ArrayLike, valid: ArrayLike | None = None) -> torch.Tensor:
        """Bits of each token given the *uncompressed* prefix (the self-information of Selective Context).

        :param input_ids: ``[B, L]`` ids
        :param valid: ``[B, L]`` real positions (``None``: all)
        :return: ``[B, L]`` bits (0 at padding)
        """
        ids = _as_tensor(input_ids, torch.long, self.device)
        return self.score(ids, torch.zeros_like(ids, dtype=torch.bool), valid).surprisal

    @torch.no_grad()
    def fill(self, input_ids: ArrayLike, mask: ArrayLike, valid: ArrayLike | None = None) -> torch.Tensor:
        """Greedy reconstruction: replace every dropped token by the reconstructor's top guess.

        :param input_ids: ``[B, L]`` ids (values at dropped positions are not used)
        :param mask: ``[B, L]`` dropped positions
        :param valid: ``[B, L]`` real positions (``None``: all)
        :return: ``[B, L]`` reconstructed ids
        """
        result = self.score(input_ids, mask, valid)
        ids = _as_tensor(input_ids, torch.long, self.device)
        return torch.where(result.mask, result.prediction, ids)

    def fill_text(self, input_ids: ArrayLike, mask: ArrayLike, valid: ArrayLike | None = None) -> list[str]:
        """Greedy reconstruction decoded to text, one string per window.

        :param input_ids: ``[B, L]`` ids
        :param mask: ``[B, L]`` dropped positions
        :param valid: ``[B, L]`` real positions (``None``: all)
        :return: the reconstructed texts
        """
        filled = self.fill(input_ids, mask, valid).cpu().numpy()
        valid_np = np.ones_like(filled, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        return [str(self.tokenizer.decode(row[v].tolist())) for row, v in zip(filled, valid_np, strict=True)]

    # ------------------------------------------------------------------ training
    def training_loss(self, input_ids: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy (nats) of every real token given its compressed prefix, with gradients.

        Predicting ``x_i`` from ``x~_{<i}`` is the same task whether ``x_i`` itself is dropped or
        kept, so every real position is a training target; the masks shape the contexts.

        :param input_ids: ``[B, L]`` ids on the model's device
        :param mask: ``[B, L]`` dropped positions
        :param valid: ``[B, L]`` real positions (``None``: all)
        :return: a scalar loss
        """
        ids, mask_t, valid_t = self._prepare(input_ids, mask, valid)
        logits = self._forward(self.compressed_inputs(ids, mask_t)).float()
        nats = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        return (nats * valid_t).sum() / valid_t.sum().clamp(min=1)

    def num_parameters(self) -> int:
        """Count the model's parameters.

        :return: the count
        """
        return sum(p.numel() for p in self.model.parameters())


def default_reconstructor_dir(preset: str = "tiny") -> Path:
    """Where the offline preset reconstructor is cached.

    :param preset: a key of :data:`PRESETS`
    :return: ``<cache root>/reconstructors/<preset>``
    """
    return cache_root() / "reconstructors" / preset
