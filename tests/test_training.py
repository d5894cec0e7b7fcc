"""Joint training: the train_ppo script, the fine-tuning callback, metrics and checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.artifact import load_policy_artifact
from callbacks.joint_training import ReconstructorFinetuneCallback, masks_from_rollout
from experiments.train_ppo import TrainConfig, train
from tokencompress_env.errors import ConfigError
from tokencompress_env.observation import build_observation
from tokencompress_env.reconstructor import resolve_scoring_dtype
from tokencompress_env.trainer import ReconstructorTrainer

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "experiments" / "configs" / "dev" / "debug.json"


def _run_train(args: list[str], tc_home: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKENCOMPRESS_HOME": str(tc_home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.train_ppo", "--config", str(DEBUG), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events_dir in sorted({p.parent for p in tb_dir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events_dir))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


# TRPO's conjugate-gradient step (double backward through the policy) costs seconds per rollout on
# CPU, so it gets a single rollout (debug.json: 4 envs x 16 steps = 64 steps).
SMOKE_RUNS = [("ppo", 128), ("a2c", 128), ("maskable_ppo", 128), ("recurrent_ppo", 128), ("trpo", 64), ("token_ppo", 128)]


@pytest.mark.parametrize(("algo", "steps"), SMOKE_RUNS)
def test_train_ppo_smoke_subprocess(algo, steps, tmp_path, tc_home, test_reconstructor_dir):
    result = _run_train(["--algo", algo, "--runs_dir", str(tmp_path), "--total_timesteps", str(steps)], tc_home)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["num_timesteps"] >= steps
    run = tmp_path / "debug"
    for name in (
        "config.json",
        "agent.zip",
        "policy.safetensors",
        "policy.json",
        "reconstructor/model.safetensors",
        "reference_reconstructor/model.safetensors",
    ):
        assert (run / name).exists(), name
    assert json.loads((run / "config.json").read_text())["algo"] == algo
    assert load_policy_artifact(run).algo == algo  # every algorithm's policy rebuilds from the safe artifact


def test_unknown_config_key_is_rejected_with_suggestion(tmp_path, tc_home):
    result = _run_train(["--runs_dir", str(tmp_path), "--total_timestep", "10"], tc_home, timeout=120)
    assert result.returncode == 2
    assert "total_timesteps" in result.stderr and "Traceback" not in result.stderr


def test_metrics_checkpoints_and_resume(tmp_path, test_reconstructor_dir):
    base = json.loads(DEBUG.read_text())
    base = {k: v for k, v in base.items() if not k.startswith("_")}
    config = TrainConfig(**{**base, "runs_dir": str(tmp_path), "total_timesteps": 128, "save_freq": 64})
    first = train(config)
    run = Path(first["run_dir"])
    state = json.loads((run / "checkpoints" / "latest" / "state.json").read_text())
    assert state["num_timesteps"] == first["num_timesteps"] >= 128
    scalars = _scalars(run / "tb")
    for tag in (
        "compression/achieved_mask_rate",
        "compression/target_mask_rate",
        "compression/bits_per_masked_token",
        "compression/recovery_accuracy",
        "reward/tokens",
        "reward/rate",
        "joint/reconstructor_loss",
        "system/rss_mb",
        "train/entropy_loss",
    ):
        assert tag in scalars, tag
    assert 0.0 < first["last_rollout"]["compression/achieved_mask_rate"] < 1.0
    assert first["scoring_dtype"] == str(resolve_scoring_dtype("auto", "cpu")).removeprefix("torch.")  # no GPU in the test runs
    achieved = [v for _, v in scalars["compression/achieved_mask_rate"]]
    assert all(0.0 < v < 1.0 for v in achieved)

    resumed = train(TrainConfig(**{**base, "runs_dir": str(tmp_path), "total_timesteps": 256, "save_freq": 64, "resume": True}))
    assert resumed["num_timesteps"] >= 256
    steps = [s for s, _ in _scalars(run / "tb")["train/entropy_loss"]]
    assert max(steps) > first["num_timesteps"]
    assert [p.name for p in (run / "tb").iterdir() if p.name.startswith("train")] == ["train_1"]  # the same run continued


def test_existing_run_needs_resume(tmp_path, test_reconstructor_dir):
    from tokencompress_env.errors import TokenCompressError

    base = {k: v for k, v in json.loads(DEBUG.read_text()).items() if not k.startswith("_")}
    train(TrainConfig(**{**base, "runs_dir": str(tmp_path), "total_timesteps": 64}))
    with pytest.raises(TokenCompressError, match="--resume"):
        train(TrainConfig(**{**base, "runs_dir": str(tmp_path), "total_timesteps": 64}))


def test_masks_from_rollout_rebuilds_final_masks():
    n_steps, n_envs, seq_len, chunk = 4, 2, 8, 4
    token_ids = np.tile(np.arange(seq_len, dtype=np.float32), (n_steps, n_envs, 1))
    decisions = np.zeros((n_steps, n_envs, seq_len), dtype=np.float32)
    position = np.zeros((n_steps, n_envs, 1), dtype=np.float32)
    position[1::2] = 4  # steps 1 and 3 are the last chunk of an episode
    decisions[1::2, :, :4] = [2, 1, 2, 1]
    actions = np.ones((n_steps, n_envs, chunk), dtype=np.float32)
    valid = np.ones_like(decisions)
    valid[:, :, -1] = 0
    force_keep = np.zeros_like(decisions)
    force_keep[:, :, 5] = 1
    obs = {"token_ids": token_ids, "decisions": decisions, "position": position, "valid": valid, "force_keep": force_keep}
    ids, mask, valid_out = masks_from_rollout(obs, actions)
    assert ids.shape == (4, seq_len)
    assert mask[0].tolist() == [True, False, True, False, True, False, True, False]
    assert not valid_out[0, -1]


def test_finetune_changes_weights_and_leaves_eval_mode(fresh_reconstructor, test_windows):
    trainer = ReconstructorTrainer(fresh_reconstructor, learning_rate=1e-3)
    callback = ReconstructorFinetuneCallback(trainer, gradient_steps=2, batch_size=4)
    before = [p.detach().clone() for p in fresh_reconstructor.model.parameters()]
    ids = test_windows["train"][:8]
    mask = np.zeros(ids.shape, dtype=bool)
    mask[:, ::3] = True
    loss = callback.finetune(ids, mask, np.ones(ids.shape, dtype=bool))
    assert np.isfinite(loss)
    assert not fresh_reconstructor.model.training
    changed = [not torch.equal(a, b) for a, b in zip(before, fresh_reconstructor.model.parameters())]
    assert any(changed)
    assert callback.rounds == 1 == trainer.rounds and trainer.steps == 2 and callback.last_loss == trainer.last_loss == loss


def test_checkpoint_and_finetune_callbacks_share_the_trainer_not_each_other(fresh_reconstructor, test_windows, tmp_path, monkeypatch):
    """The checkpoint saves the trainer's optimizer and rounds; restoring them into a new trainer resumes both."""
    import inspect

    from callbacks.checkpoint import JointCheckpointCallback, load_reconstructor_optimizer, save_run_artifacts

    assert "finetune" not in inspect.signature(JointCheckpointCallback).parameters
    trainer = ReconstructorTrainer(fresh_reconstructor, learning_rate=1e-3)
    callback = ReconstructorFinetuneCallback(trainer, gradient_steps=2, batch_size=4)
    ids = test_windows["train"][:8]
    callback.finetune(ids, np.zeros(ids.shape, dtype=bool), np.ones(ids.shape, dtype=bool))

    class Agent:  # what save_run_artifacts needs of an SB3 model, without training one
        num_timesteps = 0

        def save(self, path):
            Path(path).write_bytes(b"agent")

    folder = tmp_path / "latest"
    import callbacks.checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "save_policy_artifact", lambda *args, **kwargs: None)
    save_run_artifacts(folder, Agent(), fresh_reconstructor, trainer, {"algo": "ppo"})  # type: ignore[arg-type]
    restored = ReconstructorTrainer(fresh_reconstructor, learning_rate=1e-3)
    load_reconstructor_optimizer(restored, folder)
    assert restored.rounds == 1
    saved, loaded = trainer.optimizer.state_dict(), restored.optimizer.state_dict()
    assert saved["state"].keys() == loaded["state"].keys() and len(saved["state"]) > 0
    for key, value in saved["state"].items():
        assert (
            torch.equal(value["exp_avg"], loaded["state"][key]["exp_avg"]) and int(value["step"]) == int(loaded["state"][key]["step"]) == 2
        )


