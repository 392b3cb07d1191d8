"""What travels on the control endpoint: the request records and their framing.

A request is a remote call as ``actors`` makes one (its node's table: type ``call``, body
``to``, ``request``, ``timeout``; the answer a ``reply`` with the same ``seq`` and body
``ok, value`` or ``ok, kind, why``) in ``actors``' wire format: a msgpack header frame
(``actors._frames``) whose body holds values as ``actors._wire`` writes them (the requests
are records: ``{"$r": name, "f": {field: value}}``). A Unix stream socket carries no
message boundaries of its own, so each multipart is sent as::

    u32 frame count, then per frame: u32 length, bytes        (big-endian)

Two codecs write and read that one format. The daemon's side (:func:`decode_call`,
:func:`encode_reply`) is ``actors``' own (``actors.decode`` / ``actors.from_wire``, the
records registered with ``actors.record`` on first use), which validates everything a
peer sends. The client's side (:func:`encode_call`, :func:`decode_reply`) is this
module's, on msgpack alone: a client verb is a new process each time, and ``actors``'
codec imports numpy (tensor frames), most of such a process's start-up. Control messages
carry no tensors, so the client's codec refuses any; it writes exactly the bytes
``actors.encode`` writes for the same call, and ``tests/pipelines/daemon/test_client.py``
checks both directions against ``actors``.

Everything received is untrusted: the framing is bounded before anything is allocated
(:data:`MAX_FRAMES`, :data:`MAX_FRAME_BYTES`), the header is decoded under msgpack
length caps and checked, and :func:`check_request` checks each record's field types.

The requests are plain classes (:class:`_Request`: fields in declaration order, by
position or keyword, compared and shown as dataclasses are), not dataclasses: importing
``dataclasses`` imports ``inspect``, ``ast`` and ``dis``, which a client verb has no use
for (``test_client`` pins what a verb imports). The daemon's codec declares them
dataclasses when it registers them (``actors.record`` takes dataclasses), keeping these
same methods, so both sides build and compare a request alike.
"""

from __future__ import annotations

import struct

import msgpack

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
MAX_FRAMES = 1  # the header alone: control messages carry no tensors
_MAX_DEPTH = 16  # nesting of a control message's body, on both sides
_U32 = struct.Struct(">I")
# actors._frames.PROTOCOL_VERSION and its header's keys, in the order encode packs them
# (the client's codec writes the same bytes: test_client checks it)
_WIRE_VERSION = 1
_HEADER_KEYS = ("v", "type", "sender", "generation", "step", "seq", "body", "tensors")


class ControlError(ValueError):
    """A control message that is not valid; the text says why (one line)."""


_RECORD_NAMES: dict[type, str] = {}  # request class -> its record name on the wire


def _record(name: str):
    """Name a request class on the wire. ``actors.record`` registers it too, when the
    daemon's codec is first used (:func:`_actors`): importing ``actors``' codec here
    would import numpy into every client verb."""

    def register(cls: type) -> type:
        _RECORD_NAMES[cls] = name
        return cls

    return register


class _Request:
    """A request record: its fields are its class's annotations, in order; built by
    position or keyword (all required), compared field by field with its own class, and
    shown as ``Name(field=value, ...)`` -- as a dataclass is (see the module doc)."""

    _fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._fields = tuple(cls.__dict__.get("__annotations__", {}))

    def __init__(self, *args, **kwargs):
        names = self._fields
        if len(args) > len(names):
            raise TypeError(
                f"{type(self).__qualname__}() takes {len(names)} fields "
                f"({', '.join(names) or 'none'}), got {len(args)} positional"
            )
        values = dict(zip(names, args, strict=False))  # (fewer args: the rest by keyword)
        for key, value in kwargs.items():
            if key not in names or key in values:
                raise TypeError(
                    f"{type(self).__qualname__}() got an unexpected or repeated field "
                    f"{key!r}; its fields: {', '.join(names) or 'none'}"
                )
            values[key] = value
        missing = [n for n in names if n not in values]
        if missing:
            raise TypeError(f"{type(self).__qualname__}() is missing {', '.join(missing)}")
        for name in names:
            setattr(self, name, values[name])

    def __repr__(self):
        shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields)
        return f"{type(self).__qualname__}({shown})"

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._fields)

    __hash__ = None  # mutable, as a dataclass with eq and not frozen


