"""Remote call / cast / monitor / link between real processes, and untrusted input.

Each test runs a node in the test process and one or two worker processes
(``proc_worker.py``) under a supervisor. Real time, real sockets: every wait is under a
``fail_after`` and nothing asserts on wall time.
"""

import dataclasses
import enum
import errno
import os
import random
import signal
import socket
import sys
import time
from contextlib import asynccontextmanager
from functools import partial

import msgpack
import numpy as np
import pytest
import trio
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

import actors
from actors import ActorExited, CallTimeout, Down, Exit, NoSuchActor, RemoteError, WireError
from actors._frames import Message
from actors._node import _OUTBOX
from actors._transport import ipc_endpoint, open_socket
from tests.actors.actor_util import TrappingWatcher

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proc_worker.py")
LIMIT = 30  # seconds; a hang fails the test instead of the suite
HEARTBEAT_TIMEOUT = 1.0  # generous: 2 cores are shared with other test runs


TRANSPORTS = {"ipc": None, "tcp": "tcp://127.0.0.1:*"}  # None: the node's ipc directory


@asynccontextmanager
async def cluster(*workers, transport="ipc"):
    """A test node plus supervised worker processes serving Echo@<worker>."""
    with trio.fail_after(LIMIT):
        async with cluster_node(workers, TRANSPORTS[transport]) as node:
            yield node


@asynccontextmanager
async def cluster_node(workers, endpoint):
    options = {"heartbeat_interval": 0.1, "heartbeat_timeout": HEARTBEAT_TIMEOUT}
    options["endpoint"] = endpoint
    async with actors.open_node("test", **options) as node:
        async with trio.open_nursery() as nursery:
            specs = [
                actors.process_spec(
                    w, [sys.executable, WORKER], wait_for=["Echo"], shutdown=2, endpoint=endpoint
                )
                for w in workers
            ]
            sup = await nursery.start(actors.Supervisor(specs, name="workers").run)
            yield node
            await actors.stop(sup, timeout=None)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_remote_call_carries_data_and_tensors_both_ways(transport):
    async with cluster("w1", transport=transport) as node:
        assert node.peer_info("w1").endpoint.startswith(transport)
        value = {"a": [1, 2.5, (3, "x")], 7: None, "$odd": b"\x00"}
        assert await actors.call("Echo@w1", ("echo", value)) == value
        doubled = await actors.call("Echo@w1", ("double", np.arange(6.0).reshape(2, 3)))
        assert doubled.shape == (2, 3) and doubled.tolist() == [[0, 2, 4], [6, 8, 10]]
        stats = await actors.statistics("Echo@w1")
        assert (stats.name, stats.processed) == ("Echo", 2)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_remote_failures_raise_the_same_errors_as_local_ones(transport):
    async with cluster("w1", transport=transport):
        with pytest.raises(ActorExited, match=r"Echo@w1 exited .*RuntimeError: kaboom"):
            await actors.call("Echo@w1", ("crash", "kaboom"))
        with pytest.raises(NoSuchActor, match="no actor registered as 'Nobody' on node w1"):
            await actors.call("Nobody@w1", 1)
        await wait_for_echo("w1")
        before = (await actors.statistics("Echo@w1")).processed
        with pytest.raises(CallTimeout, match=r"timed out after 0s"):
            await actors.call("Echo@w1", ("echo", 1), timeout=0)  # never sent
        assert await actors.call("Echo@w1", ("echo", 2)) == 2
        assert (await actors.statistics("Echo@w1")).processed == before + 1
        # The same error whichever deadline fires first, the caller's or the server's.
        timed_out = r"call to Echo@w1 timed out after 0.3s \(request: \('sleep', 5\)\)"
        with pytest.raises(CallTimeout, match=timed_out):
            await actors.call("Echo@w1", ("sleep", 5), timeout=0.3)
        with pytest.raises(WireError, match="cannot travel"):
            await actors.call("Echo@w1", ("echo", object()))  # never pickled, never sent


async def test_values_over_a_peers_limits_are_refused_with_a_reason_not_lost():
    # Sent, they would be dropped by the receiver (a frame over ZMQ_MAXMSGSIZE drops the
    # connection; decode rejects the rest): the call would time out unexplained.
    over = (64 << 20) // 4 + 1  # float32s: 4 bytes over the cap (np.zeros is lazy)
    too_much = [b"x" * (2 << 20), list(range(70000)), dict.fromkeys(map(str, range(5000)))]
    async with cluster("w1"):
        with pytest.raises(WireError, match="bytes one frame may carry"):
            await actors.call("Echo@w1", ("double", np.zeros(over, np.float32)))
        with pytest.raises(WireError, match="bytes one frame may carry"):
            await actors.cast("Echo@w1", np.zeros(over, np.float32))
        for value in too_much:
            with pytest.raises(WireError, match="call cannot travel: .* at most"):
                await actors.call("Echo@w1", ("echo", value))
            with pytest.raises(WireError, match="cast cannot travel: .* at most"):
                await actors.cast("Echo@w1", value)
        with pytest.raises(RemoteError, match="Echo replied with .* bytes one frame may carry"):
            await actors.call("Echo@w1", ("zeros", over), timeout=LIMIT)
        with pytest.raises(RemoteError, match="Echo replied with .* list of 70000 items"):
            await actors.call("Echo@w1", ("range", 70000), timeout=LIMIT)
        assert await actors.call("Echo@w1", ("echo", 1)) == 1


