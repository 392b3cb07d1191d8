"""The cluster protocol: every message between the Trainer, the Coordinator and a rank's
role actors, as a record, with one client function per message.

=================== =========================== ====== ==================================
record              sender -> receiver          kind   reply
=================== =========================== ====== ==================================
Join                Trainer -> Coordinator      call   Plan (once all ranks joined), or
                                                       REGROUP: seen down meanwhile, join again
StepLogged          Trainer -> Coordinator      cast
EvalReported        Trainer -> Coordinator      cast
StopQuery           Trainer -> Coordinator      call   bool (early stopping's decision)
RankFinished        Trainer -> Coordinator      call   EXIT, or REGROUP: a rank failed
ChaosFired          RankChaos -> Coordinator    call   True
ShardWritten        Checkpointer -> Coordinator cast
DiskError           Checkpointer, Trainer -> Co cast   (a full or read-only disk: fatal)
StopRequest         a signalled process -> Co.  call   "stopping", or "exit": leave now
StopStep            Trainer -> Coordinator      cast   (its completed steps, for a stop)
StopPrepare         Coordinator -> Trainer      cast
StopAt              Coordinator -> Trainer      cast
Boundary            Coordinator -> Trainer      cast   (a round without a stop: go on)
RunStatus           a control tool -> Co.       call   dict (step, generation, state ...)
CheckpointNow       a control tool -> Co.       call   dict: step, manifest | error
SetOverride         a control tool -> Co.       call   dict: step, key, value | error
HookChange          a control tool -> Co.       call   dict: step, names | error
RegroupCalled       Coordinator -> Trainer      cast
CheckpointWritten   Coordinator -> Trainer@0    cast   (a continuous run: export it)
BatchesWanted       Trainer -> DataLoader       call   the rank's micro-batches
ApplyUpdate         Trainer -> Optimizer        call   (lr, StepResult) | Failed
RestoreState        Trainer -> Optimizer        call   None | Failed
ShardQuery          Checkpointer -> Optimizer   call   Snapshot (a copy of its shard)
TakeSnapshot        Trainer -> Checkpointer     call   None (once the replica is acked)
HeldQuery           Trainer -> Checkpointer     call   Held
OwnSnapshot         Trainer -> Checkpointer     call   Snapshot | None
ReplicaWanted       Trainer -> Checkpointer@r+1 call   Snapshot | None
Snapshot            Checkpointer -> @r+1        cast   (kept as the replica of rank r)
ReplicaAck          Checkpointer -> @r-1        cast
FlushWrites         Trainer -> Checkpointer     call   None (background writes done)
SampleQuery         Trainer -> HookSampler      call   SampleDecision
SampleView          Trainer -> HookSampler      cast
HookFlush           Trainer -> HookSampler      call   None
HookStats           Trainer -> HookSampler      call   dict (the outbox's counters)
=================== =========================== ====== ==================================

What holds:

* Every record checks its fields in ``__post_init__`` and raises :class:`BadMessage`
  (a TypeError) naming the field, what it must be and what it got. A record that comes
  from another process is rebuilt by the actors codec with its constructor, and the
  codec turns that TypeError into a rejected message: the node answers a call with an
  error and drops a cast, counting it (``actors._wire``, ``actors._node``). So a
  malformed record never reaches an actor.
* Records that cross between processes (the Coordinator's, ``RegroupCalled`` and the
  Checkpointers' replica traffic, and the replies ``Plan``, ``Held``, ``Rejected``) are
  ``@actors.record``. The others are only sent inside a rank process and are not
  registered: a peer cannot name them, so the DataLoader, Optimizer and HookSampler
  only ever see them from their own Trainer.
* A receiver (a :class:`ProtocolActor`) answers a call it does not know with
  :class:`Rejected` and drops a cast it does not know, counting it in its
  ``statistics().dropped`` -- never an exception, which would crash the actor and with
  it the rank (or, for the Coordinator, the run).
* A control tool (the daemon, or any process of the run's user holding the run's
  token, ``pipelines.cluster.live``) reaches the Coordinator like a rank does; its
  requests answer a dict, ``{"error": one line}`` when refused.
* A role's work that fails for a reason outside this rank (a dead peer mid-collective)
  is answered with :class:`Failed`; the Trainer turns it into :class:`Regroup`.

Adding a message: one record here (its checks in ``__post_init__``), one client function
here, one ``case`` in the receiver's ``handle_call`` or ``handle_cast``.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np
import trio

import actors

from ..store.checkpoint import ShardInfo
from ..store.overrides import is_live_hook

__all__ = [
    "COORDINATOR",
    "EXIT",
    "REGROUP",
    "SOURCES",
    "ApplyUpdate",
    "BadMessage",
    "BatchesWanted",
    "Boundary",
    "CheckpointNow",
    "ChaosFired",
    "CheckpointWritten",
    "DiskError",
    "EvalReported",
    "Failed",
    "FlushWrites",
    "Held",
    "HeldQuery",
    "HookChange",
    "HookFlush",
    "HookStats",
    "Join",
    "OwnSnapshot",
    "Plan",
    "ProtocolActor",
    "RankFinished",
    "Regroup",
    "RegroupCalled",
    "Rejected",
    "ReplicaAck",
    "ReplicaWanted",
    "RestoreState",
    "RunStatus",
    "SampleDecision",
    "SampleQuery",
    "SampleView",
    "SetOverride",
    "ShardQuery",
    "ShardWritten",
    "Snapshot",
    "StepLogged",
    "StopAt",
    "StopPrepare",
    "StopRequest",
    "StopStep",
    "StopQuery",
    "TakeSnapshot",
    "apply_update",
    "ask_regroup",
    "boundary",
    "chaos_fired",
    "checkpoint_now",
    "checkpoint_written",
    "coordinator_back",
    "disk_error",
    "eval_reported",
    "fetch_batches",
    "flush_hooks",
    "flush_writes",
    "held_snapshots",
    "hook_change",
    "hook_stats",
    "join",
    "own_snapshot",
    "rank_finished",
    "replica_ack",
    "replica_holder",
    "replica_of",
    "replica_owner",
    "restore_state",
    "run_status",
    "sample_decision",
    "send_replica",
    "send_sample",
    "set_override",
    "stop_at",
    "stop_prepare",
    "stop_requested",
    "stop_step",
    "shard_snapshot",
    "shard_written",
    "should_stop",
    "step_logged",
    "take_snapshot",
]

COORDINATOR = "Coordinator@cluster"
_SHARD_INFO = frozenset(f.name for f in dataclasses.fields(ShardInfo))
SOURCES = ("init", "memory", "disk")  # where a generation's starting state comes from
EXIT, REGROUP = "exit", "regroup"  # the Coordinator's answers to RankFinished


class BadMessage(actors.WireError):
    """A message that does not fit its record (a TypeError: the actors codec rejects a
    received one before any actor sees it)."""


class Regroup(Exception):
    """This rank must rejoin the cluster (a peer failed, or the Coordinator asked)."""


# ---------------------------------------------------------------------------------------
# Field checks: each a predicate and what it accepts, for BadMessage's text
# ---------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_str_dict(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) for k in v)


NAT = (lambda v: _is_int(v) and v >= 0, "an int >= 0")
POSITIVE = (lambda v: _is_int(v) and v >= 1, "an int >= 1")
REAL = (_is_real, "a real number")
SECONDS = (lambda v: _is_real(v) and v >= 0, "a number of seconds >= 0")
BOOL = (lambda v: isinstance(v, bool | np.bool_), "a bool")
STR_DICT = (_is_str_dict, "a dict with str keys")
OPT_STR_DICT = (lambda v: v is None or _is_str_dict(v), "None or a dict with str keys")
STEPS = (lambda v: isinstance(v, list) and all(NAT[0](s) for s in v), "a list of ints >= 0")
SHORT_STR = (lambda v: isinstance(v, str) and 0 < len(v) <= 256, "a str of 1-256 characters")


def _is_override(o) -> bool:
    return (
        isinstance(o, dict)
        and set(o) == {"step", "key", "value"}
        and NAT[0](o["step"])
        and isinstance(o["key"], str)
        and isinstance(o["value"], int | float | str | bool)
    )


OVERRIDES = (
    lambda v: isinstance(v, list) and all(_is_override(o) for o in v),
    "a list of {step, key, value} dicts",
)
LIVE_HOOKS = (
    lambda v: isinstance(v, list) and all(is_live_hook(h) for h in v),
    "a list of RUN/hooks_live.jsonl records",
)
VECTOR = (
    lambda v: isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype == np.float32,
    "a 1-D float32 array",
)
TENSORS = (
    lambda v: _is_str_dict(v) and all(VECTOR[0](t) for t in v.values()),
    "a dict of 1-D float32 arrays",
)
COUNTERS = (
    lambda v: _is_str_dict(v) and all(_is_int(c) for c in v.values()),
    "a dict of int counters",
)


def _check(message, /, **kinds) -> None:
    """Raise BadMessage for the first field of `message` its kind does not accept."""
    for name, (accepts, what) in kinds.items():
        value = getattr(message, name)
        if not accepts(value):
            raise BadMessage(
                f"{type(message).__name__}.{name}: expected {what}, got "
                f"{type(value).__name__} {value!r:.60}"
            )


def _wire(cls):
    """A record that crosses between processes (named cluster.<Class> on the wire)."""
    return actors.record(dataclasses.dataclass(frozen=True)(cls), name=f"cluster.{cls.__name__}")


_local = dataclasses.dataclass(frozen=True)  # a record sent only inside a rank process


# ---------------------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------------------


@_local
class Failed:
    """A role's answer when its work failed outside this rank (see the module doc)."""

    reason: str


