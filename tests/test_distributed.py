"""Reconstructor training on two CPU processes with Hugging Face ``accelerate`` (gloo).

``accelerate launch --multi_gpu --num_processes 2`` starts the processes through ``torchrun``; the
project's :func:`~tokencompress_env.trainer.make_accelerator` puts them on the CPU with the gloo backend
(``--device cpu``). The tests check what multi-process training promises: the processes draw different
batches, their gradients are averaged so their weights stay equal, the loss falls, a resumed run continues
from its checkpoint, only the main process writes, and what it wrote loads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TEST_SEQ_LEN
from tokencompress_env.data import CorpusSpec, prepare_corpus, window_array
from tokencompress_env.pretrain import PretrainConfig, pretrain
from tokencompress_env.reconstructor import Reconstructor

ROOT = Path(__file__).resolve().parent.parent


def _gloo_available() -> bool:
    try:
        import accelerate  # noqa: F401
        import torch.distributed as dist
    except ImportError:
        return False
    return bool(dist.is_available() and dist.is_gloo_available())


pytestmark = pytest.mark.skipif(not _gloo_available(), reason="needs accelerate and torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    """Run ``accelerate launch`` with two CPU processes on this machine.

    :param args: what follows ``accelerate launch <options>`` (``-m module ...`` or a script)
    :param home: the tokencompress cache of the run
    :return: the finished process
    """
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        *args,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TOKENCOMPRESS_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_pretraining_on_two_processes_resumes_syncs_and_saves(tmp_path, test_reconstructor):
    home, output = tmp_path / "home", tmp_path / "recon"
    # An interrupted build: a fresh model trained 3 steps in one process, checkpointed where the build resumes.
    fresh = Reconstructor.new(test_reconstructor.tokenizer, "test", device="cpu", seed=0)
    windows = prepare_corpus(CorpusSpec(seq_len=TEST_SEQ_LEN), fresh.tokenizer, cache_dir=home / "corpora")
    train, val = window_array(windows["train"]), window_array(windows["validation"])
    common = {"batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 0, "eval_windows": 8}
    pretrain(
        fresh,
        train,
        val,
        PretrainConfig(steps=3, **common),
        checkpoint_dir=output.with_name("recon.partial") / "checkpoint",
        progress=False,
    )

    result = _launch(
        [
            "-m",
            "experiments.pretrain_reconstructor",
            "--preset",
            "test",
            "--vocab_size",
            "512",
            "--seq_len",
            str(TEST_SEQ_LEN),
            "--steps",
            "12",
            "--batch_size",
            "8",
            "--lr",
            "3e-3",
            "--warmup_steps",
            "2",
            "--eval_every",
            "0",
            "--checkpoint_every",
            "4",
            "--device",
            "cpu",
            "--tensorboard_log",
            "none",
            "--progress_bar",
            "false",
            "--output_dir",
            str(output),
        ],
        home,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads(result.stdout[result.stdout.index("{") :])  # printed by the main process only
    assert result.stdout.count('"output_dir"') == 1
    assert report["processes"] == 2 and report["resumed_from_step"] == 3
    first, second = report["batch_fingerprints"]
    assert first != second  # each process drew its own batches
    assert len(set(report["weights_fingerprints"])) == 1  # averaged gradients: the two copies stayed equal
    assert report["train_loss_nats"]["last"] < report["train_loss_nats"]["first"]
    assert not output.with_name("recon.partial").exists() and not list(tmp_path.glob("recon.tmp-*"))
    loaded = Reconstructor.from_pretrained(output, device="cpu")
    assert loaded.tokenizer.get_vocab() == test_reconstructor.tokenizer.get_vocab()  # the checkpoint's, resumed
    bits = loaded.score(val[:4], np.ones(val[:4].shape, dtype=bool)).surprisal
    assert np.isfinite(bits.numpy()).all()
    info = json.loads((output / "tokencompress.json").read_text())
    assert info["steps"] == 12 and info["processes"] == 2


JOINT_STEP = r"""
import json, sys
import numpy as np
from callbacks.joint_training import ReconstructorFinetuneCallback
from tokencompress_env.pretrain import weights_fingerprint
from tokencompress_env.reconstructor import Reconstructor
from tokencompress_env.trainer import ReconstructorTrainer, end_processes, gather_objects, make_accelerator

accelerator = make_accelerator("cpu")
reconstructor = Reconstructor.from_pretrained(sys.argv[1], device=accelerator.device)
trainer = ReconstructorTrainer(reconstructor, learning_rate=1e-3, accelerator=accelerator)
rank = accelerator.process_index
finetune = ReconstructorFinetuneCallback(trainer, gradient_steps=2, batch_size=4, gradient_accumulation=2, seed=rank)
rng = np.random.default_rng(rank)  # each process fine-tunes on its own agent's masks
ids = rng.integers(0, 500, size=(8, 32))
mask = rng.random(ids.shape) < 0.4
loss = finetune.finetune(ids, mask, np.ones(ids.shape, dtype=bool))
weights = gather_objects(weights_fingerprint(reconstructor.model), accelerator)
losses = gather_objects(loss, accelerator)
if accelerator.is_main_process:
    print(json.dumps({"weights": weights, "losses": losses, "rounds": trainer.rounds, "steps": trainer.steps}))
del finetune, trainer, reconstructor  # the distributed model holds the process group
end_processes(accelerator)
"""


def test_joint_finetuning_step_on_two_processes(tmp_path, test_reconstructor_dir):
    script = tmp_path / "joint_step.py"
    script.write_text(JOINT_STEP)
    result = _launch([str(script), str(test_reconstructor_dir)], tmp_path / "home")
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["rounds"] == 1 and report["steps"] == 2
    assert report["losses"][0] != report["losses"][1]  # different data in each process
    assert len(set(report["weights"])) == 1  # ...and the same weights after the synchronised steps
