"""The distillation warm start (agents/distill.py): its labels, and that it learns a planted pattern."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch as th

import agents.distill as distill_module
from agents.distill import cheapest_tokens, distill_policy, lr_factor, teacher_masks, teacher_rate_grid
from agents.policy import TokenActorCriticPolicy
from tokencompress_env.baselines import BASELINES, SEARCH, MethodContext, rate_budget
from tokencompress_env.observation import build_observation, make_spaces
from tokencompress_env.reconstructor import Reconstructor

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


def test_teacher_rate_grid_spans_the_rate_range() -> None:
    assert teacher_rate_grid(0.2, 0.8, 7).tolist() == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert teacher_rate_grid(0.2, 0.8, 1).tolist() == [0.5]
    with pytest.raises(ValueError):
        teacher_rate_grid(0.2, 0.8, 0)


def test_teacher_masks_are_the_methods_masks_and_come_from_the_cache(
    test_reconstructor: Reconstructor, test_windows: dict[str, np.ndarray], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    windows = test_windows["train"][:6]
    valid = np.ones(windows.shape, dtype=bool)
    force_keep = np.zeros(windows.shape, dtype=bool)
    force_keep[:, 0] = True
    rates = np.array([0.25, 0.5])
    masks = teacher_masks("self_information", test_reconstructor, windows, valid, force_keep, rates, cache_dir=tmp_path, progress=False)
    context = MethodContext(reconstructor=test_reconstructor)
    for r, rate in enumerate(rates):
        expected = BASELINES["self_information"](windows, float(rate), context, valid, force_keep)
        assert np.array_equal(masks[r], expected)
        assert np.array_equal(masks[r].sum(axis=1), rate_budget(float(rate), valid, valid & ~force_keep))
        assert not masks[r][:, 0].any()

    def refuse(*args: Any, **kwargs: Any) -> np.ndarray:
        raise AssertionError("recomputed a cached teacher")

    monkeypatch.setitem(BASELINES, "self_information", refuse)
    again = teacher_masks("self_information", test_reconstructor, windows, valid, force_keep, rates, cache_dir=tmp_path, progress=False)
    assert np.array_equal(again, masks)
    with pytest.raises(AssertionError, match="recomputed"):  # other rates: another question, not read from the cache
        teacher_masks("self_information", test_reconstructor, windows, valid, force_keep, rates[:1], cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="queries the reconstructor"):
        teacher_masks("frequency", test_reconstructor, windows, valid, force_keep, rates, cache_dir=tmp_path, progress=False)


def test_search_teacher_masks_are_nested_over_rates(test_reconstructor: Reconstructor, test_windows: dict[str, np.ndarray]) -> None:
    windows = test_windows["train"][:2, :16]
    valid = np.ones(windows.shape, dtype=bool)
    none = np.zeros(windows.shape, dtype=bool)
    masks = teacher_masks(SEARCH, test_reconstructor, windows, valid, none, np.array([0.25, 0.5]), cache_dir="", progress=False)
    assert masks[0].sum(axis=1).tolist() == [4, 4] and masks[1].sum(axis=1).tolist() == [8, 8]
    assert not (masks[0] & ~masks[1]).any()  # the higher rate's drops include the lower rate's


def test_distillation_imitates_a_method_teachers_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a method teacher the labels are its masks (here: a planted teacher that drops each B after an A) of the
    sampled window at the sampled grid rate, and the policy learns to reproduce them."""
    train, held_out = planted_windows(256, seed=0), planted_windows(64, seed=1)
    asked: dict[str, Any] = {}
    targets: list[th.Tensor] = []
    observed_rates: list[th.Tensor] = []
    observed_ids: list[np.ndarray] = []

    def planted(ids: np.ndarray) -> np.ndarray:
        t = th.as_tensor(ids)
        return ((t == B) & (th.nn.functional.pad(t, (1, 0), value=0)[:, :-1] == A)).numpy()

    def planted_teacher(
        teacher: str,
        reconstructor: Any,
        windows: np.ndarray,
        valid: np.ndarray,
        force_keep: np.ndarray,
        rates: np.ndarray,
        *args: Any,
        **kwargs: Any,
    ) -> np.ndarray:
        asked.update(teacher=teacher, windows=windows, rates=rates)
        return np.repeat(planted(windows)[None], len(rates), axis=0)

    bce = th.nn.functional.binary_cross_entropy_with_logits
    original_observation = distill_module.build_observation

    def spy(logits: th.Tensor, target: th.Tensor, **kwargs: Any) -> th.Tensor:
        targets.append(target.detach().clone())
        return bce(logits, target, **kwargs)

    def observation_spy(ids: np.ndarray, valid: np.ndarray, keep: np.ndarray, rate: Any, bits: Any = None) -> dict[str, np.ndarray]:
        observed_rates.append(th.as_tensor(rate))
        observed_ids.append(np.array(ids))
        return original_observation(ids, valid, keep, rate, bits)

    monkeypatch.setattr(distill_module, "teacher_masks", planted_teacher)
    monkeypatch.setattr(distill_module, "build_observation", observation_spy)
    monkeypatch.setattr(th.nn.functional, "binary_cross_entropy_with_logits", spy)
    policy = _policy()
    before = _planted_recall(policy, held_out)
    report = distill_policy(
        policy,
        PlantedScorer(),  # type: ignore[arg-type]  (never queried: the teacher's masks are the labels)
        train,
        np.ones(train.shape, dtype=bool),
        np.zeros(train.shape, dtype=bool),
        steps=150,
        batch_size=16,
        learning_rate=3e-3,
        mask_rate_min=0.1,
        mask_rate_max=0.3,
        teacher="greedy_threshold",
        teacher_windows=200,
        teacher_rates=3,
        progress=False,
    )
    assert asked["teacher"] == "greedy_threshold" and len(asked["windows"]) == 200
    assert asked["rates"].tolist() == [0.1, 0.2, 0.3]
    pool = {row.tobytes() for row in asked["windows"]}
    assert len(targets) == len(observed_ids) == 150
    for labels, ids in zip(targets, observed_ids, strict=True):
        assert all(row.tobytes() in pool for row in ids)  # every batch comes from the teacher's pool
        assert np.array_equal(labels.numpy() > 0, planted(ids))  # and its labels are the teacher's masks of those windows
    assert all(set(np.round(rates.double().numpy(), 4).tolist()) <= {0.1, 0.2, 0.3} for rates in observed_rates)
    assert before < 0.5 and _planted_recall(policy, held_out) > 0.9, report