@_wire
class Rejected:
    """The answer to a call its receiver does not accept (unknown or malformed)."""

    reason: str


@_wire
class Held:
    """The steps of the snapshots a rank holds: its own, and its left neighbour's
    replicas."""

    own: list
    replica: list

    def __post_init__(self):
        _check(self, own=STEPS, replica=STEPS)


@_wire
class Plan:
    """The Coordinator's answer to Join: train generation `generation` from the state
    after `step` steps, taken from `source` ("init", "memory" or "disk" at `path`);
    `chaos` is the events not fired yet; `stop_at` the step to stop after, when a
    planned stop is under way; `overrides` the run's live overrides (each rank replays
    them: pipelines.config.LiveConfig); `checkpoints` the steps of agreed checkpoints
    (`zerotrain checkpoint`) whose manifest is not written yet; `hooks` the analyzers
    attached and detached live (which steps to sample: pipelines.store.overrides)."""

    generation: int
    step: int
    source: str
    path: str | None
    chaos: list
    stop_at: int | None = None  # a planned stop asked before this generation formed
    overrides: list = dataclasses.field(default_factory=list)
    checkpoints: list = dataclasses.field(default_factory=list)
    hooks: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        _check(self, generation=POSITIVE, step=NAT, overrides=OVERRIDES, checkpoints=STEPS)
        _check(self, hooks=LIVE_HOOKS)
        if self.stop_at is not None and not NAT[0](self.stop_at):
            raise BadMessage(
                f"Plan.stop_at: expected None or an int >= 0, got {self.stop_at!r:.40}"
            )
        if self.source not in SOURCES:
            raise BadMessage(f"Plan.source: expected one of {SOURCES}, got {self.source!r:.40}")
        if self.path is not None and not isinstance(self.path, str):
            raise BadMessage(f"Plan.path: expected None or a str, got {self.path!r:.40}")
        if not (isinstance(self.chaos, list) and all(_is_str_dict(e) for e in self.chaos)):
            raise BadMessage(f"Plan.chaos: expected a list of dicts, got {self.chaos!r:.60}")