async def test_remote_calls_beyond_the_mailbox_capacity_are_all_answered():
    # A call goes straight into the actor's mailbox; once it is full the serving node
    # queues it in the actor's overflow: every caller gets its own answer either way.
    # Echo takes nothing from its mailbox until the flood has met it full.
    async with cluster("w1"):
        answers = {}
        capacity = actors.Actor.mailbox_size

        async def ask(i):
            answers[i] = await actors.call("Echo@w1", ("echo", i), timeout=LIMIT)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(actors.call, "Echo@w1", ("hold", "flood"), timeout=LIMIT))
            while not await actors.call("Gate@w1", ("holding", "flood")):
                await trio.sleep(0.01)
            for i in range(3 * capacity):
                nursery.start_soon(ask, i)
            while (await actors.call("Gate@w1", ("node_stats",)))["overflowed"] == 0:
                await trio.sleep(0.01)
            assert (await actors.statistics("Echo@w1")).queue_depth == capacity
            await actors.call("Gate@w1", ("release", "flood"))
        # the mailbox did fill up: some calls went the overflow's way
        assert (await actors.call("Echo@w1", ("node_stats",)))["overflowed"] > 0
    assert answers == {i: i for i in range(3 * capacity)}


def test_a_timeout_reported_by_the_serving_node_names_the_callers_timeout():
    # Under load the serving node's "timeout" reply can beat the caller's own deadline
    # (it once arrived first and read "timed out after nans"): both give the same error.
    from actors._node import _error, _error_from_wire, _Pending

    pending = _Pending(None, "w1", "Echo@w1", ("sleep", 5), 0.3)
    error = _error_from_wire(pending, _error("timeout", "no reply within 0.3s"))
    assert isinstance(error, CallTimeout) and error.timeout == 0.3
    assert str(error) == "call to Echo@w1 timed out after 0.3s (request: ('sleep', 5))"


async def wait_for_echo(worker):
    """After a crash, wait until the worker's supervisor has restarted Echo."""
    while True:
        try:
            return await actors.call(f"Echo@{worker}", ("pid",))
        except (NoSuchActor, ActorExited):
            await trio.sleep(0.05)


async def test_casts_reach_a_remote_actor_in_order_and_stop_stops_it():
    async with cluster("w1"):
        for i in range(50):
            await actors.cast("Echo@w1", i)
        assert await actors.call("Echo@w1", ("cast_log",)) == list(range(50))
        await actors.stop("Echo@w1", reason="shutdown")
        assert await wait_for_echo("w1")  # its supervisor restarted it (permanent)
        assert await actors.call("Echo@w1", ("casts",)) == 0


async def test_one_rank_calls_another_by_name():
    async with cluster("w1", "w2"):
        assert await actors.call("Echo@w1", ("call", "Echo@w2", ("echo", "hi"))) == "hi"


async def test_down_is_delivered_when_a_remote_process_is_sigkilled():
    async with cluster("w1", "w2") as node:
        async with trio.open_nursery() as nursery:
            watcher = TrappingWatcher()
            w = await actors.spawn(nursery, watcher)
            ref = await actors.call(w, ("monitor", "Echo@w1"))
            # A watcher in another process. The round trip after the monitor means w2 has
            # heard from this incarnation of w1, so a successor is seen as one (and retires
            # it, with its Downs). Without it a kill could beat w2's first message to w1,
            # which ZeroMQ then hands to w1's restarted incarnation on reconnect: w2 would be
            # monitoring the new, live Echo, and no Down is owed (a CI flake, once).
            await actors.call("Echo@w2", ("monitor", "Echo@w1"))
            assert await actors.call("Echo@w2", ("call", "Echo@w1", ("echo", 1))) == 1
            pid = await actors.call("Echo@w1", ("pid",))
            killed = node.peer_info("w1").generation
            os.kill(pid, signal.SIGKILL)
            await watcher.got.wait()
            assert watcher.events == [Down(ref, "Echo@w1", "noconnection")]
            # w2 is not w1's parent: it learns from missed heartbeats (or w1's successor)
            while not await actors.call("Echo@w2", ("downs",)):
                await trio.sleep(0.1)
            assert await actors.call("Echo@w2", ("downs",)) == [("Echo@w1", "noconnection")]
            await actors.stop(w)
        # and the supervisor's restart is a new incarnation, up
        assert (await node.wait_peer("w1", newer_than=killed)).alive


