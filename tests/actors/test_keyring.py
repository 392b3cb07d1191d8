"""CURVE on every tcp:// socket (actors._admission.Keyring): a node under a keyring
admits the run's hosts only, binds each message to the host its key names, drops
messages of another run, and notices a cut link within its heartbeat timeout + 1 s.

The node runs in the test process on 127.0.0.2; intruders are raw pyzmq sockets on a
context of their own (no keyring applies to them); the peer across the cut link is a
real process (keyring_worker.py) in a network namespace joined to this one by a veth
pair, whose link the test sets down. A refusal is observed through the node's own counters."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import zmq

import actors
from actors._admission import RUN_PROPERTY
from actors._frames import Message, encode

LIMIT = 30
RUN = "run-20"
WORKER = Path(__file__).with_name("keyring_worker.py")
KEYS = {f"node{k}": zmq.curve_keypair() for k in range(2)}  # (public, secret), z85
NAMES = {"cluster": "node0", "rank0": "node0", "node1": "node1", "rank2": "node1"}


def keyring(host: str, run: str = RUN) -> actors.Keyring:
    hosts = {h: public for h, (public, _) in KEYS.items()}
    return actors.Keyring(host, KEYS[host], hosts, run, NAMES.get)


@pytest.fixture
def host0():
    previous = actors.secure_tcp(keyring("node0"))
    try:
        yield
    finally:
        actors.secure_tcp(previous)


def hb(sender: str, generation: int = 7) -> list:
    body = {"endpoint": "tcp://127.0.0.3:9", "names": []}
    return encode(Message("hb", sender, generation, 0, 0, body))


async def wait_for(predicate):
    with trio.fail_after(LIMIT):
        while not predicate():
            await trio.sleep(0.01)


def client(ctx, endpoint, keypair=None, server=None, run=RUN) -> zmq.Socket:
    """A raw DEALER: plaintext without ``keypair``, else CURVE with it, expecting the
    server key ``server``, saying ``run`` in its handshake (None: no run at all)."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.immediate = 0  # queue while the handshake goes on (or is refused)
    sock.reconnect_ivl = -1  # one attempt: one refusal to count
    if keypair is not None:
        sock.curve_publickey, sock.curve_secretkey = keypair
        sock.curve_serverkey = server
    if run is not None:
        sock.setsockopt(zmq.METADATA, f"{RUN_PROPERTY}:{run}".encode())
    sock.connect(endpoint)
    return sock


def offer(sock, frames) -> None:
    with contextlib.suppress(zmq.Again):  # a refused handshake takes the pipe away
        sock.send_multipart(frames, zmq.DONTWAIT)


async def test_a_node_under_a_keyring_admits_each_host_only_as_itself_and_only_this_run(
    host0,
):
    ctx = zmq.Context()
    server = KEYS["node0"][0]
    stranger = zmq.curve_keypair()  # a well-formed CURVE key the run never issued
    socks = []
    try:
        async with actors.open_node("cluster", endpoint="tcp://127.0.0.2:*") as node:
            where = node.endpoint

            async def attempt(frames, **how) -> None:
                sock = client(ctx, where, **how)
                socks.append(sock)
                offer(sock, frames)

            def stats(key):
                return node.statistics()[key]

            # refused at the handshake: no credentials, an unknown key, the wrong server
            await attempt(hb("rank2"))
            await wait_for(lambda: stats("refused_handshake") == 1)
            await attempt(hb("rank2"), keypair=stranger, server=server)
            await wait_for(lambda: stats("refused_handshake") == 2)
            await attempt(hb("rank2"), keypair=KEYS["node1"], server=KEYS["node1"][0])
            await wait_for(lambda: stats("refused_handshake") == 3)
            # node 1's key, claiming node 0's rank and node 0's agent: refused messages
            await attempt(hb("rank0"), keypair=KEYS["node1"], server=server)
            await attempt(hb("cluster"), keypair=KEYS["node1"], server=server)
            await wait_for(lambda: stats("refused_sender") == 2)
            # node 1's key as itself, but from another run, or saying no run at all
            for run in ("run-19", None):
                await attempt(hb("rank2"), keypair=KEYS["node1"], server=server, run=run)
            await wait_for(lambda: stats("refused_run") == 2)
            assert node.peer_info("rank0") is None and node.peer_info("rank2") is None
            assert stats("received") == 2  # the two senders that claimed node 0's names
            # ...and node 1's key as itself, of this run: heard
            await attempt(hb("rank2", 99), keypair=KEYS["node1"], server=server)
            await wait_for(lambda: node.peer_info("rank2") is not None)
            assert node.peer_info("rank2").generation == 99
            assert stats("refused") == 3 + 2 + 2
            assert stats("rejected") == 0
    finally:
        for sock in socks:
            sock.close(0)
        ctx.destroy(linger=0)


