"""Node agents (pipelines.cluster.nodes): two `zerotrain run` processes as the agents of
two hosts, 127.0.0.2 and 127.0.0.3 (each binds and advertises its own address), give
the params_sha256 of the same ranks on one host -- launched by flags and by
torchrun-style variables; plaintext tcp is said in one line on loopback and refused
elsewhere."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
from pathlib import Path

import pytest

from tests.pipelines.cli_util import REPO, zerotrain
from tests.pipelines.cluster.cluster_util import (
    agent,
    finish,
    free_port,
    kill_left,
    params_sha256,
    rank_pids,
    reference_sha,
    wait_for_line,
    wait_for_steps,
)

pytestmark = pytest.mark.slow

RUN = ("run", "char_lm", "--ranks", "4", "--mode", "zero2", "--steps", "20", "--seed", "11")


@pytest.fixture(scope="module")
def one_host_sha_of(tmp_path_factory):
    """The bits of the same run on one host (--ranks 4), by number of steps (each run
    once)."""

    @functools.cache
    def get(steps: int) -> str:
        return reference_sha(tmp_path_factory, *_steps(steps))

    return get


@pytest.fixture(scope="module")
def one_host_sha(one_host_sha_of) -> str:
    return one_host_sha_of(20)


def _steps(steps: int) -> tuple:
    """RUN with another number of steps."""
    i = RUN.index("--steps")
    return (*RUN[: i + 1], str(steps), *RUN[i + 2 :])


def _two_agents(
    run_dir: Path, tmp_path: Path, run=RUN, extra=(), node1_env=None
) -> tuple[str, dict, dict]:
    """Node 1 (advertising 127.0.0.3, `node1_env` in its environment), then node 0 (the
    master, at 127.0.0.2), started by flags for one run of RUN + EXTRA in `run_dir`:
    (master HOST:PORT, the agents, each agent's arguments), both by name."""
    master = f"127.0.0.2:{free_port()}"
    common = [*run, *extra, "--nodes", "2", "--master", master, "--run-dir", str(run_dir)]
    args = {
        "node1": [*common, "--node-rank", "1", "--advertise-addr", "127.0.0.3"],
        "node0": [*common, "--node-rank", "0"],
    }
    agents = {
        "node1": agent(args["node1"], node1_env or {}, tmp_path, "node1"),
        "node0": agent(args["node0"], {}, tmp_path, "node0"),
    }
    return master, agents, args


def test_two_agents_by_flags_give_the_bits_of_one_host(tmp_path, one_host_sha):
    run_dir = tmp_path / "run"
    master, agents, _ = _two_agents(run_dir, tmp_path)
    results = finish(agents)
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    assert params_sha256(run_dir) == one_host_sha
    # each agent said, in one line, that it runs plaintext tcp on loopback
    for k, addr in ((0, "127.0.0.2"), (1, "127.0.0.3")):
        said = [ln for ln in results[f"node{k}"][1].splitlines() if "without keys" in ln]
        assert said == [
            f"zerotrain run: node {k}: plaintext tcp on loopback without keys (master "
            f"tcp://{master}, this node {addr}): a test mode"
        ]
    # node 1's ranks lived on 127.0.0.3, and wrote their shards into node 0's root
    plan1 = json.loads((run_dir / "node-1" / "plan.json").read_text())
    assert plan1["endpoints"][2].startswith("tcp://127.0.0.3:")
    assert plan1["peers"]["rank1"].startswith("tcp://127.0.0.2:")
    final = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert len(list(final.glob("shard-*.safetensors"))) == 4
    assert (final / "manifest.json").exists()
    assert not (run_dir / "node-1" / "checkpoints").exists()
    assert not (run_dir / "node-1" / "summary.json").exists()


def test_two_agents_by_torchrun_variables_give_the_bits_of_one_host(tmp_path, one_host_sha):
    port = free_port()
    run_dir = tmp_path / "run"
    common = [*RUN, "--run-dir", str(run_dir)]
    world = {"MASTER_ADDR": "127.0.0.2", "MASTER_PORT": str(port), "NNODES": "2"}
    agents = {
        "node1": agent(
            common,
            {**world, "NODE_RANK": "1", "ZEROTRAIN_ADVERTISE_ADDR": "127.0.0.3"},
            tmp_path,
            "node1",
        ),
        "node0": agent(common, {**world, "NODE_RANK": "0"}, tmp_path, "node0"),
    }
    results = finish(agents)
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    assert params_sha256(run_dir) == one_host_sha


def test_a_non_loopback_address_without_keys_is_refused_in_one_line(tmp_path):
    args = [*RUN, "--nodes", "2", "--node-rank", "1", "--master", f"127.0.0.2:{free_port()}"]
    done = zerotrain(*args, "--advertise-addr", "192.0.2.7", "--run-dir", str(tmp_path / "r"))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "zerotrain run: node 1: 192.0.2.7 is not a loopback address and the run has no "
        "keys: plaintext tcp between hosts is refused (multi-node runs without keys are "
        "accepted on loopback addresses only, e.g. 127.0.0.2)"
    ]
    assert not (tmp_path / "r").exists()


