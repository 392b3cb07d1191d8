"""Node agents: one `zerotrain run` process per host, the run's ranks spread over them.

    node 0  "cluster"   binds the master address (tcp://MASTER:PORT); runs the
                        Coordinator, the Rendezvous and its own ranks' supervisor
    node K  "nodeK"     binds tcp://ADVERTISE:* ; supervises ranks K*R .. K*R+R-1

An agent resolves its identity (pipelines.launch.resolve_identity: flags, ZEROTRAIN_*,
torchrun-style variables, Slurm), reserves a node port and a ring port on its advertise
address for each of its ranks, and tells node 0's Rendezvous in one call
(`NodeHello`). Once all N nodes have said hello, the Rendezvous answers every one with
the whole table -- each node's and each rank's endpoint -- and only then does any agent
start its ranks: a rank's plan names every peer it may talk to (the Coordinator, its
ring neighbours, the Checkpointer that holds its replica), so nothing is resolved by
guesswork across hosts. Ranks are node-major (global rank = K*R + local rank), so N
nodes x R ranks form the same ring as N*R ranks on one host and give the same bits.

A hello from another run (run id), another config (config hash), other hooks or a
world that does not add up is refused in one line; the agent saying it exits 2. So is a
second agent of a node rank whose agent node 0 hears from: node 0's node holds each
agent's name for its live process (actors._node, "Duplicates") and tells the second one
who holds it. An agent K whose ranks exhaust their restart budget reports it to node 0
(the run fails there, exit 3); an agent K that loses node 0 waits for it (below).

A lost node K (agent and ranks killed) is waited for: node 0's Coordinator sees its
ranks down and the other ranks keep their state in memory, each rank's replica on the
next node (messages.replica_holder), for cluster.rejoin_timeout. Node K started again
says hello again; the Rendezvous answers with the table of the first start, and the
agent takes back those rank endpoints (`adopt_table`), so every other rank's plan
still names them. Past the timeout the run fails (exit 3) naming node K.

A lost node 0 (the Coordinator's: agent and ranks killed) is waited for the same way,
from the other side: every other agent keeps its ranks -- their snapshots, and the
replicas they hold of node 0's ranks -- for cluster.rejoin_timeout, and their joins
wait (messages.join). Node 0 started again with the same flags finds the record of the
run's first start in its run dir (NODES_RECORD: run id, config hash, the whole table;
`earlier_start`), so it takes the dir as its own again, binds its ranks' endpoints of
that start, and its Rendezvous waits for a hello from every other node ("running": its
ranks live). Then the new Coordinator learns the run's state from the ranks' joins --
the generation each trained in, the snapshots and replicas each holds -- and forms the
next generation from memory (or, with no replica left, from the last checkpoint).
Past the timeout the other agents stop their ranks and exit 3, naming node 0 and the
last good checkpoint.

Signals. Each agent forwards a stop signal to the Coordinator as its own source ("the
agent of node K"), so one signal to every agent (scancel) is one planned stop, and a
second signal to one agent stops at once, as on one host.

Files. Given one --run-dir (a shared filesystem, or one machine), node 0 owns DIR and
node K owns DIR/node-K (its own lock, config, data record, ranks.log); every rank writes
its checkpoint shards into DIR's checkpoint root, where node 0 writes the manifests,
the metrics, summary.json and the final weights. Without a shared filesystem a node's
shards stay on its host: recovery from memory works, recovery from disk does not.

Transport. Between hosts only tcp://. With the cluster's keys (`--keys DIR` or
cluster.keys; pipelines.launch.keys) every process of the run -- agents and ranks --
installs its host's keyring (pipelines.launch.curve.node_keyring) before it opens a
socket, so every tcp:// socket is CURVE: node K's key names host K, a key may speak
only for its host's agent and ranks, a ring inbox admits its left neighbour's host
only, and every handshake says the run id (actors._admission). Without keys an agent
refuses a non-loopback address, and says in one line that a loopback-only run goes
without (a test mode).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import trio

import actors

from ..core import RunRefused
from ..launch import ClusterKeys, KeysError, NodeIdentity, load_keys
from ..launch.curve import node_keyring
from ..store.rundir import last_good_checkpoint, write_json_atomic

__all__ = [
    "HELLO_TIMEOUT",
    "NODES_RECORD",
    "earlier_start",
    "NodeLayout",
    "Rendezvous",
    "NodeAgent",
    "adopt_table",
    "agent_label",
    "analyzer_place",
    "announce_end",
    "check_plaintext",
    "keyring_plan",
    "secure_agent",
    "secure_rank",
    "default_run_dir",
    "endpoint_of",
    "gather_nodes",
    "kill_rank",
    "layout_for",
    "layout_from_args",
    "local_table",
    "node_name",
    "plan_env_dir",
    "plan_node",
    "record_control",
    "rendezvous",
    "reserve_ports",
    "share_checkpoint_root",
    "supervise_node",
    "write_plan_table",
]

RENDEZVOUS = "Rendezvous@cluster"
HELLO_TIMEOUT = 120.0  # seconds for every node to say hello (Slurm starts them together)
_HELLO_RETRY = 0.5  # seconds between hellos while node 0 is not up yet
NODES_RECORD = "nodes.json"  # in node 0's run dir: the run's nodes, once all said hello
# heartbeat timeouts a hello goes on while node 0 says a live agent holds this node
# rank: a predecessor just killed is declared lost within about one
_HELD_GRACE = 3


def node_name(k: int) -> str:
    """The actors node name of agent k: node 0 is "cluster" (the Coordinator's home)."""
    return "cluster" if k == 0 else f"node{k}"


def _ip(host: str, what: str) -> str:
    """A host name or address as an IPv4/IPv6 address to bind or connect to."""
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except OSError as err:
        raise RunRefused(f"{what} {host!r} does not resolve: {err}") from None


def _is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


@dataclass(frozen=True)
class NodeLayout:
    """This agent's place in the run, with its addresses resolved.

    identity        the resolved NodeIdentity (nnodes > 1)
    master_ip/port  where node 0 binds and every agent connects
    advertise_ip    where this node's agent and ranks bind (node 0: the master's address)
    ranks           the global ranks this node runs
    run_id          what every hello must carry (the identity's, else the master address)
    keys            the cluster's CURVE keys (None: plaintext on loopback, a test mode)
    hooks           "KIND NAME" of each hook this node's ranks run (--hook and
                    hooks.specs), sorted: node 0 takes only a node with its own
    """

    identity: NodeIdentity
    master_ip: str
    master_port: int
    advertise_ip: str
    ranks: range
    run_id: str
    keys: ClusterKeys | None = None
    hooks: tuple[str, ...] = ()

    @property
    def node_rank(self) -> int:
        return self.identity.node_rank

    @property
    def nnodes(self) -> int:
        return self.identity.nnodes

    @property
    def master_endpoint(self) -> str:
        return endpoint_of(self.master_ip, self.master_port)


def endpoint_of(ip: str, port: int | str) -> str:
    return f"tcp://[{ip}]:{port}" if ":" in ip else f"tcp://{ip}:{port}"


def layout_for(identity: NodeIdentity) -> NodeLayout:
    """The layout of a multi-node identity (RunRefused, one line, for an address that
    does not resolve)."""
    master_ip = _ip(identity.master_addr, "the master address")
    if identity.node_rank == 0:
        advertise = master_ip  # node 0 is where the master listens
    elif identity.advertise_addr is not None:
        advertise = _ip(identity.advertise_addr, "the advertise address")
    else:
        advertise = _ip(socket.gethostname(), "this host's name (give --advertise-addr)")
    first = identity.first_rank
    ranks = range(first, first + identity.ranks_per_node)
    run_id = identity.run_id or f"{identity.master_addr}:{identity.master_port}"
    return NodeLayout(identity, master_ip, identity.master_port, advertise, ranks, run_id)


def layout_from_args(args, cfg, environ, warn) -> NodeLayout | None:
    """`zerotrain run`'s identity (flags from `args`, then `environ`): None for a
    one-host run, else this node's layout after the plaintext check. RunRefused (one
    line, exit 2) for a launch that cannot be."""
    from ..launch import IDENTITY_FLAGS, IdentityError, resolve_identity

    flags = {key: getattr(args, key, None) for key in IDENTITY_FLAGS}
    source = "--ranks" if getattr(args, "ranks", None) else "cluster.ranks"
    try:
        identity = resolve_identity(
            flags, environ, cluster_ranks=cfg.cluster.ranks, cluster_ranks_source=source
        )
    except IdentityError as err:
        raise RunRefused(str(err)) from None
    if identity.nnodes == 1:
        return None
    layout = layout_for(identity)
    keys = check_plaintext(layout, getattr(args, "keys", None) or cfg.cluster.keys, warn)
    return dataclasses.replace(layout, keys=keys)


def default_run_dir(pipeline: str, layout: NodeLayout) -> Path:
    """runs/<pipeline>-<run id>: the same on every node of a run (a shared filesystem
    then holds one run dir)."""
    return Path("runs") / f"{pipeline}-{layout.run_id.replace(':', '-')}"


def check_plaintext(layout: NodeLayout, keys: str | None, warn) -> ClusterKeys | None:
    """The cluster's keys from directory `keys` (checked: modes, a key for every node,
    this node's secret key), or, without keys, plain tcp:// between nodes only on
    loopback addresses, saying so (`warn`, one line); RunRefused (one line, exit 2)
    for keys that cannot be used and for any other address without keys."""
    if keys:
        try:
            loaded = load_keys(keys)
            node_keyring(loaded, layout.node_rank, layout.nnodes, len(layout.ranks), "check")
        except KeysError as err:
            raise RunRefused(f"node {layout.node_rank}: keys: {err}") from None
        return loaded
    outside = [ip for ip in (layout.master_ip, layout.advertise_ip) if not _is_loopback(ip)]
    if outside:
        raise RunRefused(
            f"node {layout.node_rank}: {outside[0]} is not a loopback address and the run "
            "has no keys: plaintext tcp between hosts is refused (multi-node runs without "
            "keys are accepted on loopback addresses only, e.g. 127.0.0.2)"
        )
    warn(
        f"node {layout.node_rank}: plaintext tcp on loopback without keys "
        f"(master {layout.master_endpoint}, this node {layout.advertise_ip}): a test mode"
    )
    return None


def keyring_plan(layout: NodeLayout) -> dict | None:
    """What a rank of this node needs to build its keyring (plan.json's "keys": no
    secret, only where the keys lie), None without keys."""
    if layout.keys is None:
        return None
    return {
        "dir": str(Path(layout.keys.directory).resolve()),
        "node": layout.node_rank,
        "nnodes": layout.nnodes,
        "ranks_per_node": len(layout.ranks),
        "run_id": layout.run_id,
    }


def secure_agent(layout: NodeLayout) -> None:
    """Install this agent's keyring (every tcp:// socket it opens is CURVE), if the run
    has keys."""
    if layout.keys is not None:
        keyring = node_keyring(layout.keys, layout.node_rank, layout.nnodes,
                               len(layout.ranks), layout.run_id)  # fmt: skip
        actors.secure_tcp(keyring)


def secure_rank(plan: dict) -> None:
    """Install a rank's keyring from its plan (its host's keys, the ring endpoints), if
    the run has keys. KeysError (one line) when the keys cannot be used."""
    spec = plan.get("keys")
    if not spec:
        return
    keys = load_keys(spec["dir"])
    keyring = node_keyring(keys, spec["node"], spec["nnodes"], spec["ranks_per_node"],
                           spec["run_id"], rings=plan["endpoints"])  # fmt: skip
    actors.secure_tcp(keyring)


def reserve_ports(ip: str, n: int) -> list[socket.socket]:
    """n tcp ports on `ip` held for the run (main._reserve_ports' rule: bound with
    SO_REUSEADDR, never listening, so only the rank's own bind takes them)."""
    socks = []
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        for _ in range(n):
            sock = socket.socket(family)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, 0))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def local_table(layout: NodeLayout, agent_endpoint: str, ports: list) -> dict:
    """This node's part of the table: its agent's endpoint and, per rank, a node endpoint
    and a ring endpoint on ports reserved into `ports` (held by the caller); node 0's
    also the endpoint of the hook analyzer process, which every node's ranks send
    samples to (reserved whether or not the run starts one: a hook attached live may)."""
    extra = 1 if layout.node_rank == 0 else 0
    held = reserve_ports(layout.advertise_ip, 2 * len(layout.ranks) + extra)
    ports += held
    rank_nodes, rings = {}, {}
    for i, r in enumerate(layout.ranks):
        rank_nodes[str(r)] = endpoint_of(layout.advertise_ip, held[2 * i].getsockname()[1])
        rings[str(r)] = endpoint_of(layout.advertise_ip, held[2 * i + 1].getsockname()[1])
    table = {"agent": agent_endpoint, "ranks": rank_nodes, "rings": rings}
    if extra:
        table["analyzer"] = endpoint_of(layout.advertise_ip, held[-1].getsockname()[1])
    return table


