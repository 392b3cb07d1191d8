"""Per-rank and run telemetry on /metrics and a silent rank on /readyz, from a real job:
what the run writes (metrics.jsonl, live/, checkpoints), read by a real daemon."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from .conftest import SMALL, http_get

pytestmark = pytest.mark.slow

HEARTBEAT_TIMEOUT = 2.0  # cluster.heartbeat_timeout's default, which the job runs with
# runs until cancelled: the test decides when it has seen enough
JOB = [*SMALL, "--steps", "1000000", "--set", "checkpoint.every=100"]


def _series(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _wait_metrics(address: str, want, timeout=60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        got = _series(http_get(address, "/metrics")[1])
        if want(got):
            return got
        assert time.monotonic() < deadline, f"not seen in time: {sorted(got)}"
        time.sleep(0.2)


def test_ranks_restarts_and_checkpoints_on_metrics_and_a_stopped_rank_on_readyz(
    daemon_factory,
):
    d = daemon_factory("--http", "127.0.0.1:0")
    where = json.loads((d.state_dir / "http.json").read_text())
    address = f"{where['host']}:{where['port']}"
    job = d.submit(*JOB)
    run_dir = Path(d.wait_for(job, {"running"}, step=45)["run_dir"])
    j = f'job="{job}"'
    got = _wait_metrics(
        address,
        lambda m: (
            all(f'zerotrain_rank_compute_seconds{{{j},rank="{r}"}}' in m for r in (0, 1))
            and f"zerotrain_checkpoint_seconds{{{j}}}" in m
        ),
    )
    for r in (0, 1):
        assert got[f'zerotrain_rank_up{{{j},rank="{r}"}}'] == 1.0
        assert got[f'zerotrain_rank_compute_seconds{{{j},rank="{r}"}}'] > 0.0
        assert got[f'zerotrain_rss_bytes{{{j},rank="{r}"}}'] > 20e6  # numpy and a model
    assert 0.0 <= got[f"zerotrain_checkpoint_seconds{{{j}}}"] < 60.0
    step = got[f"zerotrain_step{{{j}}}"]
    assert step >= 45
    assert got[f"zerotrain_samples_total{{{j}}}"] == step * 64  # mlp_classifier's batch
    assert got[f"zerotrain_step_seconds_count{{{j}}}"] >= 40
    assert abs(got[f"zerotrain_last_step_timestamp_seconds{{{j}}}"] - time.time()) < 60
    assert http_get(address, "/readyz") == (200, "ready\n")

    # rank 1 goes silent: /readyz names it within the heartbeat timeout + 1 s
    pid = json.loads((run_dir / "live" / "rank-1.json").read_text())["pid"]
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    while http_get(address, "/readyz")[0] == 200:
        assert time.monotonic() - t0 < HEARTBEAT_TIMEOUT + 1.0, "/readyz still 200"
        time.sleep(0.05)
    code, body = http_get(address, "/readyz")
    assert time.monotonic() - t0 < HEARTBEAT_TIMEOUT + 1.0
    # (the run kills it only once its heartbeats have been missed for the timeout)
    assert (code, body) == (503, f"not ready: job {job} rank 1 down (stopped)\n")
    # the run kills the silent rank and replaces it: a restart, then ready again
    got = _wait_metrics(
        address,
        lambda m: (
            m.get(f'zerotrain_restarts_total{{{j},reason="crash"}}') == 1.0
            and m.get(f'zerotrain_rank_up{{{j},rank="1"}}') == 1.0
        ),
    )
    assert got[f'zerotrain_restarts_total{{{j},reason="resume"}}'] == 0.0
    new_pid = json.loads((run_dir / "live" / "rank-1.json").read_text())["pid"]
    assert new_pid != pid
    assert http_get(address, "/readyz") == (200, "ready\n")
    assert re.search(r"rank 1 is down", d.cli("logs", job).stdout)
    assert d.cli("cancel", job, "--wait").returncode == 0
    # an ended job has no ranks to be down, nor per-rank series
    assert http_get(address, "/readyz") == (200, "ready\n")
    got = _wait_metrics(address, lambda m: f'zerotrain_rank_up{{{j},rank="0"}}' not in m)


HOOKS = """
from pipelines.hooks import analyzer


@analyzer(every=5, exact=True)
def boom(ctx):
    if ctx.step in (10, 20):
        raise RuntimeError(f"planted failure at step {ctx.step}")
    return {"ok": 1.0}


@analyzer(every=5, exact=True)
def fine(ctx):
    return {"step": float(ctx.step)}
