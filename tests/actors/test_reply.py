"""Reply slots: one answer, a deadline kept by one timer task per run, no cancel scope."""

import pytest
import trio
import trio.testing

from actors._reply import _COMPACT_MIN, ReplySlot, _timer

TIMER_TASK = "actors: reply deadlines"


async def test_an_answer_wakes_the_waiter_and_the_slot_lets_go_of_it():
    slot = ReplySlot(5)
    answer = object()

    async def answer_soon():
        await trio.sleep(0.01)
        slot.deliver(True, answer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_soon)
        assert await slot.wait() == (True, answer)
    assert slot.done and slot.value is None  # the timer's heap may still hold the slot


async def test_an_error_comes_back_as_not_ok():
    slot = ReplySlot(None)
    error = ValueError("boom")
    slot.deliver(False, error)
    assert await slot.wait() == (False, error)


async def test_the_deadline_raises_too_slow_at_its_time(autojump_clock):
    slot = ReplySlot(3)
    with pytest.raises(trio.TooSlowError):
        await slot.wait()
    assert trio.current_time() == pytest.approx(3)
    slot.deliver(True, "late")  # dropped
    assert slot.value is None


async def test_a_shorter_deadline_added_later_expires_first_and_on_time(autojump_clock):
    expired = {}

    async def wait(name, timeout, delay):
        await trio.sleep(delay)
        slot = ReplySlot(timeout)
        with pytest.raises(trio.TooSlowError):
            await slot.wait()
        expired[name] = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "long", 10, 0)
        nursery.start_soon(wait, "short", 1, 2)  # added while the timer sleeps until 10
        nursery.start_soon(wait, "never", None, 0)  # no timeout: only cancelled
        await trio.sleep(11)
        nursery.cancel_scope.cancel()
    assert expired == {"short": pytest.approx(3), "long": pytest.approx(10)}


async def test_a_cancelled_waiter_is_cancelled_and_a_late_answer_is_dropped():
    slot = ReplySlot(60)
    with trio.move_on_after(0.01) as scope:
        await slot.wait()
    assert scope.cancelled_caught
    slot.deliver(True, "late")  # must not reschedule a task that is not waiting
    assert slot.done and slot.value is None
    await trio.sleep(0.01)  # (a stray reschedule would crash the run here)


async def test_waiting_on_an_answered_slot_is_still_a_checkpoint():
    slot = ReplySlot(60)
    slot.deliver(True, 1)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await slot.wait()


class TaskSteps(trio.abc.Instrument):
    def __init__(self, name):
        self.name, self.steps = name, 0

    def before_task_step(self, task):
        if task.name == self.name:
            self.steps += 1


async def test_answered_calls_neither_wake_the_timer_nor_pile_up_in_its_heap():
    steps = TaskSteps(TIMER_TASK)
    trio.lowlevel.add_instrument(steps)
    try:

        async def answer(slot):
            slot.deliver(True, None)

        async with trio.open_nursery() as nursery:
            for _ in range(20 * _COMPACT_MIN):
                slot = ReplySlot(60)
                nursery.start_soon(answer, slot)
                await slot.wait()
        heap = _timer().heap
    finally:
        trio.lowlevel.remove_instrument(steps)
    # The timer ran when it started and when its sleep was first given a deadline: not
    # once per answered call (5,120 of them). Answered entries were compacted away.
    assert steps.steps <= 3
    assert len(heap) <= 2 * _COMPACT_MIN


async def test_a_slot_abandoned_before_waiting_drops_its_answer():
    slot = ReplySlot(5)
    slot.abandon()
    slot.deliver(True, "late")
    assert slot.done and slot.value is None


async def test_waiting_is_true_only_while_a_task_is_parked_on_the_slot():
    slot = ReplySlot(5)
    seen = []

    async def answer_soon():
        seen.append(slot.waiting)  # the waiter has parked by now
        slot.deliver(True, 1)
        seen.append(slot.waiting)

    assert not slot.waiting
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_soon)
        await slot.wait()
    assert seen == [True, False] and not slot.waiting
