"""Actors: a trio task that owns some state and a bounded mailbox (a GenServer).

Use an actor for a runtime property -- state touched by many tasks, work that must be
serialised, or a unit that may crash and be restarted on its own. Anything else is a
function.

A crash and its restart
-----------------------
::

    class Counter(actors.Actor):
        async def init(self):
            self.n = 0

        async def handle_call(self, request, from_):
            if request == "boom":
                raise RuntimeError("boom")        # crashes the actor (OTP semantics)
            self.n += request
            return self.n                         # the reply

    async with trio.open_nursery() as nursery:
        await nursery.start(actors.Supervisor([Counter.child_spec(name="counter")]).run)
        await actors.call("counter", 2)           # -> 2
        await actors.call("counter", "boom")      # raises ActorExited("counter ... boom")
        await actors.wait_registered("counter")   # the supervisor restarts it ...
        await actors.call("counter", 1)           # -> 1: ... as a fresh Counter

Callbacks run one at a time in the actor's own task, in mailbox order. Client
functions (:func:`call`, :func:`cast`, :func:`send`, :func:`stop`) run in the caller's
task and accept any target: an :class:`ActorRef`, a local name, or ``"name@node"``.

Failure rules (all in one place)
--------------------------------
* **A call** returns the reply, or raises

  - :class:`CallTimeout` when no reply came within ``timeout`` (default 5 s; the wait for
    room in a full mailbox counts). The request may still be handled later; the late
    reply is dropped.
  - :class:`ActorExited` when the target exits before replying -- including because
    ``handle_call`` raised: the exception crashes the *actor* (its supervisor decides
    what happens next) and the caller gets an error naming the actor and the reason.
  - :class:`NoSuchActor` when the name is not registered (remote: reported by the
    remote node), ``ActorExited(reason="noconnection")`` when the remote node is down.

* **A cast** (and :func:`send`) never waits for the receiver to handle it and never
  reports its fate. It waits only for room in the mailbox (back-pressure). A cast to a
  local name that is not registered raises :class:`NoSuchActor` (a programming error);
  a cast to an actor that dies before handling it is dropped, and so is a remote cast
  the node could not send within its send timeout (logged). Use a call when you need
  to know.
* **An exception in a callback** crashes the actor with that exception as its exit
  reason: ``terminate(reason)`` runs, then monitors get ``Down`` and links an exit
  signal. Exceptions never travel between processes: remote callers get the reason as
  text (:class:`RemoteError`).
* **A stop request** (:func:`stop`, a supervisor shutting the actor down) is a signal:
  it jumps the queue. The actor finishes its current message, runs ``terminate`` and
  exits; what is still queued is then "left in a dead actor's inbox".
* **Messages left in a dead actor's inbox**: calls fail at once with
  :class:`ActorExited` (the caller does not wait for its timeout); casts and sends
  are dropped and counted (``statistics().dropped``); senders blocked on a full mailbox
  are released the same way. Deferred calls (``NOREPLY``) not yet answered fail too.
* **Kill** (cancellation after the shutdown timeout) skips ``terminate``, as OTP's
  ``kill`` does.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import itertools
import logging
from collections.abc import Callable
from typing import Any

import trio

from . import _registry
from ._errors import (
    ActorExited,
    CallTimeout,
    LinkedExit,
    NoSuchActor,
    format_reason,
    is_normal_exit,
)
from ._mailbox import Mailbox, MailboxClosed
from ._registry import Address
from ._reply import ReplySlot
from ._wire import record

__all__ = [
    "NOREPLY",
    "Actor",
    "ActorRef",
    "ActorStats",
    "Down",
    "Exit",
    "From",
    "MonitorRef",
    "Stop",
    "call",
    "cast",
    "current_actor",
    "demonitor",
    "link",
    "monitor",
    "send",
    "spawn",
    "statistics",
    "stop",
    "unlink",
]

log = logging.getLogger("zerotrain.actors")

_serial = itertools.count(1)


# =====================================================================================
# Message records
# =====================================================================================


@dataclasses.dataclass(frozen=True)
class MonitorRef:
    """Identifies one monitor; compare it with ``Down.ref``."""

    id: int
    node: str | None = None  # the node that created it (None: no node running)


@dataclasses.dataclass(frozen=True)
class Down:
    """``handle_info`` gets this when a monitored target exits (once per monitor).

    ``target`` is the target's name (``"name@node"`` for remote ones), ``reason`` its
    exit reason: ``"noproc"`` if it did not exist, ``"noconnection"`` if its node
    stopped answering.
    """

    ref: MonitorRef
    target: str
    reason: Any


@dataclasses.dataclass(frozen=True)
class Exit:
    """``handle_info`` gets this when a linked actor exits and ``trap_exits`` is True."""

    sender: str
    reason: Any


class _NoReply:
    def __repr__(self) -> str:
        return "NOREPLY"


NOREPLY: Any = _NoReply()
"""Return from ``handle_call`` to reply later with ``from_.reply(value)``."""


class Stop(Exception):
    """Raise from any callback to stop the actor with ``reason`` (not a crash when the
    reason is normal). From ``handle_call``, ``reply=`` answers the caller first."""

    def __init__(self, reason: Any = "normal", reply: Any = NOREPLY) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


# Envelopes: what travels through a mailbox. Private; callbacks see the contents.


@dataclasses.dataclass(frozen=True, slots=True)
class _Call:
    request: Any
    from_: From


@dataclasses.dataclass(frozen=True, slots=True)
class _Cast:
    msg: Any


@dataclasses.dataclass(frozen=True, slots=True)
class _Info:
    msg: Any


@dataclasses.dataclass(frozen=True, slots=True)
class _StopRequest:
    reason: Any


@dataclasses.dataclass(frozen=True, slots=True)
class _ExitSignal:
    sender: str
    reason: Any


# =====================================================================================
# From: the return address of a call
# =====================================================================================


class From:
    """Where one call's reply goes: ``handle_call``'s second argument.

    Reply at most once, from any task of this process. A reply after the caller gave up
    (timeout, cancellation) is dropped; a second reply raises RuntimeError.
    """

    __slots__ = ("_deliver", "_owner", "caller", "done")

    def __init__(
        self, deliver: Callable[[bool, Any], None], owner: ActorRef | None, caller: str
    ) -> None:
        self._deliver = deliver  # (ok, value-or-exception) -> None; never blocks
        self._owner = owner
        self.caller = caller  #: who called, for logs ("Reducer@rank0", "<task>")
        self.done = False

    def reply(self, value: Any) -> None:
        """Send ``value`` to the caller."""
        self._finish(True, value)

    def _fail(self, error: BaseException) -> None:
        if not self.done:
            self._finish(False, error)

    def _finish(self, ok: bool, value: Any) -> None:
        if self.done:
            raise RuntimeError(f"call from {self.caller} was already answered")
        self.done = True
        if self._owner is not None:
            self._owner._pending.discard(self)
        self._deliver(ok, value)

    def __repr__(self) -> str:
        return f"From({self.caller})"


# =====================================================================================
# ActorRef: the handle (a "pid")
# =====================================================================================


@record(name="actors.ActorStats")
@dataclasses.dataclass(frozen=True)
class ActorStats:
    """What every actor reports (``actors.statistics(target)``)."""

    name: str
    role: str
    rank: int | None
    queue_depth: int
    capacity: int
    high_water: int
    senders_waiting: int
    processed: int
    restarts: int
    dropped: int


class ActorRef:
    """A handle to one running actor incarnation (a restarted actor has a new ref).

    Compare refs by identity. ``str(ref)`` is the registered name, or ``<Role#n>``.
    """

    def __init__(self, role: str, name: str | None, capacity: int, rank: int | None) -> None:
        self.role = role
        self.name = name
        self.rank = rank
        self.serial = next(_serial)
        self.mailbox = Mailbox(capacity)
        self.alive = True
        self.exit_reason: Any = None
        self.processed = 0
        self.dropped = 0
        self.restarts = 0  # set by the supervisor that started this incarnation
        self._exited = trio.Event()
        self._pending: set[From] = set()  # calls queued or deferred, not yet answered
        self._monitors: dict[MonitorRef, Any] = {}  # ref -> sink watching *us*
        self._watching: dict[MonitorRef, Any] = {}  # ref -> local target or node we watch
        self._links: set[Any] = set()  # sinks (ActorRef or remote link proxies)

    def __str__(self) -> str:
        return self.name if self.name else f"<{self.role}#{self.serial}>"

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"exited: {format_reason(self.exit_reason)}"
        return f"ActorRef({self}, {state})"

    @property
    def label(self) -> str:
        """``name@node`` when this process runs a node, else the plain name."""
        node = _registry.local_node_name()
        return f"{self}@{node}" if node and self.name else str(self)

    # -- used by supervisors ---------------------------------------------------------

    def request_stop(self, reason: Any = "shutdown") -> None:
        """Ask the actor to finish its current message, run ``terminate`` and exit."""
        self.mailbox.signal(_StopRequest(reason))

    async def wait_exited(self) -> Any:
        """Wait until this incarnation has exited; return its exit reason."""
        await self._exited.wait()
        return self.exit_reason

    def statistics(self) -> ActorStats:
        box = self.mailbox.statistics()
        return ActorStats(
            name=str(self),
            role=self.role,
            rank=self.rank,
            queue_depth=box.depth,
            capacity=box.capacity,
            high_water=box.high_water,
            senders_waiting=box.senders_waiting,
            processed=self.processed,
            restarts=self.restarts,
            dropped=self.dropped,
        )

    # -- signal sink (monitors and links deliver through this) ----------------------

    def _deliver_signal(self, item: Any) -> None:
        if isinstance(item, Down):
            self._watching.pop(item.ref, None)  # a monitor fires once: forget it
        self.mailbox.signal(item)

    # -- client side of call/cast ----------------------------------------------------

    async def _call(self, request: Any, timeout: float | None, caller: str | None = None) -> Any:
        slot = ReplySlot(timeout)
        from_ = From(slot.deliver, self, caller or _caller_label())
        call = _Call(request, from_)
        self._pending.add(from_)
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if timeout == 0 or not self.mailbox.try_put(call):
                # Full (or timeout 0, whose deadline has passed: nothing is queued).
                with trio.move_on_at(slot.deadline) as scope:
                    await self.mailbox.put(call)
                if scope.cancelled_caught:
                    raise trio.TooSlowError
            ok, value = await slot.wait()
        except MailboxClosed:
            raise ActorExited(str(self), self.exit_reason, "before the call was handled") from None
        except trio.TooSlowError:
            raise CallTimeout(str(self), request, timeout) from None
        finally:
            if not from_.done:  # no answer: one arriving now is dropped
                slot.abandon()
                self._pending.discard(from_)
        if ok:
            return value
        raise value

    async def _put(self, envelope: Any) -> None:
        try:
            await self.mailbox.put(envelope)
        except MailboxClosed:
            log.debug("dropped %r: %s has exited", envelope, self)

    # -- exit ------------------------------------------------------------------------

    def _exit(self, reason: Any) -> None:
        """Run once when the actor task ends: apply the failure rules (module doc)."""
        self.alive = False
        self.exit_reason = reason
        if self.name:
            _registry.unregister(self.name, self)
        for item in self.mailbox.close():
            if isinstance(item, _Cast | _Info):
                self.dropped += 1
        if self.dropped:
            log.debug("%s: dropped %d message(s) left in its mailbox", self, self.dropped)
        error = ActorExited(str(self), reason)
        for from_ in list(self._pending):
            from_._fail(error)
        label = self.label
        for ref, sink in self._monitors.items():
            sink._deliver_signal(Down(ref, label, reason))
        self._monitors.clear()
        for other in self._links:
            if isinstance(other, ActorRef):
                other._links.discard(self)
            other._deliver_signal(_ExitSignal(label, reason))
        self._links.clear()
        for ref, target in self._watching.items():
            target._demonitor(ref)
        self._watching.clear()
        self._exited.set()

    # monitor bookkeeping, local side (the node implements the same for remote targets)

    def _demonitor(self, ref: MonitorRef) -> None:
        self._monitors.pop(ref, None)


def _deadline_arg(timeout: float | None) -> float:
    return float("inf") if timeout is None else timeout


def _check_timeout(timeout: Any) -> None:
    """A caller's ``timeout``: None or seconds >= 0, else a one-line error naming it."""
    if timeout is None or (type(timeout) is float and timeout >= 0):
        return
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be None or a number of seconds, got {timeout!r}")
    if not timeout >= 0:  # (NaN too)
        raise ValueError(f"timeout must be None or seconds >= 0, got {timeout!r}")