async def test_a_call_to_a_killed_incarnation_is_not_run_by_its_successor():
    async with cluster("w1", "w2"):
        assert await actors.call("Echo@w2", ("call", "Echo@w1", ("echo", 1))) == 1  # w2 knows w1
        pid = await actors.call("Echo@w1", ("pid",))
        os.kill(pid, signal.SIGKILL)
        await trio.sleep(0.2)  # w1 is gone; w2 is not told (its heartbeat deadline is 1 s)
        async with trio.open_nursery() as nursery:
            # w2 still thinks w1 is up: its call waits in ZeroMQ for w1's endpoint to come
            # back, and ZeroMQ hands it to w1's restarted incarnation on reconnect. w2's
            # call fails with noconnection once it hears the new w1 (Echo@w2 crashes on it).
            async def call_the_old_w1():
                with pytest.raises(ActorExited):
                    await actors.call("Echo@w2", ("call", "Echo@w1", ("bump",)), timeout=20)

            nursery.start_soon(call_the_old_w1)
            assert await wait_for_echo("w1") != pid
            # until w2's queued call has reached the new w1: dropped, or (wrongly) run
            stale = bumps = 0
            while not (stale or bumps):
                await trio.sleep(0.05)
                stale = (await actors.call("Echo@w1", ("node_stats",))).get("stale", 0)
                bumps = await actors.call("Echo@w1", ("casts",))
            assert (stale, bumps) == (1, 0)
        # w2 reaches the new incarnation normally, and so does a cast
        assert await wait_for_w2_to_reach_w1(("echo", 2)) == 2
        await actors.call("Echo@w2", ("cast", "Echo@w1", "hello"))
        while not await actors.call("Echo@w1", ("casts",)):
            await trio.sleep(0.05)


async def wait_for_w2_to_reach_w1(request):
    while True:
        try:
            return await actors.call("Echo@w2", ("call", "Echo@w1", request))
        except ActorExited:  # Echo@w2 is being restarted
            await trio.sleep(0.05)


class Relay(actors.Actor):
    """A slow consumer of casts that calls another node for each one."""

    mailbox_size = 2

    async def init(self):
        self.got, self.failed = [], []

    async def handle_cast(self, msg):
        await trio.sleep(0.005)
        try:
            self.got.append(await actors.call("Echo@w2", ("echo", msg), timeout=3))
        except Exception as exc:
            self.failed.append(repr(exc))


async def test_a_slow_actor_that_calls_out_under_a_flood_of_casts_is_not_deadlocked():
    # w1 floods Relay@test with casts while Relay calls w2 for each one. The replies from
    # w2 reach Relay although its mailbox is full (the flood waits in an overflow, and
    # w1 is told to hold its casts): no reply waits behind the flood.
    flooders, each = 8, 20
    async with cluster("w1", "w2") as node, trio.open_nursery() as nursery:
        relay = Relay()
        await actors.spawn(nursery, relay, name="Relay")

        async def flood(k):
            for i in range(each):
                await actors.call("Echo@w1", ("cast", "Relay@test", [k, i]), timeout=LIMIT)

        async with trio.open_nursery() as floods:
            for k in range(flooders):
                floods.start_soon(flood, k)
        while len(relay.got) + len(relay.failed) < flooders * each:
            await trio.sleep(0.05)
        assert relay.failed == []
        for k in range(flooders):  # each flooder's casts arrive in the order sent
            assert [i for j, i in relay.got if j == k] == list(range(each))
        assert node.statistics()["overflowed"] > 0  # the flood did meet a full mailbox
        assert (await actors.call("Echo@w1", ("node_stats",)))["held"] > 0  # w1 held
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def fake_peer(node, name="mallory"):
    """A hand-driven peer: its inbox, and a DEALER into ``node``."""
    inbox = open_socket("ROUTER", bind=ipc_endpoint(name, node.directory))
    out = open_socket("DEALER", connect=node.endpoint, routing_id=name.encode())
    with inbox, out:
        yield inbox, out


async def next_of_type(inbox, kind):
    while True:
        _, msg = await inbox.recv_message()
        if msg.type == kind:
            return msg


