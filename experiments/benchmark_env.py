"""Throughput of TokenMask-v0: token decisions per second, batched vs. single envs vs. the bare reconstructor.

Measures, on the same windows and the same shared reconstructor:

* (a) ``vector_env``: :class:`TokenMaskVectorEnv` with N envs behind the SB3 adapter (what PPO steps),
  plus the bare Gymnasium vector env (``vector_env_gymnasium``);
* (b) ``dummy_vec_env``: N single :class:`TokenMaskEnv` in SB3's ``DummyVecEnv``; when the envs score
  in another precision than float32, also ``dummy_vec_env_float32``, since a batch of one may run faster
  in float32. ``ratio_vector_over_dummy`` divides (a) by the faster of the two, so batching is never
  credited with what a precision choice did; ``ratio_vector_over_dummy_same_dtype`` is (a) over
  ``dummy_vec_env``;
* (c) ``reconstructor``: the bare reconstructor forward (the model's logits, nothing else) over the
  same number of ``[N, seq_len]`` compressed windows with random masks, in the precision the envs score
  in, run as the env must run it: ``seq_len / chunk_size`` forwards of ``[N, chunk_size]`` tokens on the
  KV cache of the chunks before, since each step's reward needs that step's chunk scored. This is the
  model the env cannot avoid. Reported beside it: ``reconstructor_full_window`` (one forward per window,
  what scoring a finished window would cost) and ``reconstructor_score`` (:meth:`Reconstructor.score`:
  the full-window forward plus surprisal and guesses at every position).

All three use the same ``--scoring-dtype`` (default ``auto``: bfloat16 where the hardware multiplies it
natively, float32 elsewhere). When that is not float32, ``scoring_precision`` reports how far the
surprisal of the dropped tokens moves from float32 (mean and max over the benchmark's windows), so the
speed is never shown without its accuracy cost. Each configuration is timed ``--repeats`` times,
interleaved (the CPU may be shared), and the best run is kept.

Usage: ``python -m experiments.benchmark_env --out FILE.json [--reconstructor tiny] [--num-envs 16] [--scoring-dtype float32]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

from tokencompress_env.env import TokenMaskEnv, corpus_windows, load_reconstructor
from tokencompress_env.reconstructor import CACHE_ARG, SCORING_DTYPES, Reconstructor, cpu_has_native_bf16, resolve_scoring_dtype
from tokencompress_env.sb3_vec_env import TokenMaskSB3VecEnv
from tokencompress_env.vector_env import TokenMaskVectorEnv


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    parser.add_argument("--reconstructor", default="tiny", help="preset name or directory")
    parser.add_argument("--corpus", default="embedded")
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--episodes", type=int, default=6, help="episodes per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (best kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scoring-dtype", default="auto", choices=SCORING_DTYPES, help="precision of every reconstructor forward")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    recon: Reconstructor = load_reconstructor(args.reconstructor, args.device)
    windows = corpus_windows(args.corpus, "train", args.seq_len, recon)
    rng = np.random.default_rng(args.seed)
    windows = windows[rng.choice(len(windows), size=min(len(windows), 512), replace=False)]
    n, k, length = args.num_envs, args.chunk_size, args.seq_len
    steps = args.episodes * (length // k)
    actions = rng.integers(0, 2, (steps, n, k)).astype(np.int8)
    dtype = resolve_scoring_dtype(args.scoring_dtype, recon.device)
    common: dict[str, Any] = {
        "reconstructor": recon,
        "windows": windows,
        "seq_len": length,
        "chunk_size": k,
        "scoring_dtype": args.scoring_dtype,
    }

    vec = TokenMaskVectorEnv(num_envs=n, **common)
    sb3_vec = TokenMaskSB3VecEnv(TokenMaskVectorEnv(num_envs=n, **common))
    dummies = {"dummy_vec_env": DummyVecEnv([lambda: TokenMaskEnv(**common) for _ in range(n)])}
    if dtype != torch.float32:  # single envs may be faster in float32: (b) is also timed at its own best precision
        dummies["dummy_vec_env_float32"] = DummyVecEnv([lambda: TokenMaskEnv(**{**common, "scoring_dtype": "float32"}) for _ in range(n)])
    vec.reset(seed=args.seed)
    sb3_vec.seed(args.seed)
    sb3_vec.reset()
    for dummy in dummies.values():
        dummy.seed(args.seed)
        dummy.reset()
    # (c) scores as many tokens as the env decides: one [n, seq_len] batch per episode.
    batches = [windows[rng.choice(len(windows), n)] for _ in range(args.episodes)]
    masks = [rng.random((n, length)) < 0.5 for _ in batches]
    model = recon.inference_model(dtype)
    inputs = [recon.compressed_inputs(torch.as_tensor(b), torch.as_tensor(m)).to(recon.device) for b, m in zip(batches, masks, strict=True)]

    ones = torch.ones((n, length), dtype=torch.long, device=recon.device)

    def bare() -> None:
        for x in inputs:
            cache = None
            for start in range(0, length, k):
                out = model(input_ids=x[:, start : start + k], attention_mask=ones[:, : start + k], use_cache=True, **{CACHE_ARG: cache})
                cache = getattr(out, CACHE_ARG)

    def bare_full() -> None:
        for x in inputs:
            model(input_ids=x, attention_mask=ones, use_cache=False)

    def scored() -> None:
        for b, m in zip(batches, masks, strict=True):
            recon.score(b, m, dtype=dtype)

    def stepping(env: Any) -> Callable[[], None]:
        def run() -> None:
            for a in actions:
                env.step(a)

        return run

    timed: dict[str, Callable[[], None]] = {
        "vector_env": stepping(sb3_vec),
        "vector_env_gymnasium": stepping(vec),
        **{name: stepping(dummy) for name, dummy in dummies.items()},
        "reconstructor": bare,
        "reconstructor_full_window": bare_full,
        "reconstructor_score": scored,
    }
    runs: dict[str, list[float]] = {name: [] for name in timed}
    decisions = steps * n * k
    with torch.inference_mode():
        warm_up = [stepping(env) for env in (vec, *dummies.values())]  # (and the bfloat16 copy is made)
        for fn in (*warm_up, bare, bare_full, scored):
            fn()
        for _ in range(args.repeats):
            for name, fn in timed.items():
                started = time.perf_counter()
                fn()
                runs[name].append(decisions / (time.perf_counter() - started))
        precision: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch.")}
        if dtype != torch.float32:
            gaps = []
            for b, m in zip(batches, masks, strict=True):
                low, full = recon.score(b, m, dtype=dtype), recon.score(b, m)
                gaps.append((low.surprisal - full.surprisal)[full.mask].abs())
            gap = torch.cat(gaps)
            precision.update(
                {
                    "dropped_tokens": int(gap.numel()),
                    "mean_abs_bits_vs_float32": gap.mean().item(),
                    "max_abs_bits_vs_float32": gap.max().item(),
                }
            )

    best = {key: max(values) for key, values in runs.items()}
    best_dummy = max(value for key, value in best.items() if key.startswith("dummy_vec_env"))
    result: dict[str, Any] = {
        "unit": "token decisions per second (reconstructor*: tokens through the model per second)",
        "token_decisions_per_s": best,
        "runs": runs,
        "ratio_vector_over_dummy": best["vector_env"] / best_dummy,
        "ratio_vector_over_dummy_same_dtype": best["vector_env"] / best["dummy_vec_env"],
        "ratio_vector_over_reconstructor": best["vector_env"] / best["reconstructor"],
        "ratio_vector_over_reconstructor_full_window": best["vector_env"] / best["reconstructor_full_window"],
        "targets": {"vector_over_dummy": 5.0, "vector_over_reconstructor": 0.75},
        "scoring_precision": precision,
        "config": {
            "reconstructor": args.reconstructor,
            "reconstructor_parameters": recon.num_parameters(),
            "num_envs": n,
            "seq_len": length,
            "chunk_size": k,
            "steps_per_run": steps,
            "repeats": args.repeats,
            "device": str(recon.device),
            "scoring_dtype": args.scoring_dtype,
            "cpu_has_native_bf16": cpu_has_native_bf16(),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "torch": torch.__version__,
        },
    }
    result["targets_met"] = {
        "vector_over_dummy": result["ratio_vector_over_dummy"] >= 5.0,
        "vector_over_reconstructor": result["ratio_vector_over_reconstructor"] >= 0.75,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
