"""What a hook may return, checked in one place, and its JSON form.

A hook returns None or a dict of metrics. `validate_metrics` normalises it to a flat
dict name -> value where a value is one of

    int | float              a scalar (bools become ints); must be finite or nan
    list                     a small array (at most MAX_ARRAY_SIZE elements, nested
                             lists for 2-d and up), nan written as null
    Histogram                counts over fixed bin edges, kept as such so TensorBoard
                             gets a real histogram

Nested dicts are flattened with '/': {"norm": {"fc.weight": 1.0}} -> {"norm/fc.weight": 1.0}.
Infinity is refused, not clamped: a hook that can overflow should say so with nan.
The result is JSON-ready (json.dumps(..., allow_nan=False) accepts it) and small.
"""

import math
from typing import NamedTuple

import numpy as np

from ._hook import HookError

MAX_ARRAY_SIZE = 4096
MAX_METRICS = 4096

_ACCEPTED = "int, float, numpy scalar, array of at most {} numbers, Histogram, or a dict of those"


class Histogram(NamedTuple):
    """Counts of values in fixed bins: len(edges) == len(counts) + 1, edges ascending."""

    edges: np.ndarray
    counts: np.ndarray

    def to_json(self):
        return {"edges": _to_list(self.edges), "counts": _to_list(self.counts)}


def validate_metrics(hook_name: str, metrics) -> dict:
    """The flat, JSON-ready form of what `hook_name` returned, or HookError saying why not."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise HookError(
            f"hook {hook_name!r}: must return a dict of metrics or None, "
            f"got {type(metrics).__name__}"
        )
    flat = {}
    _flatten(hook_name, "", metrics, flat)
    if len(flat) > MAX_METRICS:
        raise HookError(
            f"hook {hook_name!r}: returned {len(flat)} metrics, at most {MAX_METRICS} allowed"
        )
    return flat


def _flatten(hook_name, prefix, metrics, out):
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise HookError(f"hook {hook_name!r}: metric names must be non-empty str, got {key!r}")
        name = prefix + key
        if isinstance(value, dict):
            _flatten(hook_name, name + "/", value, out)
        else:
            out[name] = _value(hook_name, name, value)


def _value(hook_name, name, value):
    where = f"hook {hook_name!r}: metric {name!r}"
    if isinstance(value, Histogram):
        edges = _array(where + " edges", value.edges)
        counts = _array(where + " counts", value.counts)
        if edges.ndim != 1 or counts.ndim != 1 or edges.size != counts.size + 1:
            raise HookError(
                f"{where}: a Histogram needs 1-d edges one longer than 1-d counts, "
                f"got edges {edges.shape} and counts {counts.shape}"
            )
        return Histogram(edges, counts)
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return _scalar(where, float(value))
    if isinstance(value, np.ndarray | list | tuple):
        arr = _array(where, value)
        if arr.ndim == 0:
            return _scalar(where, arr.item()) if arr.dtype.kind == "f" else int(arr.item())
        return _to_list(arr)
    raise HookError(
        f"{where}: expected {_ACCEPTED.format(MAX_ARRAY_SIZE)}, got {type(value).__name__}"
    )


def _scalar(where, x):
    if math.isinf(x):
        raise HookError(
            f"{where}: got {x}; metrics must be finite or nan (return nan to mark overflow)"
        )
    return x


def _array(where, value):
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise HookError(f"{where}: not a rectangular array ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise HookError(
            f"{where}: expected {_ACCEPTED.format(MAX_ARRAY_SIZE)}, "
            f"got an array of dtype {arr.dtype}"
        )
    if arr.size > MAX_ARRAY_SIZE:
        raise HookError(
            f"{where}: arrays may hold at most {MAX_ARRAY_SIZE} elements, got shape {arr.shape}"
        )
    if arr.dtype.kind == "f" and np.isinf(arr).any():
        raise HookError(f"{where}: contains inf; metrics must be finite or nan")
    return arr


def _to_list(arr):
    """Nested lists with nan -> None (strict JSON has no nan)."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        obj = arr.astype(object)
        obj[np.isnan(arr)] = None
        return obj.tolist()
    return arr.tolist()


def to_json_value(value):
    """A validated metric value as strict JSON data (nan -> null)."""
    if isinstance(value, Histogram):
        return value.to_json()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def make_record(step, hook, metrics=None, *, rank=None, error=None) -> dict:
    """One hooks.jsonl record: {"step", "hook", "kind", ["rank"], "metrics" | "error"}."""
    record = {"step": int(step), "hook": hook.name, "kind": hook.kind}
    if rank is not None:
        record["rank"] = int(rank)
    if error is not None:
        record["error"] = error
    else:
        record["metrics"] = {k: to_json_value(v) for k, v in (metrics or {}).items()}
    return record