def test_a_rank_of_node_1_killed_recovers_to_the_bits_of_one_host(tmp_path, one_host_sha):
    run_dir = tmp_path / "run"
    _, agents, _ = _two_agents(run_dir, tmp_path)
    try:
        wait_for_steps(run_dir, agents, 5)
        victims = rank_pids(agents["node1"].pid)
        assert len(victims) == 2
        os.kill(victims[0], signal.SIGKILL)
    finally:
        results = finish(agents)
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] >= 1
    assert summary["params_sha256"] == one_host_sha


LATE = Path(__file__).parent / "late_ack"  # its sitecustomize plants the delays


def test_a_late_monitor_ack_while_a_rank_of_node_1_waits_to_join_does_not_hang(
    tmp_path, one_host_sha
):
    """Rank 2 (node 1) acknowledges the Coordinator's monitor of its Trainer 5 s late,
    past the heartbeat timeout (2 s), as on a loaded host, while it waits in its first
    join (rank 3 joins 8 s late): the monitor fires noconnection on a live rank. The
    Coordinator answers that join (rank 2 joins again, watched anew) instead of dropping
    it, so generation 1 forms and the run ends with the bits of one host."""
    run_dir = tmp_path / "run"
    late = {
        "ZEROTRAIN_TEST_LATE_WATCHING": "rank2:5.0",
        "ZEROTRAIN_TEST_LATE_JOIN": "rank3:8.0",
        "PYTHONPATH": os.pathsep.join([str(LATE), str(REPO)]),
    }
    _, agents, _ = _two_agents(run_dir, tmp_path, node1_env=late)
    results = finish(agents, timeout=240)
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    lines = results["node0"][1].splitlines()
    down = lines.index("zerotrain: rank 2 is down (noconnection); the others regroup")
    assert not any(" step " in line for line in lines[:down])  # before generation 1
    assert params_sha256(run_dir) == one_host_sha