@_local
class SampleDecision:
    """Whether this step is sampled for the analyzer, and whether this rank has credit
    (room to offer the next sample) -- the latter is agreed on by all ranks."""

    sampled: bool
    credit: bool


# ---------------------------------------------------------------------------------------
# To the Coordinator
# ---------------------------------------------------------------------------------------


@_wire
class Join:
    """A rank joins the next generation: its pid, the snapshots it holds, and the
    generation it trained last (0: a fresh process). A Coordinator started again (its
    node was lost) numbers the next generation past every one reported, so no ring
    message of a generation before it is taken for one of it."""

    rank: int
    pid: int
    held: Held
    generation: int = 0

    def __post_init__(self):
        _check(self, rank=NAT, pid=POSITIVE, generation=NAT)
        if not isinstance(self.held, Held):
            raise BadMessage(f"Join.held: expected a Held record, got {self.held!r:.60}")


@_wire
class StepLogged:
    """Rank 0's metrics line of one step (a metrics.jsonl record plus its generation,
    and the transform hooks' records for hooks.jsonl)."""

    record: dict

    def __post_init__(self):
        _check(self, record=STR_DICT)
        r = self.record
        for key, kind in (("step", POSITIVE), ("generation", NAT), ("skipped", BOOL)):
            if not kind[0](r.get(key)):
                raise BadMessage(f"StepLogged.record[{key!r}]: expected {kind[1]}")
        for key in ("loss", "lr", "samples_per_s"):
            if not _is_real(r.get(key)):
                raise BadMessage(f"StepLogged.record[{key!r}]: expected a real number")
        if not OPT_STR_DICT[0](r.get("eval")):
            raise BadMessage("StepLogged.record['eval']: expected None or a dict")
        transforms = r.get("transforms")
        if transforms is not None and not (
            isinstance(transforms, list) and all(_is_str_dict(t) for t in transforms)
        ):
            raise BadMessage("StepLogged.record['transforms']: expected a list of dicts")


