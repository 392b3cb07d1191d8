"""Ring collectives among N rank processes over ZeroMQ (and shared memory on one host).

Design note
-----------
Each rank binds a DEALER *inbox* and connects a DEALER *outbox* to its right neighbour's
inbox: the ring ``0 -> 1 -> ... -> N-1 -> 0``. Chunks flow right; small *acks* flow back
left on the same connection. An array of n elements is cut into N contiguous segments
by :func:`shard_bounds` (segment r is rank r's shard everywhere in zerotrain), each
segment into chunks of at most ``chunk_bytes``. A collective is a fixed schedule of
*hops*: at hop k every rank receives one segment from its left neighbour, chunk by chunk,
and either adds it into its array or copies it, then passes the chunk on at hop k+1::

    all_reduce      hops 0..2N-3  receive segment r-k-2: add (k <= N-2) or copy
    reduce_scatter  hops 0..N-2   receive segment r-k-2: add; ends owning segment r
    all_gather      hops 0..N-2   receive segment r-k-1: copy
    broadcast       one hop       receive everything from the root's direction: copy

Pipelining: chunk c of hop k+1 is sent the moment chunk c of hop k is reduced, so one
chunk is added while the next one travels. A sender task does the sending, so the
receive loop never blocks on a full pipe (a ring whose ranks all block in send would
deadlock).

Two wires carry the chunks:

* **frames** (any endpoints): the chunk is a ZeroMQ frame, sent zero-copy from the array
  (or from the received frame when only forwarding). Every byte crosses the kernel twice
  (write, then read), which on a two-core machine is most of the cost.
* **lanes** (``ipc://`` rings, Linux): each rank writes chunks into a sealed memfd of
  ``lane_slots`` slots that its right neighbour maps read-only (through ``/proc/<pid>/
  fd/<n>``); only a small notice travels over ZeroMQ, and the receiver returns the slot
  with a *credit* ack. One memcpy per byte instead of two kernel copies, and the add
  reads straight from the slot. A lane lives for one generation; the memory is freed
  when both ends are gone, so a killed rank leaks nothing.

Determinism: segment s is summed in the fixed order ``x[s+1] + x[s+2] + ... + x[s]``
(ranks mod N), chunking does not change per-element order, and the all-gather hops
copy the finished segment to everyone. So results are bitwise identical on every rank,
run after run, on either wire, and ``all_reduce`` gives the same bits as
``reduce_scatter`` followed by ``all_gather`` (so ddp and ZeRO-2 agree).

The bf16 wire: ``all_reduce`` and ``reduce_scatter`` of a float32 array with
``wire="bf16"`` send every chunk as bfloat16 (``actors._bf16``: round to nearest even,
integer arithmetic) and add what arrives into the float32 array, in float32. A partial
sum is rounded each time it leaves a rank; the rank that completes a segment rounds it
too, in place, before passing it on, so the owner and every rank it is gathered to hold
the same bits (and ``all_reduce`` still equals ``reduce_scatter`` then ``all_gather``).
Half the bytes on either wire, the order of operations as fixed as above: the same bits
run after run whatever the timing (``actors._bf16_ref.ring_sum_bf16`` is the reference).
A ring of one rank sends nothing and rounds nothing.

Failure: every message carries (generation, step, seq); ``seq`` counts collectives since
the last :meth:`Ring.set_generation`. Older messages are discarded, a newer one means
the left neighbour moved on (it is kept for later, and this collective fails). A
neighbour disconnecting (process death, or ZMQ heartbeat loss) or no progress for
``timeout`` seconds raises :class:`CollectiveError`; the failing rank also sends an
*abort* to its right, which is passed on around the ring, so survivors fail promptly
instead of waiting for their own timeout. After a CollectiveError the ring refuses work
until every rank calls ``set_generation`` with a new, larger generation.

Replacing a dead rank (tests/actors/test_ring_rejoin.py): a fresh process builds a new
``Ring`` on the dead rank's endpoint with ``generation=g+1`` (binding an ``ipc://`` path
replaces the dead socket's file); the survivors keep their rings and call
``set_generation(g+1)``, before or after the newcomer is up. ZeroMQ reconnects the left
neighbour's outbox by itself. Messages still queued for the dead rank reach the newcomer
and are discarded as stale; messages the newcomer sends to a survivor still inside a
generation-g collective fail that collective at once and are kept for generation g+1.
A SIGKILLed neighbour is noticed about ``_LINK_GRACE`` (0.1 s) after the kill when the
survivor is in a collective; a neighbour lost while the survivor was between collectives
fails its next collective of that generation at once (a replacement always comes with a
newer generation, so that generation cannot complete). ``set_generation`` forgets
earlier disconnects. A peer that stalls without disconnecting (SIGSTOP) fails the
collective of its left neighbour after HEARTBEAT_TIMEOUT (the outbox heart-beats; the
inbox cannot, see ``__init__``) and, through its abort, of the ranks that abort reaches;
its right neighbour fails at the timeout, or when the stalled rank is killed or its
replacement's first message arrives.

Admission: with a run token (``token``, by default the node's: ``actors._admission``)
an inbox admits only its left neighbour's outbox, at the ZMTP handshake. A stranger's
connection gets no pipe: it can neither receive the acks (a bound DEALER deals them
among its peers) nor fill the inbox, and its end is told apart from the neighbour's
(``MonitorFilter``), so it never fails a collective. Without a token anyone who can
open the endpoint is a neighbour.

Completion: a rank that has received everything sends a *done* ack to its left; a rank
returns only when it has received everything and its right neighbour has acked all it
was sent. So when a collective returns nothing of it still reads the array (the caller
may mutate it), and the process may close the ring or exit at once without its slower
neighbour losing data (libzmq drops unread input of a peer that hangs up while the
receiver's queue is full). The last done ack may still be queued in libzmq when the
collective returns; closing the ring lingers, and ``actors._transport`` flushes the
context at interpreter exit, so it still arrives.
"""

