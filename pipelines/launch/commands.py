"""`zerotrain env` and `zerotrain keys init`: the command-line face of this package.

    zerotrain env [CONFIG] [--ranks N] [--nodes N --node-rank K --master HOST:PORT
                  --ranks-per-node R --advertise-addr ADDR --run-id ID] [--json]
    zerotrain keys init DIR --nodes N

`env` prints the identity this process would run with and where each value came from
(pipelines.launch.identity has the rules). It reads a config only when given CONFIG
(its cluster.ranks, or --ranks, then sets ranks per node); without either, ranks per
node is what --ranks-per-node or ZEROTRAIN_RANKS_PER_NODE say, or not known yet.
`keys init` writes the cluster's CURVE keys (pipelines.launch.keys). Both exit 0 on
success and 2 with one line on stderr for anything refused.

cli.py calls register_launch_commands(subparsers) and, for a command in
LAUNCH_COMMANDS, run_launch_command(args, out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..cliargs import int_at_least
from .identity import IDENTITY_FLAGS, IdentityError, NodeIdentity, resolve_identity
from .keys import KeysError, init_keys

__all__ = [
    "LAUNCH_COMMANDS",
    "add_identity_options",
    "register_launch_commands",
    "run_launch_command",
]

LAUNCH_COMMANDS = ("env", "keys")
_EXIT_OK, _EXIT_USAGE = 0, 2


_count = int_at_least(1)


def add_identity_options(parser: argparse.ArgumentParser) -> None:
    """The identity flags (IDENTITY_FLAGS), as strings: resolve_identity checks them, so
    a flag and its ZEROTRAIN_* variable are read by one rule and fail with one message."""
    group = parser.add_argument_group("node identity (multi-node runs)")
    group.add_argument("--nodes", metavar="N", help="number of nodes")
    group.add_argument("--node-rank", metavar="K", help="this node's rank, 0..N-1")
    group.add_argument("--master", metavar="HOST:PORT", help="where node 0 listens")
    group.add_argument(
        "--ranks-per-node", metavar="R", help="rank processes per node (default: ranks / N)"
    )
    group.add_argument("--advertise-addr", metavar="ADDR", help="the address peers reach")
    group.add_argument("--run-id", metavar="ID", help="the run's id, checked in handshakes")


def register_launch_commands(subparsers) -> None:
    """Add `env` and `keys` to the `zerotrain` subparsers."""
    env = subparsers.add_parser("env", help="show this node's identity and its sources")
    env.add_argument("config", nargs="?", default=None, help="a pipeline (for cluster.ranks)")
    env.add_argument("--ranks", type=_count, help="rank processes over all nodes")
    add_identity_options(env)
    env.add_argument("--json", action="store_true", help="one JSON object")
    keys = subparsers.add_parser("keys", help="the cluster's CURVE keys")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", parser_class=type(keys))
    init = actions.add_parser("init", help="write a keypair per node into a new DIR")
    init.add_argument("dir", help="a new or empty directory (made 0700)")
    init.add_argument("--nodes", type=_count, required=True, help="number of nodes")


def run_launch_command(args, out=None) -> int:
    """Run `env` or `keys` (args from the parser register_launch_commands extended)."""
    out = sys.stdout if out is None else out
    try:
        if args.command == "env":
            return _cmd_env(args, out)
        return _cmd_keys(args, out)
    except (IdentityError, KeysError) as err:
        print(f"zerotrain {args.command}: {err}", file=sys.stderr)
        return _EXIT_USAGE


def _cmd_env(args, out) -> int:
    cluster_ranks, ranks_source = args.ranks, "--ranks"
    if args.config is not None:
        from ..config import load_config

        overrides = [] if args.ranks is None else [f"cluster.ranks={args.ranks}"]
        cluster_ranks = load_config(args.config, overrides).cluster.ranks
        ranks_source = "--ranks" if args.ranks is not None else "cluster.ranks"
    flags = {key: getattr(args, key) for key in IDENTITY_FLAGS}
    identity = resolve_identity(
        flags, os.environ, cluster_ranks=cluster_ranks, cluster_ranks_source=ranks_source
    )
    if args.json:
        print(json.dumps(identity.as_dict(), sort_keys=True), file=out)
    else:
        print(_describe(identity), file=out)
    return _EXIT_OK


def _describe(identity: NodeIdentity) -> str:
    """The identity as a table: value name, value, where it came from."""
    unknown = "not known: give --ranks, CONFIG or --ranks-per-node"
    rows = []
    for name in ("nnodes", "node_rank", "master_addr", "master_port", "ranks_per_node",
                 "world_size", "advertise_addr", "run_id", "launcher"):  # fmt: skip
        value = getattr(identity, name)
        source = identity.sources.get(name, "")
        if value is None:
            source = unknown if name in ("ranks_per_node", "world_size") else "not given"
        rows.append((name, "-" if value is None else str(value), source))
    width = max(len(value) for _, value, _ in rows)
    lines = [f"{name:<15} {value:<{width}}  {source}".rstrip() for name, value, source in rows]
    lines += [f"note: {note}" for note in identity.notes]
    return "\n".join(lines)


def _cmd_keys(args, out) -> int:
    if args.keys_command != "init":
        print("zerotrain keys: expected init DIR --nodes N", file=sys.stderr)
        return _EXIT_USAGE
    keys = init_keys(args.dir, args.nodes)
    print(
        f"wrote CURVE keys for {keys.nodes} node(s) to {keys.directory}: node-K.key "
        "(public) and node-K.key_secret (secret), files 0600, directory 0700",
        file=out,
    )
    return _EXIT_OK