@_wire
class EvalReported:
    step: int
    metrics: dict

    def __post_init__(self):
        _check(self, step=POSITIVE, metrics=STR_DICT)


@_wire
class StopQuery:
    step: int

    def __post_init__(self):
        _check(self, step=POSITIVE)


@_wire
class RankFinished:
    rank: int
    info: dict  # step, memory, timing, hooks ... (rank 0: eval, params_sha256)

    def __post_init__(self):
        _check(self, rank=NAT, info=STR_DICT)
        if self.info.get("rank") != self.rank:
            raise BadMessage(f"RankFinished.info['rank']: expected {self.rank}")


@_wire
class ChaosFired:
    event_id: int
    pid: int

    def __post_init__(self):
        _check(self, event_id=NAT, pid=POSITIVE)


@_wire
class ShardWritten:
    """Rank `rank`'s shard file of step `step` is durable (`info`: a ShardInfo's
    fields); `generation`: the generation that wrote it."""

    rank: int
    step: int
    info: dict
    counters: dict
    generation: int

    def __post_init__(self):
        _check(self, rank=NAT, step=NAT, info=STR_DICT, counters=COUNTERS)
        _check(self, generation=NAT)
        if set(self.info) != _SHARD_INFO:
            raise BadMessage(f"ShardWritten.info: expected the keys {sorted(_SHARD_INFO)}")


@_wire
class DiskError:
    """Rank `rank` could not write step `step`'s files for a reason of the world:
    `why` is store.rundir.disk_error's one line (path, meaning, errno name)."""

    rank: int
    step: int
    why: str

    def __post_init__(self):
        _check(self, rank=NAT, step=NAT)
        if not isinstance(self.why, str):
            raise BadMessage(f"DiskError.why: expected a str, got {self.why!r:.40}")


@_wire
class StopRequest:
    """A stop signal (`signal`, e.g. "SIGTERM") reached `source` (e.g. "rank 1")."""

    source: str
    signal: str

    def __post_init__(self):
        for name in ("source", "signal"):
            value = getattr(self, name)
            if not (isinstance(value, str) and 0 < len(value) <= 64):
                raise BadMessage(f"StopRequest.{name}: expected a short str, got {value!r:.40}")


@_wire
class StopStep:
    """Rank `rank` of `generation` has completed `done` steps, and starts at most one
    more before it hears the stop step (the Coordinator's module doc)."""

    rank: int
    done: int
    generation: int

    def __post_init__(self):
        _check(self, rank=NAT, done=NAT, generation=POSITIVE)


# From a control tool (pipelines.cluster.live): a running job's live control
@_wire
class RunStatus:
    """Where the run stands: step, generation, state, overrides."""


@_wire
class CheckpointNow:
    """A full checkpoint at a step every rank agrees on, training going on; answered
    with that step and its manifest once the checkpoint verifies. Requests that overlap
    (one comes before the other's checkpoint is written) are answered by one."""


@_wire
class SetOverride:
    """Set live key `key` to `value` (a TOML value's text) from step `at_step` on (None:
    the next step every rank can still honour)."""

    key: str
    value: str
    at_step: int | None = None

    def __post_init__(self):
        _check(self, key=SHORT_STR, value=SHORT_STR)
        if self.at_step is not None and not POSITIVE[0](self.at_step):
            raise BadMessage(
                f"SetOverride.at_step: expected None or an int >= 1, got {self.at_step!r:.40}"
            )


