"""What travels on the control endpoint: the request records and their framing.

A request is a remote call as ``actors`` makes one (its node's table: type ``call``, body
``to``, ``request``, ``timeout``; the answer a ``reply`` with the same ``seq`` and body
``ok, value`` or ``ok, kind, why``), encoded by ``actors``' frame codec and its wire data
rules (``actors.encode`` / ``actors.decode``, ``actors.to_wire`` / ``actors.from_wire``;
the requests are ``@actors.record`` dataclasses). A Unix stream socket carries no message
boundaries of its own, so each multipart is sent as::

    u32 frame count, then per frame: u32 length, bytes        (big-endian)

Everything received is untrusted: the framing is bounded before anything is allocated
(:data:`MAX_FRAMES`, :data:`MAX_FRAME_BYTES`), the frame codec validates the header, and
:func:`check_request` checks each record's field types. Control requests carry no
tensors.
"""

from __future__ import annotations

import dataclasses
import struct
import types
import typing

import actors

__all__ = [
    "MAX_FRAMES",
    "MAX_FRAME_BYTES",
    "Checkpoint",
    "Control",
    "ControlError",
    "DaemonInfo",
    "HookRequest",
    "JobStatus",
    "ListJobs",
    "ReadLog",
    "SetKey",
    "Submit",
    "check_request",
    "pack_frames",
]

MAX_FRAME_BYTES = 1 << 20
CONTROL_LIMITS = actors.Limits(max_header_bytes=MAX_FRAME_BYTES, max_tensors=0, max_depth=16)
MAX_FRAMES = CONTROL_LIMITS.max_frames  # the header alone: requests carry no tensors
_U32 = struct.Struct(">I")


class ControlError(ValueError):
    """A control message that is not valid; the text says why (one line)."""


@actors.record(name="zerotrain.Submit")
@dataclasses.dataclass
class Submit:
    """Queue a job. ``config_toml`` is the pipeline file's text, copied at submit so the
    job's config is fixed; ``overrides`` are `--set` texts (the flag shorthands folded
    in); ``hooks`` are absolute ``PATH[:NAME]`` or ``builtin[:NAME]`` specs."""

    pipeline: str
    config_toml: str
    overrides: list[str]
    hooks: list[str]
    cwd: str
    name: str
    priority: int


@actors.record(name="zerotrain.ListJobs")
@dataclasses.dataclass
class ListJobs:
    all: bool


@actors.record(name="zerotrain.JobStatus")
@dataclasses.dataclass
class JobStatus:
    job: str


@actors.record(name="zerotrain.Control")
@dataclasses.dataclass
class Control:
    """``verb`` is one of pause, resume, stop, cancel."""

    verb: str
    job: str


@actors.record(name="zerotrain.Checkpoint")
@dataclasses.dataclass
class Checkpoint:
    """A full checkpoint of a running job at a step its ranks agree on, training going
    on (answered with the step and the manifest's path)."""

    job: str


@actors.record(name="zerotrain.SetKey")
@dataclasses.dataclass
class SetKey:
    """Set live key ``key`` of a running job to ``value`` (a TOML value's text) from
    step ``at_step`` on (None: the next step every rank can still honour)."""

    job: str
    key: str
    value: str
    at_step: int | None


@actors.record(name="zerotrain.HookRequest")
@dataclasses.dataclass
class HookRequest:
    """Attach analyzers to a running job (``action`` "attach", ``target`` an absolute
    ``PATH[:NAME]`` or ``builtin[:NAME]``) or detach one (``action`` "detach", ``target``
    its name)."""

    job: str
    action: str
    target: str


@actors.record(name="zerotrain.ReadLog")
@dataclasses.dataclass
class ReadLog:
    job: str
    offset: int
    limit: int


@actors.record(name="zerotrain.DaemonInfo")
@dataclasses.dataclass
class DaemonInfo:
    pass


REQUESTS = (
    Submit,
    ListJobs,
    JobStatus,
    Control,
    ReadLog,
    DaemonInfo,
    Checkpoint,
    SetKey,
    HookRequest,
)


def _fits(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return type(value) is list and all(_fits(v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, t) for t in typing.get_args(tp))
    if tp is int:
        return type(value) is int
    if tp is type(None):
        return value is None
    return type(value) is tp


def check_request(value) -> object:
    """``value`` if it is one of :data:`REQUESTS` with fields of the declared types, else
    ControlError naming the first bad field and what it accepts."""
    if type(value) not in REQUESTS:
        names = ", ".join(cls.__name__ for cls in REQUESTS)
        raise ControlError(f"request must be one of {names}, got {type(value).__name__}")
    hints = typing.get_type_hints(type(value))
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if not _fits(item, hints[f.name]):
            raise ControlError(
                f"{type(value).__name__}.{f.name} must be {hints[f.name]}, "
                f"got {type(item).__name__}"
            )
    return value


def pack_frames(frames: list) -> bytes:
    """One multipart as the stream carries it (see the module doc)."""
    parts = [_U32.pack(len(frames))]
    for frame in frames:
        data = bytes(frame)
        parts.append(_U32.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def encode_call(request, seq: int, sender: str, timeout: float) -> bytes:
    data, tensors = actors.to_wire(request)
    body = {"to": "daemon", "request": data, "timeout": float(timeout)}
    return pack_frames(actors.encode(actors.Message("call", sender, 0, 0, seq, body, tensors)))


def encode_reply(seq: int, *, value=None, kind: str | None = None, why: str = "") -> bytes:
    if kind is None:
        data, tensors = actors.to_wire(value)
        body = {"ok": True, "value": data}
    else:
        tensors, body = [], {"ok": False, "kind": kind, "why": why}
    return pack_frames(actors.encode(actors.Message("reply", "daemon", 0, 0, seq, body, tensors)))


def decode_call(frames: list) -> tuple[int, object]:
    """(seq, request) from a received multipart; ControlError when it is not a valid call."""
    try:
        msg = actors.decode(frames, CONTROL_LIMITS)
    except actors.FrameError as err:
        raise ControlError(f"bad frame: {err.reason}") from None
    if msg.type != "call":
        raise ControlError(f"message type {msg.type!r} not accepted; a request is a 'call'")
    body = msg.body
    if set(body) != {"to", "request", "timeout"}:
        raise ControlError(f"call body must have keys to, request, timeout; got {sorted(body)}")
    if body["to"] != "daemon":
        raise ControlError(f"no actor {body['to']!r} here; requests go to 'daemon'")
    try:
        request = actors.from_wire(body["request"], msg.tensors)
    except actors.WireError as err:
        raise ControlError(f"bad request: {err}") from None
    return msg.seq, check_request(request)


def decode_reply(frames: list, seq: int):
    """The value of a reply to call ``seq``; ControlError for an error reply (its
    ``kind`` attribute says which) or anything malformed."""
    try:
        msg = actors.decode(frames, CONTROL_LIMITS)
    except actors.FrameError as err:
        raise ControlError(f"bad reply from the daemon: {err.reason}") from None
    if msg.type != "reply" or msg.seq not in (seq, 0):
        raise ControlError(f"unexpected {msg.type!r} message (seq {msg.seq}) from the daemon")
    body = msg.body
    if body.get("ok") is True:
        return actors.from_wire(body.get("value"), msg.tensors)
    err = ControlError(str(body.get("why", "the daemon refused the request")))
    err.kind = body.get("kind")
    raise err
