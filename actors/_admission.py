"""Admission: only the run's own processes may connect to its sockets.

Design note
-----------
A socket that admits peers names a ZAP *domain*; libzmq asks this module's ZAP handler
about every new connection to it, during the handshake, before anything the peer sends
reaches the socket: a peer refused gets no pipe, so it can send nothing, receive nothing
(a bound DEALER deals its messages among every *attached* peer) and make the socket
buffer nothing. No answer goes back beyond ZMTP's own ERROR command. A domain admits by
one of two rules, and counts whom it admitted and refused:

- PLAIN, a per-run *token* (:func:`admit`): the cluster node makes it; process children
  inherit it through ``actors.ENV["token"]``. The admitting socket is a PLAIN server, a
  connecting one presents a user name and the token (:func:`present`); the domain also
  judges the user name -- the node's inbox admits any node name, a ring inbox only its
  one left neighbour. Over ipc:// the token travels in clear through a 0700 directory.
- CURVE, an allow-list of public keys (:func:`admit_curve`): for tcp://, where the keys
  both authenticate and encrypt (``pipelines.launch.curve`` sets the sockets up). The
  admitted peer's z85 public key becomes each of its messages' "User-Id".

There is one handler per zmq Context -- libzmq routes every ZAP request of a context to
the one socket bound at ``inproc://zeromq.zap.01``, so a second authenticator (pyzmq's
ThreadAuthenticator) on the same context could not even bind. The handler is a thread
with its own REP socket: handshakes happen in libzmq's I/O thread whatever trio is doing,
and a thread answers them even while the trio loop is busy. It starts with the context's
first domain, before the socket binds (libzmq lets every client in while no handler is
bound). The handler of :func:`get_context`'s context runs until exit (rings come and go
often); any other context's stops with its last domain, which must be before
``ctx.term()``. At exit every handler stops before the context is flushed.

Every refused connection shows on a socket monitor as one ``EVENT_HANDSHAKE_FAILED_*``
and, later, one ``EVENT_DISCONNECTED``. A wrong mechanism (a peer with no credentials at
all) never reaches the handler, and its two events come back to back. A refusal by the
handler does not: libzmq reports the failure when the handler's answer arrives, sends
ZMTP's ERROR command, and reports the disconnect only once the peer has read it and hung
up, so other connections' events can come in between. :class:`MonitorFilter` counts the
refused connections still open, so a refused connection's end is never taken for a
neighbour's.
"""

from __future__ import annotations

import atexit
import dataclasses
import hmac
import itertools
import struct
import threading
from collections.abc import Callable, Iterable

import zmq

from ._transport import get_context

__all__ = ["Admission", "admit_curve"]

_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_MAX_TOKEN = 255  # PLAIN credentials are short strings
_CURVE_KEY = 32  # bytes of a raw CURVE public key (40 in z85)

HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


@dataclasses.dataclass(eq=False)
class Admission:
    """One ZAP domain's rule and counts: PLAIN with ``token`` and a user-name check
    (``accepts``), or CURVE with an allow-list of raw public keys (``curve_keys``).

    Made by :func:`admit_curve` (and the runtime's own sockets); :meth:`stop` when the
    sockets that name it are closed."""

    name: bytes
    token: bytes | None = None
    accepts: Callable[[str], bool] | None = None
    curve_keys: frozenset[bytes] | None = None
    admitted: int = 0
    refused: int = 0
    _handler: _Handler | None = dataclasses.field(default=None, repr=False)

    def decide(self, mechanism: bytes, credentials: list[bytes]) -> bytes | None:
        """The user id to admit a peer under, or None to refuse it (handler thread)."""
        if self.curve_keys is not None:
            if mechanism == b"CURVE" and len(credentials) == 1:
                if credentials[0] in self.curve_keys:
                    return zmq.utils.z85.encode(credentials[0])
            return None
        if mechanism != b"PLAIN" or len(credentials) != 2 or self.token is None:
            return None
        username, password = credentials
        try:
            accepted = self.accepts is not None and self.accepts(username.decode())
        except (UnicodeDecodeError, ValueError):
            accepted = False
        if accepted and hmac.compare_digest(password, self.token):
            return username
        return None

    def stop(self) -> None:
        """Stop admitting through this domain (its sockets are closed, or about to be)."""
        forget(self)


