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
"""

from __future__ import annotations

import zmq

from actors import Admission, admit_curve

from .keys import ClusterKeys

__all__ = ["ZAP_DOMAIN", "curve_client", "curve_server", "peer_node", "start_authenticator"]

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