from __future__ import annotations

import fcntl
import itertools
import mmap
import os
import secrets
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import trio
import zmq

from . import _admission, _registry
from ._admission import HANDSHAKE_FAILED, MonitorFilter
from ._bf16 import bf16_add, bf16_add_round, bf16_round, bf16_widen
from ._frames import DTYPES
from ._transport import TrioSocket, open_socket

__all__ = ["CollectiveError", "Ring", "shard_bounds"]


_NODE_TOKEN = object()  # Ring(token=...) default: the token of this process's node


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
# Two frames: a fixed 56-byte header and a payload: the chunk's bytes (_DATA), a lane
# reference (_LANE) or an abort reason (_ABORT). A fixed struct instead of the msgpack
# codec: it is parsed once per chunk on the hot path, and every field is checked against
# what the schedule expects.

_MAGIC = b"ZTRG"
_VERSION = 1
_HEADER = struct.Struct("<4sBBBBiiqqqiiq")
# magic, version, kind, op, dtype, sender, origin, generation, step, seq, hop, chunk, n
_DATA, _ABORT, _LANE = 1, 2, 3
_OPS = {"all_reduce": 1, "reduce_scatter": 2, "all_gather": 3, "broadcast": 4, "barrier": 5}
_OP_NAMES = {code: name for name, code in _OPS.items()}
_DTYPE_CODES = {dtype: code for code, dtype in enumerate(DTYPES.values())}
_BF16_CODE = 255  # the header's dtype of a chunk on the bf16 wire (not a DTYPES code)
_WIRES = (None, "bf16")
_U16 = np.dtype("<u2")
_SUM_DTYPES = {np.dtype(t) for t in ("<f4", "<f8", "<i4", "<i8")}
_MAX_REASON = 1024
_ABORT_WAIT = 1.0  # seconds an abort may wait for the right link
_LINK_GRACE = 0.1  # seconds between a disconnect event and believing it
_PIPELINE_DEPTH = 2  # chunks per segment wanted, for overlap
_MIN_CHUNK_BYTES = 64 << 10
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
    if header.kind not in (_DATA, _ABORT, _LANE):
        raise CollectiveError(f"malformed ring message: kind {header.kind}")
    return header


# Acks travel right to left: a *credit* returns a lane slot (lanes only), *done* says
# "I have everything you sent me in this collective".
_ACK = struct.Struct("<4sBBqq16sI")  # magic, version, kind, generation, seq, token, slot
_ACK_MAGIC = b"ZTAK"
_CREDIT, _DONE = 1, 2
_NO_TOKEN = bytes(16)


@dataclass(frozen=True)
class _Hop:
    """One receive hop of a schedule: which elements arrive, what to do with them."""

    hop: int
    start: int
    stop: int
    action: int  # _ADD or _COPY
    forward: int  # _NO_FORWARD, _FROM_ARRAY or _FROM_FRAME (as hop + 1)


# ----------------------------------------------------------------------------------------
# Shared-memory lanes
# ----------------------------------------------------------------------------------------
# A lane is a memfd: one page of header (magic, token, slots, slot bytes), then the
# slots, each page-aligned. The writer seals its size so a reader can never be made to
# fault (SIGBUS) by a shrinking file. Notices and credits name a slot and carry the
# lane's random token, so a notice can never be applied to the wrong mapping.

_LANE_MAGIC = b"ZTLANE01"
_LANE_INFO = struct.Struct("<8s16sII")  # magic, token, slots, slot bytes
_LANE_REF = struct.Struct("<16siiI")  # token, writer pid, writer fd, slot
_PAGE = mmap.PAGESIZE
_MAX_LANE_SLOTS = 64


def _lanes_supported() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd")