def check_token(token: str | bytes | None) -> bytes | None:
    """The token as bytes (None: no admission); ValueError for an unusable one."""
    if token is None:
        return None
    raw = token.encode() if isinstance(token, str) else token
    if not isinstance(raw, bytes) or not 16 <= len(raw) <= _MAX_TOKEN:
        raise ValueError(
            f"a run token is 16 to {_MAX_TOKEN} bytes (str or bytes), got {token!r:.40}"
        )
    return raw


_domain_ids = itertools.count()
_lock = threading.Lock()
_handlers: dict[int, _Handler] = {}  # id(context) -> its handler


def admit(kind: str, token: bytes, accepts: Callable[[str], bool]) -> tuple[Admission, dict]:
    """A PLAIN domain of :func:`get_context`'s context admitting only peers that hold
    ``token`` and whose user name ``accepts`` approves, and the socket options (for
    ``open_socket``) of a socket that admits through it. Starts the handler first.
    :func:`forget` the domain at close."""
    domain = Admission(f"zt-{kind}-{next(_domain_ids)}".encode(), token, accepts)
    _register(get_context(), domain, keep=True)
    return domain, {"plain_server": 1, "zap_domain": domain.name}


def admit_curve(context: zmq.Context, domain: str, public_keys: Iterable[bytes]) -> Admission:
    """Admit to every CURVE server socket of ``context`` whose ZAP domain is ``domain``
    exactly the peers holding one of ``public_keys`` (z85, 40 bytes each), each message
    carrying its peer's z85 key as "User-Id". Call before binding such a socket;
    ``stop()`` the result before ``context.term()``.

    Raises ValueError for a malformed key or a domain ``context`` already admits through."""
    keys = []
    for key in public_keys:
        try:
            raw = zmq.utils.z85.decode(key)
        except (ValueError, TypeError, KeyError, struct.error):
            raw = b""
        if len(raw) != _CURVE_KEY:
            raise ValueError(f"a CURVE public key is 40 z85 characters, got {key!r:.60}")
        keys.append(raw)
    admission = Admission(domain.encode(), curve_keys=frozenset(keys))
    _register(context, admission)
    return admission


def forget(domain: Admission | None) -> None:
    """Stop admitting through ``domain``; a context's last domain stops its handler
    (except :func:`get_context`'s, which runs until exit)."""
    if domain is None or domain._handler is None:
        return
    handler, domain._handler = domain._handler, None
    with _lock:
        handler.domains.pop(domain.name, None)
        if handler.domains or handler.keep:
            return
        _handlers.pop(id(handler.context), None)
    handler.close()


def present(username: str, token: bytes) -> dict:
    """The socket options of a socket that connects as ``username`` with ``token``."""
    return {"plain_username": username.encode(), "plain_password": token}


def _register(context: zmq.Context, domain: Admission, keep: bool = False) -> None:
    with _lock:
        handler = _handlers.get(id(context))
        if handler is None:
            handler = _handlers[id(context)] = _Handler(context)
            # Registered after the context's own exit flush, if any, so it runs first
            # (atexit is LIFO): a handler's sockets are closed by its own thread.
            atexit.register(handler.close)
        handler.keep |= keep
        if domain.name in handler.domains:
            raise ValueError(f"ZAP domain {domain.name.decode()!r} is already admitting")
        handler.domains[domain.name] = domain
        domain._handler = handler


def _decide(domains: dict[bytes, Admission], frames: list[bytes]) -> tuple[bytes, bytes]:
    """(status code, user id) for one ZAP request (RFC 27)."""
    if len(frames) < 6:
        return b"500", b""
    domain = domains.get(frames[2])
    if domain is None:
        return b"400", b""
    user = domain.decide(frames[5], frames[6:])
    if user is None:
        domain.refused += 1
        return b"400", b""
    domain.admitted += 1
    return b"200", user


