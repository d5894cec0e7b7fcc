"""Evaluation: metrics and intervals, the record schema, the writers, determinism, run loading and the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.config import cli_main
from experiments.evaluate import EvaluateConfig, downstream_context_tokens, file_windows, load_run, main, spread
from tests.conftest import KeyTokenLM
from tokencompress_env.baselines import BASELINES, MethodContext, token_frequencies
from tokencompress_env.data import window_continuations
from tokencompress_env.errors import ConfigError, InputError
from tokencompress_env.evaluation import (
    INTERVAL_METRICS,
    POOLED,
    RECORD_FIELDS,
    DownstreamReader,
    MethodRate,
    WindowStats,
    bootstrap_intervals,
    build_records,
    evaluate,
    evaluate_method,
    group_numbers,
    log2_binomial,
    paired_difference,
    paired_difference_between,
    plot_rate_distortion,
    read_window_stats,
    results_markdown,
    score_masks,
    write_results_json,
    write_results_markdown,
    write_window_stats,
)
from tokencompress_env.reconstructor import Reconstructor

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = next(
    (p for p in (Path("/work/shared/data/wikitext2-valid.txt"), REPO.parent / "shared/data/wikitext2-valid.txt") if p.exists()), None
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def windows(test_windows: dict[str, np.ndarray]) -> np.ndarray:
    return test_windows["test"][:8]


@pytest.fixture(scope="module")
def context(test_reconstructor: Reconstructor, test_windows: dict[str, np.ndarray]) -> MethodContext:
    counts = token_frequencies(test_windows["train"], test_reconstructor.vocab_size)
    return MethodContext(reconstructor=test_reconstructor, token_counts=counts, seed=0, batch_size=8)


@pytest.fixture(scope="module")
def records(windows: np.ndarray, context: MethodContext, test_reconstructor: Reconstructor) -> list[dict]:
    methods = {name: BASELINES[name] for name in ("random", "stride", "self_information")}
    scorers = {"reference": test_reconstructor, "joint": test_reconstructor}
    return evaluate(methods, windows, scorers, [0.25, 0.5], context, n_boot=200, seed=0)


def test_ratios_and_bootstrap() -> None:
    stats = WindowStats(
        masked_bits=np.array([4.0, 12.0]), masked=np.array([2.0, 4.0]), masked_correct=np.array([1.0, 1.0]), valid=np.array([4.0, 8.0])
    )
    point = stats.ratios()
    assert point["bits_per_masked_token"] == pytest.approx(16 / 6)
    assert point["achieved_mask_rate"] == pytest.approx(6 / 12)
    assert point["masked_token_accuracy"] == pytest.approx(2 / 6)
    assert point["token_recovery"] == pytest.approx((12 - 6 + 2) / 12)
    ci = bootstrap_intervals(stats, n_boot=500, seed=1)
    lo, hi = ci["bits_per_masked_token"]
    assert 2.0 <= lo <= 16 / 6 <= hi <= 3.0  # per-window values are 2 and 3
    assert ci == bootstrap_intervals(stats, n_boot=500, seed=1)
    assert set(ci) == set(INTERVAL_METRICS)


def test_record_schema(records: list[dict]) -> None:
    assert len(records) == 3 * 2 * 2
    for r in records:
        assert list(r)[: len(RECORD_FIELDS)] == list(RECORD_FIELDS)
        for key in INTERVAL_METRICS:
            lo, hi = r[f"{key}_ci95"]
            assert lo <= r[key] <= hi
        assert r["reconstructor"] in {"reference", "joint"}
        assert r["tokens_per_second"] > 0
    json.dumps(records)  # serialisable


def test_metrics_match_direct_scoring(
    records: list[dict], windows: np.ndarray, context: MethodContext, test_reconstructor: Reconstructor
) -> None:
    masks = BASELINES["random"](windows, 0.5, context)
    result = test_reconstructor.score(windows, masks)
    r = next(r for r in records if r["method"] == "random" and r["requested_mask_rate"] == 0.5 and r["reconstructor"] == "reference")
    assert r["achieved_mask_rate"] == pytest.approx(round(0.5 * windows.shape[1]) / windows.shape[1])
    assert r["bits_per_masked_token"] == pytest.approx(float(result.masked_bits.sum() / result.mask.sum()), rel=1e-5)
    assert r["masked_token_accuracy"] == pytest.approx(float(result.masked_correct.sum() / result.mask.sum()), rel=1e-5)
    recovered = (~result.mask | result.correct).sum() / result.valid.sum()
    assert r["token_recovery"] == pytest.approx(float(recovered), rel=1e-5)


def test_achieved_rate_is_reported_honestly(windows: np.ndarray, context: MethodContext, test_reconstructor: Reconstructor) -> None:
    def keeps_everything(ids: np.ndarray, rate: float, ctx: MethodContext, valid=None, force_keep=None) -> np.ndarray:
        return np.zeros(ids.shape, dtype=bool)

    (r,) = evaluate_method("collapsed", keeps_everything, windows, {"reference": test_reconstructor}, [0.6], context, n_boot=50)
    assert r["achieved_mask_rate"] == 0.0 and r["bits_per_masked_token"] is None and r["token_recovery"] == 1.0


def test_deterministic(windows: np.ndarray, context: MethodContext, test_reconstructor: Reconstructor) -> None:
    def run() -> list[dict]:
        out = evaluate({"random": BASELINES["random"]}, windows, {"reference": test_reconstructor}, [0.4], context, n_boot=100, seed=3)
        return [{k: v for k, v in r.items() if k not in {"tokens_per_second", "mask_seconds"}} for r in out]  # timings vary

    assert run() == run()


def test_writers(records: list[dict], tmp_path: Path) -> None:
    path = write_results_json(records, tmp_path / "results.json")
    assert json.loads(path.read_text()) == records
    md = write_results_markdown(records, tmp_path / "results.md", preamble="data: x").read_text()
    assert md.count("| random |") == 4 and "## Reconstructor: reference" in md and "## Reconstructor: joint" in md
    png = plot_rate_distortion(records, tmp_path / "rate_distortion.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000


def test_spread_is_even() -> None:
    w = np.arange(100)[:, None]
    assert spread(w, 5)[:, 0].tolist() == [0, 25, 50, 74, 99]
    assert len(spread(w, None)) == 100


@pytest.mark.skipif(WIKITEXT is None, reason="shared WikiText-2 file not present")
def test_file_windows_on_wikitext(test_reconstructor: Reconstructor) -> None:
    w = file_windows(str(WIKITEXT), test_reconstructor, 64)
    assert w.ndim == 2 and w.shape[1] == 64 and len(w) > 500


def test_cli_baselines_only_subprocess(tmp_path: Path, test_reconstructor_dir: Path, test_windows: dict, tc_home: Path) -> None:
    from pydoc_data.topics import topics

    text_file = tmp_path / "tiny.txt"
    text_file.write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]))
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "experiments.evaluate", "--reconstructor", str(test_reconstructor_dir), "--data", str(text_file)]
    cmd += ["--methods", "random", "frequency", "stride", "--mask-rates", "0.3", "0.6", "--max_windows", "4", "--seq_len", "64"]
    cmd += ["--bootstrap", "50", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "TOKENCOMPRESS_HOME": str(tc_home)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["requested_mask_rate"]) for r in records} == {
        (m, r) for m in ("random", "frequency", "stride") for r in (0.3, 0.6)
    }
    assert all(r["reconstructor"] == "reference" and r["windows"] == 4 for r in records)
    assert (out / "rate_distortion.png").read_bytes()[:8] == PNG_MAGIC
    assert "| stride |" in (out / "results.md").read_text()


def test_cli_user_errors(capsys: pytest.CaptureFixture[str], test_reconstructor_dir: Path) -> None:
    run = cli_main(main)
    assert run(["--reconstructor", str(test_reconstructor_dir), "--methods", "randm"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert run(["--reconstructor", str(test_reconstructor_dir), "--methods", "policy"]) == 2
    assert "needs a trained run" in capsys.readouterr().err
    assert run(["--run", "/nonexistent/run", "--methods", "random"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run(["--reconstructor", str(test_reconstructor_dir), "--methods", "stride", "--max_windows", "2", "--seq_len", "64",
                "--downstream_lm", "/nonexistent/lm", "--device", "cpu"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == "error: reconstructor directory '/nonexistent/lm' does not exist" and "Traceback" not in err
    old_name = EvaluateConfig(methods=["greedy_oracle"], reconstructor="tiny")
    with pytest.warns(DeprecationWarning, match="greedy_threshold"):
        old_name.validate()
    assert old_name.method_names() == ["greedy_threshold"]


def test_load_run_is_defensive(tmp_path: Path, test_reconstructor_dir: Path, tc_home: Path, test_windows: dict) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(InputError, match="reference_reconstructor"):
        load_run(run_dir, device="cpu")
    shutil.copytree(test_reconstructor_dir, run_dir / "reference_reconstructor")
    (run_dir / "config.json").write_text(json.dumps({"corpus": "embedded", "seq_len": 64, "algo": "ppo"}))
    bundle = load_run(run_dir, device="cpu")
    assert bundle.joint is None and bundle.agent is None
    assert any("policy.safetensors" in p for p in bundle.problems) and any("reconstructor/" in p for p in bundle.problems)
    # the policy cannot be evaluated without an agent: a one-line error; baselines still run on the run's test split
    assert cli_main(main)(["--run", str(run_dir), "--device", "cpu", "--out", str(tmp_path / "e")]) == 2
    argv = ["--run", str(run_dir), "--methods", "stride", "--mask_rates", "0.5", "--max_windows", "3", "--bootstrap", "20"]
    records = main([*argv, "--device", "cpu", "--out", str(tmp_path / "e")])
    assert [r["reconstructor"] for r in records] == ["reference"] and records[0]["windows"] == 3


# ---------------------------------------------------------------------------- issue 10: protocol
def _stats(bits: np.ndarray, masked: np.ndarray, valid: float = 10.0) -> WindowStats:
    n = len(bits)
    return WindowStats(np.asarray(bits, float), np.asarray(masked, float), np.zeros(n), np.full(n, valid))


def test_document_bootstrap_is_wider_when_windows_of_a_document_are_alike() -> None:
    rng = np.random.default_rng(0)
    per_doc = rng.normal(5.0, 1.0, size=8) * 4  # 8 documents, bits of 4 dropped tokens
    bits = np.repeat(per_doc, 16)  # 16 identical windows per document
    stats = _stats(bits, np.full(len(bits), 4.0))
    doc_ids = np.repeat([f"doc{i}" for i in range(8)], 16)
    groups = group_numbers(doc_ids, len(bits))
    by_window = bootstrap_intervals(stats, n_boot=2000, seed=0)["bits_per_masked_token"]
    by_document = bootstrap_intervals(stats, n_boot=2000, seed=0, groups=groups)["bits_per_masked_token"]
    point = float(stats.ratios()["bits_per_masked_token"])
    assert by_document[0] <= point <= by_document[1] and by_window[0] <= point <= by_window[1]
    # 128 windows but only 8 independent documents: the honest interval is about sqrt(16) = 4 times wider
    assert (by_document[1] - by_document[0]) > 2.5 * (by_window[1] - by_window[0])


def test_paired_difference_is_a_ratio_of_sums_and_paired() -> None:
    rng = np.random.default_rng(1)
    doc_effect = np.repeat(rng.normal(0, 3, size=10), 4)  # documents differ a lot, the methods by a constant
    masked = np.full(40, 5.0)
    policy = _stats(5 * (6.0 + doc_effect), masked)
    other = _stats(5 * (6.5 + doc_effect), masked)
    groups = group_numbers(np.repeat(np.arange(10), 4), 40)
    diff, lo, hi = paired_difference(policy, other, n_boot=500, seed=0, groups=groups)
    assert diff == pytest.approx(-0.5)
    assert lo == pytest.approx(-0.5) and hi == pytest.approx(-0.5)  # pairing cancels the document effect exactly
    unpaired = bootstrap_intervals(policy, n_boot=500, seed=0, groups=groups)["bits_per_masked_token"]
    assert unpaired[1] - unpaired[0] > 1.0  # each method alone has a wide interval


def test_position_bits_match_a_hand_computed_value(windows: np.ndarray, context: MethodContext, test_reconstructor: Reconstructor) -> None:
    assert float(log2_binomial(10, 4)) == pytest.approx(math.log2(210))
    masks = BASELINES["random"](windows, 0.25, context)  # 16 of 64 tokens per window
    stats = score_masks(test_reconstructor, windows, masks)
    expected = math.log2(math.comb(64, 16))
    point = stats.ratios()
    assert point["position_bits_per_window"] == pytest.approx(expected)
    assert point["position_bits_per_masked_token"] == pytest.approx(expected / 16)
    assert point["bits_per_masked_token_with_positions"] == pytest.approx(point["bits_per_masked_token"] + expected / 16)
    (r,) = evaluate_method("random", BASELINES["random"], windows, {"reference": test_reconstructor}, [0.25], context, n_boot=20)
    assert r["position_bits_per_window"] == pytest.approx(expected)
    assert r["bits_per_masked_token_with_positions"] == pytest.approx(r["bits_per_masked_token"] + expected / 16, rel=1e-6)


def test_window_continuations_stay_in_their_document() -> None:
    windows = np.arange(5 * 4).reshape(5, 4)
    docs = np.array(["a", "a", "a", "b", "b"], dtype=object)
    cont, ok = window_continuations(windows, docs, 3)
    assert ok.tolist() == [True, True, False, True, False]
    assert cont[0].tolist() == [4, 5, 6] and cont[3].tolist() == [16, 17, 18]
    cont, ok = window_continuations(windows, docs, 6)  # longer than a window: two following windows needed
    assert ok.tolist() == [True, False, False, False, False] and cont[0].tolist() == [4, 5, 6, 7, 8, 9]


def test_deleting_the_key_token_raises_the_continuation_bits(test_reconstructor: Reconstructor) -> None:
    tok = test_reconstructor.tokenizer
    key, answer = 100, 200
    lm = Reconstructor(KeyTokenLM(len(tok), key, answer), tok, device="cpu")  # type: ignore[arg-type]
    windows = np.tile(np.arange(300, 316), (3, 1))
    windows[:, 5] = key
    continuations = np.full((3, 6), answer)
    reader = DownstreamReader(lm, tok, continuations, np.array([True, True, False]), batch_size=2)
    masks = np.zeros(windows.shape, dtype=bool)
    masks[0, [4, 5, 6]] = True  # window 0 loses the key token
    masks[1, [9, 10, 11]] = True  # window 1 loses other tokens
    masks[2, 5] = True  # window 2 has no continuation: skipped
    out = reader.read(windows, masks, np.arange(3))
    assert out["continuation_tokens"].tolist() == [6, 6, 0]
    assert out["continuation_full"][0] < 1.0 and out["continuation_none"][0] > 6 * 5  # ~log2(vocab) bits per token
    assert out["continuation_deleted"][0] == pytest.approx(out["continuation_none"][0], rel=1e-4)  # key deleted: no help
    assert out["continuation_deleted"][1] == pytest.approx(out["continuation_full"][1], rel=1e-4)  # key kept
    assert out["continuation_placeholder"][0] == pytest.approx(out["continuation_none"][0], rel=1e-4)
    one = WindowStats(np.zeros(1), np.ones(1), np.zeros(1), np.full(1, 16.0), **{k: v[:1] for k, v in out.items()})
    two = WindowStats(np.zeros(1), np.ones(1), np.zeros(1), np.full(1, 16.0), **{k: v[1:2] for k, v in out.items()})
    assert one.ratios()["context_kept"] == pytest.approx(0.0, abs=1e-4)
    assert two.ratios()["context_kept"] == pytest.approx(1.0, abs=1e-4)
    # the placeholder context: one mask token per run of dropped tokens
    ctx = reader._context(np.arange(1, 8), np.array([True, True, False, True, False, False, True]), "placeholder")
    m = lm.mask_token_id
    assert ctx.tolist() == [m, 3, m, 5, 6, m]


def test_the_downstream_context_is_cut_to_its_most_recent_tokens(test_reconstructor: Reconstructor) -> None:
    """A key token 10 tokens before the window's end helps only a reader that reads at least 10 tokens."""
    tok = test_reconstructor.tokenizer
    key, answer = 100, 200
    lm = Reconstructor(KeyTokenLM(len(tok), key, answer), tok, device="cpu")  # type: ignore[arg-type]
    windows = np.arange(300, 316)[None, :].copy()
    windows[0, 6] = key  # 10 tokens from the end
    continuations = np.full((1, 6), answer)
    masks = np.zeros(windows.shape, dtype=bool)
    masks[0, 14] = True  # one token after the key dropped: the deleted context is 9 tokens past the key
    far = DownstreamReader(lm, tok, continuations, np.array([True]), max_context=10).read(windows, masks, np.arange(1))
    near = DownstreamReader(lm, tok, continuations, np.array([True]), max_context=9).read(windows, masks, np.arange(1))
    assert far["continuation_full"][0] < 1.0 and near["continuation_full"][0] > 6 * 5  # the key cut off at 9
    assert far["continuation_deleted"][0] < 1.0 and near["continuation_deleted"][0] < 1.0  # kept tokens: key within 9
    assert near["continuation_none"][0] == pytest.approx(far["continuation_none"][0])
    with pytest.raises(ValueError, match="exceeds the downstream LM's context"):
        DownstreamReader(lm, tok, np.full((1, 600), answer), np.array([True]))


