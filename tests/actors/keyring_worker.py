"""A node of host node1 under a keyring, for test_keyring's cut link:

    keyring_worker.py CLUSTER_ENDPOINT BIND RUN_ID KEYS

binds BIND (tcp://ADDR:*), names itself rank2, talks to "cluster" at CLUSTER_ENDPOINT
(heart-beating it) until killed. KEYS: {host: [public, secret]} as a Python literal."""

from __future__ import annotations

import ast
import sys

import trio

import actors

NAMES = {"cluster": "node0", "rank0": "node0", "node1": "node1", "rank2": "node1"}


async def main(endpoint: str, bind: str, run: str, keys: dict) -> None:
    pairs = {h: (p.encode(), s.encode()) for h, (p, s) in keys.items()}
    hosts = {h: pair[0] for h, pair in pairs.items()}
    actors.secure_tcp(actors.Keyring("node1", pairs["node1"], hosts, run, NAMES.get))
    async with actors.open_node(
        "rank2",
        endpoint=bind,
        peers={"cluster": endpoint},
        heartbeat_interval=0.2,
        heartbeat_timeout=1.0,
    ) as node:
        node.connect("cluster")
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], ast.literal_eval(sys.argv[4]))
