"""The control endpoint: a Unix stream socket in the state dir, serving requests.

The socket file sits in the 0700 state dir and is made 0600, so only its owner can
reach it; each connection's peer is also checked with SO_PEERCRED and a peer of another
uid is answered with a refusal and dropped, should a mode ever be wrong. A connection
carries any number of requests, one at a time (see ``protocol`` for the framing).

Failure rules. A malformed message is answered with an error reply (kind ``rejected``,
seq 0) naming the reason; after a framing error (a count or length out of bounds) the
stream cannot be resynchronised, so the connection is closed, otherwise it stays open.
A connection idle for :data:`IDLE_SECONDS`, or one beyond :data:`MAX_CONNECTIONS` at
once, is closed. A handler's DaemonUsageError is a reply of kind ``usage`` (the client
prints it, exit 2); any other exception in a handler is logged and answered with kind
``error``. Nothing a peer sends can stop the endpoint or the daemon.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import trio

from . import protocol
from .statedir import DaemonUsageError

__all__ = ["IDLE_SECONDS", "MAX_CONNECTIONS", "peer_credentials", "serve_control"]

log = logging.getLogger("zerotrain.daemon")

IDLE_SECONDS = 60.0
MAX_CONNECTIONS = 64
_U32 = struct.Struct(">I")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


class _Reader:
    """Reads exact byte counts from a trio stream (bounded by the caller)."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buf = bytearray()

    async def exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            chunk = await self.stream.receive_some(max(65536, n - len(self.buf)))
            if not chunk:
                return None
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


async def _read_message(reader: _Reader) -> list[bytes] | None:
    """One multipart, or None at a clean end of stream; ControlError when out of bounds."""
    head = await reader.exactly(4)
    if head is None:
        return None
    (count,) = _U32.unpack(head)
    if not 1 <= count <= protocol.MAX_FRAMES:
        raise protocol.ControlError(f"frame count {count} outside [1, {protocol.MAX_FRAMES}]")
    frames = []
    for _ in range(count):
        head = await reader.exactly(4)
        if head is None:
            raise protocol.ControlError("the stream ended inside a message")
        (size,) = _U32.unpack(head)
        if size > protocol.MAX_FRAME_BYTES:
            raise protocol.ControlError(f"frame of {size} bytes exceeds {protocol.MAX_FRAME_BYTES}")
        data = await reader.exactly(size)
        if data is None:
            raise protocol.ControlError("the stream ended inside a message")
        frames.append(data)
    return frames


class _Stats:
    def __init__(self):
        self.connections = 0
        self.requests = 0
        self.rejected = 0
        self.refused_peers = 0


async def serve_control(
    path: Path,
    handle: Callable,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``path`` and answer each request with ``await handle(request)``.

    ``task_status.started(stats)`` once the socket accepts connections.
    """
    path = Path(path)
    try:
        path.unlink()  # a stale socket file of a dead daemon (we hold the state-dir lock)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(MAX_CONNECTIONS)
    stats = _Stats()
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(stats)
            while True:
                try:
                    conn, _ = await sock.accept()
                except OSError as err:
                    if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        await trio.sleep(0.05)  # out of descriptors: let connections end
                        continue
                    raise
                stream = trio.SocketStream(conn)
                try:
                    limiter.acquire_on_behalf_of_nowait(stream)
                except trio.WouldBlock:
                    await stream.aclose()
                    continue
                nursery.start_soon(_connection, stream, handle, stats, limiter)
    finally:
        sock.close()
        try:
            path.unlink()
        except FileNotFoundError:
            pass


async def _connection(stream, handle, stats, limiter) -> None:
    stats.connections += 1
    try:
        async with stream:
            pid, uid, _ = peer_credentials(stream.socket)
            if uid != os.getuid():
                stats.refused_peers += 1
                log.warning("[daemon] refused a control connection from uid %d (pid %d)", uid, pid)
                why = f"refused: this daemon serves uid {os.getuid()} only, the peer is uid {uid}"
                await stream.send_all(protocol.encode_reply(0, kind="refused", why=why))
                return
            reader = _Reader(stream)
            while True:
                frames = None
                with trio.move_on_after(IDLE_SECONDS):
                    try:
                        frames = await _read_message(reader)
                    except protocol.ControlError as err:
                        stats.rejected += 1
                        await stream.send_all(
                            protocol.encode_reply(0, kind="rejected", why=str(err))
                        )
                        return
                    if frames is None:
                        return
                if frames is None:
                    return  # idle too long
                try:
                    seq, request = protocol.decode_call(frames)
                except protocol.ControlError as err:
                    stats.rejected += 1
                    await stream.send_all(protocol.encode_reply(0, kind="rejected", why=str(err)))
                    continue
                stats.requests += 1
                await stream.send_all(await _answer(handle, seq, request))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the peer went away; nothing to answer
    finally:
        limiter.release_on_behalf_of(stream)


async def _answer(handle, seq: int, request) -> bytes:
    try:
        value = await handle(request)
    except DaemonUsageError as err:
        return protocol.encode_reply(seq, kind="usage", why=str(err))
    except Exception as err:  # a handler bug answers this request, the daemon serves on
        log.exception("[daemon] request %s failed", type(request).__name__)
        return protocol.encode_reply(seq, kind="error", why=f"{type(err).__name__}: {err}")
    try:
        return protocol.encode_reply(seq, value=value)
    except (TypeError, ValueError) as err:
        log.exception("[daemon] reply to %s cannot be encoded", type(request).__name__)
        return protocol.encode_reply(seq, kind="error", why=f"unencodable reply: {err}")
