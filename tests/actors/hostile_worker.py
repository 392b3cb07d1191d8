"""Subprocesses for test_hostile_peers: what aborts inside libzmq must not kill pytest.

    python hostile_worker.py raw-old DIR   the unfixed configuration, in raw pyzmq
    python hostile_worker.py ring DIR      the same on a real Ring's inbox

Each prints "survived" and exits 0 unless libzmq aborts the process (SIGABRT).
"""

from __future__ import annotations

import sys
import time

import zmq

from actors._collectives import Ring
from actors._transport import DEFAULT_SOCKET_OPTIONS, get_context


def raw_old(directory: str) -> None:
    """The ring inbox as it was configured (heartbeats on, RCVHWM 16): a peer fills it,
    hangs up, and the next reads abort in libzmq 4.3.5."""
    ctx = get_context()
    inbox = ctx.socket(zmq.DEALER)
    for name, value in {**DEFAULT_SOCKET_OPTIONS, "RCVHWM": 16}.items():
        inbox.setsockopt(getattr(zmq, name), value)
    endpoint = f"ipc://{directory}/inbox"
    inbox.bind(endpoint)
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(endpoint)
    for _ in range(200):
        peer.send(b"x" * 100)
    inbox.poll(10_000)  # the connection is up and the pipe filling (not a timed bound)
    time.sleep(0.5)
    peer.close()
    time.sleep(0.5)
    while inbox.poll(200):
        inbox.recv()
    inbox.close(0)


def ring(directory: str) -> None:
    """The same against a real Ring's inbox, as it is configured now (no token: anyone
    may connect, as a neighbour that then dies)."""
    endpoints = [f"ipc://{directory}/ring-{r}" for r in range(2)]
    rank0 = Ring(0, 2, endpoints, lanes=False)
    peer = get_context().socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(endpoints[0])
    for _ in range(200):
        peer.send(b"x" * 100)
    time.sleep(0.5)
    peer.close()
    time.sleep(0.5)
    while rank0._inbox.zmq.poll(200):
        rank0._inbox.zmq.recv_multipart()
    rank0.close()


if __name__ == "__main__":
    mode, directory = sys.argv[1:3]
    {"raw-old": raw_old, "ring": ring}[mode](directory)
    print("survived", flush=True)
