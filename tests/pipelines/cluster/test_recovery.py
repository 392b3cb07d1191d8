"""Ranks die and training goes on, losing nothing (issue 5): real rank processes, real
signals (SIGKILL, SIGSTOP) at many points of the step, and the final parameters' SHA-256
equal to the fault-free run's. SIGTERM to a rank is a planned stop: resumed, it loses
nothing either."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.pipelines.cli_util import zerotrain

from .cluster_util import SMALL, run

WORLD = ["--ranks", "4", "--mode", "zero2"]


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory):
    return run(tmp_path_factory.mktemp("ref") / "run", *WORLD)["params_sha256"]


CASES = {
    "kill at the start of a step": "kill:rank=1,step=6",
    "kill mid-forward/backward": "kill:rank=0,step=3,at=compute",
    "kill mid-reduce-scatter": "kill:rank=2,step=7,at=reduce",
    "kill mid-all-gather": "kill:rank=3,step=9,at=gather",
    "kill during a checkpoint write": "kill:rank=3,step=10,at=checkpoint",
    "two neighbours at once (disk fallback)": "kill:rank=1,step=7;kill:rank=2,step=7",
    "slow link and straggler, then a kill": "delay:rank=1,ms=5;straggler:rank=2,factor=2;"
    "kill:rank=3,step=13",
}


@pytest.mark.parametrize("spec", list(CASES.values()), ids=list(CASES))
def test_a_fault_loses_nothing(spec, fault_free, tmp_path):
    summary = run(tmp_path / "run", *WORLD, "--chaos", spec, command="simulate")
    assert summary["params_sha256"] == fault_free
    faults = json.loads((tmp_path / "run" / "recovery.json").read_text())["faults"]
    kills = spec.count("kill:")
    assert len(faults) == kills == summary["restarts"]
    for fault in faults:
        assert fault["detection_s"] is not None and fault["detection_s"] >= 0
        assert fault["recovery_s"] is not None and fault["recovery_s"] > 0
        assert fault["steps_replayed"] is not None
    if "rank=2,step=7;" in spec or "rank=1,step=7;" in spec:
        assert {f["restored_from"] for f in faults} == {"disk"}
    else:
        assert {f["restored_from"] for f in faults} == {"memory"}
        # from the newest snapshot (every 4 steps) whose shards all survived: at worst the
        # one before it, if the newest was still being replicated -- never from scratch
        for fault in faults:
            assert 0 <= fault["steps_replayed"] < 2 * 4, fault


def test_a_sigterm_to_one_rank_is_a_planned_stop_that_loses_nothing(fault_free, tmp_path):
    """SIGTERM reaching one rank (as scancel sends it) stops the whole run at one step,
    checkpointed (exit 4); its resume ends with the fault-free bits."""
    run_dir = tmp_path / "run"
    stopped = run(run_dir, *WORLD, "--chaos", "term:rank=1,step=9", command="simulate",
                  expect=4)  # fmt: skip
    last = stopped["stderr"].splitlines()[-1]
    assert last.startswith("zerotrain simulate: stopped at step ") or last.startswith(
        "zerotrain run: stopped at step "
    ), last
    assert "(SIGTERM to rank 1)" in last and f"continue with --resume {run_dir}" in last
    summary = run(run_dir, *WORLD, "--resume", str(run_dir))
    assert summary["params_sha256"] == fault_free


def test_a_hung_rank_is_detected_killed_and_replaced(fault_free, tmp_path):
    summary = run(
        tmp_path / "run",
        *WORLD,
        "--set",
        "cluster.heartbeat_timeout=1.0",
        "--chaos",
        "stall:rank=2,step=6,seconds=8",
        command="simulate",
    )
    assert summary["params_sha256"] == fault_free
    (fault,) = json.loads((tmp_path / "run" / "recovery.json").read_text())["faults"]
    assert fault["kind"] == "stall" and summary["restarts"] == 1
    assert 0.5 <= fault["detection_s"] < 8  # missed heartbeats, not the SIGCONT


def test_random_kills_lose_nothing(fault_free, tmp_path):
    summary = run(
        tmp_path / "run",
        *WORLD,
        "--set",
        "cluster.max_restarts=10",
        "--chaos",
        "random-kill:every=4,seed=7",
        command="simulate",
    )
    assert summary["params_sha256"] == fault_free
    assert summary["restarts"] == 3  # steps 4, 8, 12


def test_restart_intensity_exceeded_stops_cleanly(tmp_path):
    out = run(
        tmp_path / "run",
        "--ranks",
        "2",
        "--set",
        "cluster.max_restarts=1",
        "--set",
        "checkpoint.every=2",
        "--chaos",
        "kill:rank=1,step=11;kill:rank=1,step=12;kill:rank=1,step=13",
        command="simulate",
        expect=3,
    )
    last = out["stderr"].strip().splitlines()[-1]
    assert "training failed" in last and "rank1" in last and "SIGKILL" in last
    # the last good checkpoint is named and kept (a torn newer one may sit beside it);
    # by step 11 the writes of steps 2..8 have long finished, so there is one
    kept = last.rsplit("last good checkpoint: ", 1)[1]
    from pipelines.store.checkpoint import latest_valid

    newest = latest_valid(tmp_path / "run" / "checkpoints").path
    assert newest is not None and kept == str(newest), last
    assert zerotrain("ckpt", "verify", kept).returncode == 0


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(fault_free, tmp_path):
    base = tmp_path / "base"
    done = run(base, *WORLD, "--set", "checkpoint.keep_last=3")
    for damage in ("flip", "truncate", "no-manifest"):
        d = tmp_path / damage
        shutil.copytree(base, d)
        ckpts = sorted((d / "checkpoints").iterdir())
        shutil.rmtree(ckpts[-1])  # the final one: resume must do real work
        newest = ckpts[-2]  # step 15; step 10 is the fallback
        shard = newest / "shard-00001-of-00004.safetensors"
        if damage == "flip":
            data = bytearray(shard.read_bytes())
            data[-7] ^= 0x10
            shard.write_bytes(data)
        elif damage == "truncate":
            shard.write_bytes(shard.read_bytes()[:-100])
        else:
            (newest / "manifest.json").unlink()
        (d / "summary.json").unlink()
        proc = zerotrain("run", "mlp_classifier", *SMALL, *WORLD, "--run-dir", str(d), "--resume")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "skipping checkpoint" in proc.stderr and newest.name in proc.stderr
        assert "resumed at step 10 from" in proc.stderr
        summary = json.loads((d / "summary.json").read_text())
        assert summary["params_sha256"] == done["params_sha256"] == fault_free


def test_a_short_stall_is_waited_out_without_a_restart(fault_free, tmp_path):
    summary = run(
        tmp_path / "run", *WORLD, "--chaos", "stall:rank=1,step=5,seconds=0.3", command="simulate"
    )
    assert summary["params_sha256"] == fault_free and summary["restarts"] == 0
    (fault,) = json.loads((tmp_path / "run" / "recovery.json").read_text())["faults"]
    assert fault["kind"] == "stall" and fault["detection_s"] is None
    assert fault["recovery_s"] >= 0.3 and fault["steps_replayed"] == 0


def test_a_rank_stuck_with_live_heartbeats_is_killed_and_replaced(fault_free, tmp_path):
    """Its step never ends but its process answers heartbeats: the others' collective
    times out, they rejoin, and the coordinator kills the one that does not."""
    summary = run(
        tmp_path / "run",
        *WORLD,
        "--set",
        "cluster.collective_timeout=1.5",
        "--chaos",
        "hang:rank=3,step=6",
        command="simulate",
    )
    assert summary["params_sha256"] == fault_free and summary["restarts"] == 1
    (fault,) = json.loads((tmp_path / "run" / "recovery.json").read_text())["faults"]
    assert fault["kind"] == "hang" and fault["detection_s"] >= 1.5
