"""Supervisors: start children in order, restart them when they die, stop them in reverse.

A crash and its restart
-----------------------
::

    children = [
        DataLoader.child_spec(name="loader"),
        Optimizer.child_spec(name="optimizer"),
        actors.Supervisor([Reducer, Checkpointer], strategy="one_for_all").child_spec(id="io"),
    ]
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(actors.Supervisor(children, name="rank").run)
        # loader, optimizer, then the nested supervisor (and its two children) run.
        # If Optimizer.handle_call raises, the supervisor logs one line
        #   [Supervisor rank] child_exited id='optimizer' reason='ValueError: nan' ...
        # and starts a fresh Optimizer under the same name (one_for_one).

Semantics (Erlang/OTP's, with Elixir's defaults)
------------------------------------------------
* **Start**: children start one after the other in list order, each waiting for the
  previous one's ``task_status.started``. A child that fails to start makes the whole
  supervisor fail to start (:class:`StartChildError`), after stopping those already up.
* **Restart type** (per child): ``permanent`` always restarted, ``transient`` only after
  an abnormal exit (:func:`is_normal_exit`), ``temporary`` never -- not even when a
  sibling's crash stopped it.
* **Strategy** (per supervisor), applied only when the exited child is to be restarted:
  ``one_for_one`` restarts that child; ``one_for_all`` stops all other children (in
  reverse order) and restarts all; ``rest_for_one`` stops and restarts the children
  started after it. Siblings stopped this way are restarted whatever their type except
  ``temporary``.
* **Restart intensity**: at most ``max_restarts`` restarts (default 3) in any
  ``max_seconds`` window (default 5). One more, and the supervisor stops all children
  and exits with :class:`RestartIntensityExceeded` -- a ``shutdown``-class reason, as in
  OTP, so its own supervisor restarts it only if it is ``permanent``: the failure
  escalates one level up the tree. One strategy application counts as one restart.
* **Shutdown**: children stop in reverse start order. Each is asked to stop (actors:
  ``request_stop``; OS processes: SIGTERM; plain tasks: cancellation) and given its
  ``shutdown`` seconds; then it is killed (cancelled; OS processes: SIGKILL).

Trio cancellation is cooperative
--------------------------------
A kill is a cancellation. A child blocked where trio cannot interrupt it -- inside
``trio.to_thread.run_sync`` without ``abandon_on_cancel=True``, in a blocking call on
the event-loop thread, or under a shielded cancel scope -- does not die. The supervisor
waits a further :data:`ABANDON_AFTER` seconds, logs the child as abandoned and goes on
(restarts it, stops the next sibling); the abandoned task still holds the supervisor's
nursery open, so the supervisor's own exit waits for it. With ``abandon_on_cancel=True``
the task ends at once and the *thread* runs on to completion in the background, its
result discarded. Work that must be killable for sure belongs in an OS-process child.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
from collections.abc import Iterable
from typing import Any

import trio

from . import _registry
from ._actor import ActorRef, _Call, _StopRequest, call
from ._errors import (
    RestartIntensityExceeded,
    StartChildError,
    format_reason,
    is_normal_exit,
)
from ._spec import ChildSpec, ChildType, Restart, child_spec
from ._wire import record

__all__ = [
    "ABANDON_AFTER",
    "ChildInfo",
    "ChildState",
    "Strategy",
    "Supervisor",
    "count_children",
    "restart_child",
    "terminate_child",
    "which_children",
]

log = logging.getLogger("zerotrain.actors.supervisor")

ABANDON_AFTER = 1.0
"""Seconds a killed (cancelled) child may take to end before it is logged as abandoned."""


class Strategy(enum.Enum):
    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


class ChildState(enum.Enum):
    """The life of one child as the supervisor loop sees it::

        (start) --> RUNNING --exit event--> EXITED --restart type says no--> DONE
                       ^                      |
                       |                      +--yes: strategy picks the group, the
                       |                      |  budget is charged, running siblings
                       |                      |  in the group are stopped
                       |                      v
                       +-----start ok---- RESTARTING    (start fails -> EXITED again)

    ``DONE`` children are not running and not coming back on their own (temporary,
    transient after a normal exit, or stopped with :func:`terminate_child`); a
    ``one_for_all`` / ``rest_for_one`` restart or :func:`restart_child` starts them
    again, except temporary ones.
    """

    RUNNING = "running"
    EXITED = "exited"
    RESTARTING = "restarting"
    DONE = "done"


@record(name="actors.ChildInfo")
@dataclasses.dataclass(frozen=True)
class ChildInfo:
    """One row of :func:`which_children`."""

    id: Any
    state: str
    type: str
    restarts: int
    last_exit: str | None  # the last exit reason, as text
    pid: int | None  # OS pid for process children


@record(name="actors.WhichChildren")
@dataclasses.dataclass(frozen=True)
class _WhichChildren:
    pass


@record(name="actors.TerminateChild")
@dataclasses.dataclass(frozen=True)
class _TerminateChild:
    id: Any


@record(name="actors.RestartChild")
@dataclasses.dataclass(frozen=True)
class _RestartChild:
    id: Any


@dataclasses.dataclass(frozen=True, slots=True)
class _ChildExited:
    child: _Child
    incarnation: int
    reason: Any


@dataclasses.dataclass(eq=False)
class _Child:
    spec: ChildSpec
    state: ChildState = ChildState.DONE
    handle: Any = None
    scope: trio.CancelScope | None = None
    exited: trio.Event = dataclasses.field(default_factory=trio.Event)
    incarnation: int = 0
    restarts: int = 0
    last_exit: Any = None
    cancel_reason: str = "killed"  # the exit reason a cancellation stands for

    def info(self) -> ChildInfo:
        return ChildInfo(
            id=self.spec.id,
            state=self.state.value,
            type=self.spec.type.value,
            restarts=self.restarts,
            last_exit=None if self.last_exit is None else format_reason(self.last_exit),
            pid=getattr(self.handle, "pid", None) if self.state is ChildState.RUNNING else None,
        )


class _RestartBudget:
    """OTP restart intensity: at most ``max_restarts`` restarts in any ``max_seconds``."""

    def __init__(self, max_restarts: int, max_seconds: float) -> None:
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self._times: collections.deque[float] = collections.deque(maxlen=max_restarts + 1)

    def spend(self, now: float, what: str) -> None:
        """Count one restart at ``now``; raise if that is one too many."""
        self._times.append(now)
        while self._times and now - self._times[0] >= self.max_seconds:
            self._times.popleft()
        if len(self._times) > self.max_restarts:
            raise RestartIntensityExceeded(
                f"more than {self.max_restarts} restart(s) in {self.max_seconds:g}s; last: {what}"
            )

    def __str__(self) -> str:
        return f"{len(self._times)}/{self.max_restarts} in {self.max_seconds:g}s"


class _Started:
    """Wraps task_status to learn whether the child got as far as ``started``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.done = False

    def started(self, value: Any = None) -> None:
        self.done = True
        self.inner.started(value)


