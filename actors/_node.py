"""Nodes: one per process, so that actors in different processes can reach each other.

Design note
-----------
A process that talks to others opens one node (:func:`open_node`). The node binds a
ROUTER *inbox* at its endpoint and opens one DEALER per peer it talks to, with
``ROUTING_ID`` = its own node name. Everything a node sends goes out through a DEALER
to the peer's ROUTER; everything it receives comes in on its own ROUTER. So one reader
task sees all inbound traffic, and replies travel exactly like requests.

Every frame is an ``actors._frames.Message``: ``type``, ``sender`` (node name),
``generation`` (the sending node's boot id), ``seq`` (request id), a msgpack ``body``
and raw tensor frames. Values inside bodies follow ``actors._wire`` -- no pickle.

=========== ====================================== ==================================
type        body (+ tensors)                       answer
=========== ====================================== ==================================
hb          endpoint, names (registered)           none: liveness, every interval
call        to, request, timeout (+ tensors)       reply with the same seq
stop        to, reason, timeout                    reply once the actor has exited
stats       to                                     reply (an ActorStats record)
reply       ok, value (+ tensors) | ok, kind, why  --
cast, send  to, msg (+ tensors)                    none
busy        to                                     none: hold messages for ``to``
ready       to                                     none: ``to`` takes messages again
monitor     to, ref                                watching now; down when ``to`` exits
link        to, ref, sender                        (noproc: down at once)
watching    ref                                    --
exit        ref, reason                            none: the linked remote actor died
demonitor   ref                                    none (also undoes a link)
down        ref, reason                            --
error       reason                                 none: "your message was rejected"
held        reason                                 none: "your name is held by a live peer"
=========== ====================================== ==================================

Endpoints. A peer listens where ``peers`` says, else in the ipc directory, and every
``hb`` names its endpoint. A peer that contacted this node and is neither configured nor
in the directory now (a tcp caller heard before its first ``hb``) has no endpoint yet:
what it is owed waits for that ``hb`` (bounded like any waiting send).

Liveness. Each node sends ``hb`` to each of its peers every ``heartbeat_interval`` from
its trio loop -- a process whose loop is blocked or stopped falls silent. A peer not
heard from within ``heartbeat_timeout`` (since its last message, or since we first
tried to reach it) is *down*: calls waiting on it fail with ``ActorExited(reason=
"noconnection")`` and monitors on its actors deliver ``Down(reason="noconnection")``.
Detection takes at most ``heartbeat_timeout + heartbeat_interval / 2``. Any later
message brings the peer back up; a new ``generation`` means a restarted process, and
everything tied to the old one is down. A monitor or link request is acknowledged
(``watching``) by the incarnation that took it; one not acknowledged within
``heartbeat_timeout`` was lost with its peer and fires ``noconnection`` -- otherwise a
process killed before answering, and restarted, would leave the watcher waiting for a
``down`` that no one owes it. While the reader itself is paused (the last-resort
bounds under "Back-pressure") it cannot hear anyone, so it judges no one, and deadlines
restart when it resumes.

Duplicates. A peer named *exclusive* (:meth:`Node.exclusive`: a node agent, one process
per name) is held by its incarnation while that one is up: a message under its name from
another generation is then no restart but a second process with the same name. It is
refused (counted, ``statistics()["refused_duplicate"]``) before it touches the peer --
no retirement, no new endpoint -- and the newcomer is told, once it has said where it
listens (its ``hb``), with a ``held`` message naming the holder (at most once per
heartbeat interval), sent from a socket of its own, since the peer's socket leads to the
holder. The newcomer's node fails its
calls to the teller with ``ActorExited(reason="held: ...")`` and keeps the reason
(:meth:`Node.held_by`). Once the holder is down (silent past ``heartbeat_timeout``) a
new generation is a restart again, as for any peer.

Delivery across a restart. A message still queued in ZeroMQ when its peer dies is
handed to the peer's restarted incarnation when ZeroMQ reconnects (same name, same
endpoint). So every message carries ``at`` in its body: the generation of the peer
as the sender last heard it. A node drops (and counts, ``statistics()["stale"]``) a
request or bookkeeping message addressed to another generation -- its predecessor's
mail: calls, stops, monitors, links, replies, downs. The sender learns of the restart
from the successor's first message, which retires the old incarnation: its pending
calls fail with ``noconnection`` and its monitors fire. So a call is run at most once,
by the incarnation it was sent to, as in OTP, where a node's restart (a new
"creation") cuts the mail meant for the old one. Casts and sends are the exception:
like mail to a registered name they go to whichever incarnation holds the name when
they arrive (the training roles cast state to a rank they know was restarted, before
its node has spoken to theirs; ``hb`` too, which only says the sender is alive). One
gap remains: a request sent before this node ever heard the peer carries no ``at``
and is served by whichever incarnation gets it (a monitor then watches the new one).
Protocols that must not act twice tag their messages, as the training roles do with
(generation, step).

Back-pressure. The reader never waits for one actor: a call or cast for an actor whose
mailbox is full joins that actor's *overflow*, a queue that a task of its own empties
into the mailbox as room appears (arrival order is kept: while an overflow exists,
everything for that actor goes behind it). Each message that joins it is answered with
``busy``; the sender then holds its calls and casts to that actor until ``ready``, sent
once the overflow has drained, or until ``heartbeat_timeout`` has passed since the last
``busy`` (so a lost ``ready`` costs a pause, not a hang). So a slow actor slows only its
own senders: replies, heartbeats and mail for other actors keep flowing. (When the
reader waited for the full mailbox instead, an actor that called out while flooded with
casts waited for its reply behind the flood: test_a_slow_actor_that_calls_out_under_a_
flood_of_casts_is_not_deadlocked.) An overflow holds what senders sent before ``busy``
reached them: at most their outbox and ZeroMQ's pipes each. Two bounds of last resort
pause the whole reader: an overflow past ``_OVERFLOW_MAX`` messages or
``_OVERFLOW_MAX_BYTES`` of tensors (a sender ignoring ``busy``), and ``max_inflight``
requests served in tasks of their own at once (stops, and calls for an actor that is
not there or has just exited).

Admission. A message's sender must be its connection's routing id (``name@boot id>peer``
as this module's DEALERs set it, so that a second process with a peer's name never takes
over the first one's pipe by ROUTER_HANDOVER; ``name@boot id`` and a bare ``name`` are
accepted too). A DEALER keeps reconnecting to a peer's endpoint until the peer is
forgotten; when a new node binds the endpoint of one that ended (a control tool's
ephemeral tcp port, reused), the old connection reaches the new node under an id that
names the old peer: its messages are dropped and counted (``misaddressed``), and the
new node's own connection from that sender, under another id, is not handed over to
it. With a run token the
ROUTER admits, at the handshake, only peers holding it (``actors._admission``). Under the
process's CURVE keyring (tcp://, ``actors.secure_tcp``) the ROUTER admits the run's
hosts' keys, the DEALERs set no routing id, and a message's sender must be a node of
the host its connection's key names (``Keyring.speaks_for``); messages of another run
never reach the reader. Either way a message that may not speak for its sender is
refused: no answer, no state, only counts.

Untrusted input. ``recv_message`` bounds and validates frames (``actors._frames``);
this module validates bodies. A rejected message is logged with its reason, counted
(``statistics()["rejected"]``), and answered -- with an error ``reply`` when it carried a
request id, else with an ``error`` message when the sender can be reached. It never
crashes the node or any actor.

The cost of a remote call. The caller encodes and sends on the peer's DEALER itself and
parks on a ``ReplySlot``. The peer's reader receives and decodes it and puts it in the
actor's mailbox. The actor replies from its own task, straight onto its DEALER. Our
reader then hands the reply to the caller. So a round trip has two task hand-offs (reader
-> actor, reader -> caller) on top of what the trio wrapper and the codec cost
(``bench_transport`` prints each layer's ratio to raw pyzmq). The hand-offs stay, and
leader/followers (the waiting task reads the socket itself) is not used, because an idle
actor would then wait on its mailbox and the socket at once, and trio can wake a task
out of ``wait_readable`` only by ``notify_closing``: that would tax every local message
to that actor, for a gain bounded at about a tenth of a call.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
import zmq

from . import _admission, _registry
from ._actor import (
    ActorRef,
    Down,
    From,
    MonitorRef,
    _Call,
    _Cast,
    _check_timeout,
    _ExitSignal,
    _Info,
)
from ._errors import (
    ActorExited,
    CallTimeout,
    NoSuchActor,
    RemoteError,
    format_reason,
    is_normal_exit,
)
from ._frames import FrameError, Message, encode
from ._mailbox import MailboxClosed, MailboxFull
from ._registry import Address, check_name
from ._reply import ReplySlot
from ._transport import TrioSocket, ipc_directory, ipc_endpoint, open_socket
from ._wire import WireError, from_wire, to_wire

__all__ = ["Node", "PeerInfo", "open_node"]

log = logging.getLogger("zerotrain.actors.node")

_MAX_NAMES = 256  # registered names advertised per heartbeat
_FORGET_AFTER = 30  # a peer down for this many heartbeat timeouts is forgotten
_OUTBOX = 64  # messages queued per peer before senders wait (bounded, like mailboxes)
_OVERFLOW_MAX = 1024  # messages waiting for one full mailbox before the reader waits too
_OVERFLOW_MAX_BYTES = 256 << 20  # ... or tensor bytes (4 frames of MAXMSGSIZE)
_MAX_PEERS = 64  # peers that contacted this node (module doc, "Untrusted input")
# Messages per peer waiting in helper tasks for room in its outbox, each at most
# send_timeout: a bound on what a peer that stops reading costs, far above what a slow
# but live peer makes wait (a reply dropped here leaves its caller to time out).
_MAX_LATER = 1024


class _Rejected(Exception):
    """A message that decoded but makes no sense; ``reason`` goes back to the sender."""


class _Refused(Exception):
    """A message this node will not even answer (module doc, "Untrusted input")."""


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """What a node knows about one peer (``node.peer_info(name)``)."""

    name: str
    alive: bool | None  # None: never heard from
    generation: int | None
    names: tuple[str, ...]  # actors registered there, as of its last heartbeat
    endpoint: str | None


@dataclasses.dataclass(eq=False)
class _Peer:
    name: str
    endpoint: str | None
    last_seen: float
    socket: TrioSocket | None = None
    generation: int | None = None
    alive: bool | None = None
    names: tuple[str, ...] = ()
    retired: collections.deque[int] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=8)
    )
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    outbox: trio.MemorySendChannel = dataclasses.field(init=False)
    inbox_of_outbox: trio.MemoryReceiveChannel = dataclasses.field(init=False)
    changed: trio.lowlevel.ParkingLot = dataclasses.field(default_factory=trio.lowlevel.ParkingLot)
    queued: int = 0  # messages in the outbox or being sent (see Node._send)
    later: int = 0  # messages waiting in send_later tasks (see Node._send_soon)

    def __post_init__(self) -> None:
        self.outbox, self.inbox_of_outbox = trio.open_memory_channel(_OUTBOX)

    def info(self) -> PeerInfo:
        return PeerInfo(self.name, self.alive, self.generation, self.names, self.endpoint)


@dataclasses.dataclass(eq=False)
class _Outgoing:
    """A monitor or link this node holds on an actor of another node."""

    peer: str
    target: Address
    kind: str  # "monitor": sink gets Down; "link": sink gets an exit signal
    sink: ActorRef
    sent_at: float
    link_end: Any = None
    generation: int | None = None  # the incarnation that acknowledged it ("watching")


@dataclasses.dataclass(eq=False)
class _Pending:
    """A call (or stop / stats request) sent to a peer, awaiting its reply."""

    slot: ReplySlot
    peer: str
    target: str
    what: Any  # the request, as a CallTimeout names it
    timeout: float | None
    sending: trio.CancelScope | None = None  # while the caller waits to send

    def fail(self, error: Exception) -> None:
        self.slot.deliver(False, error)
        if self.sending is not None:
            self.sending.cancel()  # the caller may be stuck sending to a dead peer


class _Overflow:
    """Mail for one local actor whose mailbox was full, in arrival order (module doc,
    "Back-pressure"); its drainer task moves it into the mailbox."""

    __slots__ = ("name", "items", "nbytes", "senders", "room")

    def __init__(self, name: str) -> None:
        self.name = name  # as the senders addressed the actor
        self.items: collections.deque[tuple[Any, int]] = collections.deque()  # (mail, bytes)
        self.nbytes = 0  # tensor bytes held
        self.senders: set[str] = set()  # peers told busy: each gets ready at the end
        self.room = trio.lowlevel.ParkingLot()  # the reader, past a bound

    def over_bound(self) -> bool:
        return len(self.items) > _OVERFLOW_MAX or self.nbytes > _OVERFLOW_MAX_BYTES


@dataclasses.dataclass
class _Gate:
    """A remote actor said busy: calls and casts to it wait until ``opened``."""

    opened: trio.Event
    expires: float


class _RemoteWatcher:
    """Stands, in the target's node, for a watcher (or linked actor) on another node:
    the local target's exit is forwarded as a ``down`` message."""

    def __init__(self, node: Node, peer: str, ref: MonitorRef, label: str) -> None:
        self.node, self.peer, self.ref, self.label = node, peer, ref, label

    def _deliver_signal(self, item: Any) -> None:  # Down (monitor) or _ExitSignal (link)
        if self.node._served.pop((self.peer, self.ref), None) is not None:
            body = {"ref": _ref_to_wire(self.ref), "reason": _reason_to_wire(item.reason)}
            self.node._send_soon(self.peer, "down", body)