@pytest.mark.parametrize("ending", ["ready", "expiry"])
async def test_a_busy_actor_holds_its_senders_casts_until_ready_or_expiry(ending):
    # expiry: heartbeat_timeout after the last busy (a lost ready costs a pause only)
    timeout = LIMIT if ending == "ready" else HEARTBEAT_TIMEOUT
    with trio.fail_after(LIMIT):
        async with actors.open_node("test", heartbeat_timeout=timeout) as node:
            async with fake_peer(node) as (inbox, out), trio.open_nursery() as nursery:

                async def heartbeats():  # mallory stays alive for the node
                    while True:
                        await out.send_message(Message("hb", "mallory", 7, body={"names": []}))
                        await trio.sleep(0.05)

                nursery.start_soon(heartbeats)
                await out.send_message(Message("busy", "mallory", 7, body={"to": "Sink"}))
                await node.wait_peer("mallory")
                while ("mallory", "Sink") not in node._gates:
                    await trio.sleep(0.01)
                nursery.start_soon(actors.cast, "Sink@mallory", "held")
                while node.statistics()["held"] < 1:
                    await trio.sleep(0.01)
                if ending == "ready":
                    assert await next_of_type_now(inbox) is None  # no cast has left
                    await out.send_message(Message("ready", "mallory", 7, body={"to": "Sink"}))
                cast = await next_of_type(inbox, "cast")
                assert cast.body["to"] == "Sink" and cast.body["msg"] == "held"
                assert ("mallory", "Sink") not in node._gates
                if ending == "expiry":  # a gate nobody waits behind expires all the same
                    await out.send_message(Message("busy", "mallory", 7, body={"to": "Idle"}))
                    while ("mallory", "Idle") not in node._gates:
                        await trio.sleep(0.01)
                    while ("mallory", "Idle") in node._gates:
                        await trio.sleep(0.01)
                await out.send_message(Message("busy", "mallory", 7, body={"to": "no@such"}))
                assert (await next_of_type(inbox, "error")).body["reason"].startswith("actor name")
                nursery.cancel_scope.cancel()


class Sink(actors.Actor):
    """Takes no mail until opened; then records it."""

    mailbox_size = 1

    async def init(self):
        self.opened, self.got = trio.Event(), []

    async def handle_cast(self, msg):
        await self.opened.wait()
        if msg == "crash":
            raise RuntimeError("told to crash")
        self.got.append(msg)


@pytest.mark.parametrize("bound", ["messages", "bytes"])
async def test_a_sender_that_ignores_busy_is_bounded_by_pausing_the_reader(monkeypatch, bound):
    if bound == "messages":
        monkeypatch.setattr(actors._node, "_OVERFLOW_MAX", 20)
    else:  # 1 KiB tensors past 20 KiB
        monkeypatch.setattr(actors._node, "_OVERFLOW_MAX_BYTES", 20 << 10)
    n = 60
    payload = np.zeros(256, np.float32)
    with trio.fail_after(LIMIT):
        async with actors.open_node("test") as node, trio.open_nursery() as nursery:
            sink = Sink()
            ref = await actors.spawn(nursery, sink, name="Sink")
            async with fake_peer(node) as (_, out):

                async def flood():  # never reads its inbox, so never hears busy
                    for i in range(n):
                        body = {"to": "Sink", "msg": [i, {"$nd": 0}]}
                        cast = Message("cast", "mallory", 7, body=body, tensors=[payload])
                        await out.send_message(cast)

                nursery.start_soon(flood)
                while not node._paused:  # the overflow passed its bound: the reader waits
                    await trio.sleep(0.01)
                for _ in range(20):  # and keeps it there: at most one over (20 while the
                    overflow = node._overflows[ref]  # drainer has just made room)
                    assert len(overflow.items) <= 21
                    assert overflow.nbytes == len(overflow.items) * payload.nbytes
                    await trio.sleep(0.005)
                sink.opened.set()
                while len(sink.got) < n:
                    await trio.sleep(0.01)
            assert [i for i, _ in sink.got] == list(range(n))
            assert all(np.array_equal(tensor, payload) for _, tensor in sink.got)
            assert not node._paused and not node._overflows
            nursery.cancel_scope.cancel()


async def test_a_call_stuck_sending_to_a_peer_fails_when_the_peer_goes_down():
    # mallory never reads: casts back up until ZeroMQ's queues and the node's outbox for
    # it are full, so a call has to wait to be sent (the slow path). The peer going down
    # must end that wait at once with noconnection, even with no timeout.
    with trio.fail_after(LIMIT):
        async with actors.open_node("test", send_timeout=LIMIT) as node:
            async with fake_peer(node) as (_inbox, out), trio.open_nursery() as nursery:
                await out.send_message(Message("hb", "mallory", 7, body={"names": []}))
                await node.wait_peer("mallory")

                async def cast_forever():
                    while True:
                        await actors.cast("Sink@mallory", np.zeros(1 << 16, np.uint8))

                for _ in range(_OUTBOX + 8):  # more casters than the outbox holds
                    nursery.start_soon(cast_forever)
                outbox = node._peers["mallory"].outbox
                while True:  # until nothing leaves and the outbox is full
                    sent = node.statistics()["sent"]
                    await trio.sleep(0.1)
                    full = outbox.statistics().current_buffer_used == _OUTBOX
                    if full and node.statistics()["sent"] == sent:
                        break

                async def goes_down():
                    await trio.sleep(0.2)
                    node.peer_exited("mallory")

                nursery.start_soon(goes_down)
                with pytest.raises(ActorExited, match="noconnection"):
                    await actors.call("Sink@mallory", 1, timeout=None)
                # Ended by the peer's going down, not by anything leaving: ZeroMQ drops
                # the stalled connection only after its heartbeat timeout (2.5 s).
                assert node.statistics()["sent"] == sent
                nursery.cancel_scope.cancel()


