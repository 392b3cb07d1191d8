"""The role actors of a rank process, the step functions the Trainer runs itself, and
the state they share.

    role supervisor (one_for_all, no restarts: a crashed role is a crashed rank, which
    │                the cluster supervisor restarts as a fresh process)
    ├── DataLoader      batches of (seed, epoch, step, rank), one step prefetched
    ├── Optimizer       this rank's shard of params and optimizer state; the all-gather
    ├── Checkpointer    in-memory snapshots, the left neighbour's replica, shard files
    ├── HookSampler     offers gradient samples to the analyzer process, never waits
    └── Trainer         drives the steps (pipelines.cluster.rank)

Each actor here holds state that outlives one call: the DataLoader its prefetch, the
Optimizer this rank's shard of the parameters and optimizer state (it updates, restores
and copies it; the Checkpointer asks it for a copy), the Checkpointer its snapshots,
replicas and background writes (and peers cast to it), the HookSampler its outbox. Computing the
gradients (`compute_gradients`, in a worker thread) and reducing them over the ring
(`reduce_buckets`, `reduce_gradients`) hold none: they are functions the Trainer awaits,
and the ring's one-user-at-a-time guard is `RankState.collective`.

The messages are records of pipelines.cluster.messages. Work that can fail for reasons
outside this rank -- a collective whose peer died, a neighbour that is gone -- is
answered with a `Failed` value instead of crashing the actor: the Trainer then rejoins
the cluster (GenServer style `{:error, reason}`). A message an actor does not accept is
rejected (a call) or dropped and counted (a cast). A bug still crashes the actor, and
with it the rank.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import trio

import actors

from ..core import install_checkpoint, rank_batches, read_checkpoint
from ..step import RankStep
from ..store import checkpoint as ckpt_mod
from ..store.rundir import disk_error
from . import messages as msg
from .messages import (
    ApplyUpdate,
    BatchesWanted,
    Failed,
    FlushWrites,
    Held,
    HeldQuery,
    HookFlush,
    HookStats,
    OwnSnapshot,
    ProtocolActor,
    Regroup,
    ReplicaAck,
    ReplicaWanted,
    RestoreState,
    SampleDecision,
    SampleQuery,
    SampleView,
    ShardQuery,
    Snapshot,
    TakeSnapshot,
)

__all__ = [
    "BackwardGate",
    "Checkpointer",
    "DataLoader",
    "HookSampler",
    "Optimizer",
    "RankState",
    "compute_gradients",
    "reduce_buckets",
    "reduce_gradients",
]

KEEP_SNAPSHOTS = 3
REPLICA_ACK_WAIT_S = 2.0  # a neighbour slower than this to take a replica is not waited for


@dataclass
class RankState:
    """What the role actors of one rank share: built once per process."""

    cfg: object
    rank: int
    world: int
    dataset: object
    evalset: object
    model: object
    step: RankStep
    ring: object
    ckpt_root: object
    chaos: object
    initial_params: np.ndarray
    replica_stride: int = 1  # ranks from a rank to its replica's holder (msg.replica_holder)
    min_generation: int = 0  # the coordinator asked for at least this generation
    generation: int = 0  # the generation this rank trains in
    timing: dict = field(default_factory=lambda: dict.fromkeys(_TIMERS, 0.0))
    timed_steps: int = 0
    overlapped_buckets: int = 0  # bucket reductions started before backward ended
    # what the rank is doing, for live/rank-R.json (the daemon's silent-rank check):
    # "join" (joining or restoring), "step" (a step's own work: data, hooks, compute),
    # "collective" (its gradients computed, in the step's collectives with the other
    # ranks), "eval", "stop" (waiting for a round's decision: a stop, a checkpoint, a
    # live override or hook), "finish"; since when
    # (wall time), and the steps completed
    phase: str = "join"
    phase_since: float = field(default_factory=time.time)
    done_steps: int = 0
    # the analyzers attached and detached live (RUN/hooks_live.jsonl's records), as the
    # Trainer last heard them from the Coordinator; the HookSampler samples by them
    live_hooks: list = field(default_factory=list)
    _lock: trio.Lock = field(default_factory=trio.Lock)
    _scope: trio.CancelScope | None = None
    _regroup: trio.Event = field(default_factory=trio.Event)  # set by the next regroup

    @asynccontextmanager
    async def collective(self, what: str):
        """Use the ring: one user at a time; fails fast once a regroup was asked for,
        and is cancelled by `abort_collectives`."""
        async with self._lock:
            if self.ring.generation < self.min_generation:
                raise Regroup(f"{what}: generation {self.min_generation} was called for")
            with trio.CancelScope() as scope:
                self._scope = scope
                try:
                    yield self.ring
                finally:
                    self._scope = None
            if scope.cancelled_caught:
                raise Regroup(f"{what}: aborted for generation {self.min_generation}")

    def enter(self, phase: str, done: int | None = None) -> None:
        """Record that this rank now does `phase` (and has completed `done` steps)."""
        self.phase, self.phase_since = phase, time.time()
        if done is not None:
            self.done_steps = done

    def abort_collectives(self, generation: int) -> None:
        self.min_generation = max(self.min_generation, generation)
        if self._scope is not None:
            self._scope.cancel()
        self._regroup.set()
        self._regroup = trio.Event()

    async def wait_unless_regroup(self, event: trio.Event) -> None:
        """Wait for `event`, or return at once when a regroup is (or gets) called for:
        whatever the waiting was for will not come (e.g. the ack of a dead neighbour)."""
        if self.ring.generation < self.min_generation:
            return
        regroup = self._regroup
        async with trio.open_nursery() as nursery:

            async def first(wait) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(first, event.wait)
            nursery.start_soon(first, regroup.wait)

    def add_time(self, key: str, seconds: float) -> None:
        self.timing[key] += seconds


_TIMERS = ("step_s", "data_s", "compute_s", "comm_s", "apply_s")


async def _guarded(state: RankState, what: str, fn):
    """Run `await fn(ring)` under the ring guard; a failure outside this rank -> Failed."""
    try:
        async with state.collective(what) as ring:
            return await fn(ring)
    except (actors.CollectiveError, Regroup) as err:
        return Failed(f"{what}: {str(err).splitlines()[0]}")


class _Role(ProtocolActor):
    # a role that does not stop within a second is killed: the rank is going down anyway
    shutdown = 1.0


# ---------------------------------------------------------------------------------------
# DataLoader
# ---------------------------------------------------------------------------------------


class DataLoader(_Role):
    """Rank r's micro-batches of step s, a pure function of (seed, epoch, step, rank).

    The next step's batches are prepared in a worker thread while the current step runs
    (prefetch depth one: bounded). A rollback just asks for an earlier step.
    """

    def __init__(self, state: RankState):
        self.state = state
        self._ahead: dict[int, object] = {}  # step -> its batches, once prepared
        self._ready: dict[int, trio.Event] = {}  # step -> set when its prefetch ended

    def _make(self, s: int):
        st = self.state
        return rank_batches(st.dataset, st.cfg, s, st.rank, st.world)

    async def _prefetch(self, s: int) -> None:
        event = self._ready[s] = trio.Event()
        try:
            self._ahead[s] = await trio.to_thread.run_sync(self._make, s)
        finally:
            event.set()

    async def handle_call(self, request, from_):
        match request:
            case BatchesWanted(step=s):
                return await self._batches(s)
        return self.reject(request)

    async def _batches(self, s: int):
        if s in self._ready:
            await self._ready.pop(s).wait()
        batches = self._ahead.pop(s, None)
        if batches is None:
            batches = await trio.to_thread.run_sync(self._make, s)
        for stale in [k for k in self._ready if k != s + 1]:
            self._ready.pop(stale)
            self._ahead.pop(stale, None)
        if self.state.cfg.train.more(s + 1) and s + 1 not in self._ready:
            self.nursery.start_soon(self._prefetch, s + 1)
        return batches


# ---------------------------------------------------------------------------------------
# Gradients: computed in a worker thread, reduced over the ring
# ---------------------------------------------------------------------------------------


async def compute_gradients(st: RankState, s: int, batches, seed: int, gate):
    """(grads, loss_sum) of this rank's micro-batches of step `s`, computed in a worker
    thread (the kernels release the GIL), so heartbeats and messages keep flowing.
    `gate`: a BackwardGate told of each gradient range as backward finalises it."""
    t0 = time.perf_counter()
    ready = gate.grad_ready if gate is not None else None
    try:
        grads, loss_sum = await trio.to_thread.run_sync(st.step.compute, batches, seed, s, ready)
    finally:
        if gate is not None:
            gate.close()
    dt = time.perf_counter() - t0
    st.add_time("compute_s", dt)
    slow = st.chaos.straggler_factor
    if slow > 1:  # chaos: a straggler computes `factor` times slower
        await trio.sleep(dt * (slow - 1))
    st.enter("collective")  # from here on the step needs the other ranks
    return grads, loss_sum


async def reduce_buckets(st: RankState, s: int, grads: np.ndarray, gate: BackwardGate):
    """All-reduce each gradient bucket once backward has finalised it (overlapped with
    backward; same bits as reducing after it). The number of buckets done, or Failed."""

    async def buckets(ring):
        await st.chaos.before_send(s, "reduce")
        done = 0
        for index, (lo, _) in enumerate(st.step.buckets):
            if not await gate.wait_final(lo):
                break  # backward ended without reaching it (an error)
            t0 = time.perf_counter()
            await st.step.reduce_bucket(grads, index, s)
            st.add_time("comm_s", time.perf_counter() - t0)
            done += 1
        return done

    return await _guarded(st, f"bucket reduction of step {s}", buckets)


async def reduce_gradients(st: RankState, s: int, grads: np.ndarray, loss_sum, done: int):
    """The gradient reduction of the configured mode over the ring (step.RankStep.reduce):
    (shard, sq_norm, loss), or Failed. `done`: buckets reduced already."""

    async def reduce(ring):
        if not done:
            await st.chaos.before_send(s, "reduce")
        t0 = time.perf_counter()
        out = await st.step.reduce(grads, loss_sum, s, buckets_done=done)
        st.add_time("comm_s", time.perf_counter() - t0)
        return out

    return await _guarded(st, f"reduce of step {s}", reduce)


class BackwardGate:
    """Where backward has got to, told from the compute thread to the trio loop.

    `grad_ready(start, stop)` (the model's callback, on the worker thread) records that
    grads[start:] is final; `wait_final(lo)` (trio) returns True once grads[lo:] is,
    False if backward ended first (`close`)."""

    def __init__(self, n: int):
        self._token = trio.lowlevel.current_trio_token()
        self._frontier = n
        self._closed = False
        self._changed = trio.Event()

    def _advance(self, start: int | None) -> None:
        if start is None:
            self._closed = True
        else:
            self._frontier = min(self._frontier, start)
        self._changed.set()
        self._changed = trio.Event()

    def grad_ready(self, start: int, stop: int) -> None:
        self._token.run_sync_soon(self._advance, start)

    def close(self) -> None:
        """Backward is over (called from trio)."""
        self._advance(None)

    async def wait_final(self, lo: int) -> bool:
        while self._frontier > lo:
            if self._closed:
                return False
            await self._changed.wait()
        return True


# ---------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------


class Optimizer(_Role):
    """Owns this rank's shard of the parameters and of the optimizer state.

    ApplyUpdate: clip, update the shard, all-gather the parameters.
    RestoreState: install a snapshot or a checkpoint and rebuild the full vectors.
    ShardQuery: a copy of the shard and the counters (what a snapshot keeps).
    """

    def __init__(self, state: RankState):
        self.state = state

    async def handle_call(self, request, from_):
        match request:
            case ApplyUpdate(step=s, shard=shard, sq_norm=sq_norm):
                return await self._apply(s, shard, sq_norm)
            case RestoreState():
                return await self._restore(request)
            case ShardQuery(step=s):
                rs = self.state.step
                tensors = {k: np.array(v, copy=True) for k, v in rs.shard_tensors().items()}
                return Snapshot(self.state.rank, s, tensors, rs.opt.counters())
        return self.reject(request)

    async def _apply(self, s: int, shard: np.ndarray, sq_norm: float):
        st = self.state
        t0 = time.perf_counter()
        lr, result = st.step.apply(shard, sq_norm, s)
        st.add_time("apply_s", time.perf_counter() - t0)

        async def gather(ring):
            await st.chaos.before_send(s, "gather")
            t1 = time.perf_counter()
            await st.step.gather(result, s)
            st.add_time("comm_s", time.perf_counter() - t1)
            return lr, result

        return await _guarded(st, f"all-gather of step {s}", gather)

    async def _restore(self, how: RestoreState):
        st = self.state
        rs = st.step
        if how.source == "init":
            rs.model.params[:] = st.initial_params
            rs.opt.load({}, {})
            return None
        if how.source == "disk":
            manifest, full = await trio.to_thread.run_sync(read_checkpoint, how.path, rs.n)
            install_checkpoint(rs, manifest, full)
            return None
        snap = how.snapshot
        lo, hi = rs.lo, rs.hi
        rs.model.params[lo:hi] = snap.tensors["params"]
        full_state = rs.mode == "ddp"
        for key, buf in rs.opt.state.items():
            (buf[lo:hi] if full_state else buf)[...] = snap.tensors[key]
        rs.opt.steps_applied = int(snap.counters.get("steps_applied", 0))
        rs.opt.skipped = int(snap.counters.get("skipped", 0))

        async def rebuild(ring):
            await ring.all_gather(rs.model.params, step=-1)
            if full_state:
                for buf in rs.opt.state.values():
                    await ring.all_gather(buf, step=-1)
            return None

        return await _guarded(st, "restore", rebuild)


# ---------------------------------------------------------------------------------------
# Checkpointer
# ---------------------------------------------------------------------------------------


class Checkpointer(_Role):
    """Snapshots of this rank's shard (in memory), the left neighbour's replica (on
    several nodes: the rank whose msg.replica_holder this one is, on another node), and
    shard files on disk written in a worker thread while training goes on.

    TakeSnapshot(s, to_disk): take a copy of the shard from the Optimizer; send it to
        the right neighbour's Checkpointer (its replica of us); when `to_disk`, write the
        shard file in the background and tell the coordinator when it is durable.
    HeldQuery: the steps of own snapshots and of replicas held (for the coordinator).
    OwnSnapshot(s) / ReplicaWanted(r, s): a snapshot by step (None if not held).
    FlushWrites: wait for background writes.
    Cast Snapshot from the left neighbour: keep it as the replica, and ack it.
    Cast ReplicaAck(s) from the right neighbour: it holds our snapshot of step s.
    """

    mailbox_size = 16

    def __init__(self, state: RankState):
        self.state = state
        self.own: dict[int, Snapshot] = {}
        self.replicas: dict[int, Snapshot] = {}
        self._acks: dict[int, trio.Event] = {}  # step -> set when the right has it
        self._writes = 0
        self._idle = trio.Event()
        self._idle.set()

    async def handle_call(self, request, from_):
        match request:
            case TakeSnapshot(step=s, to_disk=to_disk):
                return await self._snapshot(s, to_disk, from_)
            case HeldQuery():
                return Held(sorted(self.own), sorted(self.replicas))
            case OwnSnapshot(step=s):
                return self.own.get(s)
            case ReplicaWanted(rank=rank, step=s):
                snap = self.replicas.get(s)
                return snap if snap is not None and snap.rank == rank else None
            case FlushWrites():
                await self._idle.wait()
                return None
        return self.reject(request)

    async def handle_cast(self, message):
        st = self.state
        left = msg.replica_owner(st.rank, st.world, st.replica_stride)
        match message:
            case Snapshot(rank=rank, step=s) if rank == left:
                self.replicas[s] = message
                _trim(self.replicas)
                with trio.move_on_after(1.0):
                    await msg.replica_ack(left, s)
            case ReplicaAck(step=s):
                acked = self._acks.pop(s, None)
                if acked is not None:
                    acked.set()
            case _:
                self.drop(message)

    async def _snapshot(self, s: int, to_disk: bool, from_):
        st = self.state
        snap = await msg.shard_snapshot(s)
        self.own[s] = snap
        _trim(self.own)
        if to_disk:
            self._writes += 1
            self._idle = trio.Event()
            self.nursery.start_soon(self._write, snap)
        if st.world == 1:
            return None
        # the replica: the snapshot counts once the right neighbour has it (so a rank
        # killed right after its snapshot is restored from it, not from the one before).
        # The reply waits for the ack off the mailbox, which keeps taking replicas.
        acked = self._acks[s] = trio.Event()
        with trio.move_on_after(1.0):  # a dead neighbour: the cast is dropped
            await msg.send_replica(msg.replica_holder(st.rank, st.world, st.replica_stride), snap)

        async def reply_when_acked() -> None:
            with trio.move_on_after(REPLICA_ACK_WAIT_S):  # or a regroup: it died
                await st.wait_unless_regroup(acked)
            self._acks.pop(s, None)
            from_.reply(None)

        self.nursery.start_soon(reply_when_acked)
        return actors.NOREPLY

    async def _write(self, snap: Snapshot) -> None:
        st = self.state
        rs = st.step
        ckpt = ckpt_mod.checkpoint_dir(st.ckpt_root, snap.step)
        try:
            try:
                info = await trio.to_thread.run_sync(
                    lambda: ckpt_mod.write_shard(
                        ckpt, st.rank, st.world, rs.lo, rs.hi, snap.tensors, rs.n
                    )
                )
            except OSError as err:
                # a full or read-only disk: a restart would meet it again, so the run
                # ends (the coordinator says why, in one line); other errors crash
                why = disk_error(err, ckpt)
                if why is None:
                    raise
                await msg.disk_error(st.rank, snap.step, why)
                return
            await st.chaos.after_shard_write(snap.step)
            await msg.shard_written(st.rank, snap.step, asdict(info), snap.counters, st.generation)
        finally:
            self._writes -= 1
            if self._writes == 0:
                self._idle.set()


def _trim(snaps: dict) -> None:
    for old in sorted(snaps)[:-KEEP_SNAPSHOTS]:
        del snaps[old]


# ---------------------------------------------------------------------------------------
# HookSampler
# ---------------------------------------------------------------------------------------


class HookSampler(_Role):
    """The rank's side of the gradient hooks: decides which steps are sampled, builds a
    sample on them and offers it to the analyzer process without waiting (full:
    dropped). It owns the HookOutbox and its forwarder task."""

    def __init__(self, state: RankState, outbox):
        self.state = state
        self.outbox = outbox

    async def init(self) -> None:
        if self.outbox is not None:
            self.nursery.start_soon(self.outbox.run)

    async def handle_call(self, request, from_):
        match request:
            case SampleQuery(step=step, agreed=agreed):
                return await self._decide(step, agreed)
            case HookStats():
                return self.outbox.stats() if self.outbox is not None else {}
            case HookFlush(seconds=seconds):  # the run's end: wait (bounded) for the analyzer
                if self.outbox is not None:
                    await self.outbox.flush(self.state.rank, seconds)
                return None
        return self.reject(request)

    async def _decide(self, step: int, agreed: bool) -> SampleDecision:
        """A due step is sampled only if every rank had credit at the step before (the
        analyzer keeps up): the same decision on every rank (hooks.link's doc). The
        run's last step always is: the run's end waits for the analyzer anyway. A step
        due for an exact hook always is, once the analyzer has answered every sample
        this rank sent (they were cast to this mailbox before this call)."""
        outbox = self._outbox()
        if outbox is None:
            return SampleDecision(False, False)
        sampled = outbox.due(step)
        if outbox.exact(step):
            await outbox.wait_for_credit()
        elif sampled and not agreed and step != self.state.cfg.train.steps:
            outbox.decline(step)
            sampled = False
        return SampleDecision(sampled, outbox.has_credit() and not sampled)

    def _outbox(self):
        """The outbox, with the live analyzers of the rank state applied; made at the
        first step an analyzer is attached live to a run that started without any."""
        live = self.state.live_hooks
        if self.outbox is None and live:
            from ..hooks.link import HookOutbox

            self.outbox = HookOutbox([], layout=self.state.model.layout)
            self.nursery.start_soon(self.outbox.run)
        if self.outbox is not None:
            self.outbox.set_live(live)
        return self.outbox

    async def handle_cast(self, message):
        match message:
            case SampleView() if self.outbox is not None:
                self.outbox.offer(self._sample(message))
            case _:
                self.drop(message)

    def _sample(self, m: SampleView):
        from ..hooks.link import HookSample

        st = self.state
        rs = st.step
        view = m.view
        return HookSample(
            step=m.step,
            rank=st.rank,
            world=st.world,
            loss=float(m.loss),
            lr=float(m.lr),
            lo=rs.lo,
            hi=rs.hi,
            batch_size=st.cfg.micro_batch * st.cfg.train.grad_accum,
            # the view's arrays are fresh copies made for this sample: their [lo:hi]
            # slices travel as they are, without a second copy
            rank_grad=np.ascontiguousarray(view["rank_grad"], dtype=np.float32),
            grad=np.asarray(view["grad"], dtype=np.float32),
            params=np.asarray(view["params_before"], dtype=np.float32),
            update=np.asarray(view["update"], dtype=np.float32),
        )
