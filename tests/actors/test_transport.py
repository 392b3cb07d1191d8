"""ZeroMQ on trio: delivery, wake-ups, closing, concurrency, no busy waiting."""

import os
import random
import stat
import sys
import time
import warnings

import numpy as np
import pytest
import trio
import trio.testing
import zmq

from actors._frames import FrameError, Message
from actors._transport import (
    DEFAULT_SOCKET_OPTIONS,
    PeerUnreachable,
    get_context,
    ipc_directory,
    ipc_endpoint,
    open_socket,
    wait_released,
)

HANG_GUARD = 20  # seconds; a test that needs this long has hung, not slowed down

_counter = iter(range(10**9))


@pytest.fixture(params=["ipc", "tcp"])
def transport(request):
    return request.param


def bind_address(transport: str) -> str:
    if transport == "ipc":
        return ipc_endpoint(f"test-{os.getpid()}-{next(_counter)}")
    return "tcp://127.0.0.1:*"


def pair(transport, bind_kind, connect_kind, **options):
    """A bound and a connected socket over `transport`."""
    bound = open_socket(bind_kind, bind=bind_address(transport), **options)
    connected = open_socket(connect_kind, connect=bound.last_endpoint, **options)
    return bound, connected


# ----------------------------------------------------------------------------------------
# Delivery
# ----------------------------------------------------------------------------------------


async def test_a_multipart_message_goes_from_push_to_pull(transport):
    pull, push = pair(transport, "PULL", "PUSH")
    with pull, push, trio.fail_after(HANG_GUARD):
        await push.send_multipart([b"header", b"x" * 100_000, b""])
        frames = await pull.recv_multipart()
        assert [f.bytes for f in frames] == [b"header", b"x" * 100_000, b""]


async def test_messages_round_trip_between_dealer_and_router(transport):
    router, dealer = pair(transport, "ROUTER", "DEALER")
    with router, dealer, trio.fail_after(HANG_GUARD):
        request = Message("call", sender="r1", seq=7, body={"args": [1, 2]})
        await dealer.send_message(request)
        routing_id, got = await router.recv_message()
        assert got == request
        reply = Message("reply", seq=7, tensors=[np.arange(10, dtype=np.float32)])
        await router.send_message(reply, routing_id)
        assert await dealer.recv_message() == (None, reply)


async def test_a_large_multi_frame_message_round_trips_without_copies(transport):
    pull, push = pair(transport, "PULL", "PUSH")
    tensors = [np.random.default_rng(i).standard_normal(1 << 20, np.float32) for i in range(3)]
    with pull, push, trio.fail_after(HANG_GUARD):
        tracker = await push.send_message(Message("shards", tensors=tensors), track=True)
        _, got = await pull.recv_message()
        await wait_released(tracker)
    assert got == Message("shards", tensors=tensors)
    for tensor in got.tensors:  # views of the received zmq frames, not copies
        assert not tensor.flags.owndata and tensor.flags.writeable


async def test_a_bad_message_raises_frame_error_and_the_socket_keeps_working():
    router, dealer = pair("ipc", "ROUTER", "DEALER", routing_id=b"peer-1")
    with router, dealer, trio.fail_after(HANG_GUARD):
        await dealer.send_multipart([b"\xc1 not msgpack"])
        with pytest.raises(FrameError, match="not valid msgpack") as info:
            await router.recv_message()
        assert info.value.routing_id == b"peer-1"  # so the receiver can answer
        await dealer.send_message(Message("ok"))
        assert await router.recv_message() == (b"peer-1", Message("ok"))


async def test_a_router_raises_peer_unreachable_for_an_unknown_routing_id():
    router = open_socket("ROUTER", bind=bind_address("ipc"))
    with router, pytest.raises(PeerUnreachable) as info:
        await router.send_message(Message("hello"), b"nobody")
    assert info.value.routing_id == b"nobody"


