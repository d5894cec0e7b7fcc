"""Actor-critic policies with a weight-shared per-token keep/mask head for TokenMask-v0.

The environment decides one chunk of ``k`` tokens per step (``MultiBinary(k)``: 1 = mask, 0 = keep),
starting at ``obs["position"]``. SB3's default ``action_net`` maps one flat latent to ``k`` logits; here
instead every token of the window gets a feature vector from :class:`~agents.extractor.LocalContextExtractor`
(the token and its neighbours), the chunk's ``k`` vectors are gathered, and the *same* small MLP turns
each into one logit. The value comes from a pooled summary of the window.

Positions of the chunk that are padding (``valid == 0``), beyond the window (``position + j >= seq_len``)
or forced to be kept (``force_keep == 1``) are *inactive*: their logit is a constant (keep), the sampled
action there is 0, and they contribute nothing to ``log_prob`` or ``entropy``; changing the action at
such a position does not change the log-probability. In the maskable policy the environment's action
mask (``action_masks()``, shape ``(2 * k,)``: [keep allowed, mask allowed] per position) makes more
positions inactive, with the forced value the mask allows.

Three policies share this design:

* :class:`TokenActorCriticPolicy` (``ActorCriticPolicy``): PPO, A2C, TRPO.
* :class:`MaskableTokenActorCriticPolicy` (``MaskableActorCriticPolicy``): sb3-contrib's MaskablePPO.
* :class:`RecurrentTokenActorCriticPolicy` (``RecurrentActorCriticPolicy``): RecurrentPPO. An LSTM runs
  over the per-step window summaries (one LSTM step per env step); its output is concatenated to every
  token's features before the weight-shared head, so the head stays per-token and the memory is shared
  context. The critic has its own LSTM by default, as in sb3-contrib.

All three expose :meth:`~_TokenPolicyMixin.token_mask_logits`: one mask logit per position of whole
windows at once, for ranking under a budget (exact rate control) without stepping the environment.

Rate-calibrated logits (``rate_calibrated=True``): each window's logits are shifted by one offset so that
the expected number of drops under the policy's Bernoulli actions equals the target (``target_mask_rate``
times the window's real tokens, at most its maskable tokens; :func:`rate_calibrated_logits`). A shift per
window leaves the order of the window's tokens, and so every mask chosen by ranking under a budget,
unchanged; what it removes is the policy's freedom to miss the rate on average. Without it, a head whose
logits do not follow the rate (a warm start that regresses each token's cost) samples the same fraction
at every target, and PPO's rate penalty then moves all logits together instead of their order.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.maskable.distributions import MaskableDistribution
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.distributions import BernoulliDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import preprocess_obs
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn
from torch.distributions import Bernoulli

from agents.extractor import LocalContextExtractor, extractor_kwargs_for, linear_inference_weights

#: Logit given to inactive positions (padding, beyond the window, force-keep): keep with certainty.
INACTIVE_LOGIT = 20.0
#: Default hidden sizes of the per-token head (``pi``) and of the value head (``vf``).
DEFAULT_NET_ARCH: dict[str, list[int]] = {"pi": [64], "vf": [64]}

#: Bisection steps of :func:`rate_calibrated_offset` (the bracket shrinks by 2**-40).
CALIBRATION_ITERATIONS = 40


def rate_calibrated_offset(logits: th.Tensor, maskable: th.Tensor, expected_drops: th.Tensor) -> th.Tensor:
    """The offset ``t`` of each row with ``sum over maskable positions of sigmoid(logit - t) = expected_drops``.

    Found by bisection on detached values, then one Newton step taken with gradients, which leaves the value
    unchanged (the residual is zero there) and gives it the implicit-function gradient
    ``dt/dlogit_j = s_j / sum(s)``, ``s = sigmoid' (logit - t)`` on the maskable positions: the calibrated
    distribution is differentiated as the function of the logits it is.

    :param logits: ``[B, L]`` finite mask logits
    :param maskable: ``[B, L]`` bool, positions that may be dropped
    :param expected_drops: ``[B]`` wanted expected drops, in ``[0, maskable count]``
    :return: ``[B]`` offsets
    """
    mask = maskable.to(logits.dtype)
    with th.no_grad():
        values = logits.detach()
        low = values.masked_fill(~maskable, float("inf")).amin(dim=1).nan_to_num(posinf=0.0) - 30.0
        high = values.masked_fill(~maskable, float("-inf")).amax(dim=1).nan_to_num(neginf=0.0) + 30.0
        for _ in range(CALIBRATION_ITERATIONS):
            middle = (low + high) / 2
            too_many = (th.sigmoid(values - middle[:, None]) * mask).sum(dim=1) > expected_drops
            low, high = th.where(too_many, middle, low), th.where(too_many, high, middle)
        start = (low + high) / 2
    probs = th.sigmoid(logits - start[:, None]) * mask
    slope = (probs * (1.0 - probs)).sum(dim=1).clamp(min=1e-6)
    return start + (probs.sum(dim=1) - expected_drops) / slope


def rate_calibrated_logits(logits: th.Tensor, valid: th.Tensor, maskable: th.Tensor, target_mask_rate: th.Tensor) -> th.Tensor:
    """Each window's logits shifted so that its expected drops are the target rate times its real tokens.

    The expected drops are capped at the window's maskable tokens (the rule of TokenMask-v0's rate term:
    the mask rate counts every real token); :func:`rate_calibrated_offset` finds the shift.

    :param logits: ``[B, L]`` mask logits, finite at the maskable positions
    :param valid: ``[B, L]`` bool, real positions
    :param maskable: ``[B, L]`` bool, positions that may be dropped
    :param target_mask_rate: ``[B]`` or ``[B, 1]`` target rates
    :return: ``[B, L]`` shifted logits (what is not maskable is shifted too, and means nothing)
    """
    finite = logits.masked_fill(~maskable, 0.0)
    wanted = target_mask_rate.reshape(-1).to(logits.dtype) * valid.sum(dim=1).to(logits.dtype)
    expected = th.minimum(wanted, maskable.sum(dim=1).to(logits.dtype))
    return logits - rate_calibrated_offset(finite, maskable, expected)[:, None]


#: LSTM (hidden, cell) states.
LSTMStates = tuple[th.Tensor, th.Tensor]

SelfTokenBernoulli = TypeVar("SelfTokenBernoulli", bound="TokenBernoulliDistribution")


class TokenBernoulliDistribution(BernoulliDistribution):
    """Independent Bernoulli per chunk position, where inactive positions do not count.

    ``log_prob`` and ``entropy`` sum the per-position terms over *active* positions only; ``sample`` and
    ``mode`` return the forced value (0 = keep unless a mask says otherwise) at inactive positions.

    :param action_dims: Number of binary actions (the chunk size ``k``)
    """

    def __init__(self, action_dims: int) -> None:
        super().__init__(action_dims)
        self.active: th.Tensor | None = None
        self.forced: th.Tensor | None = None

    def proba_distribution(self: SelfTokenBernoulli, action_logits: th.Tensor, active: th.Tensor | None = None) -> SelfTokenBernoulli:
        """Set the distribution's parameters.

        :param action_logits: ``[B, k]`` mask logits
        :param active: ``[B, k]`` bool, True where the position is a real decision; all True when None
        :return: self
        """
        self.active = th.ones_like(action_logits, dtype=th.bool) if active is None else active.bool()
        self.forced = th.zeros_like(action_logits)
        self.distribution = Bernoulli(logits=th.where(self.active, action_logits, th.full_like(action_logits, -INACTIVE_LOGIT)))
        return self

    def _weights(self) -> th.Tensor:
        assert self.active is not None, "call proba_distribution() first"
        return self.active.to(self.distribution.logits.dtype)

    def log_prob(self, actions: th.Tensor) -> th.Tensor:
        """Log-probability of the actions, summed over active positions.

        :param actions: ``[B, k]`` binary actions
        :return: ``[B]``
        """
        actions = actions.reshape(self.distribution.logits.shape).to(self.distribution.logits.dtype)
        return (self.distribution.log_prob(actions) * self._weights()).sum(dim=1)

    def entropy(self) -> th.Tensor:
        """Entropy, summed over active positions.

        :return: ``[B]``
        """
        return (self.distribution.entropy() * self._weights()).sum(dim=1)

    def _force(self, actions: th.Tensor) -> th.Tensor:
        assert self.active is not None and self.forced is not None
        return th.where(self.active, actions, self.forced)

    def sample(self) -> th.Tensor:
        """Sample actions; inactive positions get their forced value.

        :return: ``[B, k]``
        """
        return self._force(self.distribution.sample())

    def mode(self) -> th.Tensor:
        """Most likely actions; inactive positions get their forced value.

        :return: ``[B, k]``
        """
        return self._force(th.round(self.distribution.probs))

    def actions_from_params(self, action_logits: th.Tensor, deterministic: bool = False, active: th.Tensor | None = None) -> th.Tensor:
        """Set the parameters and return actions.

        :param action_logits: ``[B, k]`` mask logits
        :param deterministic: Return the mode instead of a sample
        :param active: ``[B, k]`` active positions (all when None)
        :return: ``[B, k]`` actions
        """
        self.proba_distribution(action_logits, active)
        return self.get_actions(deterministic=deterministic)

    def log_prob_from_params(self, action_logits: th.Tensor, active: th.Tensor | None = None) -> tuple[th.Tensor, th.Tensor]:
        """Set the parameters, sample actions and return them with their log-probability.

        :param action_logits: ``[B, k]`` mask logits
        :param active: ``[B, k]`` active positions (all when None)
        :return: actions ``[B, k]`` and log-probabilities ``[B]``
        """
        actions = self.actions_from_params(action_logits, active=active)
        return actions, self.log_prob(actions)


class MaskableTokenBernoulliDistribution(TokenBernoulliDistribution, MaskableDistribution):
    """:class:`TokenBernoulliDistribution` that also accepts sb3-contrib action masks.

    The mask has ``2 * k`` entries, ``[keep allowed, mask allowed]`` per position (sb3-contrib's layout
    for ``MultiBinary``). A position with only one allowed value becomes inactive with that value forced.

    :param action_dims: Number of binary actions (the chunk size ``k``)
    """

    def apply_masking(self, masks: np.ndarray | th.Tensor | None) -> None:
        """Restrict the distribution with an action mask.

        :param masks: ``[B, 2 * k]`` (or ``[2 * k]``) booleans, or None for no masking
        """
        if masks is None:
            return
        assert self.active is not None, "call proba_distribution() first"
        logits = self.distribution.logits
        m = th.as_tensor(masks, device=logits.device).reshape(-1, self.action_dims, 2).bool()
        can_keep, can_mask = m[..., 0], m[..., 1]
        only_mask = can_mask & ~can_keep
        self.active = self.active & can_keep & can_mask
        self.forced = only_mask.to(logits.dtype)
        fixed = th.where(only_mask, th.full_like(logits, INACTIVE_LOGIT), th.full_like(logits, -INACTIVE_LOGIT))
        self.distribution = Bernoulli(logits=th.where(self.active, logits, fixed))


def split_net_arch(net_arch: list[int] | dict[str, list[int]] | None) -> tuple[list[int], list[int]]:
    """Hidden sizes of the per-token head and of the value head.

    :param net_arch: SB3-style ``dict(pi=[...], vf=[...])``, a list used for both, or None for the default
    :return: ``(pi_layers, vf_layers)``
    """
    if net_arch is None:
        net_arch = DEFAULT_NET_ARCH
    if isinstance(net_arch, dict):
        return list(net_arch.get("pi", [])), list(net_arch.get("vf", []))
    return list(net_arch), list(net_arch)


def _mlp(in_dim: int, layers: list[int], activation_fn: type[nn.Module]) -> tuple[nn.Sequential, int]:
    modules: list[nn.Module] = []
    for width in layers:
        modules += [nn.Linear(in_dim, width), activation_fn()]
        in_dim = width
    return nn.Sequential(*modules), in_dim


class TokenMlpExtractor(nn.Module):
    """Hidden layers of the two heads, laid out as SB3's ``MlpExtractor`` (``policy_net`` / ``value_net``).

    ``policy_net`` acts on the last dimension, so applied to ``[B, k, token_dim]`` it is one weight-shared
    MLP per token.

    :param pi_input_dim: Per-token input size of the policy head
    :param vf_input_dim: Input size of the value head
    :param net_arch: Hidden sizes (see :func:`split_net_arch`)
    :param activation_fn: Activation between layers
    """

    def __init__(
        self,
        pi_input_dim: int,
        vf_input_dim: int,
        net_arch: list[int] | dict[str, list[int]] | None,
        activation_fn: type[nn.Module] = nn.Tanh,
    ) -> None:
        super().__init__()
        pi_layers, vf_layers = split_net_arch(net_arch)
        self.policy_net, self.latent_dim_pi = _mlp(pi_input_dim, pi_layers, activation_fn)
        self.value_net, self.latent_dim_vf = _mlp(vf_input_dim, vf_layers, activation_fn)

    def forward(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """Both heads on the same input (only meaningful when the input sizes agree).

        :param features: Input features
        :return: ``(latent_pi, latent_vf)``
        """
        return self.forward_actor(features), self.forward_critic(features)

    def forward_actor(self, features: th.Tensor) -> th.Tensor:
        """Per-token policy latent.

        :param features: ``[..., pi_input_dim]``
        :return: ``[..., latent_dim_pi]``
        """
        return self.policy_net(features)

    def forward_critic(self, features: th.Tensor) -> th.Tensor:
        """Value latent.

        :param features: ``[..., vf_input_dim]``
        :return: ``[..., latent_dim_vf]``
        """
        return self.value_net(features)


def _check_spaces(observation_space: spaces.Space, action_space: spaces.Space) -> None:
    if not isinstance(action_space, spaces.MultiBinary) or not isinstance(action_space.n, (int, np.integer)):
        raise TypeError(f"per-token policies need a 1-D MultiBinary action space, got {action_space}")
    if not isinstance(observation_space, spaces.Dict):
        raise TypeError(f"per-token policies need a Dict observation space, got {type(observation_space).__name__}")


if TYPE_CHECKING:
    _MixinBase = ActorCriticPolicy
else:
    _MixinBase = object


class _TokenPolicyMixin(_MixinBase):
    """Shared construction and per-token computations of the three token policies.

    Constructor arguments are those of the SB3 policy it is mixed into; what differs from SB3's defaults:
    ``features_extractor_class`` defaults to :class:`LocalContextExtractor` (any extractor with the same
    ``token_features`` / ``summary`` / ``chunk_index`` / ``token_dim`` interface works), its ``chunk_size``
    is taken from the action space, ``net_arch`` gives the hidden sizes of the per-token head (``pi``) and
    of the value head (``vf``), default ``dict(pi=[64], vf=[64])``, and gSDE is not supported.
    ``rate_calibrated`` shifts each window's logits to the target rate (see the module docstring).
    """

    action_dist: TokenBernoulliDistribution
    mlp_extractor: TokenMlpExtractor  # type: ignore[assignment]

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        features_extractor_class: type[BaseFeaturesExtractor] = LocalContextExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        rate_calibrated: bool = False,
        **kwargs: Any,
    ) -> None:
        _check_spaces(observation_space, action_space)
        self.rate_calibrated = bool(rate_calibrated)
        if kwargs.get("use_sde", False):
            raise ValueError("gSDE is for continuous actions; per-token policies use Bernoulli actions")
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=DEFAULT_NET_ARCH if net_arch is None else net_arch,
            features_extractor_class=features_extractor_class,
            features_extractor_kwargs=extractor_kwargs_for(action_space, features_extractor_kwargs),
            **kwargs,
        )

    # ------------------------------------------------------------------ construction
    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data["rate_calibrated"] = self.rate_calibrated
        return data

    @property
    def chunk_size(self) -> int:
        """Number of positions decided per step (the action size)."""
        return int(self.action_space.n)  # type: ignore[attr-defined]

    @property
    def _pi_tokens(self) -> LocalContextExtractor:
        """The actor's extractor, typed for its per-token interface."""
        return cast(LocalContextExtractor, self.pi_features_extractor)

    @property
    def _vf_tokens(self) -> LocalContextExtractor:
        """The critic's extractor, typed for its per-token interface."""
        return cast(LocalContextExtractor, self.vf_features_extractor)

    def _make_action_dist(self) -> TokenBernoulliDistribution:
        return TokenBernoulliDistribution(self.chunk_size)

    def _head_input_dims(self) -> tuple[int, int]:
        """Return ``(extra per-token context size, value-head input size)``."""
        return 0, int(self.vf_features_extractor.features_dim)

    def _build(self, lr_schedule: Schedule) -> None:
        """Create the per-token head, the value head and the optimizer (last).

        :param lr_schedule: Learning-rate schedule; ``lr_schedule(1)`` is the initial learning rate
        """
        context_dim, vf_input_dim = self._head_input_dims()
        token_dim = self._pi_tokens.token_dim
        self.action_dist = self._make_action_dist()
        self.mlp_extractor = TokenMlpExtractor(token_dim + context_dim, vf_input_dim, self.net_arch, self.activation_fn)
        self.action_net = nn.Linear(self.mlp_extractor.latent_dim_pi, 1)
        self.value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, 1)
        if self.ortho_init:
            # SB3's gains: sqrt(2) for hidden layers, 0.01 for the action head (near-uniform start), 1 for the value
            module_gains: dict[nn.Module, float] = {
                self.mlp_extractor: np.sqrt(2),
                self.action_net: 0.01,
                self.value_net: 1.0,
            }
            if self.share_features_extractor:
                module_gains[self.features_extractor] = np.sqrt(2)
            else:
                module_gains[self.pi_features_extractor] = np.sqrt(2)
                module_gains[self.vf_features_extractor] = np.sqrt(2)
            for module, gain in module_gains.items():
                module.apply(partial(self.init_weights, gain=gain))
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]

    # ------------------------------------------------------------------ per-token computations
    def _preprocess(self, obs: PyTorchObs) -> dict[str, th.Tensor]:
        out = preprocess_obs(obs, self.observation_space, normalize_images=self.normalize_images)
        assert isinstance(out, dict)
        return out

    def _token_features(self, pre: dict[str, th.Tensor]) -> tuple[th.Tensor, th.Tensor]:
        """Per-token features for the actor and for the critic (the same tensor when shared)."""
        h_pi = self._pi_tokens.token_features(pre)
        h_vf = h_pi if self.share_features_extractor else self._vf_tokens.token_features(pre)
        return h_pi, h_vf

    def _summary(self, h_vf: th.Tensor, pre: dict[str, th.Tensor]) -> th.Tensor:
        return self._vf_tokens.summary(h_vf, pre)

    def _head_logits(self, token_feats: th.Tensor, context: th.Tensor | None) -> th.Tensor:
        """Weight-shared head: ``[B, n, D]`` (+ ``[B, C]`` context) to ``[B, n]`` mask logits."""
        if context is not None:
            token_feats = th.cat([token_feats, context.unsqueeze(1).expand(-1, token_feats.shape[1], -1)], dim=-1)
        return self.action_net(self.mlp_extractor.forward_actor(token_feats)).squeeze(-1)

    def _chunk_logits(self, h_pi: th.Tensor, pre: dict[str, th.Tensor], context: th.Tensor | None = None) -> tuple[th.Tensor, th.Tensor]:
        """Logits of the chunk decided in this step and its active positions.

        :param h_pi: ``[B, L, D]`` actor token features
        :param pre: Preprocessed observations
        :param context: Optional ``[B, C]`` context appended to every token (the recurrent policy's LSTM output)
        :return: ``(logits [B, k], active [B, k] bool)``
        """
        index, in_window = self._pi_tokens.chunk_index(pre["position"], self.chunk_size)
        if self.rate_calibrated:  # the offset depends on the whole window's logits
            logits = self._calibrate(self._head_logits(h_pi, context), pre["valid"] > 0.5, pre["force_keep"] > 0.5, pre["target_mask_rate"])
            logits = logits.gather(1, index)
        else:
            chunk = h_pi.gather(1, index.unsqueeze(-1).expand(-1, -1, h_pi.shape[-1]))
            logits = self._head_logits(chunk, context)
        valid = pre["valid"].gather(1, index) > 0.5
        force_keep = pre["force_keep"].gather(1, index) > 0.5
        return logits, in_window & valid & ~force_keep

    def _calibrate(self, logits: th.Tensor, valid: th.Tensor, force_keep: th.Tensor, target_mask_rate: th.Tensor) -> th.Tensor:
        """Shift each window's logits to its target rate (:func:`rate_calibrated_logits`); unchanged without ``rate_calibrated``.

        :param logits: ``[B, L]`` finite logits of whole windows
        :param valid: ``[B, L]`` bool, real positions
        :param force_keep: ``[B, L]`` bool, force-kept positions
        :param target_mask_rate: ``[B]`` or ``[B, 1]`` target rates
        :return: ``[B, L]`` logits
        """
        if not self.rate_calibrated:
            return logits
        return rate_calibrated_logits(logits, valid, valid & ~force_keep, target_mask_rate)

    def _distribution(self, logits: th.Tensor, active: th.Tensor) -> TokenBernoulliDistribution:
        return self.action_dist.proba_distribution(logits, active)

    def _value(self, latent_vf_input: th.Tensor) -> th.Tensor:
        return self.value_net(self.mlp_extractor.forward_critic(latent_vf_input))

    def _window_context(self, pre: dict[str, th.Tensor], h_pi: th.Tensor) -> th.Tensor | None:
        """Context appended to every token by :meth:`token_mask_logits` (None for feed-forward policies)."""
        return None

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        """State values (feed-forward policies; the recurrent policy overrides this).

        :param obs: Observations
        :return: ``[B, 1]``
        """
        pre = self._preprocess(obs)
        h_vf = self._vf_tokens.token_features(pre)
        return self._value(self._summary(h_vf, pre))

    def token_mask_logits(self, obs: PyTorchObs | dict[str, np.ndarray], exclude_invalid: bool = True) -> th.Tensor:
        """Mask logits for every position of whole windows at once, without stepping the environment.

        Each logit comes from that token's features (its neighbourhood, the decisions passed in ``obs``, the
        target rate, the surprisal when observed) through the same head the chunk actions use, so for the
        positions of the current chunk they equal the logits of the step's action distribution (feed-forward
        policies; with ``rate_calibrated``, after the same per-window shift). ``position`` in ``obs`` is not
        used. Rank these under a budget for exact rate control.

        :param obs: Observations as numpy arrays (single or batched) or batched tensors
        :param exclude_invalid: Set padding (``valid == 0``) and force-keep positions to ``-inf``
        :return: ``[B, seq_len]`` logits of P(mask); gradients flow unless called under ``th.no_grad()``
        """
        if not all(isinstance(v, th.Tensor) for v in obs.values()):
            obs, _ = self.obs_to_tensor(obs)  # type: ignore[arg-type]
        pre = self._preprocess(obs)  # type: ignore[arg-type]
        h_pi = self._pi_tokens.token_features(pre)
        logits = self._head_logits(h_pi, self._window_context(pre, h_pi))
        logits = self._calibrate(logits, pre["valid"] > 0.5, pre["force_keep"] > 0.5, pre["target_mask_rate"])
        if exclude_invalid:
            blocked = (pre["valid"] < 0.5) | (pre["force_keep"] > 0.5)
            logits = logits.masked_fill(blocked, float("-inf"))
        return logits

    @property
    def has_inference_path(self) -> bool:
        """Whether :meth:`inference_mask_logits` computes the logits directly (feed-forward policy, local-context extractor)."""
        return type(self)._window_context is _TokenPolicyMixin._window_context and isinstance(
            self.pi_features_extractor, LocalContextExtractor
        )

    def inference_mask_logits(
        self,
        token_ids: th.Tensor,
        valid: th.Tensor,
        force_keep: th.Tensor,
        target_mask_rate: th.Tensor,
        surprisal: th.Tensor | None = None,
        decisions: th.Tensor | None = None,
        matmul_dtype: th.dtype = th.float32,
    ) -> th.Tensor:
        """:meth:`token_mask_logits` of the observations built from these arrays, for inference only (``compress()``).

        The mask logits of every position of the windows as
        :func:`~tokencompress_env.observation.build_observation` would show them, without the observation
        dict, SB3's preprocessing, the value head or a distribution: the extractor's
        :meth:`~agents.extractor.LocalContextExtractor.inference_token_features` and the per-token head.
        In float32 the result is bitwise that of :meth:`token_mask_logits` on a CPU; with
        ``matmul_dtype=torch.bfloat16`` the matrix products run in bfloat16 (faster, slightly different
        logits). Padding and force-kept positions get ``-inf``. Call it under ``torch.inference_mode``.
        Policies without :attr:`has_inference_path` (the recurrent one) go through :meth:`token_mask_logits`.

        :param token_ids: ``[B, L]`` integer ids
        :param valid: ``[B, L]`` real positions (bool)
        :param force_keep: ``[B, L]`` force-kept positions (bool)
        :param target_mask_rate: ``[B]`` target rates
        :param surprisal: ``[B, L]`` clipped surprisal bits (when the policy observes it)
        :param decisions: ``[B, L]`` decision codes (``None``: nothing decided)
        :param matmul_dtype: ``torch.float32`` (exact) or ``torch.bfloat16``
        :return: ``[B, L]`` float32 logits of P(mask)
        """
        valid_b = valid.bool()
        force_b = force_keep.bool()
        if not self.has_inference_path:
            obs: dict[str, th.Tensor] = {
                "token_ids": token_ids.float(),
                "decisions": (th.zeros_like(token_ids) if decisions is None else decisions).float(),
                "valid": valid_b.float(),
                "force_keep": force_b.float(),
                "position": th.zeros(token_ids.shape[0], 1, device=token_ids.device),
                "target_mask_rate": target_mask_rate.float().reshape(-1, 1),
            }
            if surprisal is not None:
                obs["surprisal"] = surprisal.float()
            return self.token_mask_logits({k: obs[k] for k in self.observation_space.spaces}).float()  # type: ignore[attr-defined]
        features = self._pi_tokens.inference_token_features(
            token_ids, valid_b, force_b, target_mask_rate, surprisal, decisions, matmul_dtype=matmul_dtype
        )
        if matmul_dtype == th.float32:
            logits = self._head_logits(features, None)
        else:
            logits = self._head_inference(features, matmul_dtype)
        logits = self._calibrate(logits.float(), valid_b, force_b, target_mask_rate)
        return logits.masked_fill(~valid_b | force_b, float("-inf"))

    def _head_inference(self, features: th.Tensor, dtype: th.dtype) -> th.Tensor:
        """The per-token head with its matrix products in ``dtype`` (activations between them in that dtype too).

        :param features: ``[B, L, D]`` float32 token features
        :param dtype: the matrix products' dtype
        :return: ``[B, L]`` logits
        """
        batch, length, dim = features.shape
        h = features.to(dtype).reshape(-1, dim)
        layers = [*self.mlp_extractor.policy_net, self.action_net]
        for layer in layers:
            if isinstance(layer, nn.Linear) and layer.bias is not None:
                w = linear_inference_weights(layer, dtype)
                h = th.addmm(w.bias, h, w.weight_t)
            else:
                h = layer(h)
        return h.float().reshape(batch, length)

    def token_mask_probs(self, obs: PyTorchObs | dict[str, np.ndarray]) -> th.Tensor:
        """``sigmoid`` of :meth:`token_mask_logits` (0 at padding and force-keep positions).

        :param obs: Observations (see :meth:`token_mask_logits`)
        :return: ``[B, seq_len]`` probabilities of masking each position
        """
        return th.sigmoid(self.token_mask_logits(obs))