class _RemoteLinkEnd:
    """Sits in a local actor's links: when that actor exits, tell the remote end."""

    def __init__(self, node: Node, target: Address, ref: MonitorRef) -> None:
        self.node, self.target, self.ref = node, target, ref

    def _deliver_signal(self, item: _ExitSignal) -> None:
        if self.node._out.pop(self.ref, None) is not None:
            body = {"ref": _ref_to_wire(self.ref), "reason": _reason_to_wire(item.reason)}
            self.node._send_soon(self.target.node, "exit", body)


class Node:
    """This process's node. Open it with :func:`open_node`; do not construct it."""

    def __init__(
        self,
        name: str,
        *,
        endpoint: str,
        directory: str | None,
        peers: dict[str, str],
        heartbeat_interval: float,
        heartbeat_timeout: float,
        send_timeout: float,
        max_inflight: int,
        token: bytes | None = None,
    ) -> None:
        self.name = check_name(name, "node name")
        self.token = token
        self.endpoint = endpoint
        self.directory = directory
        self.generation = int.from_bytes(os.urandom(7), "big")  # boot id
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.send_timeout = send_timeout
        self._configured = dict(peers)
        self._peers: dict[str, _Peer] = {}
        self._seq = itertools.count(1)
        self._pending: dict[int, _Pending] = {}  # seq -> a request awaiting its reply
        self._out: dict[MonitorRef, _Outgoing] = {}
        self._served: dict[tuple[str, MonitorRef], tuple[ActorRef, _RemoteWatcher]] = {}
        self._inflight = trio.Semaphore(max_inflight)
        self._paused = False
        self._woke_a_waiter = False  # the message just dispatched woke a parked task
        self._overflows: dict[ActorRef, _Overflow] = {}
        self._gates: dict[tuple[str, str], _Gate] = {}  # (peer, actor name) said busy
        self._stats = dict.fromkeys(
            (
                "received",
                "sent",
                "rejected",
                "dropped",
                "stale",
                "misaddressed",
                "overflowed",
                "held",
                "refused",
                "refused_handshake",
                "refused_sender",
                "refused_duplicate",
            ),
            0,
        )
        self._nursery: trio.Nursery | None = None
        self._router: TrioSocket | None = None
        self._refusals: TrioSocket | None = None  # the router's failed handshakes
        self._domain: _admission.Admission | None = None
        self._keyring: _admission.Keyring | None = None  # set when the inbox is CURVE
        self._label = f"[node {name}]"
        self._exclusive: set[str] = set()
        self._told: dict[str, tuple[int, float]] = {}  # exclusive name -> a newcomer told
        self._held_by: str | None = None  # why this node's name is held elsewhere

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.endpoint!r})"

    # =================================================================================
    # Public
    # =================================================================================

    def statistics(self) -> dict[str, int]:
        """Counters: messages received / sent / rejected / dropped / stale (for a
        previous incarnation), overflowed (waited for room in a full mailbox), held
        (calls and casts this node held because their target said busy), refused
        (connections that failed the handshake -- no token or key, or the wrong one --,
        messages whose header named another sender than their connection may speak
        for, messages of another run, and messages from a new peer while the peer table
        was full), with three of its parts: refused_handshake, refused_sender and
        refused_run; refused_duplicate (messages from a second process under the name
        of a live exclusive peer: module doc, "Duplicates"); and peers."""
        other_run = self._router.refused if self._router is not None else 0
        stats = {**self._stats, "refused_run": other_run, "peers": len(self._peers)}
        stats["refused"] += other_run
        return stats

    def peer_info(self, name: str) -> PeerInfo | None:
        peer = self._peers.get(name)
        return None if peer is None else peer.info()

    def exclusive(self, *names: str) -> None:
        """Peers ``names`` are one process each (node agents): while one's incarnation
        is up, a message under its name from another generation is a duplicate, refused
        and told so, not a restart (module doc, "Duplicates")."""
        self._exclusive.update(check_name(n, "node name") for n in names)

    def held_by(self) -> str | None:
        """What a peer said when it refused this node as a second process with the name
        of a live one (a ``held`` message), or None."""
        return self._held_by

    def connect(self, name: str, endpoint: str | None = None) -> None:
        """Start talking to (and heart-beating) node ``name`` now rather than on first use."""
        self._peer(name, endpoint)

    async def wait_peer(
        self,
        name: str,
        *,
        alive: bool = True,
        newer_than: int | None = None,
        names: tuple[str, ...] = (),
    ) -> PeerInfo:
        """Wait until peer ``name`` is up (``alive=True``; optionally with a generation
        other than ``newer_than`` and with ``names`` registered) or down (``alive=False``).
        Wrap it in a timeout."""

        def ok(peer: _Peer) -> bool:
            if not alive:
                return peer.alive is False
            return (
                bool(peer.alive)
                and (newer_than is None or peer.generation != newer_than)
                and set(names) <= set(peer.names)
            )

        while not ok(peer := self._peer(name)):  # (re-fetched: a peer may be forgotten)
            await peer.changed.park()
        return peer.info()

    # =================================================================================
    # Client side (called by actors._actor for "name@node" targets)
    # =================================================================================

    async def _call(self, target: Address, request: Any, timeout: float | None) -> Any:
        data, tensors = to_wire(request)  # WireError: the caller's mistake, raised here
        body = {"to": target.name, "request": data, "timeout": timeout}
        return await self._request(target, "call", body, tensors, timeout, request)

    async def _stop(self, target: Address, reason: Any, timeout: float | None) -> None:
        if not isinstance(reason, str):
            raise TypeError(f"a remote stop reason must be a string, got {reason!r}")
        body = {"to": target.name, "reason": reason, "timeout": timeout}
        await self._request(target, "stop", body, [], timeout, f"stop({reason!r})")

    async def _statistics(self, target: Address, timeout: float | None) -> Any:
        return await self._request(target, "stats", {"to": target.name}, [], timeout, "stats")

    async def _request(
        self, target: Address, kind: str, body: dict, tensors: list, timeout, what: Any
    ) -> Any:
        peer = self._peer(target.node)
        seq = next(self._seq)
        slot = ReplySlot(timeout)
        pending = self._pending[seq] = _Pending(slot, peer.name, str(target), what, timeout)
        try:
            if peer.alive is False:
                raise ActorExited(str(target), "noconnection", "before the call was sent")
            await trio.lowlevel.checkpoint_if_cancelled()
            # Sent at once, or else by the slow path: it waits for a busy actor's ready and
            # for room. Timeout 0 takes it too, and its passed deadline sends nothing.
            now = timeout != 0 and self._send_now(peer, kind, body, tensors, seq)
            if not now:
                with trio.move_on_at(slot.deadline) as pending.sending:
                    if kind == "call":
                        await self._while_busy(peer, target.name)
                    await self._send(peer, kind, body, tensors, seq=seq)
                if pending.sending.cancelled_caught and not slot.done:
                    raise trio.TooSlowError
                pending.sending = None
            ok, value = await slot.wait()
        except trio.TooSlowError:
            raise CallTimeout(str(target), what, timeout) from None
        finally:
            if self._pending.pop(seq, None) is not None:
                slot.abandon()  # a reply arriving now is dropped
        if ok:
            return value
        raise value

    async def _fire(self, target: Address, msg: Any, kind: str) -> None:
        data, tensors = to_wire(msg)
        peer = self._peer(target.node)
        body = {"to": target.name, "msg": data}
        if peer.alive is not False:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._send_now(peer, kind, body, tensors, 0):  # (no cancel scope: see _reply)
                await peer.socket.fair_checkpoint()
                return
        with trio.move_on_after(0 if peer.alive is False else self.send_timeout):
            try:
                await self._while_busy(peer, target.name)
                await self._send(peer, kind, body, tensors)
                return
            except ActorExited:
                pass
        self._stats["dropped"] += 1
        log.warning("%s dropped a %s to %s: not sent in time", self._label, kind, target)

    def _send_now(self, peer: _Peer, kind: str, body: dict, tensors: list, seq: int) -> bool:
        """Send a request or cast at once if nothing has to wait: no busy gate for its
        actor, nothing queued for ``peer``, room on its socket. False: nothing was sent."""
        if (peer.name, body["to"]) in self._gates or peer.socket is None:
            return False
        return self._send_at_once(peer, self._frames(peer, kind, body, tensors, seq))

    def _send_at_once(self, peer: _Peer, frames: list) -> bool:
        """Put ``frames`` on ``peer``'s socket now if nothing is queued ahead of them and
        the socket takes them without waiting; False: not sent."""
        if peer.queued or peer.socket is None:
            return False
        try:
            if not peer.socket.try_send_multipart(frames):
                return False
        except trio.ClosedResourceError:  # reconnected meanwhile: the slow path (or the
            return False  # outbox's writer) sends it on the new socket
        self._stats["sent"] += 1
        return True

    async def _while_busy(self, peer: _Peer, name: str) -> None:
        """Wait while actor ``name`` on ``peer`` has said busy: until its ready, or until
        the gate expires (a lost ready), whichever comes first."""
        gate = self._gates.get((peer.name, name))
        if gate is None:
            return
        self._stats["held"] += 1
        while not gate.opened.is_set() and trio.current_time() < gate.expires:
            with trio.move_on_at(gate.expires):  # (a busy meanwhile moves expires on)
                await gate.opened.wait()
        if self._gates.get((peer.name, name)) is gate:
            del self._gates[(peer.name, name)]

    def _open_gates(self, peer_name: str) -> None:
        for key in [key for key in self._gates if key[0] == peer_name]:
            self._gates.pop(key).opened.set()

    def _monitor(self, target: Address, ref: MonitorRef, watcher: ActorRef) -> None:
        self._out[ref] = _Outgoing(target.node, target, "monitor", watcher, trio.current_time())
        self._send_soon(target.node, "monitor", {"to": target.name, "ref": _ref_to_wire(ref)})

    def _link(self, target: Address, me: ActorRef) -> None:
        ref = MonitorRef(next(_link_ids), self.name)
        end = _RemoteLinkEnd(self, target, ref)
        self._out[ref] = _Outgoing(target.node, target, "link", me, trio.current_time(), end)
        me._links.add(end)
        body = {"to": target.name, "ref": _ref_to_wire(ref), "sender": me.label}
        self._send_soon(target.node, "link", body)

    def _unlink(self, target: Address, me: ActorRef) -> None:
        for ref, out in list(self._out.items()):
            if out.kind == "link" and out.target == target and out.sink is me:
                del self._out[ref]
                me._links.discard(out.link_end)
                self._send_soon(out.peer, "demonitor", {"ref": _ref_to_wire(ref)})

    def _demonitor(self, ref: MonitorRef) -> None:
        out = self._out.pop(ref, None)
        if out is not None:
            self._send_soon(out.peer, "demonitor", {"ref": _ref_to_wire(ref)})

    # =================================================================================
    # Peers and sending
    # =================================================================================

    def _resolve(self, name: str, *, inbound: bool = False) -> str | None:
        """Where peer ``name`` listens: as configured, else in the ipc directory. For a
        peer that contacted us (``inbound``) only if it is there now: a tcp caller heard
        before its first hb is not, and what it is owed waits for that hb (``_known``)
        -- sent to the directory, it would be dropped when the hb moves the peer."""
        if name in self._configured:
            return self._configured[name]
        if self.directory is None:
            return None
        try:
            endpoint = ipc_endpoint(name, self.directory)
        except ValueError:
            return None
        if inbound and not os.path.exists(endpoint[len("ipc://") :]):
            return None
        return endpoint

    def _peer(self, name: str, endpoint: str | None = None, *, inbound: bool = False) -> _Peer:
        """The peer ``name``, made on first use. ``inbound``: for a peer that contacted
        this node, which may make at most ``_MAX_PEERS`` entries (peers this process
        chose to talk to are not bounded); _Refused past that."""
        peer = self._peers.get(name)
        if peer is None:
            check_name(name, "node name")
            if inbound and len(self._peers) >= _MAX_PEERS and not self._make_room():
                raise _Refused(f"peer table full ({_MAX_PEERS} peers)")
            peer = _Peer(
                name, endpoint or self._resolve(name, inbound=inbound), trio.current_time()
            )
            self._peers[name] = peer
            self._connect(peer)
            if self._nursery is not None:
                self._nursery.start_soon(self._run_peer, peer)
        elif endpoint and endpoint != peer.endpoint:
            peer.endpoint = endpoint  # it moved (restarted elsewhere), or is now known
            self._connect(peer)
            peer.changed.unpark_all()  # (a reply may wait for it: _reply)
        return peer

    def _make_room(self) -> bool:
        """Forget the peer silent longest among those not up (never heard from, or
        down) and owed nothing; False if every peer is up or owed a reply."""
        busy = {p.peer for p in self._pending.values()}
        idle = [p for p in self._peers.values() if not p.alive and p.name not in busy]
        if not idle:
            return False
        self._forget(min(idle, key=lambda p: p.last_seen))
        return True

    def _connect(self, peer: _Peer) -> None:
        if peer.socket is not None:
            peer.socket.close(linger=0)
            peer.socket = None
        if peer.endpoint is None:
            return
        keyring = _admission.current_keyring()
        if keyring is not None and peer.endpoint.startswith("tcp://"):
            # CURVE to the host that holds the peer's name; no routing id: the ROUTER
            # numbers the connection, and the key says whom it speaks for (reader)
            host = keyring.host_of(peer.name)
            if host is None:
                log.warning("%s no host holds %r: not connecting", self._label, peer.name)
                return
            options = keyring.client_options(host)
        else:
            options = {"routing_id": _routing_id(self.name, self.generation, peer.name)}
            if self.token is not None:
                options.update(_admission.present(self.name, self.token))
        peer.socket = open_socket("DEALER", connect=peer.endpoint, linger=0, **options)

    # Sending. Messages to a peer leave in the order they were queued -- a link or
    # monitor queued before a call arrives before it
    # (test_a_remote_link_turns_a_remote_crash_into_an_exit_signal). A sender finding
    # nothing queued for the peer sends on the DEALER itself; otherwise its message waits
    # in the peer's outbox (a bounded channel) for the peer's writer task.

    def _frames(self, peer: _Peer, kind: str, body: dict, tensors: Any, seq: int) -> list:
        if peer.socket is None:
            raise ActorExited(peer.name, "noconnection", f"(no endpoint known for {peer.name!r})")
        if peer.generation is not None:  # addressed to the incarnation we know
            body = {**body, "at": peer.generation}
        try:
            return encode(Message(kind, self.name, self.generation, 0, seq, body, list(tensors)))
        except (TypeError, ValueError) as exc:  # over a peer's limits: it would be rejected
            raise WireError(f"{kind} cannot travel: {exc}") from None

    async def _send(
        self, peer: _Peer, kind: str, body: dict, tensors: Any = (), seq: int = 0
    ) -> None:
        """Send a message to ``peer``: directly when nothing is queued for it (no hand-off
        to the writer task, a task switch per message), else through its outbox, waiting
        while the outbox is full. Either way messages leave in order: a direct send counts
        as queued, and one that has to wait holds the socket's send lock, which the
        writer then queues behind."""
        frames = self._frames(peer, kind, body, tensors, seq)
        peer.queued += 1
        try:
            if peer.queued == 1:
                await self._write(peer, frames)
            else:
                await peer.outbox.send(frames)
                return  # the writer counts it down once written
        except BaseException:
            peer.queued -= 1
            raise
        peer.queued -= 1

    def _send_soon(
        self,
        peer_name: str,
        kind: str,
        body: dict,
        seq: int = 0,
        *,
        droppable: bool = False,
        tensors: Any = (),
    ) -> None:
        """Send a message without waiting (signals, answers from the reader task, fast
        call replies): on the socket at once when nothing is queued for the peer and
        the socket takes it, else through the outbox. If the outbox is full, a
        ``droppable`` message is dropped; any other is handed to a helper task that
        waits up to ``send_timeout`` (order is then not guaranteed)."""
        peer = self._peers.get(peer_name) or self._peer(peer_name)
        if peer.endpoint is None and not droppable and self._nursery is not None:
            if peer.later >= _MAX_LATER:
                self._stats["dropped"] += 1
                return
            peer.later += 1
            self._nursery.start_soon(self._send_when_known, peer, kind, body, tensors, seq)
            return
        try:
            frames = self._frames(peer, kind, body, tensors, seq)
            if self._send_at_once(peer, frames):
                return
            peer.outbox.send_nowait(frames)
            peer.queued += 1
            return
        except ActorExited as exc:
            log.debug("%s cannot send %s to %s: %s", self._label, kind, peer_name, exc)
            return
        except trio.WouldBlock:
            # A peer that does not read must not make this node pile up tasks: answers
            # to what it got wrong are dropped at once, at most _MAX_LATER other messages
            # wait in tasks, the rest are dropped.
            if droppable or self._nursery is None or peer.later >= _MAX_LATER:
                self._stats["dropped"] += 1
                return

        async def send_later() -> None:
            try:
                with trio.move_on_after(self.send_timeout):
                    peer.queued += 1  # first: the writer may take it before send returns
                    try:
                        await peer.outbox.send(frames)
                    except BaseException:
                        peer.queued -= 1
                        raise
                    return
            finally:
                peer.later -= 1
            self._stats["dropped"] += 1
            log.warning("%s dropped %s to %s: outbox full", self._label, kind, peer_name)

        peer.later += 1
        self._nursery.start_soon(send_later)

    async def _known(self, name: str) -> _Peer:
        """Peer ``name`` once its endpoint is known. A caller reached only over tcp can be
        heard before its first hb, which names its endpoint, is: what it is owed waits
        for the endpoint instead of being dropped (callers bound the wait)."""
        while (peer := self._peer(name)).endpoint is None:
            await peer.changed.park()
        return peer

    async def _send_when_known(self, peer: _Peer, kind: str, body: dict, tensors, seq) -> None:
        try:
            with trio.move_on_after(self.send_timeout):
                try:
                    await self._send(await self._known(peer.name), kind, body, tensors, seq)
                except ActorExited:
                    pass
                return
        finally:
            peer.later -= 1
        self._stats["dropped"] += 1
        log.warning("%s dropped %s to %s: its endpoint never came", self._label, kind, peer.name)

    async def _run_peer(self, peer: _Peer) -> None:
        with peer.scope:  # cancelled when the peer is forgotten
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, peer)
                nursery.start_soon(self._heartbeat, peer)

    async def _writer(self, peer: _Peer) -> None:
        async for frames in peer.inbox_of_outbox:
            try:
                await self._write(peer, frames)
            finally:
                peer.queued -= 1

    async def _write(self, peer: _Peer, frames: list) -> None:
        socket = peer.socket
        if socket is None:
            self._stats["dropped"] += 1
            return
        try:
            await socket.send_multipart(frames, copy=False)
            self._stats["sent"] += 1
        except trio.ClosedResourceError:  # reconnected meanwhile
            self._stats["dropped"] += 1

    async def _heartbeat(self, peer: _Peer) -> None:
        while True:
            if peer.socket is not None:
                names = _registry.registered()[:_MAX_NAMES]
                body = {"endpoint": self.endpoint, "names": names}
                self._send_soon(peer.name, "hb", body, droppable=True)  # full: traffic flows
            await trio.sleep(self.heartbeat_interval)

    async def _watchdog(self) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval / 2)
            now = trio.current_time()
            for peer in list(self._peers.values()):
                if self._paused:
                    peer.last_seen = max(peer.last_seen, now)  # cannot judge: see module doc
                elif peer.alive is not False and now - peer.last_seen > self.heartbeat_timeout:
                    silent = now - peer.last_seen
                    log.warning("%s peer %s down: silent for %.2fs", self._label, peer.name, silent)
                    self._peer_down(peer, "noconnection")
                elif peer.alive is False and now - peer.last_seen > _FORGET_AFTER * (
                    self.heartbeat_timeout
                ):
                    self._forget(peer)  # long gone: bound the peer table
            for key, gate in list(self._gates.items()):
                if now >= gate.expires:  # nobody held anything behind it: bound the table
                    del self._gates[key]
                    gate.opened.set()
            for ref, out in list(self._out.items()):
                if out.generation is None and now - out.sent_at > self.heartbeat_timeout:
                    if not self._paused:  # never acknowledged: the request was lost
                        del self._out[ref]
                        log.warning("%s %s of %s not acknowledged: noconnection",
                                    self._label, out.kind, out.target)  # fmt: skip
                        self._deliver_remote_exit(out, ref, "noconnection")

    def _forget(self, peer: _Peer) -> None:
        if any(p.peer == peer.name for p in self._pending.values()):
            return
        del self._peers[peer.name]
        peer.scope.cancel()
        peer.changed.unpark_all()
        if peer.socket is not None:
            peer.socket.close(linger=0)

    def _peer_down(self, peer: _Peer, reason: str) -> None:
        peer.alive = False
        self._open_gates(peer.name)  # its calls and casts fail or drop as for any down peer
        for seq, pending in list(self._pending.items()):
            if pending.peer == peer.name:
                del self._pending[seq]
                pending.fail(ActorExited(pending.target, reason))
        for ref, out in list(self._out.items()):
            if out.peer == peer.name:
                del self._out[ref]
                self._deliver_remote_exit(out, ref, reason)
        for key, (target, watcher) in list(self._served.items()):
            if key[0] == peer.name:  # the watchers are gone with their node
                del self._served[key]
                target._monitors.pop(key[1], None)
                target._links.discard(watcher)
        peer.changed.unpark_all()

    def _heard_from(self, peer: _Peer, generation: int) -> bool:
        """Note a message from ``peer``; False if it comes from a retired incarnation
        (a restarted process's predecessor, still in the queue): drop it."""
        if generation in peer.retired:
            return False
        peer.last_seen = trio.current_time()
        if generation == peer.generation and peer.alive:
            return True  # the common case: nothing wait_peer could be waiting for changed
        if peer.generation is not None and generation != peer.generation:
            self._retire(peer, "noconnection")  # a new incarnation: the old one is gone
        peer.generation = generation
        if not peer.alive:
            peer.alive = True
            log.info("%s peer %s up (generation %x)", self._label, peer.name, generation)
        peer.changed.unpark_all()
        return True

    def _retire(self, peer: _Peer, reason: str) -> None:
        """This incarnation of ``peer`` is gone for good (its process exited)."""
        if peer.generation is not None:
            peer.retired.append(peer.generation)
        if peer.alive is not False:
            self._peer_down(peer, reason)

    def peer_exited(self, name: str) -> None:
        """Tell the node that peer ``name``'s process is known to have exited (its
        supervisor saw it): fail its calls and deliver its Downs now, without waiting for
        the heartbeat deadline."""
        peer = self._peers.get(name)
        if peer is not None:
            self._retire(peer, "noconnection")

    def _deliver_remote_exit(self, out: _Outgoing, ref: MonitorRef, reason: Any) -> None:
        if out.kind == "monitor":
            out.sink._deliver_signal(Down(ref, str(out.target), reason))
        else:
            out.sink._links.discard(out.link_end)
            out.sink._deliver_signal(_ExitSignal(str(out.target), reason))

    # =================================================================================
    # Receiving
    # =================================================================================

    async def _reader(self) -> None:
        keyring = self._keyring
        while True:
            try:
                routing_id, user_id, msg = await self._router.recv_message_from()
            except FrameError as exc:
                if keyring is None:  # (under a keyring routing ids are the ROUTER's)
                    self._reject(_routing_name(exc.routing_id), exc.reason, None)
                else:
                    self._reject(None, exc.reason, None)
                continue
            except trio.ClosedResourceError:
                return
            self._stats["received"] += 1
            try:
                if keyring is not None:
                    # The sender is one the connection's key may speak for: a node of
                    # the host that key names (actors._admission.Keyring).
                    if not keyring.speaks_for(user_id, msg.sender):
                        self._stats["refused_sender"] += 1
                        host = keyring.host_of_key(user_id)
                        raise _Refused(f"host {host}'s key sent as {msg.sender!r:.40}")
                elif routing_id not in (
                    msg.sender.encode(),
                    _routing_id(msg.sender, msg.generation),
                    _routing_id(msg.sender, msg.generation, self.name),
                ):
                    if _routing_name(routing_id) == msg.sender and routing_id.startswith(
                        _routing_id(msg.sender, msg.generation) + b">"
                    ):
                        # Its sender's connection to a node that had this endpoint before
                        # us, reconnected here by ZeroMQ: not ours (module doc).
                        self._stats["misaddressed"] += 1
                        continue
                    # The sender is the connection's: its routing id, which with a token
                    # only a process of the run can hold (actors._admission).
                    self._stats["refused_sender"] += 1
                    raise _Refused(f"header names sender {msg.sender!r:.40}")
                await self._dispatch(msg)
            except _Refused as exc:
                self._refuse(routing_id, str(exc))
            except _Rejected as exc:
                self._reject(msg.sender, str(exc), msg)
            except Exception:  # one bad message must never take the node down
                log.exception("%s error handling %s from %s", self._label, msg.type, msg.sender)
            if self._woke_a_waiter:
                # Yield to the task just woken (a caller, an idle actor) before reading
                # ZMQ_EVENTS and re-arming the wait: trio runs the next batch in random
                # order, so otherwise about half the time the reply would leave only after
                # that bookkeeping (a remote call's round trip is shorter this way).
                self._woke_a_waiter = False
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def _count_refusals(self) -> None:
        """Count connections refused at the handshake (no token, or a wrong one)."""
        assert self._refusals is not None
        while True:
            try:
                frames = await self._refusals.recv_multipart(copy=True)
            except trio.ClosedResourceError:
                return
            if _admission.event_of(frames) & _admission.HANDSHAKE_FAILED:
                self._stats["refused_handshake"] += 1
                self._refuse(None, "handshake failed (no credentials, or not the run's)")

    async def _dispatch(self, msg: Message) -> None:
        if msg.sender not in self._peers:  # (a known peer's name was checked already)
            try:
                check_name(msg.sender, "sender")
            except ValueError as exc:
                raise _Rejected(str(exc)) from None
        handler = self._handlers.get(msg.type)
        if handler is None:
            accepted = ", ".join(sorted(self._handlers))
            raise _Rejected(f"unknown message type {msg.type!r} (accepted: {accepted})")
        endpoint = msg.body.get("endpoint") if msg.type == "hb" else None
        if endpoint is not None and not (
            isinstance(endpoint, str) and endpoint.startswith(("ipc://", "tcp://"))
        ):
            raise _Rejected(f"hb endpoint must be an ipc:// or tcp:// address: {endpoint!r:.60}")
        at = msg.body.get("at")
        if at is not None and type(at) is not int:
            raise _Rejected(f"at must be an int (the addressed generation), got {at!r:.40}")
        holder = self._peers.get(msg.sender)
        if holder is not None and self._is_duplicate(holder, msg.generation):
            self._refuse_duplicate(holder, msg.generation, endpoint)
            return
        peer = self._peer(msg.sender, endpoint, inbound=True)
        if not self._heard_from(peer, msg.generation):
            return
        if at is not None and at != self.generation and msg.type not in _TO_ANY_INCARNATION:
            # A request or bookkeeping for this node's predecessor, handed to us by
            # ZeroMQ's reconnect: not ours to act on (the sender learns of the restart
            # from our messages, and its calls fail with noconnection).
            self._stats["stale"] += 1
            log.info("%s dropped %r (seq %d) from %s: sent to generation %x, this is %x",
                     self._label, msg.type, msg.seq, msg.sender, at, self.generation)  # fmt: skip
            return
        await handler(self, peer, msg)

    def _is_duplicate(self, holder: _Peer, generation: int) -> bool:
        """A message under an exclusive peer's name from another generation while the
        holder is up and heard from within ``heartbeat_timeout``."""
        return (
            holder.name in self._exclusive
            and bool(holder.alive)
            and holder.generation not in (None, generation)
            and generation not in holder.retired
            and trio.current_time() - holder.last_seen <= self.heartbeat_timeout
        )

    def _refuse_duplicate(self, holder: _Peer, generation: int, endpoint: str | None) -> None:
        """Count a duplicate's message; tell the duplicate, at the endpoint its ``hb``
        names, at most once per ``heartbeat_interval`` (the holder's socket is not its;
        so the duplicate hears this node as often as from a peer, and does not take it
        for silent while it waits to see whether the holder goes)."""
        self._stats["refused_duplicate"] += 1
        now = trio.current_time()
        told = self._told.get(holder.name)
        if endpoint is None or (
            told and told[0] == generation and now - told[1] < self.heartbeat_interval
        ):
            return
        self._told[holder.name] = (generation, now)
        reason = (
            f"{holder.name} is held by a live process (generation {holder.generation:x} at "
            f"{holder.endpoint}, heard from {now - holder.last_seen:.1f}s ago)"
        )
        if told is None or told[0] != generation:  # (logged once per duplicate)
            log.warning("%s refused %s generation %x at %s: %s", self._label, holder.name,
                        generation, endpoint, reason)  # fmt: skip
        if self._nursery is not None:
            self._nursery.start_soon(self._tell_held, holder.name, generation, endpoint, reason)

    async def _tell_held(self, name: str, generation: int, endpoint: str, reason: str) -> None:
        newcomer = _Peer(name, endpoint, trio.current_time())
        self._connect(newcomer)
        if newcomer.socket is None:
            return
        message = Message("held", self.name, self.generation, 0, 0,
                          {"at": generation, "reason": reason}, [])  # fmt: skip
        try:
            with trio.move_on_after(self.send_timeout):
                await newcomer.socket.send_multipart(encode(message), copy=False)
        finally:
            newcomer.socket.close(linger=int(self.send_timeout * 1000))

    def _refuse(self, routing_id: bytes | None, reason: str) -> None:
        """Drop a message from a connection that may not speak for its sender: no
        answer, and no state kept for it -- only the count."""
        self._stats["refused"] += 1
        count = self._stats["refused"]
        if count & (count - 1) == 0:  # 1, 2, 4, ...: a flood does not flood the log
            log.warning("%s refused a message from connection %r: %s (%d refused so far)",
                        self._label, routing_id, reason, count)  # fmt: skip

    def _reject(self, peer_name: str | None, reason: str, msg: Message | None) -> None:
        self._stats["rejected"] += 1
        count = self._stats["rejected"]
        what = "a malformed message" if msg is None else f"{msg.type!r} (seq {msg.seq})"
        level = logging.WARNING if count & (count - 1) == 0 else logging.DEBUG
        log.log(level, "%s rejected %s from %s: %s (%d rejected so far)",
                self._label, what, peer_name or "?", reason, count)  # fmt: skip
        if peer_name is None or (peer_name not in self._peers and self._resolve(peer_name) is None):
            return
        try:
            self._peer(peer_name, inbound=True)
        except _Refused:
            return
        # Answers are droppable: a sender that does not read them costs nothing more.
        if msg is not None and msg.type in _REQUESTS and msg.seq:
            body = _error("bad_request", reason)
            self._send_soon(peer_name, "reply", body, seq=msg.seq, droppable=True)
        elif msg is None or msg.type not in ("error", "reply"):  # never answer an answer
            self._send_soon(peer_name, "error", {"reason": reason}, droppable=True)

    # -- handlers: one per message type ------------------------------------------------

    async def _on_hb(self, peer: _Peer, msg: Message) -> None:
        names = msg.body.get("names", [])
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise _Rejected("hb names must be a list of strings")
        if tuple(names) != peer.names:
            peer.names = tuple(names)
            peer.changed.unpark_all()

    async def _on_call(self, peer: _Peer, msg: Message) -> None:
        to = _field(msg, "to", str)
        timeout = _timeout_field(msg)
        if "request" not in msg.body:
            raise _Rejected("call without a request")
        try:
            request = from_wire(msg.body["request"], msg.tensors)
        except WireError as exc:
            raise _Rejected(f"bad request data: {exc}") from None
        ref = _registry.whereis(to)
        if ref is not None and ref.alive:
            # Into the actor's mailbox (or its overflow), with a return address that
            # sends the reply from the replying task (no task of our own per call). An
            # actor that has just exited takes the slow path below: noproc or exited.
            def answer(ok: bool, value: Any) -> None:
                self._answer(peer.name, msg.seq, to, ok, value)

            from_ = From(answer, ref, f"<node {peer.name}>")
            ref._pending.add(from_)
            try:
                await self._deliver(peer, msg, to, ref, _Call(request, from_))
                return
            except MailboxClosed:
                ref._pending.discard(from_)
        await self._spawn_request(self._serve_call, peer.name, msg.seq, to, request, timeout)

    def _answer(self, peer: str, seq: int, to: str, ok: bool, value: Any) -> None:
        """A fast-path call's reply (From's delivery: runs in the replying task, never
        waits). The caller enforces its own timeout; an actor that exits first fails
        its pending calls with ActorExited, which goes back as "exited"."""
        if not ok:
            body = _error("exited", value.reason if isinstance(value, ActorExited) else value)
        else:
            try:
                data, tensors = to_wire(value)
                self._send_soon(peer, "reply", {"ok": True, "value": data}, seq, tensors=tensors)
                return
            except WireError as exc:  # (raised before anything is sent)
                body = _error("bad_reply", f"{to} replied with {exc}")
        self._send_soon(peer, "reply", body, seq=seq)

    async def _serve_call(self, peer: str, seq: int, to: str, request: Any, timeout) -> None:
        ref = _registry.whereis(to)
        if ref is None:
            body = _error("noproc", f"no actor registered as {to!r} on node {self.name}")
        else:
            try:
                value = await ref._call(request, timeout, caller=f"<node {peer}>")
                data, tensors = to_wire(value)
            except ActorExited as exc:
                body = _error("exited", exc.reason)
            except CallTimeout:
                body = _error("timeout", f"no reply within {timeout}s")
            except WireError as exc:
                body = _error("bad_reply", f"{to} replied with {exc}")
            else:
                await self._reply(peer, seq, {"ok": True, "value": data}, tensors)
                return
        await self._reply(peer, seq, body)

    async def _on_stop(self, peer: _Peer, msg: Message) -> None:
        to, reason = _field(msg, "to", str), _field(msg, "reason", str)
        timeout = _timeout_field(msg)
        await self._spawn_request(self._serve_stop, peer.name, msg.seq, to, reason, timeout)

    async def _serve_stop(self, peer: str, seq: int, to: str, reason: str, timeout) -> None:
        ref = _registry.whereis(to)
        if ref is None:
            await self._reply(peer, seq, _error("noproc", f"no actor {to!r} on {self.name}"))
            return
        ref.request_stop(reason)
        with trio.move_on_after(float("inf") if timeout is None else timeout):
            await ref.wait_exited()
            await self._reply(peer, seq, {"ok": True, "value": None})
            return
        await self._reply(peer, seq, _error("timeout", f"{to} did not stop in {timeout}s"))

    async def _on_stats(self, peer: _Peer, msg: Message) -> None:
        to = _field(msg, "to", str)
        ref = _registry.whereis(to)
        if ref is None:
            body, tensors = _error("noproc", f"no actor {to!r} on {self.name}"), []
        else:
            data, tensors = to_wire(ref.statistics())
            body = {"ok": True, "value": data}
        self._send_soon(peer.name, "reply", body, seq=msg.seq)  # stats carry no tensors

    async def _on_reply(self, peer: _Peer, msg: Message) -> None:
        entry = self._pending.get(msg.seq)
        if entry is None or entry.peer != peer.name:
            return  # a late reply (the caller gave up), or not from the node we asked
        del self._pending[msg.seq]
        slot = entry.slot
        self._woke_a_waiter = slot.waiting
        ok = msg.body.get("ok")
        try:
            if ok is True:
                slot.deliver(True, from_wire(msg.body.get("value"), msg.tensors))
            elif ok is False:
                slot.deliver(False, _error_from_wire(entry, msg.body))
            else:
                raise WireError("reply without ok")
        except WireError as exc:
            slot.deliver(False, RemoteError(f"bad reply from {peer.name}: {exc}"))

    async def _on_cast(self, peer: _Peer, msg: Message) -> None:
        to = _field(msg, "to", str)
        try:
            data = from_wire(msg.body.get("msg"), msg.tensors)
        except WireError as exc:
            raise _Rejected(f"bad {msg.type} data: {exc}") from None
        ref = _registry.whereis(to)
        if ref is None:
            self._stats["dropped"] += 1
            log.debug("%s dropped %s to unknown actor %r", self._label, msg.type, to)
            return
        envelope = _Cast(data) if msg.type == "cast" else _Info(data)
        try:
            await self._deliver(peer, msg, to, ref, envelope)
        except MailboxClosed:
            self._stats["dropped"] += 1

    async def _deliver(
        self, peer: _Peer, msg: Message, to: str, ref: ActorRef, envelope: Any
    ) -> None:
        """Put a call or cast (``envelope``, made of ``msg``) from ``peer`` into ``ref``'s
        mailbox, or behind what already waits for room in its overflow (module doc,
        "Back-pressure"); waits only past the overflow's bounds. MailboxClosed: the
        actor has exited."""
        overflow = self._overflows.get(ref)
        if overflow is None:
            try:
                waiting = ref.mailbox.taker_waiting
                ref.mailbox.put_nowait(envelope)
                self._woke_a_waiter = waiting
                return
            except MailboxFull:
                overflow = self._overflows[ref] = _Overflow(to)
                self._nursery.start_soon(self._drain, ref, overflow)
        nbytes = sum(tensor.nbytes for tensor in msg.tensors)
        overflow.items.append((envelope, nbytes))
        overflow.nbytes += nbytes
        overflow.senders.add(peer.name)
        self._stats["overflowed"] += 1
        self._send_soon(peer.name, "busy", {"to": to}, droppable=True)
        if overflow.over_bound():  # a sender ignoring busy: bound it
            self._paused = True
            try:
                while overflow.over_bound() and self._overflows.get(ref):
                    await overflow.room.park()
            finally:
                self._paused = False

    async def _drain(self, ref: ActorRef, overflow: _Overflow) -> None:
        try:
            while overflow.items:
                await ref.mailbox.put(overflow.items[0][0])
                overflow.nbytes -= overflow.items.popleft()[1]
                overflow.room.unpark_all()
        except MailboxClosed:  # exited: its calls were failed with it (ref._pending)
            self._stats["dropped"] += sum(not isinstance(m, _Call) for m, _ in overflow.items)
            overflow.items.clear()
            overflow.nbytes = 0
        finally:
            del self._overflows[ref]
            overflow.room.unpark_all()
            for name in overflow.senders:
                self._send_soon(name, "ready", {"to": overflow.name})

    async def _on_busy(self, peer: _Peer, msg: Message) -> None:
        to = _field(msg, "to", str)
        try:
            check_name(to)
        except ValueError as exc:
            raise _Rejected(str(exc)) from None
        expires = trio.current_time() + self.heartbeat_timeout
        gate = self._gates.get((peer.name, to))
        if gate is None:
            self._gates[(peer.name, to)] = _Gate(trio.Event(), expires)
        else:
            gate.expires = expires

    async def _on_ready(self, peer: _Peer, msg: Message) -> None:
        gate = self._gates.pop((peer.name, _field(msg, "to", str)), None)
        if gate is not None:
            gate.opened.set()

    async def _on_monitor(self, peer: _Peer, msg: Message) -> None:
        self._serve_watch(peer, msg, "monitor")

    async def _on_link(self, peer: _Peer, msg: Message) -> None:
        self._serve_watch(peer, msg, "link")

    def _serve_watch(self, peer: _Peer, msg: Message, kind: str) -> None:
        to = _field(msg, "to", str)
        ref = _ref_from_wire(msg.body.get("ref"))
        label = _field(msg, "sender", str) if kind == "link" else peer.name
        target = _registry.whereis(to)
        if target is None:
            body = {"ref": _ref_to_wire(ref), "reason": _reason_to_wire("noproc")}
            self._send_soon(peer.name, "down", body)
            return
        watcher = _RemoteWatcher(self, peer.name, ref, label)
        self._served[(peer.name, ref)] = (target, watcher)
        self._send_soon(peer.name, "watching", {"ref": _ref_to_wire(ref)})
        if kind == "monitor":
            target._monitors[ref] = watcher
        else:
            target._links.add(watcher)

    async def _on_watching(self, peer: _Peer, msg: Message) -> None:
        out = self._out.get(_ref_from_wire(msg.body.get("ref")))
        if out is not None and out.peer == peer.name:
            out.generation = msg.generation  # from now on tied to this incarnation

    async def _on_demonitor(self, peer: _Peer, msg: Message) -> None:
        ref = _ref_from_wire(msg.body.get("ref"))
        entry = self._served.pop((peer.name, ref), None)
        if entry is not None:  # a monitor or a link: drop either
            target, watcher = entry
            target._monitors.pop(ref, None)
            target._links.discard(watcher)

    async def _on_exit(self, peer: _Peer, msg: Message) -> None:
        ref = _ref_from_wire(msg.body.get("ref"))
        entry = self._served.pop((peer.name, ref), None)
        if entry is not None:
            target, watcher = entry
            target._links.discard(watcher)
            reason = _reason_from_wire(msg.body.get("reason"))
            target._deliver_signal(_ExitSignal(watcher.label, reason))

    async def _on_down(self, peer: _Peer, msg: Message) -> None:
        ref = _ref_from_wire(msg.body.get("ref"))
        out = self._out.pop(ref, None)
        if out is not None and out.peer == peer.name:
            self._deliver_remote_exit(out, ref, _reason_from_wire(msg.body.get("reason")))

    async def _on_error(self, peer: _Peer, msg: Message) -> None:
        reason = msg.body.get("reason")
        log.warning("%s %s rejected a message from us: %s", self._label, peer.name, reason)

    async def _on_held(self, peer: _Peer, msg: Message) -> None:
        if msg.body.get("at") is None:  # (_dispatch checked that it is this generation)
            raise _Rejected("held must say the generation it refuses (at)")
        reason = _field(msg, "reason", str)
        self._held_by = reason
        log.info("%s refused by %s: %s", self._label, peer.name, reason)
        for seq, pending in list(self._pending.items()):
            if pending.peer == peer.name:
                del self._pending[seq]
                pending.fail(ActorExited(pending.target, f"held: {reason}"))

    _handlers: dict[str, Callable[..., Any]] = {
        "hb": _on_hb,
        "call": _on_call,
        "stop": _on_stop,
        "stats": _on_stats,
        "reply": _on_reply,
        "cast": _on_cast,
        "send": _on_cast,
        "monitor": _on_monitor,
        "link": _on_link,
        "watching": _on_watching,
        "demonitor": _on_demonitor,
        "exit": _on_exit,
        "down": _on_down,
        "error": _on_error,
        "busy": _on_busy,
        "ready": _on_ready,
        "held": _on_held,
    }

    async def _spawn_request(self, fn: Callable[..., Any], *args: Any) -> None:
        """Serve a request in its own task; at most ``max_inflight`` at once (the reader
        waits for a free slot: back-pressure instead of an unbounded task pile)."""
        if self._inflight.value == 0:
            self._paused = True
        try:
            await self._inflight.acquire()
        finally:
            self._paused = False

        async def serve() -> None:
            try:
                await fn(*args)
            finally:
                self._inflight.release()

        self._nursery.start_soon(serve)

    async def _reply(self, peer: str, seq: int, body: dict, tensors: Any = ()) -> None:
        with trio.move_on_after(self.send_timeout):
            try:
                try:
                    await self._send(await self._known(peer), "reply", body, tensors, seq=seq)
                except WireError as exc:  # (raised before anything is sent)
                    body = _error("bad_reply", f"the reply cannot travel: {exc}")
                    await self._send(self._peer(peer), "reply", body, seq=seq)
            except ActorExited:
                pass
            return
        self._stats["dropped"] += 1