async def test_cancelling_a_receive_loses_no_message():
    """Receives cancelled at random moments while messages arrive: a cancel that lands
    just as a receive has taken a message must not drop it (every schedule point after
    libzmq hands the message over must be shielded)."""
    pull, push = pair("ipc", "PULL", "PUSH")
    count = 2000
    rng = random.Random(7)
    got = []
    cancelled = 0

    sent_all = trio.Event()

    async def send_all():
        for i in range(count):
            await push.send_multipart([i.to_bytes(4, "little")])
            if rng.random() < 0.3:
                await trio.sleep(rng.random() * 2e-4)
        sent_all.set()

    async def receive_one():
        frames = await pull.recv_multipart(copy=True)
        got.append(int.from_bytes(frames[0], "little"))

    with pull, push, trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            while not sent_all.is_set():
                with trio.move_on_after(rng.random() * 2e-4) as scope:
                    await receive_one()
                cancelled += scope.cancelled_caught
        with trio.move_on_after(1.0):  # what is still on its way (a lost one never comes)
            while len(got) < count:
                await receive_one()
    assert got == list(range(count)), f"{count - len(got)} lost"
    assert cancelled > 0  # the cancellations did land (else this checked nothing)


async def test_a_received_message_is_the_callers_with_no_schedule_point_in_between():
    """Receives that do not wait yield now and then (fairness), but before they take a
    message, never after: at every moment another task can run, a sent message is still
    on the socket or already returned (a collective's watcher once saw a done ack off the
    socket and not yet recorded, and failed a finished run)."""
    pull, push = pair("ipc", "PULL", "PUSH")
    with pull, push, trio.fail_after(HANG_GUARD):
        got = []

        async def receive_one():
            got.append(await pull.recv_multipart(copy=True))

        for turn in range(20):  # one of these receives is the one whose turn it is to yield
            await push.send_multipart([b"m"])
            while not pull.has_input():
                await trio.sleep(0.001)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive_one)
                for _ in range(3):
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    assert pull.has_input() or len(got) == turn + 1, "taken, not returned"
        assert len(got) == 20


# ----------------------------------------------------------------------------------------
# Wake-ups and closing
# ----------------------------------------------------------------------------------------


async def test_close_wakes_every_blocked_receiver_with_closed_resource_error():
    pull = open_socket("PULL", bind=bind_address("ipc"))
    outcomes = []

    async def receive():
        try:
            await pull.recv_multipart()
        except trio.ClosedResourceError:
            outcomes.append("closed")

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            for _ in range(3):  # one watcher in wait_readable, two parked
                nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            pull.close()
    assert outcomes == ["closed"] * 3
    with pytest.raises(trio.ClosedResourceError):
        await pull.recv_multipart()


async def test_try_send_sends_a_whole_message_now_or_nothing_at_all():
    push = open_socket("PUSH", connect=bind_address("ipc").replace("*", "2"))
    with push:  # no peer yet (IMMEDIATE): the socket would have to wait
        assert push.try_send_multipart([b"a", b"b"]) is False
    pull, push = pair("ipc", "PULL", "PUSH")
    with pull, push, trio.fail_after(HANG_GUARD):
        await push.send_multipart([b"connected"])  # waits for the pipe to exist
        assert (await pull.recv_multipart())[0].bytes == b"connected"
        tensor = np.arange(1 << 15, dtype=np.float32)  # over the zero-copy threshold
        assert push.try_send_multipart([b"head", tensor]) is True
        head, body = await pull.recv_multipart()
        assert head.bytes == b"head" and np.array_equal(np.frombuffer(body, np.float32), tensor)
        push.close()
        with pytest.raises(trio.ClosedResourceError):
            push.try_send_multipart([b"late"])


async def test_close_wakes_a_sender_blocked_on_a_full_pipe():
    push = open_socket("PUSH", connect=bind_address("ipc").replace("*", "1"))
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:

            async def send():
                with pytest.raises(trio.ClosedResourceError):
                    await push.send_multipart([b"nobody is there"])  # IMMEDIATE: no peer

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            push.close()