def test_train_ppo_refuses_several_processes(tmp_path, monkeypatch):
    """Under 'accelerate launch --num_processes 2' each process would train its own agent into one run folder."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    base = {k: v for k, v in json.loads(DEBUG.read_text()).items() if not k.startswith("_")}
    with pytest.raises(Exception, match="train_ppo runs as one process, but 2 were launched"):
        train(TrainConfig(**{**base, "runs_dir": str(tmp_path), "tensorboard": False, "device": "cpu"}))
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_distillation_only_run(tmp_path, test_reconstructor_dir):
    """total_timesteps 0: the warm start alone, saved as a finished run (the ablation's distill_only variant)."""
    base = {k: v for k, v in json.loads(DEBUG.read_text()).items() if not k.startswith("_")}
    config = TrainConfig(
        **{**base, "runs_dir": str(tmp_path), "total_timesteps": 0, "distill_steps": 3, "tensorboard": False, "device": "cpu"}
    )
    summary = train(config)
    assert summary["num_timesteps"] == 0 and summary["finetune_rounds"] == 0
    assert summary["distillation"]["first_loss"] > 0
    assert (tmp_path / "debug" / "agent.zip").exists()
    with pytest.raises(Exception, match="total_timesteps must be 0"):
        TrainConfig(**{**base, "total_timesteps": -1}).validate()


def test_distillation_learning_rate_and_update_options(tmp_path, test_reconstructor_dir, monkeypatch):
    """distill_lr_schedule and distill_updates_per_batch reach the distillation, which decays the learning rate and
    updates the policy that many times per labelled batch; bad values are refused."""
    import experiments.train_ppo as train_ppo

    rates: list[float] = []
    updates: list[int] = []
    real_distill = train_ppo.distill_policy

    def spying_distill(*args, callback=None, **kwargs):
        def spy(done, optimizer):
            rates.append(optimizer.param_groups[0]["lr"])
            updates.append(int(next(iter(optimizer.state.values()))["step"]))  # Adam's update count
            return callback(done, optimizer)

        assert kwargs["lr_schedule"] == "linear" and kwargs["updates_per_batch"] == 2
        return real_distill(*args, callback=spy, **kwargs)

    monkeypatch.setattr(train_ppo, "distill_policy", spying_distill)
    base = {k: v for k, v in json.loads(DEBUG.read_text()).items() if not k.startswith("_")}
    values = {"runs_dir": str(tmp_path), "total_timesteps": 0, "distill_steps": 4, "tensorboard": False, "device": "cpu"}
    options = {"distill_lr_schedule": "linear", "distill_lr": 1e-3, "distill_updates_per_batch": 2}
    train(TrainConfig(**{**base, **values, **options}))
    assert rates == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])
    assert updates == [2, 4, 6, 8]
    saved = json.loads((tmp_path / "debug" / "config.json").read_text())
    assert saved["distill_lr_schedule"] == "linear" and saved["distill_updates_per_batch"] == 2
    with pytest.raises(ConfigError, match="distill_lr_schedule must be one of"):
        TrainConfig(**{**base, "distill_lr_schedule": "step"}).validate()
    with pytest.raises(ConfigError, match="distill_updates_per_batch"):
        TrainConfig(**{**base, "distill_updates_per_batch": 0}).validate()


