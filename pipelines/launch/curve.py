"""CURVE on a zmq socket with the cluster's keys, and the authenticator that makes it
authentication rather than encryption alone.

A CURVE server with no ZAP handler accepts ANY client key (TRANSPORT.md, checked on
this kind of machine): every process that serves CURVE must first start the
authenticator on the socket's Context:

    auth = start_authenticator(ctx, keys)       # the runtime's ZAP handler: allow-list
    try:
        server = ctx.socket(zmq.ROUTER)
        curve_server(server, keys, node=0)
        server.bind("tcp://10.0.0.1:29500")
        ...
        frame = server.recv(copy=False)         # a message frame
        sender = peer_node(frame, keys)          # the node whose key signed in
    finally:
        auth.stop()

    client = ctx.socket(zmq.DEALER)
    curve_client(client, keys, node=1, server_node=0)
    client.connect("tcp://10.0.0.1:29500")

What holds then (tests/pipelines/launch/test_curve.py, over real tcp sockets): a client
with a node's key connects and each of its messages carries that key as the frame's
"User-Id"; a client with any other key, and a plaintext client, never get a message
through. The authenticator is the runtime's one ZAP handler per Context
(``actors.admit_curve``; a second handler, such as pyzmq's ThreadAuthenticator, could not
bind beside the one that admits the run's PLAIN token): a thread of its own, beside trio,
reading nothing but the frozen public keys.

A multi-node run does not set sockets up one by one: each of its processes installs
:func:`node_keyring` (``actors.secure_tcp``), and every tcp:// socket it opens is CURVE
with its host's keypair -- node agents, rank nodes and ring links alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import zmq

from actors import Admission, Keyring, admit_curve

from .keys import ClusterKeys

__all__ = [
    "ZAP_DOMAIN",
    "curve_client",
    "curve_server",
    "host_name",
    "node_keyring",
    "peer_node",
    "start_authenticator",
]

# The ZAP domain of every zerotrain CURVE socket; the authenticator answers only for it.
ZAP_DOMAIN = "zerotrain"


def start_authenticator(ctx: zmq.Context, keys: ClusterKeys) -> Admission:
    """Admit to `ctx`'s CURVE servers of ZAP_DOMAIN exactly the cluster's public keys.
    Start it before binding a CURVE server on `ctx`; `stop()` it before terminating
    `ctx`."""
    return admit_curve(ctx, ZAP_DOMAIN, keys.public)


def curve_server(sock: zmq.Socket, keys: ClusterKeys, node: int) -> None:
    """Make `sock` (before bind) a CURVE server with node `node`'s keypair, its clients
    checked by the authenticator of ZAP_DOMAIN."""
    public, secret = keys.keypair(node)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.zap_domain = ZAP_DOMAIN.encode()
    sock.curve_server = True


def curve_client(sock: zmq.Socket, keys: ClusterKeys, node: int, server_node: int) -> None:
    """Make `sock` (before connect) a CURVE client signed in as node `node`, talking only
    to a server that holds node `server_node`'s secret key."""
    public, secret = keys.keypair(node)
    sock.curve_serverkey = keys.public[server_node]
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def peer_node(frame: zmq.Frame, keys: ClusterKeys) -> int | None:
    """The node whose key the message of `frame` (received with copy=False) came in
    under: its "User-Id" property mapped back through the cluster's public keys. None
    for a frame without one (a socket that is not a CURVE server behind the
    authenticator)."""
    try:
        user_id = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return keys.node_of(user_id) if user_id else None


def host_name(node: int) -> str:
    """The keyring's name for node (host) K, whose key is node-K.key."""
    return f"node{node}"


def node_keyring(
    keys: ClusterKeys,
    node: int,
    nnodes: int,
    ranks_per_node: int,
    run_id: str,
    rings: Sequence[str] = (),
) -> Keyring:
    """The keyring of a process on node `node` of an `nnodes` x `ranks_per_node` run:
    node K's keypair; host K speaks for its agent ("cluster" for node 0, "nodeK"; node
    0 also for the hook "analyzer"), its ranks (rank K*R .. K*R+R-1) and its control
    tools ("controlK-...", pipelines.cluster.live); every handshake says `run_id`.
    `rings`: the run's ring endpoints in rank order (a rank's process connects to its
    right neighbour's by endpoint): ring r is bound by rank r's host and admits rank
    r-1's host only.
    KeysError (one line) when `keys` holds no key for some node, or not this node's
    secret key."""
    from .keys import KeysError

    if keys.nodes < nnodes:
        raise KeysError(
            f"{keys.directory}: keys for {keys.nodes} node(s), the run has {nnodes} "
            f"(write keys for every node: zerotrain keys init DIR --nodes {nnodes})"
        )
    world = nnodes * ranks_per_node

    def host_of(name: str) -> str | None:
        if name in ("cluster", "analyzer"):  # node 0's agent and its analyzer process
            return host_name(0)
        if name.startswith("control"):  # a control tool on host K (pipelines.cluster.live)
            digits = name[len("control") :].split("-", 1)[0]
            if digits.isdigit() and digits == str(int(digits)) and int(digits) < nnodes:
                return host_name(int(digits))
            return None
        for prefix, count, per in (("node", nnodes, 1), ("rank", world, ranks_per_node)):
            digits = name[len(prefix) :]
            if name.startswith(prefix) and digits.isdigit() and digits == str(int(digits)):
                k = int(digits)
                if (prefix == "rank" or k >= 1) and k < count:
                    return host_name(k // per)
        return None

    hosts = {host_name(k): keys.public[k] for k in range(nnodes)}
    endpoints, admits = {}, {}
    for r, endpoint in enumerate(rings):
        endpoints[endpoint] = host_name(r // ranks_per_node)
        admits[endpoint] = frozenset({host_name(((r - 1) % len(rings)) // ranks_per_node)})
    return Keyring(
        host=host_name(node),
        keypair=keys.keypair(node),
        hosts=hosts,
        run=run_id,
        host_of=host_of,
        endpoints=endpoints,
        admits=admits,
    )