def test_downstream_context_fits_the_lm_s_training_window(test_reconstructor: Reconstructor) -> None:
    """Context + continuation stay within the build's window; an explicit cap wins; too long fails clearly."""
    lm = test_reconstructor
    assert downstream_context_tokens(lm, {"build_config": {"seq_len": 128}}, 32, None) == 96
    assert downstream_context_tokens(lm, {}, 32, None) == lm.max_seq_len - 32
    assert downstream_context_tokens(lm, {"build_config": {"seq_len": 128}}, 32, 40) == 40
    with pytest.raises(ConfigError, match="--continuation_tokens"):
        downstream_context_tokens(lm, {"build_config": {"seq_len": 16}}, 32, None)


def _method_rate(method: str, bits: np.ndarray, masked: np.ndarray, rate: float = 0.5) -> MethodRate:
    stats = {"reference": _stats(bits, masked)}
    return MethodRate(method, rate, 1.0, np.arange(len(bits)), stats, int(10 * len(bits)))


def test_several_runs_give_per_seed_and_pooled_figures() -> None:
    masked = np.full(6, 5.0)
    base = np.array([20.0, 25.0, 30.0, 22.0, 28.0, 26.0])
    runs = [
        [_method_rate("policy", base - 2.0 * s, masked), _method_rate("random", base + 5.0, masked)]  # seeds 0, 1, 2
        for s in range(3)
    ]
    docs = ["a", "a", "b", "b", "c", "c"]
    records = build_records(runs, docs, n_boot=200, seed=0, run_names=["r0", "r1", "r2"], run_seeds=[0, 1, 2])
    assert len(records) == 2 * 4 and {r["run"] for r in records} == {"r0", "r1", "r2", POOLED}
    per_seed = [r["bits_per_masked_token"] for r in records if r["method"] == "policy" and r["run"] != POOLED]
    assert per_seed == pytest.approx([151 / 30, 139 / 30, 127 / 30])
    pooled = next(r for r in records if r["method"] == "policy" and r["run"] == POOLED)
    assert pooled["bits_per_masked_token_per_seed"] == pytest.approx(per_seed)
    assert pooled["bits_per_masked_token_seed_mean"] == pytest.approx(np.mean(per_seed))
    assert pooled["bits_per_masked_token_seed_std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert pooled["bits_per_masked_token"] == pytest.approx(np.mean(per_seed))  # equal drops: pooled = mean of seeds
    rand = next(r for r in records if r["method"] == "random" and r["run"] == POOLED)
    diffs = rand["policy_minus_method_bits_per_masked_token_per_seed"]
    assert diffs == pytest.approx([-1.0, -1.4, -1.8])
    assert rand["policy_minus_method_bits_per_masked_token"] == pytest.approx(-1.4)
    lo, hi = rand["policy_minus_method_bits_per_masked_token_ci95"]
    assert lo <= -1.4 <= hi < 0 and rand["policy_minus_method_excludes_zero"] is True
    assert rand["documents"] == 3 and rand["bootstrap_unit"] == "document" and rand["seeds"] == [0, 1, 2]
    md = results_markdown(records)
    assert md.splitlines()[2].startswith("Verdict") and "- **rate 0.50**: best baseline `random`" in md
    assert "policy − random = -1.400" in md and "interval excludes 0: the policy is better" in md
    assert "Per seed" in md


def test_two_evaluations_are_compared_paired_by_window(tmp_path: Path) -> None:
    masked = np.full(8, 5.0)
    docs = ["a", "a", "b", "b", "c", "c", "d", "d"]
    doc_effect = np.repeat([0.0, 30.0, -20.0, 10.0], 2)  # documents differ a lot, the two evaluations by a constant
    variant_a = [[_method_rate("policy", 30.0 + doc_effect + s, masked)] for s in (0.0, 2.0)]  # two seeds each
    variant_b = [[_method_rate("policy", 35.0 + doc_effect + s, masked)] for s in (0.0, 2.0)]
    path_a = write_window_stats(variant_a, docs, tmp_path / "a" / "window_stats.npz")
    path_b = write_window_stats(variant_b, docs, tmp_path / "b" / "window_stats.npz")
    index, stats = read_window_stats(path_a, "policy", 0.5)
    assert index.tolist() == list(range(8))
    assert stats.masked_bits == pytest.approx(31.0 + doc_effect)  # the mean over the two seeds
    pooled_a = next(r for r in build_records(variant_a, docs, n_boot=50) if r["run"] == POOLED)["bits_per_masked_token"]
    pooled_b = next(r for r in build_records(variant_b, docs, n_boot=50) if r["run"] == POOLED)["bits_per_masked_token"]
    diff, lo, hi = paired_difference_between(path_a, path_b, 0.5, n_boot=200)
    assert diff == pytest.approx(pooled_a - pooled_b) and diff == pytest.approx(-1.0)
    assert lo == pytest.approx(-1.0) and hi == pytest.approx(-1.0)  # pairing cancels the document effect
    rate_diff, _, _ = paired_difference_between(path_a, path_b, 0.5, n_boot=10, metric="achieved_mask_rate")
    assert rate_diff == pytest.approx(0.0)  # another metric of the same sums: both dropped as many tokens
    with pytest.raises(InputError, match="no per-window figures"):
        read_window_stats(path_a, "random", 0.5)
    other_docs = write_window_stats(variant_b, ["a", "a", "b", "b", "c", "c", "d", "e"], tmp_path / "c.npz")
    with pytest.raises(InputError, match="same windows"):
        paired_difference_between(path_a, other_docs, 0.5)


def test_search_bound_row_and_policy_ratio(
    windows: np.ndarray, context: MethodContext, test_reconstructor: Reconstructor, tmp_path: Path
) -> None:
    ids = windows[:4, :24]
    methods = {"policy": BASELINES["self_information"], "random": BASELINES["random"], "search": None}
    records = evaluate(methods, ids, {"reference": test_reconstructor}, [0.25, 0.5], context, n_boot=50, search_index=np.array([0, 2]))
    search = {r["requested_mask_rate"]: r for r in records if r["method"] == "search"}
    policy = {r["requested_mask_rate"]: r for r in records if r["method"] == "policy"}
    for rate, r in search.items():
        assert r["windows"] == 2 and policy[rate]["windows"] == 4
        assert r["policy_bits_per_masked_token_same_windows"] >= r["bits_per_masked_token"] - 1e-6  # the bound is lower
        assert r["policy_to_search_ratio"] == pytest.approx(r["policy_bits_per_masked_token_same_windows"] / r["bits_per_masked_token"])
        assert r["mask_seconds"] == search[0.25]["mask_seconds"]  # nested: one search for both rates
        random_there = test_reconstructor.score(ids[[0, 2]], BASELINES["random"](ids, rate, context)[[0, 2]])
        random_bits = float(random_there.masked_bits.sum() / random_there.mask.sum())
        assert r["best_baseline_same_windows"] == "random"
        assert r["best_baseline_bits_per_masked_token_same_windows"] == pytest.approx(random_bits, rel=1e-5)
    png = plot_rate_distortion(records, tmp_path / "p.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "search (bound)" in results_markdown(records) and "Search bound on 2 windows" in results_markdown(records)


def test_the_downstream_reading_of_a_subset_uses_each_windows_own_continuation(test_reconstructor: Reconstructor) -> None:
    """The search reads a subset of the windows: window ``index[i]``'s continuation, not the ``i``-th one."""
    tok = test_reconstructor.tokenizer
    key, answer = 100, 200
    lm = Reconstructor(KeyTokenLM(len(tok), key, answer), tok, device="cpu")  # type: ignore[arg-type]
    windows = np.tile(np.arange(300, 316), (3, 1))
    windows[:, 5] = key
    continuations = np.stack([np.full(6, 301), np.full(6, 302), np.full(6, answer)])  # only window 2's is the answer
    reader = DownstreamReader(lm, tok, continuations, np.array([True, True, True]), batch_size=2)
    masks = np.zeros(windows.shape, dtype=bool)
    whole = reader.read(windows, masks, np.arange(3))
    subset = reader.read(windows[[2]], masks[[2]], np.array([2]))
    assert whole["continuation_full"][2] < 1.0  # the key token predicts window 2's continuation
    for name in ("continuation_full", "continuation_none", "continuation_tokens"):
        assert subset[name][0] == pytest.approx(whole[name][2], rel=1e-6), name


def test_sampled_policy_masks_meet_the_rate_on_average_and_follow_sharp_logits(
    windows: np.ndarray, context: MethodContext, test_reconstructor: Reconstructor
) -> None:
    from experiments.evaluate import sampled_policy_method
    from tokencompress_env.baselines import POLICY, POLICY_SAMPLED, policy_method

    rng = np.random.default_rng(0)
    ids = rng.integers(5, 400, size=(64, 32))
    valid = np.ones(ids.shape, dtype=bool)
    valid[:8, 24:] = False  # padded windows count their real tokens only
    force_keep = np.zeros(ids.shape, dtype=bool)
    force_keep[:, 0] = True

    def flat(input_ids: np.ndarray, real: np.ndarray, rate: float) -> np.ndarray:
        out = np.zeros(input_ids.shape)
        out[:, 1] = -np.inf  # a token the policy itself never drops
        return out

    masks = sampled_policy_method(flat, seed=0)(ids, 0.25, context, valid, force_keep)
    assert not masks[:, :2].any() and not masks[~valid].any()
    counts = masks.sum(axis=1)
    assert abs(counts.sum() / valid.sum() - 0.25) < 0.03  # on average...
    assert len(set(counts[8:].tolist())) > 1  # ...not per window
    again = sampled_policy_method(flat, seed=0)(ids, 0.25, context, valid, force_keep)
    other_seed = sampled_policy_method(flat, seed=1)(ids, 0.25, context, valid, force_keep)
    assert np.array_equal(masks, again) and not np.array_equal(masks, other_seed)

    def sharp(input_ids: np.ndarray, real: np.ndarray, rate: float) -> np.ndarray:
        return np.where(input_ids % 2 == 0, 200.0, -200.0) + input_ids * 1e-3  # even ids first, far apart

    half_even = ids[:, :24] // 2 * 2  # even ids...
    half_even[:, 12:] += 1  # ...then odd ones: 12 of each per window, so a rate of 0.5 drops exactly the even ones
    ranked = policy_method(sharp)(half_even, 0.5, context)
    sampled = sampled_policy_method(sharp, seed=0)(half_even, 0.5, context)
    assert np.array_equal(sampled, ranked) and np.array_equal(ranked, half_even % 2 == 0)
    # in the evaluation: a row of its own, paired with the policy, its achieved rate reported as it is
    methods = {POLICY: policy_method(flat), POLICY_SAMPLED: sampled_policy_method(flat, seed=0)}
    records = evaluate(methods, windows, {"reference": test_reconstructor}, [0.5], context, n_boot=50, seed=0)
    [row] = [r for r in records if r["method"] == POLICY_SAMPLED]
    assert row["policy_minus_method_bits_per_masked_token"] is not None and abs(row["achieved_mask_rate"] - 0.5) < 0.1


def test_sampled_policy_needs_a_run_and_single_tokens() -> None:
    with pytest.raises(ConfigError, match="needs a trained run"):
        EvaluateConfig(methods=["policy_sampled"], reconstructor="tiny").validate()
    with pytest.raises(ConfigError, match="samples single tokens"):
        EvaluateConfig(methods=["policy", "policy_sampled"], run=["runs/x"], units="word").validate()
    assert "policy_sampled" not in EvaluateConfig(run=["runs/x"]).method_names()  # only when named