class Supervisor:
    """Supervise ``children`` (child specs in any accepted shape, see ``child_spec``).

    ``strategy``: ``"one_for_one"`` (default), ``"one_for_all"``, ``"rest_for_one"``.
    ``max_restarts`` / ``max_seconds``: restart intensity (default 3 in 5 s).
    ``name``: register the supervisor so :func:`which_children` & co. can reach it.

    Start it with ``await nursery.start(sup.run)`` or nest it with ``sup.child_spec()``.
    """

    def __init__(
        self,
        children: Iterable[Any],
        *,
        strategy: str | Strategy = "one_for_one",
        max_restarts: int = 3,
        max_seconds: float = 5.0,
        name: str | None = None,
        mailbox_size: int = 16,
    ) -> None:
        self.specs = [child_spec(c) for c in children]
        ids = [s.id for s in self.specs]
        duplicates = sorted({repr(i) for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(
                f"child ids must be unique; duplicated: {', '.join(duplicates)} "
                "(give each one an id: child_spec(MyActor, id='other'))"
            )
        try:
            self.strategy = Strategy(strategy)
        except ValueError:
            accepted = ", ".join(repr(s.value) for s in Strategy)
            raise ValueError(f"strategy must be one of {accepted}; got {strategy!r}") from None
        if not (isinstance(max_restarts, int) and max_restarts >= 0 and max_seconds > 0):
            raise ValueError(
                "max_restarts must be an int >= 0 and max_seconds > 0; "
                f"got {max_restarts!r}, {max_seconds!r}"
            )
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self.name = name
        self.mailbox_size = mailbox_size
        self._children: list[_Child] = []

    def child_spec(
        self, id: Any = None, restart: str = "permanent", shutdown: Any = "infinity"
    ) -> ChildSpec:
        """This supervisor as a child of another (type ``supervisor``)."""
        return ChildSpec(
            id=id if id is not None else (self.name or "supervisor"),
            start=self.run,
            restart=restart,
            shutdown=shutdown,
            type=ChildType.SUPERVISOR,
        )

    # =================================================================================
    # The supervisor loop
    # =================================================================================

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> Any:
        """Start the children, supervise them, stop them; return the exit reason.

        Calls ``task_status.started(ref)`` once every child has started. Returns when
        asked to stop (``ref.request_stop`` or ``actors.stop``); raises
        :class:`RestartIntensityExceeded` when restarts exceed the intensity, and
        :class:`StartChildError` when a child fails to start.
        """
        self.ref = ref = ActorRef("Supervisor", self.name, self.mailbox_size, None)
        self._children = [_Child(spec) for spec in self.specs]  # fresh state per run
        self._label = f"[Supervisor {self.name or ref}]"
        reason: Any = "killed"
        try:
            if self.name is not None:
                _registry.register(self.name, ref)
            async with trio.open_nursery() as nursery:
                try:
                    for child in self._children:  # ordered start
                        await self._start(nursery, child, initial=True)
                    task_status.started(ref)
                    reason = await self._supervise(nursery)
                except Exception as exc:
                    reason = exc
                    raise
                finally:  # children stop in reverse start order, whatever happened
                    await self._stop_all()
        except BaseExceptionGroup as group:  # our own error, out of the nursery wrapper
            if len(group.exceptions) == 1 and group.exceptions[0] is reason:
                raise reason from None
            raise
        finally:
            ref._exit(reason)
        return reason

    async def _supervise(self, nursery: trio.Nursery) -> Any:
        budget = _RestartBudget(self.max_restarts, self.max_seconds)
        while True:
            for child in self._children:  # in start order, so restarts go in order
                match child.state:
                    case ChildState.RUNNING | ChildState.DONE:
                        continue
                    case ChildState.EXITED:
                        # restart type + strategy -> DONE, or RESTARTING for it and the
                        # siblings it takes along; spends the budget or escalates
                        await self._on_exit(child, budget)
                        break
                    case ChildState.RESTARTING:
                        await self._start(nursery, child)  # -> RUNNING, or EXITED if it failed
                        break
            else:  # every child is RUNNING or DONE: wait for news
                item = await self.ref.mailbox.get()
                match item:
                    case _ChildExited():
                        self._on_child_exited(item)
                    case _Call():
                        await self._handle_call(nursery, item)
                    case _StopRequest():
                        return item.reason

    # =================================================================================
    # Steps of the loop
    # =================================================================================

    def _on_child_exited(self, event: _ChildExited) -> None:
        child = event.child
        if child.state is ChildState.RUNNING and event.incarnation == child.incarnation:
            child.state = ChildState.EXITED
        # else: stale -- an exit we caused while stopping it, or an older incarnation

    async def _on_exit(self, child: _Child, budget: _RestartBudget) -> None:
        restart = child.spec.restart
        again = restart is Restart.PERMANENT or (
            restart is Restart.TRANSIENT and not is_normal_exit(child.last_exit)
        )
        if not again:
            child.state = ChildState.DONE
            self._log_exit(child, "none", budget)
            return
        what = f"child {child.spec.id!r} exited with {format_reason(child.last_exit)}"
        try:
            budget.spend(trio.current_time(), what)
        except RestartIntensityExceeded:
            self._log_exit(child, "escalate", budget)
            raise
        self._log_exit(child, "restart", budget)
        index = self._children.index(child)
        group = {
            Strategy.ONE_FOR_ONE: [child],
            Strategy.ONE_FOR_ALL: self._children,
            Strategy.REST_FOR_ONE: self._children[index:],
        }[self.strategy]
        for sibling in reversed(group):
            if sibling is not child and sibling.state is ChildState.RUNNING:
                await self._stop(sibling, "shutdown")
        for member in group:
            if member.spec.restart is Restart.TEMPORARY and member is not child:
                member.state = ChildState.DONE
            else:
                member.state = ChildState.RESTARTING
                member.restarts += 1

    async def _start(self, nursery: trio.Nursery, child: _Child, initial: bool = False) -> None:
        child.incarnation += 1
        child.exited = trio.Event()
        child.cancel_reason = "killed"
        try:
            child.handle = await nursery.start(self._run_child, child, child.incarnation)
        except Exception as exc:
            exc = _unwrap(exc)
            if initial:
                raise StartChildError(child.spec.id, exc) from exc
            child.last_exit = exc
            child.state = ChildState.EXITED
            log.error("%s start_failed id=%r reason=%r", self._label, child.spec.id, str(exc))
            return
        child.state = ChildState.RUNNING
        if isinstance(child.handle, ActorRef):
            child.handle.restarts = child.restarts

    async def _run_child(self, child: _Child, incarnation: int, task_status: Any) -> None:
        """The task a child lives in. Never raises after ``started``: exits become
        events in the supervisor's mailbox."""
        status = _Started(task_status)
        exited = child.exited  # this incarnation's: an abandoned one may end much later
        reason: Any = "normal"
        try:
            with trio.CancelScope() as scope:
                child.scope = scope
                result = await child.spec.start(task_status=status)
                reason = "normal" if result is None else result
            if scope.cancelled_caught:
                reason = child.cancel_reason
        except Exception as exc:
            if not status.done:
                raise  # a start failure: nursery.start raises it in _start
            reason = _unwrap(exc)
        finally:
            if status.done:
                if incarnation == child.incarnation:
                    child.last_exit = reason
                exited.set()
                self.ref.mailbox.signal(_ChildExited(child, incarnation, reason))

    async def _stop(self, child: _Child, reason: Any) -> None:
        """Stop one running child: ask, wait ``shutdown`` seconds, kill, maybe abandon."""
        child.state = ChildState.DONE  # its exit event is stale from now on
        timeout = child.spec.shutdown_timeout
        request_stop = getattr(child.handle, "request_stop", None)
        if request_stop is None or timeout == 0:
            child.cancel_reason = "shutdown" if timeout != 0 else "killed"
            child.scope.cancel()
        else:
            request_stop(reason)
        with trio.move_on_after(float("inf") if timeout is None else timeout):
            await child.exited.wait()
            return
        log.warning("%s kill id=%r after=%ss", self._label, child.spec.id, timeout)
        child.scope.cancel()
        with trio.move_on_after(ABANDON_AFTER):
            await child.exited.wait()
            return
        log.error("%s abandon id=%r reason='ignores cancellation'", self._label, child.spec.id)

    async def _stop_all(self) -> None:
        for child in reversed(self._children):
            if child.state is ChildState.RUNNING:
                await self._stop(child, "shutdown")

    def _log_exit(self, child: _Child, action: str, budget: _RestartBudget) -> None:
        level = logging.INFO if is_normal_exit(child.last_exit) else logging.ERROR
        log.log(
            level,
            "%s child_exited id=%r reason=%r restart=%s action=%s strategy=%s budget=%s",
            self._label,
            child.spec.id,
            format_reason(child.last_exit),
            child.spec.restart.value,
            action,
            self.strategy.value,
            str(budget),  # now: the record may be formatted later
        )

    async def _handle_call(self, nursery: trio.Nursery, item: _Call) -> None:
        request, from_ = item.request, item.from_
        if isinstance(request, _WhichChildren):
            from_.reply([c.info() for c in self._children])
            return
        if not isinstance(request, _TerminateChild | _RestartChild):
            accepted = "which_children, terminate_child, restart_child"
            from_._fail(TypeError(f"a supervisor answers {accepted}; got {request!r}"))
            return
        child = next((c for c in self._children if c.spec.id == request.id), None)
        if child is None:
            from_._fail(LookupError(f"no child with id {request.id!r}"))
        elif isinstance(request, _TerminateChild):
            if child.state is ChildState.RUNNING:
                await self._stop(child, "shutdown")
            child.state = ChildState.DONE
            from_.reply(None)
        elif child.state is ChildState.RUNNING:
            from_._fail(RuntimeError(f"child {request.id!r} is running"))
        else:
            await self._start(nursery, child)
            from_.reply(None)


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


# =====================================================================================
# Client functions (work on local and remote supervisors alike)
# =====================================================================================


async def which_children(supervisor: Any, timeout: float | None = 5.0) -> list[ChildInfo]:
    """One :class:`ChildInfo` per child, in start order."""
    return await call(supervisor, _WhichChildren(), timeout)


async def count_children(supervisor: Any, timeout: float | None = 5.0) -> dict[str, int]:
    """``{"specs", "active", "supervisors", "workers"}`` like OTP's count_children."""
    infos = await which_children(supervisor, timeout)
    return {
        "specs": len(infos),
        "active": sum(i.state == ChildState.RUNNING.value for i in infos),
        "supervisors": sum(i.type == ChildType.SUPERVISOR.value for i in infos),
        "workers": sum(i.type == ChildType.WORKER.value for i in infos),
    }


async def terminate_child(supervisor: Any, id: Any, timeout: float | None = None) -> None:
    """Stop child ``id`` (reverse of :func:`restart_child`); it is not restarted."""
    await call(supervisor, _TerminateChild(id), timeout)


async def restart_child(supervisor: Any, id: Any, timeout: float | None = None) -> None:
    """Start child ``id`` again after :func:`terminate_child` (or a final exit)."""
    await call(supervisor, _RestartChild(id), timeout)
