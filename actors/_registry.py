"""Names: how actors find each other, in this process and across processes.

Addressing
----------
A target is one of

* an :class:`ActorRef` (what ``spawn`` / ``task_status.started`` hands out),
* a local name: ``"Optimizer"``,
* a remote name, ``"<name>@<node>"``: ``"Optimizer@rank1"``. Every process that runs a
  node has one node name; a ``name@node`` whose node is this process's own node is
  simply local, so the same string works from every rank.

We chose the ``name@node`` string (Erlang's ``{Name, Node}`` pair, written the way its
node names are) over a tuple because it survives logs, configs and msgpack unchanged.
Names may not contain ``@`` or whitespace.

The registry lives in a :class:`trio.lowlevel.RunVar`: each ``trio.run`` (each test) has
its own, and it empties itself as actors exit.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import TYPE_CHECKING, Any

import trio

from ._errors import NameTaken, NoNode

if TYPE_CHECKING:
    from ._actor import ActorRef

__all__ = ["Address", "current_node", "registered", "wait_registered", "whereis"]

_NAME = re.compile(r"^[^\s@]+$")


@dataclasses.dataclass(frozen=True)
class Address:
    """A remote actor: ``name`` registered on ``node``. ``str(addr)`` is ``name@node``."""

    name: str
    node: str

    def __str__(self) -> str:
        return f"{self.name}@{self.node}"


class _Registry:
    def __init__(self) -> None:
        self.names: dict[str, ActorRef] = {}
        self.node: Any = None  # the process's actors._node.Node, once opened
        self.rank: int | None = None  # default rank for log prefixes
        self.changed = trio.lowlevel.ParkingLot()  # woken on every register


_RUN = trio.lowlevel.RunVar("zerotrain_actor_registry")


def _registry() -> _Registry:
    try:
        return _RUN.get()
    except LookupError:
        reg = _Registry()
        _RUN.set(reg)
        return reg


def check_name(name: Any, what: str = "actor name") -> str:
    """Return ``name`` if it is a valid actor or node name, else raise ValueError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"{what} must be a non-empty string without '@' or whitespace, got {name!r}"
        )
    return name


def register(name: str, ref: ActorRef) -> None:
    """Register ``ref`` under ``name``; raise :class:`NameTaken` if a live actor holds it."""
    check_name(name)
    names = _registry().names
    holder = names.get(name)
    if holder is not None and holder.alive:
        raise NameTaken(f"name {name!r} is already registered by {holder!r}")
    names[name] = ref
    _registry().changed.unpark_all()


async def wait_registered(name: str, timeout: float | None = 5.0) -> ActorRef:
    """Wait until a live local actor is registered as ``name`` (e.g. while a supervisor
    restarts it) and return it; raise TimeoutError after ``timeout`` seconds."""
    check_name(name)
    with trio.move_on_after(float("inf") if timeout is None else timeout):
        while (ref := whereis(name)) is None:
            await _registry().changed.park()
        return ref
    raise TimeoutError(f"no actor registered as {name!r} within {timeout:g}s")


def unregister(name: str, ref: ActorRef) -> None:
    """Drop ``name`` if (and only if) it still points at ``ref``."""
    names = _registry().names
    if names.get(name) is ref:
        del names[name]


def whereis(name: str) -> ActorRef | None:
    """The live local actor registered as ``name``, or None."""
    ref = _registry().names.get(name)
    return ref if ref is not None and ref.alive else None


def registered() -> list[str]:
    """Names of the live local actors, sorted."""
    return sorted(n for n, r in _registry().names.items() if r.alive)


def parse_target(target: Any) -> ActorRef | Address | str:
    """Split a target into an ActorRef, a local name (str) or a remote :class:`Address`.

    Raises TypeError naming the accepted shapes when ``target`` is none of them.
    """
    if isinstance(target, str):
        name, address = _split(target)
        return name if address is None or address.node == local_node_name() else address
    from ._actor import ActorRef  # (here: a module-level import would be circular)

    if isinstance(target, ActorRef | Address):
        if isinstance(target, Address) and target.node == local_node_name():
            return target.name
        return target
    raise TypeError(
        "an actor target is an ActorRef, a local name ('Optimizer') or a remote name "
        f"('Optimizer@rank1'); got {target!r}"
    )


@functools.lru_cache(maxsize=1024)
def _split(target: str) -> tuple[str, Address | None]:
    """``"name"`` -> (name, None); ``"name@node"`` -> (name, its Address). Cached: a
    process calls the same few targets over and over (invalid ones are not cached)."""
    name, at, node = target.partition("@")
    check_name(name)
    if not at:
        return name, None
    return name, Address(name, check_name(node, "node name"))


# -- the process's node (set by actors._node) ----------------------------------------


def set_node(node: Any) -> None:
    _registry().node = node


def current_node(required: bool = True) -> Any:
    """This process's `Node` (open_node / child_node), or None with required=False.

    Raises NoNode when there is none and one is required.
    """
    node = _registry().node
    if node is None and required:
        raise NoNode(
            "remote actors need this process to run a node: "
            "`async with actors.open_node('rank0') as node:` (or child_node() in a "
            "process started by a supervisor)"
        )
    return node


def local_node_name() -> str | None:
    node = _registry().node
    return None if node is None else node.name


def set_default_rank(rank: int | None) -> None:
    _registry().rank = rank


def default_rank() -> int | None:
    return _registry().rank
