"""Launching on many hosts: where a node's identity comes from, Slurm host lists, and the
cluster's CURVE keys. Nothing here starts a process or opens a connection of its own; the
node agents (`zerotrain run` on each host) and their tcp:// transport use these.

    identity   resolve_identity: flags, then ZEROTRAIN_*, then torchrun / PyTorchJob /
               Indexed Job / JobSet variables, then Slurm under srun -> NodeIdentity
    hostlist   expand_hostlist: a Slurm node list as `scontrol show hostnames` expands it
    keys       init_keys / load_keys: a CURVE keypair per node, files 0600 in a 0700 DIR
    curve      start_authenticator, curve_server, curve_client, peer_node: CURVE with
               the cluster's keys and a ZAP allow-list on a zmq socket
    commands   `zerotrain env` and `zerotrain keys init` (cli.py registers them)
"""

from .commands import (
    LAUNCH_COMMANDS,
    add_identity_options,
    register_launch_commands,
    run_launch_command,
)
from .hostlist import MAX_HOSTS, HostlistError, expand_hostlist
from .identity import (
    IDENTITY_FLAGS,
    IdentityError,
    NodeIdentity,
    resolve_identity,
    slurm_master_port,
)
from .keys import ClusterKeys, KeysError, init_keys, load_keys

__all__ = [
    "IDENTITY_FLAGS",
    "LAUNCH_COMMANDS",
    "MAX_HOSTS",
    "ClusterKeys",
    "HostlistError",
    "IdentityError",
    "KeysError",
    "NodeIdentity",
    "add_identity_options",
    "expand_hostlist",
    "init_keys",
    "load_keys",
    "register_launch_commands",
    "resolve_identity",
    "run_launch_command",
    "slurm_master_port",
]
