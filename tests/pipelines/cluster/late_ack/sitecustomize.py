"""Planted delays for test_nodes, loaded by Python at start-up (sitecustomize) in the
processes whose PYTHONPATH begins with this directory. Other processes load nothing.

ZEROTRAIN_TEST_LATE_WATCHING="NODE:SECONDS": in the process whose actors node is NODE,
the first "watching" acknowledgement it owes node "cluster" (the answer to the
Coordinator's monitor of its Trainer) leaves SECONDS late, as a loaded host or a slow
link delays it. ZEROTRAIN_TEST_LATE_JOIN="NODE:SECONDS[:NTH]": the rank process NODE
sends its NTH Join (default the first) SECONDS late -- a rank slow to start, or one
stuck with its heartbeats going -- so the others wait in theirs.
ZEROTRAIN_TEST_UNACKED_UNTIL_TRAINING="NODE": in the rank process NODE, every
"watching" ack owed to node "cluster" before the rank's first collective is never sent
(the Coordinator sees the rank down heartbeat_timeout after each such monitor, whatever
the load), and that first collective is held until a regroup aborts it (at most
_HELD_S): the rank is in its collective when the Coordinator sees it down, and the run
cannot end first. The abort is said on stderr (the node's ranks.log), HELD_LINE."""

import os
import sys

_NODE = os.environ.get("ZEROTRAIN_NODE")


def _planted(variable: str) -> list[float] | None:
    node, *numbers = os.environ.get(variable, "").split(":")
    return [float(x) for x in numbers] if node and node == _NODE else None


_WATCHING = (_planted("ZEROTRAIN_TEST_LATE_WATCHING") or [None])[0]
_JOIN = _planted("ZEROTRAIN_TEST_LATE_JOIN")
_UNACKED = _NODE is not None and os.environ.get("ZEROTRAIN_TEST_UNACKED_UNTIL_TRAINING") == _NODE
HELD_LINE = "late_ack: the first collective, held, was aborted by a regroup"
_HELD_S = 300.0  # a bound: past it the collective goes on (the test fails elsewhere)

if _WATCHING is not None:
    import trio

    from actors import _node

    _serve_watch = _node.Node._serve_watch
    _held = []

    def _late_serve_watch(self, peer, msg, kind):
        if _held or peer.name != "cluster" or kind != "monitor":
            return _serve_watch(self, peer, msg, kind)
        _held.append(True)
        send_soon = self._send_soon

        def hold(peer_name, what, body, *args, **kwargs):
            if what != "watching":
                return send_soon(peer_name, what, body, *args, **kwargs)

            async def later():
                await trio.sleep(_WATCHING)
                send_soon(peer_name, what, body, *args, **kwargs)

            trio.lowlevel.spawn_system_task(later)

        self._send_soon = hold
        try:
            return _serve_watch(self, peer, msg, kind)
        finally:
            del self._send_soon

    _node.Node._serve_watch = _late_serve_watch

if _JOIN:
    import trio

    from pipelines.cluster import messages

    _join = messages.join
    _seconds, _nth = _JOIN[0], int(_JOIN[1]) if len(_JOIN) > 1 else 1
    _joins = []

    async def _late_join(*args, **kwargs):
        _joins.append(True)
        if len(_joins) == _nth:
            await trio.sleep(_seconds)
        return await _join(*args, **kwargs)

    messages.join = _late_join

if _UNACKED:
    from contextlib import asynccontextmanager

    import trio

    from actors import _node
    from pipelines.cluster import roles

    _serve_watch_once = _node.Node._serve_watch
    _collective = roles.RankState.collective
    _trained = []  # set once this rank is in its first collective

    def _unacked_serve_watch(self, peer, msg, kind):
        if _trained or peer.name != "cluster" or kind != "monitor":
            return _serve_watch_once(self, peer, msg, kind)
        send_soon = self._send_soon

        def drop_watching(peer_name, what, body, *args, **kwargs):
            if what != "watching":
                return send_soon(peer_name, what, body, *args, **kwargs)
            return None

        self._send_soon = drop_watching
        try:
            return _serve_watch_once(self, peer, msg, kind)
        finally:
            del self._send_soon

    @asynccontextmanager
    async def _held_collective(self, what):
        async with _collective(self, what) as ring:
            if not _trained:
                _trained.append(True)
                try:
                    with trio.move_on_after(_HELD_S):
                        await trio.sleep_forever()
                except trio.Cancelled:
                    if self.ring.generation < self.min_generation:  # a regroup's abort
                        print(HELD_LINE, file=sys.stderr, flush=True)
                    raise
            yield ring

    _node.Node._serve_watch = _unacked_serve_watch
    roles.RankState.collective = _held_collective
