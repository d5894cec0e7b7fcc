"""The distillation warm start (agents/distill.py): its labels, and that it learns a planted pattern."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch as th

from agents.distill import cheapest_tokens, distill_policy
from agents.policy import TokenActorCriticPolicy
from tokencompress_env.observation import build_observation, make_spaces

SEQ_LEN, VOCAB, A, B = 32, 64, 1, 2


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Any:
    n = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(n)


def test_cheapest_tokens_labels_the_lowest_surprisal_maskable_tokens() -> None:
    surprisal = th.tensor([[5.0, 1.0, 3.0, 0.5, 2.0, 9.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    maskable = th.tensor([[True, True, True, False, True, True], [True, True, True, True, True, True]])
    valid = th.ones_like(maskable)
    labels = cheapest_tokens(surprisal, valid, maskable, th.tensor([0.4, 0.5]))
    # row 0: 6 real tokens, budget round(0.4 * 6) = 2: the 1.0 and the 2.0 (the 0.5 is not maskable)
    assert labels[0].tolist() == [0, 1, 0, 0, 1, 0]
    assert labels[1].tolist() == [1, 1, 1, 0, 0, 0]


@dataclass
class _Scores:
    surprisal: th.Tensor


class PlantedScorer:
    """Stand-in reconstructor: token ``B`` right after a kept ``A`` costs 0.5 bits; every other token ~8 bits."""

    device = th.device("cpu")

    def score(self, ids: th.Tensor, context: th.Tensor, valid: th.Tensor, dtype: Any = None) -> _Scores:
        ids, context = th.as_tensor(ids), th.as_tensor(context, dtype=th.bool)
        after_kept_a = th.zeros_like(context)
        after_kept_a[:, 1:] = (ids[:, :-1] == A) & ~context[:, :-1]
        noise = th.sin(ids.float() * 1.7).abs()  # fixed per token id: a weak, irrelevant ordering
        return _Scores(th.where((ids == B) & after_kept_a, th.full(ids.shape, 0.5), 8.0 + noise))


def planted_windows(n: int, seed: int) -> np.ndarray:
    """Random tokens with three ``A B`` pairs and two lone ``B`` tokens (after another token) in each window."""
    rng = np.random.default_rng(seed)
    windows = rng.integers(3, VOCAB, size=(n, SEQ_LEN))
    for row in windows:
        starts = rng.choice(np.arange(0, SEQ_LEN - 1, 2), size=5, replace=False)
        for start in starts[:3]:
            row[start], row[start + 1] = A, B
        for start in starts[3:]:
            row[start + 1] = B  # B after a random token: as dear as any other token
    return windows


def _policy() -> TokenActorCriticPolicy:
    obs_space, action_space = make_spaces(SEQ_LEN, 8, VOCAB, observe_surprisal=False)
    th.manual_seed(0)
    kwargs = {"embed_dim": 32, "hidden_dim": 32, "dilations": (1, 2), "use_decisions": False}
    return TokenActorCriticPolicy(obs_space, action_space, lambda _: 1e-3, features_extractor_kwargs=kwargs)


def _planted_recall(policy: TokenActorCriticPolicy, windows: np.ndarray) -> float:
    """Fraction of the policy's top-3 logits of each window that are a ``B`` right after an ``A``."""
    obs = build_observation(windows, np.ones(windows.shape, bool), np.zeros(windows.shape, bool), 0.1)
    with th.no_grad():
        logits = policy.token_mask_logits({k: th.as_tensor(v).float() for k, v in obs.items()})
    top = logits.topk(3, dim=1).indices
    ids = th.as_tensor(windows)
    planted = (ids == B) & (th.nn.functional.pad(ids, (1, 0), value=0)[:, :-1] == A)
    return float(planted.gather(1, top).float().mean())