async def test_an_oversized_frame_from_an_admitted_host_drops_only_its_connection(host0):
    ctx = zmq.Context()
    server = KEYS["node0"][0]
    try:
        async with actors.open_node("cluster", endpoint="tcp://127.0.0.2:*") as node:
            big = client(ctx, node.endpoint, keypair=KEYS["node1"], server=server)
            dropped = big.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            offer(big, [*hb("rank2", 1), bytes(actors.MAX_FRAME_BYTES + 1)])
            # MAXMSGSIZE: the node drops the connection at the frame's size, unread
            await wait_for(lambda: dropped.poll(0))
            good = client(ctx, node.endpoint, keypair=KEYS["node1"], server=server)
            offer(good, hb("rank2", 2))
            await wait_for(lambda: node.peer_info("rank2") is not None)
            assert node.peer_info("rank2").generation == 2
            stats = node.statistics()
            assert (stats["received"], stats["rejected"]) == (1, 0)
            big.disable_monitor()
            dropped.close(0)
            big.close(0)
            good.close(0)
    finally:
        ctx.destroy(linger=0)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Two hosts joined by a veth pair: this process on 10.231.R.1, a network namespace
    on 10.231.R.2; yields (namespace, link on this side). Needs root and `ip`."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("a cut link needs root and ip netns (CI runs as root)")
        pytest.skip("a cut link needs root and ip netns")
    tag = f"{os.getpid() % 100000}"
    ns, here, there = f"ztk{tag}", f"ztka{tag}", f"ztkb{tag}"
    subnet = f"10.231.{os.getpid() % 250}"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", ns)
        _ip("addr", "add", f"{subnet}.1/30", "dev", here)
        _ip("link", "set", here, "up")
        _ip("-n", ns, "addr", "add", f"{subnet}.2/30", "dev", there)
        _ip("-n", ns, "link", "set", there, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns, here, subnet
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


async def test_a_cut_tcp_link_is_noticed_within_the_heartbeat_timeout_and_a_second(
    host0, two_hosts
):
    ns, link, subnet = two_hosts
    hb_interval, hb_timeout = 0.2, 1.0
    async with actors.open_node(
        "cluster",
        endpoint=f"tcp://{subnet}.1:*",
        heartbeat_interval=hb_interval,
        heartbeat_timeout=hb_timeout,
    ) as node:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        keys = {h: [k.decode() for k in pair] for h, pair in KEYS.items()}
        args = ["ip", "netns", "exec", ns, sys.executable, str(WORKER), node.endpoint,
                f"tcp://{subnet}.2:*", RUN, repr(keys)]  # fmt: skip
        async with trio.open_nursery() as nursery:
            worker = await nursery.start(
                lambda task_status: trio.run_process(
                    args, env=env, stdin=subprocess.DEVNULL, task_status=task_status,
                    check=False,
                )
            )  # fmt: skip
            try:
                with trio.fail_after(LIMIT):
                    await node.wait_peer("rank2")
                await trio.sleep(2 * hb_interval)  # heard both ways by now
                _ip("link", "set", link, "down")  # the cable cut: no FIN, no RST
                cut = trio.current_time()
                with trio.fail_after(LIMIT):
                    await node.wait_peer("rank2", alive=False)
                noticed = trio.current_time() - cut
            finally:
                worker.kill()
                nursery.cancel_scope.cancel()
    assert noticed <= hb_timeout + 1.0, f"a cut link noticed after {noticed:.2f}s"


def test_a_keyring_whose_keypair_is_not_its_hosts_listed_key_is_refused_in_one_line():
    hosts = {h: public for h, (public, _) in KEYS.items()}
    with pytest.raises(ValueError) as err:
        actors.Keyring("node0", KEYS["node1"], hosts, RUN, NAMES.get)
    assert str(err.value) == (
        "host 'node0': its public key is not the one the keyring lists for it (hosts: node0, node1)"
    )


def test_a_bound_endpoint_admits_only_the_hosts_listed_for_it():
    """What the ZAP handler asks of a ring inbox's domain: the listed host's key is
    admitted (as its z85 user id), another host of the run is not; an endpoint without
    a list admits every host."""
    hosts = {h: public for h, (public, _) in KEYS.items()}
    inbox, other = "tcp://127.0.0.2:40001", "tcp://127.0.0.2:40002"
    admits = {inbox: frozenset({"node1"})}
    kr = actors.Keyring("node0", KEYS["node0"], hosts, RUN, NAMES.get, admits=admits)

    def domain(endpoint):
        name = kr.socket_options([endpoint], [], {})["ZAP_DOMAIN"]
        return next(d for d in kr._domains.values() if d.name == name)

    raw = {h: zmq.utils.z85.decode(public) for h, public in hosts.items()}
    assert domain(inbox).decide(b"CURVE", [raw["node1"]]) == hosts["node1"]
    assert domain(inbox).decide(b"CURVE", [raw["node0"]]) is None
    assert all(domain(other).decide(b"CURVE", [k]) is not None for k in raw.values())