# =====================================================================================
# Client functions
# =====================================================================================

_CURRENT: contextvars.ContextVar[ActorRef | None] = contextvars.ContextVar(
    "zerotrain_current_actor", default=None
)


def current_actor() -> ActorRef | None:
    """The actor whose task (or helper task) is running, or None outside actors."""
    return _CURRENT.get()


def _caller_label() -> str:
    me = _CURRENT.get()
    return me.label if me is not None else "<task>"


def _local(target: ActorRef | str) -> ActorRef:
    if isinstance(target, ActorRef):
        return target
    ref = _registry.whereis(target)
    if ref is None:
        raise NoSuchActor(
            f"no actor registered as {target!r} in this process "
            f"(registered: {', '.join(_registry.registered()) or 'none'})"
        )
    return ref


async def call(target: Any, request: Any, timeout: float | None = 5.0) -> Any:
    """Send ``request`` to ``handle_call`` and wait for the reply (failure rules above).

    ``timeout`` is in seconds (None: wait forever), and covers waiting for room in a
    full mailbox. Remote requests must be wire data (see ``actors.record``).
    """
    _check_timeout(timeout)
    where = _registry.parse_target(target)
    if isinstance(where, Address):
        return await _registry.current_node()._call(where, request, timeout)
    ref = _local(where)
    if not ref.alive:
        raise ActorExited(str(ref), ref.exit_reason, "before the call was sent")
    return await ref._call(request, timeout)