class TokenActorCriticPolicy(_TokenPolicyMixin, ActorCriticPolicy):
    """Per-token actor-critic policy for PPO, A2C and TRPO (see the module docstring).

    :param observation_space: TokenMask-v0 ``Dict`` observation space
    :param action_space: ``MultiBinary(k)`` action space
    :param lr_schedule: Learning-rate schedule
    :param net_arch: Hidden sizes ``dict(pi=[...], vf=[...])`` of the per-token head and of the value head
        (default ``dict(pi=[64], vf=[64])``)
    :param features_extractor_class: Local-context extractor (default :class:`LocalContextExtractor`)
    :param features_extractor_kwargs: Its keyword arguments (``chunk_size`` is filled in from the action space)
    :param kwargs: Other ``ActorCriticPolicy`` arguments (``activation_fn``, ``ortho_init``,
        ``share_features_extractor``, ``optimizer_class``, ``optimizer_kwargs``, ...)
    """

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Actions, values and log-probabilities for a batch of observations.

        :param obs: Observations
        :param deterministic: Take the most likely actions
        :return: ``(actions [B, k], values [B, 1], log_prob [B])``
        """
        pre = self._preprocess(obs)
        h_pi, h_vf = self._token_features(pre)
        distribution = self._distribution(*self._chunk_logits(h_pi, pre))
        actions = distribution.get_actions(deterministic=deterministic)
        return actions.reshape(-1, self.chunk_size), self._value(self._summary(h_vf, pre)), distribution.log_prob(actions)

    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """Values, log-probabilities and entropies of given actions (inactive positions excluded).

        :param obs: Observations
        :param actions: ``[B, k]`` actions
        :return: ``(values [B, 1], log_prob [B], entropy [B])``
        """
        pre = self._preprocess(obs)
        h_pi, h_vf = self._token_features(pre)
        distribution = self._distribution(*self._chunk_logits(h_pi, pre))
        return self._value(self._summary(h_vf, pre)), distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs: PyTorchObs) -> TokenBernoulliDistribution:
        """The action distribution of the chunk decided in this step.

        :param obs: Observations
        :return: The distribution
        """
        pre = self._preprocess(obs)
        h_pi = self._pi_tokens.token_features(pre)
        return self._distribution(*self._chunk_logits(h_pi, pre))


class MaskableTokenActorCriticPolicy(_TokenPolicyMixin, MaskableActorCriticPolicy):  # type: ignore[misc]
    """Per-token actor-critic policy for sb3-contrib's MaskablePPO (see the module docstring).

    Action masks come from the environment's ``action_masks()`` with sb3-contrib's ``MultiBinary`` layout
    (``2 * k`` booleans, ``[keep allowed, mask allowed]`` per position). Positions the mask fixes become
    inactive (no log-probability, no entropy) with the allowed value forced.

    :param observation_space: TokenMask-v0 ``Dict`` observation space
    :param action_space: ``MultiBinary(k)`` action space
    :param lr_schedule: Learning-rate schedule
    :param net_arch: Hidden sizes ``dict(pi=[...], vf=[...])`` (default ``dict(pi=[64], vf=[64])``)
    :param features_extractor_class: Local-context extractor (default :class:`LocalContextExtractor`)
    :param features_extractor_kwargs: Its keyword arguments (``chunk_size`` is filled in from the action space)
    :param kwargs: Other ``MaskableActorCriticPolicy`` arguments
    """

    action_dist: MaskableTokenBernoulliDistribution

    def _make_action_dist(self) -> MaskableTokenBernoulliDistribution:
        return MaskableTokenBernoulliDistribution(self.chunk_size)

    def _masked_distribution(
        self, h_pi: th.Tensor, pre: dict[str, th.Tensor], action_masks: np.ndarray | th.Tensor | None
    ) -> MaskableTokenBernoulliDistribution:
        distribution = self.action_dist.proba_distribution(*self._chunk_logits(h_pi, pre))
        distribution.apply_masking(action_masks)
        return distribution

    def forward(
        self, obs: PyTorchObs, deterministic: bool = False, action_masks: np.ndarray | None = None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Actions, values and log-probabilities for a batch of observations.

        :param obs: Observations
        :param deterministic: Take the most likely actions
        :param action_masks: ``[B, 2 * k]`` action masks, or None
        :return: ``(actions [B, k], values [B, 1], log_prob [B])``
        """
        pre = self._preprocess(obs)
        h_pi, h_vf = self._token_features(pre)
        distribution = self._masked_distribution(h_pi, pre, action_masks)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions.reshape(-1, self.chunk_size), self._value(self._summary(h_vf, pre)), distribution.log_prob(actions)

    def evaluate_actions(
        self, obs: PyTorchObs, actions: th.Tensor, action_masks: th.Tensor | None = None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """Values, log-probabilities and entropies of given actions (inactive and mask-fixed positions excluded).

        :param obs: Observations
        :param actions: ``[B, k]`` actions
        :param action_masks: ``[B, 2 * k]`` action masks, or None
        :return: ``(values [B, 1], log_prob [B], entropy [B])``
        """
        pre = self._preprocess(obs)
        h_pi, h_vf = self._token_features(pre)
        distribution = self._masked_distribution(h_pi, pre, action_masks)
        return self._value(self._summary(h_vf, pre)), distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs: PyTorchObs, action_masks: np.ndarray | None = None) -> MaskableTokenBernoulliDistribution:
        """The action distribution of the chunk decided in this step.

        :param obs: Observations
        :param action_masks: ``[B, 2 * k]`` action masks, or None
        :return: The distribution
        """
        pre = self._preprocess(obs)
        h_pi = self._pi_tokens.token_features(pre)
        return self._masked_distribution(h_pi, pre, action_masks)