def test_a_late_monitor_ack_while_a_rank_of_node_1_trains_makes_it_regroup_not_stall(
    tmp_path, one_host_sha
):
    """Rank 2 (node 1) never acknowledges the Coordinator's monitors of its Trainer
    until it has trained, and its first collective is held until a regroup aborts it:
    the Coordinator sees a live rank down (heartbeat_timeout after the monitor) while
    that rank is in its collective, whatever the load, and the run cannot end first.
    The others regroup, and so does rank 2, told as well -- not left in its collective
    for cluster.collective_timeout (600 s here: past the rejoin deadline, which would
    end the run) -- and the run ends with the bits of one host."""
    run_dir = tmp_path / "run"
    late = {
        "ZEROTRAIN_TEST_UNACKED_UNTIL_TRAINING": "rank2",
        "ZEROTRAIN_TEST_LATE_JOIN": "rank2:8.0",  # (joins last: the first round trains)
        "PYTHONPATH": os.pathsep.join([str(LATE), str(REPO)]),
    }
    extra = ["--set", "cluster.collective_timeout=600"]
    _, agents, _ = _two_agents(run_dir, tmp_path, extra=extra, node1_env=late)
    results = finish(agents, timeout=240)
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    assert "zerotrain: rank 2 is down (noconnection); the others regroup" in results["node0"][1]
    # rank 2 was in its collective when told: the plant's line, in node 1's ranks.log
    held = "late_ack: the first collective, held, was aborted by a regroup"
    assert held in (run_dir / "node-1" / "ranks.log").read_text()
    assert params_sha256(run_dir) == one_host_sha


def test_a_live_rank_of_node_1_that_does_not_rejoin_is_killed_by_its_agent(tmp_path, one_host_sha):
    """Rank 2 (node 1) is killed; rank 3 (node 1, alive, heartbeats going) sends the
    join that follows 600 s late. Past cluster.collective_timeout node 0's Coordinator
    asks node 1's agent to kill it (node 0 cannot signal another host's process): it is
    replaced, and the run ends with the bits of one host."""
    run_dir = tmp_path / "run"
    late = {
        "ZEROTRAIN_TEST_LATE_JOIN": "rank3:600:2",
        "PYTHONPATH": os.pathsep.join([str(LATE), str(REPO)]),
    }
    extra = ["--set", "cluster.collective_timeout=10"]
    _, agents, _ = _two_agents(run_dir, tmp_path, extra=extra, node1_env=late)
    try:
        wait_for_steps(run_dir, agents, 5)
        os.kill(rank_pids(agents["node1"].pid)[0], signal.SIGKILL)  # rank 2
    finally:
        results = finish(agents, timeout=240)
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    assert "rank 3 did not rejoin in time: node 1's agent killed it" in results["node0"][1]
    assert params_sha256(run_dir) == one_host_sha


def test_a_second_agent_of_a_running_node_is_refused_in_one_line_and_the_run_goes_on(
    tmp_path, one_host_sha_of
):
    """A second agent started with node 1's rank (another run dir) while node 1's agent
    runs: node 0 refuses it as a duplicate of a live agent -- it is not node 1 started
    again -- and tells it so: still held after 3 heartbeat timeouts, it exits 2 in one
    line naming node 1 and the agent that holds it. Node 1's agent keeps its place and
    the run ends with one host's bits."""
    run_dir = tmp_path / "run"
    _, agents, args = _two_agents(run_dir, tmp_path, run=_steps(40))
    try:
        wait_for_steps(run_dir, agents, 5)
        elsewhere = str(tmp_path / "elsewhere")
        dup = agent([elsewhere if a == str(run_dir) else a for a in args["node1"]], {},
                    tmp_path, "node1-dup")  # fmt: skip
        code = dup.wait(timeout=120)
        err = dup.err_path.read_text().splitlines()
    finally:
        results = finish(agents)
    assert code == 2, err
    assert "plaintext tcp on loopback" in err[0], err  # its test-mode note, then at most
    # its node's own log lines (node 0 silent: the run may end within the dup's grace)
    assert all(line.startswith("[node node1] ") for line in err[1:-1]), err
    assert re.fullmatch(
        r"zerotrain run: node 0 refused node 1: node1 is held by a live process \(generation "
        r"[0-9a-f]+ at tcp://127\.0\.0\.3:\d+, heard from \d+\.\ds ago\); a node rank runs "
        r"one agent at a time \(still held after 6s: node 1 started again is taken once "
        r"node 0 has not heard from its agent for 2s\)",
        err[-1],
    ), err
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    assert "is back" not in results["node0"][1]
    assert params_sha256(run_dir) == one_host_sha_of(40)


