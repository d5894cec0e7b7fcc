"""The run folder module: layout, atomic publication, what a finished run is, the one loader of agent.zip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tokencompress_env import run_folder
from tokencompress_env.errors import CheckpointError
from tokencompress_env.run_folder import (
    AGENT_ZIP,
    RESULT_FILES,
    STATE,
    file_sha256,
    has_checkpoint,
    is_finished_run,
    latest_checkpoint,
    publish_folder,
    publish_run_result,
    recover_folder,
    run_dir_of,
    temp_folder,
    verify_agent_zip,
)


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / STATE).write_text(text)
    return path


def test_layout_names_the_files_a_run_has_always_had(tmp_path: Path) -> None:
    """Existing run folders keep loading: the names are the ones earlier versions wrote."""
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "latest"
    assert run_dir_of(tmp_path / "checkpoints" / "latest") == tmp_path and run_dir_of(tmp_path) == tmp_path
    assert set(RESULT_FILES) == {
        "policy.safetensors",
        "policy.json",
        "agent.zip",
        "reconstructor",
        "reconstructor_optimizer.pt",
        "state.json",
    }
    assert RESULT_FILES[-1] == AGENT_ZIP  # moved last: it marks a finished run
    assert (run_folder.CONFIG, run_folder.REFERENCE_RECONSTRUCTOR, run_folder.TENSORBOARD) == (
        "config.json",
        "reference_reconstructor",
        "tb",
    )


def test_publish_folder_replaces_whole_and_recovers_an_interrupted_swap(tmp_path: Path) -> None:
    target = tmp_path / "out" / "latest"
    tmp = temp_folder(target)
    assert tmp.is_dir() and not any(tmp.iterdir()) and tmp.parent == target.parent
    _folder(tmp, "one")
    (tmp / "extra").write_text("only in the first")
    publish_folder(tmp, target)
    assert (target / STATE).read_text() == "one" and not tmp.exists()
    publish_folder(_folder(temp_folder(target), "two"), target)
    assert (target / STATE).read_text() == "two" and not (target / "extra").exists()  # replaced as a whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["latest"]

    # a process killed between its two renames: the previous folder is in .old, the new one in .tmp-<pid>
    os.replace(target, target.with_name("latest.old"))
    _folder(target.with_name("latest.tmp-12345"), "half")
    recover_folder(target)
    assert (target / STATE).read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["latest"]


def test_publish_run_result_moves_agent_zip_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = latest_checkpoint(tmp_path / "run")
    for name in RESULT_FILES:
        if name == "reconstructor":
            _folder(checkpoint / name, "weights")
        else:
            checkpoint.mkdir(parents=True, exist_ok=True)
            (checkpoint / name).write_text(name)
    (checkpoint / "config.json").write_text("{}")
    run = tmp_path / "run"
    assert has_checkpoint(run) and not is_finished_run(run)
    moved: list[str] = []
    rename = Path.rename

    def spy(self: Path, target: Path) -> Path:
        moved.append(Path(target).name)
        assert not is_finished_run(run) or Path(target).name == AGENT_ZIP  # nothing moves after agent.zip
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", spy)
    publish_run_result(checkpoint, run)
    assert moved == list(RESULT_FILES) and is_finished_run(run)
    assert not (run / "config.json").exists() and not (run / run_folder.RESULT_STAGING).exists()  # the run's own config is not touched
    assert (checkpoint / AGENT_ZIP).exists()  # a copy: the checkpoint stays complete


def test_verify_agent_zip_needs_the_recorded_hash(tmp_path: Path) -> None:
    agent = tmp_path / AGENT_ZIP
    agent.write_bytes(b"pretend pickle")
    with pytest.raises(CheckpointError, match="records no SHA-256"):
        verify_agent_zip(agent)
    (tmp_path / STATE).write_text(json.dumps({"agent_sha256": file_sha256(agent)}))
    verify_agent_zip(agent)
    agent.write_bytes(b"another pickle")
    with pytest.raises(CheckpointError, match="is not the file this run wrote"):
        verify_agent_zip(agent)
    verify_agent_zip(agent, trust_pickle=True)
