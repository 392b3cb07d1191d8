"""Wire data: which Python values a remote call, cast or reply may carry, and how.

Remote messages are ``Message`` s (``actors._frames``): a msgpack body plus raw tensor
frames. Never pickle. :func:`to_wire` turns a value into ``(body_data, tensors)`` and
:func:`from_wire` turns it back:

================================== =============================================
Python value                       on the wire
================================== =============================================
None, bool, int, float, str, bytes themselves
list                               a list
dict with str keys                 a map (a key starting with ``$`` is escaped)
tuple                              ``{"$t": [...]}``  (comes back a tuple)
other dicts                        ``{"$d": [[key, value], ...]}``
numpy array                        ``{"$nd": i}`` + tensor frame i (no copy)
numpy scalar                       the Python scalar
a ``@record`` dataclass            ``{"$r": "Name", "f": {field: value}}``
================================== =============================================

Anything else raises :class:`WireError` (a ``TypeError``) on the sending side, naming
the offending value -- so the caller learns at once, not the peer. Received data is
untrusted: unknown record names, bad tensor indices, wrong field names also raise
:class:`WireError`, which a node turns into a rejected-message reply.

Records are how actors send their message types (``BatchReady``, ``GradientsReduced``)
across processes: decorate the dataclass with :func:`record`; both processes must
import it (the name, not the class, travels).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["WireError", "from_wire", "record", "to_wire"]

_RECORDS: dict[str, type] = {}
_NAMES: dict[type, str] = {}
_MAX_DEPTH = 12  # tags can double the msgpack depth; _frames allows 32
_INT_MIN, _INT_MAX = -(2**63), 2**64
_PLAIN = frozenset({type(None), bool, float, str, bytes})  # travel as they are
_NESTED = frozenset({list, dict})  # what from_wire looks into


class WireError(TypeError):
    """A value cannot travel between processes, or received data is not valid."""


def record(cls: type | None = None, *, name: str | None = None):
    """Class decorator: let instances of dataclass ``cls`` travel in remote messages.

    ``name`` defaults to the class's ``__qualname__``; it must be unique per process.
    """

    def register(klass: type) -> type:
        if not dataclasses.is_dataclass(klass):
            raise TypeError(f"@record needs a dataclass, got {klass!r}")
        key = name or klass.__qualname__
        holder = _RECORDS.get(key)
        if holder is not None and holder is not klass:
            raise ValueError(f"record name {key!r} is already used by {holder!r}")
        _RECORDS[key] = klass
        _NAMES[klass] = key
        return klass

    return register(cls) if cls is not None else register


def to_wire(value: Any) -> tuple[Any, list[np.ndarray]]:
    """``(data, tensors)`` for ``value`` (see the table in the module doc)."""
    tensors: list[np.ndarray] = []
    return _encode(value, tensors, 0), tensors


def _encode(value: Any, tensors: list[np.ndarray], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise WireError(f"value nested deeper than {_MAX_DEPTH} levels")
    # Exact built-in types first (what nearly every message holds); subclasses and the
    # rest take the general path, _encode_other.
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is int and _INT_MIN <= value < _INT_MAX:
        return value
    # Items of a _PLAIN type are taken inline: a call per leaf was half the cost.
    if kind is list:
        return [v if type(v) in _PLAIN else _encode(v, tensors, depth + 1) for v in value]
    if kind is dict:
        for key in value:
            if type(key) is not str or key[:1] == "$":
                break
        else:
            return {
                k: v if type(v) in _PLAIN else _encode(v, tensors, depth + 1)
                for k, v in value.items()
            }
    return _encode_other(value, tensors, depth)


def _encode_other(value: Any, tensors: list[np.ndarray], depth: int) -> Any:
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        return value.item()
    if isinstance(value, int) and not isinstance(value, bool) and not _INT_MIN <= value < _INT_MAX:
        raise WireError(f"int {value} is outside msgpack's range [-2**63, 2**64)")
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    if isinstance(value, np.ndarray):  # (its size is checked by encode: MAX_FRAME_BYTES)
        tensors.append(value)
        return {"$nd": len(tensors) - 1}
    if isinstance(value, list):
        return [_encode(v, tensors, depth + 1) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return {"$t": [_encode(v, tensors, depth + 1) for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, tensors, depth + 1) for k, v in value.items()}
        pairs = [[_encode(k, tensors, depth + 1), _encode(v, tensors, depth + 1)]
                 for k, v in value.items()]  # fmt: skip
        return {"$d": pairs}
    name = _NAMES.get(type(value))
    if name is not None:
        fields = {
            f.name: _encode(getattr(value, f.name), tensors, depth + 1)
            for f in dataclasses.fields(value)
        }
        return {"$r": name, "f": fields}
    raise WireError(
        f"{type(value).__name__} value {value!r:.60} cannot travel to another process: "
        "use None/bool/int/float/str/bytes, lists, tuples, dicts, numpy arrays or a "
        "dataclass decorated with @actors.record"
    )


def from_wire(data: Any, tensors: list[np.ndarray]) -> Any:
    """Rebuild the value :func:`to_wire` encoded; raise :class:`WireError` if invalid."""
    return _decode(data, tensors, 0)


def _decode(data: Any, tensors: list[np.ndarray], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise WireError(f"data nested deeper than {_MAX_DEPTH} levels")
    kind = type(data)
    if kind is list:  # (leaves inline, as in _encode)
        return [v if type(v) not in _NESTED else _decode(v, tensors, depth + 1) for v in data]
    if kind is not dict:
        return data
    for key in data:  # a key starting with "$" marks a tagged value
        if type(key) is str and key[:1] == "$":
            return _decode_tagged(data, tensors, depth)
    return {
        k: v if type(v) not in _NESTED else _decode(v, tensors, depth + 1) for k, v in data.items()
    }


def _decode_tagged(data: dict, tensors: list[np.ndarray], depth: int) -> Any:
    if len(data) == 1 and "$nd" in data:
        index = data["$nd"]
        if type(index) is not int or not 0 <= index < len(tensors):
            raise WireError(f"tensor index {index!r} out of range ({len(tensors)} tensors)")
        return tensors[index]
    if len(data) == 1 and "$t" in data and isinstance(data["$t"], list):
        return tuple(_decode(v, tensors, depth + 1) for v in data["$t"])
    if len(data) == 1 and "$d" in data and isinstance(data["$d"], list):
        out = {}
        for pair in data["$d"]:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise WireError(f"bad dict entry {pair!r:.60}")
            key = _decode(pair[0], tensors, depth + 1)
            try:
                out[key] = _decode(pair[1], tensors, depth + 1)
            except TypeError as exc:  # unhashable key
                raise WireError(f"bad dict key {key!r:.60}: {exc}") from None
        return out
    if set(data) == {"$r", "f"}:
        klass = _RECORDS.get(data["$r"]) if isinstance(data["$r"], str) else None
        if klass is None or not isinstance(data["f"], dict):
            raise WireError(f"unknown record {data['$r']!r:.60} (is it imported here?)")
        fields = {k: _decode(v, tensors, depth + 1) for k, v in data["f"].items()}
        try:
            return klass(**fields)
        except TypeError as exc:
            raise WireError(f"record {data['$r']}: {exc}") from None
    raise WireError(f"unknown tagged value {sorted(map(str, data))!r:.60}")
