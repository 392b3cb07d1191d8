"""zerotrain's actor runtime: supervised trio actors, ranks as OS processes, ZeroMQ.

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
from ._mailbox import Mailbox, MailboxClosed, MailboxFull, MailboxStats
from ._node import Node, PeerInfo, open_node
from ._process import ENV, ProcessChild, child_node, process_spec
from ._registry import Address, registered, wait_registered, whereis
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
