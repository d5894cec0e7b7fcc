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

Two options make scoring cheaper without changing what it means:

* ``positions="masked"`` runs the output layer (the ``[d, vocab]`` matrix product and the softmax)
  only at the dropped positions, the only ones whose surprisal a distortion needs; kept positions
  report 0 bits and their own token as the guess.
* ``dtype`` scores with a copy of the model in another precision (``torch.bfloat16`` where the hardware
  multiplies it natively: CUDA, or a CPU with AMX). The copy is made once and refreshed whenever the
  float32 master weights change (an optimizer step, a ``load_state_dict``), so joint training keeps
  float32 weights while the environment scores in bfloat16. :func:`resolve_scoring_dtype` turns the
  names ``"auto"``, ``"float32"``, ``"bfloat16"`` and ``"float16"`` into a dtype.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import NewGELUActivation

from tokencompress_env.errors import ConfigError, ReconstructorLoadError
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
CACHE_ARG = "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Pick the torch device: ``"auto"`` prefers CUDA, then Apple's MPS, then the CPU.

    :param device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a device
    :return: the device
    :raises ConfigError: for an unknown device, or one this machine does not have (``"cuda"`` without a GPU)
    """
    if isinstance(device, torch.device):
        return device
    mps_available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available:
            return torch.device("mps")
        return torch.device("cpu")
    resolved = parse_device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} is not available on this machine (torch sees no CUDA GPU): use --device cpu or auto")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if resolved.type == "mps" and not mps_available:
        raise ConfigError(f"device {device!r} is not available on this machine (no Apple MPS): use --device cpu or auto")
    return resolved


def parse_device(device: str) -> torch.device:
    """Check a device name without asking whether this machine has it (configs for other machines validate).

    :param device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"``
    :return: the device (``cpu`` for ``"auto"``)
    :raises ConfigError: for a name torch does not know or this project does not run on
    """
    if device == "auto":
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda (or cuda:N) or mps") from None
    if resolved.type not in {"cpu", "cuda", "mps"}:
        raise ConfigError(f"unsupported device {device!r}: use auto, cpu, cuda (or cuda:N) or mps")
    return resolved


#: Names accepted by :func:`resolve_scoring_dtype` (the ``scoring_dtype`` of TokenMask-v0).
SCORING_DTYPES = ("auto", "float32", "bfloat16", "float16")

#: Which positions :meth:`Reconstructor.score` and :meth:`Reconstructor.score_chunk` run the output layer at.
Positions = Literal["all", "masked"]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX), where bfloat16 beats float32.

    :return: ``True`` with AMX tiles, ``False`` otherwise (or when torch cannot tell)
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:
        return False


def resolve_scoring_dtype(name: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """Turn a scoring precision name into a dtype.

    ``"auto"`` picks ``torch.bfloat16`` where it is native and fast (a CUDA device that supports it, or
    a CPU with AMX, see :func:`cpu_has_native_bf16`) and ``torch.float32`` elsewhere (older CPUs
    emulate bfloat16 slowly; Apple's MPS keeps float32).

    :param name: ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``, a dtype, or ``None`` (float32)
    :param device: the device the reconstructor runs on
    :return: the dtype
    """
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float16":
        return torch.float16
    if name == "auto":
        kind = torch.device(device).type
        if kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if kind == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    raise ValueError(f"scoring dtype must be one of {SCORING_DTYPES}, got '{name}'")


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
    :param dtype: precision the windows are scored in (``None``: the model's own)
    """

    cache: Any
    last_input: torch.Tensor
    position: int = 0
    dtype: torch.dtype | None = None


def _splits_head(model: PreTrainedModel) -> bool:
    """Whether a model's logits are its output embedding applied to its trunk's last hidden state (GPT-2).

    For such a model the output layer can run at chosen positions only; any other model is run whole.

    :param model: a causal LM
    :return: ``True`` for GPT-2 models
    """
    return getattr(model.config, "model_type", None) == "gpt2"


class GradAwareTanhGelu(NewGELUActivation):
    """GPT-2's tanh GELU that runs as PyTorch's one-kernel version whenever no gradient is recorded.

    With gradients (pretraining, fine-tuning) it is exactly :class:`~transformers.activations.NewGELUActivation`,
    so training is unchanged to the bit; without (every scoring forward pass: rewards, labels, baselines,
    evaluation) it is ``F.gelu(x, approximate="tanh")``, the same function rounded once instead of after
    each of its five operations: about 20% faster scoring of the ``tiny`` reconstructor on a CPU, and
    surprisal within a few millionths of a bit of the composite version. In a low-precision scoring copy
    (:meth:`Reconstructor.inference_model`) the single rounding also keeps bfloat16 accurate.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Apply the activation.

        :param input: any tensor
        :return: the activation, fused when no gradient is recorded
        """
        if torch.is_grad_enabled():
            return super().forward(input)
        return F.gelu(input, approximate="tanh")


def _grad_aware_tanh_gelu(model: torch.nn.Module) -> None:
    """Let the master model's tanh GELUs run fused in no-grad forward passes (:class:`GradAwareTanhGelu`).

    :param model: the model, changed in place (modules of other activations are left alone)
    """
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GradAwareTanhGelu())


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
        _grad_aware_tanh_gelu(self.model)
        self.tokenizer = tokenizer
        self.mask_token_id: int = int(tokenizer.mask_token_id)
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.bos_token_id: int = int(bos)
        self.pad_token_id: int = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos)
        #: Scoring copies of the model in other precisions: dtype -> (fingerprint of the master weights, copy).
        self._inference_copies: dict[torch.dtype, tuple[tuple[tuple[int, int], ...], PreTrainedModel]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_inference_copies"] = {}  # rebuilt on demand; never pickled twice over
        return state

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

        * ``"tiny"`` (the offline default) or ``"test"``: the package's own small GPT-2, read from the
          cache. Loading never builds: a preset not built yet is an error that names the command that
          builds it (entry points build it first with :func:`tokencompress_env.presets.load_or_build`).
        * a directory written by :meth:`save_pretrained` (or any local GPT-2 checkpoint).
        * a hub name such as ``"gpt2"`` or ``"distilgpt2"`` (needs the network); a mask token is
          added to its tokenizer and its embeddings grow by one.

        Weights are read from safetensors only; remote code is never trusted.

        :param name_or_path: preset, directory or hub name
        :param device: where to run
        :return: the reconstructor
        :raises ReconstructorLoadError: for a preset not built yet, a missing or broken directory, or a hub
            name that cannot be fetched
        """
        name = str(name_or_path)
        if name in PRESETS:
            preset_dir = default_reconstructor_dir(name)
            if not (preset_dir / "model.safetensors").exists():
                raise ReconstructorLoadError(
                    f"the '{name}' reconstructor is not built yet (no {preset_dir / 'model.safetensors'}): build it with "
                    f"'python -m experiments.pretrain_reconstructor --preset {name}' "
                    f"(or tokencompress_env.presets.ensure_preset('{name}'))"
                )
            return cls._load_local(preset_dir, device)
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

    def _result(
        self,
        model: PreTrainedModel,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
        valid: torch.Tensor,
        positions: Positions,
    ) -> ScoreResult:
        """Run the output layer at the scored positions and turn it into a :class:`ScoreResult`.

        :param model: the model whose output layer to use (the one that produced ``hidden``)
        :param hidden: ``[B, L, d]`` final hidden states, or ``[B, L, V]`` logits for a model whose head cannot be split off
        :param targets: ``[B, L]`` true ids
        :param mask: ``[B, L]`` dropped positions
        :param valid: ``[B, L]`` real positions
        :param positions: ``"all"`` or ``"masked"`` (kept positions: 0 bits, their own token as the guess)
        :return: the scores
        """
        if positions not in ("all", "masked"):
            raise ValueError(f"positions must be 'all' or 'masked', got '{positions}'")
        rows = hidden.reshape(-1, hidden.shape[-1])
        index = None if positions == "all" else mask.reshape(-1).nonzero().squeeze(1)
        if index is not None:
            rows = rows.index_select(0, index)
        flat_targets = targets.reshape(-1) if index is None else targets.reshape(-1).index_select(0, index)
        if rows.shape[0] > 0:
            head = model.get_output_embeddings() if _splits_head(model) else None
            logits = (head(rows) if head is not None else rows).float()
            logits[:, self.mask_token_id] = -torch.inf  # the mask token is never a true token
            bits = (torch.logsumexp(logits, dim=-1) - logits.gather(1, flat_targets[:, None]).squeeze(1)) / LN2
            guess = logits.argmax(dim=-1)
        else:
            bits, guess = rows.new_zeros(0, dtype=torch.float32), flat_targets
        if index is None:
            surprisal, prediction = bits.view_as(targets), guess.view_as(targets)
        else:
            surprisal = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
            surprisal.view(-1).index_copy_(0, index, bits)
            prediction = targets.clone()
            prediction.view(-1).index_copy_(0, index, guess)
        surprisal = torch.where(valid, surprisal, torch.zeros_like(surprisal))
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

    def _forward(self, inputs: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Run the master model on full compressed inputs (no cache) and return its logits (training).

        :param inputs: ``[B, L]`` from :meth:`compressed_inputs`
        :param model: the module to run (``None``: the master model; a distributed wrapper of it in multi-process training)
        :return: ``[B, L, V]`` logits
        """
        module = self.model if model is None else model
        return module(input_ids=inputs, attention_mask=torch.ones_like(inputs), use_cache=False).logits

    def _trunk(
        self,
        model: PreTrainedModel,
        inputs: torch.Tensor,
        attention: torch.Tensor,
        state: ScoringState | None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run a model up to its output layer: final hidden states (logits if its head cannot be split off).

        :param model: the model (the master or an inference copy)
        :param inputs: ``[B, l]`` compressed input ids
        :param attention: ``[B, cached + l]`` ones (zeros at left padding)
        :param state: a chunked-scoring state whose KV cache is used and advanced, or ``None`` (no cache)
        :param position_ids: ``[B, l]`` positions (``None``: the model's default ``0 .. l-1``; left-padded
            inputs must pass them, since GPT-2 does not derive them from the attention mask)
        :return: ``[B, l, d]`` hidden states (or ``[B, l, V]`` logits)
        """
        use_cache = state is not None
        cache: dict[str, Any] = {CACHE_ARG: state.cache} if state is not None else {}
        if position_ids is not None:
            cache["position_ids"] = position_ids
        if _splits_head(model):
            out = model.base_model(input_ids=inputs, attention_mask=attention, use_cache=use_cache, **cache)
            hidden = out.last_hidden_state
        else:
            out = model(input_ids=inputs, attention_mask=attention, use_cache=use_cache, **cache)
            hidden = out.logits
        if state is not None:
            state.cache = getattr(out, CACHE_ARG)
        return hidden

    def inference_model(self, dtype: torch.dtype | None = None) -> PreTrainedModel:
        """The model to score with in ``dtype``: the master model itself, or a cached copy in another precision.

        The copy is refreshed (weights copied over) whenever the master's parameters changed since it was
        made: every in-place update (optimizer step, ``load_state_dict``) advances a tensor's version
        counter, and a moved or replaced tensor has another storage.

        :param dtype: the precision (``None`` or the master's own: the master)
        :return: a model in eval mode (the master keeps whatever mode it is in)
        """
        master = self.model
        if dtype is None or dtype == master.dtype:
            return master
        params = list(master.parameters())
        fingerprint = tuple((p.data_ptr(), p._version) for p in params)
        cached = self._inference_copies.get(dtype)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        with torch.no_grad():
            if cached is None:
                model = cast(PreTrainedModel, cast(Any, copy.deepcopy(master)).to(dtype=dtype))
                model.eval()
                model.requires_grad_(False)  # scores without gradients: its GELUs run fused (GradAwareTanhGelu)
            else:
                model = cached[1]
                for target, source in zip(model.parameters(), params, strict=True):
                    target.copy_(source)
        self._inference_copies[dtype] = (fingerprint, model)
        return model

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(
        self,
        input_ids: ArrayLike,
        mask: ArrayLike,
        valid: ArrayLike | None = None,
        *,
        dtype: torch.dtype | None = None,
        positions: Positions = "all",
    ) -> ScoreResult:
        """Score a batch of compressed windows in one forward pass.

        :param input_ids: ``[B, L]`` true token ids
        :param mask: ``[B, L]`` ``True`` where the token is dropped
        :param valid: ``[B, L]`` ``True`` at real tokens, ``False`` at right padding (``None``: all real)
        :param dtype: precision to score in (``None``: the model's own, float32)
        :param positions: ``"all"``, or ``"masked"`` to run the output layer at dropped positions only
        :return: surprisal, top guess and correctness of every position
        """
        ids, mask_t, valid_t = self._prepare(input_ids, mask, valid)
        model = self.inference_model(dtype)
        inputs = self.compressed_inputs(ids, mask_t)
        hidden = self._trunk(model, inputs, torch.ones_like(inputs), None)
        return self._result(model, hidden, ids, mask_t, valid_t, positions)

    def begin_scoring(self, batch_size: int, dtype: torch.dtype | None = None) -> ScoringState:
        """Start scoring ``batch_size`` windows chunk by chunk.

        :param batch_size: number of windows
        :param dtype: precision to score in (``None``: the model's own, float32)
        :return: an empty scoring state
        """
        bos = torch.full((batch_size,), self.bos_token_id, dtype=torch.long, device=self.device)
        return ScoringState(cache=None, last_input=bos, dtype=dtype)

    @torch.no_grad()
    def score_chunk(
        self,
        state: ScoringState,
        input_ids: ArrayLike,
        mask: ArrayLike,
        valid: ArrayLike | None = None,
        *,
        positions: Positions = "all",
    ) -> ScoreResult:
        """Score the next chunk of each window given the cached compressed prefix; updates ``state``.

        Scoring a window chunk by chunk gives the same numbers as :meth:`score` on the whole window
        (up to float rounding) at the cost of about one forward pass over the window in total.

        :param state: from :meth:`begin_scoring`, advanced by each call
        :param input_ids: ``[B, k]`` true ids of the chunk
        :param mask: ``[B, k]`` dropped positions in the chunk
        :param valid: ``[B, k]`` real positions in the chunk (``None``: all)
        :param positions: ``"all"``, or ``"masked"`` to run the output layer at dropped positions only
        :return: the chunk's scores, ``[B, k]`` each
        """
        ids, mask_t, valid_t = self._prepare(input_ids, mask, valid)
        if state.position + ids.shape[1] > self.max_seq_len:
            raise ValueError(f"scoring past the reconstructor's context of {self.max_seq_len} tokens")
        model = self.inference_model(state.dtype)
        compressed = ids.masked_fill(mask_t, self.mask_token_id)
        inputs = torch.cat([state.last_input[:, None], compressed[:, :-1]], dim=1)
        attention = torch.ones((ids.shape[0], state.position + ids.shape[1]), dtype=torch.long, device=self.device)
        hidden = self._trunk(model, inputs, attention, state)
        state.last_input = compressed[:, -1]
        state.position += ids.shape[1]
        return self._result(model, hidden, ids, mask_t, valid_t, positions)

    @torch.no_grad()
    def continuation_bits(
        self,
        contexts: Sequence[Sequence[int] | np.ndarray],
        continuations: ArrayLike,
        *,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Bits of each continuation token given ``<bos>``, an arbitrary context and the continuation's prefix.

        The model reads the reconstructor as a plain causal LM: the input of row ``b`` is
        ``<bos>, contexts[b], continuations[b]`` and the surprisal of every continuation token is
        returned (the mask token is never a true token, as in :meth:`score`). Rows of different context
        lengths are left-padded, with an attention mask and explicit position ids so that padding
        changes nothing; an empty context scores the continuation after ``<bos>`` alone. One forward pass
        for the batch, the output layer run at the continuation positions only.

        :param contexts: ``B`` sequences of context ids (a context may contain the mask token, e.g. as a
            placeholder for dropped tokens)
        :param continuations: ``[B, T]`` ids to score
        :param dtype: precision to score in (``None``: the model's own, float32)
        :return: ``[B, T]`` float32 bits
        """
        cont = _as_tensor(continuations, torch.long, self.device)
        if cont.dim() != 2 or cont.shape[0] != len(contexts):
            raise ValueError(f"continuations must be [len(contexts), T], got shape {tuple(cont.shape)} for {len(contexts)} contexts")
        batch, horizon = cont.shape
        if horizon == 0:
            return torch.zeros((batch, 0), dtype=torch.float32, device=self.device)
        lengths = [len(c) for c in contexts]
        width = 1 + max(lengths, default=0) + horizon  # <bos> + context + continuation
        if width - 1 > self.max_seq_len:
            raise ValueError(f"context plus continuation of {width - 1} tokens exceeds the model's context of {self.max_seq_len}")
        seq = torch.full((batch, width), self.pad_token_id, dtype=torch.long, device=self.device)
        attention = torch.zeros((batch, width), dtype=torch.long, device=self.device)
        for b, context in enumerate(contexts):
            start = width - horizon - lengths[b] - 1
            seq[b, start] = self.bos_token_id
            if lengths[b]:
                seq[b, start + 1 : width - horizon] = _as_tensor(np.asarray(context, dtype=np.int64), torch.long, self.device)
            attention[b, start:] = 1
        seq[:, width - horizon :] = cont
        inputs, targets = seq[:, :-1], seq[:, 1:]
        attention_in = attention[:, :-1]
        position_ids = (attention_in.cumsum(dim=1) - 1).clamp(min=0)
        scored = torch.zeros_like(targets, dtype=torch.bool)
        scored[:, -horizon:] = True
        model = self.inference_model(dtype)
        hidden = self._trunk(model, inputs, attention_in, None, position_ids)
        result = self._result(model, hidden, targets, scored, scored, "masked")
        return result.surprisal[:, -horizon:]

    @torch.no_grad()
    def surprisal(self, input_ids: ArrayLike, valid: ArrayLike | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Bits of each token given the *uncompressed* prefix (the self-information of Selective Context).

        :param input_ids: ``[B, L]`` ids
        :param valid: ``[B, L]`` real positions (``None``: all)
        :param dtype: precision to score in (``None``: the model's own, float32)
        :return: ``[B, L]`` bits (0 at padding)
        """
        ids = _as_tensor(input_ids, torch.long, self.device)
        return self.score(ids, torch.zeros_like(ids, dtype=torch.bool), valid, dtype=dtype).surprisal

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
    def training_loss(
        self, input_ids: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor | None = None, model: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """Mean cross-entropy (nats) of every real token given its compressed prefix, with gradients.

        Predicting ``x_i`` from ``x~_{<i}`` is the same task whether ``x_i`` itself is dropped or
        kept, so every real position is a training target; the masks shape the contexts.

        :param input_ids: ``[B, L]`` ids on the model's device
        :param mask: ``[B, L]`` dropped positions
        :param valid: ``[B, L]`` real positions (``None``: all)
        :param model: the module to run: ``None`` for :attr:`model`, or a wrapper of it that synchronises
            gradients across processes (:class:`~tokencompress_env.trainer.ReconstructorTrainer`)
        :return: a scalar loss
        """
        ids, mask_t, valid_t = self._prepare(input_ids, mask, valid)
        logits = self._forward(self.compressed_inputs(ids, mask_t), model).float()
        nats = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        return (nats * valid_t).sum() / valid_t.sum().clamp(min=1)

    def num_parameters(self) -> int:
        """Count the model's parameters.

        :return: the count
        """
        return sum(p.numel() for p in self.model.parameters())

    def has_same_weights(self, other: Reconstructor) -> bool:
        """Whether another reconstructor holds exactly this one's weights.

        E.g. a run's "jointly trained" reconstructor that was never fine-tuned (a distillation-only run).

        :param other: the reconstructor to compare with
        :return: ``True`` when every parameter and buffer is equal and of the same shape
        """
        mine, theirs = self.model.state_dict(), other.model.state_dict()
        if mine.keys() != theirs.keys():
            return False
        return all(mine[k].shape == theirs[k].shape and torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in mine)


def default_reconstructor_dir(preset: str = "tiny") -> Path:
    """Where the offline preset reconstructor is cached.

    :param preset: a key of :data:`PRESETS`
    :return: ``<cache root>/reconstructors/<preset>``
    """
    return cache_root() / "reconstructors" / preset


def downstream_context_tokens(lm: Reconstructor, info: dict[str, Any], continuation_tokens: int, requested: int | None) -> int:
    """How many context tokens a causal LM reads before a continuation (the downstream reading's cut).

    Context plus continuation stay within the window length the LM was trained on (``build_config.seq_len``
    of its build facts; its whole context when unknown, e.g. for a hub model): at positions it never
    saw in training a small LM predicts worse, so a longer context would blur the reading.

    :param lm: the downstream LM
    :param info: its build facts (``tokencompress.json``), or ``{}``
    :param continuation_tokens: continuation tokens per window
    :param requested: an explicit cap (``--downstream_context``), itself capped by the model's context
    :return: context tokens (at least 0)
    :raises ConfigError: when the continuation alone does not fit
    """
    built = info.get("build_config") if isinstance(info.get("build_config"), dict) else {}
    trained = int(built.get("seq_len") or lm.max_seq_len) if isinstance(built, dict) else lm.max_seq_len
    room = min(trained, lm.max_seq_len) - continuation_tokens
    if room < 0 or (requested is not None and requested + continuation_tokens > lm.max_seq_len):
        raise ConfigError(
            f"{continuation_tokens} continuation tokens (plus {requested or 0} context tokens) exceed the downstream LM's "
            f"context of {min(trained, lm.max_seq_len)} tokens: pass a smaller --continuation_tokens or --downstream_context"
        )
    return room if requested is None else int(requested)
