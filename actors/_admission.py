"""Admission: only the run's own processes may connect to its sockets.

Design note
-----------
A run shares one secret *token* (the cluster node makes it; process children inherit it
through ``actors.ENV["token"]``). A socket that admits peers is a ZeroMQ PLAIN server
with a ZAP domain of its own; a socket that connects presents a user name and the token
as PLAIN credentials. libzmq asks this module's ZAP handler about every new connection,
during the handshake, before anything the peer sends reaches the socket: a peer without
the token never gets a pipe, so it can send nothing, receive nothing (a bound DEALER
deals its messages among every *attached* peer) and make the socket buffer nothing.
No answer goes back beyond ZMTP's own ERROR command. Each domain has its rule -- the
node's inbox admits any node name, a ring inbox only its one left neighbour -- and counts
whom it refused (``refused``).

Over ipc:// PLAIN sends the token in clear through a 0700 directory; over tcp:// the
same handler would serve CURVE keys (not built: multi-node runs need it first).

The handler is a thread with its own REP socket on ``inproc://zeromq.zap.01`` in the
process's context: handshakes happen in libzmq's I/O thread whatever trio is doing, and
a thread answers them even while the trio loop is busy. It is started by the first
:func:`admit` (before the socket binds: libzmq lets every PLAIN client in while no
handler is bound) and stopped at exit before the context is flushed.

Connections refused for a wrong mechanism (a peer with no credentials at all) never
reach the handler; libzmq reports them as ``EVENT_HANDSHAKE_FAILED_*`` on a socket
monitor, immediately followed by that connection's ``EVENT_DISCONNECTED`` (one I/O
thread: nothing comes between). :class:`MonitorFilter` pairs them, so a refused
connection's end is never taken for a neighbour's.
"""

from __future__ import annotations

import atexit
import dataclasses
import hmac
import itertools
import struct
import threading
from collections.abc import Callable

import zmq

from ._transport import get_context

__all__ = ["Domain", "MonitorFilter", "admit", "check_token", "forget", "present"]

_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_MAX_TOKEN = 255  # PLAIN credentials are short strings

HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


@dataclasses.dataclass(eq=False)
class Domain:
    """One admitting socket's rule: ``token`` and which user names may connect."""

    name: bytes
    token: bytes
    accepts: Callable[[str], bool]
    admitted: int = 0
    refused: int = 0


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


_domains: dict[bytes, Domain] = {}
_domain_ids = itertools.count()
_lock = threading.Lock()
_handler: _Handler | None = None


def admit(kind: str, token: bytes, accepts: Callable[[str], bool]) -> tuple[Domain, dict]:
    """A domain admitting only peers that hold ``token`` and whose user name ``accepts``
    approves, and the socket options (for ``open_socket``) of a socket that admits
    through it. Starts the handler first. :func:`forget` the domain at close."""
    _start_handler()
    domain = Domain(f"zt-{kind}-{next(_domain_ids)}".encode(), token, accepts)
    _domains[domain.name] = domain
    return domain, {"plain_server": 1, "zap_domain": domain.name}


def forget(domain: Domain | None) -> None:
    if domain is not None:
        _domains.pop(domain.name, None)


def present(username: str, token: bytes) -> dict:
    """The socket options of a socket that connects as ``username`` with ``token``."""
    return {"plain_username": username.encode(), "plain_password": token}


def _decide(frames: list[bytes]) -> tuple[bytes, bytes]:
    """(status code, user id) for one ZAP request (RFC 27)."""
    if len(frames) < 6:
        return b"500", b""
    domain = _domains.get(frames[2])
    mechanism, credentials = frames[5], frames[6:]
    if domain is None:
        return b"400", b""
    if mechanism != b"PLAIN" or len(credentials) != 2:
        domain.refused += 1
        return b"400", b""
    username, password = credentials
    try:
        name = username.decode()
        accepted = domain.accepts(name)
    except (UnicodeDecodeError, ValueError):
        accepted = False
    if not (accepted and hmac.compare_digest(password, domain.token)):
        domain.refused += 1
        return b"400", b""
    domain.admitted += 1
    return b"200", username


class _Handler:
    def __init__(self) -> None:
        context = get_context()
        self._stop_address = f"inproc://zt-zap-stop-{id(self)}"
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(context, ready), daemon=True, name="zt-zap"
        )
        self._thread.start()
        ready.wait()
        self._stop = context.socket(zmq.PAIR)
        self._stop.setsockopt(zmq.LINGER, 0)
        self._stop.connect(self._stop_address)

    def _serve(self, context: zmq.Context, ready: threading.Event) -> None:
        zap = context.socket(zmq.REP)
        stop = context.socket(zmq.PAIR)
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
                status, user = _decide(frames)
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
        try:
            self._stop.send(b"stop")
        except zmq.ZMQError:
            pass
        self._thread.join(2.0)
        self._stop.close()


def _start_handler() -> None:
    global _handler
    with _lock:
        if _handler is None:
            _handler = _Handler()
            # Registered after get_context's flush, so it runs first (atexit is LIFO):
            # the handler's sockets are closed by their own thread, never by the flush.
            atexit.register(_stop_handler)


def _stop_handler() -> None:
    global _handler
    with _lock:
        if _handler is not None:
            _handler.close()
            _handler = None


# ----------------------------------------------------------------------------------------
# Monitor events
# ----------------------------------------------------------------------------------------

_EVENT = struct.Struct("=HI")


def event_of(frames: list) -> int:
    """The event number of one monitor message (0 if malformed)."""
    raw = bytes(frames[0]) if frames else b""
    return _EVENT.unpack(raw[: _EVENT.size])[0] if len(raw) >= _EVENT.size else 0


class MonitorFilter:
    """Tells, event by event, which disconnects are a real peer's: a disconnect that
    immediately follows a failed handshake ends a connection that was never admitted."""

    __slots__ = ("_after_failure", "refused")

    def __init__(self) -> None:
        self._after_failure = False
        self.refused = 0  # connections that failed their handshake

    def is_real_disconnect(self, frames: list) -> bool:
        event = event_of(frames)
        if event & HANDSHAKE_FAILED:
            self._after_failure = True
            self.refused += 1
            return False
        if event == zmq.EVENT_DISCONNECTED:
            if self._after_failure:
                self._after_failure = False
                return False
            return True
        return False
