"""The cluster protocol's records (pipelines.cluster.messages): what a malformed message
meets -- a reason, never a crashed actor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trio

import actors
from pipelines.cluster import messages as m
from pipelines.cluster.main import TOKEN_FILE

from .cluster_util import SMALL, run


def snapshot(step=4):
    tensors = {"params": np.arange(3, dtype=np.float32), "m": np.zeros(3, np.float32)}
    return m.Snapshot(1, step, tensors, {"steps_applied": 4, "skipped": 0})


def shard_info():
    return {"file": "rank0.safetensors", "rank": 0, "lo": 0, "hi": 3, "bytes": 12, "sha256": "0"}


STEP_RECORD = {
    "step": 3,
    "loss": 1.5,
    "lr": 0.1,
    "samples_per_s": 9.0,
    "skipped": False,
    "generation": 1,
    "eval": None,
}

WIRE = {  # one of each record that crosses between processes
    "Held": lambda: m.Held([4, 8], [8]),
    "Plan": lambda: m.Plan(2, 8, "memory", None, [{"id": 0, "kind": "kill"}]),
    "Join": lambda: m.Join(1, 4242, m.Held([8], [])),
    "StepLogged": lambda: m.StepLogged(dict(STEP_RECORD)),
    "EvalReported": lambda: m.EvalReported(4, {"loss": 0.5}),
    "StopQuery": lambda: m.StopQuery(4),
    "RankFinished": lambda: m.RankFinished(1, {"rank": 1, "step": 16}),
    "ChaosFired": lambda: m.ChaosFired(0, 4242),
    "ShardWritten": lambda: m.ShardWritten(0, 5, shard_info(), {"steps_applied": 5}, 1),
    "RegroupCalled": lambda: m.RegroupCalled(3),
    "Snapshot": snapshot,
    "ReplicaWanted": lambda: m.ReplicaWanted(1, 4),
    "ReplicaAck": lambda: m.ReplicaAck(4),
    "Rejected": lambda: m.Rejected("no"),
}


@pytest.mark.parametrize("name", list(WIRE))
def test_a_record_that_crosses_processes_comes_back_equal(name):
    record = WIRE[name]()
    back = actors.from_wire(*actors.to_wire(record))
    assert type(back) is type(record)
    if name == "Snapshot":
        assert back.tensors.keys() == record.tensors.keys()
        assert all(np.array_equal(back.tensors[k], v) for k, v in record.tensors.items())
    else:
        assert back == record


def received(data):
    """What a node makes of `data` as the body of a message: a record or WireError."""
    return actors.from_wire(data, [])


@pytest.mark.parametrize(
    "data, field",
    [
        ({"$r": "cluster.Join", "f": {"rank": -1, "pid": 5, "held": None}}, "Join.rank"),
        ({"$r": "cluster.Join", "f": {"rank": 0, "pid": 5, "held": [1]}}, "Join.held"),
        ({"$r": "cluster.RegroupCalled", "f": {"generation": "2"}}, "RegroupCalled.generation"),
        ({"$r": "cluster.RegroupCalled", "f": {"generation": True}}, "RegroupCalled.generation"),
        ({"$r": "cluster.ReplicaAck", "f": {}}, "step"),
        (
            {
                "$r": "cluster.ShardWritten",
                "f": {"rank": 0, "step": 5, "info": {"file": "x"}, "counters": {}, "generation": 1},
            },
            "ShardWritten.info",
        ),  # fmt: skip
        ({"$r": "cluster.StepLogged", "f": {"record": {"step": 0}}}, "StepLogged.record['step']"),
        (
            {
                "$r": "cluster.Snapshot",
                "f": {"rank": 0, "step": 1, "tensors": {"params": [1.0]}, "counters": {}},
            },
            "Snapshot.tensors",
        ),  # fmt: skip
        (
            {
                "$r": "cluster.Plan",
                "f": {"generation": 1, "step": 0, "source": "tape", "path": None, "chaos": []},
            },
            "Plan.source",
        ),  # fmt: skip
        ({"$r": "cluster.Held", "f": {"own": [4, -1], "replica": []}}, "Held.own"),
        ({"$r": "cluster.Held", "f": {"own": [], "replica": ["8"]}}, "Held.replica"),
        (
            {
                "$r": "cluster.Plan",
                "f": {"generation": 1, "step": 0, "source": "init", "path": None, "chaos": [3]},
            },
            "Plan.chaos",
        ),  # fmt: skip
        ({"$r": "cluster.EvalReported", "f": {"step": 0, "metrics": {}}}, "EvalReported.step"),
        ({"$r": "cluster.EvalReported", "f": {"step": 4, "metrics": {1: 0.5}}}, "metrics"),
        ({"$r": "cluster.StopQuery", "f": {"step": 2.5}}, "StopQuery.step"),
        (
            {"$r": "cluster.RankFinished", "f": {"rank": 1, "info": {"rank": 0}}},
            "RankFinished.info['rank']",
        ),  # fmt: skip
        ({"$r": "cluster.ChaosFired", "f": {"event_id": -1, "pid": 5}}, "ChaosFired.event_id"),
        ({"$r": "cluster.ChaosFired", "f": {"event_id": 0, "pid": 0}}, "ChaosFired.pid"),
        (
            {
                "$r": "cluster.ShardWritten",
                "f": {
                    "rank": 0,
                    "step": 5,
                    "info": {
                        "file": "rank0.safetensors",
                        "rank": 0,
                        "lo": 0,
                        "hi": 3,
                        "bytes": 12,
                        "sha256": "0",
                    },
                    "counters": {"n": 1.5},
                    "generation": 1,
                },
            },
            "ShardWritten.counters",
        ),  # fmt: skip
        (
            {
                "$r": "cluster.Snapshot",
                "f": {
                    "rank": 0,
                    "step": 1,
                    "tensors": {"m": np.zeros(3, np.float32)},
                    "counters": {},
                },
            },
            "'params'",
        ),  # fmt: skip
        ({"$r": "cluster.ReplicaWanted", "f": {"rank": -1, "step": 4}}, "ReplicaWanted.rank"),
        (
            {"$r": "cluster.StepLogged", "f": {"record": {**STEP_RECORD, "loss": "1.5"}}},
            "StepLogged.record['loss']",
        ),  # fmt: skip
        (
            {"$r": "cluster.StepLogged", "f": {"record": {**STEP_RECORD, "skipped": 0}}},
            "StepLogged.record['skipped']",
        ),  # fmt: skip
    ],
)
def test_a_malformed_record_is_refused_by_the_codec_naming_the_field(data, field):
    # the node turns this WireError into a rejected message: no actor ever sees it
    with pytest.raises(actors.WireError) as err:
        received(data)
    assert field in str(err.value) and len(str(err.value).splitlines()) == 1


def test_a_record_built_with_a_bad_field_says_what_is_accepted():
    with pytest.raises(m.BadMessage, match=r"TakeSnapshot.to_disk: expected a bool, got int 1"):
        m.TakeSnapshot(4, 1)
    with pytest.raises(m.BadMessage, match=r"RestoreState: source 'memory' needs a Snapshot"):
        m.RestoreState("memory", 4)


# ---------------------------------------------------------------------------------------
# A live run: malformed messages to every role actor (issue 21, case 4)
# ---------------------------------------------------------------------------------------

ROLES = ("Trainer", "Checkpointer", "Optimizer", "DataLoader", "HookSampler")
# a slow link (50 ms a collective) keeps the 2 ranks training for a few seconds: time to
# knock; it changes no number (test_recovery's slow-link case has the fault-free hash)
LIVE = ["--ranks", "2", "--mode", "zero2", "--steps", "30"]


def start(run_dir: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("OPENBLAS_NUM_THREADS", None)
    argv = [sys.executable, "-m", "pipelines.cli", "simulate", "mlp_classifier", *SMALL, *LIVE]
    argv += ["--chaos", "delay:rank=1,ms=50", "--run-dir", str(run_dir)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def wait_training(run_dir: Path, proc: subprocess.Popen) -> str:
    """The run's ipc directory, once its first step is logged."""
    with trio.fail_after(120):
        while not (run_dir / "metrics.jsonl").exists() or not (
            (run_dir / "metrics.jsonl").read_text().strip()
        ):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            await trio.sleep(0.05)
    ring0 = json.loads((run_dir / "plan.json").read_text())["endpoints"][0]
    return os.path.dirname(ring0.removeprefix("ipc://"))