@pytest.mark.parametrize("target", ["rank", "cost"])
def test_distillation_learns_to_drop_a_planted_predictable_token_first(target: str) -> None:
    train, held_out = planted_windows(256, seed=0), planted_windows(64, seed=1)
    policy = _policy()
    before = _planted_recall(policy, held_out)
    report = distill_policy(
        policy,
        PlantedScorer(),  # type: ignore[arg-type]
        train,
        np.ones(train.shape, dtype=bool),
        np.zeros(train.shape, dtype=bool),
        steps=150,
        batch_size=16,
        learning_rate=3e-3,
        mask_rate_min=0.05,
        mask_rate_max=0.15,
        target=target,
        progress=False,
    )
    after = _planted_recall(policy, held_out)
    assert before < 0.5  # an untrained policy does not know the pattern (chance is 3/32 per pick)
    assert after > 0.9, (before, after, report)
    assert report["last_loss"] < report["first_loss"]


class _Recorder:
    """Stand-in for an SB3 logger (records ``distill/*`` scalars) and a scorer spy (records what it returned)."""

    def __init__(self) -> None:
        self.scalars: dict[str, list[float]] = {}
        self.surprisal: list[th.Tensor] = []
        self.valid: list[th.Tensor] = []

    def record(self, key: str, value: float) -> None:
        self.scalars.setdefault(key, []).append(float(value))

    def dump(self, step: int) -> None:
        pass


class _PositionalScorer(PlantedScorer):
    """The planted scorer with a distinct cost per token and position (no ties), recording what it returned."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    def score(self, ids: th.Tensor, context: th.Tensor, valid: th.Tensor, dtype: Any = None) -> _Scores:
        scores = super().score(ids, context, valid, dtype)
        surprisal = scores.surprisal + th.arange(ids.shape[1]).float() * 1e-3
        self.recorder.surprisal.append(surprisal.clone())
        self.recorder.valid.append(th.as_tensor(valid, dtype=th.bool).clone())
        return _Scores(surprisal)


def test_distillation_labels_are_the_cheapest_tokens_and_agreement_rises(monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: every label set the policy is trained on is the round(r * n) cheapest maskable tokens under the
    reconstructor's surprisal (force-kept and padding never labelled), and the policy's agreement with them rises."""
    recorder = _Recorder()
    targets: list[th.Tensor] = []
    bce = th.nn.functional.binary_cross_entropy_with_logits

    def spy(logits: th.Tensor, target: th.Tensor, **kwargs: Any) -> th.Tensor:
        targets.append(target.detach().cpu().clone())
        return bce(logits, target, **kwargs)

    monkeypatch.setattr(th.nn.functional, "binary_cross_entropy_with_logits", spy)
    train = planted_windows(256, seed=0)
    valid = np.ones(train.shape, dtype=bool)
    valid[::2, -4:] = False  # right padding in every other window
    force_keep = np.zeros(train.shape, dtype=bool)
    force_keep[:, 5] = True
    low, high = 0.05, 0.3
    report = distill_policy(
        _policy(),
        _PositionalScorer(recorder),  # type: ignore[arg-type]
        train,
        valid,
        force_keep,
        steps=120,
        batch_size=16,
        learning_rate=3e-3,
        mask_rate_min=low,
        mask_rate_max=high,
        progress=False,
        logger=recorder,
    )
    assert len(targets) == len(recorder.surprisal) == 120
    for labels, surprisal, real in zip(targets, recorder.surprisal, recorder.valid, strict=True):
        assert set(labels.unique().tolist()) <= {0.0, 1.0}
        for row, cost, maskable in zip(labels > 0, surprisal, real, strict=True):
            n_real = int(maskable.sum())  # real tokens of the row, the force-kept one included
            maskable = maskable.clone()
            maskable[5] = False  # force-kept
            n, k = int(maskable.sum()), int(row.sum())
            assert not row[~maskable].any()  # never a force-kept or padding token
            # the budget of a rate in the range, over the real tokens (baselines.rate_budget)
            assert min(np.floor(low * n_real + 0.5), n) <= k <= min(np.floor(high * n_real + 0.5), n)
            if 0 < k < n:
                assert cost[row].max() < cost[maskable & ~row].min()  # the k cheapest, no others
    agreement = recorder.scalars["distill/label_agreement"]
    assert agreement[0] < 0.5 and report["label_agreement"] > 0.7 and np.mean(agreement[-3:]) > agreement[0] + 0.3, agreement
