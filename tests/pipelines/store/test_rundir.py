"""The run directory (pipelines.store.rundir) as files: one owner at a time, checkpoints
of another run refused, metrics of steps to be trained again forgotten, JSON written
whole, and a full or forbidden disk named with its path. Whole runs over it:
tests/pipelines/cluster/test_lifecycle.py and tests/pipelines/test_cli.py."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

from pipelines.store import rundir
from pipelines.store.rundir import (
    RunDir,
    RunDirRefused,
    check_run_lock,
    default_run_dir,
    disk_error,
    write_json_atomic,
)


def test_a_run_dir_has_one_owner_until_it_is_closed(tmp_path):
    first = RunDir(tmp_path / "run")
    with pytest.raises(RunDirRefused) as refused:
        RunDir(tmp_path / "run")
    assert str(refused.value) == (
        f"{tmp_path / 'run'} is in use by another run (pid {os.getpid()}); wait for it to "
        "end or choose another --run-dir"
    )
    check_run_lock(tmp_path / "run", first.lock_fd)  # the owner's descriptor: granted
    with open(tmp_path / "other", "w") as other, pytest.raises(RunDirRefused):
        check_run_lock(tmp_path / "run", other.fileno())
    first.close()
    RunDir(tmp_path / "run").close()


def test_a_dir_with_checkpoints_is_refused_unless_the_run_resumes_from_it(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step-00000004").mkdir(parents=True)
    with pytest.raises(RunDirRefused, match=r"already holds checkpoints .*--resume "):
        RunDir(tmp_path / "run")
    RunDir(tmp_path / "run", resume=tmp_path / "run").close()
    RunDir(tmp_path / "run", resume=tmp_path / "run" / "checkpoints").close()


def test_steps_after_a_resumed_checkpoint_are_forgotten_and_logged_once(tmp_path):
    run = RunDir(tmp_path)
    for step in (1, 2, 3):
        run.log_step({"step": step, "loss": float(step)})
    run.forget_steps_after(1)
    run.log_step({"step": 2, "loss": np.float32(0.5)})
    run.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 0.5},
    ]


def test_json_is_written_whole_with_nan_as_null(tmp_path):
    write_json_atomic(tmp_path / "summary.json", {"loss": float("nan"), "n": np.int64(3)})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"loss": None, "n": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left


def test_a_disk_error_is_named_with_its_path_and_others_are_not_the_worlds():
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")
    assert disk_error(full) == "/runs/x/metrics.jsonl: No space left on device (ENOSPC)"
    unnamed = OSError(errno.EROFS, "Read-only file system")
    assert disk_error(unnamed, "/runs/x") == "/runs/x: Read-only file system (EROFS)"
    assert disk_error(OSError(errno.ENOENT, "gone", "/x")) is None
    assert disk_error(ValueError("no")) is None


def test_a_default_run_dir_never_names_one_that_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "strftime", lambda _: "20261207-150000")  # one second
    first = default_run_dir("char_lm", tmp_path)
    assert first == tmp_path / "char_lm-20261207-150000"
    first.mkdir()
    assert default_run_dir("char_lm", tmp_path) == tmp_path / "char_lm-20261207-150000-1"