@_record("zerotrain.Submit")
class Submit(_Request):
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


@_record("zerotrain.ListJobs")
class ListJobs(_Request):
    all: bool


@_record("zerotrain.JobStatus")
class JobStatus(_Request):
    job: str


@_record("zerotrain.Control")
class Control(_Request):
    """``verb`` is one of pause, resume, stop, cancel."""

    verb: str
    job: str


@_record("zerotrain.Checkpoint")
class Checkpoint(_Request):
    """A full checkpoint of a running job at a step its ranks agree on, training going
    on (answered with the step and the manifest's path)."""

    job: str


@_record("zerotrain.SetKey")
class SetKey(_Request):
    """Set live key ``key`` of a running job to ``value`` (a TOML value's text) from
    step ``at_step`` on (None: the next step every rank can still honour)."""

    job: str
    key: str
    value: str
    at_step: int | None


@_record("zerotrain.HookRequest")
class HookRequest(_Request):
    """Attach analyzers to a running job (``action`` "attach", ``target`` an absolute
    ``PATH[:NAME]`` or ``builtin[:NAME]``) or detach one (``action`` "detach", ``target``
    its name)."""

    job: str
    action: str
    target: str


@_record("zerotrain.ReadLog")
class ReadLog(_Request):
    job: str
    offset: int
    limit: int