def test_rate_calibrated_run_from_a_distilled_policy(tmp_path, test_reconstructor_dir):
    """PPO from a distilled policy with rate-calibrated logits: the same ranking at the start, the option saved."""
    base = {k: v for k, v in json.loads(DEBUG.read_text()).items() if not k.startswith("_")}
    common = {**base, "runs_dir": str(tmp_path), "tensorboard": False, "device": "cpu"}
    train(TrainConfig(**{**common, "run_name": "distilled", "total_timesteps": 0, "distill_steps": 3, "distill_target": "cost"}))
    source = load_policy_artifact(tmp_path / "distilled")
    values = {
        "run_name": "calibrated",
        "distill_steps": 0,
        "total_timesteps": 0,
        "rate_calibrated": True,
        "init_policy": str(tmp_path / "distilled"),
    }
    train(TrainConfig(**{**common, **values}))
    start = load_policy_artifact(tmp_path / "calibrated")
    assert start.policy.rate_calibrated and not source.policy.rate_calibrated
    assert json.loads((tmp_path / "calibrated" / "config.json").read_text())["rate_calibrated"] is True
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(0, 500, size=(3, base["seq_len"])))
    real, keep = torch.ones(ids.shape, dtype=torch.bool), torch.zeros(ids.shape, dtype=torch.bool)
    rates = torch.tensor([0.2, 0.5, 0.8])
    with torch.no_grad():
        before = source.policy.inference_mask_logits(ids, real, keep, rates)
        after = start.policy.inference_mask_logits(ids, real, keep, rates)
    assert torch.equal(before.argsort(dim=1, stable=True), after.argsort(dim=1, stable=True))
    assert torch.allclose(torch.sigmoid(after).sum(dim=1), rates * base["seq_len"], atol=1e-3)
    summary = train(TrainConfig(**{**common, **values, "run_name": "calibrated_ppo", "total_timesteps": 64}))
    assert summary["num_timesteps"] >= 64 and load_policy_artifact(tmp_path / "calibrated_ppo").policy.rate_calibrated
    # init_logit_scale: every logit of the distilled policy scaled, so the same order, sampled more sharply
    scaled = {**values, "run_name": "scaled", "rate_calibrated": False, "init_logit_scale": 3.0}
    train(TrainConfig(**{**common, **scaled}))
    with torch.no_grad():
        sharper = load_policy_artifact(tmp_path / "scaled").policy.inference_mask_logits(ids, real, keep, rates)
    assert torch.allclose(sharper, 3.0 * before, atol=1e-5)
    with pytest.raises(Exception, match="init_logit_scale must be positive"):
        TrainConfig(**{**common, "init_logit_scale": 0.0}).validate()