async def cast(target: Any, msg: Any) -> None:
    """Deliver ``msg`` to ``handle_cast`` without waiting for it to be handled.

    Waits while the target's mailbox is full (back-pressure); for a remote target,
    while its node has said the actor is busy (``actors._node``, "Back-pressure"). See
    the failure rules. A remote cast sends numpy arrays without copying and returns once
    the message is queued: do not modify them afterwards (cast a copy if you must).

    Unlike OTP's, mailboxes are bounded, so waiting senders can form a cycle: an actor
    that calls the very actor flooding it with casts waits for a reply that waits for
    room in its own mailbox. The call's timeout breaks such a cycle; a design avoids it
    by not calling back into its producers while handling their casts.
    """
    await _fire(target, msg, _Cast, "cast")


async def send(target: Any, msg: Any) -> None:
    """Deliver ``msg`` to ``handle_info`` (like ``cast``, for info-style messages)."""
    await _fire(target, msg, _Info, "send")


async def _fire(target: Any, msg: Any, envelope: type, kind: str) -> None:
    where = _registry.parse_target(target)
    if isinstance(where, Address):
        await _registry.current_node()._fire(where, msg, kind)
        return
    await _local(where)._put(envelope(msg))


async def stop(target: Any, reason: Any = "normal", timeout: float | None = 5.0) -> None:
    """Ask an actor to stop with ``reason`` and wait until it has (local targets).

    The actor finishes its current message, runs ``terminate(reason)`` and exits. If it
    is supervised, its supervisor sees that exit like any other (a ``permanent`` child
    is restarted). Raises :class:`CallTimeout` if it takes longer than ``timeout``.
    """
    _check_timeout(timeout)
    where = _registry.parse_target(target)
    if isinstance(where, Address):
        await _registry.current_node()._stop(where, reason, timeout)
        return
    ref = _local(where)
    ref.request_stop(reason)
    with trio.move_on_after(_deadline_arg(timeout)):
        await ref.wait_exited()
        return
    raise CallTimeout(str(ref), f"stop({reason!r})", timeout)


