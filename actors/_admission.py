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

CURVE on every tcp:// socket of a process (:class:`Keyring`, :func:`secure_tcp`): once a
process installs a keyring, ``open_socket`` makes each socket that binds a tcp:// endpoint
a CURVE server with the keyring's keypair behind a CURVE domain (every host of the run,
or fewer for an endpoint the keyring narrows: a ring inbox admits its left neighbour's
host only), and each socket that connects to one a CURVE client expecting the key of the
host that binds it. Every such connection says the run's id in its handshake (ZMTP
metadata ``X-Zt-Run``, sent both ways in READY) and a message arriving on a connection
of another run is dropped before anyone reads it (:meth:`Keyring.accepts`). A key names
a host, and the node that reads a message maps its "User-Id" back to that host
(:meth:`Keyring.speaks_for`): a host may speak only for the node names it holds. The
keyring cannot see a peer's routing id at the handshake (ZAP gets the *server's* own
one), so CURVE DEALERs set none and the ROUTER numbers them: a peer with a valid key
that names itself after another host's node could otherwise take that node's pipe over
(ROUTER_HANDOVER) before its first message was refused.

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
import zmq.utils.z85

from . import _transport
from ._transport import get_context

__all__ = ["Admission", "Keyring", "admit_curve", "secure_tcp"]

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
    keys = [_raw_key(key, "a CURVE public key") for key in public_keys]
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
# CURVE on every tcp:// socket: the keyring
# ----------------------------------------------------------------------------------------

RUN_PROPERTY = "X-Zt-Run"  # the run id, in every tcp connection's handshake (ZMTP metadata)
_MAX_RUN_ID = 200  # bytes: a metadata value is at most 255


