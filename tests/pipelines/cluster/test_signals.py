"""Planned stops: SIGINT, SIGTERM, SIGUSR1 or SIGUSR2 -- to the zerotrain process, to its
whole process group (a terminal's Ctrl-C) or to one rank -- end a run after one step all
ranks agree on, with a verified checkpoint and exit code 4; --resume then ends with the
bits of a run never stopped, and metrics.jsonl holds each step once. The real CLI in its
own session, real signals at several moments; every wait bounded, no speed asserted."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from .cluster_util import SMALL, params_sha256
from .test_lifecycle import DEADLINE, MARK, REPO, living

# one rank trains these steps in well under a second: it gets more, so that a signal
# lands while it trains
STEPS = {"1": 1500, "2": 120}


def args(ranks: str) -> list[str]:
    return [*SMALL, "--steps", str(STEPS[ranks]), "--ranks", ranks]


class Run:
    """The CLI running in its own session, its output collected line by line."""

    def __init__(self, run_dir: Path, *args: str, command: str = "run"):
        self.run_dir, self.mark = run_dir, uuid.uuid4().hex
        env = dict(os.environ, **{MARK: self.mark})
        env.pop("OPENBLAS_NUM_THREADS", None)
        argv = [sys.executable, "-m", "pipelines.cli", command, "mlp_classifier", *args]
        self.proc = subprocess.Popen(
            [*argv, "--run-dir", str(run_dir)],
            env=env,
            cwd=REPO,
            start_new_session=True,
            stdout=subprocess.PIPE,  # simulate's progress goes to stdout
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_until(self, ready, what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not ready():
            assert self.proc.poll() is None, f"ended before {what}: {self.lines[-20:]}"
            assert time.monotonic() < deadline, f"no {what} within {DEADLINE}s"
            time.sleep(0.002)

    def steps_logged(self) -> int:
        metrics = self.run_dir / "metrics.jsonl"
        return metrics.read_text().count("\n") if metrics.exists() else 0

    def finish(self) -> list[str]:
        try:
            self.proc.wait(DEADLINE)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(10)
        assert not any("Traceback" in line for line in self.lines), "\n".join(self.lines)
        return self.lines

    def rank_pids(self) -> list[int]:
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if b"pipelines.cluster.rank" in cmdline and self.mark.encode() in environ:
                pids.append(int(pid))
        return pids


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """params_sha256 of runs never stopped, by world size (each run once)."""

    @functools.cache
    def get(ranks: str) -> str:
        run_dir = tmp_path_factory.mktemp("reference") / "run"
        run = Run(run_dir, *args(ranks))
        assert run.finish() and run.proc.returncode == 0, run.lines[-20:]
        return params_sha256(run_dir)

    return get


STOPPED = re.compile(
    r"zerotrain run: stopped at step (\d+) \((SIG\w+) to (the zerotrain process|rank \d)\); "
    r"checkpoint (\S+); continue with --resume (\S+)"
)


AGREED = re.compile(
    r"stopping after step (\d+) \(steps completed by ranks 0\.\.\d+: (\d+(?:, \d+)*)\)"
)


def check_stopped_and_resume(
    run: Run, ranks: str, reference, signame: str, agreed: bool = False
) -> int:
    """The stopped run's one line, its checkpoint, and a resume to the reference bits;
    the step it stopped at. `agreed`: the ranks were training when the signal came, so
    the coordinator decided the stop step from the steps they had completed."""
    from pipelines.store import checkpoint as ckpt_mod

    lines = run.finish()
    decisions = [found for line in lines if (found := AGREED.search(line))]
    assert len(decisions) == (1 if agreed else len(decisions)) <= 1, lines[-20:]
    assert run.proc.returncode == 4, lines[-20:]
    time.sleep(0.5)
    assert living(-1, run.mark) == []  # nothing of the run lives on
    run_dir = run.run_dir
    early = re.fullmatch(
        rf"zerotrain run: stopped before the first step \({signame} to (the zerotrain "
        r"process|rank \d)\); nothing to resume: start it again",
        lines[-1],
    )
    if early:
        step, again = 0, Run(run_dir, *args(ranks))
    else:
        found = STOPPED.fullmatch(lines[-1])
        assert found, lines[-5:]
        step = int(found[1])
        assert found[2] == signame and 0 < step < STEPS[ranks]
        for decision in decisions:
            # the one step every rank can reach and none has passed: one after the most
            # completed (lock-step keeps the ranks within one), and the ranks end there
            done = [int(c) for c in decision[2].split(", ")]
            assert len(done) == int(ranks) and max(done) - min(done) <= 1, decision[0]
            assert int(decision[1]) == max(done) + 1 == step, (decision[0], lines[-1])
        ckpt = Path(found[4])
        assert ckpt == ckpt_mod.checkpoint_dir(run_dir / "checkpoints", step)
        assert ckpt_mod.latest_valid(run_dir / "checkpoints").path == ckpt  # verified
        assert Path(found[5]) == run_dir
        again = Run(run_dir, *args(ranks), "--resume", str(run_dir))
    assert again.finish() and again.proc.returncode == 0, again.lines[-20:]
    assert params_sha256(run_dir) == reference(ranks)
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert logged == list(range(1, STEPS[ranks] + 1))  # each step once
    return step


@pytest.mark.parametrize(
    "ranks, signame, target",
    [
        ("2", "SIGTERM", "top"),
        ("2", "SIGINT", "group"),  # a terminal's Ctrl-C: every process of the run
        ("2", "SIGUSR1", "rank"),  # one rank only (scancel --signal=USR1 -b, say)
        ("1", "SIGTERM", "top"),
        ("1", "SIGINT", "group"),
        ("1", "SIGUSR2", "top"),
    ],
)
def test_a_signal_mid_run_stops_at_an_agreed_step_and_resume_gives_the_same_bits(
    tmp_path, reference, ranks, signame, target
):
    run = Run(tmp_path / "run", *args(ranks))
    run.wait_until(lambda: run.steps_logged() >= 10, "step 10")
    sig = getattr(signal, signame)
    if target == "top":
        os.kill(run.proc.pid, sig)
    elif target == "group":
        os.killpg(run.proc.pid, sig)
    else:
        os.kill(run.rank_pids()[-1], sig)
    check_stopped_and_resume(run, ranks, reference, signame, agreed=ranks != "1")


@pytest.mark.parametrize("ranks", ["1", "2"])
def test_a_signal_while_the_run_starts_stops_it_cleanly(tmp_path, reference, ranks):
    run = Run(tmp_path / "run", *args(ranks))
    # the run dir exists: the CLI parsed, checked and loaded; ranks may still be starting
    run.wait_until(lambda: (tmp_path / "run" / "config.json").exists(), "the run dir")
    os.kill(run.proc.pid, signal.SIGTERM)
    check_stopped_and_resume(run, ranks, reference, "SIGTERM")


def test_a_signal_to_a_rank_process_as_it_starts_is_kept_for_it(tmp_path, reference):
    """Its stop signals are blocked from the fork until the rank handles them: one that
    comes while the interpreter starts is not its death, and not lost."""
    run = Run(tmp_path / "run", *args("2"))
    run.wait_until(lambda: run.rank_pids(), "a rank process")
    os.kill(run.rank_pids()[0], signal.SIGUSR1)
    check_stopped_and_resume(run, "2", reference, "SIGUSR1")


@pytest.mark.parametrize("ranks", ["1", "2"])
def test_a_signal_during_a_checkpoint_write_stops_cleanly(tmp_path, reference, ranks):
    run = Run(tmp_path / "run", *args(ranks))
    ckpts = tmp_path / "run" / "checkpoints"
    # the moment the third checkpoint's directory appears: its shards are being written
    run.wait_until(lambda: len(list(ckpts.glob("step-*"))) >= 3, "a checkpoint write")
    os.kill(run.proc.pid, signal.SIGTERM)
    check_stopped_and_resume(run, ranks, reference, "SIGTERM")


def test_a_signal_during_a_recovery_stops_cleanly(tmp_path, reference):
    run = Run(tmp_path / "run", *args("2"), "--chaos", "kill:rank=1,step=20",
              command="simulate")  # fmt: skip
    run.wait_until(lambda: any("rank 1 is down" in line for line in run.lines), "the kill")
    os.kill(run.proc.pid, signal.SIGTERM)
    check_stopped_and_resume(run, "2", reference, "SIGTERM")


@pytest.mark.parametrize("ranks", ["1", "2"])
def test_a_second_signal_stops_at_once_leaving_the_last_good_checkpoint(tmp_path, reference, ranks):
    from pipelines.store import checkpoint as ckpt_mod

    run = Run(tmp_path / "run", *args(ranks))
    run.wait_until(lambda: run.steps_logged() >= 12, "step 12")
    if ranks == "2":
        # a rank held (SIGSTOP) cannot answer for the stop step: the first signal's stop
        # cannot complete, so the second one is the run's end; SIGKILL ends it held
        os.kill(run.rank_pids()[0], signal.SIGSTOP)
        os.kill(run.proc.pid, signal.SIGTERM)
        run.wait_until(lambda: any("SIGTERM: stopping" in line for line in run.lines),
                       "the first signal's line")  # fmt: skip
    else:
        os.kill(run.proc.pid, signal.SIGTERM)
    os.kill(run.proc.pid, signal.SIGTERM)
    lines = run.finish()
    assert run.proc.returncode == 4, lines[-20:]
    run_dir = run.run_dir
    last = ckpt_mod.latest_valid(run_dir / "checkpoints").path
    assert lines[-1] in (
        f"zerotrain run: stopped at once (a second SIGTERM to the zerotrain process); last "
        f"good checkpoint: {last}; continue with --resume {run_dir}",
        # one rank: the first signal's stop may have completed before the second was read
        *(line for line in lines[-1:] if ranks == "1" and STOPPED.fullmatch(line)),
    )
    time.sleep(0.5)
    assert living(-1, run.mark) == []
    again = Run(run_dir, *args(ranks), "--resume", str(run_dir))
    assert again.finish() and again.proc.returncode == 0, again.lines[-20:]
    assert params_sha256(run_dir) == reference(ranks)
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert logged == list(range(1, STEPS[ranks] + 1))  # the steps after the checkpoint, once


def test_a_stop_that_overruns_its_grace_period_ends_at_once(tmp_path, reference):
    """No checkpointed stop is possible in 1 ms: the run ends at once, and its resume
    trains the steps after the last good checkpoint again -- logged once."""
    from pipelines.store import checkpoint as ckpt_mod

    every = ["--set", "checkpoint.every=50"]
    grace = ["--set", "cluster.grace_seconds=0.001"]
    run = Run(tmp_path / "run", *args("2"), *every, *grace)
    run.wait_until(lambda: run.steps_logged() >= 55, "step 55")
    os.kill(run.proc.pid, signal.SIGTERM)
    lines = run.finish()
    assert run.proc.returncode == 4, lines[-20:]
    run_dir = run.run_dir
    last = ckpt_mod.latest_valid(run_dir / "checkpoints").path
    assert lines[-1] == (
        "zerotrain run: stopped at once (no checkpointed stop within cluster.grace_seconds "
        f"0.001); last good checkpoint: {last}; continue with --resume {run_dir}"
    )
    assert last == ckpt_mod.checkpoint_dir(run_dir / "checkpoints", 50)
    assert run.steps_logged() > 50  # logged beyond the checkpoint
    again = Run(run_dir, *args("2"), *every, "--resume", str(run_dir))
    assert again.finish() and again.proc.returncode == 0, again.lines[-20:]
    assert params_sha256(run_dir) == reference("2")
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert logged == list(range(1, STEPS["2"] + 1))
