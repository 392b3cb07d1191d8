"""ZeroMQ sockets on trio: no thread per socket, no busy polling.

Design note
-----------
pyzmq only integrates with asyncio, so this module does the trio integration itself,
following the FD/EVENTS pattern (TRANSPORT.md, and pyzmq's own ``zmq/_future.py``):

* Every send and receive is a synchronous ``zmq.DONTWAIT`` attempt. Messages are only
  ever taken by those synchronous calls, so cancelling a waiting task loses nothing.
* On ``zmq.Again`` the task waits for its flag (POLLIN or POLLOUT). It first reads
  ``ZMQ_EVENTS`` -- which also runs libzmq's pending commands and re-arms the
  edge-triggered ``ZMQ_FD`` -- and only if the flag is clear does it sleep. Exactly one
  task per socket (the *watcher*) sleeps in ``trio.lowlevel.wait_readable(fd)``; trio
  raises BusyResourceError for a second one. Any other waiter *parks* on an Event and
  is woken whenever the watcher leaves, so someone takes over the watch. A receiver
  woken by the FD tries its receive at once (``zmq.Again`` sends it back to EVENTS).
* After every successful send or receive, and whenever a waiter reads ``ZMQ_EVENTS``,
  the flags are re-read and every waiter whose flag is now set is woken (the watcher
  through ``notify_closing``, see ``_poll``). The operation may have consumed the FD
  edge that waiter was sleeping on; skipping this hung after two messages in
  TRANSPORT.md's experiment.
* An operation that did not have to wait is a cancellation point but yields to the
  scheduler only every 16th time: a trio checkpoint costs as much as a small send.
* ``close()`` sets a flag, calls ``trio.lowlevel.notify_closing(fd)`` (the watcher gets
  ClosedResourceError), wakes parked waiters (they see the flag and raise
  ClosedResourceError too), then closes the zmq socket.

Zero-copy sends and the in-flight rule
--------------------------------------
``send_multipart(copy=False)`` hands libzmq the caller's buffers. Until libzmq releases
them the bytes may still be read, so the sender must not mutate them. Either pass
``track=True`` and ``await wait_released(tracker)`` before mutating, or never mutate
(send a copy, or rotate buffers). Frames under ``copy_threshold`` (64 KiB) are copied by
pyzmq anyway.

One zmq Context per process, created on first use. Rank processes are spawned as fresh
interpreters; a forked child drops the inherited context and creates its own. At exit
the context is flushed (``get_context``), so a message sent just before exiting leaves.

Memory: HWM counts messages and MAXMSGSIZE bounds one frame, so a peer can make a
receiver queue up to RCVHWM x MAXMSGSIZE per connection; lower both on sockets that
take large frames from many peers. Large received frames are malloc'd by libzmq's I/O
thread; a slow consumer of multi-MiB messages page-faults on fresh memory (seen here:
up to 5x the page faults of a raw blocking receiver).
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import trio
import zmq

# atexit runs handlers last-registered-first. pyzmq's zero-copy garbage collector
# registers its shutdown when first imported: import it before get_context registers
# the exit flush, so the flush (which hands released frames to it) runs first.
import zmq.utils.garbage  # noqa: F401  (isort: keep after zmq)

from ._frames import (
    DEFAULT_LIMITS,
    MAX_FRAME_BYTES,
    FrameError,
    Limits,
    Message,
    decode,
    encode,
)

__all__ = [
    "DEFAULT_SOCKET_OPTIONS",
    "PeerUnreachable",
    "TrioSocket",
    "get_context",
    "ipc_directory",
    "ipc_endpoint",
    "new_ipc_directory",
    "open_socket",
    "wait_released",
]

# Applied to every socket before the caller's options (which win). Why each one:
DEFAULT_SOCKET_OPTIONS: dict[str, int] = {
    "LINGER": 1000,  # the default, -1, makes close/term hang forever on a dead peer
    "SNDHWM": 256,  # HWM counts messages, not bytes: senders wait beyond it
    "RCVHWM": 256,
    "MAXMSGSIZE": MAX_FRAME_BYTES,  # per *frame*; a bigger one drops the connection
    "HEARTBEAT_IVL": 500,  # ms; a SIGSTOPped peer is noticed after HEARTBEAT_TIMEOUT
    "HEARTBEAT_TIMEOUT": 2500,
    "HEARTBEAT_TTL": 2500,
}
# Connecting sockets also get IMMEDIATE=1 (never queue on a connection that is not up)
# and ROUTERs get ROUTER_MANDATORY=1 (an unknown peer raises instead of dropping).
# Trap (measured here): with IMMEDIATE=1, when the peer hangs up libzmq terminates the
# connecting socket's pipe at once and *drops its unread input*: a reply sent just before
# the peer exited is lost. Pass immediate=0 where the last message of a leaving peer
# matters (the ring's acks do).


# Plain ints: pyzmq's enum flags cost microseconds per `&` on the hot path. EVENTS is
# the opposite: getsockopt converts its argument to a SocketOption, which is cheapest
# when it already is one (an int costs an enum lookup per read, several per message).
_POLLIN, _POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)
_EVENTS = zmq.SocketOption.EVENTS
_DONTWAIT = int(zmq.DONTWAIT)
_SEND_MORE = int(zmq.DONTWAIT | zmq.SNDMORE)
_FAIRNESS_BUDGET = 16


class PeerUnreachable(ConnectionError):
    """A ROUTER socket has no connected peer with this routing id (ROUTER_MANDATORY)."""

    def __init__(self, routing_id: bytes) -> None:
        super().__init__(f"no connected peer with routing id {routing_id!r}")
        self.routing_id = routing_id


# ----------------------------------------------------------------------------------------
# Context and endpoints
# ----------------------------------------------------------------------------------------

_context: zmq.Context | None = None
_context_pid = 0


_EXIT_LINGER = 1.0  # seconds queued messages get to leave when the process exits


def get_context() -> zmq.Context:
    """This process's zmq Context, created on first use (never inherited across fork).

    At interpreter exit every socket still open is closed with a linger of
    ``_EXIT_LINGER`` and the context terminated, so messages queued just before the
    exit (a ring's last done ack, a final reply) still leave; pyzmq alone would drop
    them with the I/O thread.
    """
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        # A context inherited through fork() is unusable (its I/O threads did not
        # survive) and must not be terminated from here: drop it.
        _context = zmq.Context(io_threads=1)
        _context_pid = os.getpid()
        atexit.register(_flush_at_exit, _context, _context_pid)
    return _context


def _flush_at_exit(context: zmq.Context, pid: int) -> None:
    if pid != os.getpid() or context.closed:
        return
    # In a daemon thread with a deadline: a socket stuck in libzmq (a full monitor
    # pipe, say) must not turn exit into a hang.
    linger_ms = int(_EXIT_LINGER * 1000)
    flusher = threading.Thread(
        target=context.destroy, kwargs={"linger": linger_ms}, daemon=True, name="zmq-exit"
    )
    flusher.start()
    flusher.join(_EXIT_LINGER + 1.0)


_ipc_dir: str | None = None
_IPC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path minus the NUL


def ipc_directory() -> str:
    """A private (0700) directory for this process's ipc:// sockets, removed at exit.

    To give several processes a shared ipc namespace, create one with
    :func:`new_ipc_directory` in the parent and pass the path to the children's
    :func:`ipc_endpoint` calls.
    """
    global _ipc_dir
    if _ipc_dir is None or not os.path.isdir(_ipc_dir):
        _ipc_dir = new_ipc_directory()
        atexit.register(shutil.rmtree, _ipc_dir, ignore_errors=True)
    return _ipc_dir


_IPC_PREFIX = "zt-"
_IPC_OWNER = ".owner"  # "<pid> <start time in clock ticks>" of the creating process


def new_ipc_directory() -> str:
    """A fresh private (0700) ``zt-*`` directory under the temp dir, owned by this process.

    The caller removes it when done (``shutil.rmtree``). A process killed before it could
    do so leaves its directory behind: each call first removes the directories whose
    owner is dead (:func:`_sweep_ipc_directories`), and never hands out an existing one.
    """
    _sweep_ipc_directories()
    path = tempfile.mkdtemp(prefix=_IPC_PREFIX)  # mkdtemp creates it 0700, with a new name
    with open(os.path.join(path, _IPC_OWNER), "w") as f:
        f.write(f"{os.getpid()} {_start_time(os.getpid())}\n")
    return path


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot), or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count after the last ')'
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def _sweep_ipc_directories(root: str | None = None) -> list[str]:
    """Remove the ``zt-*`` directories under ``root`` (the temp dir) whose owner process
    is dead -- the pid gone, or reused by a process started at another time. A
    directory without a readable owner record (being created, or not ours) is left
    alone. Returns the removed paths."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    uid = os.getuid()
    for name in names:
        if not name.startswith(_IPC_PREFIX):
            continue
        path = os.path.join(root, name)
        try:
            if os.lstat(path).st_uid != uid:
                continue
            with open(os.path.join(path, _IPC_OWNER)) as f:
                pid_text, started = f.read().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if str(_start_time(pid)) == started:
            continue  # the owner is alive
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def ipc_endpoint(name: str, directory: str | None = None) -> str:
    """``ipc://<directory>/<name>``, in :func:`ipc_directory` unless one is given.

    ``directory`` must exist and should be 0700: anyone who can open the path can
    connect. Raises ValueError for a name outside ``[A-Za-z0-9._-]{1,64}`` or a path too
    long for a Unix socket.
    """
    if not _IPC_NAME.match(name):
        raise ValueError(f"ipc endpoint name must match [A-Za-z0-9._-]{{1,64}}, got {name!r}")
    path = os.path.join(directory or ipc_directory(), name)
    if len(path.encode()) > _SUN_PATH_MAX:
        raise ValueError(f"ipc path {path!r} is longer than {_SUN_PATH_MAX} bytes")
    return f"ipc://{path}"


# ----------------------------------------------------------------------------------------
# open_socket
# ----------------------------------------------------------------------------------------


def open_socket(
    kind: int | str,
    *,
    bind: str | Iterable[str] | None = None,
    connect: str | Iterable[str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
    **options: Any,
) -> TrioSocket:
    """Create a socket with :data:`DEFAULT_SOCKET_OPTIONS`, bind/connect it, wrap it.

    ``kind`` is a zmq socket type or its name ("PUSH", "ROUTER", ...). ``options`` are
    socket options by name, case-insensitive (``sndhwm=4``, ``routing_id=b"r1"``,
    ``subscribe=b""``); they are applied after the defaults, before bind/connect.
    ``limits`` bound :meth:`TrioSocket.recv_message`'s decoding.

    Raises ValueError for an unknown kind or option name; zmq.ZMQError if an endpoint
    cannot be bound or connected.
    """
    if isinstance(kind, str):
        socket_type = getattr(zmq.SocketType, kind.upper(), None)
        if socket_type is None:
            accepted = ", ".join(t.name for t in zmq.SocketType)
            raise ValueError(f"unknown socket kind {kind!r}; accepted: {accepted}")
    else:
        socket_type = zmq.SocketType(kind)
    binds = [bind] if isinstance(bind, str) else list(bind or ())
    connects = [connect] if isinstance(connect, str) else list(connect or ())

    settings: dict[str, Any] = dict(DEFAULT_SOCKET_OPTIONS)
    if connects:
        settings["IMMEDIATE"] = 1
    if socket_type == zmq.ROUTER:
        settings["ROUTER_MANDATORY"] = 1
    given = {name.upper(): value for name, value in options.items()}
    settings.update(given)
    keyring = tcp_keyring
    accepts = None
    if keyring is not None and any(e.startswith("tcp://") for e in binds + connects):
        settings.update(keyring.socket_options(binds, connects, given))
        accepts = keyring.accepts

    zsock = get_context().socket(socket_type)
    try:
        for name, value in settings.items():
            option = getattr(zmq.SocketOption, name, None)
            if option is None:
                raise ValueError(f"unknown socket option {name.lower()!r} = {value!r}")
            zsock.setsockopt(option, value)
        for endpoint in binds:
            zsock.bind(endpoint)
        for endpoint in connects:
            zsock.connect(endpoint)
    except BaseException:
        zsock.close(linger=0)
        raise
    return TrioSocket(zsock, limits=limits, accepts=accepts)


# The process's CURVE keyring (actors._admission.secure_tcp): when set, every socket that
# binds or connects a tcp:// endpoint is CURVE with it, and takes only messages that came
# on a connection of the keyring's run (Keyring.accepts).
tcp_keyring: Any = None


# ----------------------------------------------------------------------------------------
# TrioSocket
# ----------------------------------------------------------------------------------------


class TrioSocket:
    """A zmq socket usable from any number of trio tasks at once.

    Send and receive from as many tasks as you like: concurrent multipart sends never
    interleave, and a receive takes one whole message. ``close()`` makes every blocked
    and later call raise ``trio.ClosedResourceError``.

    ``zmq`` is the underlying ``zmq.Socket`` for options and bind/connect; do not call
    its blocking send/recv methods from trio.
    """

    def __init__(
        self,
        zsock: zmq.Socket,
        *,
        limits: Limits = DEFAULT_LIMITS,
        accepts: Callable[[zmq.Frame], bool] | None = None,
    ) -> None:
        self.zmq = zsock
        self.limits = limits
        # A received message for which accepts(its first frame) is false is dropped
        # before any caller sees it, and counted (a tcp connection of another run).
        self.accepts = accepts
        self.refused = 0
        self._fd = zsock.FD
        self._router = zsock.type == zmq.ROUTER
        self._closed = False
        self._watcher: trio.lowlevel.Task | None = None  # the one task in wait_readable
        self._parked = trio.Event()  # every other waiter
        self._parked_count = 0
        self._wanted = {_POLLIN: 0, _POLLOUT: 0}  # waiters per flag
        self._watch_flag = 0  # the flag the watcher waits for
        self._streak = 0  # operations since the last yield (see fair_checkpoint)
        self._send_lock = trio.StrictFIFOLock()  # senders queue in order; no interleaving

    # -- the public face -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def last_endpoint(self) -> str:
        """The endpoint of the last bind, with a wildcard port resolved."""
        return self.zmq.get(zmq.LAST_ENDPOINT).decode()

    def has_input(self) -> bool:
        """Whether a receive would succeed now, without waiting.

        Use this, never ``zmq.getsockopt(zmq.EVENTS)`` on :attr:`zmq`, while another task
        may be blocked in a receive: reading EVENTS consumes the edge of ZMQ_FD that the
        blocked task sleeps on, and only this method then wakes it (test: "has_input
        does not strand a blocked receiver"). False once closed.
        """
        return not self._closed and bool(self._poll() & _POLLIN)

    async def send_multipart(
        self, frames: Sequence[Any], copy: bool = False, track: bool = False
    ) -> zmq.MessageTracker | None:
        """Send one multipart message, waiting (without spinning) while the HWM is hit.

        With ``copy=False`` (the default) the frames' buffers go to libzmq as they are:
        do not mutate them until released. ``track=True`` returns a MessageTracker for
        :func:`wait_released`. On a ROUTER the first frame is the routing id; an unknown
        one raises :class:`PeerUnreachable`. Cancelling before the first frame is queued
        sends nothing; once queued, the rest of the message follows regardless.
        """
        if not frames:
            raise ValueError("a message needs at least one frame")
        await trio.lowlevel.checkpoint_if_cancelled()
        await self.fair_checkpoint()  # before, not after: see fair_checkpoint
        # The lock keeps concurrent messages from interleaving. It is taken only by a
        # sender about to wait: one that finishes without yielding cannot be interleaved,
        # and a free lock has no queue (trio hands a released lock to its next waiter).
        lock = self._send_lock
        held = lock.locked()  # a half-sent message is ahead of us
        if held:
            await lock.acquire()
        try:
            trackers = []
            last = len(frames) - 1
            index = 0
            backoff = 0.0
            while index <= last:
                self._check_open()
                try:
                    result = self.zmq.send(
                        frames[index],
                        _SEND_MORE if index < last else _DONTWAIT,
                        copy=copy,
                        track=track,
                    )
                except zmq.Again:
                    if not held:
                        lock.acquire_nowait()  # free: nothing has yielded since the check
                        held = True
                    if index > 0:
                        # libzmq checks the HWM only at a message's first frame, so this
                        # is not expected; if it happens, finish the message regardless,
                        # or the next message would be glued onto this one.
                        with trio.CancelScope(shield=True):
                            await self._wait(_POLLOUT)
                    elif await self._wait(_POLLOUT):
                        backoff = 0.0
                    else:
                        # POLLOUT was already set yet the send failed: a ROUTER with
                        # ROUTER_MANDATORY reports POLLOUT if *any* peer has room.
                        backoff = min(max(backoff * 2, 0.0005), 0.05)
                        await trio.sleep(backoff)
                    continue
                except zmq.ZMQError as exc:
                    if exc.errno == errno.EHOSTUNREACH and self._router:
                        raise PeerUnreachable(bytes(frames[0])) from None
                    raise
                if track and result is not None:
                    trackers.append(result)
                index += 1
        finally:
            if held:
                lock.release()
        self._after_io()
        return zmq.MessageTracker(*trackers) if track else None

    def try_send_multipart(self, frames: Sequence[Any], copy: bool = False) -> bool:
        """Send one multipart message now if the socket takes it without waiting; False
        (nothing sent) when it would have to wait: the HWM is hit, or another task is
        in the middle of a send. For callers that must not block (a reply sent from
        the replying task). Buffers as in send_multipart(copy=False)."""
        if not frames:
            raise ValueError("a message needs at least one frame")
        self._check_open()
        if self._send_lock.locked():
            return False
        last = len(frames) - 1
        send = self.zmq.send
        try:
            send(frames[0], _SEND_MORE if last else _DONTWAIT, copy=copy)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH and self._router:
                raise PeerUnreachable(bytes(frames[0])) from None
            raise
        for index in range(1, last + 1):
            flags = _SEND_MORE if index < last else _DONTWAIT
            try:
                send(frames[index], flags, copy=copy)
            except zmq.Again:
                # libzmq checks the HWM only at a message's first frame, so not expected;
                # the rest must follow regardless, or the next message would be glued on
                send(frames[index], flags & ~_DONTWAIT, copy=copy)
        self._after_io()
        return True

    async def recv_multipart(self, copy: bool = False) -> list:
        """Receive one whole multipart message (``zmq.Frame`` objects unless copy=True)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        await self.fair_checkpoint()  # before, not after: see fair_checkpoint
        ready = False
        while True:
            self._check_open()
            # Reading EVENTS first is cheaper than provoking zmq.Again (an exception).
            # After a wait the receive is tried at once: the FD woke us, so a message
            # is almost always there (zmq.Again, rarely, sends us back to EVENTS).
            if ready or self._poll() & _POLLIN:
                try:
                    frames = self._recv_all(copy)
                except zmq.Again:  # another thread took it (not ours to prevent)
                    ready = False
                    continue
                self._after_io()
                if self.accepts is not None and not self.accepts(frames[0]):
                    self.refused += 1
                    ready = False
                    await self.fair_checkpoint()  # a flood of them must not starve trio
                    continue
                return frames
            ready = True
            await self._wait(_POLLIN, polled=True, confirm=False)

    def _recv_all(self, copy: bool) -> list:
        # zmq.Socket.recv_multipart reads RCVMORE with a getsockopt per frame; a Frame
        # knows whether more follow. The rest of a multipart is always there at once.
        if copy and self.accepts is None:
            return self.zmq.recv_multipart(_DONTWAIT, copy=True)
        recv = self.zmq.recv
        frame = recv(_DONTWAIT, copy=False)
        frames = [frame]
        while frame.more:
            frame = recv(_DONTWAIT, copy=False)
            frames.append(frame)
        if copy:  # (with accepts: it reads the first frame's properties, then bytes)
            if self.accepts is not None and not self.accepts(frames[0]):
                return [frames[0]]  # refused by recv_multipart: never copied
            return [f.bytes for f in frames]
        return frames

    async def send_message(
        self, msg: Message, routing_id: bytes | None = None, *, track: bool = False
    ) -> zmq.MessageTracker | None:
        """Encode and send ``msg``; on a ROUTER ``routing_id`` names the peer.

        Tensors go zero-copy: see the in-flight rule in the module doc and ``track``.
        """
        frames = encode(msg)
        if self._router:
            if routing_id is None:
                raise ValueError("a ROUTER socket needs the routing_id of the peer")
            frames.insert(0, routing_id)
        elif routing_id is not None:
            raise ValueError("routing_id is only meaningful on a ROUTER socket")
        return await self.send_multipart(frames, copy=False, track=track)

    async def recv_message(self) -> tuple[bytes | None, Message]:
        """Receive and decode one message: ``(routing_id, message)``.

        ``routing_id`` is the sender's id on a ROUTER socket, else None. A malformed
        message raises :class:`FrameError` (with ``routing_id`` set) and is dropped;
        the socket stays usable, and the caller decides whether to answer.
        """
        routing_id, _, msg = await self.recv_message_from()
        return routing_id, msg

    async def recv_message_from(self) -> tuple[bytes | None, str | None, Message]:
        """:meth:`recv_message` with the connection's CURVE "User-Id" (the peer's z85
        public key, as the ZAP handler admitted it) on a socket the process's keyring
        secures, else None: ``(routing_id, user_id, message)``. A FrameError carries
        ``user_id`` too."""
        frames = await self.recv_multipart(copy=False)
        user_id = None
        if self.accepts is not None:  # (a property read costs: only where it matters)
            try:
                user_id = frames[0].get("User-Id") or None
            except zmq.ZMQError:  # no ZAP handler admitted this connection
                pass
        routing_id = None
        if self._router:
            routing_id = frames.pop(0).bytes
        # The header as bytes: cheaper for decode than a view of the zmq.Frame (only
        # tensors need to stay zero-copy). A header over the limit is left for decode.
        if frames and len(frames[0]) <= self.limits.max_header_bytes:
            frames[0] = frames[0].bytes
        try:
            return routing_id, user_id, decode(frames, self.limits)
        except FrameError as exc:
            exc.routing_id = routing_id
            exc.user_id = user_id
            raise

    def close(self, linger: int | None = None) -> None:
        """Close now; blocked and later calls raise ClosedResourceError. Idempotent.

        ``linger`` (ms) bounds how long libzmq keeps trying to deliver queued messages;
        None keeps the socket's LINGER option.
        """
        if self._closed:
            return
        self._closed = True
        try:
            trio.lowlevel.notify_closing(self._fd)
        except RuntimeError:
            pass  # outside trio.run: nobody can be waiting
        self._wake_parked()
        self.zmq.close(linger=linger)

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def __enter__(self) -> TrioSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> TrioSocket:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<TrioSocket {zmq.SocketType(self.zmq.type).name} {state}>"

    # -- waiting (see the design note) ---------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("socket was closed")

    async def fair_checkpoint(self) -> None:
        """Yield to the scheduler every _FAIRNESS_BUDGET calls, not on every one: what
        an operation that does not have to wait does (a full trio checkpoint costs about
        as much as a small send; the HWM bounds how long a sender goes without waiting).
        For a loop around :meth:`try_send_multipart`, which never yields.

        send and receive take this turn *before* they act, never after: a received
        message or a sent one is the caller's at once, with no schedule point between
        the socket and the caller's own bookkeeping (a collective's watcher once saw a
        done ack taken off the socket but not yet recorded, and failed a finished run)."""
        self._streak += 1
        if self._streak >= _FAIRNESS_BUDGET:
            self._streak = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _wait(self, flag: int, *, polled: bool = False, confirm: bool = True) -> bool:
        """Wait until ``flag`` is set in ZMQ_EVENTS. Returns whether it had to sleep.

        ``polled``: the caller has just read EVENTS (with _poll) and saw no ``flag``.
        ``confirm=False``: a watcher woken by the FD returns without reading EVENTS
        again (a receive after a wake, which retries on zmq.Again). Reading EVENTS costs
        a poll(2) inside libzmq: about a tenth of a small message's receive path.
        """
        slept = False
        self._wanted[flag] += 1
        try:
            while True:
                self._check_open()
                if polled:
                    polled = False
                elif self._poll() & flag:
                    return slept
                slept = True
                self._streak = 0
                if self._watcher is None:
                    self._watcher = trio.lowlevel.current_task()
                    self._watch_flag = flag
                    try:
                        await trio.lowlevel.wait_readable(self._fd)
                    except trio.ClosedResourceError:
                        if self._closed:
                            raise
                        # Otherwise _poll woke us with notify_closing (see _poll).
                    finally:
                        self._watcher = None
                        if self._parked_count:
                            self._wake_parked()  # someone else must take over the watch
                    if not confirm:
                        return True
                else:
                    self._parked_count += 1
                    try:
                        await self._parked.wait()
                    finally:
                        self._parked_count -= 1
        finally:
            self._wanted[flag] -= 1

    def _poll(self) -> int:
        """Read ZMQ_EVENTS and wake every waiter whose flag is set."""
        events = self.zmq.getsockopt(_EVENTS)
        if (events & _POLLIN and self._wanted[_POLLIN]) or (
            events & _POLLOUT and self._wanted[_POLLOUT]
        ):
            if self._parked_count:
                self._wake_parked()
            if (
                events & self._watch_flag
                and self._watcher is not None
                and self._watcher is not trio.lowlevel.current_task()
            ):
                # The watcher sleeps in wait_readable on an edge this call may have
                # consumed. notify_closing is trio's only public way to wake a task out
                # of wait_readable; it does not close anything, it raises
                # ClosedResourceError in the watcher, which _wait treats as a wake-up
                # while the socket is open. It costs two epoll_ctl calls, only here,
                # where a CancelScope around every wait would cost on every wait
                # (test: "a receiver blocked on a socket wakes when a send on it...").
                trio.lowlevel.notify_closing(self._fd)
        return events

    def _after_io(self) -> None:
        if self._wanted[_POLLIN] or self._wanted[_POLLOUT]:
            self._poll()

    def _wake_parked(self) -> None:
        self._parked.set()
        self._parked = trio.Event()


async def wait_released(tracker: zmq.MessageTracker | None, timeout: float = 60.0) -> None:
    """Wait until libzmq has released every buffer of a tracked send.

    libzmq signals release on a pyzmq thread, with no fd to wait on, so this sleeps in
    growing steps (50 us to 5 ms) rather than spinning. Raises TimeoutError after
    ``timeout`` seconds (a peer that never reads keeps the buffers forever).
    """
    if tracker is None:
        return
    delay = 50e-6
    released = False
    with trio.move_on_after(timeout):
        while not tracker.done:
            await trio.sleep(delay)
            delay = min(delay * 2, 5e-3)
        released = True
    if not released:
        raise TimeoutError(f"libzmq still holds the buffers of a tracked send after {timeout} s")
    await trio.lowlevel.checkpoint()