@dataclasses.dataclass(eq=False)
class Keyring:
    """Who this process is on tcp://, whom it trusts, and who may speak for which node.

    ``host``        the host this process runs on: ``keypair`` is that host's
    ``keypair``     (public, secret), z85 (40 bytes each)
    ``hosts``       every host of the run -> its z85 public key (one key names one host)
    ``run``         the run id: said in every handshake, required of every peer
    ``host_of``     a node name -> the host that may speak for it (None: nobody)
    ``endpoints``   tcp endpoint -> the host that binds it, for sockets that connect by
                    endpoint rather than to a node by name (a ring's outbox)
    ``admits``      bound tcp endpoint -> the hosts that may connect to it (default:
                    every host)

    Install it with :func:`secure_tcp` before the process opens any tcp:// socket.
    ValueError (one line) for a malformed key, an unknown host or an unusable run id."""

    host: str
    keypair: tuple[bytes, bytes]
    hosts: dict[str, bytes]
    run: str
    host_of: Callable[[str], str | None]
    endpoints: dict[str, str] = dataclasses.field(default_factory=dict)
    admits: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    _by_key: dict[str, str] = dataclasses.field(init=False, repr=False)
    _domains: dict[frozenset[str], Admission] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        for what, key in [(f"host {h!r}", k) for h, k in self.hosts.items()] + [
            ("this host's public key", self.keypair[0]),
            ("this host's secret key", self.keypair[1]),
        ]:
            _raw_key(key, what)
        if self.host not in self.hosts or self.hosts[self.host] != self.keypair[0]:
            raise ValueError(
                f"host {self.host!r}: its public key is not the one the keyring lists "
                f"for it (hosts: {', '.join(sorted(self.hosts))})"
            )
        run = self.run.encode() if isinstance(self.run, str) else b""
        if not 1 <= len(run) <= _MAX_RUN_ID or b"\0" in run:
            raise ValueError(
                f"a run id is 1 to {_MAX_RUN_ID} bytes of text without NUL, got {self.run!r:.60}"
            )
        for endpoint, hosts in self.admits.items():
            unknown = set(hosts) - set(self.hosts)
            if unknown:
                raise ValueError(f"{endpoint}: admits unknown host(s) {sorted(unknown)}")
        self._by_key = {key.decode("ascii"): host for host, key in self.hosts.items()}
        self._domains = {}

    # -- what a node checks of each message --------------------------------------------

    def host_of_key(self, user_id: str | None) -> str | None:
        """The host whose z85 public key ``user_id`` is (a frame's "User-Id")."""
        return None if user_id is None else self._by_key.get(user_id)

    def speaks_for(self, user_id: str | None, name: str) -> bool:
        """Whether the connection signed in with ``user_id`` may send as node ``name``."""
        host = self.host_of_key(user_id)
        return host is not None and self.host_of(name) == host

    def accepts(self, frame: zmq.Frame) -> bool:
        """Whether a received message (any of its frames) came on a connection of this
        run: its handshake said this run's id."""
        try:
            return frame.get(RUN_PROPERTY) == self.run
        except zmq.ZMQError:  # no such property: a peer that said no run id
            return False

    # -- socket options (open_socket applies them to tcp:// sockets) --------------------

    def client_options(self, server_host: str) -> dict:
        """Options of a socket connecting to ``server_host``'s socket (ValueError for a
        host the keyring does not know)."""
        if server_host not in self.hosts:
            raise ValueError(
                f"no CURVE key for host {server_host!r} (the run's hosts: "
                f"{', '.join(sorted(self.hosts))})"
            )
        public, secret = self.keypair
        return {
            "CURVE_SERVERKEY": self.hosts[server_host],
            "CURVE_PUBLICKEY": public,
            "CURVE_SECRETKEY": secret,
            "METADATA": f"{RUN_PROPERTY}:{self.run}".encode(),
        }

    def socket_options(self, binds: list[str], connects: list[str], given: dict) -> dict:
        """The CURVE options of a socket binding ``binds`` and connecting ``connects``
        (``given``: the caller's own options, upper-case; a client that names its
        server key keeps it). ValueError (one line) for a socket the keyring cannot
        secure: PLAIN on tcp, tcp binds with different admissions, or a connect to a
        tcp endpoint whose host is not known."""
        tcp_binds = [e for e in binds if e.startswith("tcp://")]
        tcp_connects = [e for e in connects if e.startswith("tcp://")]
        if "PLAIN_SERVER" in given or "PLAIN_USERNAME" in given:
            raise ValueError("a tcp:// socket under the run's keyring is CURVE, not PLAIN")
        if tcp_binds and tcp_connects:
            raise ValueError("a socket under the keyring binds or connects tcp://, not both")
        if tcp_binds:
            allowed = {self.admits.get(e, frozenset(self.hosts)) for e in tcp_binds}
            if len(allowed) > 1:
                raise ValueError(f"tcp binds {tcp_binds} admit different hosts: one socket each")
            public, secret = self.keypair
            return {
                "CURVE_SERVER": 1,
                "CURVE_PUBLICKEY": public,
                "CURVE_SECRETKEY": secret,
                "ZAP_DOMAIN": self._domain(allowed.pop()).name,
                "METADATA": f"{RUN_PROPERTY}:{self.run}".encode(),
            }
        if "CURVE_SERVERKEY" in given:
            return {k: v for k, v in self.client_options(self.host).items() if k not in given}
        servers = {self.endpoints.get(e) for e in tcp_connects}
        if None in servers or len(servers) != 1:
            unknown = [e for e in tcp_connects if e not in self.endpoints]
            raise ValueError(
                f"no CURVE server key for {unknown[0] if unknown else tcp_connects}: not an "
                "endpoint of this run's hosts (connect to a node by name, or list it)"
            )
        return self.client_options(servers.pop())

    def _domain(self, hosts: frozenset[str]) -> Admission:
        """The CURVE domain admitting ``hosts`` (made once, kept with the process's
        handler until exit: sockets come and go, the run's hosts do not)."""
        domain = self._domains.get(hosts)
        if domain is None:
            name = f"zt-curve-{next(_domain_ids)}-{'+'.join(sorted(hosts))}"[:200]
            keys = frozenset(_raw_key(self.hosts[h], f"host {h!r}") for h in hosts)
            domain = Admission(name.encode(), curve_keys=keys)
            _register(get_context(), domain, keep=True)
            self._domains[hosts] = domain
        return domain

    def statistics(self) -> dict[str, int]:
        """Connections admitted and refused (an unknown key) by this keyring's domains."""
        domains = list(self._domains.values())
        return {
            "admitted": sum(d.admitted for d in domains),
            "refused": sum(d.refused for d in domains),
        }


def _raw_key(key: bytes, what: str) -> bytes:
    try:
        raw = zmq.utils.z85.decode(key)
    except (ValueError, TypeError, KeyError, struct.error):
        raw = b""
    if len(raw) != _CURVE_KEY:
        raise ValueError(f"{what}: a CURVE key is 40 z85 characters, got {key!r:.60}")
    return raw


def secure_tcp(keyring: Keyring | None) -> Keyring | None:
    """Make every tcp:// socket this process opens from now on CURVE with ``keyring``
    (None: plaintext again, for tests). Returns the keyring it replaces. Sockets
    already open keep what they had."""
    if keyring is not None and not isinstance(keyring, Keyring):
        raise TypeError(f"expected a Keyring or None, got {type(keyring).__name__}")
    previous, _transport.tcp_keyring = _transport.tcp_keyring, keyring
    return previous


def current_keyring() -> Keyring | None:
    """The keyring :func:`secure_tcp` installed, if any."""
    return _transport.tcp_keyring


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