@_wire
class HookChange:
    """Attach analyzers (`action` "attach", `target` a hook spec: "PATH.py[:NAME]",
    "builtin[:NAME]") or detach one (`action` "detach", `target` its name), at a step
    every rank agrees on."""

    action: str
    target: str

    def __post_init__(self):
        _check(self, target=SHORT_STR)
        if self.action not in ("attach", "detach"):
            raise BadMessage(
                f"HookChange.action: expected 'attach' or 'detach', got {self.action!r:.40}"
            )


# ---------------------------------------------------------------------------------------
# To the Trainer
# ---------------------------------------------------------------------------------------


@_wire
class StopPrepare:
    """A planned stop: answer StopStep, then wait for StopAt before a second step."""

    generation: int

    def __post_init__(self):
        _check(self, generation=POSITIVE)


@_wire
class StopAt:
    """End the run after step `step` (agreed by all ranks of `generation`)."""

    step: int
    generation: int

    def __post_init__(self):
        _check(self, step=NAT, generation=POSITIVE)


@_wire
class Boundary:
    """The step a round without a stop agreed on (the Coordinator's module doc): write a
    checkpoint after step `step` when `checkpoint`; `overrides` and `hooks` are the
    run's live overrides and live analyzers now (replacing what the rank had); then go
    on."""

    step: int
    generation: int
    checkpoint: bool
    overrides: list
    hooks: list

    def __post_init__(self):
        _check(self, step=NAT, generation=POSITIVE, checkpoint=BOOL, overrides=OVERRIDES)
        _check(self, hooks=LIVE_HOOKS)


@_wire
class RegroupCalled:
    """Abort the current attempt and rejoin for generation `generation`."""

    generation: int

    def __post_init__(self):
        _check(self, generation=POSITIVE)


@_wire
class CheckpointWritten:
    """The checkpoint of `step` is complete (its manifest `written`), or will never be
    (not `written`: the manifest could not be written). Sent to rank 0 of a continuous
    run, which then exports it as weights/latest.safetensors."""

    step: int
    written: bool

    def __post_init__(self):
        _check(self, step=NAT, written=(lambda v: isinstance(v, bool), "a bool"))


# ---------------------------------------------------------------------------------------
# To the role actors of a rank
# ---------------------------------------------------------------------------------------


@_local
class BatchesWanted:
    step: int

    def __post_init__(self):
        _check(self, step=NAT)


@_local
class ApplyUpdate:
    """Clip, update this rank's shard with the reduced gradient `shard` (global squared
    norm `sq_norm`), all-gather the parameters."""

    step: int
    shard: np.ndarray
    sq_norm: float

    def __post_init__(self):
        _check(self, step=NAT, shard=VECTOR, sq_norm=REAL)


@_wire
class Snapshot:
    """One rank's shard of the training state after `step` steps (in memory)."""

    rank: int
    step: int
    tensors: dict  # params and every optimizer state vector, this rank's [lo, hi)
    counters: dict

    def __post_init__(self):
        _check(self, rank=NAT, step=NAT, tensors=TENSORS, counters=COUNTERS)
        if "params" not in self.tensors:
            raise BadMessage("Snapshot.tensors: expected a 'params' entry")


@_local
class RestoreState:
    """Install the state after `step` steps from `source`: the seed ("init"),
    `snapshot` ("memory") or the checkpoint at `path` ("disk")."""

    source: str
    step: int
    path: str | None = None
    snapshot: Snapshot | None = None

    def __post_init__(self):
        _check(self, step=NAT)
        if self.source not in SOURCES:
            raise BadMessage(f"RestoreState.source: expected one of {SOURCES}, got {self.source!r}")
        if self.source == "memory" and not isinstance(self.snapshot, Snapshot):
            raise BadMessage("RestoreState: source 'memory' needs a Snapshot")
        if self.source == "disk" and not isinstance(self.path, str):
            raise BadMessage("RestoreState: source 'disk' needs a path")


@_local
class ShardQuery:
    """A copy of the Optimizer's shard of the state after `step` steps, as a Snapshot."""

    step: int

    def __post_init__(self):
        _check(self, step=NAT)