def _port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def adopt_table(layout: NodeLayout, mine: dict, tables: dict, ports: list) -> None:
    """Node K started again in a running run (the Rendezvous answered with the table
    of its first start): its ranks must bind the endpoints every other rank's plan
    names (node 0: its analyzer's too), so the fresh ports held in `ports` are released
    and those taken back
    (RunRefused, one line, if one is in use -- an earlier agent of this node alive -- or
    if this node now has another address)."""
    first = tables[str(layout.node_rank)]
    if (first["ranks"], first["rings"]) == (mine["ranks"], mine["rings"]):
        return
    here = endpoint_of(layout.advertise_ip, 0).rsplit(":", 1)[0]
    before = next(iter(first["ranks"].values())).rsplit(":", 1)[0]
    if before != here:
        raise RunRefused(
            f"node {layout.node_rank} is back at {here}, its ranks were at {before}: a lost "
            "node rejoins at the address it had (--advertise-addr)"
        )
    for sock in ports:
        sock.close()
    ports.clear()
    family = socket.AF_INET6 if ":" in layout.advertise_ip else socket.AF_INET
    held = [(f"rank {r}'s", e) for what in ("ranks", "rings") for r, e in first[what].items()]
    if "analyzer" in first:  # node 0's analyzer process, named in every node's plan
        held.append(("the analyzer's", first["analyzer"]))
    for whose, endpoint in held:
        sock = socket.socket(family)
        ports.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((layout.advertise_ip, _port_of(endpoint)))
        except OSError as err:
            raise RunRefused(
                f"node {layout.node_rank}: {whose} endpoint {endpoint} from the run's "
                f"first start is taken ({err.strerror}): is an earlier agent of node "
                f"{layout.node_rank} still running?"
            ) from None


