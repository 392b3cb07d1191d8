"""The daemon against real jobs: `zerotrain serve` with `zerotrain run` jobs and their
rank processes under it, driven by the client verbs as a user would."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.daemon import protocol
from pipelines.daemon.client import call, wait_until_settled

from .conftest import SMALL, marked_pids

pytestmark = pytest.mark.slow

SHORT = [*SMALL, "--steps", "30"]
# long enough to pause or kill in the middle, with checkpoints to resume from
LONG = [*SMALL, "--steps", "2000", "--set", "checkpoint.every=50"]
# never ends on its own: cancelled by its test
ENDLESS = [*SMALL, "--steps", "1000000"]


@pytest.fixture(scope="module")
def short_job(shared_daemon):
    """One SHORT job on the shared daemon, run to its end: (daemon, id, final status)."""
    d = shared_daemon
    r = d.cli("submit", *SHORT, "--name", "js")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().isdigit() and r.stdout == f"{int(r.stdout)}\n"  # the id, alone
    job = int(r.stdout)
    return d, job, d.wait_for(job, {"done"})


def test_a_submitted_job_ends_with_the_params_of_zerotrain_run(short_job, reference_hash):
    d, _, job = short_job
    assert job["params_sha256"] == reference_hash(*SHORT)
    assert job["step"] == 30 and job["restarts"] == 0
    assert marked_pids(d.state_dir) == []  # nothing of the job is left


def test_two_jobs_share_the_cpu_budget_one_after_the_other(shared_daemon, reference_hash):
    d = shared_daemon  # --cpus 2
    first = d.submit(*SHORT, "--name", "first")
    second = d.submit(*SHORT, "--name", "second")
    a = d.wait_for(first, {"done"})
    b = d.wait_for(second, {"done"})
    # 2 + 2 ranks do not fit a budget of 2: the second starts after the first has ended
    assert b["started"] >= a["ended"]
    assert a["params_sha256"] == b["params_sha256"] == reference_hash(*SHORT)


def test_a_higher_priority_job_starts_first(shared_daemon):
    d = shared_daemon  # --cpus 2
    blocker = d.submit(*ENDLESS, "--name", "blocker")
    d.wait_for(blocker, {"running"})
    low = d.submit(*SHORT, "--name", "low")
    high = d.submit(*SHORT, "--name", "high", "--priority", "5")
    assert d.cli("cancel", blocker).returncode == 0
    lo, hi = d.wait_for(low, {"done"}), d.wait_for(high, {"done"})
    assert hi["started"] < lo["started"]
    assert hi["ended"] <= lo["started"]


def _nice_of(pid: int) -> tuple[int, int | None] | None:
    """(nice value, its session's autogroup nice or None without autogroup) of `pid`;
    None once it is gone."""
    try:
        nice = os.getpriority(os.PRIO_PROCESS, pid)
    except ProcessLookupError:
        return None
    try:
        group = Path(f"/proc/{pid}/autogroup").read_text().split()
    except FileNotFoundError:
        return (nice, None) if os.path.exists(f"/proc/{pid}") else None
    return nice, int(group[-1])


def test_a_paused_job_holds_no_process_exports_its_checkpoint_and_resumes_bit_identical(
    shared_daemon, reference_hash, tmp_path
):
    safetensors = pytest.importorskip("safetensors.numpy")
    d = shared_daemon
    job = d.submit(*LONG)
    d.wait_for(job, {"running"}, step=30)
    # what `zerotrain pause JOB --wait` does, from here: at ~3 ms a step the job must not
    # end while a command line starts (its output is checked on an endless job below)
    call(d.state_dir, protocol.Control("pause", str(job)))
    paused = wait_until_settled(d.state_dir, str(job), timeout=120)
    assert paused["state"] == "paused" and paused["step"] < 2000
    assert marked_pids(d.state_dir) == []  # paused = no process, no CPU

    # export while paused: the newest checkpoint's weights, by PyTorch name
    out = tmp_path / "p.safetensors"
    r = d.cli("export", job, out)
    assert r.returncode == 0, r.stderr
    step = int(r.stdout.split("(step ")[1].rstrip(")\n"))
    assert step == paused["step"]  # pause is a planned stop: checkpointed where it paused
    weights = safetensors.load_file(str(out))
    from pipelines.store.checkpoint import latest_valid, load_full

    _, full = load_full(latest_valid(f"{paused['run_dir']}/checkpoints").path)
    exported = np.concatenate([w.ravel() for w in weights.values()])
    # every parameter of the checkpoint: the same numbers, in some order
    assert np.array_equal(np.sort(exported), np.sort(full["params"]))

    time.sleep(1.5)
    assert d.status(job)["state"] == "paused"  # the scheduler leaves it alone
    assert d.cli("resume", job).returncode == 0
    done = d.wait_for(job, {"done"})
    assert done["restarts"] == 1
    assert done["params_sha256"] == reference_hash(*LONG)
    # it continued from its checkpoint (a restart from the seed gives the same bits)
    assert re.search(r"resumed at step [1-9]\d* from", d.cli("logs", job).stdout)


def test_a_daemon_killed_mid_job_takes_its_jobs_along_and_the_next_one_resumes_them(
    daemon_factory, reference_hash
):
    d = daemon_factory()
    job = d.submit(*LONG)
    run_dir = d.wait_for(job, {"running"}, step=60)["run_dir"]
    d.kill9()
    # the job's top process dies with the daemon (parent-death signal); its ranks follow
    # when they miss the coordinator's heartbeats, and the next daemon kills any left
    deadline = time.monotonic() + 10
    while marked_pids(d.state_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marked_pids(d.state_dir) == []
    # taken along, not left to finish on its own: 240 steps were still to go
    assert not (Path(run_dir) / "summary.json").exists()
    d.start()
    done = d.wait_for(job, {"done"})
    assert done["restarts"] == 1
    assert done["params_sha256"] == reference_hash(*LONG)
    assert "was running when its daemon died: now queued" in d.output()
    assert "resumed at step" in d.cli("logs", job).stdout


def test_a_daemon_stopped_by_sigterm_resumes_its_jobs_when_it_next_serves(
    daemon_factory, reference_hash
):
    d = daemon_factory("--job-nice", "7")
    job = d.submit(*LONG)
    d.wait_for(job, {"running"}, step=30)
    # the job's processes (top, ranks) run 7 nice levels below the daemon, their
    # session's scheduling group too where Linux has one
    daemon_nice = os.getpriority(os.PRIO_PROCESS, d.proc.pid)
    seen = [_nice_of(pid) for pid in marked_pids(d.state_dir)]
    seen = [s for s in seen if s is not None]  # (a process may end while we look)
    assert len(seen) >= 3 and all(s[0] == daemon_nice + 7 for s in seen), seen
    assert all(s[1] in (None, 7) for s in seen), seen
    assert d.terminate() == 0
    assert marked_pids(d.state_dir) == []
    d.start()
    done = d.wait_for(job, {"done"})
    assert done["restarts"] == 1
    assert done["params_sha256"] == reference_hash(*LONG)


def test_pause_resume_stop_resume_and_cancel_from_the_command_line(shared_daemon):
    d = shared_daemon
    job = d.submit(*ENDLESS)
    d.wait_for(job, {"running"}, step=30)
    r = d.cli("pause", job, "--wait")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(": paused")
    assert d.cli("resume", job).returncode == 0
    d.wait_for(job, {"running"})
    assert d.cli("stop", job, "--wait").stdout.strip().endswith(": stopped")
    assert marked_pids(d.state_dir) == []
    step = d.status(job)["step"]
    assert d.cli("resume", job).returncode == 0
    d.wait_for(job, {"running"}, step=step + 30)
    r = d.cli("cancel", job, "--wait")
    assert r.stdout.strip().endswith(": cancelled"), r.stdout + r.stderr
    assert marked_pids(d.state_dir) == []
    bad = d.cli("resume", job)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        f"zerotrain resume: job {job} (job-{job}) is cancelled; resume accepts a paused or "
        "stopped job"
    )


def test_stop_checkpoints_at_the_step_it_stops_at_and_resume_ends_bit_identical(
    shared_daemon, reference_hash
):
    d = shared_daemon
    job = d.submit(*LONG)
    d.wait_for(job, {"running"}, step=30)
    call(d.state_dir, protocol.Control("stop", str(job)))  # (fast: see the pause test)
    s = wait_until_settled(d.state_dir, str(job), timeout=120)
    assert s["state"] == "stopped" and s["exit_code"] == 4  # zerotrain run's planned stop
    from pipelines.store.checkpoint import latest_valid

    # the agreed step, checkpointed: not the newest checkpoint.every step before it
    assert latest_valid(f"{s['run_dir']}/checkpoints").manifest["step"] == s["step"]
    assert marked_pids(d.state_dir) == []
    assert d.cli("resume", job).returncode == 0
    done = d.wait_for(job, {"done"})
    assert done["params_sha256"] == reference_hash(*LONG)
    assert f"resumed at step {s['step']} from" in d.cli("logs", job).stdout


def test_logs_and_export_of_a_finished_job(short_job, tmp_path):
    d, job, done = short_job
    logs = d.cli("logs", job)
    assert logs.returncode == 0
    assert "zerotrain: step 30/30" in logs.stdout and "done: 30 steps" in logs.stdout
    follow = d.cli("logs", job, "-f", timeout=30)  # an ended job: -f returns
    assert follow.stdout == logs.stdout
    out = tmp_path / "w.safetensors"
    r = d.cli("export", job, out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{out} (step 30)"
    assert out.read_bytes() == (Path(done["run_dir"]) / "weights.safetensors").read_bytes()
    assert done["run_dir"] == str(d.state_dir / "runs" / f"job-{job}")


def test_status_and_jobs_as_json_for_scripts(short_job):
    d, job, _ = short_job
    listed = json.loads(d.cli("jobs", "--json").stdout)
    assert [j for j in listed if j["state"] in ("done", "failed", "cancelled")] == []
    assert job not in [j["id"] for j in listed]  # ended jobs only with --all
    (entry,) = [j for j in json.loads(d.cli("jobs", "--all", "--json").stdout) if j["id"] == job]
    for key in ("id", "name", "state", "step", "run_dir", "restarts", "summary"):
        assert key in entry
    assert entry["name"] == "js" and entry["summary"]["params_sha256"] == entry["params_sha256"]
    assert json.loads(d.cli("status", job, "--json").stdout) == d.status(job)
    table = d.cli("jobs", "--all").stdout.splitlines()
    assert table[0].split() == [
        "id",
        "name",
        "state",
        "step",
        "loss",
        "ranks",
        "restarts",
        "run_dir",
    ]
    (row,) = [line.split() for line in table[1:] if line.split()[0] == str(job)]
    assert row[:3] == [str(job), "js", "done"]


def test_a_continuous_job_trains_until_stopped_exporting_latest_weights_at_each_checkpoint(
    shared_daemon, tmp_path
):
    safetensors = pytest.importorskip("safetensors.numpy")
    from pipelines.store.checkpoint import checkpoint_dir, latest_valid, load_full

    from .conftest import zerotrain

    d = shared_daemon
    horizon = ["--set", "schedule.total_steps=1000", "--set", "checkpoint.every=50"]
    # every checkpoint kept: an export is compared with its checkpoint whenever it is seen
    job = d.submit(*SMALL, "--steps", "0", *horizon, "--set", "checkpoint.keep_last=1000")
    run_dir = Path(d.wait_for(job, {"running"}, step=1)["run_dir"])
    latest = run_dir / "weights" / "latest.safetensors"
    # one checkpoint a few ahead never completes: its manifest cannot be written (a
    # directory holds the name), so the run reports it and trains on
    step_now = json.loads((run_dir / "live" / "rank-0.json").read_text())["step"]
    blocked = 50 * (step_now // 50 + 3)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (checkpoint_dir(run_dir / "checkpoints", blocked)).mkdir()  # no rank got there yet
    (checkpoint_dir(run_dir / "checkpoints", blocked) / "manifest.json").mkdir()

    def exported() -> tuple[int, np.ndarray] | None:
        """(step, sorted weights) of latest.safetensors, read from one open (it is
        replaced whole while we read)."""
        try:
            data = latest.read_bytes()
        except FileNotFoundError:
            return None
        size = int.from_bytes(data[:8], "little")
        step = int(json.loads(data[8 : 8 + size])["__metadata__"]["step"])
        weights = safetensors.load(data)
        return step, np.sort(np.concatenate([w.ravel() for w in weights.values()]))

    def params_at(step: int) -> np.ndarray:
        return load_full(checkpoint_dir(run_dir / "checkpoints", step))[1]["params"]

    # each export, the moment it is seen, is a complete checkpoint's params, by name:
    # rank 0 exports only once the Coordinator has written that checkpoint's manifest,
    # so the incomplete one is never exported
    seen: set[int] = set()
    deadline = time.monotonic() + 120
    while not any(s > blocked for s in seen):
        assert time.monotonic() < deadline, f"exports seen: {sorted(seen)}"
        got = exported()
        if got is not None and got[0] not in seen:
            step, weights = got
            assert step != blocked, f"step {blocked} exported without its manifest"
            assert np.array_equal(weights, np.sort(params_at(step))), step
            seen.add(step)
        time.sleep(0.01)
    assert all(s % 50 == 0 for s in seen) and min(seen) < blocked, sorted(seen)
    assert "not completed" in d.cli("logs", job).stdout
    # stopped (a planned stop), twice, with a resume in between: never "done"
    stops = []
    for _ in range(2):
        call(d.state_dir, protocol.Control("stop", str(job)))
        s = wait_until_settled(d.state_dir, str(job), timeout=120)
        assert s["state"] == "stopped" and s["exit_code"] == 4, s
        assert latest_valid(run_dir / "checkpoints").manifest["step"] == s["step"]
        step, weights = exported()  # the stop's checkpoint is exported too
        assert step == s["step"] and np.array_equal(weights, np.sort(params_at(step)))
        stops.append(s["step"])
        if len(stops) == 1:
            assert d.cli("resume", job).returncode == 0
            d.wait_for(job, {"running"}, step=s["step"] + 60)
    # the continuous job at its second stop = a run of that many steps, same horizon
    ref = tmp_path / "ref"
    r = zerotrain("run", *SMALL, "--steps", stops[1], *horizon, "--run-dir", ref, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    final = load_full(checkpoint_dir(ref / "checkpoints", stops[1]))[1]["params"]
    assert np.array_equal(final, params_at(stops[1]))
    assert d.cli("cancel", job).returncode == 0
