"""The daemon's warm job runner (pipelines.daemon.warm), against a real daemon: a job it
runs is a `zerotrain run` like any other, a runner killed while it waits is replaced, and
nothing of it outlives a killed daemon."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from pipelines.daemon import protocol
from pipelines.daemon.client import call

from .conftest import MARKER_VAR, SMALL, marked_pids

pytestmark = pytest.mark.slow

SHORT = [*SMALL, "--steps", "30"]
LONG = [*SMALL, "--steps", "300"]


def _warm(d) -> dict:
    return call(d.state_dir, protocol.DaemonInfo(), timeout=30)["warm"]


def _wait_ready(d, timeout=120.0, other_than=None) -> dict:
    """The daemon's warm runner once it is ready (and is not pid ``other_than``)."""
    deadline = time.monotonic() + timeout
    while True:
        w = _warm(d)
        if w["ready"] and w["pid"] != other_than:
            return w
        assert time.monotonic() < deadline, f"no warm runner ready: {w}"
        time.sleep(0.1)


def _holding(marker_suffix: str, state_dir: Path) -> list[int]:
    """Live processes whose job marker is this state dir's ``marker_suffix``."""
    want = f"{MARKER_VAR}={state_dir.resolve()}:{marker_suffix}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        if want in env and stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z":
            pids.append(int(entry))
    return pids


def test_a_job_from_the_warm_runner_ends_with_the_params_of_zerotrain_run(
    daemon_factory, reference_hash
):
    d = daemon_factory("--cpus", "2")
    runner = _wait_ready(d)
    job = d.submit(*SHORT)
    done = d.wait_for(job, {"done"})
    assert done["params_sha256"] == reference_hash(*SHORT)
    log = d.cli("logs", str(job)).stdout
    assert f"job {job} attempt 1, warm runner at" in log, log[:500]
    assert _warm(d)["taken"] == 1
    # nothing of the job is left, the runner that ran it included
    assert marked_pids(d.state_dir) == []
    assert _holding(f"warm-{runner['idle']}", d.state_dir) == []


def test_a_warm_runner_killed_while_it_waits_is_replaced(daemon_factory, reference_hash):
    d = daemon_factory("--cpus", "2")
    first = _wait_ready(d)
    suffix = f"warm-{first['idle']}"
    assert len(_holding(suffix, d.state_dir)) == 1 + 2  # the runner and 2 rank templates
    os.kill(first["pid"], signal.SIGKILL)
    second = _wait_ready(d, other_than=first["pid"])
    assert second["replaced"] == 1 and second["idle"] == first["idle"] + 1
    # its templates went with it (their parent-death signal)
    deadline = time.monotonic() + 10
    while _holding(suffix, d.state_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _holding(suffix, d.state_dir) == []
    job = d.submit(*SHORT)
    done = d.wait_for(job, {"done"})
    assert done["params_sha256"] == reference_hash(*SHORT)
    assert _warm(d)["taken"] == 1


def test_a_warm_jobs_processes_die_with_a_killed_daemon(daemon_factory):
    d = daemon_factory("--cpus", "2")
    runner = _wait_ready(d)
    job = d.submit(*LONG)
    running = d.wait_for(job, {"running"}, step=20)
    assert running["pid"] == runner["pid"]  # the job's top process is the runner
    suffix = f"warm-{runner['idle']}"
    # the job's top process and its 2 ranks, forked templates (an exec'd rank would show
    # the job's own marker)
    assert len(_holding(suffix, d.state_dir)) == 3
    assert _holding(str(job), d.state_dir) == []
    d.kill9()
    deadline = time.monotonic() + 10
    while marked_pids(d.state_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marked_pids(d.state_dir) == []  # the job, its ranks, any runner: all gone
    assert not (Path(running["run_dir"]) / "summary.json").exists()


ONE_RANK = [*SMALL, "--ranks", "1", "--steps", "5000"]


def test_a_second_job_submitted_while_one_trains_starts_on_a_runner_warmed_before_it(
    daemon_factory,
):
    d = daemon_factory("--cpus", "2")
    first = _wait_ready(d)
    a = d.submit(*ONE_RANK)
    d.wait_for(a, {"running"}, step=1)
    # the budget has a CPU the first job does not hold: a runner warms again, for 1 rank
    second = _wait_ready(d, other_than=first["pid"])
    assert second["idle"] == first["idle"] + 1 and second["templates"] == 1
    b = d.submit(*ONE_RANK)
    status_b = d.wait_for(b, {"running"}, step=1)
    status_a = d.status(a)
    assert status_a["state"] == "running"  # b was submitted, and started, while a trains
    assert (status_a["runner"], status_a["pid"]) == (f"warm-{first['idle']}", first["pid"])
    # b's top process is the runner that was ready before b was submitted
    assert (status_b["runner"], status_b["pid"]) == (f"warm-{second['idle']}", second["pid"])
    assert _warm(d)["taken"] == 2
    for job in (a, b):
        call(d.state_dir, protocol.Control("cancel", str(job)))
        d.wait_for(job, {"cancelled"})


def test_no_runner_warms_on_cpus_the_running_jobs_hold(daemon_factory):
    d = daemon_factory("--cpus", "2")
    first = _wait_ready(d)
    job = d.submit(*SMALL, "--steps", "5000")  # 2 ranks: the whole budget
    d.wait_for(job, {"running"}, step=20)  # past its start
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        w = _warm(d)
        assert (w["started"], w["pid"]) == (first["started"], None), w
        time.sleep(0.1)
    assert d.status(job)["state"] == "running"  # all along
    call(d.state_dir, protocol.Control("cancel", str(job)))
    d.wait_for(job, {"cancelled"})
    # the budget is free again: a runner warms, with a template per CPU
    again = _wait_ready(d)
    assert again["idle"] == first["idle"] + 1 and again["templates"] == 2
