"""Tokenizer, reconstructor loading/saving, and the one scoring function."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from tests.conftest import refuse_connections
from tokencompress_env.errors import ReconstructorLoadError
from tokencompress_env.pretrain import PretrainConfig, bits_per_masked_token, fixed_rate_masks, pretrain, random_masks
from tokencompress_env.reconstructor import Reconstructor, cpu_has_native_bf16, resolve_device, resolve_scoring_dtype
from tokencompress_env.tokenizer import MASK_TOKEN, train_bpe_tokenizer


def _masks(shape, rate, seed=0):
    return fixed_rate_masks(shape, rate, seed)


def test_tokenizer_round_trip(test_reconstructor):
    tok = test_reconstructor.tokenizer
    for text in ["Return the sum of x and y.", "  indented\n\ttabs and ünïcödé — 漢字 😀", "a" * 300]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok.mask_token == MASK_TOKEN
    assert tok.convert_tokens_to_ids(MASK_TOKEN) == test_reconstructor.mask_token_id
    assert test_reconstructor.mask_token_id < test_reconstructor.vocab_size


def test_train_bpe_tokenizer_has_requested_size():
    tok = train_bpe_tokenizer(["hello world, hello tokens. " * 50, "another text about words " * 50], vocab_size=300)
    assert len(tok) <= 300
    assert tok.mask_token_id is not None and tok.eos_token_id is not None


def test_save_load_round_trip(test_reconstructor, test_windows, tmp_path):
    test_reconstructor.save_pretrained(tmp_path / "copy", build_info={"note": "round trip"})
    assert (tmp_path / "copy" / "model.safetensors").exists()
    assert not list((tmp_path / "copy").glob("*.bin"))
    loaded = Reconstructor.from_pretrained(tmp_path / "copy", device="cpu")
    x = test_windows["validation"][:4]
    m = _masks(x.shape, 0.4)
    a, b = test_reconstructor.score(x, m), loaded.score(x, m)
    assert torch.allclose(a.surprisal, b.surprisal)
    assert json.loads((tmp_path / "copy" / "tokencompress.json").read_text())["note"] == "round trip"


def test_batched_equals_one_by_one(test_reconstructor, test_windows):
    x = test_windows["validation"][:6]
    m = _masks(x.shape, 0.5, seed=1)
    batched = test_reconstructor.score(x, m)
    for i in range(len(x)):
        single = test_reconstructor.score(x[i : i + 1], m[i : i + 1])
        assert torch.allclose(batched.surprisal[i], single.surprisal[0], atol=1e-4)
        assert torch.equal(batched.correct[i], single.correct[0])


@pytest.mark.parametrize("chunk", [1, 8, 16, 64])
def test_cached_prefix_equals_full_window(test_reconstructor, test_windows, chunk):
    x = test_windows["validation"][:3]
    m = _masks(x.shape, 0.4, seed=2)
    full = test_reconstructor.score(x, m)
    state = test_reconstructor.begin_scoring(len(x))
    parts = [test_reconstructor.score_chunk(state, x[:, s : s + chunk], m[:, s : s + chunk]) for s in range(0, x.shape[1], chunk)]
    assert state.position == x.shape[1]
    assert torch.allclose(torch.cat([p.surprisal for p in parts], dim=1), full.surprisal, atol=1e-3)
    assert torch.equal(torch.cat([p.prediction for p in parts], dim=1), full.prediction)


def test_unmasked_positions_cost_nothing(test_reconstructor, test_windows):
    x = test_windows["validation"][:4]
    m = _masks(x.shape, 0.3, seed=3)
    result = test_reconstructor.score(x, m)
    bits = result.masked_bits.numpy()
    assert np.all(bits[~m] == 0)
    assert np.all(bits[m] > 0)
    nothing = test_reconstructor.score(x, np.zeros_like(m))
    assert float(nothing.masked_bits.sum()) == 0.0


def test_surprisal_depends_only_on_the_prefix(test_reconstructor, test_windows):
    x = test_windows["validation"][:2]
    m = np.zeros(x.shape, dtype=bool)
    m[:, 40] = True
    with_mask = test_reconstructor.score(x, m).surprisal
    without = test_reconstructor.surprisal(x)
    assert torch.allclose(with_mask[:, :41], without[:, :41], atol=1e-4)  # position 40 sees only x_<40
    assert not torch.allclose(with_mask[:, 41:], without[:, 41:], atol=1e-4)


def test_padding_is_free_and_invisible(test_reconstructor, test_windows):
    x = test_windows["validation"][:2].copy()
    valid = np.ones(x.shape, dtype=bool)
    valid[:, 50:] = False
    m = np.ones(x.shape, dtype=bool)
    padded = test_reconstructor.score(x, m, valid)
    assert float(padded.masked_bits[:, 50:].sum()) == 0.0
    assert not padded.mask[:, 50:].any()
    x2 = x.copy()
    x2[:, 50:] = 7
    other = test_reconstructor.score(x2, m, valid)
    assert torch.allclose(padded.surprisal[:, :50], other.surprisal[:, :50], atol=1e-5)


def test_fill_keeps_kept_tokens_and_guesses_dropped(test_reconstructor, test_windows):
    x = test_windows["validation"][:2]
    m = _masks(x.shape, 0.3, seed=4)
    filled = test_reconstructor.fill(x, m).numpy()
    assert np.array_equal(filled[~m], x[~m])
    assert filled[m].max() < test_reconstructor.vocab_size and (filled[m] != test_reconstructor.mask_token_id).all()
    texts = test_reconstructor.fill_text(x, m)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)


def test_pretrained_beats_untrained(test_reconstructor, test_windows):
    untrained = Reconstructor.new(test_reconstructor.tokenizer, "test", device="cpu", seed=1)
    x = test_windows["validation"][:32]
    for rate in (0.2, 0.6):
        trained_bits = bits_per_masked_token(test_reconstructor, x, rate)
        untrained_bits = bits_per_masked_token(untrained, x, rate)
        assert trained_bits < untrained_bits - 1.0


def test_pretraining_resumes_from_checkpoint(fresh_reconstructor, test_windows, tmp_path):
    config = PretrainConfig(steps=3, batch_size=4, warmup_steps=1, eval_every=0, eval_windows=4, checkpoint_every=1)
    first = pretrain(fresh_reconstructor, test_windows["train"], test_windows["validation"], config, tmp_path / "ckpt", progress=False)
    assert first["resumed_from_step"] == 0
    assert (tmp_path / "ckpt" / "optimizer.pt").exists()
    config.steps = 5
    second = pretrain(fresh_reconstructor, test_windows["train"], test_windows["validation"], config, tmp_path / "ckpt", progress=False)
    assert second["resumed_from_step"] == 3
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 5


def test_pretraining_writes_tensorboard(fresh_reconstructor, test_windows, tmp_path):
    config = PretrainConfig(steps=2, batch_size=2, warmup_steps=1, eval_every=0, eval_windows=4, checkpoint_every=0)
    pretrain(
        fresh_reconstructor, test_windows["train"], test_windows["validation"], config, tensorboard_dir=tmp_path / "tb", progress=False
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "pretrain/loss_nats" in tags
    assert "pretrain/val_bits_per_masked_token@0.4" in tags


def test_random_masks_cover_the_rate_range():
    gen = torch.Generator().manual_seed(0)
    masks = random_masks((2000, 64), gen, 0.0, 0.8)
    rates = masks.float().mean(dim=1)
    assert 0.35 < float(rates.mean()) < 0.45
    assert float(rates.min()) < 0.05 and float(rates.max()) > 0.75


def test_local_gpt2_directory_without_mask_token_gets_one(test_reconstructor, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=test_reconstructor.tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    vocab = len(plain)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    model.save_pretrained(tmp_path / "gpt2like")
    plain.save_pretrained(tmp_path / "gpt2like")
    loaded = Reconstructor.from_pretrained(tmp_path / "gpt2like", device="cpu")
    assert loaded.tokenizer.mask_token_id is not None
    assert loaded.vocab_size >= len(loaded.tokenizer)
    result = loaded.score(np.array([[1, 2, 3, 4]]), np.array([[False, True, False, True]]))
    assert result.surprisal.shape == (1, 4)


def test_hub_name_offline_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = refuse_connections(monkeypatch)
    with pytest.raises(ReconstructorLoadError) as info:
        Reconstructor.from_pretrained("gpt2", device="cpu")
    assert "\n" not in str(info.value) and "tiny" in str(info.value)
    assert attempts == []  # offline means it fails at once: no connection is even tried (nothing to wait for)


def test_a_preset_not_built_is_a_clear_error_not_a_build(monkeypatch, tmp_path):
    """Loading only loads: an absent preset names the command that builds it, and nothing is trained."""
    import tokencompress_env.pretrain as pretrain_module

    monkeypatch.setenv("TOKENCOMPRESS_HOME", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(pretrain_module, "build_reconstructor", lambda *a, **k: pytest.fail("loading must not build"))
    with pytest.raises(ReconstructorLoadError) as info:
        Reconstructor.from_pretrained("tiny", device="cpu")
    message = str(info.value)
    assert "\n" not in message and "python -m experiments.pretrain_reconstructor --preset tiny" in message
    assert not (tmp_path / "empty_cache").exists()


def test_load_or_build_builds_a_missing_preset_once(monkeypatch, tmp_path, test_reconstructor_dir):
    import shutil

    from tokencompress_env import presets

    monkeypatch.setenv("TOKENCOMPRESS_HOME", str(tmp_path / "cache"))
    builds = []

    def fake_build(config, output_dir, device="auto", progress=True):
        builds.append((config.preset, str(output_dir)))
        shutil.copytree(test_reconstructor_dir, output_dir)

    monkeypatch.setattr(presets, "build_reconstructor", fake_build)
    assert not presets.is_built("test")
    first = presets.load_or_build("test", device="cpu", progress=False)
    second = presets.load_or_build("test", device="cpu", progress=False)
    assert builds == [("test", str(tmp_path / "cache" / "reconstructors" / "test"))]
    assert presets.is_built("test") and first.vocab_size == second.vocab_size
    assert Reconstructor.from_pretrained("test", device="cpu").vocab_size == first.vocab_size  # now it loads
    with pytest.raises(KeyError, match="unknown preset"):
        presets.ensure_preset("gpt2")


def test_missing_and_corrupt_directories(test_reconstructor_dir, tmp_path):
    with pytest.raises(ReconstructorLoadError, match="does not exist"):
        Reconstructor.from_pretrained(str(tmp_path / "missing" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReconstructorLoadError, match=r"config\.json"):
        Reconstructor.from_pretrained(tmp_path / "empty")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(test_reconstructor_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ReconstructorLoadError, match="corrupt"):
        Reconstructor.from_pretrained(broken)


def test_window_longer_than_context_is_rejected(test_reconstructor):
    too_long = np.zeros((1, test_reconstructor.max_seq_len + 1), dtype=np.int64)
    with pytest.raises(ValueError, match="context"):
        test_reconstructor.score(too_long, np.zeros_like(too_long, dtype=bool))


def test_device_auto_is_cpu_here():
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in {"cpu", "mps"}
    assert resolve_device("cpu") == torch.device("cpu")


# ---------------------------------------------------------------------------------------------- cheaper scoring
def _scored(rec, x, m, positions, chunk):
    """surprisal / prediction / correct of every position, from one forward pass or chunk by chunk."""
    if chunk is None:
        parts = [rec.score(x, m, positions=positions)]
    else:
        state = rec.begin_scoring(len(x))
        parts = [rec.score_chunk(state, x[:, s : s + chunk], m[:, s : s + chunk], positions=positions) for s in range(0, x.shape[1], chunk)]
    return {field: torch.cat([getattr(p, field) for p in parts], dim=1) for field in ("surprisal", "prediction", "correct")}


@pytest.mark.parametrize("chunk", [None, 16])
def test_masked_positions_only_match_all_positions_where_it_matters(test_reconstructor, test_windows, chunk):
    x = test_windows["validation"][:4]
    m = _masks(x.shape, 0.4, seed=6)
    m[0] = False  # a window with nothing dropped: the output layer runs nowhere in it
    every = _scored(test_reconstructor, x, m, "all", chunk)
    only = _scored(test_reconstructor, x, m, "masked", chunk)
    mt = torch.as_tensor(m)
    assert torch.allclose(only["surprisal"][mt], every["surprisal"][mt], atol=1e-4)
    assert torch.equal(only["prediction"][mt], every["prediction"][mt])
    assert torch.equal(only["correct"][mt], every["correct"][mt])
    assert float(only["surprisal"][~mt].abs().sum()) == 0.0  # kept tokens cost nothing ...
    assert torch.equal(only["prediction"][~mt], torch.as_tensor(x)[~mt])  # ... and are "recovered" as themselves
    assert bool(only["correct"][~mt].all())
    nothing = _scored(test_reconstructor, x, np.zeros_like(m), "masked", chunk)  # no dropped token in the whole batch
    assert float(nothing["surprisal"].abs().sum()) == 0.0 and torch.equal(nothing["prediction"], torch.as_tensor(x))


def test_model_whose_head_is_not_split_off_scores_the_same(test_reconstructor, test_windows):
    from transformers import GPTJConfig, GPTJForCausalLM

    tok = test_reconstructor.tokenizer
    config = GPTJConfig(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=128)
    torch.manual_seed(0)
    rec = Reconstructor(GPTJForCausalLM(config), tok, device="cpu")
    x = test_windows["validation"][:3]
    m = _masks(x.shape, 0.5, seed=8)
    with torch.no_grad():
        logits = rec.model(input_ids=rec.compressed_inputs(torch.as_tensor(x), torch.as_tensor(m))).logits
    logits[..., rec.mask_token_id] = -torch.inf
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.as_tensor(x), reduction="none") / np.log(2)
    for chunk in (None, 16):
        for positions in ("all", "masked"):
            got = _scored(rec, x, m, positions, chunk)["surprisal"]
            where = torch.ones_like(got, dtype=torch.bool) if positions == "all" else torch.as_tensor(m)
            assert torch.allclose(got[where], expected[where], atol=1e-3), (chunk, positions)


def test_resolve_scoring_dtype():
    assert resolve_scoring_dtype("float32") == torch.float32 and resolve_scoring_dtype(None) == torch.float32
    assert resolve_scoring_dtype("bfloat16") == torch.bfloat16 and resolve_scoring_dtype("float16") == torch.float16
    assert resolve_scoring_dtype("auto", "cpu") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert resolve_scoring_dtype("auto", "mps") == torch.float32
    with pytest.raises(ValueError, match="scoring dtype"):
        resolve_scoring_dtype("float8")


@pytest.mark.parametrize(
    ("available", "bf16", "expected"),
    [(True, True, torch.bfloat16), (True, False, torch.float32), (False, True, torch.float32)],
)
def test_auto_scoring_dtype_on_cuda_without_a_gpu(monkeypatch, available, bf16, expected):
    """``auto`` picks bfloat16 on a CUDA device that multiplies it natively, float32 on one that does not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert resolve_scoring_dtype("auto", "cuda") == expected
    assert resolve_scoring_dtype("auto", torch.device("cuda", 0)) == expected
    assert resolve_scoring_dtype("float32", "cuda") == torch.float32  # an explicit name is never overridden