STOPPED = re.compile(
    r"zerotrain run: stopped at step (\d+) \(SIGUSR1 to the agent of node [01]\); "
    r"checkpoint (\S+); continue with --resume (\S+)"
)


def test_usr1_to_every_agent_stops_all_nodes_at_one_step_and_resume_gives_the_bits_of_one_host(
    tmp_path, one_host_sha_of
):
    """SIGUSR1 to both agents, as `scancel --signal=USR1` sends it to every task: one
    planned stop (not a "second signal"), every node exits 4 at the step the ranks
    agreed on, with its checkpoint; both nodes started again with --resume end with the
    bits of 40 steps on one host."""
    run_dir = tmp_path / "run"
    _, agents, args = _two_agents(run_dir, tmp_path, _steps(40))
    node0, node1 = args["node0"], args["node1"]
    try:
        wait_for_steps(run_dir, agents, 5)
        for name in ("node1", "node0"):
            os.kill(agents[name].pid, signal.SIGUSR1)
    finally:
        results = finish(agents)
    assert results["node0"][0] == 4, results["node0"][1]
    assert results["node1"][0] == 4, results["node1"][1]
    stopped = STOPPED.fullmatch(results["node0"][1].splitlines()[-1])
    assert stopped, results["node0"][1]
    step = int(stopped[1])
    assert 5 <= step < 40
    assert Path(stopped[2]) == run_dir / "checkpoints" / f"step-{step:08d}"
    assert (Path(stopped[2]) / "manifest.json").exists()
    assert len(list(Path(stopped[2]).glob("shard-*.safetensors"))) == 4
    assert stopped[3] == str(run_dir)
    # node 1 ends with node 0's line (the run's), as its own
    assert results["node1"][1].splitlines()[-1].endswith(stopped[0].split(": ", 1)[1])

    agents = {
        "node1": agent([*node1, "--resume", str(run_dir)], {}, tmp_path, "node1"),
        "node0": agent([*node0, "--resume", str(run_dir)], {}, tmp_path, "node0"),
    }
    results = finish(agents)
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    assert f"resumed at step {step}" in results["node0"][1]
    assert params_sha256(run_dir) == one_host_sha_of(40)


def _lose_node_1(run_dir: Path, tmp_path: Path, steps: int, extra=()) -> tuple[list, dict]:
    """Two agents train `steps` steps; once 12 are logged (past the snapshot of step 10:
    cluster.snapshot_every) node 1's agent and ranks are SIGKILLed (its process group),
    and node 0 has seen its ranks down: (node 1's arguments, the agents left)."""
    _, agents, args = _two_agents(run_dir, tmp_path, _steps(steps), extra)
    try:
        wait_for_steps(run_dir, agents, 12)
        lost = agents.pop("node1")
        os.killpg(lost.pid, signal.SIGKILL)
        lost.wait()
        wait_for_line(tmp_path / "node0.err", "rank 2 is down", agents)
    except BaseException:
        finish(agents)
        raise
    return args["node1"], agents


def test_node_1_lost_and_started_again_restores_from_replicas_on_node_0_to_the_bits_of_one_host(
    tmp_path, one_host_sha_of
):
    """Node 1's agent and ranks SIGKILLed: node 0 keeps its ranks and their state in
    memory and waits; node 1 started again with the same node rank binds the same rank
    endpoints, its ranks restore from the replicas node 0's ranks hold (replicas live
    on the next node), and the run ends with the bits of one host."""
    run_dir = tmp_path / "run"
    node1, agents = _lose_node_1(run_dir, tmp_path, 40)
    agents["node1"] = agent(node1, {}, tmp_path, "node1-again")
    results = finish(agents)
    assert results["node0"][0] == 0, results["node0"][1]
    assert "node 1 is back: its ranks rejoin at their endpoints" in results["node0"][1]
    # the agent started again ended with the run (its own stderr, not the lost one's)
    assert results["node1"][0] == 0, results["node1"][1]
    last = results["node1"][1].splitlines()[-1]
    assert last == "zerotrain: done: node 1 of 2 (ranks 2..3); summary on node 0", last
    resumed = re.findall(r"resuming at step (\d+) from (\w+)", results["node0"][1])
    assert resumed and {how for _, how in resumed} == {"memory"}, results["node0"][1]
    # node 1's ranks from node 0's replicas of their snapshot of step 10 (an earlier
    # regroup, a rank seen down under load, may have resumed from step 0)
    assert any(int(step) >= 10 for step, _ in resumed), results["node0"][1]
    assert params_sha256(run_dir) == one_host_sha_of(40)


