"""Errors of the world -- a full disk, a read-only run dir, a failure that a restore
replays into -- end a run fast, in one line, exit 3, naming the last good checkpoint.
Real CLI, real tmpfs mounts (root), every wait bounded; nothing asserts on speed."""

from __future__ import annotations

import os
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from .cluster_util import SMALL
from .test_lifecycle import DEADLINE, start, wait_for_steps

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root only)")

FAILED = "zerotrain run: training failed: "


@contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        (path / "run").mkdir()
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def finish(proc: subprocess.Popen) -> list[str]:
    """Its stderr lines, once it exited (within the deadline)."""
    try:
        _, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail(f"the run did not end within {DEADLINE}s")
    assert "Traceback" not in err, err[-3000:]
    return err.splitlines()


@needs_root
@pytest.mark.parametrize("ranks", ["1", "2"])
def test_a_full_disk_ends_the_run_in_one_line_naming_the_path_and_enospc(tmp_path, ranks):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        run_dir = disk / "run"
        args = [*SMALL, "--ranks", ranks, "--set", "model.hidden=[512,512]"]
        proc, _ = start(run_dir, *args, "--steps", "400")
        lines = finish(proc)
    assert proc.returncode == 3, lines
    pattern = (
        rf"{re.escape(FAILED + str(run_dir))}(/\S+)?: No space left on device \(ENOSPC\); "
        r"last good checkpoint: none written yet"
    )
    assert re.fullmatch(pattern, lines[-1]), lines[-1]
    assert not any("restart" in line for line in lines), lines


@needs_root
def test_a_disk_filling_mid_run_ends_it_naming_the_last_good_checkpoint(tmp_path):
    from pipelines.store import checkpoint as ckpt_mod

    with tmpfs(tmp_path / "disk", "30m") as disk:
        run_dir = disk / "run"
        # retried without end before: a restore replays into the full disk again
        args = ["--set", "cluster.max_restarts=1000", "--set", "checkpoint.every=5"]
        proc, _ = start(run_dir, *SMALL, "--ranks", "2", "--steps", "100000", *args)
        wait_for_steps(proc, run_dir, 12)
        deadline = time.monotonic() + DEADLINE
        while ckpt_mod.latest_valid(run_dir / "checkpoints").path is None:
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.05)
        with open(disk / "filler", "wb") as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        lines = finish(proc)
        last = ckpt_mod.latest_valid(run_dir / "checkpoints").path
    assert proc.returncode == 3, lines
    # the path is the file that failed, or the run dir when a write() names none
    pattern = (
        rf"{re.escape(FAILED + str(run_dir))}(/\S+)?: No space left on device \(ENOSPC\); "
        rf"last good checkpoint: {re.escape(str(last))}"
    )
    assert re.fullmatch(pattern, lines[-1]), lines[-1]


@needs_root
@pytest.mark.parametrize("ranks", ["1", "2"])
def test_a_read_only_run_dir_fails_in_one_line_and_the_handler_does_not_fail_on_it(tmp_path, ranks):
    with tmpfs(tmp_path / "disk", "1m", read_only=True) as disk:
        for run_dir, path in ((disk / "run", disk / "run/.lock"), (disk / "new", disk / "new")):
            proc, _ = start(run_dir, *SMALL, "--ranks", ranks)
            lines = finish(proc)
            assert proc.returncode == 3, lines
            assert lines == [
                f"{FAILED}{path}: Read-only file system (EROFS); last good checkpoint: "
                "none written yet"
            ]


TRANSFORM = """
from pipelines.hooks import transform

@transform
def explode(ctx):
    if ctx.step == 12:
        raise RuntimeError("the same failure at step 12, every time")
"""


def fail_at_step_12(tmp_path, *options) -> tuple[Path, list[str]]:
    """A 2-rank run whose transform hook raises the same error at step 12 every time:
    its run dir and output lines (it must have failed, exit 3)."""
    hook = tmp_path / "explode.py"
    hook.write_text(TRANSFORM)
    run_dir = tmp_path / "run"
    proc, _ = start(run_dir, *SMALL, "--ranks", "2", *options, "--hook", str(hook))
    lines = finish(proc)
    assert proc.returncode == 3, lines
    return run_dir, lines


def assert_failed_at_step_12(lines: list[str], run_dir: Path, why: str) -> None:
    """The last line is the run's failure: `why` (a regex) then the hook's error, and a
    checkpoint of step 5 or 10 (step 10's may still be in writing when step 12 fails)."""
    pattern = (
        rf"{re.escape(FAILED)}{why}.*the same failure at step 12, every time.*\); last good "
        rf"checkpoint: {re.escape(str(run_dir))}/checkpoints/step-000000(05|10)"
    )
    assert re.fullmatch(pattern, lines[-1]), lines[-1]


def test_the_same_error_at_the_same_step_after_a_restore_ends_the_run(tmp_path):
    # without the rule a generous restart intensity retried it without end
    run_dir, lines = fail_at_step_12(tmp_path, "--set", "cluster.max_restarts=1000")
    why = r"rank [01] failed again at step 11 with the same error after a restore \("
    assert_failed_at_step_12(lines, run_dir, why)
    # a restore or two (which rank fails first, and so with which error, is a race)
    assert sum("resuming at step" in line for line in lines) <= 2, lines


def test_max_total_restarts_is_a_budget_for_the_whole_run(tmp_path):
    run_dir, lines = fail_at_step_12(tmp_path, "--set", "cluster.max_total_restarts=0")
    why = r"1 rank crashes exceed cluster.max_total_restarts 0 \(last: rank [01], "
    assert_failed_at_step_12(lines, run_dir, why)


ONCE = """
from pathlib import Path

from pipelines.hooks import transform

@transform
def flaky(ctx):
    # rank 1 fails once at step 12 and once at step 14, each time with another error
    if ctx.rank == 1 and ctx.step in (12, 14):
        seen = Path({marks!r}) / f"failed-at-{{ctx.step}}"
        if not seen.exists():
            seen.touch()
            raise RuntimeError(f"a passing failure at step {{ctx.step}}")
"""


def test_max_total_restarts_allows_that_many_restarts_and_ends_the_run_at_the_next(tmp_path):
    hook = tmp_path / "flaky.py"
    hook.write_text(ONCE.format(marks=str(tmp_path)))
    run_dir = tmp_path / "run"
    proc, _ = start(run_dir, *SMALL, "--ranks", "2", "--set", "cluster.max_total_restarts=1",
                    "--hook", str(hook))  # fmt: skip
    lines = finish(proc)
    assert proc.returncode == 3, lines
    # the first crash is the one restart allowed; the second, another error, ends the run
    assert sum("rank 1 is down" in line for line in lines) == 1, lines
    pattern = (
        rf"{re.escape(FAILED)}2 rank crashes exceed cluster.max_total_restarts 1 \(last: "
        r"rank 1, .*a passing failure at step 14.*\); last good checkpoint: "
        rf"{re.escape(str(run_dir))}/checkpoints/step-000000(05|10)"
    )
    assert re.fullmatch(pattern, lines[-1]), lines[-1]