@_local
class TakeSnapshot:
    """Snapshot the state after `step` steps, replicate it to the right neighbour, and
    write the shard file when `to_disk`."""

    step: int
    to_disk: bool

    def __post_init__(self):
        _check(self, step=NAT, to_disk=BOOL)


@_local
class HeldQuery:
    pass


@_local
class OwnSnapshot:
    step: int

    def __post_init__(self):
        _check(self, step=NAT)


@_wire
class ReplicaWanted:
    """Rank `rank`'s snapshot of step `step`, from the replicas its right neighbour
    holds."""

    rank: int
    step: int

    def __post_init__(self):
        _check(self, rank=NAT, step=NAT)


@_wire
class ReplicaAck:
    step: int

    def __post_init__(self):
        _check(self, step=NAT)


@_local
class FlushWrites:
    pass


@_local
class SampleQuery:
    """Is step `step` (1-based) sampled for the analyzer? `agreed`: every rank had
    credit at the step before (so all decide alike)."""

    step: int
    agreed: bool

    def __post_init__(self):
        _check(self, step=POSITIVE, agreed=BOOL)


@_local
class SampleView:
    """This rank's view of step `step` for the analyzer: its gradient shard, the
    parameters before and the update (fresh arrays), and its own gradient."""

    step: int
    loss: float
    lr: float
    view: dict

    def __post_init__(self):
        _check(self, step=POSITIVE, loss=REAL, lr=REAL, view=STR_DICT)
        missing = {"grad", "params_before", "update", "rank_grad"} - set(self.view)
        if missing:
            raise BadMessage(f"SampleView.view: missing {sorted(missing)}")


@_local
class HookFlush:
    """Wait (at most `seconds`) until the analyzer has every sample offered."""

    seconds: float

    def __post_init__(self):
        _check(self, seconds=SECONDS)


@_local
class HookStats:
    pass


# ---------------------------------------------------------------------------------------
# The receiving side
# ---------------------------------------------------------------------------------------


class ProtocolActor(actors.Actor):
    """An actor that receives this module's records. Subclasses answer what they accept
    with one ``case`` each and end with ``return self.reject(request)`` /
    ``self.drop(msg)``; the defaults reject everything."""

    rejected = 0  # calls answered Rejected (dropped casts count in statistics().dropped)

    async def handle_call(self, request, from_):
        return self.reject(request)

    async def handle_cast(self, msg):
        self.drop(msg)

    def reject(self, request) -> Rejected:
        """The answer to a call this actor does not accept: counted in `rejected`."""
        reason = f"{self.ref.label} does not accept {_describe(request)}"
        self.rejected += 1
        _log_sparsely(self, "rejected a call", reason, self.rejected)
        return Rejected(reason)

    def drop(self, msg) -> None:
        """Drop a cast this actor does not accept: counted in statistics().dropped."""
        self.ref.dropped += 1
        _log_sparsely(self, "dropped", _describe(msg), self.ref.dropped)


def _log_sparsely(actor: actors.Actor, what: str, detail: str, n: int) -> None:
    """Log the 1st, 2nd, 4th, 8th ... time: a flood of bad messages must not flood the
    log."""
    if n & (n - 1) == 0:
        actor.log.warning("%s %s (%d so far)", what, detail, n)


def _describe(value) -> str:
    if dataclasses.is_dataclass(value):
        return f"a {type(value).__name__} record"
    return f"{type(value).__name__} {value!r:.40}"


def _expect(reply, kind: type, what: str):
    """`reply` if it is a `kind`; a Rejected (a bug on one side) raises BadMessage."""
    if isinstance(reply, kind):
        return reply
    raise BadMessage(f"{what}: expected a {kind.__name__} reply, got {_describe(reply)}")


def _reply(reply):
    """A role's reply; Failed (its work failed outside this rank) raises Regroup, and
    Rejected (a bug on one side) raises BadMessage."""
    if isinstance(reply, Failed):
        raise Regroup(reply.reason)
    if isinstance(reply, Rejected):
        raise BadMessage(reply.reason)
    return reply


# ---------------------------------------------------------------------------------------
# Client functions: one per message
# ---------------------------------------------------------------------------------------