class _Handler:
    """The ZAP handler thread of one context and the domains it answers for."""

    def __init__(self, context: zmq.Context) -> None:
        self.context = context
        self.domains: dict[bytes, Admission] = {}
        self.keep = False  # run until exit, whatever domains come and go
        self._closed = False
        self._stop_address = f"inproc://zt-zap-stop-{id(self)}"
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(ready,), daemon=True, name="zt-zap"
        )
        self._thread.start()
        ready.wait()
        self._stop = context.socket(zmq.PAIR)
        self._stop.setsockopt(zmq.LINGER, 0)
        self._stop.connect(self._stop_address)

    def _serve(self, ready: threading.Event) -> None:
        zap = self.context.socket(zmq.REP)
        stop = self.context.socket(zmq.PAIR)
        try:
            zap.setsockopt(zmq.LINGER, 0)
            stop.setsockopt(zmq.LINGER, 0)
            zap.bind(_ZAP_ENDPOINT)
            stop.bind(self._stop_address)
            ready.set()
            poller = zmq.Poller()
            poller.register(zap, zmq.POLLIN)
            poller.register(stop, zmq.POLLIN)
            while True:
                if stop in dict(poller.poll()):
                    return
                frames = zap.recv_multipart()
                status, user = _decide(self.domains, frames)
                version = frames[0] if frames else b"1.0"
                request_id = frames[1] if len(frames) > 1 else b""
                zap.send_multipart([version, request_id, status, b"", user, b""])
        except zmq.ZMQError:
            return  # the context is going away
        finally:
            ready.set()
            zap.close()
            stop.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._stop.send(b"stop")
        except zmq.ZMQError:
            pass
        self._thread.join(2.0)
        self._stop.close()


# ----------------------------------------------------------------------------------------
# Monitor events
# ----------------------------------------------------------------------------------------

_EVENT = struct.Struct("=HI")


def event_of(frames: list) -> int:
    """The event number of one monitor message (0 if malformed)."""
    return _event_and_value(frames)[0]


def _event_and_value(frames: list) -> tuple[int, int]:
    raw = bytes(frames[0]) if frames else b""
    return _EVENT.unpack(raw[: _EVENT.size]) if len(raw) >= _EVENT.size else (0, 0)


class MonitorFilter:
    """Tells, event by event, which disconnects are the one admitted peer's.

    Once a message from that peer has been read, ``peer_fd`` is the file descriptor it
    came on (the frame's ZMQ_SRCFD), and only that descriptor's ``EVENT_DISCONNECTED``
    (whose value is the descriptor) is the peer's: a stranger's connection -- refused at
    the handshake, hung up in the middle of it, or raw garbage that is no ZMTP greeting
    (libzmq then reports no handshake failure at all) -- has another descriptor while
    the peer's is open. Before that (a new connection, nothing read yet), a disconnect
    is a refused connection's while a failed handshake has had no disconnect yet: the
    failure event carries no descriptor, so the pairing is by count, and a refusal's
    disconnect may come after other connections' events (module doc). Any other
    disconnect counts as the peer's. So the peer's end, should it come while a refused
    connection is still open, is reported at that connection's end instead. Raw
    garbage has no failure to pair with: while a refusal is open its end takes that
    refusal's place (whose own end then counts as any other disconnect), and with none
    open it passes for the peer's unless ``peer_fd`` tells it apart. So before the
    peer's first message garbage can still fail a collective (test_hostile_peers sends
    it only after)."""

    __slots__ = ("_open_refusals", "peer_fd", "refused")

    def __init__(self) -> None:
        self._open_refusals = 0  # failed handshakes whose disconnect has not come yet
        self.peer_fd: int | None = None  # set by the reader: the admitted peer's
        self.refused = 0  # connections that failed their handshake

    def is_real_disconnect(self, frames: list) -> bool:
        event, value = _event_and_value(frames)
        if event & HANDSHAKE_FAILED:
            self._open_refusals += 1
            self.refused += 1
            return False
        if event != zmq.EVENT_DISCONNECTED:
            return False
        if self.peer_fd is not None and value == self.peer_fd:
            self.peer_fd = None  # its descriptor may be reused by the next connection
            return True
        if self._open_refusals:  # some refused connection's end (which one: no matter)
            self._open_refusals -= 1
            return False
        return self.peer_fd is None
