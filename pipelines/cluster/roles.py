"""The six role actors of a rank process, and the state they share.

    rank supervisor (one_for_all, no restarts: a crashed role is a crashed rank, which
    │                the cluster supervisor restarts as a fresh process)
    ├── DataLoader      batches of (seed, epoch, step, rank), one step prefetched
    ├── GradientWorker  compute_gradients in a worker thread: the loop keeps serving
    ├── Reducer         reduce-scatter (zero2) / all-reduce (ddp, zero1) over the ring
    ├── Optimizer       this rank's shard of params and optimizer state; the all-gather
    ├── Checkpointer    in-memory snapshots, the left neighbour's replica, shard files
    └── HookAnalyzer    offers gradient samples to the analyzer process, never waits

The Trainer (pipelines.cluster.rank) drives them with local calls, one step at a time. Work
that can fail for reasons outside this rank -- a collective whose peer died, a
neighbour that is gone -- is answered with a `Failed` value instead of crashing the
actor: the Trainer then rejoins the cluster (GenServer style `{:error, reason}`).
A bug still crashes the actor, and with it the rank.
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

__all__ = [
    "COORDINATOR",
    "BackwardGate",
    "Checkpointer",
    "DataLoader",
    "Failed",
    "GradientWorker",
    "HookAnalyzer",
    "Optimizer",
    "RankState",
    "Reducer",
    "Regroup",
    "Snapshot",
]

COORDINATOR = "Coordinator@cluster"
KEEP_SNAPSHOTS = 3
REPLICA_ACK_WAIT_S = 2.0  # a neighbour slower than this to take a replica is not waited for


class Regroup(Exception):
    """This rank must rejoin the cluster (a peer failed, or the coordinator asked)."""


@dataclass(frozen=True)
class Failed:
    """A role's answer when its work failed outside this rank (see the module doc)."""

    reason: str


@actors.record
@dataclass
class Snapshot:
    """One rank's shard of the training state after `step` steps (in memory)."""

    rank: int
    step: int
    tensors: dict  # params and every optimizer state vector, this rank's [lo, hi)
    counters: dict


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
    min_generation: int = 0  # the coordinator asked for at least this generation
    generation: int = 0  # the generation this rank trains in
    timing: dict = field(default_factory=lambda: dict.fromkeys(_TIMERS, 0.0))
    timed_steps: int = 0
    overlapped_buckets: int = 0  # bucket reductions started before backward ended
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


class _Role(actors.Actor):
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
        self._ahead: dict[int, object] = {}  # step -> trio.Event-guarded result

    async def init(self) -> None:
        self._ready: dict[int, trio.Event] = {}

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
        kind, s = request
        assert kind == "batches", request
        if s in self._ready:
            await self._ready.pop(s).wait()
        batches = self._ahead.pop(s, None)
        if batches is None:
            batches = await trio.to_thread.run_sync(self._make, s)
        for stale in [k for k in self._ready if k != s + 1]:
            self._ready.pop(stale)
            self._ahead.pop(stale, None)
        if s + 1 < self.state.cfg.train.steps and s + 1 not in self._ready:
            self.nursery.start_soon(self._prefetch, s + 1)
        return batches


# ---------------------------------------------------------------------------------------
# GradientWorker
# ---------------------------------------------------------------------------------------


class GradientWorker(_Role):
    """compute_gradients of this rank's micro-batches in a worker thread (the kernels
    release the GIL), so heartbeats and messages keep flowing meanwhile."""

    def __init__(self, state: RankState):
        self.state = state

    async def handle_call(self, request, from_):
        kind, s, batches, seed, gate = request
        assert kind == "compute", request
        st = self.state
        t0 = time.perf_counter()
        ready = gate.grad_ready if gate is not None else None
        try:
            grads, loss_sum = await trio.to_thread.run_sync(
                st.step.compute, batches, seed, s, ready
            )
        finally:
            if gate is not None:
                gate.close()
        dt = time.perf_counter() - t0
        st.add_time("compute_s", dt)
        slow = st.chaos.straggler_factor
        if slow > 1:  # chaos: a straggler computes `factor` times slower
            await trio.sleep(dt * (slow - 1))
        return grads, loss_sum


# ---------------------------------------------------------------------------------------
# Reducer
# ---------------------------------------------------------------------------------------


