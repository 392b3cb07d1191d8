"""Mailboxes: bounded message lane, never-blocking signal lane, close semantics."""

import collections

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import Mailbox, MailboxClosed, MailboxFull


async def test_messages_come_out_in_arrival_order():
    box = Mailbox(4)
    for i in range(4):
        await box.put(i)
    assert [await box.get() for _ in range(4)] == [0, 1, 2, 3]


async def test_taker_waiting_says_whether_the_actor_is_parked_in_get():
    box = Mailbox(4)
    seen = []

    async def put_soon():
        seen.append(box.taker_waiting)
        await box.put("m")
        seen.append(box.taker_waiting)

    assert not box.taker_waiting
    async with trio.open_nursery() as nursery:
        nursery.start_soon(put_soon)
        assert await box.get() == "m"
    assert seen == [True, False]


async def test_signals_are_taken_before_messages():
    box = Mailbox(4)
    await box.put("message")
    box.signal("signal")
    assert await box.get() == "signal"
    assert await box.get() == "message"


async def test_a_sender_waits_while_the_mailbox_is_full(autojump_clock):
    box = Mailbox(2)
    await box.put(1)
    await box.put(2)
    done = trio.Event()

    async def third():
        await box.put(3)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(third)
        await trio.sleep(10)
        assert not done.is_set()
        assert box.statistics().senders_waiting == 1
        assert await box.get() == 1
        await done.wait()
    assert len(box) == 2


async def test_waiting_senders_get_the_room_in_arrival_order_and_nobody_cuts_in():
    """A message taken frees room for the longest-waiting sender: try_put (what the
    node's reader uses) cannot take it before that sender has run."""
    box = Mailbox(1)
    box.put_nowait("first")
    taken = []
    async with trio.open_nursery() as nursery:
        for name in "ABC":
            nursery.start_soon(box.put, name)
            await trio.testing.wait_all_tasks_blocked()  # parked in this order
        for _ in range(3):
            taken.append(await box.get())
            assert not box.try_put("cut in"), "the room was the waiting sender's"
            await trio.testing.wait_all_tasks_blocked()
        taken.append(await box.get())
    assert taken == ["first", "A", "B", "C"]
    assert box.try_put("room again") and box.statistics().senders_waiting == 0


def test_put_nowait_raises_when_full():
    box = Mailbox(1)
    box.put_nowait("a")
    with pytest.raises(MailboxFull):
        box.put_nowait("b")


def test_signal_never_blocks_even_when_messages_are_full():
    box = Mailbox(1)
    box.put_nowait("a")
    for i in range(10):
        box.signal(i)
    assert box.statistics().signals == 10


async def test_closing_wakes_blocked_senders_with_mailbox_closed():
    box = Mailbox(1)
    await box.put("left over")
    box.signal("sig")
    errors = []

    async def blocked_sender():
        try:
            await box.put("never")
        except MailboxClosed as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_sender)
        await trio.testing.wait_all_tasks_blocked()
        assert box.close() == ["sig", "left over"]
    assert len(errors) == 1
    with pytest.raises(MailboxClosed):
        box.put_nowait("late")
    box.signal("late signal")  # dropped silently
    with pytest.raises(MailboxClosed):
        await box.get()


async def test_closing_wakes_a_waiting_taker_with_mailbox_closed():
    box = Mailbox(1)
    errors = []

    async def taker():
        try:
            await box.get()
        except MailboxClosed as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker)
        await trio.testing.wait_all_tasks_blocked()
        assert box.taker_waiting
        box.close()
    assert len(errors) == 1 and not box.taker_waiting


async def test_a_cancelled_taker_leaves_the_mailbox_usable(autojump_clock):
    box = Mailbox(2)
    with trio.move_on_after(1):
        await box.get()
    assert not box.taker_waiting
    box.put_nowait("after")  # must not wake the task that gave up (trio would crash)
    assert await box.get() == "after"


async def test_an_item_is_never_out_of_the_mailbox_unhandled_across_a_schedule_point():
    """get yields before it takes ready mail, not after: at every moment another task
    can run, an item is either still in the mailbox or already in its taker's hands (the
    analyzer's abandoned-step check reads the mailbox's length to know what is coming)."""
    box = Mailbox(2)
    box.put_nowait("a")
    taken = []

    async def taker():
        taken.append(await box.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker)
        for _ in range(5):
            assert len(box) == 1 or taken == ["a"], "taken out, not yet handed over"
            await trio.lowlevel.cancel_shielded_checkpoint()
    assert taken == ["a"]


async def test_a_second_task_waiting_in_get_is_refused():
    box = Mailbox(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.get)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError, match="already waiting"):
            await box.get()
        box.put_nowait("for the first")
    assert len(box) == 0


async def test_cancelling_a_blocked_sender_leaves_the_mailbox_unchanged(autojump_clock):
    box = Mailbox(1)
    await box.put("a")
    with trio.move_on_after(1):
        await box.put("b")
    assert box.statistics().depth == 1
    assert box.statistics().senders_waiting == 0


class _StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps: collections.Counter = collections.Counter()

    def before_task_step(self, task) -> None:
        self.steps[task.name] += 1


@pytest.mark.parametrize("op", ["get", "put"])
@pytest.mark.parametrize("waits", [False, True], ids=["ready", "waits"])
async def test_get_and_put_are_one_schedule_point_whether_or_not_they_wait(op, waits):
    """Ready, the call yields once (a busy actor or producer still lets others run);
    made to wait, its wake-up is that one yield (a second one would cost a scheduler
    round per message to every actor woken by a remote call)."""
    box = Mailbox(1)
    if (op == "put") == waits:
        box.put_nowait("queued")  # a get finds mail ready, a put a full box

    async def one_op():  # a task that does nothing but the call: two steps are one yield
        await (box.get() if op == "get" else box.put("new"))

    counter = _StepCounter()
    trio.lowlevel.add_instrument(counter)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one_op, name="one_op")
            await trio.testing.wait_all_tasks_blocked()
            if waits:  # free the box: the op's wake-up
                box.put_nowait("new") if op == "get" else await box.get()
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert counter.steps["one_op"] == 2
    assert len(box) == (1 if op == "put" else 0)


@pytest.mark.parametrize("capacity", [0, -1, 1.5, True])
def test_capacity_must_be_a_positive_int(capacity):
    with pytest.raises(ValueError, match="capacity"):
        Mailbox(capacity)


@settings(max_examples=50, deadline=None)
@given(
    capacity=st.integers(1, 5),
    ops=st.lists(st.sampled_from(["put", "get", "signal"]), max_size=40),
)
def test_depth_never_exceeds_capacity_and_order_is_kept(capacity, ops):
    async def scenario():
        box = Mailbox(capacity)
        sent, received, n = [], [], 0
        for op in ops:
            if op == "put":
                try:
                    box.put_nowait(n)
                    sent.append(n)
                except MailboxFull:
                    assert len(box) == capacity
                n += 1
            elif op == "signal":
                box.signal(("s", n))
            elif len(box) or box.statistics().signals:
                item = await box.get()
                if not isinstance(item, tuple):
                    received.append(item)
            assert box.statistics().depth <= capacity
        assert box.statistics().high_water <= capacity
        received.extend(x for x in box.close() if not isinstance(x, tuple))
        assert received == sent

    trio.run(scenario)