async def statistics(target: Any, timeout: float | None = 5.0) -> ActorStats:
    """The target's :class:`ActorStats` (answered by the runtime, not the actor's loop)."""
    _check_timeout(timeout)
    where = _registry.parse_target(target)
    if isinstance(where, Address):
        return await _registry.current_node()._statistics(where, timeout)
    return _local(where).statistics()


def _watcher(what: str) -> ActorRef:
    me = _CURRENT.get()
    if me is None:
        raise RuntimeError(f"{what}() must be called from inside an actor (its callbacks or tasks)")
    return me


def monitor(target: Any) -> MonitorRef:
    """Watch ``target``: this actor's ``handle_info`` gets one :class:`Down` when it exits.

    Works for local and remote targets; a target that does not exist yields
    ``Down(reason="noproc")`` at once, a node that stops answering ``"noconnection"``.
    """
    me = _watcher("monitor")
    where = _registry.parse_target(target)
    node = _registry.current_node(required=isinstance(where, Address))
    ref = MonitorRef(next(_serial), node.name if node else None)
    if isinstance(where, Address):
        node._monitor(where, ref, me)
        me._watching[ref] = node
        return ref
    try:
        other = _local(where)
    except NoSuchActor:
        other = None
    if other is None or not other.alive:
        me._deliver_signal(Down(ref, str(where), "noproc"))
        return ref
    other._monitors[ref] = me
    me._watching[ref] = other
    return ref


