"""Reply slots: where a caller waits for its one answer, until a deadline.

Design note
-----------
A call waits for exactly one thing: its reply (or an error in its place), or its
deadline. The obvious way to write that, an Event awaited inside ``trio.move_on_at``,
costs a cancel scope per call: entering and leaving one (its deadline registered with
the run loop, the cancel-status bookkeeping), a measurable part of a call's cost
(``bench_transport``'s ``node_call`` worker shows it). So a :class:`ReplySlot` parks
its caller with ``wait_task_rescheduled`` instead:

- whoever answers (:meth:`ReplySlot.deliver`) reschedules the caller at once;
- one timer task per trio run (a system task, started on first use) keeps the deadlines
  in a heap and expires a slot whose deadline passes (the caller then raises
  ``trio.TooSlowError``);
- cancelling the caller aborts its wait like any trio wait, and the slot then drops a
  late answer, as it does after its deadline.

Answered slots leave the heap lazily: when they reach its top, or when the heap has
doubled since it was last compacted. So the timer wakes about once per deadline's
length of traffic rather than once per call, and the heap holds at most about twice the
calls in flight. A slot lets go of its answer when the caller takes it, so a reply
(tensors, say) is never kept alive by the heap.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any

import trio

__all__: list[str] = []  # internal: actors._actor and actors._node use ReplySlot

_COMPACT_MIN = 256  # heap entries below which the timer never compacts


class ReplySlot:
    """A one-shot answer a single task waits for, with a deadline (see the module doc)."""

    __slots__ = ("deadline", "done", "ok", "value", "_task", "_expired")

    def __init__(self, timeout: float | None) -> None:
        #: trio time after which the wait fails; inf for no timeout
        self.deadline = math.inf if timeout is None else trio.current_time() + timeout
        self.done = False  #: answered, expired or abandoned: later answers are dropped
        self.ok = False
        self.value: Any = None
        self._task: trio.lowlevel.Task | None = None
        self._expired = False

    @property
    def waiting(self) -> bool:
        """Whether a task is parked in :meth:`wait` (an answer would wake it)."""
        return self._task is not None

    def deliver(self, ok: bool, value: Any) -> None:
        """Answer: ``(True, result)`` or ``(False, exception)``. Never waits; dropped
        if the slot is already done."""
        if self.done:
            return
        self.done, self.ok, self.value = True, ok, value
        self._wake()

    def abandon(self) -> None:
        """The caller gives up without waiting (it failed before its request was sent):
        later answers are dropped."""
        self.done = True
        self.value = None

    async def wait(self) -> tuple[bool, Any]:
        """Wait for the answer and return ``(ok, value)``. Raises ``trio.TooSlowError``
        once the deadline has passed. A checkpoint, like any trio wait."""
        if self.done:
            await trio.lowlevel.checkpoint()
        else:
            if self.deadline != math.inf:
                _timer().add(self)
            self._task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        if self._expired:
            raise trio.TooSlowError
        ok, value = self.ok, self.value
        self.value = None  # the timer's heap may hold the slot until its deadline
        return ok, value

    def _expire(self) -> None:
        if not self.done:
            self.done = self._expired = True
            self._wake()

    def _wake(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)

    def _abort(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        self._task = None
        self.abandon()
        return trio.lowlevel.Abort.SUCCEEDED


class _Timer:
    """The deadlines of one trio run's waiting slots, and the task that expires them."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, ReplySlot]] = []
        self._order = itertools.count()  # ties: first come, first expired
        self._scope: trio.CancelScope | None = None  # the timer's sleep, while it sleeps
        self._compact_at = _COMPACT_MIN

    def add(self, slot: ReplySlot) -> None:
        heapq.heappush(self.heap, (slot.deadline, next(self._order), slot))
        if self._scope is not None and slot.deadline < self._scope.deadline:
            self._scope.deadline = slot.deadline
        if len(self.heap) >= self._compact_at:
            self.heap = [entry for entry in self.heap if not entry[2].done]
            heapq.heapify(self.heap)
            self._compact_at = max(_COMPACT_MIN, 2 * len(self.heap))

    async def run(self) -> None:
        while True:
            heap = self.heap
            while heap and heap[0][2].done:  # answered: nothing to expire
                heapq.heappop(heap)
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as self._scope:
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            heap = self.heap  # (add may have compacted it into a new list)
            while heap and heap[0][0] <= now:
                heapq.heappop(heap)[2]._expire()


_TIMER: trio.lowlevel.RunVar = trio.lowlevel.RunVar("actors reply timer")


def _timer() -> _Timer:
    try:
        return _TIMER.get()
    except LookupError:
        timer = _Timer()
        trio.lowlevel.spawn_system_task(timer.run, name="actors: reply deadlines")
        _TIMER.set(timer)
        return timer