def test_bfloat16_copy_follows_the_float32_master(fresh_reconstructor, test_windows):
    rec = fresh_reconstructor
    x = test_windows["validation"][:8]
    m = _masks(x.shape, 0.5, seed=7)
    assert rec.inference_model(None) is rec.model and rec.inference_model(torch.float32) is rec.model
    copy16 = rec.inference_model(torch.bfloat16)
    assert rec.inference_model(torch.bfloat16) is copy16  # cached while the master does not change
    assert next(copy16.parameters()).dtype == torch.bfloat16 and next(rec.model.parameters()).dtype == torch.float32
    before32, before16 = rec.score(x, m).surprisal, rec.score(x, m, dtype=torch.bfloat16).surprisal
    assert float((before16 - before32)[torch.as_tensor(m)].abs().mean()) < 0.05
    # One optimizer step on the master (as joint training does): the bfloat16 copy must follow.
    optimizer = torch.optim.AdamW(rec.model.parameters(), lr=1e-2)
    loss = rec.training_loss(torch.as_tensor(x), torch.as_tensor(m))
    loss.backward()
    optimizer.step()
    after32, after16 = rec.score(x, m).surprisal, rec.score(x, m, dtype=torch.bfloat16).surprisal
    assert float((after32 - before32).abs().max()) > 0.1  # the step changed the model
    assert float((after16 - after32)[torch.as_tensor(m)].abs().mean()) < 0.05
    assert rec.inference_model(torch.bfloat16) is copy16  # refreshed in place, not rebuilt
    for master, low in zip(rec.model.parameters(), copy16.parameters(), strict=True):
        assert torch.equal(master.detach().to(torch.bfloat16), low)
    restored = pickle.loads(pickle.dumps(rec))  # the copy is not pickled; it is rebuilt on demand
    assert restored._inference_copies == {}
    assert torch.equal(restored.score(x, m, dtype=torch.bfloat16).surprisal, after16)