async def test_a_receiver_wakes_when_a_send_on_the_same_socket_takes_its_wakeup():
    # One DEALER used by a sending task and a receiving task at once: every send can
    # consume the FD edge the receiver sleeps on, which must then be woken by hand.
    router, dealer = pair("ipc", "ROUTER", "DEALER")
    count = 300

    async def echo():
        for _ in range(count):
            routing_id, frame = await router.recv_multipart()
            await router.send_multipart([routing_id, frame])

    async def send():
        for i in range(count):
            await dealer.send_multipart([b"%d" % i])
            if i % 7 == 0:
                await trio.sleep(0)

    with router, dealer, trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            nursery.start_soon(send)
            received = [(await dealer.recv_multipart(copy=True))[0] for _ in range(count)]
    assert received == [b"%d" % i for i in range(count)]


async def test_has_input_does_not_strand_a_blocked_receiver():
    # A message arrives while this task holds the loop (so trio has not seen the FD
    # edge yet); has_input then reads EVENTS, which consumes that edge: it must wake
    # the receiver sleeping on it (a raw getsockopt(EVENTS) here hung the receiver).
    pull, push = pair("ipc", "PULL", "PUSH")
    with pull, push, trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            got = []

            async def receive():
                got.append((await pull.recv_multipart(copy=True))[0])

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            push.zmq.send(b"hello")
            time.sleep(0.2)  # deliberately blocking: delivery happens, trio does not poll
            assert pull.has_input()
    assert got == [b"hello"]
    assert not pull.has_input()  # closed


async def test_many_concurrent_senders_and_receivers_share_one_socket_pair():
    # Small HWMs force waiting on both sides: a second task in wait_readable would
    # raise BusyResourceError, a lost wake-up would hang.
    pull, push = pair("ipc", "PULL", "PUSH", sndhwm=2, rcvhwm=2)
    senders, per_sender = 12, 40
    received = []

    async def send(k):
        for i in range(per_sender):
            await push.send_multipart([b"%d-%d" % (k, i), b"x" * (i * 100)])

    async def receive():
        while True:
            frames = await pull.recv_multipart(copy=True)
            received.append(frames[0])

    with pull, push, trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(receive)
            async with trio.open_nursery() as sending:
                for k in range(senders):
                    sending.start_soon(send, k)
            while len(received) < senders * per_sender:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    sent = [b"%d-%d" % (k, i) for k in range(senders) for i in range(per_sender)]
    assert sorted(received) == sorted(sent)


async def test_waiting_for_a_message_burns_no_cpu():
    pull = open_socket("PULL", bind=bind_address("ipc"))
    with pull:
        async with trio.open_nursery() as nursery:
            for _ in range(2):  # the watcher and a parked waiter
                nursery.start_soon(pull.recv_multipart)
            await trio.testing.wait_all_tasks_blocked()
            cpu = time.process_time()
            await trio.sleep(1.0)
            used = time.process_time() - cpu
            nursery.cancel_scope.cancel()
    # A busy loop would use the whole second; idle trio + libzmq threads use ~nothing.
    assert used < 0.25, f"{used:.3f} s of CPU while idle"


# ----------------------------------------------------------------------------------------
# Buffers in flight
# ----------------------------------------------------------------------------------------


async def test_wait_released_returns_once_libzmq_lets_go_of_the_buffer():
    pull, push = pair("ipc", "PULL", "PUSH")
    buffer = np.ones(1 << 20, np.float32)
    with pull, push, trio.fail_after(HANG_GUARD):
        tracker = await push.send_multipart([b"h", buffer], track=True)
        await pull.recv_multipart()
        await wait_released(tracker)
        assert tracker.done


class _TrackerDoneAfter:
    """A stand-in for zmq.MessageTracker whose ``done`` turns True on its n-th read
    (libzmq releases a buffer on its own thread, at a moment no test can choose)."""

    def __init__(self, reads: int) -> None:
        self.reads_left = reads

    @property
    def done(self) -> bool:
        self.reads_left -= 1
        return self.reads_left <= 0


async def test_wait_released_waits_for_the_release_and_gives_up_at_its_timeout():
    tracker = _TrackerDoneAfter(5)
    with trio.fail_after(HANG_GUARD):
        await wait_released(tracker)
    assert tracker.reads_left == 0  # returned at the read that saw it released
    with pytest.raises(TimeoutError):
        await wait_released(_TrackerDoneAfter(10**9), timeout=0.05)


