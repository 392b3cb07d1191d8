"""Errors and exit reasons shared by the whole runtime.

An *exit reason* says why an actor, a supervised task or an OS-process child ended. It
is either a string or an exception instance:

===================== ========================================================= =======
reason                meaning                                                   normal?
===================== ========================================================= =======
``"normal"``          returned / ``raise Stop()``                               yes
``"shutdown"``        stopped on request (supervisor shutdown, ``stop()``)      yes
``"shutdown: ..."``   stopped on request, with a detail                         yes
``"killed"``          did not stop within its shutdown timeout and was killed   no
``"noproc"``          the target did not exist when monitored or called          no
``"noconnection"``    its node stopped answering (heartbeats missed / gone)     no
an exception          it crashed with that exception                            no
===================== ========================================================= =======

"Normal" matters for ``transient`` children (restarted only after an abnormal exit)
and for links (a normal exit does not propagate). :class:`RestartIntensityExceeded`
counts as a shutdown, as OTP's supervisor exits with reason ``shutdown`` when its
restart intensity is exceeded: a parent restarts such a supervisor only if it is
``permanent``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ActorError",
    "ActorExited",
    "CallTimeout",
    "ChildSpecError",
    "LinkedExit",
    "NameTaken",
    "NoSuchActor",
    "NoNode",
    "ProcessExit",
    "RemoteError",
    "RestartIntensityExceeded",
    "StartChildError",
    "format_reason",
    "is_normal_exit",
]


class ActorError(Exception):
    """Base class of every error the actor runtime raises."""


class NoSuchActor(ActorError, LookupError):
    """No actor is registered under that name (on that node)."""


class NameTaken(ActorError, ValueError):
    """A name is already registered by a live actor."""


class NoNode(ActorError, RuntimeError):
    """Remote addressing was used but this process has no node (see ``open_node``)."""


class CallTimeout(ActorError, TimeoutError):
    """A call got no reply in time. The target may still process the request later."""

    def __init__(self, target: str, request: Any, timeout: float) -> None:
        text = f"{request!r:.80}"
        super().__init__(f"call to {target} timed out after {timeout:g}s (request: {text})")
        self.target = target
        self.timeout = timeout


class ActorExited(ActorError):
    """The target exited (or was gone) before replying; ``reason`` says why."""

    def __init__(self, target: str, reason: Any, doing: str = "before replying") -> None:
        super().__init__(f"{target} exited {doing}: {format_reason(reason)}")
        self.target = target
        self.reason = reason


class RemoteError(ActorError):
    """A crash reported by another process, carried as text (exceptions never travel)."""


class LinkedExit(ActorError):
    """This actor exits because an actor it is linked to exited abnormally."""

    def __init__(self, other: str, reason: Any) -> None:
        super().__init__(f"linked actor {other} exited: {format_reason(reason)}")
        self.other = other
        self.reason = reason


class ProcessExit(ActorError):
    """An OS-process child ended abnormally (non-zero status, signal, lost heartbeat)."""


class RestartIntensityExceeded(ActorError):
    """A supervisor saw more restarts than it may within its period and gave up."""


class StartChildError(ActorError):
    """A supervisor could not start one of its children at start-up."""

    def __init__(self, child_id: Any, reason: Any) -> None:
        super().__init__(f"failed to start child {child_id!r}: {format_reason(reason)}")
        self.child_id = child_id
        self.reason = reason


class ChildSpecError(ActorError, TypeError):
    """A child spec was not in any accepted shape (the message lists them)."""


def is_normal_exit(reason: Any) -> bool:
    """True for exit reasons that are not crashes (see the table in the module doc)."""
    if isinstance(reason, str):
        return reason in ("normal", "shutdown") or reason.startswith("shutdown:")
    return isinstance(reason, RestartIntensityExceeded)


def format_reason(reason: Any) -> str:
    """One-line text for an exit reason: strings as they are, exceptions as ``Type: msg``."""
    if isinstance(reason, RemoteError):
        return str(reason)  # already "Type: message", as formatted where it happened
    if isinstance(reason, BaseException):
        text = str(reason)
        return f"{type(reason).__name__}: {text}" if text else type(reason).__name__
    return str(reason)
