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

import importlib

# private module -> the public names it defines, each tuple that module's `__all__` in its
# order (tests/actors/test_public_api.py compares them). `import actors` imports none of
# them: each loads on first use (``__getattr__`` below), so a process that needs only the
# frame codec -- `zerotrain status` -- does not pay for trio, zmq and the runtime.
_HOMES = {
    "_actor": (
        "NOREPLY",
        "Actor",
        "ActorRef",
        "ActorStats",
        "Down",
        "Exit",
        "From",
        "MonitorRef",
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
    ),
    "_admission": ("Admission", "Keyring", "admit_curve", "secure_tcp"),
    "_bf16": ("bf16_round", "bf16_widen"),
    "_collectives": ("CollectiveError", "Ring", "shard_bounds"),
    "_errors": (
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
    ),
    "_frames": (
        "DEFAULT_LIMITS",
        "DTYPES",
        "MAX_FRAME_BYTES",
        "PROTOCOL_VERSION",
        "FrameError",
        "Limits",
        "Message",
        "decode",
        "encode",
    ),
    "_mailbox": ("Mailbox", "MailboxClosed", "MailboxFull", "MailboxStats"),
    "_node": ("Node", "PeerInfo", "open_node"),
    "_process": ("ENV", "ProcessChild", "child_node", "process_spec"),
    "_registry": ("Address", "current_node", "registered", "wait_registered", "whereis"),
    "_spec": ("ChildSpec", "ChildType", "Restart", "child_spec"),
    "_supervisor": (
        "ABANDON_AFTER",
        "ChildInfo",
        "ChildState",
        "Strategy",
        "Supervisor",
        "count_children",
        "restart_child",
        "terminate_child",
        "which_children",
    ),
    "_transport": (
        "DEFAULT_SOCKET_OPTIONS",
        "PeerUnreachable",
        "TrioSocket",
        "get_context",
        "ipc_directory",
        "ipc_endpoint",
        "new_ipc_directory",
        "open_socket",
        "wait_released",
    ),
    "_wire": ("WireError", "from_wire", "record", "to_wire"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [name for names in _HOMES.values() for name in names]


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'actors' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"actors.{module}"), name)
    globals()[name] = value  # later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