class Reducer(_Role):
    """The gradient reduction of the configured mode over the ring (see step.RankStep)."""

    def __init__(self, state: RankState):
        self.state = state

    async def handle_call(self, request, from_):
        kind = request[0]
        st = self.state
        if kind == "buckets":  # overlapped with backward: each bucket once it is final
            _, s, grads, gate = request

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
        _, s, grads, loss_sum, done = request
        assert kind == "reduce", request

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

    ("apply", s, shard, sq_norm): clip, update the shard, all-gather the parameters.
    ("restore", how): install a snapshot or a checkpoint and rebuild the full vectors.
    """

    def __init__(self, state: RankState):
        self.state = state

    async def handle_call(self, request, from_):
        kind = request[0]
        if kind == "apply":
            return await self._apply(*request[1:])
        if kind == "restore":
            return await self._restore(request[1])
        raise ValueError(f"Optimizer: unknown request {kind!r}")

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

    async def _restore(self, how: dict):
        """how: {"source": "init"|"memory"|"disk", "snapshot": Snapshot, "path": str}."""
        st = self.state
        rs = st.step
        source = how["source"]
        if source == "init":
            rs.model.params[:] = st.initial_params
            rs.opt.load({}, {})
            return None
        if source == "disk":
            manifest, full = await trio.to_thread.run_sync(read_checkpoint, how["path"], rs.n)
            install_checkpoint(rs, manifest, full)
            return None
        snap: Snapshot = how["snapshot"]
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
    """Snapshots of this rank's shard (in memory), the left neighbour's replica, and
    shard files on disk written in a worker thread while training goes on.

    ("snapshot", s, to_disk): copy the shard; send the copy to the right neighbour's
        Checkpointer (its replica of us); when `to_disk`, write the shard file in the
        background and tell the coordinator when it is durable.
    ("held",): the steps of own snapshots and of replicas held (for the coordinator).
    ("own", s) / ("replica_of", r, s): a snapshot by step (None if not held).
    ("flush",): wait for background writes.
    Cast Snapshot from the left neighbour: keep it as the replica.
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
        kind = request[0]
        if kind == "snapshot":
            return await self._snapshot(request[1], request[2], from_)
        if kind == "held":
            return {"own": sorted(self.own), "replica": sorted(self.replicas)}
        if kind == "own":
            return self.own.get(request[1])
        if kind == "replica_of":
            snap = self.replicas.get(request[2])
            return snap if snap is not None and snap.rank == request[1] else None
        if kind == "flush":
            await self._idle.wait()
            return None
        raise ValueError(f"Checkpointer: unknown request {kind!r}")

    async def handle_cast(self, msg):
        st = self.state
        if isinstance(msg, Snapshot):
            left = (st.rank - 1) % st.world
            if msg.rank == left:
                self.replicas[msg.step] = msg
                _trim(self.replicas)
                with trio.move_on_after(1.0):
                    await actors.cast(f"Checkpointer@rank{left}", ("replica_ack", msg.step))
        elif msg[0] == "replica_ack":
            acked = self._acks.pop(msg[1], None)
            if acked is not None:
                acked.set()

    async def _snapshot(self, s: int, to_disk: bool, from_):
        st = self.state
        rs = st.step
        tensors = {k: np.array(v, copy=True) for k, v in rs.shard_tensors().items()}
        snap = Snapshot(st.rank, s, tensors, rs.opt.counters())
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
        right = (st.rank + 1) % st.world
        with trio.move_on_after(1.0):  # a dead neighbour: the cast is dropped
            await actors.cast(f"Checkpointer@rank{right}", snap)

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
        try:
            info = await trio.to_thread.run_sync(
                lambda: ckpt_mod.write_shard(
                    ckpt_mod.checkpoint_dir(st.ckpt_root, snap.step),
                    st.rank,
                    st.world,
                    rs.lo,
                    rs.hi,
                    snap.tensors,
                    rs.n,
                )
            )
            await st.chaos.after_shard_write(snap.step)
            await actors.cast(
                COORDINATOR,
                ("shard_written", st.rank, snap.step, asdict(info), snap.counters, st.generation),
            )
        finally:
            self._writes -= 1
            if self._writes == 0:
                self._idle.set()


def _trim(snaps: dict) -> None:
    for old in sorted(snaps)[:-KEEP_SNAPSHOTS]:
        del snaps[old]


# ---------------------------------------------------------------------------------------
# HookAnalyzer
# ---------------------------------------------------------------------------------------


class HookAnalyzer(_Role):
    """The rank's side of the gradient hooks: builds a sample on the steps an analyzer
    is due and offers it to the analyzer process without waiting (full: dropped)."""

    def __init__(self, state: RankState, outbox):
        self.state = state
        self.outbox = outbox

    async def init(self) -> None:
        if self.outbox is not None:
            self.nursery.start_soon(self.outbox.run)

    def due(self, step: int) -> bool:
        return self.outbox is not None and self.outbox.due(step)

    def has_credit(self) -> bool:
        return self.outbox is not None and self.outbox.has_credit()

    def decline(self, step: int) -> None:
        if self.outbox is not None:
            self.outbox.decline(step)

    async def handle_call(self, request, from_):
        kind = request[0]
        if kind == "stats":
            return self.outbox.stats() if self.outbox is not None else {}
        if kind == "flush":  # the run's end: wait (bounded) until the analyzer has it all
            if self.outbox is not None:
                await self.outbox.flush(self.state.rank, request[1])
            return None
        raise ValueError(f"HookAnalyzer: unknown request {kind!r}")

    async def handle_cast(self, msg):
        kind, step, loss, lr, view = msg
        assert kind == "sample", msg[0]
        from ..hooks.link import HookSample

        st = self.state
        rs = st.step
        lo, hi = rs.lo, rs.hi
        grad, before = view["grad"], view["params_before"]  # this rank's shard [lo, hi)
        sample = HookSample(
            step=step,
            rank=st.rank,
            world=st.world,
            loss=float(loss),
            lr=float(lr),
            lo=lo,
            hi=hi,
            batch_size=st.cfg.micro_batch * st.cfg.train.grad_accum,
            # the view's arrays are fresh copies made for this sample: their [lo:hi]
            # slices travel as they are, without a second copy
            rank_grad=np.ascontiguousarray(view["rank_grad"], dtype=np.float32),
            grad=np.asarray(grad, dtype=np.float32),
            params=np.asarray(before, dtype=np.float32),
            update=np.asarray(view["update"], dtype=np.float32),
        )
        self.outbox.offer(sample)