def test_distillation_rejects_a_method_teacher_with_the_cost_target() -> None:
    train = planted_windows(4, seed=0)
    ones = np.ones(train.shape, dtype=bool)
    with pytest.raises(ValueError, match="target='rank'"):
        distill_policy(_policy(), PlantedScorer(), train, ones, ~ones, steps=1, teacher="greedy_threshold", target="cost", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="teacher must be one of"):
        distill_policy(_policy(), PlantedScorer(), train, ones, ~ones, steps=1, teacher="oracle", progress=False)  # type: ignore[arg-type]


def test_lr_factor_decays_from_one_to_zero() -> None:
    assert [lr_factor("constant", s, 10) for s in (0, 5, 10)] == [1.0, 1.0, 1.0]
    assert [lr_factor("linear", s, 10) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    cosine = [lr_factor("cosine", s, 10) for s in range(11)]
    assert cosine[0] == 1.0 and abs(cosine[5] - 0.5) < 1e-12 and abs(cosine[10]) < 1e-12
    assert all(a > b for a, b in itertools.pairwise(cosine))  # strictly decreasing
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor("step", 0, 10)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_distillation_follows_its_learning_rate_schedule_across_a_resume(schedule: str) -> None:
    """The learning rate of step ``s`` (0-based) is ``lr * lr_factor(schedule, s, steps)``; a run stopped after
    step 6 and resumed from its optimizer's state uses the same rates as one that never stopped."""
    train = planted_windows(32, seed=0)
    ones = np.ones(train.shape, dtype=bool)
    common: dict[str, Any] = {"steps": 12, "batch_size": 4, "learning_rate": 2e-3, "lr_schedule": schedule, "progress": False}

    def run(start: int, stop_after: int, state: dict[str, Any] | None) -> tuple[list[float], dict[str, Any]]:
        rates: list[float] = []
        saved: dict[str, Any] = {}

        def callback(done: int, optimizer: th.optim.Optimizer) -> bool:
            rates.append(optimizer.param_groups[0]["lr"])  # the rate the next step will use
            saved.update(optimizer.state_dict())
            return done < stop_after

        distill_policy(_policy(), PlantedScorer(), train, ones, ~ones, start_step=start, optimizer_state=state, callback=callback, **common)  # type: ignore[arg-type]
        return rates, saved

    whole, _ = run(0, 12, None)
    first, state = run(0, 6, None)
    rest, _ = run(6, 12, state)
    expected = [2e-3 * lr_factor(schedule, done, 12) for done in range(1, 13)]
    assert np.allclose(whole, expected) and np.allclose(first + rest, expected), (whole, first, rest)
    if schedule == "cosine":
        assert whole[-1] < 1e-9 < whole[0]
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        distill_policy(_policy(), PlantedScorer(), train, ones, ~ones, steps=1, lr_schedule="step", progress=False)  # type: ignore[arg-type]


def test_distillation_reuses_each_labelled_batch_for_several_updates() -> None:
    """updates_per_batch: one reconstructor pass labels a batch, the policy takes that many updates on it; the
    reported losses are the batches' first (before any update on them); a count below 1 is refused."""
    calls: list[int] = []

    class CountingScorer(PlantedScorer):
        def score(self, ids: th.Tensor, context: th.Tensor, valid: th.Tensor, dtype: Any = None) -> _Scores:
            calls.append(len(ids))
            return super().score(ids, context, valid, dtype)

    train = planted_windows(32, seed=0)
    ones = np.ones(train.shape, dtype=bool)
    counts: list[int] = []

    def callback(done: int, optimizer: th.optim.Optimizer) -> bool:
        counts.append(int(next(iter(optimizer.state.values()))["step"]))
        return True

    report = distill_policy(
        _policy(),
        CountingScorer(),
        train,
        ones,
        ~ones,
        steps=5,
        batch_size=4,
        updates_per_batch=3,
        progress=False,
        callback=callback,  # type: ignore[arg-type]
    )
    assert calls == [4] * 5  # one labelling pass per step
    assert counts == [3, 6, 9, 12, 15]  # three updates per step
    assert report["steps_done"] == 5
    once = distill_policy(_policy(), PlantedScorer(), train, ones, ~ones, steps=5, batch_size=4, progress=False)  # type: ignore[arg-type]
    assert once["first_loss"] == report["first_loss"]  # the same first batch, before any update on it
    assert once["last_loss"] != report["last_loss"]  # the extra updates did change the policy
    with pytest.raises(ValueError, match="updates_per_batch must be at least 1"):
        distill_policy(_policy(), PlantedScorer(), train, ones, ~ones, steps=1, updates_per_batch=0, progress=False)  # type: ignore[arg-type]
