"""zerotrain's actor runtime: supervised trio actors, ranks as OS processes, ZeroMQ.

A tour (each module's doc has the details and the failure rules):

* ``Actor`` (``_actor``): a GenServer on trio with a bounded mailbox. ``call`` / ``cast``
  / ``send`` / ``stop`` / ``monitor`` / ``link`` take a ref, a local name, or
  ``"name@node"`` for an actor in another process.
* ``Supervisor`` (``_supervisor``): OTP strategies, restart types and intensity over
  child specs (``_spec``: ``ChildSpec``, ``child_spec()``).
* ``open_node`` (``_node``): this process's node -- remote call / cast / monitor / link
  over ZeroMQ, heartbeats, untrusted-input handling. Payloads follow ``_wire`` (no pickle).
* ``process_spec`` / ``child_node`` (``_process``): OS processes as supervised children,
  and the API a child process calls.
* ``open_socket`` / ``Message`` / ``Ring`` (``_transport``, ``_frames``, ``_collectives``):
  the ZeroMQ-on-trio layer underneath, and ring collectives for tensors (``_bf16``:
  ``bf16_round`` / ``bf16_widen``, the bfloat16 wire a float32 sum may travel on).

A rank process::

    async def main():                                   # started by process_spec(...)
        async with actors.child_node():                 # node, parent link, heartbeats
            await actors.Supervisor([Optimizer.child_spec(name="Optimizer")]).run()

and its parent::

    async with actors.open_node("cluster"):
        specs = [actors.process_spec(f"rank{r}", argv(r), wait_for=["Optimizer"])
                 for r in range(world)]
        async with trio.open_nursery() as nursery:
            await nursery.start(actors.Supervisor(specs, name="cluster").run)
            await actors.call("Optimizer@rank1", request)

Everything public is re-exported here exactly once from a private ``actors._x`` module
(``tests/actors/test_public_api.py`` checks it). This package knows nothing of training.
"""

from ._actor import (
    NOREPLY,
    Actor,
    ActorRef,
    ActorStats,
    Down,
    Exit,
    From,
    MonitorRef,
    Stop,
    call,
    cast,
    current_actor,
    demonitor,
    link,
    monitor,
    send,
    spawn,
    statistics,
    stop,
    unlink,
)
from ._admission import Admission, admit_curve
from ._bf16 import bf16_round, bf16_widen
from ._collectives import CollectiveError, Ring, shard_bounds
from ._errors import (
    ActorError,
    ActorExited,
    CallTimeout,
    ChildSpecError,
    LinkedExit,
    NameTaken,
    NoNode,
    NoSuchActor,
    ProcessExit,
    RemoteError,
    RestartIntensityExceeded,
    StartChildError,
    format_reason,
    is_normal_exit,
)
from ._frames import (
    DEFAULT_LIMITS,
    DTYPES,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    FrameError,
    Limits,
    Message,
    decode,
    encode,
)
from ._mailbox import Mailbox, MailboxClosed, MailboxFull, MailboxStats
from ._node import Node, PeerInfo, open_node
from ._process import ENV, ProcessChild, child_node, process_spec
from ._registry import Address, current_node, registered, wait_registered, whereis
from ._spec import ChildSpec, ChildType, Restart, child_spec
from ._supervisor import (
    ABANDON_AFTER,
    ChildInfo,
    ChildState,
    Strategy,
    Supervisor,
    count_children,
    restart_child,
    terminate_child,
    which_children,
)
from ._transport import (
    DEFAULT_SOCKET_OPTIONS,
    PeerUnreachable,
    TrioSocket,
    get_context,
    ipc_directory,
    ipc_endpoint,
    new_ipc_directory,
    open_socket,
    wait_released,
)
from ._wire import WireError, from_wire, record, to_wire

__all__ = [
    # actors and messages
    "Actor",
    "ActorRef",
    "ActorStats",
    "Down",
    "Exit",
    "From",
    "MonitorRef",
    "NOREPLY",
    "Stop",
    "call",
    "cast",
    "current_actor",
    "demonitor",
    "link",
    "monitor",
    "send",
    "spawn",
    "statistics",
    "stop",
    "unlink",
    # mailboxes
    "Mailbox",
    "MailboxClosed",
    "MailboxFull",
    "MailboxStats",
    # names
    "Address",
    "current_node",
    "registered",
    "wait_registered",
    "whereis",
    # supervision
    "ABANDON_AFTER",
    "ChildInfo",
    "ChildSpec",
    "ChildState",
    "ChildType",
    "Restart",
    "Strategy",
    "Supervisor",
    "child_spec",
    "count_children",
    "restart_child",
    "terminate_child",
    "which_children",
    # nodes, processes, wire data
    "Admission",
    "ENV",
    "Node",
    "PeerInfo",
    "ProcessChild",
    "WireError",
    "child_node",
    "from_wire",
    "open_node",
    "process_spec",
    "record",
    "to_wire",
    # transport, frames, collectives
    "CollectiveError",
    "DEFAULT_LIMITS",
    "DEFAULT_SOCKET_OPTIONS",
    "DTYPES",
    "FrameError",
    "Limits",
    "MAX_FRAME_BYTES",
    "Message",
    "PROTOCOL_VERSION",
    "PeerUnreachable",
    "Ring",
    "admit_curve",
    "bf16_round",
    "bf16_widen",
    "TrioSocket",
    "decode",
    "encode",
    "get_context",
    "ipc_directory",
    "ipc_endpoint",
    "new_ipc_directory",
    "open_socket",
    "shard_bounds",
    "wait_released",
    # errors and exit reasons
    "ActorError",
    "ActorExited",
    "CallTimeout",
    "ChildSpecError",
    "LinkedExit",
    "NameTaken",
    "NoNode",
    "NoSuchActor",
    "ProcessExit",
    "RemoteError",
    "RestartIntensityExceeded",
    "StartChildError",
    "format_reason",
    "is_normal_exit",
]
