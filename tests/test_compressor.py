"""The compression API (Compressor) and the compress / benchmark_compress command lines, on a tiny trained run."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experiments.compress import main as compress_main
from experiments.train_ppo import TrainConfig, train
from tokencompress_env import CompressionResult, Compressor
from tokencompress_env.baselines import logits_to_mask, mask_budget, policy_method, segment_budgets
from tokencompress_env.compressor import agent_logit_fn, agent_sequential_method, window_bounds, window_mask_logits
from tokencompress_env.errors import CheckpointError, InputError

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "experiments" / "configs" / "dev" / "debug.json"

SHORT = "The quick brown fox jumps over the lazy dog while the cat sleeps."
PARAGRAPH = (
    "Return a new list containing all items from the iterable in ascending order. A custom key function can be "
    "supplied to customize the sort order, and the reverse flag can be set to request the result in descending order. "
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread: the machine's cores are shared, and oversubscription makes torch much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(runs_dir: Path, **overrides: object) -> Path:
    base = {k: v for k, v in json.loads(DEBUG.read_text()).items() if not k.startswith("_")}
    config = TrainConfig(**{**base, "runs_dir": str(runs_dir), "total_timesteps": 64, "tensorboard": False, "device": "cpu", **overrides})
    return Path(train(config)["run_dir"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, test_reconstructor_dir: Path) -> Path:
    """A tiny trained run (debug.json, 64 steps: seq_len 64), built once for the module."""
    return _train(tmp_path_factory.mktemp("compress_runs"))


@pytest.fixture(scope="module")
def compressor(run_dir: Path) -> Compressor:
    return Compressor.load(run_dir, device="cpu")


def _compress_one(compressor: Compressor, text: str, **kwargs: object) -> CompressionResult:
    result = compressor.compress(text, **kwargs)  # type: ignore[arg-type]
    assert isinstance(result, CompressionResult)
    return result


def _check_consistent(compressor: Compressor, r: CompressionResult) -> None:
    assert r.kept_mask.dtype == bool and r.kept_mask.shape == (r.origin_tokens,)
    assert np.array_equal(r.ids, r.origin_ids[r.kept_mask])
    assert r.compressed_tokens == int(r.kept_mask.sum()) == len(r.ids)
    assert np.array_equal(r.dropped_mask, ~r.kept_mask)  # the project's usual mask: True where dropped
    assert r.achieved_mask_rate == pytest.approx(1 - r.compressed_tokens / r.origin_tokens)
    assert r.text == compressor.tokenizer.decode(r.ids.tolist())


# ---------------------------------------------------------------------------- API
def test_single_window_rate_is_exact_and_uses_the_shared_ranking(compressor: Compressor) -> None:
    ids = compressor.tokenizer(SHORT, add_special_tokens=False)["input_ids"]
    n = len(ids)
    assert n <= compressor.seq_len
    for rate in (0.0, 0.2, 0.4, 0.55, 0.9):
        r = _compress_one(compressor, SHORT, mask_rate=rate)
        _check_consistent(compressor, r)
        assert r.windows == 1 and r.origin_tokens == n and list(r.origin_ids) == ids
        assert r.origin_tokens - r.compressed_tokens == int(np.floor(rate * n + 0.5))
        assert r.requested_mask_rate == rate
        # The same mask the evaluation's helper gives from the policy's logits.
        win = np.full((1, compressor.seq_len), compressor.reconstructor.pad_token_id, dtype=np.int64)
        win[0, :n] = ids
        valid = np.arange(compressor.seq_len)[None] < n
        logits = window_mask_logits(compressor.agent, win, valid, np.zeros_like(valid), rate)
        assert np.array_equal(r.dropped_mask, logits_to_mask(logits, rate, valid)[0, :n])


def test_long_text_is_compressed_window_by_window(compressor: Compressor) -> None:
    text = PARAGRAPH * 6
    r = _compress_one(compressor, text, mask_rate=0.5)
    _check_consistent(compressor, r)
    n = r.origin_tokens
    assert n > 3 * compressor.seq_len
    bounds = window_bounds(n, compressor.seq_len)
    assert r.windows == len(bounds) - 1 == -(-n // compressor.seq_len)
    assert np.diff(bounds).max() <= compressor.seq_len
    for a, b in itertools.pairwise(bounds):
        assert int((~r.kept_mask[a:b]).sum()) == int(np.floor(0.5 * (b - a) + 0.5))
    assert r.achieved_mask_rate == pytest.approx(0.5, abs=len(bounds) / n)


def test_batch_equals_one_by_one(compressor: Compressor) -> None:
    texts = [SHORT, PARAGRAPH * 3, "Another short sentence about 42 apples and 7 pears."]
    batch = compressor.compress(texts, mask_rate=0.3)
    assert isinstance(batch, list) and len(batch) == 3
    for text, r in zip(texts, batch, strict=True):
        alone = _compress_one(compressor, text, mask_rate=0.3)
        _check_consistent(compressor, r)
        assert np.array_equal(r.kept_mask, alone.kept_mask) and r.text == alone.text


def test_target_tokens_gives_exact_lengths(compressor: Compressor) -> None:
    long_text = PARAGRAPH * 4
    n_long = len(compressor.tokenizer(long_text, add_special_tokens=False)["input_ids"])
    for text, n in ((SHORT, len(compressor.tokenizer(SHORT, add_special_tokens=False)["input_ids"])), (long_text, n_long)):
        for target in (1, n // 3, n - 1, n):  # 0 would remove every token: refused (test_reliability)
            r = _compress_one(compressor, text, target_tokens=target)
            _check_consistent(compressor, r)
            assert r.compressed_tokens == target and r.target_tokens == target
            assert r.requested_mask_rate == pytest.approx(1 - target / n)
    per_text = compressor.compress([SHORT, long_text], target_tokens=[5, 50])
    assert [r.compressed_tokens for r in per_text] == [5, 50]  # type: ignore[union-attr]


def test_force_keep_strings_and_digits_are_never_dropped(compressor: Compressor) -> None:
    # A long text so that the strings also fall across window boundaries.
    sentence = "In 2024 the Zanzibar protocol moved 31415 crates; ask Zanzibar again about 2718 items. "
    text = sentence * 12
    for rate in (0.5, 0.9):
        r = _compress_one(compressor, text, mask_rate=rate, force_keep=["Zanzibar", "crates"], keep_digits=True)
        _check_consistent(compressor, r)
        assert r.windows > 1
        assert r.text.count("Zanzibar") == text.count("Zanzibar")
        assert r.text.count("crates") == text.count("crates")
        for number in ("2024", "31415", "2718"):
            assert r.text.count(number) == text.count(number)
        assert r.force_kept[~r.kept_mask].sum() == 0
    # Without the rules, rate 0.9 drops some of those tokens (so the assertions above can fail).
    plain = _compress_one(compressor, text, mask_rate=0.9, keep_digits=False)
    assert plain.text.count("Zanzibar") < text.count("Zanzibar") or plain.text.count("2024") < text.count("2024")


def test_force_keep_string_inside_a_word_and_budget_over_all_tokens(compressor: Compressor) -> None:
    text = "supercalifragilistic words and more words and still more words for the budget"
    r = _compress_one(compressor, text, mask_rate=0.5, force_keep="fragil")
    kept_tokens = [compressor.tokenizer.decode([i]) for i in r.origin_ids[r.force_kept]]
    assert "fragil" in "".join(kept_tokens)
    assert r.force_kept[~r.kept_mask].sum() == 0
    n = r.origin_tokens
    assert n - r.compressed_tokens == min(int(np.floor(0.5 * n + 0.5)), int((~r.force_kept).sum()))


def test_reconstruct_keeps_kept_tokens(compressor: Compressor) -> None:
    r = _compress_one(compressor, PARAGRAPH * 3, mask_rate=0.4)
    for reference in (False, True):
        filled = compressor.reconstruct_ids(r, reference=reference)
        assert filled.shape == r.origin_ids.shape
        assert np.array_equal(filled[r.kept_mask], r.origin_ids[r.kept_mask])
        text = compressor.reconstruct(r, reference=reference)
        assert isinstance(text, str) and text == compressor.tokenizer.decode(filled.tolist())
    untouched = _compress_one(compressor, SHORT, mask_rate=0.0)
    assert compressor.reconstruct(untouched) == SHORT


@pytest.mark.parametrize(
    ("text", "kwargs", "match"),
    [
        ("", {}, "empty"),
        ("  \n\t ", {}, "empty"),
        ([], {}, "no text"),
        (None, {}, "list of texts"),
        ([SHORT, " "], {}, r"text 1"),
        ([SHORT, 3], {}, "strings"),
        (SHORT, {"mask_rate": 1.0}, r"\[0, 1\)"),
        (SHORT, {"mask_rate": -0.1}, r"\[0, 1\)"),
        (SHORT, {"mask_rate": float("nan")}, r"\[0, 1\)"),
        (SHORT, {"mask_rate": "0.4"}, "number"),
        (SHORT, {"target_tokens": -1}, "target_tokens"),
        (SHORT, {"target_tokens": 10_000}, "token count"),
        (SHORT, {"target_tokens": 2.5}, "integer"),
        (SHORT, {"mask_rate": 0.4, "target_tokens": 3}, "not both"),
        ([SHORT, SHORT], {"target_tokens": [1, 2, 3]}, "one per text"),
        (SHORT, {"force_keep": [1]}, "force_keep"),
    ],
)
def test_bad_inputs_raise_one_line_input_errors(compressor: Compressor, text: object, kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        compressor.compress(text, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_evaluation_seam_uses_the_same_logits(compressor: Compressor, test_windows: dict[str, np.ndarray]) -> None:
    windows = test_windows["test"][:5]
    valid = np.ones(windows.shape, dtype=bool)
    fn = agent_logit_fn(compressor.agent, compressor.reconstructor, batch_size=2)
    logits = fn(windows, valid, 0.6)
    direct = window_mask_logits(compressor.agent, windows, valid, np.zeros_like(valid), 0.6)
    assert np.allclose(logits, direct, atol=1e-5)
    masks = policy_method(fn)(windows, 0.6, None, valid)  # type: ignore[arg-type]
    assert np.array_equal(masks.sum(axis=1), mask_budget(0.6, valid))


def test_sequential_method_replays_the_episode(tmp_path: Path, test_windows: dict[str, np.ndarray]) -> None:
    """A decision-aware policy is evaluated chunk by chunk with the decisions before each chunk, at the exact rate."""
    run = _train(tmp_path, use_decisions=True, total_timesteps=32, n_steps=8)
    comp = Compressor.load(run, device="cpu")
    agent, chunk = comp.agent, int(comp.agent.action_space.n)
    windows = test_windows["validation"][:4]
    valid = np.ones(windows.shape, dtype=bool)
    keep = np.zeros(windows.shape, dtype=bool)
    masks = agent_sequential_method(agent, comp.reconstructor, batch_size=3)(windows, 0.5, None, valid)
    assert np.array_equal(masks.sum(axis=1), mask_budget(0.5, valid))
    # replay by hand: each chunk's drops are its budget's highest logits given the decisions before it
    budgets = segment_budgets(valid, mask_budget(0.5, valid), chunk)
    decisions = np.zeros(windows.shape, dtype=np.int64)
    for s, start in enumerate(range(0, windows.shape[1], chunk)):
        logits = window_mask_logits(agent, windows, valid, keep, 0.5, decisions=decisions)[:, start : start + chunk]
        for row in range(len(windows)):
            top = np.sort(np.argsort(-logits[row], kind="stable")[: budgets[row, s]])
            assert np.array_equal(np.flatnonzero(masks[row, start : start + chunk]), top)
        decisions[:, start : start + chunk] = np.where(masks[:, start : start + chunk], 2, 1)
    # the decisions matter to this policy: later logits change when earlier decisions do
    undecided = window_mask_logits(agent, windows, valid, keep, 0.5)
    assert not np.allclose(undecided[:, chunk:], window_mask_logits(agent, windows, valid, keep, 0.5, decisions=decisions)[:, chunk:])
    # the inference path feeds the decisions exactly as the observation did
    rates = np.full(len(windows), 0.5, dtype=np.float32)
    assert np.array_equal(
        window_mask_logits(agent, windows, valid, keep, 0.5, decisions=decisions),
        _reference_logits(agent, windows, valid, keep, rates, decisions=decisions),
    )
    assert np.array_equal(undecided, _reference_logits(agent, windows, valid, keep, rates))


def test_surprisal_observing_run(tmp_path: Path, test_reconstructor_dir: Path) -> None:
    run = _train(tmp_path, observe_surprisal=True, total_timesteps=32, n_steps=8)
    comp = Compressor.load(run, device="cpu")
    assert comp.observe_surprisal
    r = _compress_one(comp, PARAGRAPH * 2, mask_rate=0.4)
    _check_consistent(comp, r)
    ids, valid, keep, rates = _random_windows(comp, n=4)
    bits = comp.reconstructor.surprisal(ids, valid).float().cpu().numpy()
    assert np.array_equal(
        window_mask_logits(comp.agent, ids, valid, keep, rates, comp.reconstructor),
        _reference_logits(comp.agent, ids, valid, keep, rates, bits=bits),
    )
    with pytest.raises(InputError, match="surprisal"):
        window_mask_logits(
            comp.agent,
            np.zeros((1, comp.seq_len), dtype=np.int64),
            np.ones((1, comp.seq_len), bool),
            np.zeros((1, comp.seq_len), bool),
            0.4,
        )


# ---------------------------------------------------------------------------- loading
def test_load_errors_name_what_is_missing(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Compressor.load(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json, policy\.safetensors, policy\.json, reconstructor"):
        Compressor.load(empty)

    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    for name in ("agent.zip", "policy.safetensors", "policy.json"):
        (partial / name).unlink()
    with pytest.raises(CheckpointError, match=r"missing policy\.safetensors, policy\.json.*checkpoints/latest"):
        Compressor.load(partial)
    # The checkpoint the message points to loads (its reference reconstructor is the run's).
    comp = Compressor.load(partial / "checkpoints" / "latest", device="cpu")
    assert comp.reference_dir == partial / "reference_reconstructor"

    for name in ("policy.safetensors", "policy.json"):
        shutil.copy(run_dir / name, partial / name)
    shutil.rmtree(partial / "reconstructor")
    with pytest.raises(CheckpointError, match="missing reconstructor"):
        Compressor.load(partial)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(run_dir, corrupt)
    (corrupt / "policy.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"policy\.safetensors' \(corrupt or partial\?\)"):
        Compressor.load(corrupt)
    shutil.copy(run_dir / "policy.safetensors", corrupt / "policy.safetensors")
    (corrupt / "policy.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"policy\.json' is not a usable policy spec"):
        Compressor.load(corrupt)
    shutil.copy(run_dir / "policy.json", corrupt / "policy.json")
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        Compressor.load(corrupt)
    shutil.copy(run_dir / "config.json", corrupt / "config.json")
    (corrupt / "reconstructor" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="reconstructor"):
        Compressor.load(corrupt)


# ---------------------------------------------------------------------------- command line
def _cli(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.compress", *args], cwd=ROOT, env=env, input=stdin, capture_output=True, timeout=300
    )


def test_cli_file_and_stdin(run_dir: Path, compressor: Compressor, tmp_path: Path) -> None:
    text = PARAGRAPH * 2
    expected = _compress_one(compressor, text, mask_rate=0.4)
    file = tmp_path / "in.txt"
    file.write_text(text, encoding="utf-8")
    out = _cli(["--run", str(run_dir), "--mask_rate", "0.4", str(file)])
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().rstrip("\n") == expected.text

    out = _cli(["--run", str(run_dir), "--mask-rate", "0.4", "--json", "--reconstruct", "--device", "cpu"], stdin=text.encode())
    assert out.returncode == 0, out.stderr.decode()
    data = json.loads(out.stdout)
    assert data["text"] == expected.text and data["ids"] == expected.ids.tolist()
    assert data["kept_mask"] == expected.kept_mask.astype(int).tolist()
    assert data["origin_tokens"] == expected.origin_tokens and data["compressed_tokens"] == expected.compressed_tokens
    assert data["requested_mask_rate"] == 0.4 and data["achieved_mask_rate"] == pytest.approx(expected.achieved_mask_rate)
    assert data["reconstruction"] == compressor.reconstruct(expected) and data["reconstructor"] == "joint"


def test_cli_user_errors_are_one_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [
        ["--run", str(run_dir), str(empty)],
        ["--run", str(run_dir), str(tmp_path / "missing.txt")],
        ["--run", str(tmp_path / "no_run"), str(empty)],
        ["--run", str(run_dir), "--mask_rate", "1.5", str(empty)],
        ["--run", str(run_dir), "--mask_rate", "abc", str(empty)],
        ["--run", str(run_dir), "--mask_rate", "0.3", "--target_tokens", "4", str(empty)],
        [str(empty)],
    ]
    for argv in cases:
        assert compress_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)
    bad_rate = tmp_path / "text.txt"
    bad_rate.write_text(SHORT)
    assert compress_main(["--run", str(run_dir), "--mask_rate", "nan", str(bad_rate)]) == 2
    assert "[0, 1)" in capsys.readouterr().err


def test_cli_process_error_and_invalid_utf8(run_dir: Path, tmp_path: Path) -> None:
    out = _cli(["--run", str(tmp_path / "missing_run"), "-"], stdin=SHORT.encode())
    assert out.returncode == 2 and b"Traceback" not in out.stderr and out.stderr.count(b"\n") == 1
    raw = tmp_path / "latin1.txt"
    raw.write_bytes(("Caf\xe9 cr\xe8me and " + PARAGRAPH).encode("latin-1"))
    out = _cli(["--run", str(run_dir), "--target_tokens", "10", "--json", str(raw)])
    assert out.returncode == 0, out.stderr.decode()
    assert json.loads(out.stdout)["compressed_tokens"] == 10


def test_benchmark_cli(run_dir: Path, tmp_path: Path) -> None:
    from experiments.benchmark_compress import main as bench_main

    data = tmp_path / "data.txt"
    data.write_text(PARAGRAPH * 40)
    out = tmp_path / "bench.json"
    assert (
        bench_main(
            [
                "--run",
                str(run_dir),
                "--out",
                str(out),
                "--data",
                str(data),
                "--repeats",
                "1",
                "--device",
                "cpu",
                "--max_tokens",
                "500",
                "--long_tokens",
                "900",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert 450 <= result["tokens"] <= 505 and result["texts"] == 1  # one long document, cut at --max_tokens
    assert result["compress_tokens_per_s"] > 0 and result["self_information_tokens_per_s"] > 0
    assert result["speedup"] == pytest.approx(result["compress_tokens_per_s"] / result["self_information_tokens_per_s"])
    assert {"tokenize", "policy", "ranking", "decode"} <= set(result["stage_seconds"]) and result["text_tokens_seconds"] >= 0
    assert result["speedup_bfloat16"] > 0 and 0.0 <= result["bfloat16_changed_drops"] <= 1.0
    assert result["long_text"]["tokens"] == 900 and result["long_text"]["speedup"] > 0  # PARAGRAPH repeated, cut at 900


def test_evaluate_runs_the_policy_through_the_shared_seam(run_dir: Path, tmp_path: Path) -> None:
    from experiments.evaluate import main as evaluate_main

    records = evaluate_main(
        [
            "--run",
            str(run_dir),
            "--methods",
            "policy",
            "--mask_rates",
            "0.5",
            "--max_windows",
            "4",
            "--bootstrap",
            "10",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    policy = [r for r in records if r["method"] == "policy"]
    assert {r["reconstructor"] for r in policy} == {"reference", "joint"}
    assert all(r["achieved_mask_rate"] == pytest.approx(0.5, abs=1e-9) for r in policy)


def test_placeholder_marks_each_run_of_dropped_tokens(compressor: Compressor, run_dir: Path, tmp_path: Path, capsys) -> None:
    mark = "<…>"
    plain = _compress_one(compressor, PARAGRAPH, mask_rate=0.5)
    marked = _compress_one(compressor, PARAGRAPH, mask_rate=0.5, placeholder=mark)
    assert np.array_equal(marked.kept_mask, plain.kept_mask) and np.array_equal(marked.ids, plain.ids)
    assert marked.placeholder == mark and marked.to_dict()["placeholder"] == mark
    dropped = ~marked.kept_mask
    runs = int((dropped & ~np.concatenate([[False], dropped[:-1]])).sum())
    assert runs > 1 and marked.text.count(mark) == runs
    # between the placeholders: each run of kept tokens, decoded
    kept_runs, current = [], []
    for token, kept in zip(marked.origin_ids, marked.kept_mask, strict=True):
        if kept:
            current.append(int(token))
        elif not current or current[-1] != -1:
            kept_runs.append(current)
            current = [-1]  # marks 'inside a dropped run'
    parts = marked.text.split(mark)
    expected_parts = [compressor.tokenizer.decode([t for t in run if t != -1]) for run in [*kept_runs, current]]
    assert parts == expected_parts
    file = tmp_path / "p.txt"
    file.write_text(PARAGRAPH, encoding="utf-8")
    assert compress_main(["--run", str(run_dir), "--mask_rate", "0.5", "--placeholder", mark, "--device", "cpu", str(file)]) == 0
    assert capsys.readouterr().out.rstrip("\n") == marked.text


def test_evaluate_several_runs_end_to_end(run_dir: Path, tmp_path: Path) -> None:
    from experiments.evaluate import main as evaluate_main

    runs = []
    for seed in (0, 1):
        copy = tmp_path / f"seed{seed}"
        shutil.copytree(run_dir, copy)
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "seed": seed}))
        runs.append(str(copy))
    out = tmp_path / "eval"
    argv = ["--run", *runs, "--split", "validation", "--methods", "policy", "stride", "search", "--mask_rates", "0.25", "0.5"]
    argv += ["--max_windows", "6", "--search_windows", "2", "--continuation_tokens", "8", "--bootstrap", "20", "--device", "cpu"]
    records = evaluate_main([*argv, "--out", str(out)])
    assert json.loads((out / "results.json").read_text()) == records
    assert {r["run"] for r in records} == {*runs, "pooled"}
    assert all(r["split"] == "validation" for r in records)
    pooled = [r for r in records if r["run"] == "pooled" and r["reconstructor"] == "reference"]
    assert len(pooled) == 3 * 2
    for r in pooled:
        assert r["seeds"] == [0, 1] and len(r["bits_per_masked_token_per_seed"]) == 2
        assert r["bits_per_masked_token_seed_std"] == pytest.approx(0.0, abs=1e-9)  # two copies of one run
        assert r["position_bits_per_window"] > 0 and r["bits_per_masked_token_with_positions"] > r["bits_per_masked_token"]
        for key in ("continuation_bits_full", "continuation_bits_deleted", "continuation_bits_placeholder", "continuation_bits_none"):
            assert r[key] is not None and r[key] > 0
        assert r["context_kept"] is not None and r["continuation_windows"] + r["continuation_windows_skipped"] == r["windows"]
        if r["method"] == "stride":
            lo, hi = r["policy_minus_method_bits_per_masked_token_ci95"]
            assert lo <= r["policy_minus_method_bits_per_masked_token"] <= hi
        if r["method"] == "search":
            assert r["windows"] == 2 and r["policy_to_search_ratio"] >= 1.0 - 1e-6
    md = (out / "results.md").read_text().splitlines()
    assert md[2].startswith("Verdict") and md[4].startswith("- **rate 0.25**: best baseline `stride`")
    text = "\n".join(md)
    assert "split: validation" in text and "Command: `python -m experiments.evaluate --run" in text and "Per seed" in text
    assert (out / "rate_distortion.png").stat().st_size > 5000


# ---------------------------------------------------------------------------- whole characters and words (issue 14)
#: Alphabets of the random texts: ASCII words, accented Latin, CJK, emoji (with a ZWJ sequence and a
#: skin tone), combining marks, right-to-left scripts.
UNICODE_PIECES = [
    "the",
    " ",
    "cat",
    ".",
    "\n",
    "café",
    "naïve",
    "Ærøskøbing",
    "你好",
    "世界",
    "，",
    "。",
    "日本語",
    "テキスト",
    "🎉",
    "👩\u200d💻",
    "👍🏽",
    "e\u0301",
    "a\u0308\u0323",
    "שלום",
    "مرحبا",
    "\u200f",
    "𝔘𝔫𝔦",
]


def _is_subsequence(small: str, big: str) -> bool:
    it = iter(big)
    return all(ch in it for ch in small)


def _check_whole(compressor: Compressor, text: str, r: CompressionResult) -> None:
    assert "\ufffd" not in r.text, r.text
    r.text.encode("utf-8")  # valid text: no lone surrogates
    assert _is_subsequence(r.text, text), (r.text, text)
    assert len(r.text) <= len(text)
    assert r.text_tokens == len(compressor.tokenizer(r.text, add_special_tokens=False)["input_ids"])
    assert r.text_tokens is not None and r.text_tokens <= r.origin_tokens


def test_cjk_and_emoji_text_stays_whole(compressor: Compressor) -> None:
    """The issue's example: no replacement characters, only the input's characters, never longer in tokens."""
    text = "你好，世界！这是一个测试。日本語のテキストです。🎉"
    for units in ("piece", "word"):
        for rate in (0.2, 0.4, 0.7):
            r = _compress_one(compressor, text, mask_rate=rate, units=units)
            _check_whole(compressor, text, r)
            assert r.units == units
            assert np.array_equal(r.ids, r.origin_ids[r.kept_mask])


def test_word_units_drop_whole_words(compressor: Compressor) -> None:
    from tokencompress_env.units import unit_index, unit_starts

    text = PARAGRAPH * 3 + "Michigan in 1926 for several reasons; naïve café owners."
    for rate in (0.3, 0.6):
        r = _compress_one(compressor, text, mask_rate=rate, units="word")
        words = unit_index(unit_starts(r.origin_ids, None, compressor.tokenizer, "word")[None])[0]
        for w in np.unique(words):
            assert len(set(r.kept_mask[words == w].tolist())) == 1  # a word is dropped or kept whole
        assert abs(r.achieved_mask_rate - rate) < 0.05  # whole words meet the rate closely, not exactly
        kept_words = set(r.text.split())
        assert kept_words <= set(text.split()) | {w.strip(".;,") for w in text.split()}  # no glued pieces


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    pieces=st.lists(st.sampled_from(UNICODE_PIECES), min_size=1, max_size=60),
    rate=st.floats(0.0, 0.99),
    units=st.sampled_from(["piece", "word"]),
)
def test_random_unicode_compresses_to_whole_characters(compressor: Compressor, pieces: list[str], rate: float, units: str) -> None:
    text = "".join(pieces)
    if not text.strip():
        return
    try:
        r = _compress_one(compressor, text, mask_rate=rate, units=units)
    except InputError as exc:  # a rate that would remove every token of a short text is refused
        assert "would remove every token" in str(exc)
        return
    _check_whole(compressor, text, r)
    assert r.compressed_tokens >= 1


def test_force_keep_covering_the_text_says_so(compressor: Compressor) -> None:
    r = _compress_one(compressor, "alpha beta gamma", mask_rate=0.5, force_keep=["alpha beta gamma"])
    assert r.compressed_tokens == r.origin_tokens and r.achieved_mask_rate == 0.0
    assert r.warning is not None and "force-kept" in r.warning and "0.500" in r.warning
    assert r.to_dict()["warning"] == r.warning
    plain = _compress_one(compressor, "alpha beta gamma delta", mask_rate=0.5)
    assert plain.warning is None


def test_long_words_that_miss_the_rate_say_so(compressor: Compressor) -> None:
    text = "你好世界日本語テキスト你好世界 and more words here"  # the CJK run is one word of most of the tokens
    word = _compress_one(compressor, text, mask_rate=0.5, units="word")
    assert word.achieved_mask_rate < 0.45
    assert word.warning is not None and "whole words let only" in word.warning and "units='piece'" in word.warning
    piece = _compress_one(compressor, text, mask_rate=0.5, units="piece")
    assert abs(piece.achieved_mask_rate - 0.5) < 0.05 and piece.warning is None


# ---------------------------------------------------------------------------- the force-keep table cache
def test_force_keep_table_cache_is_keyed_by_the_tokenizer_itself(test_reconstructor) -> None:
    """Each tokenizer object gets its own table, and a collected tokenizer's table is gone (never served to another)."""
    import copy
    import gc
    from types import SimpleNamespace

    from tokencompress_env import compressor as module
    from tokencompress_env.env import force_keep_token_table

    first = module._cached_table(test_reconstructor, keep_digits=False)
    assert module._cached_table(test_reconstructor, keep_digits=False) is first
    tokenizer = copy.deepcopy(test_reconstructor.tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<never dropped>"]})
    other = SimpleNamespace(tokenizer=tokenizer, vocab_size=test_reconstructor.vocab_size)
    table = module._cached_table(other, keep_digits=False)  # type: ignore[arg-type]
    assert np.array_equal(table, force_keep_token_table(other, False))  # type: ignore[arg-type]
    assert table.sum() == first.sum() + 1 and len(table) == max(test_reconstructor.vocab_size, len(tokenizer))
    entries = len(module._TABLES)
    del other, tokenizer, table
    gc.collect()
    assert len(module._TABLES) == entries - 1  # no table outlives its tokenizer, so no id() can be reused to reach it
    assert module._cached_table(test_reconstructor, keep_digits=False) is first


# ---------------------------------------------------------------------------- the fast inference path (issue 13)
def _reference_logits(agent: object, ids: np.ndarray, valid: np.ndarray, keep: np.ndarray, rates: np.ndarray, **kw: object) -> np.ndarray:
    """The logits the way compress() computed them before its inference path: observation dicts through token_mask_logits."""
    from tokencompress_env.observation import build_observation

    policy = agent.policy  # type: ignore[attr-defined]
    keys = list(agent.observation_space.spaces)  # type: ignore[attr-defined]
    out = np.empty(ids.shape, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(ids), 3):
            sl = slice(start, start + 3)
            bits, decisions = (None if kw.get(k) is None else np.asarray(kw[k])[sl] for k in ("bits", "decisions"))
            obs = build_observation(ids[sl], valid[sl], keep[sl], rates[sl], bits, decisions)
            out[sl] = policy.token_mask_logits({k: torch.from_numpy(obs[k]) for k in keys}).float().numpy()
    return out


def _random_windows(compressor: Compressor, n: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    length = compressor.seq_len
    ids = rng.integers(0, compressor.reconstructor.vocab_size, (n, length))
    sizes = rng.integers(1, length + 1, n)
    sizes[0] = length
    valid = np.arange(length)[None] < sizes[:, None]
    ids[~valid] = compressor.reconstructor.pad_token_id
    keep = (rng.random((n, length)) < 0.1) & valid
    rates = rng.uniform(0.1, 0.9, n).astype(np.float32)
    return ids, valid, keep, rates


def test_inference_path_gives_the_training_logits_bit_for_bit(compressor: Compressor) -> None:
    """window_mask_logits' inference path (no observation dict, projected embedding table, in-place blocks) is exact in float32."""
    assert compressor.agent.policy.has_inference_path
    ids, valid, keep, rates = _random_windows(compressor)
    expected = _reference_logits(compressor.agent, ids, valid, keep, rates)
    for batch_size in (1, 3, 16):
        got = window_mask_logits(compressor.agent, ids, valid, keep, rates, batch_size=batch_size)
        assert np.array_equal(got, expected)  # -inf at padding and force-keep included
    # The cached weight copies follow the weights: an in-place update shows at the next call.
    extractor = compressor.agent.policy.pi_features_extractor
    before = window_mask_logits(compressor.agent, ids, valid, keep, rates, matmul_dtype="bfloat16")
    saved = [extractor.token_embedding.weight.detach().clone(), extractor.blocks[0].conv.weight.detach().clone()]
    with torch.no_grad():
        extractor.token_embedding.weight.mul_(1.5)
        extractor.blocks[0].conv.weight.mul_(1.5)
    try:
        changed = window_mask_logits(compressor.agent, ids, valid, keep, rates)
        assert np.array_equal(changed, _reference_logits(compressor.agent, ids, valid, keep, rates))
        assert not np.array_equal(changed, expected)
        assert not np.array_equal(window_mask_logits(compressor.agent, ids, valid, keep, rates, matmul_dtype="bfloat16"), before)
    finally:
        with torch.no_grad():
            extractor.token_embedding.weight.copy_(saved[0])
            extractor.blocks[0].conv.weight.copy_(saved[1])
    assert np.array_equal(window_mask_logits(compressor.agent, ids, valid, keep, rates), expected)


def test_compress_gives_the_masks_of_the_reference_pipeline(compressor: Compressor) -> None:
    """compress() (vectorised windows, inference path, row-split ranking) against the pipeline spelled out step by step."""
    from tokencompress_env.baselines import _unit_budget_mask, rate_budget
    from tokencompress_env.units import decode_ids, spread_to_units, unit_starts

    texts = [PARAGRAPH * 3 + "naïve café 日本語のテキスト 🎉 " * 4, SHORT, "你好，世界！这是一个测试。" * 9 + PARAGRAPH]
    for units, rate in (("piece", 0.4), ("word", 0.3), ("piece", 0.7)):
        results = compressor.compress(texts, mask_rate=rate, units=units)
        assert isinstance(results, list)
        for text, r in zip(texts, results, strict=True):
            ids = np.asarray(compressor.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
            assert np.array_equal(r.origin_ids, ids)
            starts = unit_starts(ids, None, compressor.tokenizer, units)
            b = window_bounds(len(ids), compressor.seq_len)
            flags = np.zeros(len(ids), dtype=bool)
            for edge in b[1:-1]:
                if not starts[edge]:
                    flags[edge - 1 : edge + 1] = True
            keep = spread_to_units(flags[None], starts[None])[0]
            length = compressor.seq_len
            w_ids = np.full((len(b) - 1, length), compressor.reconstructor.pad_token_id, dtype=np.int64)
            w_valid = np.zeros((len(b) - 1, length), dtype=bool)
            w_keep = np.zeros_like(w_valid)
            w_starts = np.ones_like(w_valid)
            for w in range(len(b) - 1):
                size = b[w + 1] - b[w]
                w_ids[w, :size], w_valid[w, :size], w_keep[w, :size] = ids[b[w] : b[w + 1]], True, keep[b[w] : b[w + 1]]
                w_starts[w, :size] = starts[b[w] : b[w + 1]]
                w_starts[w, 0] = True
            logits = _reference_logits(compressor.agent, w_ids, w_valid, w_keep, np.full(len(w_ids), rate, dtype=np.float32))
            maskable = w_valid & ~w_keep
            ties = np.broadcast_to(-np.arange(length, dtype=np.float64), w_ids.shape)
            dropped = _unit_budget_mask(np.asarray(logits, np.float64), rate_budget(rate, w_valid, maskable), maskable, ties, w_starts)
            kept = ~dropped[w_valid]
            assert np.array_equal(r.kept_mask, kept)
            assert r.text == decode_ids(compressor.tokenizer, ids[kept])
            assert r.text_tokens == len(compressor.tokenizer(r.text, add_special_tokens=False)["input_ids"])


def test_budget_mask_splits_rows_by_unit_kind() -> None:
    """Rows of single-token units take the token ranking: the same masks as the unit ranking of every row."""
    from tokencompress_env.baselines import _unit_budget_mask, budget_mask

    rng = np.random.default_rng(3)
    n, length = 40, 24
    priority = rng.normal(size=(n, length)).round(1)  # ties included
    priority[0, :3] = [np.inf, -np.inf, np.nan]
    maskable = rng.random((n, length)) < 0.8
    starts = np.ones((n, length), dtype=bool)
    starts[::3] = rng.random((len(starts[::3]), length)) < 0.6  # every third row has multi-token units
    starts[:, 0] = True
    budget = (maskable.sum(axis=1) * rng.uniform(0, 1, n)).astype(np.int64)
    ties = np.broadcast_to(-np.arange(length, dtype=np.float64), (n, length))
    clean = np.nan_to_num(priority, nan=-np.inf)
    assert np.array_equal(budget_mask(priority, budget, maskable, units=starts), _unit_budget_mask(clean, budget, maskable, ties, starts))


def test_spread_to_units_and_decode_match_their_definitions(compressor: Compressor) -> None:
    from tokencompress_env.units import decode_ids, spread_to_units, token_table, unit_index

    rng = np.random.default_rng(0)
    flags = rng.random((5, 30)) < 0.1
    starts = rng.random((5, 30)) < 0.5
    starts[:, 0] = True
    index = unit_index(starts)
    expected = np.array([[flags[r][index[r] == index[r][j]].any() for j in range(30)] for r in range(5)])
    assert np.array_equal(spread_to_units(flags, starts), expected)
    ids = compressor.tokenizer("naïve café 日本語 🎉", add_special_tokens=False)["input_ids"]
    raw = token_table(compressor.tokenizer).raw
    assert decode_ids(compressor.tokenizer, ids) == b"".join(raw[i] for i in ids).decode("utf-8", errors="replace")
    assert decode_ids(compressor.tokenizer, np.asarray(ids)) == decode_ids(compressor.tokenizer, ids) == "naïve café 日本語 🎉"


def test_bfloat16_matmuls_are_opt_in_and_close(run_dir: Path, compressor: Compressor) -> None:
    from tokencompress_env.errors import ConfigError

    assert compressor.matmul_dtype == "float32"
    fast = Compressor.load(run_dir, device="cpu", matmul_dtype="bfloat16")
    ids, valid, keep, rates = _random_windows(compressor, n=12, seed=1)
    exact = window_mask_logits(compressor.agent, ids, valid, keep, rates)
    approx = window_mask_logits(fast.agent, ids, valid, keep, rates, matmul_dtype="bfloat16")
    live = valid & ~keep
    assert np.array_equal(np.isinf(approx), ~live)
    assert np.abs(approx[live] - exact[live]).max() < 0.25 and np.corrcoef(approx[live], exact[live])[0, 1] > 0.999
    text = PARAGRAPH * 4
    a, b = _compress_one(compressor, text, mask_rate=0.4), _compress_one(fast, text, mask_rate=0.4)
    assert a.compressed_tokens == b.compressed_tokens and (a.kept_mask != b.kept_mask).mean() < 0.05
    with pytest.raises(ConfigError, match="matmul_dtype"):
        Compressor.load(run_dir, device="cpu", matmul_dtype="float16")
    with pytest.raises(InputError, match="matmul_dtype"):
        window_mask_logits(compressor.agent, ids, valid, keep, rates, matmul_dtype="int8")


def test_text_tokens_is_counted_when_read_and_results_pickle_alone(compressor: Compressor) -> None:
    import copy
    import pickle

    results = compressor.compress([PARAGRAPH * 2, SHORT], mask_rate=0.5)
    assert isinstance(results, list)
    assert set(compressor.last_stage_seconds) >= {"tokenize", "units", "windows", "policy", "ranking", "decode"}
    clone = pickle.loads(pickle.dumps(results[1]))  # counted before pickling; the compressor does not travel along
    assert len(pickle.dumps(results[1])) < 20_000
    for r in (results[0], results[1], clone, copy.deepcopy(results[0])):
        assert r.text_tokens == len(compressor.tokenizer(r.text, add_special_tokens=False)["input_ids"])
    assert np.array_equal(clone.kept_mask, results[1].kept_mask) and clone.text == results[1].text
    assert results[0].to_dict(arrays=False)["text_tokens"] == results[0].text_tokens
