"""Actors: call / cast / timeouts / crashes, the failure rules, back-pressure, monitors, links."""

import logging
import tracemalloc

import pytest
import trio
import trio.testing

import actors
from actors import (
    NOREPLY,
    Actor,
    ActorExited,
    CallTimeout,
    Down,
    Exit,
    LinkedExit,
    NoSuchActor,
    Stop,
)
from tests.actors.actor_util import TrappingWatcher, Watcher


class Counter(Actor):
    """Adds call requests to a total; "boom" crashes; "slow" takes 10 s; "later" defers."""

    async def init(self):
        self.total = 0
        self.casts = []
        self.infos = []
        self.terminated = []

    async def handle_call(self, request, from_):
        if request == "boom":
            raise ValueError("boom")
        if request == "slow":
            await trio.sleep(10)
            return "slow done"
        if request == "later":

            async def reply_later():
                await trio.sleep(1)
                from_.reply("deferred")

            self.nursery.start_soon(reply_later)
            return NOREPLY
        if request == "stop":
            raise Stop("normal", reply="bye")
        self.total += request
        return self.total

    async def handle_cast(self, msg):
        if msg == "boom":
            raise RuntimeError("cast boom")
        self.casts.append(msg)

    async def handle_info(self, msg):
        self.infos.append((trio.current_time(), msg))

    async def terminate(self, reason):
        self.terminated.append(reason)


async def start(nursery, actor, name=None):
    return await actors.spawn(nursery, actor, name=name)


async def test_call_returns_the_reply_of_handle_call():
    async with trio.open_nursery() as nursery:
        ref = await start(nursery, Counter(), "counter")
        assert await actors.call("counter", 2) == 2
        assert await actors.call(ref, 3) == 5
        await actors.stop(ref)


async def test_casts_are_handled_in_order_without_waiting_for_them():
    async with trio.open_nursery() as nursery:
        counter = Counter()
        ref = await start(nursery, counter)
        for i in range(5):
            await actors.cast(ref, i)
        await actors.call(ref, 0)  # a call queued after the casts: they are done
        assert counter.casts == [0, 1, 2, 3, 4]
        await actors.stop(ref)


async def test_a_call_that_gets_no_reply_in_time_raises_call_timeout(autojump_clock):
    async with trio.open_nursery() as nursery:
        await start(nursery, Counter(), "counter")
        with pytest.raises(CallTimeout, match=r"call to counter timed out after 2s"):
            await actors.call("counter", "slow", timeout=2)
        assert trio.current_time() == pytest.approx(2)
        assert await actors.call("counter", 1, timeout=None) == 1  # late reply dropped
        await actors.stop("counter")


async def test_a_call_with_timeout_zero_times_out_without_being_queued():
    async with trio.open_nursery() as nursery:
        ref = await start(nursery, Counter(), "counter")
        with pytest.raises(CallTimeout, match=r"timed out after 0s"):
            await actors.call("counter", 5, timeout=0)
        assert await actors.call("counter", 1) == 1  # the 5 was never added
        assert ref.processed == 1
        await actors.stop(ref)


async def test_a_cancelled_caller_leaves_nothing_pending_and_its_late_reply_is_dropped(
    autojump_clock,
):
    async with trio.open_nursery() as nursery:
        ref = await start(nursery, Counter(), "counter")
        with trio.move_on_after(0.05):
            await actors.call("counter", "slow", timeout=None)
        assert not ref._pending  # the call's return address is gone with its caller
        assert await actors.call("counter", 2, timeout=None) == 2  # after "slow" finishes
        await actors.stop(ref)


async def test_a_crash_in_handle_call_crashes_the_actor_and_names_it_to_the_caller():
    counter = Counter()
    with pytest.RaisesGroup(ValueError):  # the crash propagates to the spawner's nursery
        async with trio.open_nursery() as nursery:
            ref = await start(nursery, counter, "counter")
            with pytest.raises(ActorExited, match=r"counter exited .*ValueError: boom") as info:
                await actors.call("counter", "boom")
            assert isinstance(info.value.reason, ValueError)
    assert not ref.alive
    assert isinstance(ref.exit_reason, ValueError)
    assert [type(r) for r in counter.terminated] == [ValueError]
    assert actors.whereis("counter") is None


async def test_a_deferred_reply_is_delivered_by_from_reply(autojump_clock):
    async with trio.open_nursery() as nursery:
        ref = await start(nursery, Counter())
        assert await actors.call(ref, "later") == "deferred"
        await actors.stop(ref)