_link_ids = itertools.count(1 << 40)  # disjoint from actors._actor's monitor ids

_REQUESTS = ("call", "stop", "stats")
# Served by whichever incarnation of the node gets them, like mail to a registered name.
_TO_ANY_INCARNATION = frozenset({"hb", "cast", "send"})


def _seconds(timeout: float | None) -> float:
    return float("inf") if timeout is None else timeout


def _field(msg: Message, key: str, kind: Any) -> Any:
    value = msg.body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _Rejected(f"{msg.type}: field {key!r} must be {_kind_name(kind)}, got {value!r:.40}")
    return value


def _timeout_field(msg: Message) -> float | None:
    timeout = msg.body.get("timeout")
    try:
        _check_timeout(timeout)  # the rule actors.call applies to its caller
    except (TypeError, ValueError) as exc:
        raise _Rejected(f"{msg.type}: {exc}") from None
    return timeout


def _kind_name(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("None" if k is type(None) else k.__name__ for k in kinds)


def _is_node_name(name: str) -> bool:
    return check_name(name, "node name") == name


def _drain_monitor(sock: TrioSocket) -> None:
    while True:
        try:
            sock.zmq.recv_multipart(zmq.DONTWAIT)
        except zmq.ZMQError:
            return


def _routing_id(name: str, generation: int, to: str | None = None) -> bytes:
    """A node's DEALER routing id: ``name@boot id>peer`` ('@' is in no name), one per
    process and peer it sends to (module doc, "Admission"); the generation is
    hex, so the first '>' after the '@' ends it."""
    sender = f"{name}@{generation:x}"
    return (sender if to is None else f"{sender}>{to}").encode()


def _routing_name(routing_id: bytes | None) -> str | None:
    try:
        return check_name(routing_id.decode().split("@")[0]) if routing_id else None
    except (UnicodeDecodeError, ValueError):
        return None


def _ref_to_wire(ref: MonitorRef) -> list:
    return [ref.id, ref.node]


def _ref_from_wire(data: Any) -> MonitorRef:
    if not (
        isinstance(data, list)
        and len(data) == 2
        and type(data[0]) is int
        and isinstance(data[1], str | None)
    ):
        raise _Rejected(f"a monitor ref is [int, node name], got {data!r:.40}")
    return MonitorRef(data[0], data[1])


def _reason_to_wire(reason: Any) -> dict:
    return {
        "text": format_reason(reason),
        "exc": isinstance(reason, BaseException),
        "normal": is_normal_exit(reason),
    }


def _reason_from_wire(data: Any) -> Any:
    if not (isinstance(data, dict) and isinstance(data.get("text"), str)):
        raise _Rejected(f"an exit reason is {{text, exc, normal}}, got {data!r:.40}")
    if not data.get("exc"):
        return data["text"]
    if data.get("normal"):  # e.g. RestartIntensityExceeded: keep it shutdown-class
        return f"shutdown: {data['text']}"
    return RemoteError(data["text"])


def _error(kind: str, reason: Any) -> dict:
    return {"ok": False, "kind": kind, "reason": _reason_to_wire(reason)}


def _error_from_wire(request: _Pending, body: dict) -> Exception:
    target, kind = request.target, body.get("kind")
    try:
        reason = _reason_from_wire(body.get("reason"))
    except _Rejected as exc:
        return RemoteError(f"bad error reply for {target}: {exc}")
    text = format_reason(reason)
    if kind == "exited":
        return ActorExited(target, reason)
    if kind == "noproc":
        return NoSuchActor(text)
    if kind == "timeout":
        # The serving node waited the caller's own timeout: the same error as a local
        # call's (the peer's answer can beat the caller's clock when the caller is slow).
        return CallTimeout(target, request.what, _seconds(request.timeout))
    return RemoteError(f"{target}: {kind}: {text}")


# =====================================================================================
# open_node
# =====================================================================================


@asynccontextmanager
async def open_node(
    name: str,
    *,
    endpoint: str | None = None,
    directory: str | None = None,
    peers: dict[str, str] | None = None,
    heartbeat_interval: float = 0.2,
    heartbeat_timeout: float = 1.0,
    send_timeout: float = 5.0,
    max_inflight: int = 64,
    rank: int | None = None,
    token: str | bytes | None = None,
) -> AsyncIterator[Node]:
    """Run this process's node for the duration of the block.

    ``name``: this node's name (``"rank0"``); actors here are ``"<actor>@<name>"``.
    ``endpoint``: where to bind the inbox; default ``ipc://<directory>/<name>``. A
    wildcard port (``tcp://127.0.0.1:*``) is resolved; peers learn it from heartbeats.
    ``directory``: a shared (0700) ipc directory; peers not in ``peers`` are found at
    ``ipc://<directory>/<peer>``. Default: a private one (``actors._transport``).
    ``peers``: ``{node name: endpoint}`` for peers not in ``directory`` (tcp://...). A
    node also learns the endpoint of every node that contacts it.
    ``rank``: the default rank in actor log prefixes.
    ``token``: the run's secret (16-255 bytes, e.g. ``secrets.token_hex(16)``): only
    nodes holding it may connect, checked at the handshake (``actors._admission``);
    process children inherit it. None: anyone who can reach the endpoint may.

    Raises ValueError for a bad name or token and zmq.ZMQError if the endpoint cannot be
    bound.
    """
    if _registry.current_node(required=False) is not None:
        raise RuntimeError("this process already runs a node (one node per process)")
    if not 0 < heartbeat_interval < heartbeat_timeout:
        raise ValueError(
            "need 0 < heartbeat_interval < heartbeat_timeout, got "
            f"{heartbeat_interval!r}, {heartbeat_timeout!r}"
        )
    if endpoint is None:
        directory = directory or ipc_directory()
        endpoint = ipc_endpoint(check_name(name, "node name"), directory)
    node = Node(
        name,
        endpoint=endpoint,
        directory=directory,
        peers=peers or {},
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
        send_timeout=send_timeout,
        max_inflight=max_inflight,
        token=_admission.check_token(token),
    )
    admission = {}
    if node.token is not None:
        node._domain, admission = _admission.admit("node", node.token, _is_node_name)
    # HEARTBEAT_IVL=0: the reader pauses past the back-pressure bounds, so a peer's pipe
    # can fill, and then a ZMTP heartbeat timeout or the peer's hang-up aborts the process
    # in libzmq 4.3.5 (actors._collectives explains; liveness here is the node's own hb).
    node._router = open_socket(
        "ROUTER", bind=endpoint, router_handover=1, linger=0, heartbeat_ivl=0, **admission
    )
    node.endpoint = node._router.last_endpoint  # "tcp://host:*" -> the port it got
    if node._router.accepts is not None:  # CURVE: the process's keyring admits peers
        node._keyring = _admission.current_keyring()
    address = f"inproc://node-monitor-{id(node)}"
    node._router.zmq.monitor(address, _admission.HANDSHAKE_FAILED)
    node._refusals = open_socket("PAIR", connect=address, linger=0, rcvhwm=0)  # see Ring
    previous_rank = _registry.default_rank()
    _registry.set_node(node)
    _registry.set_default_rank(rank if rank is not None else previous_rank)
    try:
        async with trio.open_nursery() as nursery:
            node._nursery = nursery
            nursery.start_soon(node._reader)
            nursery.start_soon(node._watchdog)
            nursery.start_soon(node._count_refusals)
            for peer in list(node._peers.values()):
                nursery.start_soon(node._run_peer, peer)
            try:
                yield node
            finally:
                nursery.cancel_scope.cancel()
    finally:
        node._nursery = None
        for pending in node._pending.values():
            pending.fail(ActorExited(pending.target, "shutdown: node closed"))
        node._pending.clear()
        _drain_monitor(node._refusals)  # first: see Ring.close
        node._router.zmq.disable_monitor()
        node._refusals.close()
        node._router.close(linger=0)
        _admission.forget(node._domain)
        for peer in node._peers.values():
            if peer.socket is not None:
                peer.socket.close(linger=0)
        _registry.set_node(None)
        _registry.set_default_rank(previous_rank)
