"""Losing the Coordinator's host (pipelines.cluster.nodes): two `zerotrain run` agents,
node 0 (the master, 127.0.0.2) and node 1 (127.0.0.3); node 0's agent and ranks are
SIGKILLed (its process group) mid-run. Node 1 keeps its ranks and their snapshots --
with the replicas of node 0's ranks -- and waits; node 0 started again with the same
flags rebuilds the run from node 1's reports and ends with the bits of one host, from
memory; with no replica left, from the last checkpoint; not back within
cluster.rejoin_timeout, node 1 exits 3 in one line naming node 0. And a partition (two
network namespaces, the link set down, then up: marker netns, root): node 1's ranks
stop their step and wait; after the heal the run ends with the bits of one host."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from pipelines.store import checkpoint as ckpt_mod
from tests.pipelines.cli_util import zerotrain
from tests.pipelines.cluster.cluster_util import (
    agent,
    finish,
    free_port,
    params_sha256,
    rank_pids,
    reference_sha,
    wait_for_line,
    wait_for_steps,
)
from tests.pipelines.cluster.test_netns import netns_pair  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow

STEPS = 24
RUN = ("run", "char_lm", "--ranks", "4", "--mode", "zero2", "--steps", str(STEPS), "--seed", "11",
       "--set", "cluster.snapshot_every=4")  # fmt: skip


@pytest.fixture(scope="module")
def one_host_sha(tmp_path_factory) -> str:
    """The bits of the same run on one host (--ranks 4)."""
    return reference_sha(tmp_path_factory, *RUN)


def _lose_node_0(run_dir: Path, tmp_path: Path, extra=(), before=None) -> tuple[list, dict]:
    """Two agents train RUN; once 6 steps are logged (past the snapshot of step 4:
    cluster.snapshot_every) and `before(agents)` has returned, node 0's agent and ranks
    are SIGKILLed (its process group), and node 1 has seen it lost: (node 0's
    arguments, the agents left)."""
    master = f"127.0.0.2:{free_port()}"
    common = [*RUN, *extra, "--nodes", "2", "--master", master, "--run-dir", str(run_dir)]
    node0 = [*common, "--node-rank", "0"]
    node1 = [*common, "--node-rank", "1", "--advertise-addr", "127.0.0.3"]
    agents = {
        "node1": agent(node1, {}, tmp_path, "node1"),
        "node0": agent(node0, {}, tmp_path, "node0"),
    }
    try:
        wait_for_steps(run_dir, agents, 6)
        if before is not None:
            before(agents)
        lost = agents.pop("node0")
        os.killpg(lost.pid, signal.SIGKILL)
        lost.wait()
        wait_for_line(tmp_path / "node1.err", f"node 0 at tcp://{master} lost", agents)
    except BaseException:
        finish(agents)
        raise
    return node0, agents


def _resumed(err: str) -> list[tuple[int, str]]:
    return [(int(s), how) for s, how in re.findall(r"resuming at step (\d+) from (\w+)", err)]


def test_node_0_lost_and_started_again_continues_from_memory_to_the_bits_of_one_host(
    tmp_path, one_host_sha
):
    """Node 0 (the Coordinator's) SIGKILLed: node 1 keeps its ranks, their snapshots and
    the replicas of node 0's ranks; node 0 started again with the same flags takes its
    ranks' endpoints again, learns the run from the joins, and the run goes on from
    memory -- the snapshot of step 4 or later -- to the bits of one host; metrics.jsonl
    holds each step once (the replayed ones are not logged again)."""
    run_dir = tmp_path / "run"
    node0, agents = _lose_node_0(run_dir, tmp_path)
    agents["node0"] = agent(node0, {}, tmp_path, "node0-again")
    results = finish(agents)
    code0, err0 = results["node0"]
    assert code0 == 0, err0
    assert results["node1"][0] == 0, results["node1"][1]
    assert "node 0 started again in a running run" in err0
    assert "node 0 is back" in results["node1"][1]
    resumed = _resumed(err0)
    assert resumed and resumed[0][1] == "memory" and resumed[0][0] >= 4, err0
    assert params_sha256(run_dir) == one_host_sha
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert logged == list(range(1, STEPS + 1))


def _recovered_crash(run_dir: Path, agents: dict) -> None:
    """SIGKILL a rank of node 1 and wait until node 0's live/faults.json has its crash
    recovered."""
    os.kill(rank_pids(agents["node1"].pid)[0], signal.SIGKILL)
    faults = run_dir / "live" / "faults.json"
    deadline = time.monotonic() + 240
    while not any(f["recovery_s"] is not None for f in _faults(faults)):
        assert time.monotonic() < deadline, "the crash was never recovered"
        for name, proc in agents.items():
            assert proc.poll() is None, f"{name} ended: {proc.err_path.read_text()[-2000:]}"
        time.sleep(0.1)


def _faults(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["faults"]
    except (OSError, ValueError):
        return []


def test_the_faults_before_node_0_was_lost_and_its_loss_are_in_the_runs_record(
    tmp_path, one_host_sha
):
    """A rank of node 1 crashes and is replaced; then node 0 is lost and started again.
    recovery.json, which the new Coordinator writes, holds the crash its predecessor
    recorded and the loss of node 0's ranks 0 and 1, each with where the run restored
    from and its recovery time; the restarts count all three; the bits are one host's."""
    run_dir = tmp_path / "run"
    node0, agents = _lose_node_0(run_dir, tmp_path, before=lambda a: _recovered_crash(run_dir, a))
    agents["node0"] = agent(node0, {}, tmp_path, "node0-again")
    results = finish(agents)
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    recovery = json.loads((run_dir / "recovery.json").read_text())
    kinds = [(f["kind"], f["rank"]) for f in recovery["faults"]]
    assert len(kinds) == 3 and kinds[0][0] == "crash" and kinds[0][1] in (2, 3), kinds
    assert kinds[1:] == [("node_lost", 0), ("node_lost", 1)], kinds
    for fault in recovery["faults"]:
        assert fault["recovery_s"] is not None and fault["restored_from"], fault
    assert recovery["restarts"] == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 3
    assert summary["params_sha256"] == one_host_sha


def test_a_stop_signal_to_node_1_while_node_0_is_lost_stops_node_1_at_once_in_one_line(
    tmp_path,
):
    """SIGTERM to node 1's agent while it waits for the lost node 0: no Coordinator can
    agree a step, so node 1 stops its ranks and exits 4 now (not after
    cluster.rejoin_timeout), in one line naming the checkpoint to resume from."""
    run_dir = tmp_path / "run"
    extra = ("--set", "cluster.rejoin_timeout=600", "--set", "checkpoint.every=5")
    _, agents = _lose_node_0(run_dir, tmp_path, extra=extra)
    ranks = rank_pids(agents["node1"].pid)
    assert ranks
    os.kill(agents["node1"].pid, signal.SIGTERM)
    code, err = finish(agents, timeout=120)["node1"]
    assert code == 4, err
    last = err.strip().splitlines()[-1]
    step_5 = ckpt_mod.checkpoint_dir(run_dir / "checkpoints", 5)
    assert last == (
        "zerotrain run: stopped (SIGTERM to the agent of node 1) while node 0 is lost: "
        f"no step could be agreed; last good checkpoint: {step_5}"
    )
    assert not [pid for pid in ranks if Path(f"/proc/{pid}").exists()]


def test_node_0_lost_with_a_rank_of_node_1_restores_from_the_last_checkpoint_exactly(
    tmp_path, one_host_sha
):
    """Node 0 lost and rank 2 (node 1) killed too: rank 0's replica was rank 2's and rank
    2's was rank 0's, so no step survives in memory; node 0 started again forms the run
    from the last checkpoint on disk, and it still ends with the bits of one host."""
    run_dir = tmp_path / "run"
    node0, agents = _lose_node_0(run_dir, tmp_path, ["--set", "checkpoint.every=4"])
    try:
        os.kill(rank_pids(agents["node1"].pid)[0], signal.SIGKILL)  # rank 2
        agents["node0"] = agent(node0, {}, tmp_path, "node0-again")
    finally:
        results = finish(agents)
    code0, err0 = results["node0"]
    assert code0 == 0, err0
    assert results["node1"][0] == 0, results["node1"][1]
    resumed = _resumed(err0) or [
        (int(s), "disk") for s in re.findall(r"resumed at step (\d+) from \S+", err0)
    ]
    assert resumed and resumed[0][1] == "disk" and resumed[0][0] >= 4, err0
    assert params_sha256(run_dir) == one_host_sha


def test_node_0_not_back_within_the_rejoin_timeout_ends_node_1_in_one_line_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    extra = ["--set", "cluster.rejoin_timeout=5", "--set", "checkpoint.every=4"]
    _, agents = _lose_node_0(run_dir, tmp_path, extra)
    code, err = finish(agents)["node1"]
    assert code == 3, err
    last = err.splitlines()[-1]
    assert re.fullmatch(
        r"zerotrain run: training failed: node 0 at tcp://127\.0\.0\.2:\d+ lost: not back "
        r"within cluster.rejoin_timeout 5s; last good checkpoint: \S+/checkpoints/step-\d{8}",
        last,
    ), err
    assert _processes_of(run_dir) == []  # node 1 stopped its ranks on its way out


def _processes_of(run_dir: Path) -> list[int]:
    """The live processes whose plan (ZEROTRAIN_PLAN) lies in `run_dir`: its ranks."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        plan = next((v for v in env if v.startswith(b"ZEROTRAIN_PLAN=")), b"")
        if str(run_dir).encode() in plan:
            found.append(int(environ.parent.name))
    return found


# ---------------------------------------------------------------------------------------
# In one process: node 0's record, the Rendezvous's word, the Coordinator's numbering
# ---------------------------------------------------------------------------------------


def _node_0(run_id: str = "r"):
    from pipelines.cluster import nodes
    from pipelines.launch import NodeIdentity

    identity = NodeIdentity(
        nnodes=2, node_rank=0, master_addr="127.0.0.2", master_port=29500,
        ranks_per_node=2, run_id=run_id, launcher="flags",
    )  # fmt: skip
    return nodes.NodeLayout(identity, "127.0.0.2", 29500, "127.0.0.2", range(0, 2), run_id)


TABLES = {
    "0": {"agent": "tcp://127.0.0.2:29500", "ranks": {"0": "tcp://127.0.0.2:7"}, "rings": {}},
    "1": {"agent": "tcp://127.0.0.3:9", "ranks": {"2": "tcp://127.0.0.3:8"}, "rings": {}},
}


@pytest.mark.parametrize(
    "change, started_again",
    [
        ({}, True),
        ({"run_id": "another run"}, False),
        ({"config_hash": "another config"}, False),
        ({"tables": {"0": TABLES["0"]}}, False),  # not every node's part
        ({"summary": True}, False),  # the run ended: a new run is refused the dir
    ],
)
def test_node_0_is_started_again_only_in_a_run_dir_that_holds_this_runs_record(
    tmp_path, change, started_again
):
    from pipelines.cluster import nodes

    record = {"run_id": "r", "config_hash": "h", "tables": TABLES}
    record.update({k: v for k, v in change.items() if k != "summary"})
    (tmp_path / nodes.NODES_RECORD).write_text(json.dumps(record))
    if change.get("summary"):
        (tmp_path / "summary.json").write_text("{}")
    found = nodes.earlier_start(tmp_path, _node_0(), "h")
    assert found == (TABLES if started_again else None)
    assert nodes.earlier_start(tmp_path / "none", _node_0(), "h") is None


def test_a_node_whose_ranks_train_is_refused_by_a_node_0_that_has_no_record_of_the_run():
    """Node 0 started in another run dir cannot put its ranks where node 1's ranks'
    plans name them: node 1's hello "running" is refused in one line saying so; node
    0 started again with its record takes it."""
    from pipelines.cluster import nodes

    hello = {"running": True, "run_id": "r", "node_rank": 1, "nnodes": 2, "ranks": [2, 4],
             "config_hash": "h", "table": TABLES["1"], "generation": 5}  # fmt: skip
    fresh = nodes.Rendezvous(_node_0(), "h", TABLES["0"], fail=None)
    assert fresh._misfit(hello) == (
        "node 1's ranks train in a running run that node 0 has no record of (no nodes.json "
        "of this run in its run dir): start node 0 again with the --run-dir it had"
    )
    again = nodes.Rendezvous(_node_0(), "h", TABLES["0"], fail=None, earlier=TABLES)
    assert again._misfit(hello) is None


def test_a_coordinator_started_again_numbers_its_generation_past_every_one_reported(tmp_path):
    """Node 0's ranks start fresh (generation 0); node 1's trained in generation 3: the
    new Coordinator's first generation is 4, so no ring message of generation 3 can
    pass for one of it -- and it restores node 0's ranks from node 1's replicas."""
    from pipelines.cluster.coordinator import _Join
    from tests.pipelines.cluster.test_coordinator import coordinator, held

    class Caller:
        def reply(self, value):
            self.plan = value

    c = coordinator(tmp_path)
    c.replica_stride = 2  # two nodes of two ranks: replicas on the next node
    node1 = held(own=[10, 20], replica=[10, 20])  # its own, and node 0's ranks'
    reports = {0: (held(), 0), 1: (held(), 0), 2: (node1, 3), 3: (node1, 3)}
    c.joins = {r: _Join(Caller(), 100 + r, h, g) for r, (h, g) in reports.items()}
    callers = [j.from_ for j in c.joins.values()]
    c._form_generation()
    plans = {(p.plan.generation, p.plan.step, p.plan.source) for p in callers}
    assert plans == {(4, 20, "memory")}


# ---------------------------------------------------------------------------------------
# A partition: two hosts as network namespaces (scripts/netns_rig.py), the link cut
# ---------------------------------------------------------------------------------------


@pytest.mark.netns
def test_a_partition_healed_stops_node_1_training_and_the_run_ends_with_the_bits_of_one_host(
    tmp_path,
    netns_pair,  # noqa: F811  (the fixture imported above)
    one_host_sha,
):
    """Node 0 in namespace a, node 1 in b (CURVE keys: not loopback); the veth link set
    down mid-run. Both sides see it: node 0's Coordinator sees node 1's ranks down and
    waits for them (cluster.rejoin_timeout); node 1, cut off from the Coordinator,
    keeps its ranks -- they stop training, their joins wait -- and waits for node 0.
    The link up again, node 1's ranks rejoin, the run goes on from memory and ends
    with the bits of one host."""
    keys = tmp_path / "keys"
    made = zerotrain("keys", "init", str(keys), "--nodes", "2")
    assert made.returncode == 0, made.stderr
    master = f"{netns_pair.addr(0)}:29500"
    run_dir = tmp_path / "run"
    common = [*RUN, "--nodes", "2", "--master", master, "--run-dir", str(run_dir)]
    common += ["--keys", str(keys)]
    node1 = [*common, "--node-rank", "1", "--advertise-addr", netns_pair.addr(1)]
    agents = {
        "node1": agent(node1, {}, tmp_path, "node1", wrap=functools.partial(netns_pair.argv, 1)),
        "node0": agent(
            [*common, "--node-rank", "0"],
            {},
            tmp_path,
            "node0",
            wrap=functools.partial(netns_pair.argv, 0),
        ),
    }
    link = (netns_pair.names[0], "link", "set", netns_pair.devices[0])
    try:
        wait_for_steps(run_dir, agents, 6)
        netns_pair._ip(*link, "down")
        wait_for_line(tmp_path / "node1.err", f"node 0 at tcp://{master} lost", agents)
        wait_for_line(tmp_path / "node0.err", "(noconnection); the others regroup", agents)
        # each rank of node 1 stops its step on losing node 0 itself (not at
        # collective_timeout); the link stays down until both have, or a rank that had
        # not yet judged node 0 silent stops on the Coordinator's queued regroup instead
        for rank in (2, 3):
            line = f"rank {rank}: node 0 lost: stopping the step"
            wait_for_line(run_dir / "node-1" / "ranks.log", line, agents)
        netns_pair._ip(*link, "up")
    finally:
        results = finish(agents)
    code0, err0 = results["node0"]
    assert code0 == 0, err0
    assert results["node1"][0] == 0, results["node1"][1]
    assert "node 0 is back" in results["node1"][1]
    # node 1's ranks stopped their step as the link went (not at collective_timeout) and
    # rejoined with their snapshots when it came back: none was killed or replaced
    assert "did not rejoin in time" not in err0, err0
    assert "child_exited" not in results["node1"][1], results["node1"][1]
    resumed = _resumed(err0)
    assert resumed and all(how == "memory" for _, how in resumed), err0
    assert params_sha256(run_dir) == one_host_sha