def demonitor(ref: MonitorRef) -> None:
    """Stop watching; a ``Down`` for ``ref`` that is already queued is removed too."""
    me = _watcher("demonitor")
    target = me._watching.pop(ref, None)
    if target is not None:
        target._demonitor(ref)
    me.mailbox.remove_signals(lambda s: isinstance(s, Down) and s.ref == ref)


def link(target: Any) -> None:
    """Link this actor and ``target``: when either exits abnormally, the other exits too
    (with :class:`LinkedExit`) unless it traps exits (then it gets :class:`Exit`)."""
    me = _watcher("link")
    where = _registry.parse_target(target)
    if isinstance(where, Address):
        _registry.current_node()._link(where, me)
        return
    other = _local(where)
    if not other.alive:
        me._deliver_signal(_ExitSignal(str(other), "noproc"))
        return
    me._links.add(other)
    other._links.add(me)


def unlink(target: Any) -> None:
    """Remove a link made with :func:`link`. An exit signal already queued stays."""
    me = _watcher("unlink")
    where = _registry.parse_target(target)
    if isinstance(where, Address):
        _registry.current_node()._unlink(where, me)
        return
    other = _local(where)
    me._links.discard(other)
    other._links.discard(me)


# =====================================================================================
# The Actor base class
# =====================================================================================


class _PrefixLog(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['prefix']} {msg}", kwargs


