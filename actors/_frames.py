"""The wire format: one message = a msgpack header frame + raw tensor frames.

Design note
-----------
A message travels as a ZeroMQ multipart::

    frame 0      msgpack map, the *header*:
                   {"v": PROTOCOL_VERSION, "type": str, "sender": str,
                    "generation": int, "step": int, "seq": int,
                    "body": {str: msgpack-native},
                    "tensors": [[dtype, shape, frame, offset, nbytes], ...]}
    frames 1..k  raw little-endian tensor bytes, one frame per tensor

Tensor bytes never go inside msgpack: ``packb`` copies the payload (7x a memcpy for
16 MiB) and ``unpackb`` copies it again. Instead ``encode`` hands ZeroMQ the array's own
buffer and ``decode`` returns numpy views of the received frames (copied only when the
view would be misaligned, which happens for small frames that sit at odd offsets in
libzmq's shared read buffer).

Every received byte is untrusted. ``decode`` is bounded before it does any work (frame
count, header size, msgpack length caps, nesting depth) and then validates every field:
the exact key set, types, a dtype allow-list, ``ndim <= 8``, ``nbytes == prod(shape) *
itemsize``, alignment, bounds and non-overlap of tensor regions, and that every data frame
is used. Anything else raises :class:`FrameError` with a reason; nothing else escapes
(``tests/actors/test_frames.py`` fuzzes this with mutated and random frames). No pickle
and no msgpack extension types (timestamps included) are accepted.

The descriptor carries ``frame`` and ``offset`` so that a future sender may pack several
small tensors into one frame; ``encode`` today always uses one frame per tensor.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

__all__ = [
    "DEFAULT_LIMITS",
    "DTYPES",
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "FrameError",
    "Limits",
    "Message",
    "decode",
    "encode",
]

PROTOCOL_VERSION = 1

# One frame's size cap: every socket's ZMQ_MAXMSGSIZE (actors._transport). A receiver
# drops the whole connection on a bigger frame, so the message would vanish unexplained;
# encode refuses it instead.
MAX_FRAME_BYTES = 64 << 20

# Wire name -> little-endian numpy dtype. Anything not listed is rejected on both ends.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in [
        ("bool", "|b1"),
        ("int8", "|i1"),
        ("uint8", "|u1"),
        ("int16", "<i2"),
        ("uint16", "<u2"),
        ("int32", "<i4"),
        ("uint32", "<u4"),
        ("int64", "<i8"),
        ("uint64", "<u8"),
        ("float16", "<f2"),
        ("float32", "<f4"),
        ("float64", "<f8"),
        ("complex64", "<c8"),
        ("complex128", "<c16"),
    ]
}
_WIRE_NAME = {dtype: name for name, dtype in DTYPES.items()}

_HEADER_KEYS = frozenset({"v", "type", "sender", "generation", "step", "seq", "body", "tensors"})
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what msgpack can carry
# Leaves that need no further look (int is not one: it needs a range check).
_FLAT_SCALARS = frozenset({type(None), bool, float, str, bytes})


class FrameError(ValueError):
    """A received multipart is not a valid message; ``reason`` says why.

    ``routing_id`` is set by :meth:`TrioSocket.recv_message` on a ROUTER socket so the
    receiver can answer the sender with an error if it wants to.
    """

    def __init__(self, reason: str, *, routing_id: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.routing_id = routing_id


@dataclass(frozen=True)
class Limits:
    """Caps applied by :func:`decode` before and while parsing untrusted bytes.

    ZMQ_MAXMSGSIZE (set on every socket by ``open_socket``) already caps each frame's
    size; these bound the work of parsing one message.
    """

    max_header_bytes: int = 1 << 20
    max_tensors: int = 1024
    max_ndim: int = 8
    max_str_len: int = 1 << 20
    max_bin_len: int = 1 << 20
    max_array_len: int = 1 << 16
    max_map_len: int = 1 << 12
    max_depth: int = 32
    max_name_len: int = 256  # `type` and `sender`

    @property
    def max_frames(self) -> int:
        return 1 + self.max_tensors


DEFAULT_LIMITS = Limits()
_MAX_NAME = DEFAULT_LIMITS.max_name_len  # for encode's fast check


@dataclass(eq=False)
class Message:
    """One message: a type tag, routing/ordering metadata, a plain body and tensors.

    ``body`` holds msgpack-native data only: None, bool, int, float, str, bytes, lists
    and dicts with str keys (tuples arrive as lists). ``tensors`` are numpy arrays of a
    dtype in :data:`DTYPES`; received tensors are views of the received frames.

    Equality compares tensors by dtype, shape and bytes, so NaNs compare equal to
    themselves; that is what a round-trip test wants.
    """

    type: str
    sender: str = ""
    generation: int = 0
    step: int = 0
    seq: int = 0
    body: dict = field(default_factory=dict)
    tensors: list[np.ndarray] = field(default_factory=list)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (
            (self.type, self.sender, self.generation, self.step, self.seq)
            == (other.type, other.sender, other.generation, other.step, other.seq)
            and _same_body(self.body, other.body)
            and len(self.tensors) == len(other.tensors)
            and all(_same_tensor(a, b) for a, b in zip(self.tensors, other.tensors, strict=True))
        )


def _same_body(a: Any, b: Any) -> bool:
    # Plain `==` except that floats compare by bits (NaN == NaN, 0.0 != -0.0).
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return np.float64(a).tobytes() == np.float64(b).tobytes()
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_body(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_body(a[k], b[k]) for k in a)
    return a == b


def _same_tensor(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------------------
# encode
# ----------------------------------------------------------------------------------------


def encode(msg: Message) -> list:
    """Encode ``msg`` as a list of frames for ``send_multipart(copy=False)``.

    Frame 0 is the msgpack header; frame i >= 1 is tensor i-1's buffer, not a copy,
    unless the tensor had to be made C-contiguous or little-endian. Do not mutate a
    tensor until ZeroMQ has released it (see ``TrioSocket.send_multipart``'s ``track``).

    Raises TypeError/ValueError for a message that could not be decoded by a peer: a
    body that is not msgpack-native, a dtype outside :data:`DTYPES`, too many
    dimensions, an out-of-range integer, or anything over :data:`DEFAULT_LIMITS` or
    :data:`MAX_FRAME_BYTES` (a list, map, header, tensor count or frame). Nothing invalid
    is ever put on the wire.
    """
    # The fast check covers what every well-formed message looks like; anything else
    # (a str subclass, say) gets the thorough check, which raises or accepts.
    kind, sender, generation, step, seq = msg.type, msg.sender, msg.generation, msg.step, msg.seq
    if not (
        type(kind) is str
        and type(sender) is str
        and 0 < len(kind) <= _MAX_NAME
        and len(sender) <= _MAX_NAME
        and type(generation) is int
        and type(step) is int
        and type(seq) is int
        and _INT_MIN <= generation <= _INT_MAX
        and _INT_MIN <= step <= _INT_MAX
        and _INT_MIN <= seq <= _INT_MAX
    ):
        _check_envelope(msg)
    body = msg.body
    if type(body) is not dict:
        raise TypeError(f"Message.body must be a dict, got {type(body).__name__}")
    problem = _body_problem(body, 1, DEFAULT_LIMITS) if body else None
    if problem:
        raise TypeError(f"Message.body is not msgpack-native: {problem}")

    if len(msg.tensors) > DEFAULT_LIMITS.max_tensors:
        raise ValueError(
            f"{len(msg.tensors)} tensors; at most {DEFAULT_LIMITS.max_tensors} accepted"
        )
    descriptors = []
    frames = [b""]  # frame 0, the header, is filled in below
    for i, tensor in enumerate(msg.tensors):
        if type(tensor) is not np.ndarray and not isinstance(tensor, np.ndarray):
            raise TypeError(f"Message.tensors[{i}] must be a numpy array, got {type(tensor)}")
        # Native little-endian dtypes hash like their "<" spelling: one dict lookup.
        name = _WIRE_NAME.get(tensor.dtype) or _WIRE_NAME.get(tensor.dtype.newbyteorder("<"))
        if name is None:
            raise TypeError(
                f"Message.tensors[{i}] has dtype {tensor.dtype}; accepted: {', '.join(DTYPES)}"
            )
        if tensor.ndim > DEFAULT_LIMITS.max_ndim:
            raise ValueError(f"Message.tensors[{i}] has {tensor.ndim} dims; at most 8 accepted")
        if tensor.nbytes > MAX_FRAME_BYTES:
            raise ValueError(
                f"Message.tensors[{i}] is {tensor.nbytes} bytes, over the {MAX_FRAME_BYTES} "
                "bytes one frame may carry (ZMQ_MAXMSGSIZE): send it in parts, or use a "
                "ring collective"
            )
        # A no-op for C-contiguous little-endian input. (Not ascontiguousarray: it makes 0-d 1-d.)
        wire = tensor.astype(DTYPES[name], order="C", copy=False)
        descriptors.append([name, list(wire.shape), i + 1, 0, wire.nbytes])
        # memoryview.cast rejects zero-size shapes; an empty frame carries nothing anyway.
        frames.append(memoryview(wire).cast("B") if wire.size else b"")

    frames[0] = _packer().pack(
        {
            "v": PROTOCOL_VERSION,
            "type": kind,
            "sender": sender,
            "generation": generation,
            "step": step,
            "seq": seq,
            "body": body,
            "tensors": descriptors,
        }
    )
    if len(frames[0]) > DEFAULT_LIMITS.max_header_bytes:  # (str and bytes limits within)
        raise ValueError(
            f"the header is {len(frames[0])} bytes; a peer accepts at most "
            f"{DEFAULT_LIMITS.max_header_bytes}: send bulk data as numpy arrays (frames)"
        )
    return frames


def _check_envelope(msg: Message) -> None:
    """Raise TypeError unless ``msg``'s type, sender and counters can go on the wire."""
    _check_name("type", msg.type, DEFAULT_LIMITS, error=TypeError)
    _check_name("sender", msg.sender, DEFAULT_LIMITS, error=TypeError, allow_empty=True)
    for name, value in (("generation", msg.generation), ("step", msg.step), ("seq", msg.seq)):
        if type(value) is not int or not _INT_MIN <= value <= _INT_MAX:
            raise TypeError(f"Message.{name} must be an int in [-2**63, 2**64), got {value!r}")


_local = threading.local()


def _packer() -> msgpack.Packer:
    # One Packer per thread, reused: packb builds a Packer per call (a third of a small
    # message's packing time). Per thread because a Packer's buffer is not shareable.
    try:
        return _local.packer
    except AttributeError:
        _local.packer = msgpack.Packer(use_bin_type=True)
        return _local.packer


# ----------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------


def _reject_ext(code: int, data: bytes) -> Any:
    raise FrameError(f"msgpack extension type {code} is not accepted")


def decode(frames: Sequence, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode a received multipart into a :class:`Message`, or raise :class:`FrameError`.

    ``frames`` may be ``zmq.Frame`` objects (from ``recv_multipart(copy=False)``), bytes,
    bytearrays or memoryviews. Tensors are zero-copy views of their frames (writable
    when the frame is), copied only when a view would be misaligned.
    """
    if type(frames) not in (list, tuple) and (
        not isinstance(frames, Sequence) or isinstance(frames, (bytes, bytearray, str))
    ):
        raise FrameError(f"expected a sequence of frames, got {type(frames).__name__}")
    if not 1 <= len(frames) <= limits.max_frames:
        raise FrameError(f"frame count {len(frames)} outside [1, {limits.max_frames}]")
    views = [_as_bytes_view(f, i) for i, f in enumerate(frames)]
    if len(views[0]) > limits.max_header_bytes:
        raise FrameError(f"header of {len(views[0])} bytes exceeds {limits.max_header_bytes}")

    try:
        header = msgpack.unpackb(
            views[0],
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except FrameError:
        raise
    except Exception as exc:  # the untrusted boundary: every msgpack failure is a reason
        raise FrameError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None

    if type(header) is not dict or header.keys() != _HEADER_KEYS:
        got = sorted(map(str, header)) if isinstance(header, dict) else type(header).__name__
        raise FrameError(f"header must be a map with keys {sorted(_HEADER_KEYS)}, got {got}")
    version, kind, sender, body = header["v"], header["type"], header["sender"], header["body"]
    generation, step, seq = header["generation"], header["step"], header["seq"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise FrameError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    # (unpackb gives exact str/int/dict: these type checks are exact ones)
    if not (type(kind) is str and 0 < len(kind) <= limits.max_name_len):
        _check_name("type", kind, limits, error=FrameError)
    if not (type(sender) is str and len(sender) <= limits.max_name_len):
        _check_name("sender", sender, limits, error=FrameError, allow_empty=True)
    if not (type(generation) is int and type(step) is int and type(seq) is int):
        for name in ("generation", "step", "seq"):
            if type(header[name]) is not int:
                raise FrameError(f"{name} must be an int, got {type(header[name]).__name__}")
    if type(body) is not dict:
        raise FrameError(f"body must be a map, got {type(body).__name__}")
    problem = _body_problem(body, 1, limits) if body else None
    if problem:
        raise FrameError(f"body {problem}")

    descriptors = header["tensors"]
    if descriptors == [] and len(views) == 1:
        tensors = []  # the common control message: no tensors, nothing more to check
    else:
        tensors = _decode_tensors(descriptors, views, limits)
    return Message(kind, sender, generation, step, seq, body, tensors)


def _as_bytes_view(frame: Any, index: int) -> memoryview:
    buffer = getattr(frame, "buffer", frame)  # zmq.Frame exposes its bytes as .buffer
    if type(buffer) is memoryview and buffer.format == "B" and buffer.ndim == 1:
        return buffer  # what zmq.Frame gives: already a flat byte view
    try:
        view = memoryview(buffer)
    except TypeError:
        raise FrameError(f"frame {index} is a {type(frame).__name__}, not a buffer") from None
    if view.format != "B" or view.ndim != 1 or not view.c_contiguous:
        view = view.cast("B") if view.c_contiguous else None
        if view is None:
            raise FrameError(f"frame {index} is not a contiguous buffer")
    return view


def _check_name(what: str, value: Any, limits: Limits, *, error: type, allow_empty=False):
    if not isinstance(value, str):
        raise error(f"{what} must be a str, got {type(value).__name__}")
    if not (allow_empty or value) or len(value) > limits.max_name_len:
        raise error(f"{what} must have 1..{limits.max_name_len} characters, got {len(value)}")


def _body_problem(value: Any, depth: int, limits: Limits) -> str | None:
    """Why ``value`` is not msgpack-native data with str map keys within ``limits``'
    container sizes, or None.

    Recursive, but bounded: it refuses to go deeper than ``limits.max_depth``.
    """
    kind = type(value)
    if kind is dict:
        if depth > limits.max_depth:
            return f"nests deeper than {limits.max_depth} levels"
        if len(value) > limits.max_map_len:
            return f"has a map of {len(value)} entries; at most {limits.max_map_len} accepted"
        for key, item in value.items():
            if type(key) is not str:
                return f"has a map key of type {type(key).__name__}; keys must be str"
            kind = type(item)  # leaves inline: a call per leaf doubled the cost
            if kind in _FLAT_SCALARS or (kind is int and _INT_MIN <= item <= _INT_MAX):
                continue
            problem = _body_problem(item, depth + 1, limits)
            if problem:
                return problem
    elif kind is list:
        if depth > limits.max_depth:
            return f"nests deeper than {limits.max_depth} levels"
        if len(value) > limits.max_array_len:
            return f"has a list of {len(value)} items; at most {limits.max_array_len} accepted"
        for item in value:
            kind = type(item)
            if kind in _FLAT_SCALARS or (kind is int and _INT_MIN <= item <= _INT_MAX):
                continue
            problem = _body_problem(item, depth + 1, limits)
            if problem:
                return problem
    elif kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            return f"holds the int {value}, outside msgpack's range"
    elif kind not in _FLAT_SCALARS:
        return f"holds a {kind.__name__}; accepted: None/bool/int/float/str/bytes"
    return None


def _decode_tensors(descriptors: Any, views: list[memoryview], limits: Limits):
    if not isinstance(descriptors, list) or len(descriptors) > limits.max_tensors:
        raise FrameError(f"tensors must be a list of at most {limits.max_tensors} descriptors")
    regions = []  # (frame, start, stop, tensor index) for the overlap check
    canonical = len(descriptors) == len(views) - 1  # one whole frame each, in order?
    tensors = []
    for i, desc in enumerate(descriptors):
        if type(desc) is not list or len(desc) != 5:
            raise FrameError(
                f"tensor {i}: descriptor must be [dtype, shape, frame, offset, nbytes]"
            )
        name, shape, frame, offset, nbytes = desc
        dtype = DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise FrameError(f"tensor {i}: dtype {name!r} not in {list(DTYPES)}")
        if type(shape) is not list or len(shape) > limits.max_ndim:
            raise FrameError(f"tensor {i}: shape must be a list of at most {limits.max_ndim} ints")
        for d in shape:  # (a loop, not all(<generator>): this runs per message)
            if type(d) is not int or d < 0:
                raise FrameError(f"tensor {i}: shape {shape!r} must hold ints >= 0")
        if type(frame) is not int or type(offset) is not int or type(nbytes) is not int:
            raise FrameError(f"tensor {i}: frame, offset and nbytes must be ints")
        if not 1 <= frame < len(views):
            raise FrameError(f"tensor {i}: frame {frame} outside [1, {len(views) - 1}]")
        count = shape[0] if len(shape) == 1 else math.prod(shape)
        itemsize = dtype.itemsize
        if nbytes != count * itemsize:
            raise FrameError(f"tensor {i}: nbytes {nbytes} != prod({shape}) * {itemsize}")
        if offset < 0 or offset % itemsize:
            raise FrameError(f"tensor {i}: offset {offset} not a multiple of {itemsize}")
        size = len(views[frame])
        if offset + nbytes > size:
            raise FrameError(
                f"tensor {i}: bytes [{offset}, {offset + nbytes}) past the end of frame "
                f"{frame} ({size} bytes)"
            )
        regions.append((frame, offset, offset + nbytes, i))
        canonical = canonical and frame == i + 1 and offset == 0 and nbytes == size
        if count == 0:
            tensors.append(np.empty(tuple(shape), dtype))
            continue
        array = np.frombuffer(views[frame], dtype, count, offset)
        if len(shape) != 1:
            array = array.reshape(tuple(shape))
        # Small frames sit at arbitrary offsets in libzmq's read buffer (TRANSPORT.md).
        tensors.append(array if array.flags.aligned else array.copy())

    if canonical:  # what encode sends: every frame used once, nothing can overlap
        return tensors
    regions.sort()
    used = {frame for frame, *_ in regions}
    if len(used) != len(views) - 1:
        unused = sorted(set(range(1, len(views))) - used)
        raise FrameError(f"frames {unused} carry no tensor")
    for (f1, _, stop1, i1), (f2, start2, _, i2) in zip(regions, regions[1:], strict=False):
        if f1 == f2 and start2 < stop1:
            raise FrameError(f"tensors {i1} and {i2} overlap in frame {f1}")
    return tensors