class _OutLane:
    """The writing end of a lane: this rank fills slots, its right neighbour reads them."""

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.token = secrets.token_bytes(16)
        self.slot_bytes = -(-slot_bytes // _PAGE) * _PAGE
        size = _PAGE + slots * self.slot_bytes
        self.fd = os.memfd_create("zerotrain-ring-lane", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, seals)
            self._map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self._map[: _LANE_INFO.size] = _LANE_INFO.pack(
            _LANE_MAGIC, self.token, slots, self.slot_bytes
        )
        memory = np.frombuffer(self._map, np.uint8)
        size = self.slot_bytes
        self.slots = [memory[_PAGE + i * size :][:size] for i in range(slots)]
        self.free = deque(range(slots))
        self.pid = os.getpid()

    def ref(self, slot: int) -> bytes:
        return _LANE_REF.pack(self.token, self.pid, self.fd, slot)

    def close(self) -> None:
        self.slots = []
        try:
            self._map.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with it
        os.close(self.fd)


class _InLane:
    """The reading end: the left neighbour's lane, mapped read-only."""

    def __init__(self, token: bytes, pid: int, fd: int) -> None:
        try:
            handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CollectiveError(
                f"cannot open the left neighbour's shared-memory lane (pid {pid}, fd {fd}): "
                f"{exc}; ranks on different hosts or a restricted /proc need "
                "Ring(..., lanes=False)"
            ) from None
        try:
            size = os.fstat(handle).st_size
            if size < _PAGE:
                raise CollectiveError(f"shared-memory lane of {size} bytes is too small")
            self._map = mmap.mmap(handle, size, prot=mmap.PROT_READ)
        except (OSError, ValueError) as exc:  # not a mappable file: not our lane
            raise CollectiveError(f"cannot map the left neighbour's lane: {exc}") from None
        finally:
            os.close(handle)
        magic, got_token, slots, slot_bytes = _LANE_INFO.unpack(self._map[: _LANE_INFO.size])
        valid = (
            magic == _LANE_MAGIC
            and got_token == token
            and 1 <= slots <= _MAX_LANE_SLOTS
            and slot_bytes % _PAGE == 0
            and size == _PAGE + slots * slot_bytes
        )
        if not valid:
            self._map.close()
            raise CollectiveError("the left neighbour's lane does not match its notice")
        self.token = token
        memory = np.frombuffer(self._map, np.uint8)
        self.slots = [memory[_PAGE + i * slot_bytes :][:slot_bytes] for i in range(slots)]

    def close(self) -> None:
        self.slots = []
        try:
            self._map.close()
        except BufferError:
            pass


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
    the disconnect (immediate for a killed process, HEARTBEAT_TIMEOUT for a frozen right
    neighbour; see the module doc).

    ``lanes`` moves chunks through shared memory instead of ZeroMQ frames (see the
    module doc); the default, None, uses them when every endpoint is ``ipc://`` and the
    platform has memfd. All ranks must agree.

    ``token`` (16-255 bytes) admits only the run's processes, each inbox only its left
    neighbour (module doc, "Admission"); every rank must use the same. The default is
    this process's node's token (``open_node(token=...)``, inherited by process
    children), or none without a node; None admits anyone.

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
        chunk_bytes: int = 4 << 20,
        lanes: bool | None = None,
        lane_slots: int = 8,
        token: str | bytes | None | object = _NODE_TOKEN,
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
        if not 1 <= lane_slots <= _MAX_LANE_SLOTS:
            raise ValueError(f"lane_slots must be in [1, {_MAX_LANE_SLOTS}], got {lane_slots}")
        all_ipc = all(e.startswith("ipc://") for e in endpoints)
        if lanes is None:
            lanes = all_ipc and _lanes_supported()
        elif lanes and not (all_ipc and _lanes_supported()):
            raise ValueError("lanes=True needs ipc:// endpoints and Linux memfd (one host)")
        self.rank = rank
        self.world = world
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.lanes = bool(lanes) and world > 1
        self.lane_slots = lane_slots
        self._generation = generation
        self._seq = 0
        self._broken: str | None = None
        self._held: deque[list] = deque()  # messages from a newer (generation, seq)
        # The bf16 wire's outgoing bits, element i of the array at index i: each element
        # leaves a rank at most once per collective (its segments are all distinct), and a
        # collective returns only when the right neighbour has everything it was sent, so
        # the next collective may overwrite what this one sent. Kept from one collective
        # to the next: fresh 4 MiB chunks cost a page fault per 4 KiB, every time.
        self._wire_bits = np.empty(0, _U16)
        self._lost: set[str] = set()  # links ("left", "right") dropped this generation
        self._closed = False
        self._stats = dict.fromkeys(
            ("collectives", "bytes_sent", "bytes_received", "stale_discarded", "failures"), 0
        )
        self._inbox: TrioSocket | None = None  # chunks from the left, acks to it
        self._outbox: TrioSocket | None = None  # chunks to the right, acks from it
        self._out_lane: _OutLane | None = None
        self._in_lane: _InLane | None = None
        self._monitors: list[tuple[str, TrioSocket]] = []
        self._filters = {"left": MonitorFilter(), "right": MonitorFilter()}
        self._domain: _admission.Admission | None = None
        if token is _NODE_TOKEN:
            try:
                node = _registry.current_node(required=False)
            except RuntimeError:  # outside trio.run: no node
                node = None
            token = None if node is None else node.token
        token = _admission.check_token(token)
        if world == 1:
            return
        limit = max(chunk_bytes, _MAX_REASON, _HEADER.size)
        admission, credentials = {}, {}
        if token is not None:  # the inbox admits its left neighbour's outbox, nobody else
            left_name = f"ring{(rank - 1) % world}"
            self._domain, admission = _admission.admit("ring", token, left_name.__eq__)
            credentials = _admission.present(f"ring{rank}", token)
        try:
            # HEARTBEAT_IVL=0: the inbox is read only during collectives, so its pipe
            # fills (RCVHWM) and libzmq stops reading the connection; a ZMTP heartbeat
            # timeout or the peer's hang-up then makes the next read abort the process
            # in libzmq 4.3.5 ("Assertion failed: !_io_error", stream_engine_base.cpp:310;
            # test_hostile_peers: the abort on the old configuration, and none now).
            # A stalled left neighbour is still noticed: by its own left's outbox, which
            # heart-beats and aborts the collective around the ring, or by the timeout.
            self._inbox = open_socket(
                "DEALER",
                bind=self.endpoints[rank],
                rcvhwm=16,
                maxmsgsize=limit,
                heartbeat_ivl=0,
                **admission,
            )
            # Sends are zero-copy references into arrays: a deep send queue costs nothing
            # and lets a whole segment be queued at once.
            right = self.endpoints[(rank + 1) % world]
            # IMMEDIATE=0: with 1, libzmq drops a connecting socket's unread input when
            # the peer hangs up, and the right's last done ack is exactly such input.
            self._outbox = open_socket(
                "DEALER",
                connect=right,
                immediate=0,
                sndhwm=1 << 16,
                maxmsgsize=limit,
                **credentials,
            )
            if self.lanes:
                self._out_lane = _OutLane(lane_slots, chunk_bytes)
            for name, sock in (("left", self._inbox), ("right", self._outbox)):
                # A fresh name per ring: id(self) is reused once a ring is collected,
                # possibly before libzmq has released the old monitor's endpoint.
                address = f"inproc://ring-monitor-{next(_monitor_ids)}-{name}"
                # Failed handshakes too: a refused connection (a stranger's) also ends
                # with EVENT_DISCONNECTED, which must not pass for the neighbour's
                # (actors._admission.MonitorFilter).
                sock.zmq.monitor(address, zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
                # RCVHWM=0 makes the inproc event pipe unbounded (libzmq adds the two
                # ends' HWMs, or uses none if either is 0). libzmq emits an event with a
                # *blocking* send under the monitored socket's monitor lock: with a
                # bounded pipe that nobody reads between collectives, enough events
                # would park the process's only I/O thread there, and disable_monitor
                # (in close) would wait for that lock forever, holding the GIL.
                monitor = open_socket("PAIR", connect=address, linger=0, rcvhwm=0)
                self._monitors.append((name, monitor))
        except BaseException:
            self.close()
            raise

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
        for name, monitor in self._monitors:  # disconnects of the old generation's peers
            self._lost_since(name, monitor)
        self._lost.clear()
        if self.lanes and not self._closed:  # a fresh lane: the old one may be mid-use
            assert self._out_lane is not None
            self._out_lane.close()
            self._out_lane = _OutLane(self.lane_slots, self.chunk_bytes)
            if self._in_lane is not None:
                self._in_lane.close()
                self._in_lane = None

    def stats(self) -> dict[str, int]:
        """Counters: collectives, bytes_sent, bytes_received, stale_discarded, failures
        (collectives that raised CollectiveError or were interrupted: each is a
        regroup for the caller), refused (connections to the inbox that failed their
        handshake: strangers, or peers without the run's token)."""
        refused = sum(f.refused for f in self._filters.values())
        return dict(self._stats, refused=refused, generation=self._generation, rank=self.rank)

    def _lost_since(self, name: str, monitor: TrioSocket) -> bool:
        """Read the monitor's queued events; whether the neighbour's link went down."""
        keep = self._filters[name]
        return any([keep.is_real_disconnect(frames) for frames in _drain(monitor)])

    async def all_reduce(
        self, array: np.ndarray, *, step: int, wire: str | None = None
    ) -> np.ndarray:
        """Sum ``array`` over all ranks, in place; returns ``array``.

        ``wire="bf16"`` (float32 arrays) sends bfloat16 and adds in float32 (module
        doc, "The bf16 wire"); None sends the array's own dtype. All ranks must agree.
        """
        flat = self._flat(array, "all_reduce", sum_op=True, wire=wire)
        await self._run_all_reduce_as("all_reduce", flat, step, wire)
        return array

    async def reduce_scatter(
        self, array: np.ndarray, *, step: int, wire: str | None = None
    ) -> np.ndarray:
        """Sum over all ranks into this rank's shard; returns that shard (a view).

        The shard is ``array.reshape(-1)[start:stop]`` with ``shard_bounds``; the rest of
        ``array`` is left holding partial sums. ``wire`` as for :meth:`all_reduce`.
        """
        flat = self._flat(array, "reduce_scatter", sum_op=True, wire=wire)
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
        initial = [shard_bounds(n, world, (r - 1) % world)]
        await self._run("reduce_scatter", flat, step, initial, hops, wire)
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
        """Close the sockets and lanes. Idempotent."""
        if self._closed:
            return
        self._closed = True
        # Order matters: libzmq emits monitor events with a *blocking* send under a
        # lock that disable_monitor also takes; with our reading end closed first, a
        # late event (the peer exiting) blocks the I/O thread forever, and then
        # disable_monitor too (seen here as a hang at exit). Draining first also frees
        # the I/O thread should it be waiting on a full pipe (the pipe is unbounded,
        # see __init__; test: "closing many rings one after another never hangs").
        for name, monitor in self._monitors:
            self._lost_since(name, monitor)
        for sock in (self._inbox, self._outbox):
            if sock is not None:
                sock.zmq.disable_monitor()
        for _, monitor in self._monitors:
            monitor.close()
        for sock in (self._inbox, self._outbox):
            if sock is not None:
                sock.close()
        for lane in (self._out_lane, self._in_lane):
            if lane is not None:
                lane.close()
        _admission.forget(self._domain)

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the engine ----------------------------------------------------------------------

    async def _run_all_reduce_as(
        self, op: str, flat: np.ndarray, step: int, wire: str | None = None
    ) -> None:
        n, r, world = flat.size, self.rank, self.world

        def forward(k: int) -> int:
            if k <= world - 2:
                return _FROM_ARRAY  # reduce-scatter hops pass on their partial sums
            return _FROM_FRAME if k < 2 * world - 3 else _NO_FORWARD

        hops = [
            _Hop(
                k,
                *shard_bounds(n, world, (r - k - 2) % world),
                _ADD if k <= world - 2 else _COPY,
                forward(k),
            )
            for k in range(2 * world - 2)
        ]
        await self._run(op, flat, step, [shard_bounds(n, world, (r - 1) % world)], hops, wire)

    def _flat(
        self, array: np.ndarray, op: str, *, sum_op: bool, wire: str | None = None
    ) -> np.ndarray:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"{op} needs a numpy array, got {type(array).__name__}")
        if wire not in _WIRES:
            raise ValueError(
                f"{op} wire: expected None (the array's dtype) or 'bf16', got {wire!r}"
            )
        if wire == "bf16" and array.dtype != np.float32:
            raise TypeError(f"{op} wire='bf16' takes a float32 array, got {array.dtype}")
        accepted = _SUM_DTYPES if sum_op else _DTYPE_CODES
        if array.dtype not in accepted:
            names = sorted(str(d) for d in accepted)
            raise TypeError(f"{op} accepts dtypes {names}, got {array.dtype}")
        if not (array.flags.c_contiguous and array.flags.writeable):
            raise ValueError(f"{op} needs a C-contiguous, writeable array (no copy is made)")
        return array.reshape(-1)

    def _chunk_length(self, n: int, itemsize: int) -> int:
        """Elements per chunk for an n-element collective: at most ``chunk_bytes``, and
        small enough that a segment has ~4 chunks to pipeline (but not under 64 KiB).

        A pure function of (n, world, itemsize, chunk_bytes), so every rank agrees.
        """
        segment = -(-n // self.world)
        wanted = max(-(-segment // _PIPELINE_DEPTH), _MIN_CHUNK_BYTES // itemsize)
        return max(1, min(self.chunk_bytes // itemsize, wanted))

    @staticmethod
    def _chunks(start: int, stop: int, per: int) -> list[tuple[int, int]]:
        return [(a, min(a + per, stop)) for a in range(start, stop, per)]

    async def _run(
        self,
        op: str,
        flat: np.ndarray,
        step: int,
        initial: list[tuple[int, int]],
        hops: list[_Hop],
        wire: str | None = None,
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
        run = _Run(self, op, flat, step, seq, wire)
        # A neighbour that went away earlier in this generation (between collectives,
        # or at the very end of the last one, after its link watcher saw the event but
        # before the grace period ran out): its process is gone, and a replacement joins
        # only at a newer generation, so this collective cannot complete. Without this
        # a rank killed then went unnoticed until the timeout (test_ring_rejoin, the
        # "mid-collective" case, now and then).
        for name, monitor in self._monitors:
            if self._lost_since(name, monitor):
                self._lost.add(name)
        lost = sorted(self._lost)
        try:
            if lost:
                run.left_down = "left" in lost
                run.right_down = "right" in lost
                peers = {"left": run.left, "right": (self.rank + 1) % self.world}
                raise CollectiveError(
                    f"{run._what()}: "
                    + ", ".join(f"{name} neighbour rank {peers[name]}" for name in lost)
                    + " disconnected since the last collective"
                )
            await run.execute(initial, hops)
        except CollectiveError as exc:
            self._broken = str(exc)
            self._stats["failures"] += 1
            await self._send_abort(run, str(exc))
            raise
        except BaseException:
            # Cancelled from outside (or a bug): the neighbours are mid-collective and
            # this rank's part is half done, so the same rules as a failure apply.
            self._broken = f"{op} (step {step}, seq {seq}) was interrupted"
            self._stats["failures"] += 1
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


_monitor_ids = itertools.count()


def _has_input(sock: TrioSocket | None) -> bool:
    # Not a raw EVENTS read: that would strand the receive loop sleeping on the inbox
    # (test_ring_rejoin: a survivor hung after its left neighbour was killed).
    return sock is not None and sock.has_input()


def _drain(sock: TrioSocket) -> list[list[bytes]]:
    """Take every queued message off ``sock``."""
    drained = []
    while True:
        try:
            drained.append(sock.zmq.recv_multipart(zmq.DONTWAIT))
        except zmq.ZMQError:  # zmq.Again: empty (or the context is going away)
            return drained


class _Run:
    """One collective in progress: the receive loop, the sender task, the link watchers.

    Helper tasks never raise out of the nursery; they record the first failure and cancel
    the collective, which then raises that failure (a plain CollectiveError, not an
    ExceptionGroup).
    """

    def __init__(
        self, ring: Ring, op: str, flat: np.ndarray, step: int, seq: int, wire: str | None
    ) -> None:
        self.ring = ring
        self.op = op
        self.flat = flat
        self.step = step
        self.seq = seq
        self.failure: CollectiveError | None = None
        self.abort_origin: int | None = None  # set when the failure is a received abort
        self.abort_reason = ""
        self.scope: trio.CancelScope | None = None
        self.op_code = _OPS[op]
        # bf16: chunks travel as bfloat16 bits; the hop that completes this rank's own
        # segment (the last adding hop, world - 2) rounds it in place.
        self.bf16 = wire == "bf16"
        self.dtype_code = _BF16_CODE if self.bf16 else _DTYPE_CODES[flat.dtype]
        self.wire_itemsize = 2 if self.bf16 else flat.itemsize
        self.last_add = ring.world - 2
        self.per = ring._chunk_length(flat.size, self.wire_itemsize)
        if self.bf16:
            if ring._wire_bits.size < flat.size:
                ring._wire_bits = np.empty(flat.size, _U16)
            self.bits = ring._wire_bits[: flat.size]
            self.address = flat.__array_interface__["data"][0]
        self.left = (ring.rank - 1) % ring.world
        self.left_down = False
        self.ack_scope: trio.CancelScope | None = None  # an ack send to the left, if any
        self.right_down = False
        self.receiving = True  # until every expected chunk has arrived
        self.sent = 0  # chunks handed to libzmq (frames) or to the lane (lanes)
        self.total_sends = 0
        self.done_from_right = False  # the right neighbour has all we sent

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
        per = self.per
        first = [ring._chunks(start, stop, per) for start, stop in initial]
        forwarded = sum(len(ring._chunks(h.start, h.stop, per)) for h in hops if h.forward)
        self.total_sends = total_sends = sum(map(len, first)) + forwarded
        # What goes out: (hop, chunk, payload), payload an array view or a received Frame.
        # Every chunk is sent once, so the queue is bounded by the collective itself: a
        # count gone wrong fails here (WouldBlock) instead of queueing without end.
        send_tx, send_rx = trio.open_memory_channel[tuple[int, int, object]](total_sends)
        for chunks in first:
            for c, (a, b) in enumerate(chunks):
                send_tx.send_nowait((0, c, self.flat[a:b]))
        with trio.move_on_after(ring.timeout) as scope:
            self.scope = scope
            async with trio.open_nursery() as nursery:
                sender_done = trio.Event()
                sender = self._send_lanes if ring.lanes else self._send_frames
                nursery.start_soon(sender, send_rx, total_sends, sender_done)
                for name, monitor in ring._monitors:
                    nursery.start_soon(self._watch_link, name, monitor)
                try:
                    if await self._receive_loop(hops, send_tx):
                        await self._send_ack(_DONE)
                    self.receiving = False
                    send_tx.close()
                    await sender_done.wait()
                except CollectiveError as exc:
                    self.fail(exc)
                finally:
                    nursery.cancel_scope.cancel()
        if scope.cancelled_caught and self.failure is None:
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

    # -- sending -------------------------------------------------------------------------

    async def _send_frames(self, items, total: int, done: trio.Event) -> None:
        """Frames wire: each chunk goes zero-copy, then wait for the right's done ack."""
        outbox = self.ring._outbox
        assert outbox is not None
        try:
            async for hop, chunk, payload in items:
                header = self.header(_DATA, hop, chunk)
                if self.bf16 and isinstance(payload, np.ndarray) and payload.dtype != _U16:
                    payload = self._round(payload)  # a float32 view of the array
                await outbox.send_multipart([header, payload], copy=False)
                self.sent += 1
                self.ring._stats["bytes_sent"] += memoryview(payload).nbytes
                self.progress()
            await self._await_done()
        except trio.ClosedResourceError:
            self.fail(CollectiveError(f"{self._what()}: ring closed while sending"))
        except CollectiveError as exc:
            self.fail(exc)
        finally:
            done.set()

    async def _send_lanes(self, items, total: int, done: trio.Event) -> None:
        """Lanes wire: copy each chunk into a free slot, then send a notice naming it."""
        ring = self.ring
        outbox = ring._outbox
        assert outbox is not None
        try:
            async for hop, chunk, view in items:
                lane = ring._out_lane
                assert lane is not None and isinstance(view, np.ndarray)
                while not lane.free:
                    self._take_ack(await self._next_ack())
                slot = lane.free.popleft()
                nbytes = view.size * self.wire_itemsize
                if self.bf16 and view.dtype != _U16:
                    bf16_round(view, out=lane.slots[slot][:nbytes].view(_U16))
                else:
                    np.copyto(lane.slots[slot][:nbytes].view(view.dtype), view)
                await outbox.send_multipart([self.header(_LANE, hop, chunk), lane.ref(slot)])
                self.sent += 1
                ring._stats["bytes_sent"] += nbytes
                self.progress()
            await self._await_done()
        except trio.ClosedResourceError:
            self.fail(CollectiveError(f"{self._what()}: ring closed while sending"))
        except CollectiveError as exc:
            self.fail(exc)
        finally:
            done.set()

    # -- acks ----------------------------------------------------------------------------

    async def _send_ack(self, kind: int, token: bytes = _NO_TOKEN, slot: int = 0) -> None:
        """Send an ack to the left, unless it is gone: then nobody needs it.

        The inbox is a bound DEALER: with no peer connected a send waits for one, so an
        ack begun just before the left died would block the receive loop (and the
        messages still queued from the left) until the timeout. _watch_link cancels it
        (test_ring_rejoin: "a killed rank is replaced ... mid-collective").
        """
        ring = self.ring
        assert ring._inbox is not None
        if self.left_down:
            return
        ack = _ACK.pack(_ACK_MAGIC, _VERSION, kind, ring._generation, self.seq, token, slot)
        try:
            with trio.CancelScope() as self.ack_scope:
                await ring._inbox.send_multipart([ack])
        finally:
            self.ack_scope = None

    async def _next_ack(self) -> list:
        outbox = self.ring._outbox
        assert outbox is not None
        if self.right_down and not _has_input(outbox):
            peer = (self.ring.rank + 1) % self.ring.world
            raise CollectiveError(f"{self._what()}: right neighbour rank {peer} disconnected")
        return await outbox.recv_multipart(copy=False)

    async def _await_done(self) -> None:
        while self.total_sends and not self.done_from_right:
            self._take_ack(await self._next_ack())

    def _take_ack(self, frames: list) -> None:
        ring = self.ring
        raw = frames[0].buffer if len(frames) == 1 else b""
        if len(raw) != _ACK.size:
            raise CollectiveError(f"{self._what()}: malformed ack from the right")
        magic, version, kind, generation, seq, token, slot = _ACK.unpack(raw)
        if magic != _ACK_MAGIC or version != _VERSION or kind not in (_CREDIT, _DONE):
            raise CollectiveError(f"{self._what()}: malformed ack from the right")
        lane = ring._out_lane
        stale = generation != ring._generation or (
            seq < self.seq if kind == _DONE else lane is None or token != lane.token
        )
        if stale:
            ring._stats["stale_discarded"] += 1
            return
        if kind == _DONE:
            if seq != self.seq:
                raise CollectiveError(f"{self._what()}: done ack for seq {seq} from the future")
            self.done_from_right = True
        else:
            assert lane is not None
            if not 0 <= slot < len(lane.slots) or slot in lane.free:
                raise CollectiveError(f"{self._what()}: credit for slot {slot}, not in use")
            lane.free.append(slot)
        self.progress()

    # -- watching the links --------------------------------------------------------------

    async def _watch_link(self, name: str, monitor: TrioSocket) -> None:
        # A disconnect is fatal only if it can still matter: the left neighbour's
        # messages that arrived before it went away are still delivered (a rank that
        # finished and exited is not a failure), and once everything is sent the right
        # neighbour is no longer needed.
        keep = self.ring._filters[name]
        try:
            while not keep.is_real_disconnect(await monitor.recv_multipart(copy=True)):
                pass  # a stranger refused at the handshake: not the neighbour
        except trio.ClosedResourceError:
            self.fail(CollectiveError(f"{self._what()}: ring closed"))
            return
        self.ring._lost.add(name)  # remembered even if this collective ends meanwhile
        # libzmq reports the disconnect *before* it flushes the last messages it read
        # from that peer into the socket's queue: look again after a moment.
        await trio.sleep(_LINK_GRACE)
        if name == "left":
            self.left_down = True
            if self.ack_scope is not None:
                self.ack_scope.cancel()  # the left will never take it
            if not self.receiving or self._pending():
                return  # the receive loop fails when it runs dry
            peer = self.left
        else:
            self.right_down = True
            if self.done_from_right or not self.total_sends:
                return
            if self.sent == self.total_sends and _has_input(self.ring._outbox):
                return  # its done ack may be waiting: _next_ack decides
            peer = (self.ring.rank + 1) % self.ring.world
        self.fail(CollectiveError(f"{self._what()}: {name} neighbour rank {peer} disconnected"))

    def _pending(self) -> bool:
        return bool(self.ring._held) or _has_input(self.ring._inbox)

    # -- receiving -----------------------------------------------------------------------

    async def _receive_loop(self, hops: list[_Hop], send_tx) -> bool:
        """Receive and apply every expected chunk; return whether there were any."""
        ring = self.ring
        inbox = ring._inbox
        assert inbox is not None
        flat = self.flat
        itemsize = self.wire_itemsize
        expected = [
            (hop, c, start, stop)
            for hop in hops
            for c, (start, stop) in enumerate(ring._chunks(hop.start, hop.stop, self.per))
        ]
        position = 0
        held = ring._held
        left_filter, admitted = ring._filters["left"], ring._domain is not None
        while position < len(expected):
            from_held = bool(held)
            if from_held:
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
            if not self._is_current(header, frames, from_held):
                continue
            if admitted and not from_held:  # only the left neighbour gets in: its link
                left_filter.peer_fd = frames[0].get(zmq.SRCFD)
            hop, chunk, start, stop = expected[position]
            nbytes = (stop - start) * itemsize
            self._check(header, hop, chunk, frames[1], nbytes)
            position += 1
            self.progress()
            ring._stats["bytes_received"] += nbytes
            target = flat[start:stop]
            if header.kind == _LANE:
                await self._apply_from_lane(hop, chunk, frames[1], target, send_tx)
                continue
            frame = frames[1]
            received = np.frombuffer(frame.buffer, _U16 if self.bf16 else flat.dtype)
            if hop.action == _ADD:
                payload = self._add(hop, target, received)
            elif hop.forward == _FROM_FRAME:  # pass it on first: the copy overlaps
                send_tx.send_nowait((hop.hop + 1, chunk, frame))
                self._copy(target, received)
                continue
            else:
                self._copy(target, received)
                payload = target
            if hop.forward == _FROM_ARRAY:
                send_tx.send_nowait((hop.hop + 1, chunk, payload))
        return bool(expected)

    def _add(self, hop: _Hop, target: np.ndarray, received: np.ndarray) -> np.ndarray:
        """target += received; what to pass on: target, or on the bf16 wire once the
        segment is complete, its rounded bits (target then holds their value)."""
        if not self.bf16:
            np.add(target, received, out=target)
            return target
        if hop.hop != self.last_add:
            bf16_add(target, received)
            return target  # a partial sum: rounded as it is sent
        return bf16_add_round(target, received, self._bits_of(target))  # target: their value

    def _bits_of(self, view: np.ndarray) -> np.ndarray:
        """The place in the wire buffer of `view`, a slice of the array: the same offset."""
        start = (view.__array_interface__["data"][0] - self.address) // 4
        return self.bits[start : start + view.size]

    def _round(self, view: np.ndarray) -> np.ndarray:
        """`view` (a slice of the array) rounded to bfloat16, in the wire buffer."""
        return bf16_round(view, out=self._bits_of(view))

    def _copy(self, target: np.ndarray, received: np.ndarray) -> None:
        if self.bf16:
            bf16_widen(received, out=target)
        else:
            np.copyto(target, received)

    async def _apply_from_lane(self, hop: _Hop, chunk: int, frame, target, send_tx) -> None:
        ring = self.ring
        token, pid, fd, slot = _LANE_REF.unpack(frame.buffer)
        lane = ring._in_lane
        if lane is None or lane.token != token:  # the first notice of a new lane
            if lane is not None:
                lane.close()
                ring._in_lane = None
            ring._in_lane = lane = _InLane(token, pid, fd)
        nbytes = target.size * self.wire_itemsize
        if not 0 <= slot < len(lane.slots) or nbytes > lane.slots[slot].size:
            raise CollectiveError(f"{self._what()}: notice names slot {slot} of {len(lane.slots)}")
        received = lane.slots[slot][:nbytes].view(_U16 if self.bf16 else target.dtype)
        payload = target
        if hop.action == _ADD:
            payload = self._add(hop, target, received)
        else:
            self._copy(target, received)
        del received
        await self._send_ack(_CREDIT, token, slot)
        if hop.forward:  # from the array: the slot is already back with its writer
            send_tx.send_nowait((hop.hop + 1, chunk, payload))

    def _is_current(self, header: _Header, frames: list, from_held: bool) -> bool:
        """Discard stale messages, stash early ones, raise on an abort; else True.

        An early message goes back where it came from: to the front of the held queue
        if it was taken from there, so held messages keep their arrival order.
        """
        ring = self.ring
        mine = (ring._generation, self.seq)
        theirs = (header.generation, header.seq)
        if theirs < mine:
            ring._stats["stale_discarded"] += 1
            return False
        if theirs > mine:
            if from_held:
                ring._held.appendleft(frames)
            else:
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
        wire = (_LANE, _LANE_REF.size) if self.ring.lanes else (_DATA, nbytes)
        got_place = (header.hop, header.chunk, header.kind, len(frame))
        want_place = (hop.hop, chunk, *wire)
        if got_place != want_place:
            raise CollectiveError(
                f"{self._what()}: (hop, chunk, kind, payload bytes) = {got_place}, "
                f"expected {want_place}; do all ranks use the same chunk_bytes and lanes?"
            )
