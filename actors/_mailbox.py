"""Bounded mailboxes: the only queue an actor has.

Design note
-----------
OTP mailboxes are unbounded; ours are not, because a fast producer feeding a slow
consumer must slow down instead of filling memory (GenStage's demand, expressed as
"a sender waits until there is room"). A mailbox therefore has two lanes:

``messages``
    Calls, casts and plain sends. Holds at most ``capacity`` items. :meth:`Mailbox.put`
    waits while the lane is full; waiting senders are admitted first come, first served.

``signals``
    What the runtime itself delivers: ``Down`` and exit signals, child-exit events, a stop
    request. Putting a signal never waits -- the runtime must be able to tell an actor
    that something died even when its message lane is full -- and signals are taken
    before messages. The lane is bounded by construction, not by a number: every monitor
    or link fires at most once and an actor holds finitely many, a supervisor gets one
    exit event per child incarnation, a stop request is sent once. A caller that could
    produce signals without such a bound must use the message lane.

Closing a mailbox (its actor exited) wakes every waiting sender with
:class:`MailboxClosed` and hands the leftovers to the runtime, which fails the calls among
them (see the failure rules in ``actors._actor``).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import trio

__all__ = ["Mailbox", "MailboxClosed", "MailboxFull", "MailboxStats"]


class MailboxClosed(Exception):
    """The mailbox's actor has exited; nothing more will be taken from it."""


class MailboxFull(Exception):
    """:meth:`Mailbox.put_nowait` found the message lane at capacity."""


@dataclasses.dataclass(frozen=True)
class MailboxStats:
    """A snapshot of one mailbox.

    ``depth`` is the number of queued messages (signals not included), ``high_water``
    the largest depth ever seen, ``senders_waiting`` how many tasks are blocked in
    :meth:`Mailbox.put` because the lane is full.
    """

    depth: int
    capacity: int
    high_water: int
    senders_waiting: int
    signals: int


class Mailbox:
    """A bounded two-lane inbox (see the module doc).

    Only the owning actor calls :meth:`get`; any task may :meth:`put`.
    """

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"mailbox capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._messages: collections.deque[Any] = collections.deque()
        self._signals: collections.deque[Any] = collections.deque()
        self._taker: trio.lowlevel.Task | None = None  # the owner, parked in get
        self._not_full = trio.lowlevel.ParkingLot()
        self._kept = 0  # room kept for senders woken from _not_full that have not run yet
        self._closed = False
        self._high_water = 0

    # ------------------------------------------------------------------ senders

    async def put(self, item: Any) -> None:
        """Queue ``item``, waiting while the message lane is full.

        Raises :class:`MailboxClosed` if the mailbox is closed before or while waiting.
        Cancellation while waiting leaves the mailbox untouched.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed or not self._full():
            self._append(item)
            # A checkpoint even when there is room, so a producer that never finds the
            # lane full still lets the consumer run (test_back_pressure_keeps_queue_bounded).
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        # Full: wait until a taken message's room is handed to us, in arrival order --
        # get keeps it for the sender it wakes, so nobody else can take it meanwhile.
        await self._not_full.park()
        if not self._closed:
            self._kept -= 1
        self._append(item)

    def try_put(self, item: Any) -> bool:
        """Queue ``item`` if the message lane has room; False if it is full (room kept
        for a waiting sender counts as full). Raises :class:`MailboxClosed` once
        closed. Not a checkpoint."""
        if not self._closed and self._full():
            return False
        self._append(item)
        return True

    def _full(self) -> bool:
        return len(self._messages) + self._kept >= self.capacity

    def put_nowait(self, item: Any) -> None:
        """Queue ``item`` or raise :class:`MailboxFull` / :class:`MailboxClosed`."""
        if not self.try_put(item):
            raise MailboxFull(f"mailbox full ({self.capacity} messages)")

    def _append(self, item: Any) -> None:
        if self._closed:
            raise MailboxClosed("mailbox closed: its actor has exited")
        self._messages.append(item)
        self._high_water = max(self._high_water, len(self._messages))
        self._wake_taker()

    def signal(self, item: Any) -> None:
        """Deliver a runtime signal; never waits. Dropped silently once closed."""
        if self._closed:
            return
        self._signals.append(item)
        self._wake_taker()

    def remove_signals(self, predicate) -> int:
        """Drop queued signals for which ``predicate(signal)`` is true; return how many."""
        keep = [s for s in self._signals if not predicate(s)]
        removed = len(self._signals) - len(keep)
        self._signals = collections.deque(keep)
        return removed

    # ----------------------------------------------------------------- receiver

    async def get(self) -> Any:
        """Take the next item: signals first, then messages in arrival order. One task
        at a time (the owner): a second concurrent taker raises RuntimeError."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._signals or self._messages:
            # Mail is ready: yield now, before taking it, not after (an item must never
            # sit out of the mailbox, not yet handled, across a schedule point: another
            # task of the actor would see an empty mailbox with work on its way).
            await trio.lowlevel.cancel_shielded_checkpoint()
        while not (self._signals or self._messages):
            if self._closed:
                raise MailboxClosed("mailbox closed")
            if self._taker is not None:
                raise RuntimeError("another task is already waiting in this mailbox's get")
            # Parked by hand, not in a ParkingLot: there is one taker, and a put wakes it
            # with one reschedule (the path of every message to an idle actor).
            self._taker = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort_get)
        if self._signals:
            return self._signals.popleft()
        item = self._messages.popleft()
        if self._not_full:  # the room goes to the longest-waiting sender
            self._not_full.unpark()
            self._kept += 1
        return item

    def close(self) -> list[Any]:
        """Close for good; wake all waiters; return what was left (signals, then messages)."""
        self._closed = True
        leftovers = [*self._signals, *self._messages]
        self._signals.clear()
        self._messages.clear()
        self._not_full.unpark_all()
        self._wake_taker()
        return leftovers

    @property
    def taker_waiting(self) -> bool:
        """Whether the actor is parked in :meth:`get` (a message would wake it)."""
        return self._taker is not None

    def _wake_taker(self) -> None:
        taker = self._taker
        if taker is not None:
            self._taker = None
            trio.lowlevel.reschedule(taker)

    def _abort_get(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        self._taker = None
        return trio.lowlevel.Abort.SUCCEEDED

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> MailboxStats:
        return MailboxStats(
            depth=len(self._messages),
            capacity=self.capacity,
            high_water=self._high_water,
            senders_waiting=self._not_full.statistics().tasks_waiting,
            signals=len(self._signals),
        )

    def __len__(self) -> int:
        return len(self._messages)