def test_node_1_lost_with_a_rank_of_node_0_restores_from_the_last_checkpoint_exactly(
    tmp_path, one_host_sha_of
):
    """Node 1 lost and rank 0 (node 0) killed too: rank 2's replica was rank 0's, so no
    step survives in memory; the run goes on from the last checkpoint once node 1 is
    back, and still ends with the bits of one host."""
    run_dir = tmp_path / "run"
    every = ["--set", "checkpoint.every=5"]
    node1, agents = _lose_node_1(run_dir, tmp_path, 40, every)
    try:
        os.kill(rank_pids(agents["node0"].pid)[0], signal.SIGKILL)  # rank 0
        agents["node1"] = agent(node1, {}, tmp_path, "node1-again")
    finally:
        results = finish(agents)
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    resumed = re.findall(r"resuming at step (\d+) from (\w+)", results["node0"][1])
    assert any(how == "disk" and int(step) >= 10 for step, how in resumed), results["node0"][1]
    assert params_sha256(run_dir) == one_host_sha_of(40)


def test_node_1_not_back_within_the_rejoin_timeout_fails_in_one_line_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    extra = ["--set", "cluster.rejoin_timeout=5", "--set", "checkpoint.every=5"]
    _, agents = _lose_node_1(run_dir, tmp_path, 40, extra)
    results = finish(agents)
    code, err = results["node0"]
    assert code == 3, err
    last = err.splitlines()[-1]
    assert re.fullmatch(
        r"zerotrain run: training failed: node 1 lost: rank\(s\) 2, 3 not back within "
        r"cluster.rejoin_timeout 5s; last good checkpoint: \S+/checkpoints/step-\d{8}",
        last,
    ), err


def test_a_node_with_another_config_is_refused_by_node_0_in_one_line(tmp_path):
    """Node 0's Rendezvous takes only a hello of this run: node 1 started with another
    seed is refused, in one line naming the difference, and starts no rank."""
    master = f"127.0.0.2:{free_port()}"
    run_dir = tmp_path / "run"
    common = ["--nodes", "2", "--master", master, "--run-dir", str(run_dir)]
    other = [*RUN[:-1], "12"]  # another --seed: another config_hash
    agents = {
        "node0": agent([*RUN, *common, "--node-rank", "0"], {}, tmp_path, "node0"),
        "node1": agent([*other, *common, "--node-rank", "1", "--advertise-addr", "127.0.0.3"],
                        {}, tmp_path, "node1"),
    }  # fmt: skip
    try:
        code = agents["node1"].wait(timeout=300)
        err = (tmp_path / "node1.err").read_text().splitlines()
        assert agents["node0"].poll() is None  # node 0 waits on for its node 1
    finally:
        kill_left(agents)
    assert code == 2, err
    assert len(err) == 2 and "plaintext tcp on loopback" in err[0], err  # its test-mode note
    assert err[1].startswith(
        "zerotrain run: node 0 refused node 1: node 1 runs another config (config_hash "
    ), err
    assert not (run_dir / "error.txt").exists()  # a refusal is no crash