async def test_remote_casts_that_never_wait_still_let_other_tasks_run():
    # 200 small casts fit in ZeroMQ's queues, so none has to wait; the caster must still
    # yield now and then (every 16th), or heartbeats and the reader would starve.
    async with actors.open_node("test") as node:
        async with fake_peer(node) as (_inbox, out), trio.open_nursery() as nursery:
            await out.send_message(Message("hb", "mallory", 7, body={"names": []}))
            await node.wait_peer("mallory")
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    ticks += 1
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(ticker)
            await trio.sleep(0.01)
            ticks = 0
            for i in range(200):
                await actors.cast("Sink@mallory", i)
            assert ticks >= 200 // 16 - 1
            assert node.statistics()["held"] == 0  # (all went at once: none was held)
            nursery.cancel_scope.cancel()


async def test_calls_waiting_in_an_overflow_are_answered_exited_when_the_actor_dies():
    sink = Sink()

    async def run_sink(task_status):
        with pytest.raises(RuntimeError, match="told to crash"):
            await sink.run(name="Sink", task_status=task_status)

    with trio.fail_after(LIMIT):
        async with actors.open_node("test") as node, trio.open_nursery() as nursery:
            ref = await nursery.start(run_sink)
            async with fake_peer(node) as (inbox, out):
                cast = Message("cast", "mallory", 7, body={"to": "Sink", "msg": "crash"})
                await out.send_message(cast)
                for seq in range(1, 6):  # one in the mailbox, the rest in the overflow
                    call = {"to": "Sink", "request": seq, "timeout": None}
                    await out.send_message(Message("call", "mallory", 7, seq=seq, body=call))
                while ref not in node._overflows or len(node._overflows[ref].items) < 4:
                    await trio.sleep(0.01)
                sink.opened.set()
                replies = {}
                while len(replies) < 5:
                    msg = await next_of_type(inbox, "reply")
                    replies[msg.seq] = (msg.body["ok"], msg.body["kind"])
                assert replies == {seq: (False, "exited") for seq in range(1, 6)}
                assert (await next_of_type(inbox, "ready")).body["to"] == "Sink"
            assert not node._overflows
            nursery.cancel_scope.cancel()


async def next_of_type_now(inbox):
    """A queued non-heartbeat message, or None once nothing but heartbeats is queued."""
    while inbox.has_input():
        _, msg = await inbox.recv_message()
        if msg.type != "hb":
            return msg
    return None


async def test_monitoring_a_missing_remote_actor_gives_noproc():
    async with cluster("w1"):
        async with trio.open_nursery() as nursery:
            watcher = TrappingWatcher()
            w = await actors.spawn(nursery, watcher)
            ref = await actors.call(w, ("monitor", "Nobody@w1"))
            await watcher.got.wait()
            assert watcher.events == [Down(ref, "Nobody@w1", "noproc")]
            await actors.stop(w)


async def test_a_remote_link_turns_a_remote_crash_into_an_exit_signal():
    async with cluster("w1"):
        async with trio.open_nursery() as nursery:
            watcher = TrappingWatcher()
            w = await actors.spawn(nursery, watcher)
            await actors.call(w, ("link", "Echo@w1"))
            with pytest.raises(ActorExited):
                await actors.call("Echo@w1", ("crash", "linked"))
            await watcher.got.wait()
            [event] = watcher.events
            assert isinstance(event, Exit) and event.sender == "Echo@w1"
            assert "RuntimeError: linked" in actors.format_reason(event.reason)
            await actors.stop(w)


async def test_a_call_to_an_unreachable_node_fails_with_noconnection():
    with trio.fail_after(LIMIT):
        async with actors.open_node("test", heartbeat_interval=0.1, heartbeat_timeout=0.5):
            with pytest.raises(ActorExited, match="noconnection"):
                await actors.call("Echo@nowhere", 1, timeout=10)


async def _call_once(name: str, bind: str, server: str) -> tuple:
    """One short-lived tcp node, as a control tool opens: call Probe@srv, stay a moment
    (the server's connections to earlier tools may reach it meanwhile); the reply and
    the node's misaddressed count."""
    options = {"endpoint": bind, "peers": {"srv": server}, "heartbeat_timeout": HEARTBEAT_TIMEOUT}
    async with actors.open_node(name, **options) as node:
        reply = await actors.call("Probe@srv", ("hello", name), timeout=LIMIT)
        await trio.sleep(0.3)
        return reply, node.statistics()["misaddressed"]