async def test_stop_with_a_reply_answers_then_stops_normally():
    async with trio.open_nursery() as nursery:
        counter = Counter()
        ref = await start(nursery, counter)
        assert await actors.call(ref, "stop") == "bye"
        assert await ref.wait_exited() == "normal"
    assert counter.terminated == ["normal"]


async def test_calls_left_in_a_dead_actors_mailbox_fail_at_once(autojump_clock):
    results = []

    async def caller(ref, request):
        try:
            results.append(await actors.call(ref, request, timeout=100))
        except ActorExited as exc:
            results.append(("exited", trio.current_time(), format(exc)))

    with pytest.RaisesGroup(RuntimeError):
        async with trio.open_nursery() as nursery:
            counter = Counter()
            ref = await start(nursery, counter)
            await actors.cast(ref, "slow-marker")
            nursery.start_soon(caller, ref, "slow")
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(3):
                await actors.cast(ref, "boom")  # the first one crashes the actor
            nursery.start_soon(caller, ref, 1)
            await trio.testing.wait_all_tasks_blocked()
    # "slow" ran for 10 s, then the cast crashed the actor; the queued call failed at
    # once instead of waiting for its 100 s timeout.
    assert results[0] == "slow done"
    assert results[1][0] == "exited" and results[1][1] == pytest.approx(10)
    assert "RuntimeError: cast boom" in results[1][2]
    assert ref.statistics().dropped == 2  # the two casts behind the crashing one


async def test_calling_or_casting_an_unknown_name_raises_no_such_actor():
    with pytest.raises(NoSuchActor, match="no actor registered as 'ghost'"):
        await actors.call("ghost", 1)
    with pytest.raises(NoSuchActor):
        await actors.cast("ghost", 1)


@pytest.mark.parametrize(
    "timeout, error",
    [("5", TypeError), (True, TypeError), (-1, ValueError), (float("nan"), ValueError)],
)
async def test_a_timeout_that_is_not_seconds_is_refused_naming_it(timeout, error):
    async with trio.open_nursery() as nursery:
        ref = await start(nursery, Counter(), "counter")
        for request in (
            actors.call(ref, 1, timeout=timeout),
            actors.statistics(ref, timeout=timeout),
            actors.stop(ref, timeout=timeout),
            actors.call("Counter@elsewhere", 1, timeout=timeout),  # before any node is needed
        ):
            with pytest.raises(error, match=r"^timeout must be None or .*, got "):
                await request
        assert await actors.call(ref, 2) == 2  # nothing was sent
        await actors.stop(ref)


async def test_a_cast_to_an_actor_that_exited_is_dropped_silently():
    async with trio.open_nursery() as nursery:
        ref = await start(nursery, Counter())
        await actors.stop(ref)
    await actors.cast(ref, 1)  # no error
    with pytest.raises(ActorExited):
        await actors.call(ref, 1)


async def test_every_actor_reports_statistics():
    async with trio.open_nursery() as nursery:
        ref = await start(nursery, Counter(), "counter")
        await actors.call(ref, 1)
        await actors.cast(ref, "x")
        await actors.call(ref, 1)
        stats = await actors.statistics("counter")
        assert (stats.name, stats.role, stats.processed, stats.queue_depth) == (
            "counter",
            "Counter",
            3,
            0,
        )
        assert stats.capacity == Counter.mailbox_size and stats.restarts == 0
        await actors.stop(ref)


async def test_logs_are_prefixed_with_role_and_rank(caplog):
    class Quiet(Actor):
        role = "Reducer"
        rank = 1

    caplog.set_level(logging.WARNING, logger="zerotrain.actors")
    async with trio.open_nursery() as nursery:
        ref = await start(nursery, Quiet())
        await actors.send(ref, "stray")
        await trio.testing.wait_all_tasks_blocked()
        await actors.stop(ref)
    assert "[Reducer 1] unhandled message 'stray'" in caplog.text


async def test_send_after_delivers_to_handle_info_after_the_delay(autojump_clock):
    async with trio.open_nursery() as nursery:
        counter = Counter()
        ref = await start(nursery, counter)
        counter.send_after(3, "tick")
        cancelled = counter.send_after(4, "never")
        cancelled.cancel()
        await trio.sleep(10)
        assert counter.infos == [(pytest.approx(3), "tick")]
        await actors.stop(ref)


# ----------------------------------------------------------------------------- back-pressure


class SlowConsumer(Actor):
    mailbox_size = 8

    async def init(self):
        self.seen = 0
        self.depths = []

    async def handle_cast(self, msg):
        self.seen += 1
        self.depths.append(self.ref.mailbox.statistics().depth)
        await trio.sleep(0.01)


