"""Evaluation: metrics and intervals, the record schema, the writers, determinism, run loading and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.config import cli_main
from experiments.evaluate import file_windows, load_run, main, spread
from tokencompress_env.baselines import BASELINES, MethodContext, token_frequencies
from tokencompress_env.errors import InputError
from tokencompress_env.evaluation import (
    INTERVAL_METRICS,
    RECORD_FIELDS,
    WindowStats,
    bootstrap_intervals,
    evaluate,
    evaluate_method,
    plot_rate_distortion,
    write_results_json,
    write_results_markdown,
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
        return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in out]

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
