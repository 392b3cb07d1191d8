"""Child specs: how a supervisor starts, restarts and stops one child -- plain data.

A child spec has five fields, Elixir's names and defaults:

``id``        any hashable; unique among a supervisor's children.
``start``     an async function ``start(task_status=...)`` run with ``nursery.start``.
              It calls ``task_status.started(handle)`` once the child is ready (an
              :class:`ActorRef` for actors) and then runs until the child ends:
              returning means exit reason ``"normal"`` (or the string it returns),
              raising means a crash with that exception. A handle with a
              ``request_stop(reason)`` method is asked to stop gracefully; otherwise
              stopping a child cancels it.
``restart``   ``"permanent"`` (always restarted; the default), ``"transient"``
              (restarted only after an abnormal exit) or ``"temporary"`` (never).
``shutdown``  seconds granted to stop gracefully before the child is killed
              (cancelled); ``"brutal_kill"`` kills at once, ``"infinity"`` waits as long as
              it takes. Default 5.0 for workers, ``"infinity"`` for supervisors.
``type``      ``"worker"`` or ``"supervisor"`` (informational, and picks the default
              shutdown).

:func:`child_spec` is the one place where the accepted shapes are turned into a
:class:`ChildSpec`; every supervisor entry point goes through it.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
from collections.abc import Callable, Hashable
from typing import Any

from ._errors import ChildSpecError

__all__ = ["ChildSpec", "ChildType", "Restart", "child_spec"]


class Restart(enum.Enum):
    """When a terminated child is restarted (OTP restart types)."""

    PERMANENT = "permanent"  #: always
    TRANSIENT = "transient"  #: only after an abnormal exit
    TEMPORARY = "temporary"  #: never, even when a sibling's crash stopped it


class ChildType(enum.Enum):
    WORKER = "worker"
    SUPERVISOR = "supervisor"


_DEFAULT_SHUTDOWN = {ChildType.WORKER: 5.0, ChildType.SUPERVISOR: "infinity"}
_SHUTDOWN_WORDS = ("brutal_kill", "infinity")


def _enum_value(enum_cls: type[enum.Enum], value: Any, field: str) -> enum.Enum:
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in enum_cls)
        raise ChildSpecError(
            f"child spec {field} must be one of {accepted}; got {value!r}"
        ) from None


@dataclasses.dataclass(frozen=True)
class ChildSpec:
    """One child of a supervisor (see the module doc for each field)."""

    id: Hashable
    start: Callable[..., Any]
    restart: Restart = Restart.PERMANENT
    shutdown: float | str | None = None  # None: the default for ``type``
    type: ChildType = ChildType.WORKER

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "restart", _enum_value(Restart, self.restart, "restart"))
        set_(self, "type", _enum_value(ChildType, self.type, "type"))
        try:
            hash(self.id)
        except TypeError:
            raise ChildSpecError(f"child spec id must be hashable; got {self.id!r}") from None
        if not callable(self.start):
            raise ChildSpecError(
                "child spec start must be an async function start(task_status=...) "
                f"that calls task_status.started(handle); got {self.start!r}"
            )
        shutdown = _DEFAULT_SHUTDOWN[self.type] if self.shutdown is None else self.shutdown
        ok_number = (
            isinstance(shutdown, int | float) and not isinstance(shutdown, bool) and shutdown >= 0
        )
        if not (ok_number or shutdown in _SHUTDOWN_WORDS):
            raise ChildSpecError(
                "child spec shutdown must be seconds >= 0, 'brutal_kill' or 'infinity'; "
                f"got {shutdown!r}"
            )
        set_(self, "shutdown", shutdown)

    @property
    def shutdown_timeout(self) -> float | None:
        """Seconds of grace before a kill: 0 for brutal_kill, None for infinity."""
        if self.shutdown == "brutal_kill":
            return 0.0
        if self.shutdown == "infinity":
            return None
        return float(self.shutdown)


_SPEC_KEYS = {f.name for f in dataclasses.fields(ChildSpec)}

_ACCEPTED = """\
accepted shapes:
  ChildSpec(id="db", start=async_fn, restart="transient", shutdown=5.0, type="worker")
  {"id": "db", "start": async_fn, "restart": "transient"}   a dict with ChildSpec's keys
  MyActor                 an Actor subclass: MyActor.child_spec()
  (MyActor, arg)          MyActor.child_spec(arg)
  Supervisor([...])       any object with a child_spec() method (also process_spec(...))"""


def child_spec(spec: Any, **overrides: Any) -> ChildSpec:
    """Normalise any accepted child-spec shape into a :class:`ChildSpec`.

    ``overrides`` replace fields afterwards (``child_spec(Reducer, id="r2")``), like
    Elixir's ``Supervisor.child_spec/2``. Raises :class:`ChildSpecError` listing the
    accepted shapes and showing what was received.
    """
    if isinstance(spec, ChildSpec):
        result = spec
    elif isinstance(spec, dict):
        unknown = set(spec) - _SPEC_KEYS
        missing = {"id", "start"} - set(spec)
        if unknown or missing:
            problem = f"unknown keys {sorted(unknown)}" if unknown else f"missing {sorted(missing)}"
            raise ChildSpecError(f"invalid child spec dict ({problem}): {spec!r}\n{_ACCEPTED}")
        result = ChildSpec(**spec)
    elif isinstance(spec, tuple) and len(spec) == 2 and inspect.isclass(spec[0]):
        result = _from_method(spec[0], spec, spec[1])
    elif hasattr(spec, "child_spec"):
        result = _from_method(spec, spec)
    else:
        raise ChildSpecError(f"invalid child spec: {spec!r}\n{_ACCEPTED}")
    if overrides:
        unknown = set(overrides) - _SPEC_KEYS
        if unknown:
            raise ChildSpecError(
                f"unknown child spec override(s) {sorted(unknown)}; fields are {sorted(_SPEC_KEYS)}"
            )
        result = dataclasses.replace(result, **overrides)
    return result


def _from_method(owner: Any, received: Any, *args: Any) -> ChildSpec:
    method = getattr(owner, "child_spec", None)
    if not callable(method):
        raise ChildSpecError(f"invalid child spec: {received!r}\n{_ACCEPTED}")
    result = method(*args)
    if not isinstance(result, ChildSpec):
        raise ChildSpecError(
            f"{owner!r}.child_spec() returned {result!r}, not a ChildSpec\n{_ACCEPTED}"
        )
    return result