def test_a_hello_of_another_config_is_refused_naming_both_hashes_in_one_line():
    """Rendezvous._misfit: the refusal of a node with another config_hash names its
    hash and this run's, each cut to 16 hex digits, with nothing left open."""
    from pipelines.cluster import nodes
    from pipelines.launch import NodeIdentity

    identity = NodeIdentity(
        nnodes=2, node_rank=0, master_addr="127.0.0.2", master_port=29500,
        ranks_per_node=2, advertise_addr="127.0.0.2", run_id="r", launcher="flags",
    )  # fmt: skip
    layout = nodes.NodeLayout(identity, "127.0.0.2", 29500, "127.0.0.2", range(0, 2), "r")
    mine, theirs = "0123456789abcdef" * 4, "fedcba9876543210" * 4
    rdv = nodes.Rendezvous(layout, mine, {}, fail=None)
    hello = {"run_id": "r", "nnodes": 2, "node_rank": 1, "ranks": [2, 4], "table": {}}
    assert rdv._misfit({**hello, "config_hash": mine}) is None
    assert rdv._misfit({**hello, "config_hash": theirs}) == (
        "node 1 runs another config (config_hash fedcba9876543210, this run's 0123456789abcdef)"
    )


def _node_1_at(ip: str):
    from pipelines.cluster import nodes
    from pipelines.launch import NodeIdentity

    identity = NodeIdentity(
        nnodes=2, node_rank=1, master_addr="127.0.0.2", master_port=29500,
        ranks_per_node=2, advertise_addr=ip, run_id="r", launcher="flags",
    )  # fmt: skip
    return nodes.NodeLayout(identity, "127.0.0.2", 29500, ip, range(2, 4), "r")


def test_a_lost_node_back_takes_its_ranks_ports_again_or_says_why_not_in_one_line():
    """nodes.adopt_table: node 1 started again gets the table of its first start; its
    fresh ports are released and the first start's taken back -- refused in one line
    when a port is held by a live listener (an earlier agent) or the address moved."""
    from pipelines.cluster import nodes
    from pipelines.core import RunRefused

    first = {"ranks": {}, "rings": {}}
    with socket.socket() as a, socket.socket() as b:
        for sock, what, r in ((a, "ranks", "2"), (b, "rings", "2")):
            sock.bind(("127.0.0.3", 0))
            first[what][r] = nodes.endpoint_of("127.0.0.3", sock.getsockname()[1])
    tables = {"1": {**first, "agent": "tcp://127.0.0.3:1"}}
    layout = _node_1_at("127.0.0.3")
    ports: list = []
    fresh = nodes.local_table(layout, "tcp://127.0.0.3:2", ports)
    try:
        nodes.adopt_table(layout, fresh, tables, ports)
        assert sorted(p.getsockname()[1] for p in ports) == sorted(
            int(e.rsplit(":", 1)[1]) for e in (first["ranks"]["2"], first["rings"]["2"])
        )
    finally:
        for p in ports:
            p.close()
    with socket.socket() as live:  # an earlier agent's rank still listens there
        live.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        live.bind(("127.0.0.3", int(first["ranks"]["2"].rsplit(":", 1)[1])))
        live.listen()
        ports = []
        fresh = nodes.local_table(layout, "tcp://127.0.0.3:2", ports)
        with pytest.raises(RunRefused, match=r"^node 1: rank 2's endpoint tcp://127\.0\.0\.3:\d+ "
                           r"from the run's first start is taken \(Address already in use\): "
                           r"is an earlier agent of node 1 still running\?$"):  # fmt: skip
            nodes.adopt_table(layout, fresh, tables, ports)
        for p in ports:
            p.close()
    moved = _node_1_at("127.0.0.4")
    ports = []
    fresh = nodes.local_table(moved, "tcp://127.0.0.4:2", ports)
    with pytest.raises(RunRefused) as refused:
        nodes.adopt_table(moved, fresh, tables, ports)
    for p in ports:
        p.close()
    assert str(refused.value) == (
        "node 1 is back at tcp://127.0.0.4, its ranks were at tcp://127.0.0.3: a lost node "
        "rejoins at the address it had (--advertise-addr)"
    )