def test_continuation_bits_left_padding_changes_nothing(test_reconstructor: Reconstructor, test_windows: dict) -> None:
    ids = test_windows["test"][:3, :40]
    continuation = ids[:, 30:]
    contexts = [ids[0, :30], ids[1, 12:30], np.zeros(0, dtype=np.int64)]
    batched = test_reconstructor.continuation_bits(contexts, continuation)
    assert batched.shape == (3, 10) and (batched > 0).all()
    for row in range(3):  # each row alone (no padding) gives the same bits
        alone = test_reconstructor.continuation_bits([contexts[row]], continuation[row : row + 1])
        assert torch.allclose(alone, batched[row : row + 1], atol=1e-4)
    # reading <bos> + context + continuation as one window: the same numbers as the scoring function
    whole = test_reconstructor.score(ids[:1], np.zeros((1, 40), dtype=bool)).surprisal[:, 30:]
    assert torch.allclose(whole, batched[:1], atol=1e-4)


def test_tanh_gelu_is_fused_when_scoring_and_unchanged_when_training(test_reconstructor, test_windows):
    from transformers.activations import NewGELUActivation

    from tokencompress_env.reconstructor import GradAwareTanhGelu

    acts = [m for m in test_reconstructor.model.modules() if isinstance(m, NewGELUActivation)]
    assert acts and all(type(m) is GradAwareTanhGelu for m in acts)  # every GPT-2 MLP of the master
    x = torch.linspace(-6, 6, 10_001)
    composite = NewGELUActivation()(x)
    act = acts[0]
    assert torch.equal(act(x), composite)  # gradients recorded: the composite, bit for bit
    y = x.clone().requires_grad_(True)
    act(y).sum().backward()
    z = x.clone().requires_grad_(True)
    NewGELUActivation()(z).sum().backward()
    assert torch.equal(y.grad, z.grad)  # and so are its gradients: training is unchanged
    with torch.no_grad():
        fused = act(x)
    assert torch.equal(fused, torch.nn.functional.gelu(x, approximate="tanh"))
    assert not torch.equal(fused, composite)  # the two round differently on this grid: the fused path was taken
    assert float((fused - composite).abs().max()) < 1e-5
    # Scoring (no gradients) with the fused activation stays within float rounding of the composite.
    ids = torch.as_tensor(test_windows["validation"][:8])
    m = torch.as_tensor(_masks(tuple(ids.shape), 0.4, seed=3))
    scored = test_reconstructor.score(ids, m).surprisal
    with torch.enable_grad():  # the composite path, as in training, without the no-grad fast path
        inputs = test_reconstructor.compressed_inputs(ids, m)
        logits = test_reconstructor.model(input_ids=inputs).logits.detach().float()
    logits[..., test_reconstructor.mask_token_id] = -torch.inf
    reference = (torch.logsumexp(logits, -1) - logits.gather(-1, ids[..., None]).squeeze(-1)) / np.log(2)
    assert torch.allclose(scored, reference, atol=1e-4)
    # The bfloat16 scoring copy inherits the activation and runs it fused too (one rounding in bfloat16).
    copy16 = test_reconstructor.inference_model(torch.bfloat16)
    assert all(type(m) is GradAwareTanhGelu for m in copy16.modules() if isinstance(m, NewGELUActivation))


def test_has_same_weights_tells_a_copy_from_a_fine_tuned_one(test_reconstructor, fresh_reconstructor):
    assert fresh_reconstructor.has_same_weights(test_reconstructor)
    with torch.no_grad():
        next(fresh_reconstructor.model.parameters()).view(-1)[0] += 1e-3
    assert not fresh_reconstructor.has_same_weights(test_reconstructor)
    assert not test_reconstructor.has_same_weights(fresh_reconstructor)