def replica_holder(rank: int, world: int, stride: int = 1) -> int:
    """The rank whose Checkpointer holds `rank`'s replica: `stride` ranks to the right
    -- the right neighbour on one host (stride 1); with R ranks per node, stride R, the
    same local rank of the next node, so a whole node lost leaves every replica of its
    ranks on another node."""
    return (rank + stride) % world


def replica_owner(holder: int, world: int, stride: int = 1) -> int:
    """The rank whose replica `holder` keeps (replica_holder's inverse)."""
    return (holder - stride) % world


async def join(rank: int, pid: int, held: Held, generation: int = 0) -> Plan:
    """Join the next generation; returns once every rank has joined. The Coordinator
    answers REGROUP when it saw this rank down while its join waited (a monitor's late
    ack): the rank joins again. The Coordinator's node lost (on several nodes: node 0
    killed) is waited for -- its agent restarted at the same address runs a Coordinator
    again, and this rank's snapshots are what it restores from; the node agent stops
    this rank when node 0 is not back within cluster.rejoin_timeout."""
    while True:
        try:
            plan = await actors.call(COORDINATOR, Join(rank, pid, held, generation), timeout=None)
        except (actors.ActorExited, actors.NoSuchActor) as err:
            if not _coordinator_lost(err):
                raise
            await coordinator_back()
            continue
        if plan != REGROUP:
            return _expect(plan, Plan, "join")


def _coordinator_lost(err: actors.ActorError) -> bool:
    """Whether a call to the Coordinator failed because its node went away (or is back
    and has not registered it yet), not because of the call."""
    if isinstance(err, actors.NoSuchActor):
        return True
    return getattr(err, "reason", None) == "noconnection"


async def coordinator_back() -> None:
    """Wait until the Coordinator's node is heard from (again), and a moment for its
    Coordinator to register."""
    await actors.current_node().wait_peer(COORDINATOR.split("@", 1)[1], alive=True)
    await trio.sleep(0.1)


async def step_logged(record: dict) -> None:
    await actors.cast(COORDINATOR, StepLogged(record))


async def eval_reported(step: int, metrics: dict) -> None:
    await actors.cast(COORDINATOR, EvalReported(step, metrics))


async def should_stop(step: int) -> bool:
    """Early stopping's decision after the evaluation of `step` (waits for it); Regroup
    when the Coordinator's node is lost meanwhile (a Coordinator started again asks
    for the step again)."""
    try:
        reply = await actors.call(COORDINATOR, StopQuery(step), timeout=None)
    except (actors.ActorExited, actors.NoSuchActor) as err:
        if not _coordinator_lost(err):
            raise
        raise Regroup(f"the Coordinator was lost: {err}") from None
    return _expect(reply, bool, "stop")


async def rank_finished(rank: int, info: dict) -> None:
    """Report the end; returns when every rank has, raises Regroup if one failed first."""
    try:
        reply = await actors.call(COORDINATOR, RankFinished(rank, info), timeout=None)
    except (actors.ActorExited, actors.NoSuchActor) as err:
        if not _coordinator_lost(err):
            raise
        raise Regroup(f"the Coordinator was lost before the run ended: {err}") from None
    if reply == REGROUP:
        raise Regroup("a rank failed before the run ended")
    if reply != EXIT:
        raise BadMessage(f"rank_finished: expected {EXIT!r} or {REGROUP!r}, got {reply!r:.40}")


async def chaos_fired(coordinator: str, event_id: int, pid: int, timeout: float) -> None:
    await actors.call(coordinator, ChaosFired(event_id, pid), timeout)


async def shard_written(rank: int, step: int, info: dict, counters: dict, generation: int) -> None:
    await actors.cast(COORDINATOR, ShardWritten(rank, step, info, counters, generation))


async def disk_error(rank: int, step: int, why: str) -> None:
    await actors.cast(COORDINATOR, DiskError(rank, step, why))


async def stop_requested(coordinator: str, source: str, signame: str, timeout: float) -> str:
    """Ask for a planned stop; "stopping", or "exit" when the asker should leave now."""
    reply = await actors.call(coordinator, StopRequest(source, signame), timeout)
    return _expect(reply, str, "stop_requested")


async def stop_step(rank: int, done: int, generation: int) -> None:
    await actors.cast(COORDINATOR, StopStep(rank, done, generation))


async def stop_prepare(rank: int, generation: int) -> None:
    await actors.cast(f"Trainer@rank{rank}", StopPrepare(generation))