def _hello(layout: NodeLayout, config_hash: str, table: dict, running: bool = False) -> dict:
    return {
        "running": running,  # this node's ranks train (node 0 was lost and is back)
        "run_id": layout.run_id,
        "node_rank": layout.node_rank,
        "nnodes": layout.nnodes,
        "ranks": [layout.ranks.start, layout.ranks.stop],
        "config_hash": config_hash,
        "hooks": list(layout.hooks),
        "table": table,
        # this agent's boot id: the same hello sent again (its answer was late) is
        # told apart from a node started again
        "generation": actors.current_node().generation,
    }


def earlier_start(run_dir: Path, layout: NodeLayout, config_hash: str) -> dict | None:
    """Node 0 started again in a running run: the whole table of the run's first start,
    from NODES_RECORD in its run dir, when that record is this run's (run id, config
    hash) and the run has not ended (no summary.json); else None (a new run)."""
    if layout.node_rank != 0:
        return None
    try:
        record = json.loads((Path(run_dir) / NODES_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if (Path(run_dir) / "summary.json").exists() or not isinstance(record, dict):
        return None
    if (record.get("run_id"), record.get("config_hash")) != (layout.run_id, config_hash):
        return None
    tables = record.get("tables")
    if not isinstance(tables, dict) or set(tables) != {str(k) for k in range(layout.nnodes)}:
        return None
    return tables


def _record_nodes(run_dir: Path, layout: NodeLayout, config_hash: str, tables: dict) -> None:
    record = {"run_id": layout.run_id, "config_hash": config_hash, "tables": tables}
    write_json_atomic(Path(run_dir) / NODES_RECORD, record)


def analyzer_place(plan_path: Path, layout: NodeLayout) -> dict:
    """Node 0: where the analyzer process binds (the table's endpoint, in the plan) and
    its keys (pipelines.hooks.process.analyzer_spec's `endpoint` and `keys`)."""
    peers = json.loads(Path(plan_path).read_text())["peers"]
    return {"endpoint": peers["analyzer"], "keys": keyring_plan(layout)}


def write_plan_table(plan_path: Path, layout: NodeLayout, tables: dict[str, dict]) -> dict:
    """Put the whole run's endpoints into this node's plan.json: the ring endpoints in
    rank order and every node's endpoint by name (the analyzer's among them). Returns
    {rank: node endpoint} of this node's ranks."""
    plan = json.loads(Path(plan_path).read_text())
    rings, peers = {}, {}
    for k, part in tables.items():
        peers[node_name(int(k))] = part["agent"]
        for r, endpoint in part["ranks"].items():
            peers[f"rank{r}"] = endpoint
        rings.update({int(r): endpoint for r, endpoint in part["rings"].items()})
    if "analyzer" in tables["0"]:  # (pipelines.hooks.process.NODE)
        peers["analyzer"] = tables["0"]["analyzer"]
    plan["endpoints"] = [rings[r] for r in range(len(rings))]
    plan["peers"] = peers
    plan["replica_stride"] = len(layout.ranks)  # messages.replica_holder: the next node
    plan["keys"] = keyring_plan(layout)
    write_json_atomic(Path(plan_path), plan)
    mine = tables[str(layout.node_rank)]["ranks"]
    return {int(r): endpoint for r, endpoint in mine.items()}


# ---------------------------------------------------------------------------------------
# Node 0: the Rendezvous
# ---------------------------------------------------------------------------------------


class Rendezvous(actors.Actor):
    """Node 0's record of the run's nodes: collects each node's hello, answers them all
    with the whole table once every node has come, and takes a node's report that it
    gave up (the run fails with it).

    A hello that does not fit (another run id, another config or hooks, a node rank or
    rank range that is not this node's place) is answered {"refused": one line}. A hello
    from a second agent of a node rank whose agent is up never gets here (node 0's node
    refuses it: `gather_nodes`); once that agent was lost, a hello from another agent
    replaces the first (a restarted agent) until the run has started; after that it is
    a lost node back, and its ranks keep their endpoints (`adopt_table`). `fail(reason)`
    is the Coordinator's.

    `earlier`: node 0 started again in a running run (`earlier_start`): the table is
    the first start's, every node's ranks keep their endpoints, and the Rendezvous is
    complete once every other node has said hello again. A hello of a node whose ranks
    train ("running") to a node 0 without that record is refused: node 0 cannot put
    its ranks where the others' plans name them."""

    def __init__(
        self, layout: NodeLayout, config_hash: str, own: dict, fail, earlier: dict | None = None
    ) -> None:
        self.layout = layout
        self.config_hash = config_hash
        self.earlier = earlier is not None
        self.tables: dict[str, dict] = dict(earlier) if earlier else {}
        self.tables["0"] = own
        self.heard: set[int] = {0}  # node ranks that said hello to this Rendezvous
        self.generations: dict[int, object] = {}  # node rank -> its agent's boot id
        self.waiting: dict[int, actors.From] = {}
        self.complete = trio.Event()
        self.fail = fail

    async def handle_call(self, request, from_):
        if isinstance(request, dict) and request.get("failed") is not None:
            self.fail(str(request["failed"]))  # (it names the node)
            return "ok"
        why = self._misfit(request)
        if why is not None:
            self.log.warning("refused a node's hello: %s", why)
            return {"refused": why}
        k = request["node_rank"]
        generation = request.get("generation")
        again = generation is not None and self.generations.get(k) == generation
        self.generations[k] = generation
        if self.complete.is_set() and again:
            return {"tables": self.tables}  # a hello resent while its answer was on its way
        if self.complete.is_set():
            # node k started again (its agent was lost): its ranks come back at the
            # endpoints every other rank's plan names; only its agent's is new
            self.tables[str(k)] = {**self.tables[str(k)], "agent": request["table"]["agent"]}
            self.log.warning("node %d is back: its ranks rejoin at their endpoints", k)
            return {"tables": self.tables}
        if self.earlier:  # node 0 started again: every node keeps its first endpoints
            self.tables[str(k)] = {**self.tables[str(k)], "agent": request["table"]["agent"]}
            how = "its ranks kept their state" if request.get("running") else "started again"
            self.log.warning("node %d said hello to node 0 started again (%s)", k, how)
        else:
            self.tables[str(k)] = request["table"]
        self.heard.add(k)
        self.waiting[k] = from_
        if len(self.heard) == self.layout.nnodes:
            self.complete.set()
            for waiter in self.waiting.values():
                waiter.reply({"tables": self.tables})
            self.waiting.clear()
        return actors.NOREPLY

    def _misfit(self, hello) -> str | None:
        lay = self.layout
        if not isinstance(hello, dict) or not isinstance(hello.get("table"), dict):
            return f"expected a node hello (a dict with a table), got {type(hello).__name__}"
        if hello.get("run_id") != lay.run_id:
            return f"run id {hello.get('run_id')!r} is not this run's {lay.run_id!r}"
        if hello.get("nnodes") != lay.nnodes:
            return f"a world of {hello.get('nnodes')} nodes, this run has {lay.nnodes}"
        k = hello.get("node_rank")
        if type(k) is not int or not 1 <= k < lay.nnodes:
            return f"node rank {k!r}: expected 1..{lay.nnodes - 1} (node 0 is the master)"
        per = len(lay.ranks)
        if hello.get("ranks") != [k * per, (k + 1) * per]:
            expected = [k * per, (k + 1) * per]
            return f"node {k} claims ranks {hello.get('ranks')}, expected {expected}"
        if hello.get("config_hash") != self.config_hash:
            theirs, mine = str(hello.get("config_hash"))[:16], self.config_hash[:16]
            return f"node {k} runs another config (config_hash {theirs}, this run's {mine})"
        hooks = hello.get("hooks", [])  # (no "hooks": a node that runs none)
        if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks):
            return f"node {k} sent hooks {hooks!r:.60}, expected a list of 'KIND NAME'"
        if hooks != list(lay.hooks):
            theirs, ours = (", ".join(h) or "none" for h in (hooks, lay.hooks))
            return (
                f"node {k} runs other hooks ({theirs}; node 0: {ours}): give every node the "
                "same --hook (their samples meet in node 0's analyzer)"
            )
        if hello.get("running") and not self.earlier and not self.complete.is_set():
            return (
                f"node {k}'s ranks train in a running run that node 0 has no record of "
                f"(no {NODES_RECORD} of this run in its run dir): start node 0 again with "
                "the --run-dir it had"
            )
        return None


# ---------------------------------------------------------------------------------------
# Node K: saying hello
# ---------------------------------------------------------------------------------------


async def rendezvous(
    layout: NodeLayout, config_hash: str, table: dict, timeout: float, running: bool = False
) -> dict:
    """Node K's hello to node 0; the whole table, or RunRefused (node 0 said no, or was
    not reached within `timeout`). `running`: this node's ranks train, and node 0 was
    lost and is back.

    Node 0 may say that a live agent holds this node rank (actors._node, "Duplicates").
    That is also what an agent started again right after its predecessor was killed
    hears, until node 0 has not heard from the dead one for its heartbeat timeout: so
    the hello goes on for _HELD_GRACE heartbeat timeouts from the first such word, and
    only a node rank still held then is refused (RunRefused, one line)."""
    hello = _hello(layout, config_hash, table, running)
    node = actors.current_node()
    held_since = None
    with trio.move_on_after(timeout):
        while True:  # (a hello sent twice is harmless: the later one replaces it)
            bounded = not _up() or node.held_by() is not None
            try:
                reply = await actors.call(RENDEZVOUS, hello, timeout=2.0 if bounded else None)
            except actors.ActorError:
                if node.held_by() is not None:
                    held_since = held_since or trio.current_time()
                    if trio.current_time() - held_since > _HELD_GRACE * node.heartbeat_timeout:
                        raise _held(layout) from None
                await trio.sleep(_HELLO_RETRY)  # node 0 is not up (yet), or holds us
                continue
            if "refused" in reply:
                raise RunRefused(f"node 0 refused node {layout.node_rank}: {reply['refused']}")
            return reply["tables"]
    raise RunRefused(
        f"node {layout.node_rank}: no answer from node 0 at {layout.master_endpoint} "
        f"within {timeout:g}s (is node 0 started, and the master address right?)"
    )


def _held(layout: NodeLayout) -> RunRefused:
    """Node 0 still says that a live agent holds this node rank: one line."""
    node = actors.current_node()
    k, patience = layout.node_rank, _HELD_GRACE * node.heartbeat_timeout
    return RunRefused(
        f"node 0 refused node {k}: {node.held_by()}; a node rank runs one agent at a time "
        f"(still held after {patience:g}s: node {k} started again is taken once node 0 "
        f"has not heard from its agent for {node.heartbeat_timeout:g}s)"
    )


def _up() -> bool:
    """Node 0 is heard from: the hello may wait for the other nodes as long as it takes."""
    info = actors.current_node().peer_info("cluster")
    return bool(info and info.alive)


async def report_failure(layout: NodeLayout, reason: str) -> None:
    """Tell node 0 that this node gave up (best effort)."""
    with trio.move_on_after(5.0):
        try:
            await actors.call(
                RENDEZVOUS, {"failed": reason, "node_rank": layout.node_rank}, timeout=5.0
            )
        except actors.ActorError:
            pass


def plan_node(plan_path: Path, layout: NodeLayout, cfg, hooks) -> NodeLayout:
    """This node's part of its plan.json (the shared checkpoint root, the control
    endpoint); the layout with the hooks its ranks run (`hooks`: the loaded Hooks),
    which every node's hello carries and node 0 compares with its own."""
    share_checkpoint_root(plan_path, layout, cfg)
    record_control(plan_path, layout)
    return dataclasses.replace(layout, hooks=tuple(sorted(f"{h.kind} {h.name}" for h in hooks)))


def record_control(plan_path: Path, layout: NodeLayout) -> None:
    """Where a control tool on this node's host reaches the run (pipelines.cluster.live):
    node 0's Coordinator at the master endpoint, the tool's own node bound on this
    node's advertise address (node 0 answers it there), under this host's keys if the
    run has keys. Written before the rendezvous: the run is reachable from its start."""
    plan = json.loads(Path(plan_path).read_text())
    plan["control"] = {
        "node": layout.node_rank,
        "master": layout.master_endpoint,
        "bind": endpoint_of(layout.advertise_ip, "*"),
        "keys": keyring_plan(layout),
    }
    write_json_atomic(Path(plan_path), plan)


def share_checkpoint_root(plan_path: Path, layout: NodeLayout, cfg) -> None:
    """Node K's ranks write their shards where node 0's ranks do: DIR's checkpoint root
    (node K's own dir is DIR/node-K)."""
    if layout.node_rank == 0:
        return
    plan = json.loads(Path(plan_path).read_text())
    plan["checkpoint_root"] = str(Path(plan["run_dir"]).parent / cfg.checkpoint.dir)
    write_json_atomic(Path(plan_path), plan)


async def gather_nodes(nursery, node, layout: NodeLayout, config_hash: str, plan_path, coord):
    """Node 0: run the Rendezvous until every node has said hello, then write the whole
    table into the plan; {rank: node endpoint} of node 0's ranks, or None when the run
    ended first (a stop, a node's failure, or HELLO_TIMEOUT without every node: the run
    fails naming the missing nodes). The reserved ports are held by `coord.ports`."""
    table = local_table(layout, node.endpoint, coord.ports)
    run_dir = Path(plan_path).parent
    earlier = earlier_start(run_dir, layout, config_hash)
    if earlier is not None:  # started again: node 0's ranks where the others expect them
        adopt_table(layout, table, earlier, coord.ports)
        table = {**earlier["0"], "agent": node.endpoint}
        coord.progress.message(
            "node 0 started again in a running run: waiting for the other nodes' reports"
        )
    # a second agent of a node rank whose agent is up is refused (actors._node,
    # "Duplicates"), not taken for that node started again
    node.exclusive(*(node_name(k) for k in range(1, layout.nnodes)))
    rdv = Rendezvous(layout, config_hash, table, coord.fail, earlier)
    await actors.spawn(nursery, rdv, name="Rendezvous")
    with trio.move_on_after(HELLO_TIMEOUT):
        async with trio.open_nursery() as waiting:

            async def until(event) -> None:
                await event.wait()
                waiting.cancel_scope.cancel()

            waiting.start_soon(until, rdv.complete)
            waiting.start_soon(until, coord.outcome.done)
    if not rdv.complete.is_set():
        missing = sorted(set(range(layout.nnodes)) - {int(k) for k in rdv.tables})
        coord.fail(
            f"node(s) {', '.join(map(str, missing))} did not say hello to node 0 at "
            f"{layout.master_endpoint} within {HELLO_TIMEOUT:g}s"
        )
    if coord.outcome.done.is_set():
        return None
    _record_nodes(run_dir, layout, config_hash, rdv.tables)
    return write_plan_table(plan_path, layout, rdv.tables)


class NodeAgent(actors.Actor):
    """Node K's ear for node 0's word.

    {"over": "finished" | "failed" | "stopped", "reason": str}: the run is over. It sets
    this node's outcome (`coord.outcome`) as node 0's, so every agent exits with node
    0's code; the agent then stops its ranks as node 0 stops its own. Answers {"node":
    this agent's node statistics} (summary.json's admission counts: who knocked here).
    {"kill": rank, "pid": pid}: the Coordinator's regroup deadline passed and that rank
    of this node has not rejoined (alive, heartbeats going): SIGKILL it, so its
    supervisor replaces it. {"cont": rank, "pid": pid}: a chaos stall of that rank is
    over (it stopped itself with SIGSTOP): SIGCONT it. Only a child process of this
    agent is signalled. Answers "killed" / "continued", or "gone"."""

    def __init__(self, outcome, ranks: range) -> None:
        self.outcome = outcome
        self.ranks = ranks

    async def handle_call(self, request, from_):
        if isinstance(request, dict) and ("kill" in request or "cont" in request):
            return _signal_child_rank(request, self.ranks)
        kind = request.get("over") if isinstance(request, dict) else None
        reason = request.get("reason") if isinstance(request, dict) else None
        if kind not in ("finished", "failed", "stopped") or not isinstance(reason, str):
            return {"refused": "expected {'over': finished|failed|stopped, 'reason': str}"}
        if not self.outcome.done.is_set():
            if kind == "failed":
                self.outcome.failure = f"node 0: {reason}"
            elif kind == "stopped":
                self.outcome.stopped = reason
            self.outcome.done.set()
        return {"node": actors.current_node().statistics()}


_CHILD_SIGNALS = {"kill": (signal.SIGKILL, "killed"), "cont": (signal.SIGCONT, "continued")}


def _signal_child_rank(request: dict, ranks: range) -> str | dict:
    what = "kill" if "kill" in request else "cont"
    signum, done = _CHILD_SIGNALS[what]
    rank, pid = request.get(what), request.get("pid")
    if type(rank) is not int or rank not in ranks or type(pid) is not int or pid <= 0:
        return {"refused": f"expected {{'kill' or 'cont': a rank in {ranks.start}.."
                           f"{ranks.stop - 1}, 'pid': its pid}}, got {request!r:.80}"}  # fmt: skip
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        parent = int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return "gone"
    if parent != os.getpid():
        return "gone"  # not (any longer) a rank this agent started
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return "gone"
    return done


async def kill_rank(k: int, rank: int, pid: int, what: str = "kill") -> str | None:
    """Ask node k's agent to kill its rank `rank` (process `pid`; `what` "cont": to
    continue it after a stall): "killed" / "continued", "gone", or None when the agent
    was not reached (a lost node: the rejoin deadline's case)."""
    try:
        answer = await actors.call(
            f"NodeAgent@{node_name(k)}", {what: rank, "pid": pid}, timeout=5.0
        )
    except actors.ActorError:
        return None
    return answer if answer in ("killed", "continued", "gone") else None


async def announce_end(layout: NodeLayout, outcome) -> dict[int, dict | None]:
    """Node 0, the run over: tell every other agent how it ended (each within 5 s; an
    agent not reached finds out when node 0 falls silent). Returns each agent's node
    statistics by node rank, None for an agent not reached."""
    if outcome.failure is not None:
        word = {"over": "failed", "reason": outcome.failure}
    elif outcome.stopped is not None:
        word = {"over": "stopped", "reason": outcome.stopped}
    else:
        word = {"over": "finished", "reason": ""}

    stats: dict[int, dict | None] = dict.fromkeys(range(1, layout.nnodes))

    async def tell(k: int) -> None:
        try:
            answer = await actors.call(f"NodeAgent@{node_name(k)}", word, timeout=5.0)
        except actors.ActorError:
            return
        if isinstance(answer, dict) and isinstance(answer.get("node"), dict):
            stats[k] = answer["node"]

    async with trio.open_nursery() as nursery:
        for k in range(1, layout.nnodes):
            nursery.start_soon(tell, k)
    return stats


async def supervise_node(
    ranks: actors.Supervisor, layout: NodeLayout, coord, config_hash: str, table: dict
) -> None:
    """Node K > 0: run its rank supervisor until node 0 says the run is over (then stop
    the ranks, as node 0 stops its own). Restarts exhausted: the failure goes to node 0
    too. Node 0 lost (silent for the heartbeat timeout, or heard from as another
    process): the ranks keep their state and wait for it; node 0 back within
    cluster.rejoin_timeout is told this node's part of the table (`table`) and that
    its ranks train; not back: fail, naming node 0 and the last good checkpoint."""
    node = actors.current_node()
    async with trio.open_nursery() as nursery:
        await actors.spawn(nursery, NodeAgent(coord.outcome, layout.ranks), name="NodeAgent")

        async def run_ranks() -> None:
            try:
                reason = await ranks.run()
            except (actors.RestartIntensityExceeded, actors.StartChildError) as err:
                reason = f"node {layout.node_rank} gave up: {str(err).splitlines()[0]}"
                coord.fail(reason)
                await report_failure(layout, reason)
            else:  # every rank left normally: node 0's word is on its way
                with trio.move_on_after(2 * node.heartbeat_timeout):
                    await coord.outcome.done.wait()
                coord.fail(f"node {layout.node_rank}: its ranks ended ({reason}) unasked")
            nursery.cancel_scope.cancel()

        async def watch_master() -> None:
            timeout = coord.cfg.cluster.rejoin_timeout
            while True:
                known = node.peer_info("cluster")
                await _master_lost(node, known.generation if known else None)
                coord.outcome.master_lost = True  # (a stop signal now stops this node)
                coord.progress.message(
                    f"node 0 at {layout.master_endpoint} lost: node {layout.node_rank} keeps "
                    f"its ranks and waits up to cluster.rejoin_timeout {timeout:g}s for it"
                )
                with trio.move_on_after(timeout):
                    await node.wait_peer("cluster", alive=True)
                    try:
                        await rendezvous(layout, config_hash, table, timeout, running=True)
                    except RunRefused as err:
                        coord.fail(str(err))
                        return
                    coord.outcome.master_lost = False
                    coord.progress.message(f"node 0 is back at {layout.master_endpoint}")
                    continue
                coord.fail(
                    f"node 0 at {layout.master_endpoint} lost: not back within "
                    f"cluster.rejoin_timeout {timeout:g}s; last good checkpoint: "
                    f"{last_good_checkpoint(coord.ckpt_root)}"
                )
                return

        async def until_over() -> None:
            await coord.outcome.done.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(run_ranks)
        nursery.start_soon(watch_master)
        nursery.start_soon(until_over)


async def _master_lost(node, generation) -> None:
    """Return once node 0 is down, or is heard from as another process than
    `generation` (killed and started again before its silence was noticed)."""
    async with trio.open_nursery() as race:

        async def until(**how) -> None:
            await node.wait_peer("cluster", **how)
            race.cancel_scope.cancel()

        race.start_soon(functools.partial(until, alive=False))
        if generation is not None:  # (None: not heard from yet, so no other one either)
            race.start_soon(functools.partial(until, alive=True, newer_than=generation))


def plan_env_dir(run_dir: Path, node_rank: int) -> Path:
    """Where node K keeps its own files within the run dir given to every node."""
    return run_dir if node_rank == 0 else run_dir / f"node-{node_rank}"


def agent_label(layout: NodeLayout) -> str:
    first, last = layout.ranks.start, layout.ranks.stop - 1
    return f"node {layout.node_rank} of {layout.nnodes} (ranks {first}..{last})"
