"""Live control of a running cluster run (pipelines.cluster.live): a process holding the
run's token calls its Coordinator -- status, a checkpoint now, a live override -- and the
run ends with the bits of a run that was asked the same thing by a file, or nothing.
Real runs, real rank processes, real sockets; every wait bounded, no speed asserted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trio

import actors
from pipelines.cluster import messages as m
from pipelines.cluster.live import call_run, run_endpoint
from pipelines.store import checkpoint as ckpt_mod

from .cluster_util import SMALL, run
from .test_lifecycle import DEADLINE

LONG = ["--ranks", "2", "--steps", "300", "--set", "checkpoint.every=0"]
# the live runs: rank 1's sends each 20 ms late (a standing chaos condition, no change to
# the numbers), so that the 300 steps outlast the requests on an idle machine too
SLOW = ["--chaos", "delay:rank=1,ms=20"]


def start(run_dir: Path, *args: str) -> subprocess.Popen:
    """`zerotrain simulate` of SMALL, ARGS and SLOW in a session of its own."""
    env = dict(os.environ)
    env.pop("OPENBLAS_NUM_THREADS", None)
    argv = [sys.executable, "-m", "pipelines.cli", "simulate", "mlp_classifier", *SMALL, *args]
    argv += SLOW
    return subprocess.Popen(
        [*argv, "--run-dir", str(run_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def steps_logged(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def wait_step(run_dir: Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while steps_logged(run_dir) < step:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.05)


def finish(proc: subprocess.Popen, expect: int = 0) -> str:
    _, err = proc.communicate(timeout=DEADLINE * 2)
    assert proc.returncode == expect, err[-3000:]
    return err


def lrs_of(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: r["lr"] for r in records}


def sha(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["params_sha256"]


@pytest.fixture
def running(tmp_path):
    """Started runs, killed (the whole session) if a test leaves one behind."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ask_with(ipc_dir: str, token: str | None) -> object:
    """RunStatus from a node presenting `token` (None: no credentials): the answer, or
    the exception's type name."""

    async def ask():
        async with actors.open_node("visitor", directory=ipc_dir, token=token):
            try:
                return await actors.call(m.COORDINATOR, m.RunStatus(), 3.0)
            except actors.ActorError as err:
                return type(err).__name__

    return trio.run(ask)


def test_only_a_holder_of_the_run_token_reaches_the_coordinator(tmp_path, running):
    run_dir = tmp_path / "run"
    running.append(proc := start(run_dir, *LONG))
    wait_step(run_dir, proc, 2)
    ipc_dir, token = run_endpoint(run_dir)
    # refused at the handshake: the cluster never answers (its node is silent, then down)
    assert ask_with(ipc_dir, None) in ("CallTimeout", "ActorExited")
    assert ask_with(ipc_dir, "f" * 32) in ("CallTimeout", "ActorExited")
    status = call_run(run_dir, m.RunStatus(), timeout=30)
    assert status["state"] == "training" and status["step"] >= 2, status
    assert status["overrides"] == []
    os.kill(proc.pid, signal.SIGTERM)  # a planned stop: the run goes on as it would
    finish(proc, expect=4)


def test_a_checkpoint_asked_for_twice_at_once_is_one_agreed_verified_resumable_checkpoint(
    tmp_path, running
):
    reference = run(tmp_path / "ref", *LONG)["params_sha256"]
    run_dir = tmp_path / "run"
    # retention keeps one periodic checkpoint: the asked one is kept all the same
    prune = ["--set", "checkpoint.every=100", "--set", "checkpoint.keep_last=1"]
    running.append(proc := start(run_dir, *LONG, *prune))
    wait_step(run_dir, proc, 5)
    with ThreadPoolExecutor(2) as pool:
        asked = [pool.submit(call_run, run_dir, m.CheckpointNow(), timeout=60) for _ in "ab"]
        first, second = (f.result() for f in asked)
    assert "error" not in first and first == second, (first, second)  # overlapping: one
    step, manifest = first["step"], Path(first["manifest"])
    assert 5 < step < 300
    assert manifest == ckpt_mod.checkpoint_dir(run_dir / "checkpoints", step) / "manifest.json"
    assert ckpt_mod.verify_checkpoint(manifest.parent)["step"] == step
    finish(proc)
    assert sha(run_dir) == reference  # the checkpoint changed nothing in training
    assert [c.name for c in ckpt_mod.list_checkpoints(run_dir / "checkpoints")] == [
        manifest.parent.name,
        "step-00000300",
    ]
    assert ckpt_mod.verify_checkpoint(manifest.parent)["asked"] is True
    # resumable: from that checkpoint alone (a root of its own), the run ends with the
    # same bits
    kept = tmp_path / "kept" / manifest.parent.name
    shutil.copytree(manifest.parent, kept)
    resumed = run(tmp_path / "resumed", *LONG, "--resume", str(kept.parent))
    assert resumed["params_sha256"] == reference