async def test_a_message_sent_just_before_the_process_exits_still_arrives():
    # libzmq writes from its I/O thread: without the flush at exit, a process that
    # exits right after a send takes the unwritten rest of the message down with it.
    router = open_socket("ROUTER", bind=bind_address("ipc"))
    script = (
        "import sys, trio\n"
        "from actors._transport import open_socket\n"
        "async def main():\n"
        "    sock = open_socket('DEALER', connect=sys.argv[1])\n"
        "    await sock.send_multipart([b'last words', bytes(16 << 20)])\n"
        "trio.run(main)\n"  # exits at once, the socket still open
    )
    argv = [sys.executable, "-c", script, router.last_endpoint]
    with router, trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: trio.run_process(argv))
            _, words, payload = await router.recv_multipart(copy=True)
    assert words == b"last words" and len(payload) == 16 << 20


# ----------------------------------------------------------------------------------------
# Set-up: options, endpoints, context
# ----------------------------------------------------------------------------------------


def test_every_socket_gets_the_safe_defaults():
    with open_socket("ROUTER", connect="ipc:///nonexistent/x") as router:
        for name, value in DEFAULT_SOCKET_OPTIONS.items():
            assert router.zmq.getsockopt(getattr(zmq, name)) == value
        assert router.zmq.getsockopt(zmq.IMMEDIATE) == 1
    with open_socket("PULL", sndhwm=5, linger=0) as pull:
        assert pull.zmq.getsockopt(zmq.SNDHWM) == 5 and pull.zmq.getsockopt(zmq.LINGER) == 0
        assert pull.zmq.getsockopt(zmq.IMMEDIATE) == 0  # only connecting sockets


def test_open_socket_lists_what_it_accepts_when_given_something_else():
    with pytest.raises(ValueError, match="accepted: .*ROUTER"):
        open_socket("ROUTR")
    with pytest.raises(ValueError, match="unknown socket option 'sndhwn'"):
        open_socket("PUSH", sndhwn=1)


def test_ipc_endpoints_live_in_a_private_directory():
    endpoint = ipc_endpoint("inbox")
    assert endpoint == f"ipc://{ipc_directory()}/inbox"
    assert stat.S_IMODE(os.stat(ipc_directory()).st_mode) == 0o700
    with pytest.raises(ValueError, match="must match"):
        ipc_endpoint("../escape")
    with pytest.raises(ValueError, match="longer than"):
        ipc_endpoint("x" * 60, directory="/tmp/" + "d" * 60)


def test_one_context_serves_the_whole_process():
    assert get_context() is get_context()


def test_wrapping_and_describing_a_socket_raises_no_deprecation_warning():
    # pyzmq 27 deprecates Socket.socket_type; the wrapper reads Socket.type.
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        with open_socket("ROUTER", bind="tcp://127.0.0.1:*") as router:
            assert repr(router) == "<TrioSocket ROUTER open>"


def test_a_new_ipc_directory_is_fresh_and_sweeps_those_of_dead_owners(tmp_path, monkeypatch):
    import shutil
    import subprocess
    import sys
    import tempfile

    from actors import _transport, new_ipc_directory

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    me = f"{os.getpid()} {_transport._start_time(os.getpid())}\n"
    stale = {"zt-dead": f"{dead_pid} 12345\n", "zt-reused": f"{os.getpid()} 1\n"}
    kept = {"zt-alive": me, "zt-unowned": None, "other": f"{dead_pid} 1\n"}
    for name, owner in {**stale, **kept}.items():
        (tmp_path / name).mkdir()
        if owner is not None:
            (tmp_path / name / ".owner").write_text(owner)
    path = new_ipc_directory()
    try:
        assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path) not in stale
        assert (tmp_path / os.path.basename(path) / ".owner").read_text() == me
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {*kept, os.path.basename(path)}
    finally:
        shutil.rmtree(path)
