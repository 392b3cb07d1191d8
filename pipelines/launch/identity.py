"""Where a node's identity comes from: which node of how many this process is, where the
master (node 0, which runs the coordinator) listens, how many ranks each node runs, what
address this node gives its peers, and the run id every handshake carries.

`resolve_identity(flags, os.environ, cluster_ranks=...)` reads four kinds of source, in
this order; `zerotrain env` prints the result with the variable each value came from.

1. Flags: `--nodes N --node-rank K --master HOST:PORT --ranks-per-node R
   [--advertise-addr ADDR] [--run-id ID]`.
2. `ZEROTRAIN_NODES`, `ZEROTRAIN_NODE_RANK`, `ZEROTRAIN_MASTER` (HOST:PORT),
   `ZEROTRAIN_RANKS_PER_NODE`, `ZEROTRAIN_ADVERTISE_ADDR`, `ZEROTRAIN_RUN_ID`.
3. torchrun / Kubeflow PyTorchJob / Kubernetes Indexed Job and JobSet variables:
   `MASTER_ADDR` and `MASTER_PORT` (or torchrun's `PET_MASTER_ADDR`, `PET_MASTER_PORT`);
   the node rank from `NODE_RANK`, `GROUP_RANK` (torchrun's worker variable),
   `PET_NODE_RANK`, `JOB_COMPLETION_INDEX` (Indexed Job, and a JobSet's first job only:
   with `JOB_INDEX` > 0 it counts pods within one job, so another source must
   give the node rank) or `RANK` -- which
   PyTorchJob sets to the pod's index, so it is read as a node rank only outside a
   torchrun worker (no `LOCAL_RANK`, `GROUP_RANK` or `TORCHELASTIC_RUN_ID`: there it is
   a process rank); the node count from `NNODES`, `PET_NNODES` (a fixed `N` or `N:N`:
   zerotrain is not elastic) or `GROUP_WORLD_SIZE`; the run id from
   `TORCHELASTIC_RUN_ID` (torchrun's default 'none' is no id) or `JOBSET_NAME`.
4. Slurm, under `srun` with one task per node (`SLURM_STEP_ID` set): the node rank from
   `SLURM_NODEID`, the node count from `SLURM_STEP_NUM_NODES` / `SLURM_NNODES`, the hosts
   from `SLURM_STEP_NODELIST` (`SLURM_JOB_NODELIST` when a Slurm sets no step list)
   expanded as `scontrol show hostnames` does; the master is the first of those hosts on
   port `slurm_master_port(SLURM_JOB_ID)`; this node advertises `SLURMD_NODENAME`; the
   run id is `SLURM_JOB_ID`. The step's list, not the job's: under `salloc -N2` an
   `srun -N1 -w zn2` step runs on zn2 alone while `SLURM_JOB_NODELIST` still says
   zn[1-2] (seen on Slurm 22.05). An allocation's own shell (`salloc`, or an sbatch
   script: `SLURM_JOB_ID` without `SLURM_STEP_ID`) is not a launch: its Slurm variables
   are ignored, with a note saying so.

How sources combine. The node rank and the node count are facts about the launch:
every source that gives one must give the same value, or the launch is refused naming
both (`--node-rank 0 conflicts with SLURM_NODEID=1`); a `ZEROTRAIN_NODE_RANK` left in a
shell profile would otherwise put two nodes at one rank. The other values are choices:
the first source in the order above wins and the ones it overrides are named in
`sources` (a `--master` beats `MASTER_ADDR`, `MASTER_ADDR` beats Slurm's first host,
`TORCHELASTIC_RUN_ID` beats `JOBSET_NAME`). Two variables of one kind are two sources
too: `NODE_RANK=0` with `GROUP_RANK=1` is refused.

Refused with an `IdentityError` (one line; the CLI exits 2): conflicting sources, a
world that does not add up (node rank outside the node count, a rank or count without
the other, a host list whose length is not the node count, cluster ranks that do not
split evenly over the nodes or disagree with nodes x ranks-per-node), a Slurm step with
other than one task per node, torchrun starting more than one process per node, and
values that are not what they should be (a port outside 1-65535, `HOST:PORT` without a
port, a node count of 0). With no source at all the identity is the single-node one:
one node, rank 0, no master.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

from .hostlist import HostlistError, expand_hostlist

__all__ = [
    "IDENTITY_FLAGS",
    "IdentityError",
    "NodeIdentity",
    "resolve_identity",
    "slurm_master_port",
]


class IdentityError(ValueError):
    """A launch whose sources conflict, whose world does not add up, or with a value that
    is not what it should be. The message is one line naming the variables involved."""


# flag (argparse dest) -> the ZEROTRAIN_* variable of the same name
IDENTITY_FLAGS = {
    "nodes": "ZEROTRAIN_NODES",
    "node_rank": "ZEROTRAIN_NODE_RANK",
    "master": "ZEROTRAIN_MASTER",
    "ranks_per_node": "ZEROTRAIN_RANKS_PER_NODE",
    "advertise_addr": "ZEROTRAIN_ADVERTISE_ADDR",
    "run_id": "ZEROTRAIN_RUN_ID",
}

# A run id names the run in every handshake and in file names: no spaces, no slashes.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
# The two values every source must agree on (the rest: the first source wins).
_FACTS = ("nnodes", "node_rank")
_LABELS = {"nnodes": "node count", "node_rank": "node rank"}


def slurm_master_port(job_id: int) -> int:
    """The master's port for Slurm job `job_id`: 20000 + job_id % 10000.

    Every node of a job derives the same port with no exchange. 20000-29999 lies below
    Linux's default ephemeral range (32768-60999), so the kernel does not hand the port
    out as some connection's source port. Two jobs whose ids differ by a multiple of
    10000 and share a first host would collide: give one `--master` or `MASTER_PORT`.
    """
    return 20000 + job_id % 10000


# ---------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeIdentity:
    """Where this node sits in a launch. Checked in __post_init__: any instance is a
    consistent one (a rank inside the count, a master for more than one node).

    nnodes, node_rank     how many node agents the run has, and which one this is
    master_addr/port      where node 0 listens (None only for a single-node run)
    ranks_per_node        rank processes per node (None: not known yet -- `zerotrain
                          env` without --ranks; `run` always knows cluster.ranks)
    advertise_addr        the address this node gives its peers (None: its hostname)
    run_id                the run every handshake names (None: no launcher gave one)
    launcher              the source kind of the node rank: flags, zerotrain-env,
                          torchrun, slurm, or none (a single-node run)
    sources               value name -> the flag or variable it came from
    notes                 what was read but not used, and why
    """

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    ranks_per_node: int | None = None
    advertise_addr: str | None = None
    run_id: str | None = None
    launcher: str = "none"
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("nnodes", "node_rank", "master_port", "ranks_per_node"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 0):
                raise IdentityError(f"{name}: expected an integer >= 0, got {value!r}")
        if self.nnodes < 1:
            raise IdentityError(f"nnodes: expected an integer >= 1, got {self.nnodes}")
        if self.node_rank >= self.nnodes:
            raise IdentityError(
                f"node rank {self.node_rank} is outside {self.nnodes} node(s) "
                f"(ranks 0..{self.nnodes - 1})"
            )
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise IdentityError(f"ranks_per_node: expected >= 1, got {self.ranks_per_node}")
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            raise IdentityError(f"master port: expected 1-65535, got {self.master_port}")
        if (self.master_addr is None) != (self.master_port is None):
            raise IdentityError(
                f"master: an address and a port or neither, got {self.master_addr!r} "
                f"and {self.master_port!r}"
            )
        if self.nnodes > 1 and self.master_addr is None:
            raise IdentityError(
                f"{self.nnodes} nodes but no master: give --master HOST:PORT, "
                "ZEROTRAIN_MASTER, MASTER_ADDR and MASTER_PORT, or launch under srun"
            )
        for name in ("master_addr", "advertise_addr"):
            value = getattr(self, name)
            if value is not None and (not value or any(c.isspace() for c in value)):
                raise IdentityError(f"{name}: expected a host name or address, got {value!r}")
        if self.run_id is not None and not _RUN_ID.fullmatch(self.run_id):
            raise IdentityError(
                f"run id: expected 1-128 of A-Z a-z 0-9 . _ : @ + - (a letter or digit "
                f"first), got {self.run_id!r}"
            )
        if self.launcher not in ("flags", "zerotrain-env", "torchrun", "slurm", "none"):
            raise IdentityError(f"launcher: unknown source kind {self.launcher!r}")
        object.__setattr__(self, "sources", types.MappingProxyType(dict(self.sources)))
        object.__setattr__(self, "notes", tuple(self.notes))

    @property
    def world_size(self) -> int | None:
        """Rank processes over all nodes (None while ranks_per_node is not known)."""
        return None if self.ranks_per_node is None else self.nnodes * self.ranks_per_node

    @property
    def first_rank(self) -> int | None:
        """The global rank of this node's first rank process (ranks are node-major)."""
        return None if self.ranks_per_node is None else self.node_rank * self.ranks_per_node

    def as_dict(self) -> dict:
        """Plain data for `zerotrain env --json`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["sources"] = dict(self.sources)
        out["notes"] = list(self.notes)
        out["world_size"] = self.world_size
        return out


# ---------------------------------------------------------------------------------------
# Reading each kind of source: (value name, value, where it came from) claims
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Claim:
    name: str  # a NodeIdentity field
    value: object
    source: str  # the flag or variable, as `zerotrain env` shows it


def _int(text: object, where: str, lo: int = 0) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise IdentityError(f"{where}: expected an integer >= {lo}, got {text!r}") from None
    if value < lo:
        raise IdentityError(f"{where}: expected an integer >= {lo}, got {text!r}")
    return value


def _port(text: object, where: str) -> int:
    port = _int(text, where, lo=1)
    if port > 65535:
        raise IdentityError(f"{where}: expected a port 1-65535, got {text!r}")
    return port


def _host_port(text: str, where: str) -> tuple[str, int]:
    """'host:port' or '[v6addr]:port' -> (host, port)."""
    text = str(text).strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else None
    else:
        host, sep, port_text = text.rpartition(":")
        if ":" in host:  # a bare IPv6 address: its colons are not a port separator
            host, sep, port_text = "", "", None
    if not host or not sep or port_text is None:
        raise IdentityError(
            f"{where}: expected HOST:PORT (e.g. node0:29500 or [::1]:29500), got {text!r}"
        )
    return host, _port(port_text, where)


def _from_options(values: Mapping[str, object], names: Mapping[str, str]) -> list[_Claim]:
    """Claims of the flag kind or the ZEROTRAIN_* kind: `names` maps each IDENTITY_FLAGS
    key to how that source spells it."""
    claims = []
    for key, raw in values.items():
        if raw is None or raw == "":
            continue
        where = f"{names[key]} {raw}" if names[key].startswith("--") else f"{names[key]}={raw}"
        if key == "nodes":
            claims.append(_Claim("nnodes", _int(raw, names[key], lo=1), where))
        elif key == "node_rank":
            claims.append(_Claim("node_rank", _int(raw, names[key]), where))
        elif key == "ranks_per_node":
            claims.append(_Claim("ranks_per_node", _int(raw, names[key], lo=1), where))
        elif key == "master":
            host, port = _host_port(str(raw), names[key])
            claims += [_Claim("master_addr", host, where), _Claim("master_port", port, where)]
        else:  # advertise_addr, run_id: strings, checked by NodeIdentity
            claims.append(_Claim(key, str(raw), where))
    return claims


def _flag_claims(flags: Mapping[str, object]) -> list[_Claim]:
    unknown = sorted(set(flags) - set(IDENTITY_FLAGS))
    if unknown:
        raise IdentityError(f"unknown identity flags {unknown}: expected {list(IDENTITY_FLAGS)}")
    spelled = {key: "--" + key.replace("_", "-") for key in IDENTITY_FLAGS}
    return _from_options(flags, spelled)


def _zerotrain_claims(env: Mapping[str, str]) -> list[_Claim]:
    values = {key: env.get(var) for key, var in IDENTITY_FLAGS.items()}
    return _from_options(values, IDENTITY_FLAGS)


def _torchrun_claims(env: Mapping[str, str]) -> list[_Claim]:
    claims = []
    for var in ("MASTER_ADDR", "PET_MASTER_ADDR"):
        if env.get(var):
            claims.append(_Claim("master_addr", env[var].strip(), f"{var}={env[var]}"))
    for var in ("MASTER_PORT", "PET_MASTER_PORT"):
        if env.get(var):
            claims.append(_Claim("master_port", _port(env[var], var), f"{var}={env[var]}"))
    torchrun_worker = any(v in env for v in ("LOCAL_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID"))
    rank_vars = ["NODE_RANK", "GROUP_RANK", "PET_NODE_RANK"]
    # In a JobSet of several jobs (JOB_INDEX > 0) the completion index counts pods within
    # one job: it is no node rank then, and another source must give one (_jobset_check)
    if not _jobset_job(env):
        rank_vars.append("JOB_COMPLETION_INDEX")
    if not torchrun_worker:
        rank_vars.append("RANK")  # PyTorchJob: the pod's index, which is the node rank
    for var in rank_vars:
        if env.get(var):
            claims.append(_Claim("node_rank", _int(env[var], var), f"{var}={env[var]}"))
    for var in ("NNODES", "PET_NNODES", "GROUP_WORLD_SIZE"):
        if env.get(var):
            text = env[var].strip()
            low, colon, high = text.partition(":")
            if colon and low.strip() != high.strip():
                raise IdentityError(
                    f"{var}={text}: an elastic range; zerotrain needs a fixed node count (N or N:N)"
                )
            claims.append(_Claim("nnodes", _int(low, var, lo=1), f"{var}={text}"))
    local = env.get("LOCAL_WORLD_SIZE", "").strip()
    if local and local != "1":
        raise IdentityError(
            f"LOCAL_WORLD_SIZE={local}: torchrun started {local} processes on this node; "
            "zerotrain runs one per node (torchrun --nproc-per-node 1) and starts the "
            "node's ranks itself"
        )
    run_id = env.get("TORCHELASTIC_RUN_ID", "").strip()
    if run_id and run_id != "none":  # 'none' is torchrun's --rdzv-id default: no id
        claims.append(_Claim("run_id", run_id, f"TORCHELASTIC_RUN_ID={run_id}"))
    if env.get("JOBSET_NAME"):
        name = env["JOBSET_NAME"].strip()
        claims.append(_Claim("run_id", name, f"JOBSET_NAME={name}"))
    return claims


def _jobset_job(env: Mapping[str, str]) -> bool:
    """A pod of a JobSet job other than the first: its JOB_COMPLETION_INDEX is no node rank."""
    return bool(env.get("JOB_COMPLETION_INDEX")) and env.get("JOB_INDEX", "0").strip() != "0"


def _jobset_check(env: Mapping[str, str], chosen: Mapping[str, object]) -> None:
    if _jobset_job(env) and "node_rank" not in chosen:
        raise IdentityError(
            f"JOB_COMPLETION_INDEX={env['JOB_COMPLETION_INDEX']} counts pods within "
            f"JobSet job JOB_INDEX={env['JOB_INDEX']}, not across the JobSet: set "
            "NODE_RANK (or ZEROTRAIN_NODE_RANK) for a JobSet of several jobs"
        )


# The step's host list first: a step may run on part of its job's allocation.
_SLURM_LISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST")


def _slurm_claims(env: Mapping[str, str], notes: list[str]) -> list[_Claim]:
    if "SLURM_JOB_ID" not in env:
        return []
    job_text = env["SLURM_JOB_ID"]
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        notes.append(
            f"SLURM_JOB_ID={job_text} without SLURM_STEP_ID: an allocation's shell "
            "(salloc or an sbatch script), not an srun task; its Slurm variables are not "
            "a launch (run `srun --ntasks-per-node=1 zerotrain ...`)"
        )
        return []
    job_id = _int(job_text, "SLURM_JOB_ID")
    claims = [_Claim("run_id", str(job_id), f"SLURM_JOB_ID={job_text}")]
    for var in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES"):
        if env.get(var):
            claims.append(_Claim("nnodes", _int(env[var], var, lo=1), f"{var}={env[var]}"))
    if env.get("SLURM_NODEID"):
        node_id = env["SLURM_NODEID"]
        claims.append(_Claim("node_rank", _int(node_id, "SLURM_NODEID"), f"SLURM_NODEID={node_id}"))
    nnodes = next((c for c in claims if c.name == "nnodes"), None)
    tasks_var = next((v for v in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") if env.get(v)), None)
    if nnodes is not None and tasks_var is not None:
        tasks = _int(env[tasks_var], tasks_var, lo=1)
        if tasks != nnodes.value:
            raise IdentityError(
                f"{tasks_var}={tasks} over {nnodes.source}: zerotrain runs one task per "
                "node (srun --ntasks-per-node=1) and starts the node's ranks itself"
            )
    list_var = next((v for v in _SLURM_LISTS if env.get(v)), None)
    if list_var is not None:
        try:
            hosts = expand_hostlist(env[list_var])
        except HostlistError as err:
            raise IdentityError(f"{list_var}: {err}") from None
        if nnodes is not None and len(hosts) != nnodes.value:
            raise IdentityError(
                f"{list_var}={env[list_var]} names {len(hosts)} host(s) but {nnodes.source}"
            )
        where = f"first host of {list_var}={env[list_var]}"
        port_where = f"slurm_master_port(SLURM_JOB_ID={job_text})"
        claims += [
            _Claim("master_addr", hosts[0], where),
            _Claim("master_port", slurm_master_port(job_id), port_where),
        ]
    if env.get("SLURMD_NODENAME"):
        name = env["SLURMD_NODENAME"]
        claims.append(_Claim("advertise_addr", name, f"SLURMD_NODENAME={name}"))
    return claims


# ---------------------------------------------------------------------------------------
# Combining them
# ---------------------------------------------------------------------------------------


def resolve_identity(
    flags: Mapping[str, object] | None,
    environ: Mapping[str, str],
    *,
    cluster_ranks: int | None = None,
    cluster_ranks_source: str = "cluster.ranks",
) -> NodeIdentity:
    """This node's identity from `flags` (IDENTITY_FLAGS keys; None or missing = not
    given), then `environ`, by the rules in this module's docstring.

    `cluster_ranks` is the run's total rank count (cluster.ranks, or `--ranks`); when
    given, ranks_per_node defaults to cluster_ranks / nnodes and must agree with it.
    Raises IdentityError (one line) on conflicts, a world that does not add up, or a bad
    value.
    """
    notes: list[str] = []
    kinds = [
        ("flags", _flag_claims(flags or {})),
        ("zerotrain-env", _zerotrain_claims(environ)),
        ("torchrun", _torchrun_claims(environ)),
        ("slurm", _slurm_claims(environ, notes)),
    ]
    chosen: dict[str, tuple[str, _Claim]] = {}
    sources: dict[str, str] = {}
    for kind, claims in kinds:
        for claim in claims:
            first = chosen.get(claim.name)
            if first is None:
                chosen[claim.name] = (kind, claim)
                sources[claim.name] = claim.source
                continue
            _, first_claim = first
            if claim.value != first_claim.value and claim.name in _FACTS:
                label = _LABELS.get(claim.name, claim.name.replace("_", " "))
                raise IdentityError(f"conflicting {label}: {first_claim.source} but {claim.source}")
            if claim.value == first_claim.value:
                sources[claim.name] += f" (agrees: {claim.source})"
            else:
                sources[claim.name] += f" (over {claim.source})"
    _jobset_check(environ, chosen)
    values = {name: claim.value for name, (_, claim) in chosen.items()}
    if ("nnodes" in values) != ("node_rank" in values) and values.get("nnodes", 1) > 1:
        raise IdentityError(
            f"{chosen['nnodes'][1].source} but no node rank: give --node-rank, "
            "ZEROTRAIN_NODE_RANK, NODE_RANK, or launch under srun"
        )
    if "node_rank" in values and "nnodes" not in values:
        raise IdentityError(
            f"{chosen['node_rank'][1].source} but no node count: give --nodes, "
            "ZEROTRAIN_NODES, NNODES or PET_NNODES, or launch under srun"
        )
    nnodes = values.get("nnodes", 1)
    if "nnodes" not in values:
        sources["nnodes"] = "default: no launcher found, a single-node run"
    if "node_rank" not in values:
        sources["node_rank"] = "default: the only node"
    values["ranks_per_node"] = _ranks_per_node(
        values, sources, nnodes, cluster_ranks, cluster_ranks_source
    )
    launcher = chosen["node_rank"][0] if "node_rank" in chosen else "none"
    return NodeIdentity(**values, launcher=launcher, sources=sources, notes=tuple(notes))


def _ranks_per_node(values, sources, nnodes, cluster_ranks, cluster_ranks_source) -> int | None:
    """ranks_per_node as given, else cluster_ranks / nnodes; the two must agree."""
    given = values.get("ranks_per_node")
    if cluster_ranks is None:
        return given
    if given is not None:
        if given * nnodes != cluster_ranks:
            raise IdentityError(
                f"the world does not add up: {nnodes} node(s) x {sources['ranks_per_node']} "
                f"is {given * nnodes} ranks, but {cluster_ranks_source} = {cluster_ranks}"
            )
        return given
    if cluster_ranks % nnodes:
        raise IdentityError(
            f"the world does not add up: {cluster_ranks_source} = {cluster_ranks} does not "
            f"split evenly over {nnodes} nodes (give a multiple of {nnodes}, or "
            "--ranks-per-node)"
        )
    sources["ranks_per_node"] = f"{cluster_ranks_source} = {cluster_ranks} / {nnodes} node(s)"
    return cluster_ranks // nnodes
