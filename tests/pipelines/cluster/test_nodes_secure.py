"""Node agents with the cluster's CURVE keys (issue 20): two `zerotrain run` processes on
127.0.0.2 and 127.0.0.3 with `--keys DIR` give the bits of one host over CURVE on every
tcp:// socket, and intruders at node 0's master address -- a plaintext client, an
unknown CURVE key, a client expecting another node's server key, node 1's valid key
claiming node 0's rank, 10,000 hostile messages under node 1's key as nodes it does
not hold, and node 1's key from another run -- are refused, counted in summary.json,
and change nothing.

The intruders knock while node 0 waits for node 1's hello (node 0 is bound, no rank
has started), so what they did is done before the run trains, whatever the machine's
load: then node 1 starts and the run must end as if nobody had knocked."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

import actors
from pipelines.launch import init_keys
from tests.pipelines.cli_util import zerotrain
from tests.pipelines.cluster.cluster_util import (
    agent,
    finish,
    free_port,
    reference_sha,
)
from tests.pipelines.cluster.test_nodes import RUN

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
HOSTILE = 10_000
OTHER_RUN = 100
GUARD = 60.0  # seconds: a bound on what must happen long before


@pytest.fixture(scope="module")
def one_host_sha(tmp_path_factory) -> str:
    """The bits of the same run on one host: --ranks 4 (test_nodes' reference)."""
    return reference_sha(tmp_path_factory, *RUN)


def _bench_fuzz():
    """scripts/bench_fuzz.py's message generators (node headers, mutations)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench_fuzz
    finally:
        sys.path.pop(0)
    return bench_fuzz


def _keyed(run_dir: Path, tmp_path: Path, keys: Path, *, start=("node0", "node1")):
    """The agents of node 0 (the master, 127.0.0.2) and node 1 (127.0.0.3), both with
    --keys and the run id mnsec-test, those named in `start` started (in that order):
    (master HOST:PORT, the agents started, every agent's arguments by name)."""
    master = f"127.0.0.2:{free_port()}"
    common = [*RUN, "--nodes", "2", "--master", master, "--run-dir", str(run_dir),
              "--keys", str(keys), "--run-id", "mnsec-test"]  # fmt: skip
    args = {
        "node0": [*common, "--node-rank", "0"],
        "node1": [*common, "--node-rank", "1", "--advertise-addr", "127.0.0.3"],
    }
    agents = {name: agent(args[name], {}, tmp_path, name) for name in start}
    return master, agents, args


def _refused_at_the_handshake(intruder, server: bytes, other_host: tuple, sender: str) -> None:
    """Three knocks on the agent whose server key is `server`, each refused at the
    handshake: no key, a well-formed key the cluster never issued, and another host's
    key against that host's own server key (the wrong server)."""
    stranger = zmq.curve_keypair()
    for how in ({}, {"keypair": stranger, "server": server},
                {"keypair": other_host, "server": other_host[0]}):  # fmt: skip
        sock, monitor = intruder.dealer(**how)
        with contextlib.suppress(zmq.Again):
            sock.send_multipart(_hb(sender), zmq.DONTWAIT)
        assert intruder.outcome(monitor) == "refused", how


def _ended_with(results: dict, run_dir: Path, sha: str) -> dict:
    """Both agents exited 0 and the run has the bits `sha`; its summary."""
    for name, (code, err) in results.items():
        assert code == 0, f"{name}: {err}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["params_sha256"] == sha
    return summary


def test_two_agents_with_keys_give_the_bits_of_one_host_over_curve(tmp_path, one_host_sha):
    keys = init_keys(tmp_path / "keys", 2).directory
    run_dir = tmp_path / "run"
    _, agents, _ = _keyed(run_dir, tmp_path, keys)
    results = finish(agents)
    summary = _ended_with(results, run_dir, one_host_sha)
    # (not restarts == 0: on a loaded machine a rank silent past the heartbeat timeout
    # is replaced, plaintext or CURVE; the bits say the run lost nothing)
    for k in (0, 1):  # with keys, no plaintext test mode to announce
        assert "without keys" not in results[f"node{k}"][1]
    # every rank built its keyring from its plan: where the keys lie, never a secret
    plan = json.loads((run_dir / "node-1" / "plan.json").read_text())
    assert plan["keys"] == {"dir": str(keys.resolve()), "node": 1, "nnodes": 2,
                            "ranks_per_node": 2, "run_id": "mnsec-test"}  # fmt: skip
    assert "secret" not in (run_dir / "node-1" / "plan.json").read_text()
    admission = summary["admission"]  # nothing refused or rejected ("dropped" counts
    # the last heartbeats to peers already gone at the end: not what knocked)
    knocked = [c for n in admission["nodes"].values() for k, c in n.items() if k != "dropped"]
    assert not any(knocked), admission
    assert admission["ring_refused_per_rank"] == [0, 0, 0, 0], admission


class _Intruder:
    """Raw pyzmq DEALERs against one endpoint, each watched by a monitor of its own."""

    def __init__(self, endpoint: str, keys) -> None:
        self.endpoint, self.keys = endpoint, keys
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket] = []

    def dealer(self, keypair=None, server=None, run="mnsec-test", once=True):
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = 0  # (the hostile batch is queued, not dropped)
        if once:
            sock.reconnect_ivl = -1  # one attempt: one refusal on node 0's count
        if keypair is not None:
            sock.curve_publickey, sock.curve_secretkey = keypair
            sock.curve_serverkey = server
        if run is not None:
            sock.setsockopt(zmq.METADATA, f"X-Zt-Run:{run}".encode())
        monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_DISCONNECTED
        )
        sock.connect(self.endpoint)
        self.socks.append(sock)
        return sock, monitor

    @staticmethod
    def outcome(monitor) -> str:
        """'in' once the handshake succeeded, 'refused' once it failed or was cut."""
        assert monitor.poll(int(GUARD * 1000)), "no handshake outcome"
        event = recv_monitor_message(monitor)["event"]
        return "in" if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else "refused"

    def close(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
        self.ctx.destroy(linger=0)


def _hb(sender: str, generation: int = 5) -> list[bytes]:
    body = {"endpoint": "tcp://127.0.0.1:9", "names": []}
    header = {"v": 1, "type": "hb", "sender": sender, "generation": generation, "step": 0,
              "seq": 0, "body": body, "tensors": []}  # fmt: skip
    return [msgpack.packb(header)]


def _send_all(sock: zmq.Socket, messages) -> int:
    sent = 0
    for frames in messages:
        assert sock.poll(int(GUARD * 1000), zmq.POLLOUT), "node 0 stopped reading"
        sock.send_multipart(frames, zmq.DONTWAIT)
        sent += 1
    return sent


def _knock(master: str, keys) -> int:
    """Every kind of intruder at node 0's master address, each seen refused (or, for
    the keyed ones, in with messages node 0 must refuse); how many of the hostile
    messages are well-formed (node 0 reads their sender and refuses them; the rest it
    rejects as malformed)."""
    fuzz = _bench_fuzz()
    rng = random.Random(20)
    node0, node1 = keys.keypair(0), keys.keypair(1)
    intruder = _Intruder(f"tcp://{master}", keys)
    try:
        # node 1's key, this run, claiming node 0's rank and agent; it also tells us
        # node 0 is up (its handshake succeeds once node 0 has bound the address)
        claim, monitor = intruder.dealer(node1, node0[0], once=False)
        assert intruder.outcome(monitor) == "in"
        _send_all(claim, [_hb("rank0"), _hb("cluster")])
        # then 10,000 hostile messages under the same key: bench_fuzz's node headers
        # (senders rank0, rank1, cluster, analyzer, fz-N: none of them node 1's),
        # mutated, truncated, with random tensors; nothing over the frame limit
        messages = [fuzz._mutate(fuzz._node_message(rng), rng) for _ in range(HOSTILE)]
        messages = [m if sum(map(len, m)) < 1 << 20 else m[:1] for m in messages]
        assert _send_all(claim, messages) == HOSTILE
        # node 1's key as itself, but saying another run in its handshake
        other, monitor = intruder.dealer(node1, node0[0], run="another-run", once=False)
        assert intruder.outcome(monitor) == "in"  # (admitted by key: refused per message)
        _send_all(other, [_hb("rank2", g) for g in range(OTHER_RUN)])
        # refused at the handshake, one attempt each
        _refused_at_the_handshake(intruder, node0[0], node1, "rank2")
        time.sleep(1.0)  # the last messages reach node 0's reader
    finally:
        intruder.close()
    return sum(map(_well_formed, messages))


def _well_formed(frames: list[bytes]) -> bool:
    """Whether a node decodes this message (then reads its sender) or rejects it first."""
    try:
        actors.decode(list(frames), actors.DEFAULT_LIMITS)
    except actors.FrameError:
        return False
    return True


def test_intruders_at_node_0_are_refused_counted_and_change_nothing(tmp_path, one_host_sha):
    keys = init_keys(tmp_path / "keys", 2)
    run_dir = tmp_path / "run"
    master, agents, args = _keyed(run_dir, tmp_path, keys.directory, start=["node0"])
    try:
        well_formed = _knock(master, keys)
        assert agents["node0"].poll() is None, (tmp_path / "node0.err").read_text()
        agents["node1"] = agent(args["node1"], {}, tmp_path, "node1")
    finally:
        results = finish(agents)
    summary = _ended_with(results, run_dir, one_host_sha)
    # (not restarts == 0: on a loaded machine a rank silent past the heartbeat timeout
    # is replaced, plaintext or CURVE; the bits say the run lost nothing)
    admission = summary["admission"]
    cluster = admission["nodes"]["cluster"]
    assert cluster["refused_handshake"] == 3, admission
    assert cluster["refused_run"] == OTHER_RUN, admission
    # every hostile message refused as a sender node 1 does not hold (the two claims
    # too), or rejected as malformed before its sender was read: none reached an actor
    assert cluster["refused_sender"] == 2 + well_formed, admission
    assert cluster["rejected"] == HOSTILE - well_formed, admission
    assert cluster["refused"] == (
        cluster["refused_handshake"] + cluster["refused_sender"] + cluster["refused_run"]
    ), admission
    for name in ("node1", "rank0", "rank1", "rank2", "rank3"):  # the others saw nobody
        seen = admission["nodes"][name]
        assert not any(c for k, c in seen.items() if k != "dropped"), admission


def _listening(pid: int, ip: str) -> str | None:
    """The tcp endpoint process `pid` listens on at `ip` (an agent's node inbox: the
    ports it reserves for its ranks are bound, never listening), or None yet."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    want = "".join(reversed([f"{int(b):02X}" for b in ip.split(".")]))
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, port = fields[1].split(":")
        if address == want and fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            return f"tcp://{ip}:{int(port, 16)}"
    return None


def test_intruders_at_node_1s_agent_are_refused_and_counted_in_the_summary(tmp_path, one_host_sha):
    """Node 1's agent is up, node 0 not yet (node 1 waits to say hello): at node 1's
    inbox three connections are refused at the handshake, node 0's valid key claims
    node 1's agent and a rank of node 1, and speaks from another run. Then node 0
    starts; the run ends with one host's bits, and summary.json counts what knocked at
    node 1 under "node1" (node 0's agent saw nobody)."""
    keys = init_keys(tmp_path / "keys", 2)
    run_dir = tmp_path / "run"
    _, agents, args = _keyed(run_dir, tmp_path, keys.directory, start=["node1"])
    node0, node1 = keys.keypair(0), keys.keypair(1)
    try:
        deadline = time.monotonic() + GUARD
        while (inbox := _listening(agents["node1"].pid, "127.0.0.3")) is None:
            assert time.monotonic() < deadline, "node 1's agent never listened"
            assert agents["node1"].poll() is None, (tmp_path / "node1.err").read_text()
            time.sleep(0.1)
        intruder = _Intruder(inbox, keys)
        try:
            claim, monitor = intruder.dealer(node0, node1[0], once=False)
            assert intruder.outcome(monitor) == "in"  # (a key of the run: refused per message)
            _send_all(claim, [_hb("node1"), _hb("rank2")])
            other, monitor = intruder.dealer(node0, node1[0], run="another-run", once=False)
            assert intruder.outcome(monitor) == "in"
            _send_all(other, [_hb("cluster", g) for g in range(10)])
            _refused_at_the_handshake(intruder, node1[0], node0, "node1")
            time.sleep(1.0)  # the last messages reach node 1's reader
        finally:
            intruder.close()
        assert agents["node1"].poll() is None, (tmp_path / "node1.err").read_text()
        agents["node0"] = agent(args["node0"], {}, tmp_path, "node0")
    finally:
        results = finish(agents)
    summary = _ended_with(results, run_dir, one_host_sha)
    admission = summary["admission"]
    assert {k: c for k, c in admission["nodes"]["node1"].items() if k != "dropped"} == {
        "refused": 15, "refused_handshake": 3, "refused_sender": 2, "refused_run": 10,
        "refused_duplicate": 0, "rejected": 0,
    }, admission  # fmt: skip
    cluster = admission["nodes"]["cluster"]
    assert not any(c for k, c in cluster.items() if k != "dropped"), admission


def _loose_secret(keys: Path) -> str:
    os.chmod(keys / "node-1.key_secret", 0o644)
    path = keys / "node-1.key_secret"
    return (
        f"{path}: mode 0644 lets its group or others in; a key file must be readable by "
        f"its owner only (chmod 600 {path})"
    )


def _one_node_of_keys(keys: Path) -> str:
    shutil.rmtree(keys)
    init_keys(keys, 1)
    return f"{keys}: keys for 1 node(s), the run has 2 (write keys for every node: " \
        "zerotrain keys init DIR --nodes 2)"  # fmt: skip


@pytest.mark.parametrize("spoil", [_loose_secret, _one_node_of_keys], ids=lambda f: f.__name__)
def test_keys_that_cannot_be_used_are_refused_in_one_line_before_anything_starts(tmp_path, spoil):
    keys = init_keys(tmp_path / "keys", 2).directory
    why = spoil(keys)
    args = [*RUN, "--nodes", "2", "--node-rank", "1", "--master", f"127.0.0.2:{free_port()}"]
    done = zerotrain(*args, "--advertise-addr", "127.0.0.3", "--keys", str(keys),
                     "--run-dir", str(tmp_path / "r"))  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"zerotrain run: node 1: keys: {why}"]
    assert not (tmp_path / "r").exists()