def _on_the_port_when_free(name: str, bind: str, server: str) -> tuple:
    """_call_once, once the port is free again (ZeroMQ closes the last tool's listening
    socket in its own thread, a moment after that tool's node is closed)."""
    for _ in range(100):
        try:
            return trio.run(_call_once, name, bind, server)
        except zmq.ZMQError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            time.sleep(0.05)
    raise AssertionError(f"{bind} stayed in use")


async def test_tcp_callers_one_after_another_on_one_port_each_get_their_own_reply():
    """Control tools that end and start again on one tcp port (as an ephemeral port the
    OS hands out again): the server's connection to the ended tool reconnects to the new
    one, under an id naming the ended tool, and is dropped there (misaddressed); each
    tool gets its own reply, none of them after a heartbeat's wait."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        bind = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    options = {"endpoint": "tcp://127.0.0.1:*", "heartbeat_timeout": HEARTBEAT_TIMEOUT}
    async with actors.open_node("srv", **options) as node, trio.open_nursery() as nursery:
        await actors.spawn(nursery, Probe(), name="Probe")
        seen = []
        for i in range(4):  # each tool in a thread of its own: one node per trio run
            call = partial(_on_the_port_when_free, f"ctl-{i}", bind, node.endpoint)
            seen.append(await trio.to_thread.run_sync(call))
        nursery.cancel_scope.cancel()
    assert [list(reply) for reply, _ in seen] == [["hello", f"ctl-{i}"] for i in range(4)]
    assert all(misaddressed > 0 for _, misaddressed in seen[1:]), seen


@pytest.mark.parametrize("directory", [False, True], ids=["tcp_only", "with_ipc_directory"])
async def test_a_tcp_callers_reply_waits_for_the_heartbeat_that_names_its_endpoint(
    directory, tmp_path
):
    """A call can reach a tcp node before the caller's first hb, which names where to
    answer, does: the reply waits for that hb instead of being dropped -- also on a node
    that finds its local peers in an ipc directory (node 0's agent), where the caller,
    not in the directory, must not be taken to listen there."""
    options = {"endpoint": "tcp://127.0.0.1:*", "heartbeat_timeout": HEARTBEAT_TIMEOUT}
    if directory:
        options["directory"] = str(tmp_path)
    async with actors.open_node("srv", **options) as node, trio.open_nursery() as nursery:
        await actors.spawn(nursery, Probe(), name="Probe")
        inbox = open_socket("ROUTER", bind="tcp://127.0.0.1:*")
        out = open_socket("DEALER", connect=node.endpoint, routing_id=b"caller@1>srv")
        with inbox, out, trio.fail_after(LIMIT):
            call = {"to": "Probe", "request": "early"}
            await out.send_message(Message("call", "caller", 1, 0, 5, call))
            while node.statistics()["received"] < 1:
                await trio.sleep(0.01)
            await trio.sleep(0.2)  # Probe has answered: the answer has nowhere to go yet
            hb = {"endpoint": inbox.last_endpoint, "names": []}
            await out.send_message(Message("hb", "caller", 1, 0, 0, hb))
            answer = await next_of_type(inbox, "reply")
            assert (answer.seq, answer.body["value"]) == (5, "early")
        nursery.cancel_scope.cancel()


async def test_a_malformed_message_is_rejected_and_the_node_keeps_serving():
    async with cluster("w1") as node:
        # "mallory" has an inbox where w1's node can answer (same ipc directory)
        inbox = open_socket("ROUTER", bind=ipc_endpoint("mallory", node.directory))
        out = open_socket("DEALER", connect=node.peer_info("w1").endpoint, routing_id=b"mallory")
        with inbox, out:
            await out.send_multipart([b"\xc1 not msgpack"])  # undecodable header
            answer = await recv_answer(inbox)
            assert (answer.type, answer.sender) == ("error", "w1")
            assert answer.body["reason"]

            bad_call = Message("call", "mallory", 1, 0, 7, {"request": 1})  # no "to"
            await out.send_message(bad_call)
            answer = await recv_answer(inbox)
            assert (answer.type, answer.seq, answer.body["ok"]) == ("reply", 7, False)
            assert answer.body["kind"] == "bad_request"
            assert "field 'to' must be str" in answer.body["reason"]["text"]

            bad_data = Message("call", "mallory", 1, 0, 8, {"to": "Echo", "request": {"$r": 1}})
            await out.send_message(bad_data)
            answer = await recv_answer(inbox)
            assert answer.seq == 8 and "bad request data" in answer.body["reason"]["text"]

            await out.send_multipart([msgpack.packb({"v": 1, "type": "call"}), b"x" * 10])
            answer = await recv_answer(inbox)
            assert answer.type == "error"

            # (a negative timeout once reached trio and crashed the serving node)
            for seq, kind, timeout in [(9, "stop", -1.0), (10, "call", float("nan"))]:
                body = {"to": "Echo", "reason": "x", "request": 1, "timeout": timeout}
                await out.send_message(Message(kind, "mallory", 1, 0, seq, body))
                answer = await recv_answer(inbox)
                assert (answer.seq, answer.body["kind"]) == (seq, "bad_request")
                assert "timeout must be None or seconds >= 0" in answer.body["reason"]["text"]
        # ... and w1 still serves everyone else
        assert await actors.call("Echo@w1", ("echo", 42)) == 42


class Probe(actors.Actor):
    async def handle_call(self, request, from_):
        return request


class Absorber(actors.Actor):
    """Takes whatever it is sent (the fuzz's target; it may still be stopped or linked)."""

    async def handle_call(self, request, from_):
        return None

    async def handle_cast(self, msg):
        pass

    async def handle_info(self, msg):
        pass


def hostile_value(rng, depth=0):
    """Wire-valid but hostile data: wrong types, odd numbers, names with '@', refs."""
    leaves = [None, True, -1, 0, 7, 2**63, -(2**63), 1.5, -0.0, float("nan"), float("inf"),
              -1e300, "", "Target", "no@such", "x" * 300, b"\xff", "$nd", "$r"]  # fmt: skip
    roll = rng.random()
    if depth > 3 or roll < 0.6:
        return rng.choice(leaves)
    if roll < 0.75:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if roll < 0.85:  # a monitor ref, or nearly one
        return [rng.choice([1, -5, 2**40, "1"]), rng.choice(["mallory", None, 3])]
    keys = ["to", "msg", "request", "reason", "ref", "timeout", "ok", "value", "kind",
            "text", "exc", "normal", "names", "endpoint", "sender", "$nd", "$t", "f"]  # fmt: skip
    return {rng.choice(keys): hostile_value(rng, depth + 1) for _ in range(rng.randrange(4))}


# What each message type reads, with plausible values (some of them bad on purpose);
# the fuzz mixes them with hostile_value()s.
PLAUSIBLE = {
    "to": ["Target", "Target", "Nobody"],
    "request": [1, "x", [1, 2]],
    "timeout": [None, 0, 0.05, 5, -1, float("nan"), float("inf")],
    "reason": ["normal", "x", {"text": "boom", "exc": True}, {"text": "bye"}],
    "ref": [[1, "mallory"], [2**40, "test"], [3, None]],
    "sender": ["w", "Target@mallory"],
    "msg": [1, {"$nd": 0}, {"$t": [1]}],
    "ok": [True, False],
    "value": [1, None],
    "kind": ["exited", "noproc", "timeout", "bad_request"],
    "names": [["a"], []],
    "endpoint": ["(mallory's own)", "not an endpoint", "ftp://x"],  # (see the test)
}
FIELDS = {
    "call": ["to", "request", "timeout"], "stop": ["to", "reason", "timeout"],
    "stats": ["to"], "cast": ["to", "msg"], "send": ["to", "msg"],
    "monitor": ["to", "ref"], "link": ["to", "ref", "sender"], "watching": ["ref"],
    "demonitor": ["ref"], "exit": ["ref", "reason"], "down": ["ref", "reason"],
    "reply": ["ok", "value", "kind", "reason"], "hb": ["endpoint", "names"],
    "error": ["reason"], "busy": ["to"], "ready": ["to"], "held": ["reason"],
    "nonsense": ["to"],
}  # fmt: skip


def fuzz_body(rng, kind, plausible):
    body = {}
    for field in FIELDS[kind]:
        roll = rng.random()
        if roll < 0.7:
            body[field] = rng.choice(plausible[field])
        elif roll < 0.9:
            body[field] = hostile_value(rng)
    if rng.random() < 0.1:
        body[rng.choice(list(PLAUSIBLE))] = hostile_value(rng)
    return body


async def test_a_node_survives_thousands_of_hostile_well_framed_messages():
    # The frame fuzz (test_frames) stops at decode; this goes through every handler: a
    # hostile body must be rejected or served, never crash the node (a negative stop
    # timeout once did). Seeded: the same 3,000 messages every run.
    rng = random.Random(2026)
    assert set(FIELDS) == set(actors._node.Node._handlers) | {"nonsense"}  # every type
    specs = [Absorber.child_spec(name="Target"), Probe.child_spec(name="Probe")]
    supervisor = actors.Supervisor(specs, strategy="one_for_one", max_restarts=10**4)
    with trio.fail_after(LIMIT):
        async with actors.open_node("test") as node, trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            async with fake_peer(node) as (inbox, out):
                # (a peer may say it moved; to anywhere else, it would not hear our answers)
                own = ipc_endpoint("mallory", node.directory)
                plausible = {**PLAUSIBLE, "endpoint": [own, "not an endpoint", "ftp://x"]}
                for i in range(3000):
                    kind = rng.choice(sorted(FIELDS))
                    tensors = [np.arange(3.0)] if rng.random() < 0.1 else []
                    body = fuzz_body(rng, kind, plausible)
                    await out.send_message(Message(kind, "mallory", 7, 0, i, body, tensors))
                # still serving: a call from mallory is answered
                call = {"to": "Probe", "request": "still here", "timeout": None}
                await out.send_message(Message("call", "mallory", 7, 0, 10**6, call))
                while True:
                    answer = await next_of_type(inbox, "reply")
                    if answer.seq == 10**6:
                        break
                assert answer.body == {"ok": True, "value": "still here", "at": 7}
            stats = node.statistics()
            assert stats["received"] >= 3001 and stats["rejected"] > 1000  # each read, most refused
            assert await actors.call("Probe", "local") == "local"
            nursery.cancel_scope.cancel()


async def recv_answer(inbox):
    """The next message that is not a heartbeat (w1 heart-beats any peer it heard from)."""
    while True:
        _, msg = await inbox.recv_message()
        if msg.type != "hb":
            return msg


async def test_the_local_node_counts_rejected_messages():
    async with actors.open_node("test") as node:
        with open_socket("DEALER", connect=node.endpoint, routing_id=b"x") as out:
            await out.send_multipart([b"garbage"])
            await out.send_message(Message("nonsense", "x", 1))
            while node.statistics()["rejected"] < 2:
                await trio.sleep(0.01)
        assert node.statistics()["rejected"] == 2


# ------------------------------------------------------------------ wire data (no sockets)

wire_ints = st.integers(-(2**63), 2**64 - 1)
wire_values = st.recursive(
    st.none()
    | st.booleans()
    | wire_ints
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=4) | wire_ints, inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(wire_values)
def test_wire_data_round_trips_through_a_message(value):
    data, tensors = actors.to_wire(value)
    frames = actors.encode(Message("call", "a", 1, 0, 1, {"request": data}, tensors))
    received = actors.decode([bytes(f) for f in frames])
    assert actors.from_wire(received.body["request"], received.tensors) == value


@actors.record(name="tests.BatchReady")
@dataclasses.dataclass
class BatchReady:
    step: int
    batch: np.ndarray


def test_records_and_tensors_travel_without_pickle():
    data, tensors = actors.to_wire([BatchReady(3, np.ones((2, 2), np.float32))])
    assert data == [{"$r": "tests.BatchReady", "f": {"step": 3, "batch": {"$nd": 0}}}]
    [back] = actors.from_wire(data, tensors)
    assert back.step == 3 and back.batch is tensors[0]


class _Color(enum.IntEnum):
    RED = 1


class _Key(str):
    pass


@pytest.mark.parametrize(
    "value, data",
    [
        # subclasses of the plain types leave the fast path and come back as the base type
        (
            {"x": np.float32(1.5), "n": np.int64(-3), "b": np.bool_(True)},
            {"x": 1.5, "n": -3, "b": True},
        ),
        ([_Color.RED, True], [1, True]),
        ({_Key("k"): 1}, {"k": 1}),
        ({"$k": 1, 2: "two"}, {"$d": [["$k", 1], [2, "two"]]}),
        ((1, [2, (3,)]), {"$t": [1, [2, {"$t": [3]}]]}),
    ],
)
def test_to_wire_gives_plain_data_for_subclasses_tags_and_odd_keys(value, data):
    assert actors.to_wire(value) == (data, [])
    frames = actors.encode(Message("call", "a", 1, 0, 1, {"v": data}))
    assert actors.from_wire(actors.decode(frames).body["v"], []) == value


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"$nd": 5}, "tensor index 5 out of range"),
        ({"$r": "Nope", "f": {}}, "unknown record 'Nope'"),
        ({"$r": "tests.BatchReady", "f": {"nope": 1}}, "record tests.BatchReady"),
        ({"$x": 1}, "unknown tagged value"),
        ({"$d": [[[1], 2]]}, "bad dict key"),
    ],
)
def test_invalid_received_wire_data_is_a_wire_error(bad, message):
    with pytest.raises(WireError, match=message):
        actors.from_wire(bad, [])


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_wire_nesting_is_bounded_the_same_both_ways():
    ok, too_deep = _nested(12), _nested(13)  # 12 levels of list inside the outer one
    assert actors.from_wire(actors.to_wire(ok)[0], []) == ok
    with pytest.raises(WireError, match="value nested deeper than 12 levels"):
        actors.to_wire(too_deep)
    with pytest.raises(WireError, match="data nested deeper than 12 levels"):
        actors.from_wire(too_deep, [])


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, {1, 2}, object(), (x for x in ())])
def test_values_that_cannot_travel_are_refused_before_sending(value):
    with pytest.raises(WireError):
        actors.to_wire({"nested": [value]})
