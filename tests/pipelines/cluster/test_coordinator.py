"""The Coordinator's choice of a restore point (the heart of "nothing lost")."""

from __future__ import annotations

import dataclasses
import io
import json

import trio

import actors
from pipelines.cluster.coordinator import Coordinator, FaultLog, Recovery
from pipelines.cluster.messages import (
    ChaosFired,
    EvalReported,
    Held,
    Join,
    RankFinished,
    Rejected,
    ShardWritten,
)
from pipelines.config import ClusterConfig, Config, config_hash, resume_fields, resume_hash
from pipelines.core import RunIdentity
from pipelines.store.rundir import Progress, RunDir


def coordinator(tmp_path, world=4, resume=None, patience=0):
    cfg = Config().replace(cluster=ClusterConfig(ranks=world))
    if patience:
        stopping = dataclasses.replace(cfg.eval.early_stopping, patience=patience, metric="loss")
        cfg = cfg.replace(eval=dataclasses.replace(cfg.eval, early_stopping=stopping))
    return Coordinator(
        cfg,
        RunDir(tmp_path),
        Progress(10, 1, io.StringIO()),
        resume=resume,
        events=[],
        identity=RunIdentity(
            pipeline=cfg.name,
            n_params=10,
            shapes={"w": [10]},
            optimizer=cfg.optimizer.name,
            optimizer_state=["exp_avg", "exp_avg_sq"],
            dataset={"name": "digits", "train_samples": 100, "meta": {}},
            resume_config=resume_fields(cfg),
            config_hash=config_hash(cfg),
            resume_hash=resume_hash(cfg),
        ),
    )


def held(own=(), replica=()):
    return Held(list(own), list(replica))


def test_the_newest_step_every_shard_of_which_survives_is_chosen(tmp_path):
    c = coordinator(tmp_path)
    # rank 2 was replaced (holds nothing); its right neighbour, rank 3, holds its
    # replicas of steps 10 and 20, but only the others' own snapshots of 20 and 30
    survivors = held(own=[10, 20, 30], replica=[10, 20, 30])
    state = {0: survivors, 1: survivors, 2: held(), 3: held(own=[10, 20, 30], replica=[10, 20])}
    assert c._restore_point(state) == ("memory", 20, None, None)


def test_two_neighbours_lost_falls_back_to_disk_then_to_the_seed(tmp_path):
    import numpy as np

    from pipelines.store.checkpoint import save_checkpoint

    survivors = held(own=[10, 20], replica=[10, 20])
    state = {0: survivors, 1: held(), 2: held(), 3: survivors}  # rank 1's replica died too
    fresh = coordinator(tmp_path / "fresh")
    assert fresh._restore_point(state) == ("init", 0, None, None)  # no checkpoint on disk yet
    c = coordinator(tmp_path / "run")
    tensors = {"params": np.zeros(10, np.float32)}
    save_checkpoint(c.ckpt_root, 10, [(0, 10, tensors)], 10, {"mode": "zero2"})
    source, step, path, _ = c._restore_point(state)
    assert (source, step, path.name) == ("disk", 10, "step-00000010")


def test_a_fresh_start_takes_the_resume_checkpoint(tmp_path):
    import numpy as np

    from pipelines.store.checkpoint import save_checkpoint

    root = tmp_path / "old"
    tensors = {"params": np.arange(10, dtype=np.float32)}
    save_checkpoint(root, 7, [(0, 10, tensors)], 10, {"mode": "ddp"})
    c = coordinator(tmp_path / "run", world=2, resume=root)
    source, step, path, _ = c._restore_point({0: held(), 1: held()})
    assert (source, step, path.name) == ("disk", 7, "step-00000007")
    # once this run has checkpointed, its own newer checkpoint is taken, not the resume's
    save_checkpoint(c.ckpt_root, 9, [(0, 10, tensors)], 10, {"mode": "ddp"})
    source, step, path, _ = c._restore_point({0: held(), 1: held()})
    assert (source, step, path) == ("disk", 9, c.ckpt_root / "step-00000009")


