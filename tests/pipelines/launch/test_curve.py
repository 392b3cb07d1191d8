"""CURVE with the cluster's keys over real tcp sockets and pyzmq's ThreadAuthenticator:
a node's key gets in and its messages carry the key as User-Id; an unknown key, a
plaintext client and a client expecting another node's server key do not.

A refusal is observed, not waited out: the server's monitor socket reports the failed
handshake (ZMQ_EVENT_HANDSHAKE_FAILED_AUTH when ZAP says no, _FAILED_PROTOCOL when the
mechanisms or keys do not match), and only then is the server checked to hold nothing.
"""

import pytest
import trio
import zmq
from zmq.utils.monitor import recv_monitor_message

import actors
from pipelines.launch import init_keys
from pipelines.launch.curve import (
    curve_client,
    curve_server,
    peer_node,
    start_authenticator,
)

GUARD_MS = 20_000  # a bound on a hung handshake, far above any expected wait
FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail",
}


@pytest.fixture
def keys(tmp_path):
    return init_keys(tmp_path / "keys", 2)


@pytest.fixture
def server(keys):
    """Node 0's CURVE PULL socket on 127.0.0.1 behind the authenticator, its monitor,
    and its Context; everything closed and stopped afterwards."""
    ctx = zmq.Context()
    auth = start_authenticator(ctx, keys)
    sock = ctx.socket(zmq.PULL)
    sock.linger = 0
    curve_server(sock, keys, node=0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(FAILED))
    try:
        yield ctx, sock, monitor, f"tcp://127.0.0.1:{port}"
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        auth.stop()
        ctx.term()


def next_handshake(monitor) -> str:
    """'ok' or the kind of failure of the next handshake the server saw."""
    assert monitor.poll(GUARD_MS), "no handshake event at all"
    event = recv_monitor_message(monitor)["event"]
    return "ok" if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else FAILED[event]


def push(ctx, address, setup, payload=b"hello") -> zmq.Socket:
    client = ctx.socket(zmq.PUSH)
    client.linger = 0
    setup(client)
    client.connect(address)
    client.send(payload, zmq.DONTWAIT)  # queued until the connection is up, if ever
    return client


def test_each_nodes_key_gets_in_and_its_messages_carry_that_key_as_user_id(keys, server):
    ctx, sock, monitor, address = server
    clients = [
        push(ctx, address, lambda s, n=node: curve_client(s, keys, n, 0), b"from %d" % node)
        for node in (1, 0)
    ]
    try:
        assert [next_handshake(monitor) for _ in clients] == ["ok", "ok"]
        senders = {}
        for _ in clients:
            assert sock.poll(GUARD_MS)
            frame = sock.recv(copy=False)
            assert frame.get("User-Id") == keys.public[peer_node(frame, keys)].decode()
            senders[frame.bytes] = peer_node(frame, keys)
        assert senders == {b"from 0": 0, b"from 1": 1}
    finally:
        for client in clients:
            client.close(0)


def refuse_unknown_key(keys, s):
    public, secret = zmq.curve_keypair()  # a valid CURVE key the cluster never issued
    s.curve_serverkey, s.curve_publickey, s.curve_secretkey = keys.public[0], public, secret


def refuse_plaintext(keys, s):
    pass  # no CURVE at all


def refuse_wrong_server_key(keys, s):
    curve_client(s, keys, node=1, server_node=1)  # expects node 1 where node 0 listens


@pytest.mark.parametrize(
    "client_setup, failure",
    [
        (refuse_unknown_key, "auth"),
        (refuse_plaintext, "protocol"),
        (refuse_wrong_server_key, "protocol"),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_a_client_without_a_cluster_key_never_gets_a_message_through(
    keys, server, client_setup, failure
):
    ctx, sock, monitor, address = server
    stranger = push(ctx, address, lambda s: client_setup(keys, s))
    member = None
    try:
        assert next_handshake(monitor) == failure
        assert sock.poll(0) == 0
        # the server still serves the cluster: a node's message is the first to arrive
        member = push(ctx, address, lambda s: curve_client(s, keys, node=1, server_node=0))
        assert sock.poll(GUARD_MS)
        frame = sock.recv(copy=False)
        assert peer_node(frame, keys) == 1
    finally:
        stranger.close(0)
        if member is not None:
            member.close(0)


async def test_the_runs_token_and_the_clusters_keys_are_admitted_by_one_handler(keys):
    # One ZAP handler per context: the node's (PLAIN, the run's token) and the cluster's
    # CURVE allow-list share get_context(); a second authenticator could not bind.
    token = b"0123456789abcdef0123456789abcdef"
    ctx = actors.get_context()
    async with actors.open_node("test", token=token) as node:
        auth = start_authenticator(ctx, keys)
        sock = ctx.socket(zmq.PULL)
        sock.linger = 0
        curve_server(sock, keys, node=0)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        where = actors.ipc_endpoint("rank1", node.directory)
        creds = {"plain_username": b"rank1", "plain_password": token}
        real = actors.open_socket("DEALER", connect=node.endpoint, routing_id=b"rank1", **creds)
        member = push(
            ctx, f"tcp://127.0.0.1:{port}", lambda s: curve_client(s, keys, 1, 0), b"node 1"
        )
        try:
            hb = actors.Message("hb", "rank1", 7, 0, 0, {"endpoint": where, "names": []})
            await real.send_message(hb)
            with trio.fail_after(GUARD_MS / 1000):
                while node.peer_info("rank1") is None or not sock.poll(0):
                    await trio.sleep(0.01)
            frame = sock.recv(copy=False)
            assert (frame.bytes, peer_node(frame, keys)) == (b"node 1", 1)
        finally:
            member.close(0)
            real.close()
            sock.close(0)
            auth.stop()


def test_a_node_keyring_names_who_speaks_for_whom_and_whom_each_ring_inbox_admits(keys):
    """2 nodes x 2 ranks: ring r is bound by rank r's host and admits only rank r-1's
    host (rank 0's inbox: rank 3's, on node 1); node K's host speaks for its agent and
    its ranks, nobody for a name outside the run."""
    from pipelines.launch import KeysError
    from pipelines.launch.curve import node_keyring

    rings = [f"tcp://127.0.0.{2 + r // 2}:{7000 + r}" for r in range(4)]
    kr = node_keyring(keys, 1, 2, 2, "run-7", rings)
    assert (kr.host, kr.run) == ("node1", "run-7")
    assert kr.endpoints == dict(zip(rings, ["node0", "node0", "node1", "node1"], strict=True))
    assert [sorted(kr.admits[e]) for e in rings] == [["node1"], ["node0"], ["node0"], ["node1"]]
    names = ["cluster", "node0", "node1", "node2", "rank0", "rank1", "rank2", "rank3",
             "rank4", "rank01", "nodex"]  # fmt: skip
    assert [kr.host_of(n) for n in names] == [
        "node0", None, "node1", None, "node0", "node0", "node1", "node1", None, None, None
    ]  # fmt: skip
    with pytest.raises(KeysError, match="keys for 2 node\\(s\\), the run has 3"):
        node_keyring(keys, 0, 3, 2, "run-7", rings)