"""


def test_a_hook_that_raises_is_counted_on_metrics_per_hook(daemon_factory, tmp_path):
    script = tmp_path / "boom_hooks.py"
    script.write_text(HOOKS)
    d = daemon_factory("--http", "127.0.0.1:0")
    where = json.loads((d.state_dir / "http.json").read_text())
    address = f"{where['host']}:{where['port']}"
    job = d.submit(*JOB, "--hook", script)
    run_dir = Path(d.wait_for(job, {"running"}, step=1)["run_dir"])
    j = f'job="{job}"'
    # (prometheus_client prints the labels in name order)
    boom = f'zerotrain_hook_errors_total{{hook="boom",{j}}}'
    fine = f'zerotrain_hook_errors_total{{hook="fine",{j}}}'
    got = _wait_metrics(
        address, lambda m: m.get(boom) == 2.0 and m.get(f"zerotrain_step{{{j}}}", 0) >= 40
    )
    assert got[fine] == 0.0  # it wrote metrics only: listed, no error
    records = [json.loads(line) for line in (run_dir / "hooks.jsonl").read_text().splitlines()]
    errors = [(r["hook"], r["step"]) for r in records if "error" in r]
    assert errors == [("boom", 10), ("boom", 20)]
    assert {r["hook"] for r in records if "metrics" in r} == {"boom", "fine"}
    assert d.cli("cancel", job, "--wait").returncode == 0
    # an ended job's series go with it
    _wait_metrics(address, lambda m: boom not in m)


STUCK = """
import time
from pathlib import Path

from pipelines.hooks import transform


@transform(every=1)
def stuck(ctx):
    # rank 1's step 60 hangs in its computation (a worker thread) until the gate opens:
    # its event loop runs on, so its heartbeats do too
    if ctx.rank == 1 and ctx.step == 60:
        Path({hung!r}).write_text(repr(time.time()))
        while not Path({gate!r}).exists():
            time.sleep(0.02)
"""


def test_a_rank_hung_in_its_step_while_it_heartbeats_is_named_on_readyz(daemon_factory, tmp_path):
    hung, gate = tmp_path / "hung", tmp_path / "gate"
    script = tmp_path / "stuck.py"
    script.write_text(STUCK.format(hung=str(hung), gate=str(gate)))
    d = daemon_factory("--http", "127.0.0.1:0")
    where = json.loads((d.state_dir / "http.json").read_text())
    address = f"{where['host']}:{where['port']}"
    job = d.submit(*JOB, "--hook", script)
    run_dir = Path(d.wait_for(job, {"running"}, step=20)["run_dir"])
    assert http_get(address, "/readyz") == (200, "ready\n")
    deadline = time.monotonic() + 60
    while not hung.exists() or not hung.read_text():
        assert time.monotonic() < deadline, "the hook never hung"
        time.sleep(0.02)
    t0 = float(hung.read_text())  # wall time the hang began
    while True:
        asked = time.time()
        code, body = http_get(address, "/readyz")
        if code == 503:
            break
        assert time.time() - t0 < HEARTBEAT_TIMEOUT + 1.0, "/readyz still 200"
        time.sleep(0.05)
    assert time.time() - t0 < HEARTBEAT_TIMEOUT + 1.0
    # silent only once rank 0 has waited for the heartbeat timeout (the margin: the
    # step's data and compute before the hook ran)
    assert asked - t0 > HEARTBEAT_TIMEOUT - 0.5, f"named after {asked - t0:.2f}s"
    assert re.fullmatch(
        rf"not ready: job {job} rank 1 down \(silent: step 60 not done in \d+\.\ds, "
        r"rank 0 waits\)\n",
        body,
    ), body
    # what the ranks wrote: rank 0 waits in the collectives of step 60, rank 1 is still
    # in step 60's own work and, its event loop running, keeps writing that
    live = {r: json.loads((run_dir / "live" / f"rank-{r}.json").read_text()) for r in (0, 1)}
    assert (live[0]["phase"], live[0]["step"]) == ("collective", 59)
    assert (live[1]["phase"], live[1]["step"]) == ("step", 59)
    assert live[1]["since"] <= t0 < live[1]["t"] - 1.0
    j = f'job="{job}"'
    got = _series(http_get(address, "/metrics")[1])
    assert got[f'zerotrain_rank_up{{{j},rank="1"}}'] == 0.0
    assert got[f'zerotrain_rank_up{{{j},rank="0"}}'] == 1.0
    # the computation ends: the step completes, the rank is up again, nothing restarted
    gate.touch()
    got = _wait_metrics(
        address,
        lambda m: (
            m.get(f"zerotrain_step{{{j}}}", 0) >= 80
            and m.get(f'zerotrain_rank_up{{{j},rank="1"}}') == 1.0
        ),
    )
    assert http_get(address, "/readyz") == (200, "ready\n")
    assert f'zerotrain_restarts_total{{{j},reason="crash"}}' not in got
    assert d.cli("cancel", job, "--wait").returncode == 0