class RecurrentTokenActorCriticPolicy(_TokenPolicyMixin, RecurrentActorCriticPolicy):
    """Per-token recurrent actor-critic policy for sb3-contrib's RecurrentPPO.

    The actor LSTM reads the window summary of each step (``features_dim`` of the extractor) and its
    output is appended to every token's features before the weight-shared per-token head; the critic
    LSTM (or the shared LSTM, or a linear layer, per ``shared_lstm`` / ``enable_critic_lstm``) feeds the
    value head. Inactive positions are excluded from log-probabilities and entropy as in
    :class:`TokenActorCriticPolicy`.

    :param observation_space: TokenMask-v0 ``Dict`` observation space
    :param action_space: ``MultiBinary(k)`` action space
    :param lr_schedule: Learning-rate schedule
    :param net_arch: Hidden sizes ``dict(pi=[...], vf=[...])`` (default ``dict(pi=[64], vf=[64])``)
    :param features_extractor_class: Local-context extractor (default :class:`LocalContextExtractor`)
    :param features_extractor_kwargs: Its keyword arguments (``chunk_size`` is filled in from the action space)
    :param lstm_hidden_size: LSTM width (smaller than sb3-contrib's 256: it is context, not the whole policy)
    :param n_lstm_layers: Number of LSTM layers
    :param shared_lstm: Share the actor's LSTM with the critic
    :param enable_critic_lstm: Give the critic its own LSTM
    :param lstm_kwargs: Extra ``nn.LSTM`` keyword arguments
    :param kwargs: Other ``RecurrentActorCriticPolicy`` arguments
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        features_extractor_class: type[BaseFeaturesExtractor] = LocalContextExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        lstm_hidden_size: int = 64,
        n_lstm_layers: int = 1,
        shared_lstm: bool = False,
        enable_critic_lstm: bool = True,
        lstm_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=net_arch,
            features_extractor_class=features_extractor_class,
            features_extractor_kwargs=features_extractor_kwargs,
            lstm_hidden_size=lstm_hidden_size,
            n_lstm_layers=n_lstm_layers,
            shared_lstm=shared_lstm,
            enable_critic_lstm=enable_critic_lstm,
            lstm_kwargs=lstm_kwargs,
            **kwargs,
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            lstm_hidden_size=self.lstm_output_dim,
            n_lstm_layers=self.lstm_actor.num_layers,
            shared_lstm=self.shared_lstm,
            enable_critic_lstm=self.enable_critic_lstm,
            lstm_kwargs=self.lstm_kwargs,
        )
        return data

    def _head_input_dims(self) -> tuple[int, int]:
        return self.lstm_output_dim, self.lstm_output_dim

    def _run_lstm(
        self, features: th.Tensor, states: tuple[th.Tensor, ...], episode_starts: th.Tensor, lstm: nn.LSTM
    ) -> tuple[th.Tensor, LSTMStates]:
        """``_process_sequence`` with its real return type (output, (hidden, cell))."""
        hidden, cell = states
        out, new_states = self._process_sequence(features, (hidden, cell), episode_starts, lstm)
        return out, cast(LSTMStates, new_states)

    def _critic_latent(
        self,
        summary_vf: th.Tensor,
        states_vf: tuple[th.Tensor, ...],
        episode_starts: th.Tensor,
        latent_pi: th.Tensor,
        states_pi: LSTMStates,
    ) -> tuple[th.Tensor, LSTMStates]:
        if self.lstm_critic is not None:
            return self._run_lstm(summary_vf, states_vf, episode_starts, self.lstm_critic)
        if self.shared_lstm:
            return latent_pi.detach(), (states_pi[0].detach(), states_pi[1].detach())
        assert self.critic is not None
        return self.critic(summary_vf), states_pi

    def _summaries(self, pre: dict[str, th.Tensor]) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        h_pi, h_vf = self._token_features(pre)
        summary_pi = self._pi_tokens.summary(h_pi, pre)
        summary_vf = summary_pi if self.share_features_extractor else self._summary(h_vf, pre)
        return h_pi, summary_pi, summary_vf

    def forward(  # type: ignore[override]
        self, obs: PyTorchObs, lstm_states: RNNStates, episode_starts: th.Tensor, deterministic: bool = False
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor, RNNStates]:
        """Actions, values, log-probabilities and new LSTM states.

        :param obs: Observations
        :param lstm_states: Actor and critic LSTM states
        :param episode_starts: 1 where a new episode starts (the states are reset there)
        :param deterministic: Take the most likely actions
        :return: ``(actions [B, k], values [B, 1], log_prob [B], new states)``
        """
        pre = self._preprocess(obs)
        h_pi, summary_pi, summary_vf = self._summaries(pre)
        latent_pi, states_pi = self._run_lstm(summary_pi, lstm_states.pi, episode_starts, self.lstm_actor)
        latent_vf, states_vf = self._critic_latent(summary_vf, lstm_states.vf, episode_starts, latent_pi, states_pi)
        distribution = self._distribution(*self._chunk_logits(h_pi, pre, latent_pi))
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        return actions.reshape(-1, self.chunk_size), self._value(latent_vf), log_prob, RNNStates(states_pi, states_vf)

    def get_distribution(  # type: ignore[override]
        self, obs: PyTorchObs, lstm_states: tuple[th.Tensor, th.Tensor], episode_starts: th.Tensor
    ) -> tuple[TokenBernoulliDistribution, tuple[th.Tensor, ...]]:
        """The action distribution of this step's chunk and the new actor LSTM states.

        :param obs: Observations
        :param lstm_states: Actor LSTM states
        :param episode_starts: 1 where a new episode starts
        :return: ``(distribution, new actor states)``
        """
        pre = self._preprocess(obs)
        h_pi = self._pi_tokens.token_features(pre)
        summary_pi = self._pi_tokens.summary(h_pi, pre)
        latent_pi, states = self._run_lstm(summary_pi, lstm_states, episode_starts, self.lstm_actor)
        return self._distribution(*self._chunk_logits(h_pi, pre, latent_pi)), states

    def predict_values(  # type: ignore[override]
        self, obs: PyTorchObs, lstm_states: tuple[th.Tensor, th.Tensor], episode_starts: th.Tensor
    ) -> th.Tensor:
        """State values.

        :param obs: Observations
        :param lstm_states: Critic LSTM states (actor states when ``shared_lstm``)
        :param episode_starts: 1 where a new episode starts
        :return: ``[B, 1]``
        """
        pre = self._preprocess(obs)
        h_vf = self._vf_tokens.token_features(pre)
        summary_vf = self._summary(h_vf, pre)
        if self.lstm_critic is not None:
            latent_vf, _ = self._process_sequence(summary_vf, lstm_states, episode_starts, self.lstm_critic)
        elif self.shared_lstm:
            latent_vf = self._process_sequence(summary_vf, lstm_states, episode_starts, self.lstm_actor)[0].detach()
        else:
            assert self.critic is not None
            latent_vf = self.critic(summary_vf)
        return self._value(latent_vf)

    def evaluate_actions(  # type: ignore[override]
        self, obs: PyTorchObs, actions: th.Tensor, lstm_states: RNNStates, episode_starts: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Values, log-probabilities and entropies of given actions over sequences.

        :param obs: Observations (sequences flattened as sb3-contrib's recurrent buffer gives them)
        :param actions: ``[B, k]`` actions
        :param lstm_states: Actor and critic LSTM states at the start of each sequence
        :param episode_starts: 1 where a new episode starts
        :return: ``(values [B, 1], log_prob [B], entropy [B])``
        """
        pre = self._preprocess(obs)
        h_pi, summary_pi, summary_vf = self._summaries(pre)
        latent_pi, states_pi = self._run_lstm(summary_pi, lstm_states.pi, episode_starts, self.lstm_actor)
        latent_vf, _ = self._critic_latent(summary_vf, lstm_states.vf, episode_starts, latent_pi, states_pi)
        distribution = self._distribution(*self._chunk_logits(h_pi, pre, latent_pi))
        return self._value(latent_vf), distribution.log_prob(actions), distribution.entropy()

    def _window_context(self, pre: dict[str, th.Tensor], h_pi: th.Tensor) -> th.Tensor | None:
        """LSTM output for the window as the first step of an episode (zero initial state)."""
        summary = self._pi_tokens.summary(h_pi, pre)
        batch = summary.shape[0]
        zeros = th.zeros(self.lstm_actor.num_layers, batch, self.lstm_output_dim, device=summary.device)
        starts = th.ones(batch, device=summary.device)
        latent, _ = self._process_sequence(summary, (zeros, zeros.clone()), starts, self.lstm_actor)
        return latent
