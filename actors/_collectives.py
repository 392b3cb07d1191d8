"""Ring collectives among N rank processes over ZeroMQ.

Design note
-----------
Each rank binds a PULL *inbox* and PUSHes to its right neighbour's inbox: the ring
``0 -> 1 -> ... -> N-1 -> 0``. An array of n elements is cut into N contiguous segments
by :func:`shard_bounds` (segment r is rank r's shard everywhere in zerotrain), each
segment into chunks of at most ``chunk_bytes``. A collective is a fixed schedule of
*hops*: at hop k every rank receives one segment from its left neighbour, chunk by chunk,
and either adds it into its array or copies it, then passes the chunk on at hop k+1::

    all_reduce      hops 0..2N-3  receive segment r-k-2: add (k <= N-2) or copy
    reduce_scatter  hops 0..N-2   receive segment r-k-2: add; ends owning segment r
    all_gather      hops 0..N-2   receive segment r-k-1: copy
    broadcast       one hop       receive everything from the root's direction: copy

Pipelining: chunk c of hop k+1 is sent the moment chunk c of hop k is reduced, so on a
two-core machine numpy adds one chunk while libzmq's I/O thread moves the next. Sends go
zero-copy from the array (or from the received frame when only forwarding) through a
sender task, so the receive loop never blocks on a full pipe (a ring whose ranks all
block in send would deadlock).

Determinism: segment s is summed in the fixed order ``x[s+1] + x[s+2] + ... + x[s]``
(ranks mod N), chunking does not change per-element order, and the all-gather hops
copy the finished segment to everyone. So results are bitwise identical on every rank,
run after run, and ``all_reduce`` gives the same bits as ``reduce_scatter`` followed by
``all_gather`` (so ddp and ZeRO-2 agree).

Failure: every message carries (generation, step, seq); ``seq`` counts collectives since
the last :meth:`Ring.set_generation`. Older messages are discarded, a newer one means
the left neighbour moved on (it is kept for later, and this collective fails). A
neighbour disconnecting (process death, or ZMQ heartbeat loss) or no progress for
``timeout`` seconds raises :class:`CollectiveError`; the failing rank also sends an
*abort* to its right, which is passed on around the ring, so survivors fail promptly
instead of waiting for their own timeout. After a CollectiveError the ring refuses work
until every rank calls ``set_generation`` with a new, larger generation.

In-flight buffers: a collective returns only after libzmq has released its last send
(tracked; sends on one pipe are released in order), so the caller may mutate the array
and may close the ring or exit at once.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import trio
import zmq

from ._frames import DTYPES
from ._transport import TrioSocket, open_socket, wait_released

__all__ = ["CollectiveError", "Ring", "shard_bounds"]


class CollectiveError(RuntimeError):
    """A collective could not complete: a peer died, stalled, aborted or disagreed.

    The ring is unusable until :meth:`Ring.set_generation` is called with a larger
    generation on every rank.
    """


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """The half-open range ``[start, stop)`` of rank's contiguous shard of n elements.

    Shards differ in size by at most one; the first ``n % world`` shards are the longer
    ones. Every sharded thing in zerotrain (gradients, optimizer state, checkpoints)
    uses this one function.
    """
    if n < 0 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"need n >= 0, world >= 1, 0 <= rank < world; got {n}, {world}, {rank}")
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


# ----------------------------------------------------------------------------------------
# Wire format of ring messages
# ----------------------------------------------------------------------------------------
# Two frames: a fixed 56-byte header and a payload (chunk bytes, or an abort reason).
# A fixed struct instead of the msgpack codec: it is parsed once per chunk on the hot
# path, and every field is checked against what the schedule expects.

_MAGIC = b"ZTRG"
_VERSION = 1
_HEADER = struct.Struct("<4sBBBBiiqqqiiq")
# magic, version, kind, op, dtype, sender, origin, generation, step, seq, hop, chunk, n
_DATA, _ABORT = 1, 2
_OPS = {"all_reduce": 1, "reduce_scatter": 2, "all_gather": 3, "broadcast": 4, "barrier": 5}
_OP_NAMES = {code: name for name, code in _OPS.items()}
_DTYPE_CODES = {dtype: code for code, dtype in enumerate(DTYPES.values())}
_SUM_DTYPES = {np.dtype(t) for t in ("<f4", "<f8", "<i4", "<i8")}
_MAX_REASON = 1024
_ABORT_WAIT = 1.0  # seconds an abort may wait for the right link
_ADD, _COPY = 1, 2
_NO_FORWARD, _FROM_ARRAY, _FROM_FRAME = 0, 1, 2


@dataclass(frozen=True)
class _Header:
    kind: int
    op: int
    dtype: int
    sender: int
    origin: int
    generation: int
    step: int
    seq: int
    hop: int
    chunk: int
    n: int


def _parse_header(frames: list) -> _Header:
    if len(frames) != 2:
        raise CollectiveError(f"malformed ring message: {len(frames)} frames, expected 2")
    raw = frames[0].buffer
    if len(raw) != _HEADER.size:
        raise CollectiveError(f"malformed ring message: header of {len(raw)} bytes")
    magic, version, *fields = _HEADER.unpack(raw)
    if magic != _MAGIC or version != _VERSION:
        raise CollectiveError(f"malformed ring message: magic {magic!r} version {version}")
    header = _Header(*fields)
    if header.kind not in (_DATA, _ABORT):
        raise CollectiveError(f"malformed ring message: kind {header.kind}")
    return header


@dataclass(frozen=True)
class _Hop:
    """One receive hop of a schedule: which elements arrive, what to do with them."""

    hop: int
    start: int
    stop: int
    action: int  # _ADD or _COPY
    forward: int  # _NO_FORWARD, _FROM_ARRAY or _FROM_FRAME (as hop + 1)


# ----------------------------------------------------------------------------------------
# Ring
# ----------------------------------------------------------------------------------------


class Ring:
    """This rank's end of a ring over ``world`` rank processes.

    ``endpoints`` lists every rank's inbox address (``ipc://`` or ``tcp://``), or is one
    template with ``{rank}`` in it; rank r binds ``endpoints[r]`` and connects to
    ``endpoints[(r+1) % world]``. Every rank must call the same collectives in the same
    order with the same ``step``, sizes and dtypes; a mismatch raises CollectiveError.

    ``timeout`` bounds how long a collective may go without progress (a chunk received
    or sent) before it raises CollectiveError; a dead neighbour is noticed sooner, from
    the disconnect (immediate for a killed process, HEARTBEAT_TIMEOUT for a frozen one).

    Not for use from two tasks at once: one collective at a time, like NCCL's stream.
    """

    def __init__(
        self,
        rank: int,
        world: int,
        endpoints: Sequence[str] | str,
        *,
        generation: int = 0,
        timeout: float = 30.0,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need world >= 1 and 0 <= rank < world, got {rank}, {world}")
        if isinstance(endpoints, str):
            endpoints = [endpoints.format(rank=r) for r in range(world)]
        if len(endpoints) != world:
            raise ValueError(f"need {world} endpoints, one per rank, got {len(endpoints)}")
        if not 4096 <= chunk_bytes <= 16 << 20:
            raise ValueError(f"chunk_bytes must be in [4 KiB, 16 MiB], got {chunk_bytes}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.rank = rank
        self.world = world
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._generation = generation
        self._seq = 0
        self._broken: str | None = None
        self._held: deque[list] = deque()  # messages from a newer (generation, seq)
        self._closed = False
        self._stats = dict.fromkeys(
            ("collectives", "bytes_sent", "bytes_received", "stale_discarded", "failures"), 0
        )
        self._inbox: TrioSocket | None = None
        self._outbox: TrioSocket | None = None
        self._monitors: list[tuple[str, TrioSocket]] = []
        if world == 1:
            return
        limit = max(chunk_bytes, _MAX_REASON, _HEADER.size)
        self._inbox = open_socket(
            "PULL", bind=self.endpoints[rank], rcvhwm=16, maxmsgsize=limit, linger=0
        )
        # Sends are zero-copy references into arrays: a deep send queue costs nothing
        # and lets a whole segment be queued at once.
        self._outbox = open_socket(
            "PUSH",
            connect=self.endpoints[(rank + 1) % world],
            sndhwm=1 << 16,
            maxmsgsize=limit,
            linger=500,
        )
        for name, sock in (("left", self._inbox), ("right", self._outbox)):
            address = f"inproc://ring-monitor-{id(self)}-{name}"
            sock.zmq.monitor(address, zmq.EVENT_DISCONNECTED)
            self._monitors.append((name, open_socket("PAIR", connect=address, linger=0)))

    # -- client API ----------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._generation

    def set_generation(self, generation: int) -> None:
        """Start a new generation: older messages are discarded, the ring usable again.

        Every rank must call it with the same value, larger than the current one, before
        its next collective (typically after a failed rank was replaced).
        """
        if generation <= self._generation:
            raise ValueError(f"generation must grow: {generation} <= {self._generation}")
        self._generation = generation
        self._seq = 0
        self._broken = None

    def stats(self) -> dict[str, int]:
        """Counters: collectives, bytes_sent, bytes_received, stale_discarded, failures."""
        return dict(self._stats, generation=self._generation, rank=self.rank)

    async def all_reduce(self, array: np.ndarray, *, step: int) -> np.ndarray:
        """Sum ``array`` over all ranks, in place; returns ``array``."""
        flat = self._flat(array, "all_reduce", sum_op=True)
        await self._run_all_reduce_as("all_reduce", flat, step)
        return array

    async def reduce_scatter(self, array: np.ndarray, *, step: int) -> np.ndarray:
        """Sum over all ranks into this rank's shard; returns that shard (a view).

        The shard is ``array.reshape(-1)[start:stop]`` with ``shard_bounds``; the rest of
        ``array`` is left holding partial sums.
        """
        flat = self._flat(array, "reduce_scatter", sum_op=True)
        n, r, world = flat.size, self.rank, self.world
        hops = [
            _Hop(
                k,
                *shard_bounds(n, world, (r - k - 2) % world),
                _ADD,
                _FROM_ARRAY if k < world - 2 else _NO_FORWARD,
            )
            for k in range(world - 1)
        ]
        await self._run(
            "reduce_scatter", flat, step, [shard_bounds(n, world, (r - 1) % world)], hops
        )
        start, stop = shard_bounds(n, world, r)
        return flat[start:stop]

    async def all_gather(self, array: np.ndarray, *, step: int) -> np.ndarray:
        """Fill every rank's shard of ``array`` from its owner, in place; returns ``array``.

        On entry this rank's shard (``shard_bounds``) holds its data; the rest is
        overwritten.
        """
        flat = self._flat(array, "all_gather", sum_op=False)
        n, r, world = flat.size, self.rank, self.world
        hops = [
            _Hop(
                k,
                *shard_bounds(n, world, (r - k - 1) % world),
                _COPY,
                _FROM_FRAME if k < world - 2 else _NO_FORWARD,
            )
            for k in range(world - 1)
        ]
        await self._run("all_gather", flat, step, [shard_bounds(n, world, r)], hops)
        return array

    async def broadcast(self, array: np.ndarray, root: int, *, step: int) -> np.ndarray:
        """Copy ``array`` from rank ``root`` to every rank, in place; returns ``array``."""
        if not 0 <= root < self.world:
            raise ValueError(f"root must be in [0, {self.world}), got {root}")
        flat = self._flat(array, "broadcast", sum_op=False)
        world, r = self.world, self.rank
        if r == root:
            await self._run("broadcast", flat, step, [(0, flat.size)], [])
        else:
            hop = (r - root - 1) % world
            forward = _FROM_FRAME if (r + 1) % world != root else _NO_FORWARD
            await self._run("broadcast", flat, step, [], [_Hop(hop, 0, flat.size, _COPY, forward)])
        return array

    async def barrier(self, *, step: int) -> None:
        """Return once every rank has entered the barrier."""
        # One element per rank, so every hop carries a message from every direction.
        await self._run_all_reduce_as("barrier", np.zeros(self.world, np.float32), step)

    def close(self) -> None:
        """Close the sockets. Idempotent."""
        if self._closed:
            return
        self._closed = True
        # Order matters: libzmq emits monitor events with a *blocking* send under a
        # lock that disable_monitor also takes; with our reading end closed first, a
        # late event (the peer exiting) blocks the I/O thread forever, and then
        # disable_monitor too (seen here as a hang at exit).
        for sock in (self._inbox, self._outbox):
            if sock is not None:
                sock.zmq.disable_monitor()
        for _, monitor in self._monitors:
            monitor.close()
        for sock in (self._inbox, self._outbox):
            if sock is not None:
                sock.close()

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the engine ----------------------------------------------------------------------

    async def _run_all_reduce_as(self, op: str, flat: np.ndarray, step: int) -> None:
        n, r, world = flat.size, self.rank, self.world
        hops = [
            _Hop(
                k,
                *shard_bounds(n, world, (r - k - 2) % world),
                _ADD if k <= world - 2 else _COPY,
                _FROM_ARRAY
                if k <= world - 2
                else _FROM_FRAME
                if k < 2 * world - 3
                else _NO_FORWARD,
            )
            for k in range(2 * world - 2)
        ]
        await self._run(op, flat, step, [shard_bounds(n, world, (r - 1) % world)], hops)

    def _flat(self, array: np.ndarray, op: str, *, sum_op: bool) -> np.ndarray:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"{op} needs a numpy array, got {type(array).__name__}")
        accepted = _SUM_DTYPES if sum_op else _DTYPE_CODES
        if array.dtype not in accepted:
            names = sorted(str(d) for d in accepted)
            raise TypeError(f"{op} accepts dtypes {names}, got {array.dtype}")
        if not (array.flags.c_contiguous and array.flags.writeable):
            raise ValueError(f"{op} needs a C-contiguous, writeable array (no copy is made)")
        return array.reshape(-1)

    def _chunks(self, start: int, stop: int, itemsize: int) -> list[tuple[int, int]]:
        per = max(1, self.chunk_bytes // itemsize)
        return [(a, min(a + per, stop)) for a in range(start, stop, per)]

    async def _run(
        self,
        op: str,
        flat: np.ndarray,
        step: int,
        initial: list[tuple[int, int]],
        hops: list[_Hop],
    ) -> None:
        if self._closed:
            raise trio.ClosedResourceError("ring was closed")
        if self._broken is not None:
            raise CollectiveError(
                f"ring is broken ({self._broken}); call set_generation(g) with "
                f"g > {self._generation} on every rank first"
            )
        if type(step) is not int:
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        self._stats["collectives"] += 1
        if self.world == 1:
            await trio.lowlevel.checkpoint()
            return
        seq = self._seq
        self._seq += 1
        for _, monitor in self._monitors:  # disconnects between collectives do not count
            _drain(monitor)
        run = _Run(self, op, flat, step, seq)
        try:
            await run.execute(initial, hops)
        except CollectiveError as exc:
            self._broken = str(exc)
            self._stats["failures"] += 1
            await self._send_abort(run, str(exc))
            raise

    async def _send_abort(self, run: _Run, reason: str) -> None:
        """Tell the right neighbour, waiting at most a second (it may be the dead one)."""
        assert self._outbox is not None
        right = (self.rank + 1) % self.world
        if self._outbox.closed or run.right_down or run.abort_origin == right:
            return
        if run.abort_origin is None:
            origin = self.rank
        else:  # pass the original on, not our wrapping of it
            origin, reason = run.abort_origin, run.abort_reason
        frames = [run.header(_ABORT, 0, 0, origin=origin), reason.encode()[:_MAX_REASON]]
        with trio.move_on_after(min(self.timeout, _ABORT_WAIT)):
            try:
                await self._outbox.send_multipart(frames)
            except trio.ClosedResourceError:
                pass  # the neighbours' own timeouts still bound their wait


def _drain(sock: TrioSocket) -> None:
    while True:
        try:
            sock.zmq.recv_multipart(zmq.DONTWAIT)
        except zmq.Again:
            return


class _Run:
    """One collective in progress: the receive loop, the sender task, the link watchers.

    Helper tasks never raise out of the nursery; they record the first failure and cancel
    the collective, which then raises that failure (a plain CollectiveError, not an
    ExceptionGroup).
    """

    def __init__(self, ring: Ring, op: str, flat: np.ndarray, step: int, seq: int) -> None:
        self.ring = ring
        self.op = op
        self.flat = flat
        self.step = step
        self.seq = seq
        self.failure: CollectiveError | None = None
        self.abort_origin: int | None = None  # set when the failure is a received abort
        self.abort_reason = ""
        self.scope: trio.CancelScope | None = None
        self.final_tracker: zmq.MessageTracker | None = None
        self.op_code = _OPS[op]
        self.dtype_code = _DTYPE_CODES[flat.dtype]
        self.left = (ring.rank - 1) % ring.world
        self.left_down = False
        self.right_down = False
        self.receiving = True  # until every expected chunk has arrived
        self.sending = True  # until the last send was queued to libzmq

    def header(self, kind: int, hop: int, chunk: int, *, origin: int | None = None) -> bytes:
        ring = self.ring
        return _HEADER.pack(
            _MAGIC, _VERSION, kind, self.op_code, self.dtype_code, ring.rank,
            ring.rank if origin is None else origin, ring._generation, self.step, self.seq,
            hop, chunk, self.flat.size,
        )  # fmt: skip

    def fail(self, exc: CollectiveError) -> None:
        if self.failure is None:
            self.failure = exc
        if self.scope is not None:
            self.scope.cancel()

    def progress(self) -> None:
        assert self.scope is not None
        self.scope.deadline = trio.current_time() + self.ring.timeout

    async def execute(self, initial: list[tuple[int, int]], hops: list[_Hop]) -> None:
        ring = self.ring
        itemsize = self.flat.itemsize
        sends = [(0, self._chunk_views(a, b)) for a, b in initial]
        total_sends = sum(len(views) for _, views in sends) + sum(
            len(ring._chunks(h.start, h.stop, itemsize)) for h in hops if h.forward
        )
        send_tx, send_rx = trio.open_memory_channel[tuple[bytes, object]](math.inf)
        for hop, views in sends:
            for c, view in enumerate(views):
                send_tx.send_nowait((self.header(_DATA, hop, c), view))
        timed_out = False
        with trio.move_on_after(ring.timeout) as scope:
            self.scope = scope
            async with trio.open_nursery() as nursery:
                sender_done = trio.Event()
                nursery.start_soon(self._send_loop, send_rx, total_sends, sender_done)
                for name, monitor in ring._monitors:
                    nursery.start_soon(self._watch_link, name, monitor)
                try:
                    await self._receive_loop(hops, send_tx)
                    self.receiving = False
                    send_tx.close()
                    await sender_done.wait()
                    if self.final_tracker is not None and not self.final_tracker.done:
                        await wait_released(self.final_tracker, ring.timeout)
                except CollectiveError as exc:
                    self.fail(exc)
                except TimeoutError:
                    self.fail(CollectiveError(f"{self._what()}: last send never released"))
                finally:
                    nursery.cancel_scope.cancel()
        timed_out = scope.cancelled_caught and self.failure is None
        if timed_out:
            self.failure = CollectiveError(
                f"{self._what()}: no progress for {ring.timeout} s "
                f"(left rank {self.left}, right rank {(ring.rank + 1) % ring.world})"
            )
        if self.failure is not None:
            raise self.failure

    def _what(self) -> str:
        ring = self.ring
        return (
            f"rank {ring.rank}/{ring.world} {self.op} "
            f"(generation {ring._generation}, step {self.step}, seq {self.seq})"
        )

    def _chunk_views(self, start: int, stop: int) -> list[np.ndarray]:
        return [self.flat[a:b] for a, b in self.ring._chunks(start, stop, self.flat.itemsize)]

    # -- tasks ---------------------------------------------------------------------------

    async def _send_loop(self, items, total: int, done: trio.Event) -> None:
        outbox = self.ring._outbox
        assert outbox is not None
        sent = 0
        try:
            async for header, payload in items:
                sent += 1
                last = sent == total
                if last and isinstance(payload, zmq.Frame):
                    payload = payload.buffer  # a received Frame cannot be tracked itself
                tracker = await outbox.send_multipart([header, payload], copy=False, track=last)
                self.ring._stats["bytes_sent"] += memoryview(payload).nbytes
                if last:
                    self.final_tracker = tracker
                self.progress()
        except trio.ClosedResourceError:
            self.fail(CollectiveError(f"{self._what()}: ring closed while sending"))
        finally:
            self.sending = False
            done.set()

    async def _watch_link(self, name: str, monitor: TrioSocket) -> None:
        # A disconnect is fatal only if it can still matter: the left neighbour's
        # messages that arrived before it went away are still delivered (a rank that
        # finished and exited is not a failure), and once everything is sent the right
        # neighbour is no longer needed.
        try:
            await monitor.recv_multipart()
        except trio.ClosedResourceError:
            self.fail(CollectiveError(f"{self._what()}: ring closed"))
            return
        if name == "left":
            self.left_down = True
            if not self.receiving or self._pending():
                return  # the receive loop fails when it runs dry
            peer = self.left
        else:
            self.right_down = True
            if not self.sending:
                return
            peer = (self.ring.rank + 1) % self.ring.world
        self.fail(CollectiveError(f"{self._what()}: {name} neighbour rank {peer} disconnected"))

    def _pending(self) -> bool:
        inbox = self.ring._inbox
        assert inbox is not None
        return bool(self.ring._held) or bool(inbox.zmq.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    async def _receive_loop(self, hops: list[_Hop], send_tx) -> None:
        ring = self.ring
        inbox = ring._inbox
        assert inbox is not None
        flat = self.flat
        itemsize = flat.itemsize
        expected = [
            (hop, c, start, stop)
            for hop in hops
            for c, (start, stop) in enumerate(ring._chunks(hop.start, hop.stop, itemsize))
        ]
        position = 0
        held = ring._held
        while position < len(expected):
            if held:
                frames = held.popleft()
            else:
                if self.left_down and not self._pending():
                    raise CollectiveError(
                        f"{self._what()}: left neighbour rank {self.left} disconnected"
                    )
                try:
                    frames = await inbox.recv_multipart(copy=False)
                except trio.ClosedResourceError:
                    raise CollectiveError(f"{self._what()}: ring closed") from None
            header = _parse_header(frames)
            if not self._is_current(header, frames):
                continue
            hop, chunk, start, stop = expected[position]
            self._check(header, hop, chunk, frames[1], (stop - start) * itemsize)
            position += 1
            self.progress()
            ring._stats["bytes_received"] += (stop - start) * itemsize
            frame = frames[1]
            received = np.frombuffer(frame.buffer, flat.dtype)
            target = flat[start:stop]
            next_header = self.header(_DATA, hop.hop + 1, chunk) if hop.forward else b""
            if hop.action == _ADD:
                np.add(target, received, out=target)
                if hop.forward == _FROM_ARRAY:
                    send_tx.send_nowait((next_header, target))
            else:
                if hop.forward == _FROM_FRAME:  # pass it on first: the copy overlaps
                    send_tx.send_nowait((next_header, frame))
                np.copyto(target, received)
                if hop.forward == _FROM_ARRAY:
                    send_tx.send_nowait((next_header, target))

    def _is_current(self, header: _Header, frames: list) -> bool:
        """Discard stale messages, stash early ones, raise on an abort; else True."""
        ring = self.ring
        mine = (ring._generation, self.seq)
        theirs = (header.generation, header.seq)
        if theirs < mine:
            ring._stats["stale_discarded"] += 1
            return False
        if theirs > mine:
            ring._held.append(frames)
            raise CollectiveError(
                f"{self._what()}: left rank {header.sender} is already at generation "
                f"{header.generation}, seq {header.seq}"
            )
        if header.kind == _ABORT:
            self.abort_origin = header.origin
            self.abort_reason = bytes(frames[1].buffer[:_MAX_REASON]).decode(errors="replace")
            raise CollectiveError(
                f"{self._what()}: rank {header.origin} aborted: {self.abort_reason}"
            )
        return True

    def _check(self, header: _Header, hop: _Hop, chunk: int, frame, nbytes: int) -> None:
        got = (header.op, header.dtype, header.n, header.step, header.sender)
        want = (self.op_code, self.dtype_code, self.flat.size, self.step, self.left)
        if got != want:
            raise CollectiveError(
                f"{self._what()}: mismatch with left rank: (op, dtype, n, step, sender) "
                f"= {(_OP_NAMES.get(header.op), *got[1:])}, expected "
                f"{(self.op, *want[1:])}; all ranks must call the same collectives"
            )
        if (header.hop, header.chunk, len(frame)) != (hop.hop, chunk, nbytes):
            raise CollectiveError(
                f"{self._what()}: (hop, chunk, nbytes) = "
                f"{(header.hop, header.chunk, len(frame))}, expected {(hop.hop, chunk, nbytes)}"
            )