def test_policy_architecture_options_reach_the_saved_policy(tmp_path, test_reconstructor_dir):
    """separable_conv, conv_kernel_size, conv_dilations and activation_fn build the policy that is saved and reloaded."""
    base = {k: v for k, v in json.loads(DEBUG.read_text()).items() if not k.startswith("_")}
    common = {**base, "runs_dir": str(tmp_path), "tensorboard": False, "device": "cpu", "total_timesteps": 0, "distill_steps": 2}
    fast = {"separable_conv": True, "conv_kernel_size": 3, "conv_dilations": [1, 2], "activation_fn": "relu", "embed_kernel_size": 3}
    train(TrainConfig(**{**common, **fast}))
    policy = load_policy_artifact(tmp_path / "debug").policy
    blocks = list(policy.pi_features_extractor.blocks)
    assert [(b.separable, b.kernel_size, b.dilation) for b in blocks] == [(True, 3, 1), (True, 3, 2)]
    assert isinstance(policy.mlp_extractor.policy_net[1], torch.nn.ReLU) and policy.pi_features_extractor.embed_kernel_size == 3
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, 500, size=(2, base["seq_len"])))
    real, keep = torch.ones(ids.shape, dtype=torch.bool), torch.zeros(ids.shape, dtype=torch.bool)
    rates = torch.tensor([0.3, 0.6])
    obs = build_observation(ids.numpy(), real.numpy(), keep.numpy(), rates.numpy())
    with torch.no_grad():
        inference = policy.inference_mask_logits(ids, real, keep, rates)
        reference = policy.token_mask_logits({k: torch.as_tensor(v) for k, v in obs.items()})
    assert torch.equal(inference, reference)
    for bad, message in (
        ({"activation_fn": "swish"}, "activation_fn must be one of"),
        ({"conv_kernel_size": 4}, "conv_kernel_size must be odd"),
        ({"conv_dilations": []}, "conv_dilations positive and not empty"),
        ({"embed_kernel_size": 2}, "embed_kernel_size must be odd"),
    ):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**{**common, **bad}).validate()


def test_run_leaves_reference_unchanged_and_no_sb3_temp_folder(tmp_path, test_reconstructor_dir, monkeypatch):
    """A joint run changes its reconstructor, never the reference; without TensorBoard it writes nothing to /tmp."""
    from safetensors.torch import load_file

    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))  # where SB3's configure(None, ...) would put SB3-<date>/
    monkeypatch.delenv("SB3_LOGDIR", raising=False)
    source = load_file(str(test_reconstructor_dir / "model.safetensors"))
    base = {k: v for k, v in json.loads(DEBUG.read_text()).items() if not k.startswith("_")}
    values = {"runs_dir": str(tmp_path / "runs"), "reconstructor": str(test_reconstructor_dir), "total_timesteps": 64}
    summary = train(TrainConfig(**{**base, **values, "tensorboard": False, "device": "cpu"}))
    assert summary["finetune_rounds"] >= 1
    run = Path(summary["run_dir"])
    reference = load_file(str(run / "reference_reconstructor" / "model.safetensors"))
    joint = load_file(str(run / "reconstructor" / "model.safetensors"))
    assert reference.keys() == source.keys() and all(torch.equal(reference[k], source[k]) for k in source)
    assert any(not torch.equal(joint[k], source[k]) for k in source)  # the run did train its own copy
    assert load_file(str(test_reconstructor_dir / "model.safetensors")).keys() == source.keys()
    assert all(torch.equal(load_file(str(test_reconstructor_dir / "model.safetensors"))[k], v) for k, v in source.items())
    assert not list(system_tmp.glob("SB3-*")) and not (run / "tb").exists()