async def stop_at(rank: int, step: int, generation: int) -> None:
    await actors.cast(f"Trainer@rank{rank}", StopAt(step, generation))


async def checkpoint_written(rank: int, step: int, written: bool) -> None:
    await actors.cast(f"Trainer@rank{rank}", CheckpointWritten(step, written))


async def boundary(
    rank: int, step: int, generation: int, checkpoint: bool, overrides: list, hooks: list
) -> None:
    message = Boundary(step, generation, checkpoint, overrides, hooks)
    await actors.cast(f"Trainer@rank{rank}", message)


async def hook_change(coordinator: str, action: str, target: str, timeout: float) -> dict:
    reply = await actors.call(coordinator, HookChange(action, target), timeout)
    return _expect(reply, dict, "hook_change")


async def run_status(coordinator: str, timeout: float) -> dict:
    return _expect(await actors.call(coordinator, RunStatus(), timeout), dict, "run_status")


async def checkpoint_now(coordinator: str, timeout: float) -> dict:
    return _expect(await actors.call(coordinator, CheckpointNow(), timeout), dict, "checkpoint")


async def set_override(
    coordinator: str, key: str, value: str, at_step: int | None, timeout: float
) -> dict:
    reply = await actors.call(coordinator, SetOverride(key, value, at_step), timeout)
    return _expect(reply, dict, "set_override")


async def ask_regroup(rank: int, generation: int) -> None:
    await actors.cast(f"Trainer@rank{rank}", RegroupCalled(generation))


async def fetch_batches(step: int) -> list:
    return await actors.call("DataLoader", BatchesWanted(step), timeout=None)


async def apply_update(step: int, shard: np.ndarray, sq_norm: float):
    """(lr, StepResult); Regroup if the all-gather failed."""
    reply = await actors.call("Optimizer", ApplyUpdate(step, shard, sq_norm), timeout=None)
    return _reply(reply)


async def restore_state(how: RestoreState) -> None:
    """Install `how`'s state; Regroup if rebuilding the full vectors failed."""
    _reply(await actors.call("Optimizer", how, timeout=None))


async def shard_snapshot(step: int) -> Snapshot:
    reply = await actors.call("Optimizer", ShardQuery(step), timeout=None)
    return _expect(reply, Snapshot, "shard_snapshot")


async def take_snapshot(step: int, to_disk: bool) -> None:
    _reply(await actors.call("Checkpointer", TakeSnapshot(step, to_disk), timeout=None))


async def held_snapshots() -> Held:
    return _expect(await actors.call("Checkpointer", HeldQuery()), Held, "held")


async def own_snapshot(step: int) -> Snapshot | None:
    return _reply(await actors.call("Checkpointer", OwnSnapshot(step)))


async def replica_of(holder: int, rank: int, step: int, timeout: float) -> Snapshot | None:
    """Rank `rank`'s snapshot of `step` as rank `holder` (its replica_holder) holds it."""
    reply = await actors.call(f"Checkpointer@rank{holder}", ReplicaWanted(rank, step), timeout)
    return _reply(reply)


async def send_replica(rank: int, snap: Snapshot) -> None:
    await actors.cast(f"Checkpointer@rank{rank}", snap)


async def replica_ack(rank: int, step: int) -> None:
    await actors.cast(f"Checkpointer@rank{rank}", ReplicaAck(step))


async def flush_writes() -> None:
    _reply(await actors.call("Checkpointer", FlushWrites(), timeout=None))


async def sample_decision(step: int, agreed: bool) -> SampleDecision:
    # no timeout: a step due for an exact hook waits for the analyzer's answer (bounded
    # by the outbox's reply_timeout)
    reply = await actors.call("HookSampler", SampleQuery(step, agreed), timeout=None)
    return _expect(reply, SampleDecision, "sample_decision")


async def send_sample(step: int, loss: float, lr: float, view: dict) -> None:
    await actors.cast("HookSampler", SampleView(step, loss, lr, view))


async def flush_hooks(seconds: float) -> None:
    _reply(await actors.call("HookSampler", HookFlush(seconds), timeout=seconds + 5))


async def hook_stats() -> dict:
    return _expect(await actors.call("HookSampler", HookStats()), dict, "hook_stats")
