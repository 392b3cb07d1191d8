"""Live control, chaos and analyzer hooks on a multi-node run: two agents (127.0.0.2
and 127.0.0.3), two ranks each, small runs. `zerotrain checkpoint/set/hook` given any
node's run dir reach node 0's Coordinator (pipelines.cluster.live); chaos events and
analyzers name ranks globally, across nodes. Each run is held at a step by a chaos
`wait` gate (a file the test creates) while it is asked something, so nothing depends
on how fast the machine is."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipelines.cluster import messages as m
from pipelines.cluster.live import call_run
from pipelines.store import checkpoint as ckpt_mod
from tests.pipelines.cli_util import zerotrain

from .cluster_util import (
    SMALL,
    finish,
    free_port,
    kill_left,
    launch_env,
    params_sha256,
    rank_pids,
    reference_sha,
)

pytestmark = pytest.mark.slow

MLP = ("mlp_classifier", *SMALL, "--ranks", "4", "--mode", "zero2", "--seed", "11")
DEADLINE = 120.0  # seconds for any one wait (a loaded machine), never asserted as speed


def _agents(tmp_path: Path, run_dir: Path, *extra: str, command: str = "simulate") -> dict:
    """Node 1 (127.0.0.3), then node 0 (the master, 127.0.0.2): one run of MLP + EXTRA
    in `run_dir`, each agent's stderr in TMP/nodeK.err, its progress lines (stdout) in
    TMP/nodeK.out."""
    master = f"127.0.0.2:{free_port()}"
    common = [command, *MLP, *extra, "--nodes", "2", "--master", master]
    common += ["--run-dir", str(run_dir)]
    agents = {}
    for k, more in ((1, ["--advertise-addr", "127.0.0.3"]), (0, [])):
        err = tmp_path / f"node{k}.err"
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", *common, "--node-rank", str(k), *more],
            env=launch_env({}),
            cwd=tmp_path,
            stdout=open(tmp_path / f"node{k}.out", "w"),
            stderr=open(err, "w"),
            start_new_session=True,
        )
        proc.err_path = err
        agents[f"node{k}"] = proc
    return agents


def _metrics(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]


def _wait(what: str, agents: dict, done) -> None:
    deadline = time.monotonic() + DEADLINE
    while not done():
        assert time.monotonic() < deadline, f"{what}: not within {DEADLINE:g} s"
        for name, proc in agents.items():
            assert proc.poll() is None, f"{name} ended: {proc.err_path.read_text()[-2000:]}"
        time.sleep(0.05)


def _callers(run_dir: Path, asked: list) -> int:
    """The checkpoint callers the run's Coordinator holds (RunStatus), once none of the
    `asked` checkpoint calls has ended (while the run is held, none may)."""
    for call in asked:
        assert not call.done(), (
            f"a checkpoint call ended early: {call.exception() or call.result()}"
        )
    return call_run(run_dir, m.RunStatus())["checkpoint_callers"]


def _gate(tmp_path: Path, rank: int, step: int) -> tuple[str, Path]:
    """A chaos `wait` event holding rank `rank` (and so the run) once `step` steps are
    done (its step index `step` starts only then) until the returned path exists."""
    path = tmp_path / f"gate-{rank}-{step}"
    return f"wait:rank={rank},step={step},until={path}", path


def _step_said(out: str) -> int:
    """The step a `hook attach|detach` answer names ("... step N (records in ...)")."""
    return int(re.search(r" step (\d+) \(records in ", out)[1])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return zerotrain(*args)


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
    """params_sha256 of MLP on one host (--ranks 4), with EXTRA arguments."""
    shas = {}

    def get(*extra: str) -> str:
        if extra not in shas:
            shas[extra] = reference_sha(tmp_path_factory, "run", *MLP, *extra)
        return shas[extra]

    return get


def test_a_set_through_node_1s_dir_holds_on_every_node_and_survives_a_kill_on_node_1(
    tmp_path, one_host
):
    """`zerotrain set DIR/node-1 optimizer.lr=...` (node 1's run dir) reaches node 0's
    Coordinator; every rank of both nodes applies it at one step; then a rank of node 1
    is killed and the run replays the override: the bits are those of `zerotrain run
    --ranks 4 --overrides FILE` on one host, FILE the run's record."""
    run_dir = tmp_path / "run"
    hold, gate = _gate(tmp_path, 1, 6)
    # no snapshot in memory after step 0: the kill replays from the checkpoint of step
    # 5 (checkpoint.every), the override's step among those replayed
    agents = _agents(tmp_path, run_dir, "--chaos", hold, "--set", "cluster.snapshot_every=1000")
    try:
        _wait("step 5 logged", agents, lambda: len(_metrics(run_dir)) >= 5)
        done = _cli("set", str(run_dir / "node-1"), "optimizer.lr=0.01")
        assert done.returncode == 0, done.stderr
        said = done.stdout.strip()
        assert said.startswith(f"run {run_dir / 'node-1'}: optimizer.lr = 0.01 from step "), said
        step = int(said.split(" from step ")[1].split()[0])
        assert 6 <= step < 16, said
        recorded = run_dir / "overrides.jsonl"
        assert said.endswith(f"(recorded in {recorded})"), said
        gate.touch()
        _wait(f"step {step + 2}", agents, lambda: len(_metrics(run_dir)) >= step + 2)
        os.kill(rank_pids(agents["node1"].pid)[1], signal.SIGKILL)  # rank 3
    finally:
        gate.touch()  # (also when the test failed)
        results = finish(agents)
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] >= 1
    records = [json.loads(line) for line in recorded.read_text().splitlines()]
    assert records == [{"step": step, "key": "optimizer.lr", "value": 0.01}]
    assert summary["params_sha256"] == one_host("--overrides", str(recorded))