async def test_back_pressure_keeps_queue_bounded_and_memory_flat(autojump_clock):
    n, payload = 3000, 1024
    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            consumer = SlowConsumer()
            ref = await start(nursery, consumer)
            for i in range(n):
                await actors.cast(ref, bytes(payload))  # waits whenever the mailbox is full
                if i == 500:
                    baseline, _ = tracemalloc.get_traced_memory()
            current, _ = tracemalloc.get_traced_memory()
            while consumer.seen < n:  # (a stop request would jump the queue)
                await trio.sleep(1)
            await actors.stop(ref)
    finally:
        tracemalloc.stop()
    assert consumer.seen == n
    assert max(consumer.depths) <= SlowConsumer.mailbox_size
    assert ref.statistics().high_water == SlowConsumer.mailbox_size
    # 2.5 MB more were sent after the baseline; an unbounded queue would hold them all.
    assert current - baseline < 200_000
    # The producer was paced by the consumer: 3000 messages x 10 ms.
    assert trio.current_time() >= n * 0.01


# ------------------------------------------------------------------------ monitors & links


async def test_a_monitor_delivers_down_with_the_exit_reason():
    async with trio.open_nursery() as nursery:
        watcher = Watcher()
        w = await start(nursery, watcher)
        target = await start(nursery, Counter(), "target")
        ref = await actors.call(w, ("monitor", "target"))
        await actors.stop(target, reason="shutdown: test")
        await watcher.got.wait()
        assert watcher.events == [Down(ref, "target", "shutdown: test")]
        await actors.stop(w)


async def test_monitoring_a_missing_actor_gives_down_noproc_at_once(autojump_clock):
    async with trio.open_nursery() as nursery:
        watcher = Watcher()
        w = await start(nursery, watcher)
        ref = await actors.call(w, ("monitor", "nobody"))
        asked = trio.current_time()
        await watcher.got.wait()
        assert watcher.events == [Down(ref, "nobody", "noproc")]
        assert trio.current_time() == asked  # no timer on the way (the clock autojumps)
        await actors.stop(w)


async def test_demonitor_means_no_down():
    async with trio.open_nursery() as nursery:
        watcher = Watcher()
        w = await start(nursery, watcher)
        target = await start(nursery, Counter())
        ref = await actors.call(w, ("monitor", target))
        await actors.call(w, ("demonitor", ref))
        await actors.stop(target)
        await actors.call(w, ("demonitor", ref))  # a round trip: nothing came meanwhile
        assert watcher.events == []
        await actors.stop(w)


def test_monitor_outside_an_actor_is_an_error():
    with pytest.raises(RuntimeError, match="inside an actor"):
        actors.monitor("x")


async def test_an_abnormal_exit_propagates_over_a_link():
    watcher = Watcher()
    with pytest.RaisesGroup(RuntimeError, LinkedExit):
        async with trio.open_nursery() as nursery:
            w = await start(nursery, watcher)
            target = await start(nursery, Counter())
            await actors.call(w, ("link", target))
            await actors.cast(target, "boom")
            await w.wait_exited()
    assert isinstance(w.exit_reason, LinkedExit)
    assert "RuntimeError: cast boom" in str(w.exit_reason)


async def test_a_normal_exit_does_not_propagate_over_a_link():
    async with trio.open_nursery() as nursery:
        watcher = Watcher()
        w = await start(nursery, watcher)
        target = await start(nursery, Counter())
        await actors.call(w, ("link", target))
        await actors.stop(target, reason="normal")
        await actors.call(w, ("monitor", "nobody"))  # round trip; still alive
        assert w.alive
        await actors.stop(w)


async def test_a_trapping_actor_gets_exit_messages_instead_of_dying():
    with pytest.RaisesGroup(RuntimeError):
        async with trio.open_nursery() as nursery:
            watcher = TrappingWatcher()
            w = await start(nursery, watcher)
            target = await start(nursery, Counter(), "target")
            await actors.call(w, ("link", target))
            await actors.cast(target, "boom")
            await watcher.got.wait()
    assert len(watcher.events) == 1 and isinstance(watcher.events[0], Exit)
    assert watcher.events[0].sender == "target"
    assert isinstance(watcher.events[0].reason, RuntimeError)


async def test_after_unlink_a_crash_no_longer_propagates():
    with pytest.RaisesGroup(RuntimeError):
        async with trio.open_nursery() as nursery:
            watcher = Watcher()
            w = await start(nursery, watcher)
            target = await start(nursery, Counter())
            await actors.call(w, ("link", target))
            await actors.call(w, ("unlink", target))
            await actors.cast(target, "boom")
            await target.wait_exited()
            await actors.call(w, ("monitor", "nobody"))  # round trip: still alive
            assert w.alive
            await actors.stop(w)
