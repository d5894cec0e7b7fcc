"""Tests of agents/: extractor size, per-token policies, algorithms by name.

A stand-in env with TokenMask-v0's spaces keeps these fast and independent of the reconstructor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import nn
from torch.nn import functional as F

from agents import (
    ALGORITHMS,
    LocalContextExtractor,
    MaskableTokenActorCriticPolicy,
    RecurrentTokenActorCriticPolicy,
    TokenActorCriticPolicy,
    canonical_name,
    get_algorithm,
    load_model,
    make_model,
)
from agents.extractor import N_COPY_FEATURES, ConvBlock, copy_features
from agents.policy import INACTIVE_LOGIT, rate_calibrated_offset
from tokencompress_env.errors import CheckpointError
from tokencompress_env.run_folder import file_sha256

SMALL_EXTRACTOR = {"embed_dim": 16, "hidden_dim": 16, "dilations": (1, 2)}
SMALL_POLICY = {"net_arch": {"pi": [16], "vf": [16]}, "features_extractor_kwargs": SMALL_EXTRACTOR}


def token_obs_space(seq_len: int, vocab: int, surprisal: bool = False) -> spaces.Dict:
    d: dict[str, spaces.Space] = {
        "token_ids": spaces.Box(0, vocab - 1, (seq_len,), np.int64),
        "decisions": spaces.Box(0, 2, (seq_len,), np.int64),
        "valid": spaces.Box(0, 1, (seq_len,), np.int64),
        "force_keep": spaces.Box(0, 1, (seq_len,), np.int64),
        "position": spaces.Box(0, seq_len, (1,), np.int64),
        "target_mask_rate": spaces.Box(0, 1, (1,), np.float32),
    }
    if surprisal:
        d["surprisal"] = spaces.Box(0, 64, (seq_len,), np.float32)
    return spaces.Dict(d)


class StandInTokenEnv(gym.Env):
    """TokenMask-v0's spaces with a trivial reward: +1 per masked even token id, -1 per masked odd one."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, seq_len: int = 24, chunk_size: int = 8, vocab: int = 32, surprisal: bool = True) -> None:
        self.seq_len, self.chunk_size, self.vocab = seq_len, chunk_size, vocab
        self.observation_space = token_obs_space(seq_len, vocab, surprisal)
        self.action_space = spaces.MultiBinary(chunk_size)
        self.surprisal = surprisal

    def _obs(self) -> dict[str, np.ndarray]:
        obs = {
            "token_ids": self.ids.copy(),
            "decisions": self.decisions.copy(),
            "valid": self.valid.copy(),
            "force_keep": self.force_keep.copy(),
            "position": np.array([self.position], np.int64),
            "target_mask_rate": np.array([0.5], np.float32),
        }
        if self.surprisal:
            obs["surprisal"] = (self.ids % 7).astype(np.float32)
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict]:
        super().reset(seed=seed)
        n_valid = int(self.np_random.integers(self.seq_len // 2, self.seq_len + 1))
        self.ids = np.zeros(self.seq_len, np.int64)
        self.ids[:n_valid] = self.np_random.integers(0, self.vocab, n_valid)
        self.valid = (np.arange(self.seq_len) < n_valid).astype(np.int64)
        self.force_keep = ((self.np_random.random(self.seq_len) < 0.1) & (self.valid == 1)).astype(np.int64)
        self.decisions = np.zeros(self.seq_len, np.int64)
        self.n_valid, self.position = n_valid, 0
        return self._obs(), {}

    def action_masks(self) -> np.ndarray:
        idx = self.position + np.arange(self.chunk_size)
        inside = idx < self.seq_len
        free = np.zeros(self.chunk_size, bool)
        free[inside] = (self.valid[idx[inside]] == 1) & (self.force_keep[idx[inside]] == 0)
        return np.stack([np.ones(self.chunk_size, bool), free], axis=1).reshape(-1)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        token_rewards = np.zeros(self.chunk_size)  # the reward split by token, as TokenMask-v0 reports it
        for j, a in enumerate(np.asarray(action).reshape(-1)):
            i = self.position + j
            if i >= self.n_valid:
                break
            masked = bool(a) and not self.force_keep[i]
            self.decisions[i] = 2 if masked else 1
            if masked:
                token_rewards[j] = 1.0 if self.ids[i] % 2 == 0 else -1.0
        self.position = min(self.position + self.chunk_size, self.seq_len)
        info = {"token_rewards": token_rewards}
        return self._obs(), float(token_rewards.sum()), self.position >= self.n_valid, False, info


def batch_obs(env: StandInTokenEnv, n: int = 4, seed: int = 0) -> dict[str, th.Tensor]:
    obs = [env.reset(seed=seed + i)[0] for i in range(n)]
    return {k: th.as_tensor(np.stack([o[k] for o in obs])) for k in obs[0]}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Any:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine they oversubscribe."""
    n = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(n)


def lr(_: float) -> float:
    return 3e-4


# ----------------------------------------------------------------------------------- extractor


def test_default_extractor_parameter_count_and_shapes() -> None:
    space = token_obs_space(128, 4096, surprisal=True)
    ext = LocalContextExtractor(space)
    n_params = sum(p.numel() for p in ext.parameters())
    assert 700_000 <= n_params <= 1_500_000, n_params
    obs = {k: th.as_tensor(np.stack([s.sample() for _ in range(3)])).float() for k, s in space.spaces.items()}
    feats = ext.token_features(obs)
    assert feats.shape == (3, 128, ext.token_dim)
    assert ext(obs).shape == (3, ext.features_dim)
    # the surprisal feature is optional
    assert LocalContextExtractor(token_obs_space(128, 4096)).token_features(obs).shape == (3, 128, ext.token_dim)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extractor_is_local_and_ignores_padding(seed: int) -> None:
    th.manual_seed(seed)
    space = token_obs_space(64, 512)
    space.seed(seed)
    ext = LocalContextExtractor(space, embed_dim=32, hidden_dim=32).eval()
    obs = {k: th.as_tensor(s.sample()[None]).float() for k, s in space.spaces.items()}
    obs["valid"][:] = 1
    obs["valid"][0, 50:] = 0
    base = ext.token_features(obs)
    far = {k: v.clone() for k, v in obs.items()}
    far["token_ids"][0, 0] = (far["token_ids"][0, 0] + 1) % 512
    out = ext.token_features(far)
    reach = sum(b.reach for b in ext.blocks)
    assert not th.allclose(out[0, 1], base[0, 1])
    assert th.allclose(out[0, reach + 1 :], base[0, reach + 1 :])
    assert not th.equal(out[0, reach], base[0, reach])  # the edge of the receptive field is reached
    # padded positions are zero and their token ids do not matter
    assert th.all(base[0, 50:] == 0)
    pad = {k: v.clone() for k, v in obs.items()}
    pad["token_ids"][0, 50:] = 7
    assert th.allclose(ext.token_features(pad), base)


def test_copy_features_on_a_hand_made_window() -> None:
    # ids:       5  7  9  5  7  3  5  7  9   (pad)
    ids = th.tensor([[5, 7, 9, 5, 7, 3, 5, 7, 9, 5]])
    valid = th.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 0]])
    feats = copy_features(ids, valid)
    assert feats.shape == (1, 10, N_COPY_FEATURES)
    seen, bigram, trigram, count = feats[0].unbind(-1)
    assert seen.tolist() == [0, 0, 0, 1, 1, 0, 1, 1, 1, 0]  # the padded 5 counts for nothing
    assert bigram.tolist() == [0, 0, 0, 0, 1, 0, 0, 1, 1, 0]  # "5 7" repeats at 4 and 7, "7 9" at 8
    assert trigram.tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]  # only "5 7 9" repeats whole
    assert count[6] == th.log2(th.tensor(3.0)) / 4  # 5 seen twice before position 6
    # a padded earlier occurrence is never a copy source
    assert copy_features(th.tensor([[5, 5]]), th.tensor([[0, 1]]))[0, 1].sum() == 0


def test_copy_features_reach_the_whole_window() -> None:
    """With copy features, a token far outside the convolution's reach changes a repeated token's features."""
    th.manual_seed(0)
    space = token_obs_space(64, 512)
    ext = LocalContextExtractor(space, embed_dim=32, hidden_dim=32, use_copy_features=True).eval()
    obs = {k: th.as_tensor(s.sample()[None]).float() for k, s in space.spaces.items()}
    obs["valid"][:] = 1
    obs["token_ids"][0, :] = th.arange(64).float() + 100  # no repeats
    base = ext.token_features(obs)
    far = {k: v.clone() for k, v in obs.items()}
    far["token_ids"][0, 0] = far["token_ids"][0, 63]  # position 63 now repeats position 0
    out = ext.token_features(far)
    assert not th.allclose(out[0, 63], base[0, 63])
    assert th.allclose(out[0, 30], base[0, 30])  # neither near position 0 nor a repeat
    without = LocalContextExtractor(space, embed_dim=32, hidden_dim=32).eval()
    assert th.allclose(without.token_features(far)[0, 63], without.token_features(obs)[0, 63])


def test_separable_block_is_a_depthwise_then_channel_mixing_convolution() -> None:
    """ConvBlock(separable=True) against torch's grouped Conv1d; its inference path is the same arithmetic."""
    th.manual_seed(0)
    dim, length = 8, 20
    block = ConvBlock(dim, kernel_size=7, dilation=2, separable=True).eval()
    assert block.columns_width == dim and block.reach == 6
    x = th.randn(2, length, dim)
    valid = th.ones(2, length, 1)
    valid[1, 15:] = 0
    depthwise = nn.Conv1d(dim, dim, 7, dilation=2, padding=6, groups=dim, bias=False)
    with th.no_grad():
        depthwise.weight.copy_(block.depthwise.t().unsqueeze(1))  # [dim, 1, kernel]
        mixed = depthwise((block.norm(x) * valid).transpose(1, 2)).transpose(1, 2)
        expected = x + F.gelu(block.conv(mixed))
        out = block(x, valid)
        assert th.allclose(out, expected, atol=1e-5)
        margin = 9  # any margin >= reach, as the extractor's shared buffer
        padded = th.zeros(2, length + 2 * margin, dim)
        inplace = x.clone()
        block.forward_inplace(inplace, valid, padded, th.empty(2, length, dim), block.inference_weights(th.float32))
    assert th.equal(inplace, out)


def test_separable_extractor_is_local_cheaper_and_exact_on_the_inference_path() -> None:
    th.manual_seed(0)
    space = token_obs_space(64, 512)
    space.seed(0)
    full = LocalContextExtractor(space, embed_dim=32, hidden_dim=32).eval()
    ext = LocalContextExtractor(space, embed_dim=32, hidden_dim=32, kernel_size=7, dilations=(1, 2, 4, 1), separable=True).eval()
    assert sum(b.reach for b in ext.blocks) == sum(b.reach for b in full.blocks) == 24  # the same 49-token field
    obs = {k: th.as_tensor(np.stack([s.sample() for _ in range(3)])).float() for k, s in space.spaces.items()}
    obs["valid"][:] = 1
    obs["valid"][2, 40:] = 0
    obs["decisions"][:] = 0
    with th.no_grad():
        base = ext.token_features(obs)
        far = {k: v.clone() for k, v in obs.items()}
        far["token_ids"][0, 0] = (far["token_ids"][0, 0] + 1) % 512
        moved = ext.token_features(far)
        assert th.allclose(moved[0, 25:], base[0, 25:]) and not th.equal(moved[0, 24], base[0, 24])
        fast = ext.inference_token_features(
            obs["token_ids"].long(), obs["valid"].bool(), obs["force_keep"].bool(), obs["target_mask_rate"].reshape(-1)
        )
    assert th.equal(fast, base)

    from torch.utils.flop_counter import FlopCounterMode

    def flops(extractor: LocalContextExtractor) -> int:
        with th.no_grad(), FlopCounterMode(display=False) as counter:
            extractor.token_features(obs)
        return counter.get_total_flops()

    assert flops(ext) * 4 < flops(full)  # the matrix products: 4 blocks of 32x32 against 6 of (5*32)x32


def test_token_window_is_a_linear_convolution_over_the_embeddings() -> None:
    """embed_kernel_size=3: each token's input is sum_j W_j e(token i+j-1), zero beyond the window and at padding."""
    th.manual_seed(0)
    space = token_obs_space(12, 50)
    space.seed(0)
    ext = LocalContextExtractor(space, embed_dim=16, hidden_dim=8, kernel_size=3, dilations=(1,), embed_kernel_size=3).eval()
    assert ext.reach == 2 and ext.token_table().shape == (50, 24)
    obs = {k: th.as_tensor(np.stack([s.sample() for _ in range(2)])).float() for k, s in space.spaces.items()}
    obs["valid"][:] = 1
    obs["valid"][1, 9:] = 0
    obs["decisions"][:] = 0  # what the inference path sees without decisions
    ids, valid = obs["token_ids"].long(), obs["valid"]
    with th.no_grad():
        taps = ext.token_proj.weight.reshape(3, 8, 16)  # [tap, hidden, embed]
        embedded = ext.token_embedding(ids) * valid.unsqueeze(-1)
        expected = th.zeros(2, 12, 8)
        for i in range(12):
            for j in range(3):
                if 0 <= i + j - 1 < 12:
                    expected[:, i] += embedded[:, i + j - 1] @ taps[j].t()
        got = ext.token_window_sum(ext.token_proj(ext.token_embedding(ids)), valid)
        assert th.allclose(got, expected, atol=1e-6)
        features = ext.token_features(obs)
        fast = ext.inference_token_features(ids, valid.bool(), obs["force_keep"].bool(), obs["target_mask_rate"].reshape(-1))
        assert th.equal(fast, features)  # the table lookup is exact
        padded = {k: v.clone() for k, v in obs.items()}
        padded["token_ids"][1, 9:] = 3  # padding's ids reach no real token
        assert th.equal(ext.token_features(padded), features)
    with pytest.raises(ValueError, match="embed_kernel_size"):
        LocalContextExtractor(space, embed_kernel_size=2)


def test_extractor_cost_per_window() -> None:
    """The extractor is cheap: its work per 128-token window, counted in floating-point operations (not timed)."""
    from torch.utils.flop_counter import FlopCounterMode

    ext = LocalContextExtractor(token_obs_space(128, 4096)).eval()
    obs = {k: th.as_tensor(np.stack([s.sample() for _ in range(8)])).float() for k, s in ext._observation_space.spaces.items()}
    with th.no_grad(), FlopCounterMode(display=False) as counter:
        ext.token_features(obs)
    per_window = counter.get_total_flops() / 8
    assert 0 < per_window < 2e8, per_window  # 0.2 GFLOP: a few ms per window on one CPU core


# ----------------------------------------------------------------------------------- policies

POLICIES = [TokenActorCriticPolicy, MaskableTokenActorCriticPolicy, RecurrentTokenActorCriticPolicy]


def make_policy(cls: type, env: StandInTokenEnv) -> Any:
    return cls(env.observation_space, env.action_space, lr, **SMALL_POLICY)


def evaluate(policy: Any, obs: dict[str, th.Tensor], actions: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    if isinstance(policy, RecurrentTokenActorCriticPolicy):
        from sb3_contrib.common.recurrent.type_aliases import RNNStates

        n = actions.shape[0]
        shape = (policy.lstm_actor.num_layers, n, policy.lstm_output_dim)
        zeros = (th.zeros(shape), th.zeros(shape))
        _, log_prob, entropy = policy.evaluate_actions(obs, actions, RNNStates(zeros, zeros), th.ones(n))
    else:
        _, log_prob, entropy = policy.evaluate_actions(obs, actions)
    return log_prob, entropy


@pytest.mark.parametrize("cls", POLICIES)
def test_padded_positions_carry_no_log_probability(cls: type) -> None:
    env = StandInTokenEnv(seq_len=24, chunk_size=8)
    policy = make_policy(cls, env)
    with th.no_grad():  # make logits far from zero so entropies differ per position
        policy.action_net.weight.normal_(0, 1.0)
    obs = batch_obs(env, 3)
    obs["position"][:] = 16  # last chunk, positions 16..23
    obs["valid"][:] = 1
    obs["valid"][:, 20:] = 0  # 20..23 padding
    obs["force_keep"][:] = 0
    obs["force_keep"][:, 17] = 1  # position 17 must be kept
    obs["position"][2] = 20  # third row: chunk 20..27, all padding or beyond the window
    actions = th.zeros(3, 8)
    lp0, ent0 = evaluate(policy, obs, actions)
    flipped = actions.clone()
    flipped[:, 1] = 1  # force-keep position 17 (rows 0, 1); padding in row 2
    flipped[:, 4:] = 1  # padding (rows 0, 1); beyond the window in row 2
    lp1, ent1 = evaluate(policy, obs, flipped)
    assert th.allclose(lp0, lp1) and th.allclose(ent0, ent1)
    assert lp0[2].item() == 0.0 and ent0[2].item() == 0.0
    # an active position does count
    active_flip = actions.clone()
    active_flip[:, 0] = 1
    lp2, _ = evaluate(policy, obs, active_flip)
    assert not th.allclose(lp0[:2], lp2[:2])
    # entropy is the sum of per-position entropies over the active positions 16, 18, 19 only
    if cls is not RecurrentTokenActorCriticPolicy:
        with th.no_grad():
            logits = policy.token_mask_logits(obs, exclude_invalid=False)[:, 16:24]
        per_pos = th.distributions.Bernoulli(logits=logits).entropy()
        assert th.allclose(ent0[:2], per_pos[:2, [0, 2, 3]].sum(1), atol=1e-5)
    # sampled actions are keep (0) at inactive positions
    with th.no_grad():
        for _ in range(5):
            sampled, _ = policy.predict({k: v.numpy() for k, v in obs.items()})
            assert np.all(sampled[:2, [1, 4, 5, 6, 7]] == 0) and np.all(sampled[2] == 0)


def test_maskable_policy_uses_env_action_masks() -> None:
    env = StandInTokenEnv(seq_len=24, chunk_size=8)
    policy = make_policy(MaskableTokenActorCriticPolicy, env)
    obs = batch_obs(env, 2)
    obs["position"][:] = 0
    obs["valid"][:] = 1
    obs["force_keep"][:] = 0
    masks = np.ones((2, 16), bool)
    masks[:, 2 * 3] = False  # position 3: keep not allowed -> forced mask
    masks[:, 2 * 5 + 1] = False  # position 5: mask not allowed -> forced keep
    actions = th.zeros(2, 8)
    _, lp0, ent0 = policy.evaluate_actions(obs, actions, action_masks=th.as_tensor(masks))
    flipped = actions.clone()
    flipped[:, [3, 5]] = 1
    _, lp1, ent1 = policy.evaluate_actions(obs, flipped, action_masks=th.as_tensor(masks))
    assert th.allclose(lp0, lp1) and th.allclose(ent0, ent1)
    _, _, ent_free = policy.evaluate_actions(obs, actions)
    assert th.all(ent_free > ent0)
    for _ in range(5):
        sampled, _ = policy.predict({k: v.numpy() for k, v in obs.items()}, action_masks=masks)
        assert np.all(sampled[:, 3] == 1) and np.all(sampled[:, 5] == 0)


def test_whole_window_logits_match_chunk_logits() -> None:
    env = StandInTokenEnv(seq_len=24, chunk_size=8)
    policy = make_policy(TokenActorCriticPolicy, env)
    obs = batch_obs(env, 4)
    obs["position"][:] = 8
    with th.no_grad():
        window = policy.token_mask_logits(obs)
        dist = policy.get_distribution(obs)
    assert window.shape == (4, 24)
    blocked = (obs["valid"] == 0) | (obs["force_keep"] == 1)
    assert th.all(th.isneginf(window[blocked])) and th.all(th.isfinite(window[~blocked]))
    chunk = dist.distribution.logits
    active = dist.active
    assert th.allclose(chunk[active], window[:, 8:16][active], atol=1e-5)
    assert th.all(chunk[~active] == -INACTIVE_LOGIT)
    # numpy single observation works too, and probabilities are zero where blocked
    single = {k: v[0].numpy() for k, v in obs.items()}
    probs = policy.token_mask_probs(single)
    assert probs.shape == (1, 24) and th.all(probs[0][blocked[0]] == 0)
    # recurrent policy: same interface
    rec = make_policy(RecurrentTokenActorCriticPolicy, env)
    assert rec.token_mask_logits(obs).shape == (4, 24)


def test_rate_calibrated_offset_meets_the_expected_drops_with_the_implicit_gradient() -> None:
    gen = th.Generator().manual_seed(0)
    logits = (th.randn(5, 30, generator=gen, dtype=th.float64) * 3).requires_grad_()
    maskable = th.rand(5, 30, generator=gen) < 0.8
    maskable[3] = False  # a window with nothing to drop
    counts = maskable.sum(1).double()
    expected = th.tensor([0.2, 0.5, 0.9, 0.0, 1.0], dtype=th.float64) * counts
    offset = rate_calibrated_offset(logits, maskable, expected)
    probs = th.sigmoid(logits - offset[:, None]) * maskable
    assert th.allclose(probs.sum(1), expected, atol=1e-6)
    # the gradient is that of the offset as a function of the logits: ds/dlogit_j = s'_j / sum(s'), 0 elsewhere
    offset[1].backward()
    slope = (probs[1] * (1 - probs[1])).detach()
    assert th.allclose(logits.grad[1], slope / slope.sum(), atol=1e-6)
    assert th.all(logits.grad[1][~maskable[1]] == 0) and th.all(logits.grad[0] == 0)
    # a finite-difference check of the same
    bumped = logits.detach().clone()
    bumped[1, 4] += 1e-4
    numeric = (rate_calibrated_offset(bumped, maskable, expected)[1] - offset[1].detach()) / 1e-4
    assert abs(float(numeric) - float(logits.grad[1, 4])) < 1e-3


@pytest.mark.parametrize("cls", [TokenActorCriticPolicy, RecurrentTokenActorCriticPolicy])
def test_rate_calibrated_policy_keeps_the_order_and_samples_the_target_rate(cls: type) -> None:
    env = StandInTokenEnv(seq_len=24, chunk_size=8)
    plain = make_policy(cls, env)
    calibrated = cls(env.observation_space, env.action_space, lr, rate_calibrated=True, **SMALL_POLICY)
    calibrated.load_state_dict(plain.state_dict())
    with th.no_grad():
        plain.action_net.weight.normal_(0, 1.0)
        calibrated.action_net.weight.copy_(plain.action_net.weight)
    obs = batch_obs(env, 4)
    rates = th.tensor([[0.2], [0.4], [0.6], [0.8]])
    obs["target_mask_rate"] = rates
    with th.no_grad():
        before, after = plain.token_mask_logits(obs), calibrated.token_mask_logits(obs)
    open_ = (obs["valid"] == 1) & (obs["force_keep"] == 0)
    for row in range(4):
        shift = (after[row] - before[row])[open_[row]]
        assert th.allclose(shift, shift[0].expand_as(shift), atol=1e-4)  # one offset per window: the same order
        expected = float(rates[row]) * float(obs["valid"][row].sum())
        assert abs(float(th.sigmoid(after[row][open_[row]]).sum()) - min(expected, float(open_[row].sum()))) < 1e-3
    assert calibrated._get_constructor_parameters()["rate_calibrated"] is True
    if cls is TokenActorCriticPolicy:  # the step's distribution uses the same shifted logits
        obs["position"][:] = 8
        with th.no_grad():
            dist = calibrated.get_distribution(obs)
        assert th.allclose(dist.distribution.logits[dist.active], after[:, 8:16][dist.active], atol=1e-5)


def test_rate_calibrated_policy_survives_the_safe_artifact(tmp_path: Path) -> None:
    from agents.artifact import load_policy_artifact, save_policy_artifact

    env = DummyVecEnv([lambda: StandInTokenEnv(seq_len=24, chunk_size=8, surprisal=False)])
    model = make_model("ppo", env, policy_kwargs={**SMALL_POLICY, "rate_calibrated": True}, n_steps=8, batch_size=8, seed=0)
    save_policy_artifact(model, "ppo", tmp_path)
    loaded = load_policy_artifact(tmp_path).policy
    assert loaded.rate_calibrated
    obs = batch_obs(StandInTokenEnv(seq_len=24, chunk_size=8, surprisal=False), 3)
    with th.no_grad():
        assert th.allclose(loaded.token_mask_logits(obs), model.policy.token_mask_logits(obs))
        inference = loaded.inference_mask_logits(obs["token_ids"], obs["valid"], obs["force_keep"], obs["target_mask_rate"].reshape(-1))
    assert th.equal(th.isneginf(inference), th.isneginf(loaded.token_mask_logits(obs)))
    finite = th.isfinite(inference)
    assert th.allclose(inference[finite], loaded.token_mask_logits(obs)[finite], atol=1e-5)


def test_head_is_weight_shared_and_ortho_init() -> None:
    env = StandInTokenEnv(seq_len=24, chunk_size=8)
    policy = make_policy(TokenActorCriticPolicy, env)
    assert policy.action_net.out_features == 1  # one logit per token, not one output per chunk position
    assert policy.action_net.weight.abs().max() < 0.1  # SB3's 0.01 gain: near-uniform start
    names = [n for n, _ in policy.named_parameters()]
    assert all("value" not in n for n in names if n.startswith("action_net") or "policy_net" in n)  # TRPO splits on "value"
    assert policy.optimizer.param_groups[0]["params"][0] is next(policy.parameters())
    assert sum(p.numel() for p in policy.optimizer.param_groups[0]["params"]) == sum(p.numel() for p in policy.parameters())


def test_unsupported_spaces_are_rejected() -> None:
    env = StandInTokenEnv()
    with pytest.raises(TypeError):
        TokenActorCriticPolicy(env.observation_space, spaces.Discrete(4), lr)
    with pytest.raises(TypeError):
        TokenActorCriticPolicy(spaces.Box(0, 1, (4,)), env.action_space, lr)


# ----------------------------------------------------------------------------------- algorithms


def test_algorithm_names() -> None:
    assert set(ALGORITHMS) == {"ppo", "a2c", "trpo", "maskable_ppo", "recurrent_ppo", "token_ppo"}
    assert canonical_name("Maskable-PPO") == "maskable_ppo" and canonical_name("ppo_lstm") == "recurrent_ppo"
    assert get_algorithm("recurrent_ppo").policy_class is RecurrentTokenActorCriticPolicy
    with pytest.raises(ValueError, match="choose one of"):
        get_algorithm("dqn")


ALGO_KWARGS: dict[str, dict[str, Any]] = {
    "ppo": {"n_steps": 32, "batch_size": 32, "n_epochs": 2},
    "a2c": {"n_steps": 8},
    "trpo": {"n_steps": 64, "batch_size": 32, "cg_max_steps": 5},
    "maskable_ppo": {"n_steps": 32, "batch_size": 32, "n_epochs": 2},
    "recurrent_ppo": {"n_steps": 32, "batch_size": 32, "n_epochs": 2},
    "token_ppo": {"n_steps": 32, "batch_size": 32, "n_epochs": 2},
}


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_learn_save_load(algo: str, tmp_path: Path) -> None:
    env = DummyVecEnv([lambda: StandInTokenEnv(), lambda: StandInTokenEnv()])
    extra = {"lstm_hidden_size": 16} if algo == "recurrent_ppo" else {}
    model = make_model(algo, env, policy_kwargs={**SMALL_POLICY, **extra}, seed=0, device="cpu", **ALGO_KWARGS[algo])
    assert isinstance(model.policy, get_algorithm(algo).policy_class)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=256)
    assert model.num_timesteps >= 256
    assert any(not th.equal(a, b) for a, b in zip(before, model.policy.parameters()))
    path = tmp_path / f"{algo}.zip"
    model.save(path)
    with pytest.raises(CheckpointError, match="records no SHA-256"):  # safe by default: no recorded hash, no unpickling
        load_model(algo, str(path), env=env, device="cpu")
    (tmp_path / "state.json").write_text(json.dumps({"agent_sha256": file_sha256(path)}))
    loaded = load_model(algo, path, env=env, device="cpu")
    assert type(loaded.policy) is type(model.policy)
    assert type(load_model(algo, path, trust_pickle=True, device="cpu").policy) is type(model.policy)
    obs = env.reset()
    kwargs = {"action_masks": np.stack(env.env_method("action_masks"))} if algo == "maskable_ppo" else {}
    a1, _ = model.predict(obs, deterministic=True, **kwargs)
    a2, _ = loaded.predict(obs, deterministic=True, **kwargs)
    assert np.array_equal(a1, a2)
    with th.no_grad():
        assert th.allclose(model.policy.token_mask_logits(obs), loaded.policy.token_mask_logits(obs))


@pytest.mark.parametrize("cls", POLICIES)
def test_policy_save_load_round_trip(cls: type, tmp_path: Path) -> None:
    env = StandInTokenEnv()
    policy = make_policy(cls, env)
    path = tmp_path / "policy.pt"
    policy.save(str(path))
    loaded = cls.load(str(path), device="cpu")
    obs = batch_obs(env, 2)
    with th.no_grad():
        assert th.allclose(policy.token_mask_logits(obs), loaded.token_mask_logits(obs))
    for a, b in zip(policy.state_dict().values(), loaded.state_dict().values()):
        assert th.equal(a, b)


def test_default_policy_on_real_sizes() -> None:
    """The default policy at TokenMask-v0's typical sizes: about 1M parameters, valid actions."""
    space = token_obs_space(128, 4096, surprisal=True)
    policy = TokenActorCriticPolicy(space, spaces.MultiBinary(16), lr)
    n = sum(p.numel() for p in policy.parameters())
    assert 700_000 <= n <= 1_600_000, n
    obs = {k: np.stack([s.sample() for _ in range(2)]) for k, s in space.spaces.items()}
    obs["position"][:] = 32
    actions, _ = policy.predict(obs)
    assert actions.shape == (2, 16) and set(np.unique(actions)) <= {0, 1}


# ----------------------------------------------------------------------------------- the real env


@pytest.mark.parametrize("algo", ["ppo", "maskable_ppo", "recurrent_ppo"])
def test_real_token_mask_env(algo: str, test_reconstructor: Any, test_windows: dict[str, np.ndarray]) -> None:
    from tests.conftest import TEST_SEQ_LEN
    from tokencompress_env import env as env_module  # the project's own module: an import failure is a failure, not a skip

    def make() -> gym.Env:
        return env_module.TokenMaskEnv(
            reconstructor=test_reconstructor,
            windows=test_windows["validation"][:16],
            seq_len=TEST_SEQ_LEN,
            chunk_size=16,
            observe_surprisal=True,
        )

    env = DummyVecEnv([make])
    extra = {"lstm_hidden_size": 16} if algo == "recurrent_ppo" else {}
    model = make_model(
        algo,
        env,
        policy_kwargs={"net_arch": {"pi": [32], "vf": [32]}, **extra},
        seed=0,
        device="cpu",
        n_steps=16,
        batch_size=16,
        n_epochs=1,
    )
    extractor = model.policy.pi_features_extractor
    assert extractor.vocab_size == test_reconstructor.vocab_size and extractor.use_surprisal and extractor.chunk_size == 16
    model.learn(total_timesteps=32)
    obs = env.reset()
    with th.no_grad():
        logits = model.policy.token_mask_logits(obs)
    assert logits.shape == (1, TEST_SEQ_LEN)
    blocked = (obs["valid"] == 0) | (obs["force_keep"] == 1)
    assert np.array_equal(np.isneginf(logits.numpy()), blocked)