PROBE = """
from pipelines.hooks import analyzer


@analyzer(every=1, exact=True)  # exact: the ranks sample every step it is due
def ranks_seen(ctx):
    return {"ranks": float(len(ctx.rank_grads)), "step": float(ctx.step)}


@analyzer(every=1, exact=True)
def probe(ctx):
    return {"ranks": float(len(ctx.rank_grads))}
"""


def test_analyzers_on_node_0_take_every_nodes_ranks_from_the_start_and_attached_live(
    tmp_path, one_host
):
    """An analyzer given to both agents (--hook) gets every step's gradients from all
    4 ranks, node 1's too; one attached live through node 0's run dir (`zerotrain hook
    attach DIR`) and detached again sees exactly the steps between; training is the
    bits of one host without hooks."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    run_dir = tmp_path / "run"
    attach_at, attach_gate = _gate(tmp_path, 1, 6)
    detach_at, detach_gate = _gate(tmp_path, 1, 11)
    chaos = f"{attach_at};{detach_at}"
    agents = _agents(tmp_path, run_dir, "--chaos", chaos, "--hook", f"{script}:ranks_seen")
    try:
        _wait("step 5 logged", agents, lambda: len(_metrics(run_dir)) >= 5)
        done = _cli("hook", "attach", str(run_dir), f"{script}:probe")
        assert done.returncode == 0, done.stderr
        after = _step_said(done.stdout)
        attach_gate.touch()
        _wait("step 10 logged", agents, lambda: len(_metrics(run_dir)) >= 10)
        done = _cli("hook", "detach", str(run_dir / "node-1"), "probe")
        assert done.returncode == 0, done.stderr
        until = _step_said(done.stdout)
    finally:
        attach_gate.touch(), detach_gate.touch()  # (also when the test failed)
        results = finish(agents)
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    assert 5 <= after < until < 16, (after, until)
    records = [json.loads(line) for line in open(run_dir / "hooks.jsonl")]
    seen = [r for r in records if r["hook"] == "ranks_seen"]
    assert [r["step"] for r in seen] == list(range(1, 17))
    assert all(r["metrics"]["ranks"] == 4.0 for r in seen), seen
    probed = [r for r in records if r["hook"] == "probe"]
    assert [r["step"] for r in probed] == list(range(after + 1, until + 1))
    assert all(r["metrics"]["ranks"] == 4.0 for r in probed), probed
    assert not (run_dir / "node-1" / "hooks.jsonl").exists()
    assert params_sha256(run_dir) == one_host()


def test_a_checkpoint_asked_through_node_0s_dir_is_written_by_every_rank_of_both_nodes(
    tmp_path, one_host
):
    """A checkpoint asked for while the run is held at step 6 (two callers at once) is
    one checkpoint at a step the ranks of both nodes agreed on: 4 shards and node 0's
    manifest in DIR/checkpoints, verified; training goes on to the bits of one host."""
    run_dir = tmp_path / "run"
    hold, gate = _gate(tmp_path, 3, 6)  # rank 3: node 1's
    agents = _agents(tmp_path, run_dir, "--chaos", hold, "--set", "checkpoint.every=0")
    try:
        # held: with fewer steps logged a checkpoint could be agreed after step 6 and
        # written before the hold, answering before the test looks
        _wait("step 6 logged", agents, lambda: len(_metrics(run_dir)) >= 6)
        with ThreadPoolExecutor(2) as pool:
            asked = [
                pool.submit(call_run, where, m.CheckpointNow(), timeout=DEADLINE)
                for where in (run_dir, run_dir / "node-1")
            ]
            # both waiting at node 0's Coordinator before the run may go on
            callers = lambda: _callers(run_dir, asked)  # noqa: E731
            _wait("two checkpoint callers", agents, lambda: callers() == 2)
            gate.touch()
            first, second = (f.result() for f in asked)
        assert "error" not in first and first == second, (first, second)
        step, manifest = first["step"], Path(first["manifest"])
        assert manifest == ckpt_mod.checkpoint_dir(run_dir / "checkpoints", step) / "manifest.json"
        assert ckpt_mod.verify_checkpoint(manifest.parent)["step"] == step
        assert len(list(manifest.parent.glob("shard-*.safetensors"))) == 4
    finally:
        gate.touch()  # (also when the test failed)
        results = finish(agents)
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    assert 6 <= step < 16
    assert not (run_dir / "node-1" / "checkpoints").exists()
    assert params_sha256(run_dir) == one_host("--set", "checkpoint.every=0")


def test_chaos_names_node_1s_ranks_globally_a_stall_and_a_kill_there_change_no_bits(
    tmp_path, one_host
):
    """`zerotrain simulate --chaos` on both agents: rank 3 (node 1) stops itself for
    0.3 s at step 4 and node 1's agent continues it, asked by node 0's Coordinator (a
    pid of another host is not node 0's to signal); rank 2 (node 1) is killed at step 9
    and replaced. The run ends with the bits of one host without chaos."""
    run_dir = tmp_path / "run"
    chaos = "stall:rank=3,step=4,seconds=0.3;kill:rank=2,step=9"
    agents = _agents(tmp_path, run_dir, "--chaos", chaos)
    results = finish(agents)
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    said = (tmp_path / "node0.out").read_text()  # node 0's progress lines
    assert "chaos: stall rank 3 at step 4" in said and "chaos: kill rank 2 at step 9" in said
    assert "chaos: stall of rank 3 over: node 1's agent says continued" in said, said
    faults = json.loads((run_dir / "recovery.json").read_text())["faults"]
    assert {(f["kind"], f["rank"]) for f in faults} >= {("stall", 3), ("kill", 2)}, faults
    assert json.loads((run_dir / "summary.json").read_text())["restarts"] >= 1
    assert params_sha256(run_dir) == one_host()


def test_a_node_without_node_0s_hooks_is_refused_in_one_line(tmp_path):
    """Node 1 started without the --hook node 0 runs is refused by node 0's Rendezvous
    (its ranks' samples would never reach node 0's analyzer), in one line, exit 2,
    starting no rank."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    run_dir = tmp_path / "run"
    master = f"127.0.0.2:{free_port()}"
    common = [*MLP, "--nodes", "2", "--master", master, "--run-dir", str(run_dir)]
    node0 = [*common, "--node-rank", "0", "--hook", f"{script}:probe"]
    node1 = [*common, "--node-rank", "1", "--advertise-addr", "127.0.0.3"]
    agents = {}
    try:
        for name, args in (("node0", node0), ("node1", node1)):
            err = open(tmp_path / f"{name}.err", "w")
            agents[name] = subprocess.Popen(
                [sys.executable, "-m", "pipelines.cli", "run", *args],
                env=launch_env({}), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True,
            )  # fmt: skip
        code = agents["node1"].wait(timeout=DEADLINE)
        assert agents["node0"].poll() is None  # node 0 waits on for its node 1
    finally:
        kill_left(agents)
    err = (tmp_path / "node1.err").read_text().splitlines()
    assert code == 2, err
    assert len(err) == 2 and "plaintext tcp on loopback" in err[0], err
    assert err[1] == (
        "zerotrain run: node 0 refused node 1: node 1 runs other hooks (none; node 0: "
        "analyzer probe): give every node the same --hook (their samples meet in node 0's "
        "analyzer)"
    ), err
    rank_log = run_dir / "node-1" / "ranks.log"
    assert not rank_log.exists() or not rank_log.read_text()  # no rank started


def test_with_keys_the_analyzer_and_a_checkpoint_through_node_1s_dir_go_over_curve(
    tmp_path, one_host
):
    """A run with the cluster's keys: node 0's analyzer process and a control tool on
    node 1's host (its run dir, its host's key) are admitted by the keyring; the
    analyzer gets all 4 ranks' samples, the checkpoint has node 1's shards, and the
    bits are one host's."""
    from pipelines.launch import init_keys

    keys = init_keys(tmp_path / "keys", 2).directory
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    run_dir = tmp_path / "run"
    hold, gate = _gate(tmp_path, 0, 6)
    extra = ["--keys", str(keys), "--run-id", "livemn-test", "--hook", f"{script}:probe"]
    agents = _agents(tmp_path, run_dir, "--chaos", hold, *extra)
    try:
        # held: with fewer steps logged a checkpoint could be agreed after step 6 and
        # written before the hold, answering before the test looks
        _wait("step 6 logged", agents, lambda: len(_metrics(run_dir)) >= 6)
        with ThreadPoolExecutor(1) as pool:
            where = run_dir / "node-1"  # (one process: one host's keys at a time)
            asked = pool.submit(call_run, where, m.CheckpointNow(), timeout=DEADLINE)
            callers = lambda: _callers(where, [asked])  # noqa: E731
            _wait("a checkpoint caller", agents, lambda: callers() == 1)
            gate.touch()
            done = asked.result()
        assert "error" not in done, done
        shards = Path(done["manifest"]).parent.glob("shard-*.safetensors")
        assert len(list(shards)) == 4
    finally:
        gate.touch()  # (also when the test failed)
        results = finish(agents)
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    records = [json.loads(line) for line in open(run_dir / "hooks.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 17))
    assert all(r["metrics"]["ranks"] == 4.0 for r in records), records
    refused = json.loads((run_dir / "summary.json").read_text())["admission"]["nodes"]
    assert refused["cluster"]["refused"] == 0, refused
    assert params_sha256(run_dir) == one_host()