async def test_malformed_messages_to_a_rank_are_rejected_or_dropped_and_the_run_goes_on(
    tmp_path,
):
    reference = run(tmp_path / "ref", *LIVE)["params_sha256"]
    proc = start(tmp_path / "run")
    try:
        ipc_dir = await wait_training(tmp_path / "run", proc)
        answers = {}
        # the run's token: a node of the same user, not a stranger (test_hostile_run)
        token = (Path(ipc_dir) / TOKEN_FILE).read_text()
        async with actors.open_node("intruder", directory=ipc_dir, token=token):
            for rank in (0, 1):
                for role in ROLES:
                    await actors.cast(f"{role}@rank{rank}", None)
                    await actors.cast(f"{role}@rank{rank}", ("regroup", 99))
            await actors.cast("Coordinator@cluster", None)
            for target in [f"{r}@rank{k}" for k in (0, 1) for r in ROLES] + [m.COORDINATOR]:
                # behind the casts in the same mailbox: the reply shows they were handled
                answers[target] = await actors.call(target, None, timeout=30)
        out, err = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=180))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()[-3000:]
    for target, answer in answers.items():
        assert isinstance(answer, m.Rejected), (target, answer)
        assert target.split("@")[0] in answer.reason and "NoneType" in answer.reason
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["restarts"] == 0
    assert summary["params_sha256"] == reference
    # the ranks' own log lines go to the run dir's ranks.log, not the terminal
    assert "Trainer 0] dropped NoneType None" in (tmp_path / "run" / "ranks.log").read_text()