def test_a_set_replayed_after_a_rank_is_killed_ends_as_a_run_given_the_recorded_file(
    tmp_path, running
):
    run_dir = tmp_path / "run"
    # no snapshot after step 0 and no periodic checkpoint: the kill replays every step,
    # the override's step among them
    live = [*LONG, "--set", "cluster.snapshot_every=1000"]
    running.append(proc := start(run_dir, *live))
    wait_step(run_dir, proc, 5)
    refused = call_run(run_dir, m.SetOverride("model.hidden", "[8]"), timeout=30)
    assert "model.hidden: cannot be changed" in refused["error"]
    assert "optimizer.lr" in refused["error"] and "train.steps" in refused["error"]
    past = call_run(run_dir, m.SetOverride("optimizer.lr", "0.01", 1), timeout=30)
    assert past["error"].startswith("--at-step 1 is past"), past
    done = call_run(run_dir, m.SetOverride("optimizer.lr", "0.01"), timeout=60)
    step = done["step"]
    assert done["key"] == "optimizer.lr" and done["value"] == 0.01 and 5 < step < 300
    recorded = run_dir / "overrides.jsonl"
    assert [json.loads(line) for line in recorded.read_text().splitlines()] == [
        {"step": step, "key": "optimizer.lr", "value": 0.01}
    ]
    wait_step(run_dir, proc, step + 3)
    pid = json.loads((run_dir / "live" / "rank-1.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    finish(proc)
    assert json.loads((run_dir / "summary.json").read_text())["restarts"] >= 1
    # the reference: the same override from the file, no kill; and the set did change
    # the training (else this test could not fail)
    given = run(tmp_path / "given", *live, "--overrides", str(recorded))["params_sha256"]
    plain = run(tmp_path / "plain", *live)["params_sha256"]
    assert sha(run_dir) == given != plain
    # from the step after `step` on, the LR is the schedule's times 0.01 / 0.001 (the
    # pipeline's optimizer.lr), before it the schedule's own
    ratio = {s: lr / lrs_of(tmp_path / "plain")[s] for s, lr in lrs_of(run_dir).items()}
    assert {s: r for s, r in ratio.items() if s <= step} == {s: 1.0 for s in range(1, step + 1)}
    assert all(r == pytest.approx(10.0) for s, r in ratio.items() if s > step)


def test_an_overrides_file_with_a_key_not_live_is_refused_in_one_line(tmp_path):
    from tests.pipelines.cli_util import zerotrain

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 3, "key": "model.hidden", "value": 8}\n')
    proc = zerotrain("run", "mlp_classifier", *SMALL, "--overrides", str(bad),
                     "--run-dir", str(tmp_path / "run"))  # fmt: skip
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and f"--overrides {bad} record 1: model.hidden" in line, line
    assert "optimizer.lr" in line and not (tmp_path / "run").exists()


PROBE = Path(__file__).resolve().parents[1] / "live_probe.py"  # probe and halve


def test_an_analyzer_attached_live_sees_exactly_its_steps_and_training_is_untouched(
    tmp_path, running
):
    reference = run(tmp_path / "ref", *LONG)["params_sha256"]  # no hooks at all
    run_dir = tmp_path / "run"
    # a hook from the start too: the ranks sample steps before the attach, which the
    # analyzer must not give the attached hook
    running.append(proc := start(run_dir, *LONG, "--hook", "builtin:grad_norm"))
    wait_step(run_dir, proc, 5)
    refused = call_run(run_dir, m.HookChange("attach", f"{PROBE}:halve"), timeout=30)
    assert refused["error"].startswith("halve: a transform cannot be attached live"), refused
    attached = call_run(run_dir, m.HookChange("attach", f"{PROBE}:probe"), timeout=60)
    assert attached["names"] == ["probe"] and attached["action"] == "attach", attached
    again = call_run(run_dir, m.HookChange("attach", f"{PROBE}:probe"), timeout=30)
    assert again["error"] == "a hook named 'probe' is attached already"
    wait_step(run_dir, proc, attached["step"] + 10)
    detached = call_run(run_dir, m.HookChange("detach", "probe"), timeout=60)
    after, until = attached["step"], detached["step"]
    assert after < until < 300, (attached, detached)
    gone = call_run(run_dir, m.HookChange("detach", "probe"), timeout=30)
    assert gone["error"] == "no hook named 'probe' is attached (attached: grad_norm)"
    finish(proc)
    assert sha(run_dir) == reference  # the hooks never touched training
    records = [json.loads(line) for line in open(run_dir / "hooks.jsonl")]
    seen = [r["step"] for r in records if r["hook"] == "probe"]
    assert seen == list(range(after + 1, until + 1))  # every step it was attached for
    assert all(r["metrics"] == {"seen": float(r["step"])} for r in records if r["hook"] == "probe")
    assert any(r["step"] <= after for r in records if r["hook"] == "grad_norm")