class Actor:
    """Subclass and override the callbacks; start with :func:`spawn` or a supervisor.

    Class attributes: ``mailbox_size`` (64), ``trap_exits`` (False), ``role`` (log and
    stats label; default the class name), ``rank`` (default: the process's rank),
    ``restart`` / ``shutdown`` (defaults for :meth:`child_spec`).

    Every callback runs in the actor's own task, one at a time. If a callback raises,
    the actor crashes with that exception (see the failure rules in the module doc).
    """

    mailbox_size: int = 64
    trap_exits: bool = False
    role: str | None = None
    rank: int | None = None
    restart: str = "permanent"
    shutdown: float | str = 5.0

    #: this incarnation's handle, set before ``init`` runs
    ref: ActorRef
    #: a nursery living as long as the actor: helper tasks, timers, deferred replies
    nursery: trio.Nursery
    log: logging.LoggerAdapter

    # -- how to start it ---------------------------------------------------------------

    @classmethod
    def child_spec(
        cls,
        *args: Any,
        name: str | None = None,
        id: Any = None,
        restart: str | None = None,
        shutdown: float | str | None = None,
        **kwargs: Any,
    ):
        """A child spec that starts ``cls(*args, **kwargs)`` registered as ``name``.

        Each (re)start builds a fresh instance: a restarted actor starts from ``init``.
        ``id`` defaults to ``name``, then to the class name.
        """
        from ._spec import ChildSpec

        async def start(task_status: Any = trio.TASK_STATUS_IGNORED) -> Any:
            return await cls(*args, **kwargs).run(name=name, task_status=task_status)

        return ChildSpec(
            id=id if id is not None else (name or cls.__name__),
            start=start,
            restart=restart or cls.restart,
            shutdown=shutdown if shutdown is not None else cls.shutdown,
        )

    async def run(
        self, *, name: str | None = None, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> Any:
        """Run this actor in the calling task until it exits; return the exit reason.

        Calls ``task_status.started(ref)`` after ``init``. An exception from ``init``
        propagates (the actor never started); a crash later propagates too, after
        ``terminate`` and after monitors and links were told.
        """
        role = self.role or type(self).__name__
        rank = self.rank if self.rank is not None else _registry.default_rank()
        ref = ActorRef(role, name, self.mailbox_size, rank)
        self.ref = ref
        self.log = _PrefixLog(log, {"prefix": f"[{role} {'-' if rank is None else rank}]"})
        token = _CURRENT.set(ref)  # this task's context: helper tasks inherit it
        reason: Any = "killed"
        crash: BaseException | None = None
        started = False
        try:
            if name is not None:
                _registry.register(name, ref)
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                try:
                    await self.init()
                    task_status.started(ref)
                    started = True
                    reason = await self._loop(ref)
                except Exception as exc:  # not Cancelled: a kill skips terminate
                    crash = reason = exc
                    if started:  # OTP: a failed init does not run terminate
                        await self._terminate(exc)
                nursery.cancel_scope.cancel()  # helper tasks end with the actor
        except BaseException as exc:
            reason = _reason_from(exc)
            if crash is None and isinstance(reason, Exception):
                crash = reason  # a helper task crashed
            raise
        finally:
            ref._exit(reason)
            _CURRENT.reset(token)
        if crash is not None:
            if started:
                self.log.error("crashed: %s", format_reason(crash), exc_info=crash)
            raise crash
        return reason

    async def _loop(self, ref: ActorRef) -> Any:
        while True:
            item = await ref.mailbox.get()
            try:
                await self._dispatch(item)
            except Stop as stop:
                await self._terminate(stop.reason)
                return stop.reason
            finally:
                ref.processed += 1

    async def _dispatch(self, item: Any) -> None:
        if isinstance(item, _Call):
            try:
                reply = await self.handle_call(item.request, item.from_)
            except Stop as stop:
                if stop.reply is not NOREPLY:
                    item.from_.reply(stop.reply)
                raise
            if reply is not NOREPLY:
                item.from_.reply(reply)
        elif isinstance(item, _Cast):
            await self.handle_cast(item.msg)
        elif isinstance(item, _Info):
            await self.handle_info(item.msg)
        elif isinstance(item, _StopRequest):
            raise Stop(item.reason)
        elif isinstance(item, _ExitSignal):
            if self.trap_exits:
                await self.handle_info(Exit(item.sender, item.reason))
            elif not is_normal_exit(item.reason):
                raise LinkedExit(item.sender, item.reason)
        else:  # Down and other runtime signals
            await self.handle_info(item)

    async def _terminate(self, reason: Any) -> None:
        try:
            await self.terminate(reason)
        except Exception as exc:
            self.log.error("terminate(%s) raised %s", format_reason(reason), format_reason(exc))

    # -- helpers for callbacks ----------------------------------------------------------

    def send_after(self, delay: float, msg: Any) -> trio.CancelScope:
        """Deliver ``msg`` to ``handle_info`` after ``delay`` seconds; cancel the returned
        scope to cancel the timer. Timers die with the actor."""
        scope = trio.CancelScope()

        async def timer() -> None:
            with scope:
                await trio.sleep(delay)
                await self.ref._put(_Info(msg))

        self.nursery.start_soon(timer)
        return scope

    # -- callbacks ----------------------------------------------------------------------

    async def init(self) -> None:
        """Set up state before the first message; the starter waits for it.

        Runs in the actor's task. Raising makes the start fail: ``spawn`` / the
        supervisor's start gets the exception, nothing is registered.
        """

    async def handle_call(self, request: Any, from_: From) -> Any:
        """Answer a :func:`call`. Return shapes:

        * any value -- the reply;
        * :data:`NOREPLY` -- reply later with ``from_.reply(value)`` (e.g. from a helper
          task in ``self.nursery``);
        * ``raise Stop(reason, reply=value)`` -- reply, then stop.

        Raising anything else crashes the actor; the caller gets :class:`ActorExited`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no handle_call; got {request!r}")

    async def handle_cast(self, msg: Any) -> None:
        """Handle a :func:`cast`. ``raise Stop(reason)`` stops; other errors crash."""
        raise NotImplementedError(f"{type(self).__name__} has no handle_cast; got {msg!r}")

    async def handle_info(self, msg: Any) -> None:
        """Handle :class:`Down`, :class:`Exit` (with ``trap_exits``), timers from
        :meth:`send_after` and :func:`send` messages. The default logs and ignores."""
        self.log.warning("unhandled message %r", msg)

    async def terminate(self, reason: Any) -> None:
        """Clean up before exiting, after a stop or a crash (not after a kill).

        Runs in the actor's task; mailbox still open but no longer read. Exceptions
        are logged and ignored.
        """


def _reason_from(exc: BaseException) -> Any:
    """The exit reason an escaping exception stands for: Cancelled -> "killed"."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, trio.Cancelled):
        return "killed"
    if isinstance(exc, BaseExceptionGroup):
        cancelled, rest = exc.split(trio.Cancelled)
        if rest is not None and len(rest.exceptions) == 1:
            return _reason_from(rest)
        return rest if rest is not None else "killed"
    return exc


async def spawn(nursery: trio.Nursery, actor: Actor, *, name: str | None = None) -> ActorRef:
    """Start ``actor`` in ``nursery`` (unsupervised) and return its ref after ``init``.

    The actor is linked to the nursery the trio way: if it crashes, the exception
    propagates into ``nursery`` and cancels its other tasks. Prefer a supervisor.
    """
    return await nursery.start(functools.partial(actor.run, name=name))
