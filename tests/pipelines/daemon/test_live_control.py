"""Live control of a daemon's running job from the command line: `zerotrain checkpoint`,
`zerotrain set` and `zerotrain hook attach|detach` reach the job's run over its own
cluster endpoint (pipelines.cluster.live), and the job ends with the bits of `zerotrain
run` given the overrides it recorded (and no hook) -- across a stop and a resume too."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipelines.cluster.live import call_run
from pipelines.cluster.messages import RunStatus
from pipelines.daemon import protocol
from pipelines.daemon.client import call, wait_until_settled
from pipelines.daemon.statedir import DaemonUsageError
from pipelines.store import checkpoint as ckpt_mod

from .conftest import SMALL

pytestmark = pytest.mark.slow

# a continuous job: it trains until the test ends it with `set train.steps=N`, so no
# request races the job's end however fast the machine is
JOB = [
    *SMALL,
    "--steps", "0",
    "--set", "schedule.total_steps=5000",
    "--set", "checkpoint.every=500",
    "--set", "checkpoint.keep_last=50",  # the asked-for checkpoint stays to be checked
]  # fmt: skip
CHECKPOINTED = re.compile(r"job (\d+) \(job-\d+\): checkpoint at step (\d+): (\S+)\n")
HOOKED = re.compile(r"job \d+ \(job-\d+\): (.+) step (\d+) \(records in (\S+)\)\n")
SET = re.compile(
    r"job \d+ \(job-\d+\): optimizer\.lr = ([0-9.]+) from step (\d+) \(recorded in (\S+)\)\n"
)


PROBE = Path(__file__).resolve().parents[1] / "live_probe.py"  # probe and halve


def test_checkpoint_set_and_hooks_of_a_running_job_and_its_resume_replaying_them(
    daemon_factory, reference_hash, tmp_path
):
    d = daemon_factory("--cpus", "2")
    job = d.submit(*JOB)
    d.wait_for(job, {"running"}, step=5)

    r = d.cli("checkpoint", job)
    assert r.returncode == 0, r.stderr
    found = CHECKPOINTED.fullmatch(r.stdout)
    assert found and int(found[1]) == job, r.stdout
    step, manifest = int(found[2]), Path(found[3])
    assert step >= 5 and manifest.name == "manifest.json"
    assert ckpt_mod.verify_checkpoint(manifest.parent)["step"] == step

    r = d.cli("set", job, "optimizer.lr=0.01")
    assert r.returncode == 0, r.stderr
    found = SET.fullmatch(r.stdout)
    assert found and float(found[1]) == 0.01 and int(found[2]) > step, r.stdout
    overrides = Path(found[3])

    r = d.cli("set", job, "model.hidden=[8]")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r
    assert "model.hidden: cannot be changed while a job runs; the keys that can: " in r.stderr
    assert "optimizer.lr, " in r.stderr and "train.steps" in r.stderr
    for key, value, at, says in (  # (the same refusals from this process: faster)
        ("optimizer.lr", "-1", None, "optimizer.lr: expected a number > 0.0, got -1"),
        ("optimizer.lr", "0.1", 1, "--at-step 1 is past"),
    ):
        with pytest.raises(DaemonUsageError, match=re.escape(says)):
            call(d.state_dir, protocol.SetKey(str(job), key, value, at), timeout=60)
    assert len(overrides.read_text().splitlines()) == 1  # nothing changed by the refusals

    r = d.cli("hook", "attach", job, f"{PROBE}:halve")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r
    assert "halve: a transform cannot be attached live" in r.stderr
    r = d.cli("hook", "attach", job, f"{PROBE}:probe")
    assert r.returncode == 0, r.stderr
    found = HOOKED.fullmatch(r.stdout)
    assert found and found[1] == "attached probe: the steps after", r.stdout
    attached = int(found[2])
    r = d.cli("hook", "detach", job, "probe")
    assert r.returncode == 0, r.stderr
    found = HOOKED.fullmatch(r.stdout)
    assert found and found[1] == "detached probe: no step after", r.stdout
    detached, hooks = int(found[2]), Path(found[3])

    # Overrides of steps the job reaches only after a stop and a resume, which must
    # replay them there. A tiny job trains thousands of steps a second: these requests
    # go through the control endpoint from this process, a few ms apart, and `later` is
    # 2000 steps past where the run is now (its own word, not the daemon's 1 s poll).
    now = call_run(overrides.parent, RunStatus())["step"]
    later = now + 2000
    for key, value, at in (("optimizer.lr", "0.002", later), ("train.steps", later + 100, None)):
        reply = call(d.state_dir, protocol.SetKey(str(job), key, str(value), at), timeout=60)
        assert reply["step"] == at if at else reply["step"] < later, reply
    call(d.state_dir, protocol.Control("stop", str(job)))
    assert wait_until_settled(d.state_dir, str(job), 120)["state"] == "stopped"
    assert d.status(job)["step"] < later
    # an exact analyzer: a record for every step it was attached for
    seen = [json.loads(x)["step"] for x in hooks.read_text().splitlines()]
    assert seen == list(range(attached + 1, detached + 1))
    r = d.cli("checkpoint", job)
    assert r.returncode == 2 and "is stopped; checkpoint accepts a running job" in r.stderr
    assert d.cli("resume", job).returncode == 0
    status = d.wait_for(job, {"done"}, timeout=300)
    assert status["step"] == later + 100

    records = [json.loads(line) for line in overrides.read_text().splitlines()]
    assert [(o["key"], o["value"]) for o in records] == [
        ("optimizer.lr", 0.01),
        ("optimizer.lr", 0.002),
        ("train.steps", later + 100),
    ]
    assert records[1]["step"] == later
    # the LR override changed the training: ten times the schedule's LR (within its
    # slow decay) from the step after the one it was set for
    lrs = {}
    for line in (overrides.parent / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        lrs[rec["step"]] = rec["lr"]
    first = records[0]["step"]
    assert lrs[first + 1] == pytest.approx(10 * lrs[first], rel=0.02)
    # the reference: `zerotrain run` given the recorded file (no stop, no hook)
    assert status["params_sha256"] == reference_hash(*JOB, "--overrides", overrides)