@_record("zerotrain.DaemonInfo")
class DaemonInfo(_Request):
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
    import types
    import typing

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
    import typing  # (the daemon's side alone: a client verb need not import it)

    hints = typing.get_type_hints(type(value))
    for name in value._fields:
        item = getattr(value, name)
        if not _fits(item, hints[name]):
            raise ControlError(
                f"{type(value).__name__}.{name} must be {hints[name]}, got {type(item).__name__}"
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


# ---- the client's codec (msgpack alone) ----------------------------------------------


def encode_call(request, seq: int, sender: str, timeout: float) -> bytes:
    """A call of ``request`` (one of :data:`REQUESTS`) as ``actors.encode`` writes it."""
    name = _RECORD_NAMES.get(type(request))
    if name is None:
        names = ", ".join(cls.__name__ for cls in REQUESTS)
        raise TypeError(f"request must be one of {names}, got {type(request).__name__}")
    fields = {name: _plain(getattr(request, name)) for name in request._fields}
    body = {"to": "daemon", "request": {"$r": name, "f": fields}, "timeout": float(timeout)}
    values = (_WIRE_VERSION, "call", sender, 0, 0, seq, body, [])
    header = dict(zip(_HEADER_KEYS, values, strict=True))
    return pack_frames([msgpack.packb(header, use_bin_type=True)])


def _plain(value):
    # what a request's fields hold (check_request's types): str, int, None, list of str
    if value is None or type(value) in (str, int, bool, float, bytes):
        return value
    if type(value) is list:
        return [_plain(v) for v in value]
    raise TypeError(f"a request field holds a {type(value).__name__}; accepted: {_ACCEPTED}")


_ACCEPTED = "None/bool/int/float/str/bytes and lists of them"


def _reject_ext(code: int, data: bytes):
    raise ControlError(f"msgpack extension type {code} is not accepted")


def decode_reply(frames: list, seq: int):
    """The value of a reply to call ``seq``; ControlError for an error reply (its
    ``kind`` attribute says which) or anything malformed."""
    if len(frames) != 1:
        raise ControlError(f"bad reply from the daemon: {len(frames)} frames; control "
                           "messages are one frame (no tensors)")  # fmt: skip
    try:
        header = msgpack.unpackb(
            frames[0],
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            max_str_len=MAX_FRAME_BYTES,
            max_bin_len=MAX_FRAME_BYTES,
            max_array_len=1 << 16,
            max_map_len=1 << 12,
            max_ext_len=0,
        )
    except ControlError as err:
        raise ControlError(f"bad reply from the daemon: {err}") from None
    except Exception as err:  # untrusted bytes: every msgpack failure is a reason
        raise ControlError(
            f"bad reply from the daemon: header is not valid msgpack: {type(err).__name__}"
        ) from None
    if type(header) is not dict or set(header) != set(_HEADER_KEYS):
        raise ControlError(f"bad reply from the daemon: header keys must be {_HEADER_KEYS}")
    if header["v"] != _WIRE_VERSION or header["tensors"] != []:
        raise ControlError(
            f"bad reply from the daemon: protocol version {header['v']!r} (expected "
            f"{_WIRE_VERSION}) or tensors {header['tensors']!r:.40} (none accepted)"
        )
    kind, body = header["type"], header["body"]
    if kind != "reply" or header["seq"] not in (seq, 0) or type(body) is not dict:
        raise ControlError(f"unexpected {kind!r} message (seq {header['seq']!r}) from the daemon")
    if body.get("ok") is True:
        return _from_wire(body.get("value"), 0)
    err = ControlError(str(body.get("why", "the daemon refused the request")))
    err.kind = body.get("kind")
    raise err


def _from_wire(data, depth: int):
    """``actors.from_wire`` for tensor-free data: tuples ($t), other dicts ($d) and the
    requests' records ($r) come back as such; a tensor ($nd) is refused."""
    if depth > _MAX_DEPTH:
        raise ControlError(f"bad reply from the daemon: nested deeper than {_MAX_DEPTH} levels")
    if type(data) is list:
        return [_from_wire(v, depth + 1) for v in data]
    if type(data) is not dict:
        return data
    if not any(type(k) is str and k[:1] == "$" for k in data):
        return {k: _from_wire(v, depth + 1) for k, v in data.items()}
    if len(data) == 1 and type(data.get("$t")) is list:
        return tuple(_from_wire(v, depth + 1) for v in data["$t"])
    if len(data) == 1 and type(data.get("$d")) is list:
        out = {}
        for pair in data["$d"]:
            if type(pair) is not list or len(pair) != 2:
                raise ControlError(f"bad reply from the daemon: dict entry {pair!r:.60}")
            try:
                out[_from_wire(pair[0], depth + 1)] = _from_wire(pair[1], depth + 1)
            except TypeError:
                raise ControlError(f"bad reply from the daemon: dict key {pair[0]!r:.60}") from None
        return out
    if set(data) == {"$r", "f"} and type(data["f"]) is dict:
        names = {name: cls for cls, name in _RECORD_NAMES.items()}
        if data["$r"] in names:
            fields = {k: _from_wire(v, depth + 1) for k, v in data["f"].items()}
            try:
                return names[data["$r"]](**fields)
            except TypeError as err:
                raise ControlError(f"bad reply from the daemon: {err}") from None
    raise ControlError(
        f"bad reply from the daemon: tagged value {sorted(map(str, data))!r:.60} not accepted "
        "(a control reply carries no tensors; records: the requests')"
    )


# ---- the daemon's codec (actors') ------------------------------------------------------

_codec = None


def _actors():
    """``actors`` with the requests registered as its records (once): each declared a
    dataclass in place, its own ``__init__``, ``__repr__`` and ``__eq__`` kept."""
    global _codec
    if _codec is None:
        import dataclasses

        import actors

        for cls, name in _RECORD_NAMES.items():
            dataclasses.dataclass(cls, init=False, repr=False, eq=False)
            actors.record(name=name)(cls)
        _codec = actors
    return _codec


def control_limits():
    """``actors.Limits`` for a control message: one header frame of at most
    :data:`MAX_FRAME_BYTES`, no tensors."""
    actors = _actors()
    return actors.Limits(max_header_bytes=MAX_FRAME_BYTES, max_tensors=0, max_depth=_MAX_DEPTH)


def encode_reply(seq: int, *, value=None, kind: str | None = None, why: str = "") -> bytes:
    actors = _actors()
    if kind is None:
        data, tensors = actors.to_wire(value)
        body = {"ok": True, "value": data}
    else:
        tensors, body = [], {"ok": False, "kind": kind, "why": why}
    return pack_frames(actors.encode(actors.Message("reply", "daemon", 0, 0, seq, body, tensors)))


def decode_call(frames: list) -> tuple[int, object]:
    """(seq, request) from a received multipart; ControlError when it is not a valid call."""
    actors = _actors()
    try:
        msg = actors.decode(frames, control_limits())
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
