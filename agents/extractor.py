"""Local-context features extractor for TokenMask-v0 observations.

Every token gets a feature vector computed from the token and a window of neighbours: its id, the
decision already taken for it (undecided / kept / masked), the target mask rate, whether it is real and
whether it must be kept, and its surprisal when the environment observes it. A shallow stack of dilated
1-D convolutions mixes the neighbourhood; there is no global attention, so the cost is linear in the
window length and small enough for a CPU ``compress()`` path.

SB3 hands a ``Dict`` observation to the extractor with every ``Box`` value cast to ``float32``; ids and
decisions are cast back to ``long`` here.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import gymnasium as gym
import torch as th
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn
from torch.nn import functional as F

from tokencompress_env.observation import OBSERVATION_KEYS, SURPRISAL, Decision

#: Number of decision states (:class:`~tokencompress_env.observation.Decision`).
N_DECISIONS = len(Decision)
#: Number of copy features per token (see :func:`copy_features`).
N_COPY_FEATURES = 4


def copy_features(token_ids: th.Tensor, valid: th.Tensor) -> th.Tensor:
    """Whether each token repeats what came before it in its window: cues for what a causal LM can copy.

    A causal language model predicts a token cheaply when it can copy it from earlier in the context
    (an identifier used again, a phrase repeated): the induction pattern "``a b ... a`` -> ``b``". A local
    convolution cannot see that far back; these features can, at the cost of one ``[L, L]`` comparison
    per window and no language model. For token ``i`` (all zero at padding):

    * 0: token ``i`` occurred earlier in the window;
    * 1: the bigram (token ``i-1``, token ``i``) occurred earlier (the previous token was followed by
      this same token before);
    * 2: the trigram ending at ``i`` occurred earlier;
    * 3: ``log2(1 + occurrences of token i earlier) / 4``.

    :param token_ids: ``[B, L]`` long ids
    :param valid: ``[B, L]`` real positions (bool or 0/1)
    :return: ``[B, L, N_COPY_FEATURES]`` float features
    """
    real = valid > 0.5 if valid.dtype != th.bool else valid
    length = token_ids.shape[1]
    earlier = th.ones(length, length, dtype=th.bool, device=token_ids.device).tril(-1)  # [i, j]: j < i
    same = (token_ids[:, :, None] == token_ids[:, None, :]) & real[:, :, None] & real[:, None, :] & earlier
    prev = F.pad(token_ids, (1, 0), value=-1)[:, :-1]
    prev2 = F.pad(token_ids, (2, 0), value=-2)[:, :-2]
    same_bigram = same & (prev[:, :, None] == prev[:, None, :])
    same_trigram = same_bigram & (prev2[:, :, None] == prev2[:, None, :])
    count = same.sum(-1).float()
    feats = th.stack([same.any(-1).float(), same_bigram.any(-1).float(), same_trigram.any(-1).float(), th.log2(1 + count) / 4], dim=-1)
    return feats * real.unsqueeze(-1).float()


@dataclass(frozen=True)
class InferenceWeights:
    """A linear layer's weights prepared for inference: ``out = addmm(bias, x, weight_t)``.

    :param weight_t: ``[in, out]`` the transposed weight (a view when the dtype is the layer's)
    :param bias: ``[out]`` bias
    """

    weight_t: th.Tensor
    bias: th.Tensor


#: Cached inference copies by module, then by ``(dtype, weight version, bias version)``.
_WEIGHT_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()


def _cached(module: nn.Module, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """``build()`` cached per module under ``key`` (one entry per module: the latest key wins).

    :param module: the module the value belongs to
    :param key: what the value depends on (dtype, parameter versions and storage)
    :param build: computes the value
    :return: the value
    """
    hit = _WEIGHT_CACHE.get(module)
    if hit is not None and hit[0] == key:
        return hit[1]
    with th.no_grad():
        value = build()
    _WEIGHT_CACHE[module] = (key, value)
    return value


def _version(t: th.Tensor) -> tuple[int, int, th.device]:
    """What identifies a parameter's current values: its storage and in-place update counter.

    :param t: the parameter
    :return: a hashable key
    """
    return (t.data_ptr(), t._version, t.device)


def linear_inference_weights(linear: nn.Linear, dtype: th.dtype) -> InferenceWeights:
    """A linear layer's :class:`InferenceWeights` in ``dtype``, cached until its parameters change.

    :param linear: the layer (with a bias)
    :param dtype: the dtype of the matrix product
    :return: the weights
    """
    assert linear.bias is not None
    bias = linear.bias
    key = (dtype, _version(linear.weight), _version(bias))
    if dtype == linear.weight.dtype:
        return InferenceWeights(linear.weight.detach().t(), bias.detach())

    def build() -> InferenceWeights:
        return InferenceWeights(linear.weight.detach().to(dtype).t(), bias.detach().to(dtype))

    return cast(InferenceWeights, _cached(linear, key, build))


class ConvBlock(nn.Module):
    """Pre-norm residual block: LayerNorm, dilated 1-D convolution over the sequence, GELU.

    The full convolution (``separable=False``) is computed as one matrix product over the ``kernel_size``
    shifted copies of the sequence (an explicit im2col): the same function and parameter count as
    ``nn.Conv1d``, but several times faster on CPU for these narrow layers, where PyTorch's dilated
    convolution takes a slow path. The depthwise-separable convolution (``separable=True``) weighs each
    channel's ``kernel_size`` shifted values on its own (one weight per channel and tap) and then mixes the
    channels with a ``dim x dim`` matrix: ``kernel_size`` times fewer multiply-adds in the matrix product.

    :param dim: Number of channels
    :param kernel_size: Convolution kernel size (odd, so the output is centred on the token)
    :param dilation: Convolution dilation
    :param dropout: Dropout probability after the activation
    :param separable: Depthwise-separable convolution instead of the full one
    """

    def __init__(self, dim: int, kernel_size: int, dilation: int, dropout: float = 0.0, separable: bool = False) -> None:
        super().__init__()
        if kernel_size % 2 != 1 or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.separable = separable
        self.norm = nn.LayerNorm(dim)
        # separable: the per-channel taps (nn.Conv1d's default initialisation for groups=dim), then the channel mix
        self.depthwise = nn.Parameter(th.empty(kernel_size, dim).uniform_(-(kernel_size**-0.5), kernel_size**-0.5)) if separable else None
        self.conv = nn.Linear(dim if separable else kernel_size * dim, dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)

    @property
    def reach(self) -> int:
        """How many tokens to each side this block sees."""
        return self.dilation * (self.kernel_size - 1) // 2

    @property
    def columns_width(self) -> int:
        """Width of the matrix product's input per token (the ``columns`` buffer of :meth:`forward_inplace`)."""
        return self.conv.in_features

    def _columns(self, padded: th.Tensor, base: int, length: int, out: th.Tensor | None = None) -> th.Tensor:
        """The matrix product's input: the shifted copies side by side, or their per-channel weighted sum.

        :param padded: ``[B, >= base + 2 * reach + length, D]`` normalised features with zero margins
        :param base: index in ``padded`` of the leftmost tap of the first token
        :param length: number of tokens
        :param out: buffer of the result's shape and ``padded``'s dtype (``None``: allocate)
        :return: ``[B, length, columns_width]``
        """
        shifted = [padded[:, base + j * self.dilation : base + j * self.dilation + length] for j in range(self.kernel_size)]
        if self.depthwise is None:
            return th.cat(shifted, dim=-1, out=out) if out is not None else th.cat(shifted, dim=-1)
        taps = self.depthwise.to(padded.dtype)
        total = th.mul(shifted[0], taps[0], out=out) if out is not None else shifted[0] * taps[0]
        for j in range(1, self.kernel_size):
            total.addcmul_(shifted[j], taps[j])
        return total

    def forward(self, x: th.Tensor, valid: th.Tensor) -> th.Tensor:
        """Apply the block.

        :param x: Features ``[B, L, D]``
        :param valid: ``[B, L, 1]`` float mask, 1 for real tokens; padding is zeroed before the convolution
            so it never leaks into real tokens' features
        :return: Updated features ``[B, L, D]``
        """
        length = x.shape[1]
        y = F.pad(self.norm(x) * valid, (0, 0, self.reach, self.reach))
        return x + self.dropout(self.act(self.conv(self._columns(y, 0, length))))

    def forward_inplace(self, x: th.Tensor, valid: th.Tensor, padded: th.Tensor, columns: th.Tensor, weights: InferenceWeights) -> None:
        """The block for inference, updating ``x`` in place with preallocated buffers (no dropout, no autograd).

        In float32 it is the same arithmetic as :meth:`forward` (the same kernels on the same values), so
        the result is identical; it saves the padding copy and the temporaries. With bfloat16 buffers the
        convolution runs in bfloat16 (for the full convolution's matrix product, about twice as fast on CPUs
        with AVX512-BF16 or AMX), the residual stream and the normalisation stay float32.

        :param x: ``[B, L, D]`` float32 features, updated in place
        :param valid: ``[B, L, 1]`` float mask, 1 for real tokens
        :param padded: ``[B, L + 2 * R, D]`` buffer whose first and last ``R >= reach`` rows are zero
            (its dtype is the matrix product's)
        :param columns: ``[B, L, columns_width]`` buffer of ``padded``'s dtype
        :param weights: :meth:`inference_weights` in that dtype
        """
        batch, length, dim = x.shape
        margin = (padded.shape[1] - length) // 2
        th.mul(self.norm(x), valid, out=padded[:, margin : margin + length])
        self._columns(padded, margin - self.reach, length, out=columns)
        hidden = th.addmm(weights.bias, columns.view(-1, columns.shape[-1]), weights.weight_t)
        x.add_(self.act(hidden).view(batch, length, dim))

    def inference_weights(self, dtype: th.dtype) -> InferenceWeights:
        """The convolution's weights for :meth:`forward_inplace` in ``dtype`` (cached until a weight changes).

        :param dtype: the matrix product's dtype
        :return: the weights
        """
        return linear_inference_weights(self.conv, dtype)


class LocalContextExtractor(BaseFeaturesExtractor):
    """Per-token local-context features for the TokenMask-v0 ``Dict`` observation.

    :meth:`token_features` gives one vector per token (``[B, seq_len, hidden_dim]``); the per-token policy
    heads use it directly. :meth:`forward` (what SB3 calls) returns a flat summary of size
    ``features_dim = 2 * hidden_dim + 2``: the mean feature over real tokens, the mean feature over the
    chunk decided in this step, the target mask rate and the progress ``position / seq_len``.

    The vocabulary size is read from the observation space (``token_ids.high + 1``). Parameters sit where
    they cost no compute: a wide token embedding (``embed_dim``) is projected to a narrow convolution
    stack (``hidden_dim``). With the defaults and a 4096-token vocabulary the extractor has about 0.93M
    parameters (0.79M of them the embedding table) and costs about 0.14M multiply-adds per token, roughly
    30 times less than the 4-layer, 256-wide GPT-2 reconstructor.

    :param observation_space: The TokenMask-v0 ``Dict`` observation space
    :param embed_dim: Width of the token embedding (projected to ``hidden_dim``)
    :param hidden_dim: Width of the per-token features and of every convolution layer
    :param kernel_size: Convolution kernel size (odd)
    :param dilations: One convolution block per entry, with that dilation. The receptive field is
        ``1 + (kernel_size - 1) * sum(dilations)`` tokens (49 with the defaults)
    :param chunk_size: Number of tokens decided per step (the action size); used by the flat summary
    :param dropout: Dropout probability inside the convolution blocks
    :param surprisal_scale: Surprisal (bits) is divided by this before entering the network
    :param use_decisions: Feed the decisions made so far into the features. ``False`` makes every logit a
        function of the window's tokens and the target rate alone, so one forward pass over a whole window
        (``token_mask_logits``, used by ``compress()`` and the evaluation) gives exactly the logits the
        policy acted on during training: a one-pass ranker
    :param use_copy_features: Add the :func:`copy_features` of each token (does it repeat a token, bigram
        or trigram seen earlier in the window) to its inputs: what a causal reconstructor can copy, which
        the local convolution cannot see
    :param separable: Depthwise-separable convolutions (:class:`ConvBlock`): about 5 times fewer
        multiply-adds per block with the default kernel, for a faster ``compress()``
    :param embed_kernel_size: Each token's input sums the projected embeddings of this many tokens centred
        on it, one projection per offset (:meth:`token_window_sum`): a linear convolution over the wide
        embeddings that inference looks up in a table, ``k`` table reads per token and no matrix product
        (odd; 1: the token alone)
    """

    def __init__(
        self,
        observation_space: gym.Space,
        embed_dim: int = 192,
        hidden_dim: int = 64,
        kernel_size: int = 5,
        dilations: tuple[int, ...] | list[int] = (1, 2, 4, 1, 2, 2),
        chunk_size: int = 16,
        dropout: float = 0.0,
        surprisal_scale: float = 8.0,
        use_decisions: bool = True,
        use_copy_features: bool = False,
        separable: bool = False,
        embed_kernel_size: int = 1,
    ) -> None:
        if not isinstance(observation_space, spaces.Dict):
            raise TypeError(f"LocalContextExtractor needs a Dict observation space, got {type(observation_space).__name__}")
        missing = [key for key in OBSERVATION_KEYS if key not in observation_space.spaces]
        if missing:
            raise KeyError(f"observation space lacks keys {missing}; it has {sorted(observation_space.spaces)}")
        if embed_kernel_size % 2 != 1 or embed_kernel_size < 1:
            raise ValueError(f"embed_kernel_size must be a positive odd number, got {embed_kernel_size}")
        super().__init__(observation_space, features_dim=2 * hidden_dim + 2)
        token_space = observation_space["token_ids"]
        assert isinstance(token_space, spaces.Box)
        self.vocab_size = int(token_space.high.max()) + 1
        self.seq_len = int(token_space.shape[0])
        self.embed_dim = embed_dim
        self.hidden_dim = hidden_dim
        self.chunk_size = chunk_size
        self.use_surprisal = SURPRISAL in observation_space.spaces
        self.surprisal_scale = surprisal_scale
        self.use_decisions = use_decisions
        self.use_copy_features = use_copy_features
        # scalar per-token inputs: target rate, valid, force_keep (+ surprisal) (+ copy features)
        n_scalars = 3 + int(self.use_surprisal) + N_COPY_FEATURES * int(use_copy_features)

        self.token_embedding = nn.Embedding(self.vocab_size, embed_dim)
        self.embed_kernel_size = embed_kernel_size
        # one projection per tap of the token window, side by side (see token_window_sum)
        self.token_proj = nn.Linear(embed_dim, embed_kernel_size * hidden_dim, bias=False)
        self.decision_embedding = nn.Embedding(N_DECISIONS, hidden_dim)
        self.scalar_proj = nn.Linear(n_scalars, hidden_dim)
        self.blocks = nn.ModuleList(ConvBlock(hidden_dim, kernel_size, int(d), dropout, separable) for d in dilations)
        self.out_norm = nn.LayerNorm(hidden_dim)

    @property
    def token_dim(self) -> int:
        """Size of the per-token feature vector."""
        return self.hidden_dim

    def token_features(self, observations: dict[str, th.Tensor]) -> th.Tensor:
        """Per-token features of a batch of windows.

        :param observations: Batched observation tensors (floats as SB3 gives them, or integers)
        :return: ``[B, seq_len, hidden_dim]``; rows of padded positions are zero
        """
        ids = observations["token_ids"].round().long().clamp(0, self.vocab_size - 1)
        decisions = observations["decisions"].round().long().clamp(0, N_DECISIONS - 1)
        valid = observations["valid"].float()
        force_keep = observations["force_keep"].float()
        rate = observations["target_mask_rate"].float().reshape(-1, 1).expand_as(valid)
        scalars = [rate, valid, force_keep]
        if self.use_surprisal:
            scalars.append(observations[SURPRISAL].float() / self.surprisal_scale)
        if not self.use_decisions:
            decisions = th.zeros_like(decisions)
        scalar_inputs = th.stack(scalars, dim=-1)
        if self.use_copy_features:
            scalar_inputs = th.cat([scalar_inputs, copy_features(ids, valid)], dim=-1)
        tokens = self.token_window_sum(self.token_proj(self.token_embedding(ids)), valid)
        x = tokens + self.decision_embedding(decisions) + self.scalar_proj(scalar_inputs)
        valid_3d = valid.unsqueeze(-1)
        for block in self.blocks:
            x = block(x, valid_3d)
        return self.out_norm(x) * valid_3d

    @property
    def reach(self) -> int:
        """How many tokens to each side a token's features depend on (half the receptive field)."""
        return self.embed_kernel_size // 2 + sum(cast(ConvBlock, block).reach for block in self.blocks)

    def token_window_sum(self, projected: th.Tensor, valid: th.Tensor) -> th.Tensor:
        """Each token's input from the projected embeddings of the ``embed_kernel_size`` tokens centred on it.

        With ``embed_kernel_size = k > 1`` the projection holds one ``embed_dim x hidden_dim`` matrix per
        tap, side by side, and token ``i`` sums tap ``j``'s projection of token ``i + j - k // 2`` (zero
        beyond the window and at padding): a linear convolution over the wide embeddings, whose products
        inference looks up in :meth:`token_table` instead of computing. ``k = 1`` is the plain projection.

        :param projected: ``[B, L, k * hidden_dim]`` the token projection of every position
        :param valid: ``[B, L]`` real positions (float 0/1)
        :return: ``[B, L, hidden_dim]``
        """
        if self.embed_kernel_size == 1:
            return projected
        width = self.hidden_dim
        taps = projected * valid.unsqueeze(-1)
        return self._sum_shifted_taps(lambda j: taps[:, :, j * width : (j + 1) * width], projected.shape[1])

    def _sum_shifted_taps(self, tap: Callable[[int], th.Tensor], length: int) -> th.Tensor:
        """``sum_j tap(j)`` shifted so that token ``i`` reads tap ``j`` of token ``i + j - k // 2`` (the centre first).

        :param tap: ``j -> [B, length, hidden_dim]`` tap ``j`` of every token, zero at padding (may reuse
            one buffer between calls: each result is used before the next call)
        :param length: the window length
        :return: ``[B, length, hidden_dim]``
        """
        half = self.embed_kernel_size // 2
        total = tap(half).clone()
        for j in range(self.embed_kernel_size):
            offset = j - half
            if offset == 0 or abs(offset) >= length:
                continue
            source = tap(j)
            if offset > 0:
                total[:, : length - offset] += source[:, offset:]
            else:
                total[:, -offset:] += source[:, : length + offset]
        return total

    def _inference_token_inputs(self, ids: th.Tensor, valid: th.Tensor) -> th.Tensor:
        """:meth:`token_window_sum` of the projected embeddings, looked up in :meth:`token_table` (the same values).

        Each tap is gathered from its columns of the table into one reused buffer, so that no
        ``[B, L, embed_kernel_size * hidden_dim]`` tensor is made.

        :param ids: ``[B, L]`` long ids
        :param valid: ``[B, L]`` real positions (float 0/1)
        :return: ``[B, L, hidden_dim]``
        """
        table = self.token_table()
        if self.embed_kernel_size == 1:
            return F.embedding(ids, table)
        columns = table.view(table.shape[0], self.embed_kernel_size, self.hidden_dim)
        flat, mask = ids.reshape(-1), valid.unsqueeze(-1)
        buffer = th.empty(*ids.shape, self.hidden_dim, dtype=table.dtype, device=table.device)

        def tap(j: int) -> th.Tensor:
            th.index_select(columns[:, j], 0, flat, out=buffer.view(-1, self.hidden_dim))
            return buffer.mul_(mask)

        return self._sum_shifted_taps(tap, ids.shape[1])

    def token_table(self) -> th.Tensor:
        """The projected token embedding of every vocabulary entry, ``token_proj(token_embedding.weight)``.

        Row ``i`` is exactly what :meth:`token_features` computes for token ``i`` (the same product), so
        inference looks it up instead of projecting every token of every window. Cached until the
        embedding or the projection changes.

        :return: ``[vocab_size, embed_kernel_size * hidden_dim]`` (one projection per tap of
            :meth:`token_window_sum`, side by side)
        """
        weight, proj = self.token_embedding.weight, self.token_proj.weight
        key = (_version(weight), _version(proj))
        return cast(th.Tensor, _cached(self.token_proj, key, lambda: self.token_proj(weight.detach())))

    def inference_token_features(
        self,
        token_ids: th.Tensor,
        valid: th.Tensor,
        force_keep: th.Tensor,
        target_mask_rate: th.Tensor,
        surprisal: th.Tensor | None = None,
        decisions: th.Tensor | None = None,
        matmul_dtype: th.dtype = th.float32,
    ) -> th.Tensor:
        """:meth:`token_features` of the observations built from these arrays, for inference only.

        The same function as :meth:`token_features` on the observation that
        :func:`~tokencompress_env.observation.build_observation` makes from these arguments (``position``
        plays no part), computed without the observation dict: the token embedding is looked up already
        projected (:meth:`token_table`), the blocks update one buffer in place
        (:meth:`ConvBlock.forward_inplace`), and there is no autograd (call it under
        ``torch.inference_mode``) and no dropout. In float32 the result is bitwise that of
        :meth:`token_features` on a CPU (same kernels, same order of operations); ``matmul_dtype=bfloat16``
        runs the convolutions' matrix products in bfloat16 (faster, slightly different values).

        :param token_ids: ``[B, L]`` integer ids
        :param valid: ``[B, L]`` real positions (bool or 0/1)
        :param force_keep: ``[B, L]`` force-kept positions (bool or 0/1)
        :param target_mask_rate: ``[B]`` target rates
        :param surprisal: ``[B, L]`` bits, already clipped as the environment does (required when the
            extractor observes surprisal)
        :param decisions: ``[B, L]`` :class:`~tokencompress_env.observation.Decision` codes (``None``:
            nothing decided)
        :param matmul_dtype: dtype of the convolutions' matrix products (``torch.float32`` or ``torch.bfloat16``)
        :return: ``[B, L, hidden_dim]`` float32; rows of padded positions are zero
        """
        ids = token_ids.long().clamp(0, self.vocab_size - 1)
        batch, length = ids.shape
        valid_f = valid.float()
        scalars = [target_mask_rate.float().reshape(-1, 1).expand_as(valid_f), valid_f, force_keep.float()]
        if self.use_surprisal:
            if surprisal is None:
                raise ValueError("this extractor observes surprisal: pass surprisal")
            scalars.append(surprisal.float() / self.surprisal_scale)
        scalar_inputs = th.stack(scalars, dim=-1)
        if self.use_copy_features:
            scalar_inputs = th.cat([scalar_inputs, copy_features(ids, valid_f)], dim=-1)
        if decisions is None or not self.use_decisions:
            # Every position reads decision 0 (UNDECIDED, or zeroed when decisions are not used).
            x = self._inference_token_inputs(ids, valid_f) + self.decision_embedding.weight[0]
        else:
            x = self._inference_token_inputs(ids, valid_f) + self.decision_embedding(decisions.long().clamp(0, N_DECISIONS - 1))
        x = x + self.scalar_proj(scalar_inputs)
        valid_3d = valid_f.unsqueeze(-1)
        blocks = cast(list[ConvBlock], list(self.blocks))
        margin = max((block.reach for block in blocks), default=0)
        padded = th.zeros(batch, length + 2 * margin, self.hidden_dim, dtype=matmul_dtype, device=x.device)
        columns: dict[int, th.Tensor] = {}  # one buffer per width of the matrix products' input
        for block in blocks:
            width = block.columns_width
            if width not in columns:
                columns[width] = th.empty(batch, length, width, dtype=matmul_dtype, device=x.device)
            block.forward_inplace(x, valid_3d, padded, columns[width], block.inference_weights(matmul_dtype))
        return self.out_norm(x) * valid_3d

    def chunk_index(self, position: th.Tensor, chunk_size: int | None = None) -> tuple[th.Tensor, th.Tensor]:
        """Window indices of the chunk decided in this step.

        :param position: ``[B, 1]`` (or ``[B]``) first index of the chunk
        :param chunk_size: Chunk length; ``self.chunk_size`` when None
        :return: ``(index, in_window)``: ``[B, k]`` long indices clamped into the window, and a ``[B, k]``
            bool tensor, False where ``position + j`` lies beyond the window
        """
        k = self.chunk_size if chunk_size is None else chunk_size
        start = position.reshape(-1, 1).round().long()
        index = start + th.arange(k, device=position.device).unsqueeze(0)
        in_window = (index >= 0) & (index < self.seq_len)
        return index.clamp(0, self.seq_len - 1), in_window

    def summary(self, features: th.Tensor, observations: dict[str, th.Tensor]) -> th.Tensor:
        """Flat summary of a window from its per-token features.

        :param features: ``[B, seq_len, hidden_dim]`` from :meth:`token_features`
        :param observations: The observations the features came from
        :return: ``[B, features_dim]``: mean over real tokens, mean over the current chunk's real tokens,
            target mask rate, ``position / seq_len``
        """
        valid = observations["valid"].float()
        global_mean = (features * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp(min=1.0)
        index, in_window = self.chunk_index(observations["position"])
        chunk_valid = valid.gather(1, index) * in_window.float()
        chunk = features.gather(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        chunk_mean = (chunk * chunk_valid.unsqueeze(-1)).sum(1) / chunk_valid.sum(1, keepdim=True).clamp(min=1.0)
        rate = observations["target_mask_rate"].float().reshape(-1, 1)
        progress = observations["position"].float().reshape(-1, 1) / float(self.seq_len)
        return th.cat([global_mean, chunk_mean, rate, progress], dim=1)

    def forward(self, observations: dict[str, th.Tensor]) -> th.Tensor:
        """Flat summary features (what SB3's generic policies consume).

        :param observations: Batched observation tensors
        :return: ``[B, features_dim]``
        """
        return self.summary(self.token_features(observations), observations)


def extractor_kwargs_for(action_space: gym.Space, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Extractor keyword arguments with ``chunk_size`` taken from a ``MultiBinary`` action space.

    :param action_space: The environment's action space
    :param kwargs: User keyword arguments (not modified)
    :return: A copy of ``kwargs`` with ``chunk_size`` set when the action space defines it
    """
    out = dict(kwargs or {})
    if isinstance(action_space, spaces.MultiBinary):
        out.setdefault("chunk_size", int(action_space.n))  # type: ignore[arg-type]
    return out
