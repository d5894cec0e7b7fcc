"""Warm start of the policy by distillation from the reconstructor, before reinforcement learning.

PPO alone learns slowly here: a step's reward sums the outcome of ``chunk_size`` decisions, so the
credit of one token's decision is buried in the others'. The reconstructor, however, can say directly
which tokens are cheap to drop. :func:`distill_policy` trains the policy's per-token head to rank, in
each window and at the window's target mask rate ``r``, the tokens that are cheapest to drop: the
tokens of lowest surprisal under the reconstructor, as many as the env's rate rule drops
(:func:`~tokencompress_env.baselines.rate_budget`), *given a compressed context at rate
r* (not given the full original text, as Selective Context ranks). The context is, for a fraction
``on_policy_fraction`` of each batch, the policy's own current choice at rate r (the context its drops
will really meet), and otherwise a random mask at rate r; fresh contexts every batch, so the labels
average over the contexts a token meets. The loss is binary
cross-entropy between the policy's mask logits (:meth:`token_mask_logits`) and those labels, on the
maskable positions only (``target="rank"``); ``target="cost"`` instead regresses ``-logit`` on each
token's surprisal in that context, so the logits order tokens by predicted cost at every rate. PPO then
fine-tunes the warm-started policy on the real reward.

A stronger teacher can replace those labels (``teacher``): a masking method of
:mod:`tokencompress_env.baselines` that queries the reconstructor at mask time, such as
``greedy_threshold`` (sequential, with the compressed prefix) or ``search`` (greedy deletion with full
re-scoring). Its masks are computed once on a pool of training windows at a grid of rates
(:func:`teacher_masks`, cached on disk, so seeds and variants that share the reconstructor and the windows
share them) and the policy learns to reproduce them from the token ids alone, so that at compress time it
needs no reconstructor. This is imitation of an expert, the first step of expert iteration.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
import torch.nn.functional as F
from tqdm.auto import tqdm

from tokencompress_env.baselines import BASELINES, SEARCH, MethodContext, greedy_search_masks, needs_reconstructor, rate_budget
from tokencompress_env.observation import build_observation
from tokencompress_env.paths import cache_root
from tokencompress_env.pretrain import weights_fingerprint
from tokencompress_env.reconstructor import Reconstructor, resolve_scoring_dtype

#: Distillation targets (see :func:`distill_policy`).
DISTILL_TARGETS = ("rank", "cost")
#: The default teacher: labels from the reconstructor's surprisal in compressed contexts (module docstring).
SURPRISAL_TEACHER = "surprisal"
#: Teachers of the distillation: the default, or a masking method that queries the reconstructor.
DISTILL_TEACHERS = (SURPRISAL_TEACHER, *(m for m in (*BASELINES, SEARCH) if needs_reconstructor(m)))
#: Bits per logit unit of the ``cost`` distillation target (``-logit * COST_SCALE`` predicts the surprisal).
COST_SCALE = 4.0
#: Learning-rate schedules of the distillation (see :func:`lr_factor`).
LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The distillation's learning rate at ``step`` as a fraction of its initial value.

    ``constant``: 1 throughout; ``linear``: from 1 down to 0 at ``steps``; ``cosine``: half a cosine
    from 1 down to 0 at ``steps``. The factor depends only on the step, so a resumed distillation
    continues the same curve.

    :param schedule: one of :data:`LR_SCHEDULES`
    :param step: steps done so far
    :param steps: total steps of the distillation
    :return: the factor, in ``[0, 1]``
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got '{schedule}'")
    progress = min(max(step / max(steps, 1), 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def cheapest_tokens(surprisal: th.Tensor, valid: th.Tensor, maskable: th.Tensor, rate: th.Tensor) -> th.Tensor:
    """Label the lowest-surprisal maskable tokens of each row, as many as the rate rule drops.

    The count is :func:`~tokencompress_env.baselines.rate_budget`, the project's one rate rule:
    ``min(round_half_up(rate * n_valid), n_maskable)``, the drops at which TokenMask-v0's rate term is
    zero (force-kept tokens count in the denominator, as in the reward).

    :param surprisal: ``[B, L]`` bits
    :param valid: ``[B, L]`` bool, real positions
    :param maskable: ``[B, L]`` bool, positions that may be dropped
    :param rate: ``[B]`` mask rates
    :return: ``[B, L]`` float labels (1 = drop)
    """
    budget = th.as_tensor(rate_budget(rate.detach().cpu().double().numpy(), valid.cpu().numpy(), maskable.cpu().numpy()))
    key = surprisal.masked_fill(~maskable, float("inf"))
    rank = key.argsort(dim=1).argsort(dim=1)
    return ((rank < budget.to(rank.device)[:, None]) & maskable).float()


def teacher_rate_grid(mask_rate_min: float, mask_rate_max: float, count: int) -> np.ndarray:
    """The rates at which a method teacher's masks are computed: ``count`` evenly spaced rates.

    :param mask_rate_min: lowest rate
    :param mask_rate_max: highest rate
    :param count: number of rates (1: the midpoint)
    :return: ``[count]`` rates, rounded to 4 decimals
    """
    if count < 1:
        raise ValueError(f"the teacher needs at least one rate, got {count}")
    if count == 1:
        return np.array([round((mask_rate_min + mask_rate_max) / 2, 4)])
    return np.round(np.linspace(mask_rate_min, mask_rate_max, count), 4)


def teacher_pool(n_windows: int, size: int) -> np.ndarray:
    """The training windows a method teacher masks: a fixed random subset, the same for every run seed.

    Runs that differ only in their seed therefore share the cached teacher masks (:func:`teacher_masks`).

    :param n_windows: training windows
    :param size: windows in the pool (all when there are fewer)
    :return: sorted window indices
    """
    return np.sort(np.random.default_rng(0).permutation(n_windows)[:size])


def teacher_masks(
    teacher: str,
    reconstructor: Reconstructor,
    windows: np.ndarray,
    valid: np.ndarray,
    force_keep: np.ndarray,
    rates: np.ndarray,
    units: str | None = None,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """The masks a method teacher chooses on ``windows`` at each of ``rates``, from the disk cache when present.

    The cache key hashes the teacher, the reconstructor's weights, the windows, the force-kept positions,
    the rates and the units: a cached file is the answer to exactly this question.

    :param teacher: a masking method that needs the reconstructor (one of :data:`DISTILL_TEACHERS` but
        ``"surprisal"``)
    :param reconstructor: the reconstructor the method queries
    :param windows: ``[N, L]`` token ids
    :param valid: ``[N, L]`` bool, real positions
    :param force_keep: ``[N, L]`` bool, positions that are never dropped
    :param rates: ``[R]`` mask rates (for ``search``: increasing, searched nested in one pass)
    :param units: what is dropped together (see :class:`~tokencompress_env.baselines.MethodContext`)
    :param batch_size: windows (``search``: candidate windows) per reconstructor forward pass
    :param cache_dir: folder of the cache (default ``<cache root>/teachers``; ``""``: no cache)
    :param progress: show a progress bar
    :return: ``[R, N, L]`` bool masks, ``True`` = dropped
    """
    if teacher not in DISTILL_TEACHERS or teacher == SURPRISAL_TEACHER:
        raise ValueError(f"teacher must be a method that queries the reconstructor, one of {DISTILL_TEACHERS[1:]}, got '{teacher}'")
    windows = np.ascontiguousarray(windows, dtype=np.int64)
    valid = np.ascontiguousarray(valid, dtype=bool)
    force_keep = np.ascontiguousarray(force_keep, dtype=bool)
    rates = np.asarray(rates, dtype=np.float64)
    digest = hashlib.sha256()
    for part in (
        teacher,
        weights_fingerprint(reconstructor.model),
        str(units),
        rates.tobytes(),
        windows.tobytes(),
        valid.tobytes(),
        force_keep.tobytes(),
    ):
        digest.update(part if isinstance(part, bytes) else part.encode())
    folder = Path(cache_root() / "teachers" if cache_dir is None else cache_dir)
    path = folder / f"{teacher}-{digest.hexdigest()[:16]}.npy"
    if cache_dir != "" and path.is_file():
        return np.load(path)
    context = MethodContext(reconstructor=reconstructor, batch_size=batch_size, units=units)
    if teacher == SEARCH:
        maskable = valid & ~force_keep
        budgets = np.stack([rate_budget(float(r), valid, maskable) for r in rates])
        bar = tqdm(total=len(windows), desc="Teacher masks (search)", disable=not progress, unit="window")
        masks = greedy_search_masks(reconstructor, windows, budgets, valid, force_keep, max(batch_size, 64), progress=bar.update)
        bar.close()
    else:
        method = BASELINES[teacher]
        chunks = [slice(i, min(i + 256, len(windows))) for i in range(0, len(windows), 256)]
        masks = np.zeros((len(rates), *windows.shape), dtype=bool)
        bar = tqdm(total=len(rates) * len(chunks), desc=f"Teacher masks ({teacher})", disable=not progress, unit="batch")
        for r, rate in enumerate(rates):
            for sl in chunks:
                masks[r, sl] = method(windows[sl], float(rate), context, valid[sl], force_keep[sl])
                bar.update(1)
        bar.close()
    if cache_dir != "":
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")
        np.save(partial, masks)
        partial.replace(path)
    return masks


def distill_policy(
    policy: Any,
    reconstructor: Reconstructor,
    windows: np.ndarray,
    valid: np.ndarray,
    force_keep: np.ndarray,
    steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    lr_schedule: str = "constant",
    updates_per_batch: int = 1,
    mask_rate_min: float = 0.2,
    mask_rate_max: float = 0.8,
    observe_surprisal: bool = False,
    on_policy_fraction: float = 0.5,
    target: str = "rank",
    teacher: str = SURPRISAL_TEACHER,
    teacher_windows: int = 1024,
    teacher_rates: int = 7,
    units: str | None = None,
    scoring_dtype: str = "float32",
    seed: int = 0,
    progress: bool = True,
    logger: Any = None,
    start_step: int = 0,
    optimizer_state: dict[str, Any] | None = None,
    callback: Callable[[int, th.optim.Optimizer], bool] | None = None,
) -> dict[str, float]:
    """Train ``policy`` in place to rank the tokens that are cheapest to drop (see the module docstring).

    :param policy: a policy of the agents package (has ``token_mask_logits``)
    :param reconstructor: the reconstructor whose surprisal defines "cheap"
    :param windows: ``[N, L]`` training windows
    :param valid: ``[N, L]`` bool, real (non-padding) positions
    :param force_keep: ``[N, L]`` bool, tokens that may never be dropped
    :param steps: optimizer steps
    :param batch_size: windows per step
    :param learning_rate: Adam learning rate (the initial one when ``lr_schedule`` decays it)
    :param lr_schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` decay to 0 over ``steps``
        (:func:`lr_factor`, applied with :class:`torch.optim.lr_scheduler.LambdaLR`)
    :param updates_per_batch: optimizer updates on each labelled batch (the labels cost a reconstructor
        forward pass, several times an update's cost, so reusing them buys updates cheaply); ``steps``
        counts labelled batches, the losses and the label agreement are those of a batch's first update
    :param mask_rate_min: lowest of the uniformly drawn target mask rates
    :param mask_rate_max: highest of the uniformly drawn target mask rates
    :param observe_surprisal: the policy observes the reconstructor's surprisal of the original tokens
    :param on_policy_fraction: fraction of each batch whose context is the policy's own current mask
    :param target: ``"rank"``: binary cross-entropy against the labels of the ``rate_budget`` cheapest
        tokens; ``"cost"``: regression of ``-logit`` on each token's surprisal (bits, clipped at 20) given
        the compressed context, so the logits rank tokens by their predicted cost at every rate
    :param teacher: ``"surprisal"`` (the labels above) or a masking method that queries the
        reconstructor, whose masks on ``teacher_windows`` training windows at ``teacher_rates`` rates
        are the labels (:func:`teacher_masks`; needs ``target="rank"``)
    :param teacher_windows: training windows the method teacher masks (:func:`teacher_pool`: a fixed
        random subset, the same for every seed; all when there are fewer)
    :param teacher_rates: rates of the method teacher, evenly spaced over the mask rate range
    :param units: units of the method teacher's masks (the env's ``units``)
    :param scoring_dtype: precision of the reconstructor's forward passes that make the labels (see
        :func:`~tokencompress_env.reconstructor.resolve_scoring_dtype`; ``auto``: bfloat16 where native)
    :param seed: seed of batches, rates and random contexts
    :param progress: show a progress bar
    :param logger: an SB3 logger for ``distill/*`` scalars (``None``: no logging)
    :param start_step: steps already done (a resumed distillation continues from here; its random
        stream is reseeded with ``seed + start_step``)
    :param optimizer_state: the optimizer's ``state_dict`` to continue from (``None``: a fresh optimizer)
    :param callback: called after every step with the number of steps done and the optimizer (the
        training driver checkpoints there); returning ``False`` stops the distillation after that step
    :return: first and last loss, the label agreement (fraction of labelled tokens in the policy's
        top-k) and ``steps_done`` (``steps`` unless the callback stopped it)
    """
    if target not in DISTILL_TARGETS:
        raise ValueError(f"target must be one of {DISTILL_TARGETS}, got '{target}'")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got '{lr_schedule}'")
    if updates_per_batch < 1:
        raise ValueError(f"updates_per_batch must be at least 1, got {updates_per_batch}")
    if teacher not in DISTILL_TEACHERS:
        raise ValueError(f"teacher must be one of {DISTILL_TEACHERS}, got '{teacher}'")
    if teacher != SURPRISAL_TEACHER and target != "rank":
        raise ValueError(f"a method teacher ('{teacher}') gives masks, not costs: use target='rank'")
    if teacher != SURPRISAL_TEACHER:
        pool = teacher_pool(len(windows), teacher_windows)
        grid = teacher_rate_grid(mask_rate_min, mask_rate_max, teacher_rates)
        expert = teacher_masks(teacher, reconstructor, windows[pool], valid[pool], force_keep[pool], grid, units, progress=progress)
    generator = th.Generator().manual_seed(seed + start_step)
    device = policy.device
    teacher_dtype = resolve_scoring_dtype(scoring_dtype, reconstructor.device)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = th.optim.Adam(params, lr=learning_rate)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    # The scheduler counts from this call; the offset puts a resumed run back on its curve.
    scheduler = th.optim.lr_scheduler.LambdaLR(optimizer, lambda done: lr_factor(lr_schedule, start_step + done, steps))
    losses: list[float] = []
    agreement = 0.0
    steps_done = start_step
    policy.set_training_mode(True)
    bar = tqdm(range(start_step, steps), desc="Distilling policy", disable=not progress, unit="step", initial=start_step, total=steps)
    for step in bar:
        if teacher == SURPRISAL_TEACHER:
            idx = th.randint(0, len(windows), (batch_size,), generator=generator).numpy()
            rate = mask_rate_min + (mask_rate_max - mask_rate_min) * th.rand(batch_size, generator=generator)
        else:
            row = th.randint(0, len(pool), (batch_size,), generator=generator).numpy()
            column = th.randint(0, len(grid), (batch_size,), generator=generator).numpy()
            idx = pool[row]
            rate = th.as_tensor(grid[column], dtype=th.float32)
        ids = th.as_tensor(windows[idx], dtype=th.long)
        keep = th.as_tensor(force_keep[idx], dtype=th.bool)
        real = th.as_tensor(valid[idx], dtype=th.bool)
        maskable = ~keep & real
        bits = reconstructor.surprisal(ids, real, dtype=teacher_dtype).cpu().float().numpy() if observe_surprisal else None
        obs = build_observation(ids.numpy(), real.numpy(), keep.numpy(), rate.numpy(), bits)
        obs_t = {k: th.as_tensor(v).to(device).float() for k, v in obs.items()}
        logits = policy.token_mask_logits(obs_t, exclude_invalid=False)
        if teacher == SURPRISAL_TEACHER:
            context = th.rand(ids.shape, generator=generator) < rate[:, None]
            n_on_policy = round(batch_size * on_policy_fraction) if step > 0 else 0
            if n_on_policy:
                own = (
                    cheapest_tokens(-logits.detach().cpu()[:n_on_policy], real[:n_on_policy], maskable[:n_on_policy], rate[:n_on_policy])
                    > 0
                )
                context[:n_on_policy] = own
            with th.no_grad():
                scores = reconstructor.score(ids, context, real, dtype=teacher_dtype)
            labels = cheapest_tokens(scores.surprisal.cpu(), real, maskable, rate)
        else:
            labels = th.as_tensor(expert[column, row], dtype=th.float32)
        weight = maskable.to(device).float()
        if target == "cost":
            goal = scores.surprisal.to(device).float().clamp(max=20.0) / COST_SCALE
        else:
            goal = labels.to(device)
        with th.no_grad():
            picked = cheapest_tokens(-logits.detach().cpu(), real, maskable, rate)
            agreement = float((picked * labels).sum() / labels.sum().clamp(min=1))
        for update in range(updates_per_batch):
            if update:
                logits = policy.token_mask_logits(obs_t, exclude_invalid=False)
            if target == "cost":
                per_token = F.smooth_l1_loss(-logits, goal, reduction="none")
            else:
                per_token = F.binary_cross_entropy_with_logits(logits, goal, reduction="none")
            loss = (per_token * weight).sum() / weight.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            th.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if not update:
                losses.append(float(loss.detach()))
        scheduler.step()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", agree=f"{agreement:.2f}")
        if logger is not None and step % 10 == 0:
            logger.record("distill/loss", losses[-1])
            logger.record("distill/label_agreement", agreement)
            logger.record("distill/learning_rate", optimizer.param_groups[0]["lr"])
            logger.dump(step)
        steps_done = step + 1
        if callback is not None and not callback(steps_done, optimizer):
            break
    policy.set_training_mode(False)
    return {
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": losses[-1] if losses else float("nan"),
        "label_agreement": agreement,
        "steps_done": steps_done,
    }