async def test_messages_the_coordinator_cannot_act_on_are_rejected_or_dropped(tmp_path, caplog):
    # each would raise in the Coordinator -- a rank past the world, a chaos event it does
    # not know, an evaluation without the early-stopping metric -- and its crash would
    # fail the run
    c = coordinator(tmp_path, world=2, patience=2)
    info = {"file": "f", "rank": 2, "lo": 0, "hi": 1, "bytes": 4, "sha256": "0"}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ref = await actors.spawn(nursery, c)
            for bad in (Join(2, 4242, held()), ChaosFired(99, 4242), RankFinished(5, {"rank": 5})):
                answer = await actors.call(ref, bad)
                assert isinstance(answer, Rejected) and type(bad).__name__ in answer.reason
            await actors.cast(ref, EvalReported(4, {"accuracy": 0.5}))  # no "loss"
            await actors.cast(ref, ShardWritten(2, 5, info, {}, 0))  # ranks are 0 and 1
            assert isinstance(await actors.call(ref, None), Rejected)  # alive, casts handled
            nursery.cancel_scope.cancel()
    assert ref.dropped == 2 and c.rejected == 4
    # logged the 1st, 2nd and 4th time, not each time: a flood must not flood the log
    logged = [r.getMessage() for r in caplog.records if r.name == "zerotrain.actors"]
    assert [line.split("(")[-1] for line in logged if "rejected a call" in line] == [
        "1 so far)",
        "2 so far)",
        "4 so far)",
    ]
    assert len([line for line in logged if " dropped " in line]) == 2
    assert c.state is Recovery.STARTING and not c.outcome.done.is_set()


EVENTS = [
    {"id": 0, "kind": "kill", "rank": 2, "step": 3},
    {"id": 1, "kind": "kill", "rank": 3, "step": 9},
]


def test_a_fault_log_continued_by_a_coordinator_started_again(tmp_path):
    """Node 0 lost and started again: the new FaultLog takes its predecessor's faults and
    restarts from live/faults.json, no longer offers the events that fired, and adds the
    loss of node 0's ranks, which the next generation's restore point completes."""
    earlier = FaultLog(EVENTS)
    earlier.fired(0, 3, 1)
    earlier.down(2, "noconnection", 3, 1)
    earlier.restored(2, "memory")
    faults = tmp_path / "faults.json"
    records = [f.record() for f in earlier.faults]
    faults.write_text(json.dumps({"faults": records, "restarts": earlier.restarts}))
    log = FaultLog(EVENTS)
    log.continue_from(faults, range(0, 2), 6, 0)
    assert [e["id"] for e in log.pending()] == [1]
    assert [(f.kind, f.rank) for f in log.faults] == [
        ("kill", 2),
        ("node_lost", 0),
        ("node_lost", 1),
    ]
    assert log.restarts == 3
    log.restored(4, "memory")
    assert log.faults[0].record() == records[0]  # as its Coordinator recorded it
    assert [(f.steps_replayed, f.restored_from) for f in log.faults[1:]] == [(2, "memory")] * 2
    # killed before it wrote anything whole: only the loss
    faults.write_text('{"faults": [')
    log = FaultLog(EVENTS)
    log.continue_from(faults, range(0, 2), 6, 0)
    assert [f.kind for f in log.faults] == ["node_lost"] * 2
    assert (log.restarts, len(log.pending())) == (2, 2)


def test_the_same_error_a_step_apart_after_a_restore_is_the_same_steps(tmp_path):
    """A rank's crash can reach the Coordinator before rank 0's record of the step before
    it: the same error one logged step apart, a generation later, is a repeat."""
    c = coordinator(tmp_path / "a", world=2)
    c.local_ranks = range(2)
    why = "TransformError: raised at step 12 on rank 1"
    c.generation, c.at_step = 1, 11
    assert not c._crashed_before(1, why)  # first time: a restore
    c.generation, c.at_step = 2, 10  # replaying: step 11's record not in yet
    assert c._crashed_before(1, why)
    assert c.outcome.failure.startswith(
        f"rank 1 failed again at step 11 with the same error after a restore ({why}); "
    )
    other = coordinator(tmp_path / "b", world=2)
    other.local_ranks = range(2)
    other.generation, other.at_step = 1, 11
    assert not other._crashed_before(1, why)
    other.generation, other.at_step = 2, 9  # two steps before: another step's
    assert not other._crashed_before(1, why)
