"""experiments.benchmark_env: a tiny run writes every figure, and its ratios are the ratios of its figures.

Speed targets are read off the benchmark's JSON on a quiet machine, never asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import benchmark_env
from tests.conftest import TEST_SEQ_LEN


@pytest.mark.parametrize("scoring_dtype", ["float32", "bfloat16"])
def test_benchmark_env_reports_every_figure(test_reconstructor_dir: Path, tmp_path: Path, scoring_dtype: str) -> None:
    out = tmp_path / "bench.json"
    args = ["--reconstructor", str(test_reconstructor_dir), "--seq-len", str(TEST_SEQ_LEN), "--num-envs", "2"]
    result = benchmark_env.main([*args, "--episodes", "1", "--repeats", "1", "--scoring-dtype", scoring_dtype, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rates = result["token_decisions_per_s"]
    expected = {"vector_env", "vector_env_gymnasium", "dummy_vec_env", "reconstructor", "reconstructor_full_window", "reconstructor_score"}
    if scoring_dtype != "float32":
        expected.add("dummy_vec_env_float32")
    assert set(rates) == expected
    assert all(value > 0 for value in rates.values())
    best_dummy = max(rates["dummy_vec_env"], rates.get("dummy_vec_env_float32", 0.0))
    assert result["ratio_vector_over_dummy"] == pytest.approx(rates["vector_env"] / best_dummy)
    assert result["ratio_vector_over_dummy_same_dtype"] == pytest.approx(rates["vector_env"] / rates["dummy_vec_env"])
    assert result["ratio_vector_over_reconstructor"] == pytest.approx(rates["vector_env"] / rates["reconstructor"])
    assert result["targets_met"]["vector_over_dummy"] == (result["ratio_vector_over_dummy"] >= 5.0)
    assert result["config"]["scoring_dtype"] == scoring_dtype and result["config"]["seq_len"] == TEST_SEQ_LEN
    precision = result["scoring_precision"]
    assert precision["dtype"] == scoring_dtype
    if scoring_dtype == "float32":
        assert set(precision) == {"dtype"}
    else:
        assert precision["dropped_tokens"] > 0
        assert 0.0 < precision["mean_abs_bits_vs_float32"] <= precision["max_abs_bits_vs_float32"] < 1.0
