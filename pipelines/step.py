"""One training step as seen by one rank: compute, reduce, clip, update, gather.

Written against a small collective interface so that the same code runs

- in one process with world size 1 (`LocalCollective`: every operation is the identity),
- in one process simulating N ranks (`InProcessGroup(N).members`, used by the tests that
  prove ddp == zero1 == zero2 == world 1), and
- in N rank processes over the ZeroMQ ring (phase 2: an adapter over actors' Ring).

The collective interface (all methods async, arrays 1-D and C-contiguous)::

    rank, world                     this member's rank and the group size
    bounds(n, rank) -> (lo, hi)     the shard of a length-n flat vector owned by `rank`
    await all_reduce(x)             x[:] = sum over ranks of x, same bits on every rank
    await reduce_scatter(x) -> s    s = (sum over ranks of x)[lo:hi] for this rank
    await all_gather(shard, out)    out[lo_r:hi_r] = rank r's shard, for every r

Sums run in rank order (fixed), so results are bitwise reproducible run after run.

The modes (DeepSpeed ZeRO stages 0/1/2)::

    ddp     all_reduce(grad); divide by world*accum; every rank updates every parameter
            with its own full optimizer state (replicated)
    zero1   all_reduce(grad); divide; each rank updates only params[lo:hi] with the m, v
            of that shard; all_gather(params)
    zero2   reduce_scatter(grad): each rank keeps only its shard of the summed gradient;
            divide; update params[lo:hi]; all_gather(params)

Global-norm clipping uses one float64 all_reduce of [shard sq-norm, loss sum] in every
mode (ddp sums the same shard norms), so all three modes see the same clip factor and
the same reported loss. A non-finite reduced norm makes every rank skip the step.

The step is split in phases (`compute`, `reduce`, `apply`) so phase 2's role actors can
each own one: GradientWorker runs `compute` in a worker thread, Reducer `reduce`,
Optimizer `apply`; `RankStep.step` strings them together for the single-process runner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import trio

from .optim import ShardOptimizer, StepResult, gradutil, lr_at

__all__ = [
    "InProcessGroup",
    "LocalCollective",
    "RankStep",
    "StepStats",
    "shard_bounds",
]


def _fallback_shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous shards; the first n % world ranks hold one element more."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


try:  # one definition of the sharding for the ring and the optimizer
    from actors._collectives import shard_bounds as _ring_shard_bounds
except ImportError:  # the runtime's collectives are not there yet
    _ring_shard_bounds = None


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous shard of a length-n flat vector."""
    if _ring_shard_bounds is not None:
        return tuple(_ring_shard_bounds(n, world, rank))
    return _fallback_shard_bounds(n, world, rank)


# ---------------------------------------------------------------------------------------
# Collectives that need no network
# ---------------------------------------------------------------------------------------


class LocalCollective:
    """World size 1: all_reduce and reduce_scatter are the identity, all_gather a copy."""

    rank, world = 0, 1

    def bounds(self, n: int, rank: int = 0) -> tuple[int, int]:
        return 0, n

    async def all_reduce(self, x: np.ndarray) -> np.ndarray:
        return x

    async def reduce_scatter(self, x: np.ndarray) -> np.ndarray:
        return x

    async def all_gather(self, shard: np.ndarray, out: np.ndarray) -> None:
        if not np.shares_memory(shard, out):
            out[:] = shard


class InProcessGroup:
    """N collective members in one trio loop: each rank runs as a task with its member.

    An operation completes when all N members have entered it; the sum is taken in rank
    order, in the dtype of the inputs (the ring sums in the same order and dtype).
    Members must call the same operations in the same order (as real ranks must).
    """

    def __init__(self, world: int):
        self.world = world
        self.members = [_Member(self, r) for r in range(world)]
        self._pending: dict[int, dict] = {}

    async def _exchange(self, seq: int, rank: int, value):
        slot = self._pending.setdefault(seq, {"values": {}, "done": trio.Event()})
        slot["values"][rank] = value
        if len(slot["values"]) == self.world:
            slot["done"].set()
        await slot["done"].wait()
        values = [slot["values"][r] for r in range(self.world)]
        slot.setdefault("left", self.world)
        slot["left"] -= 1
        if slot["left"] == 0:
            del self._pending[seq]
        return values


class _Member:
    def __init__(self, group: InProcessGroup, rank: int):
        self.group, self.rank, self.world = group, rank, group.world
        self._seq = 0

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        return shard_bounds(n, self.world, self.rank if rank is None else rank)

    async def _swap(self, value):
        self._seq += 1
        return await self.group._exchange(self._seq, self.rank, value)

    @staticmethod
    def _sum(values):
        total = values[0].copy()
        for v in values[1:]:
            total += v
        return total

    async def all_reduce(self, x):
        x[:] = self._sum(await self._swap(x.copy()))
        return x

    async def reduce_scatter(self, x):
        lo, hi = self.bounds(x.size)
        return self._sum([v[lo:hi] for v in await self._swap(x.copy())])

    async def all_gather(self, shard, out):
        for r, piece in enumerate(await self._swap(shard.copy())):
            lo, hi = self.bounds(out.size, r)
            out[lo:hi] = piece


# ---------------------------------------------------------------------------------------
# The rank's step
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepStats:
    step: int           # 0-based global optimizer step just taken
    loss: float         # mean loss over the global batch (all ranks, all micro-steps)
    lr: float
    grad_norm: float    # global L2 norm of the averaged gradient, before clipping
    applied: bool       # False: skipped for a non-finite gradient
    clip_coef: float


class RankStep:
    """The per-rank state of data-parallel training: model replica, shard, optimizer.

    `model` is a pipelines.model model (flat `params`, `compute_gradients`); `cfg` the
    resolved Config; `coll` a collective member (see the module doc).
    """

    def __init__(self, model, cfg, coll):
        self.model, self.cfg, self.coll = model, cfg, coll
        self.mode = cfg.cluster.mode
        self.rank, self.world = coll.rank, coll.world
        n = model.params.size
        self.n = n
        self.lo, self.hi = coll.bounds(n, coll.rank)
        # ddp keeps the full optimizer state on every rank; zero1/zero2 only the shard's.
        full = self.mode == "ddp"
        self.opt = ShardOptimizer(cfg.optimizer, n if full else self.hi - self.lo)
        self.accum = cfg.train.grad_accum
        self._acc = np.zeros(n, dtype=np.float32) if self.accum > 1 else None

    # -- memory accounting (summary.json) ----------------------------------------------

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds for optimizer state and gradients, by kind."""
        full = self.n * 4
        reduced = full if self.mode in ("ddp", "zero1") else (self.hi - self.lo) * 4
        return {
            "optimizer_state_bytes": self.opt.state_bytes,
            "reduced_grad_bytes": reduced,      # the gradient kept after the reduction
            "compute_grad_bytes": full + (self._acc.nbytes if self._acc is not None else 0),
            "param_bytes": full,
        }

    # -- phases ------------------------------------------------------------------------

    def compute(self, batches: list[dict], seed: int = 0) -> tuple[np.ndarray, float]:
        """Sum of the micro-batch gradients (a flat buffer) and of their losses.

        Synchronous and CPU-bound: phase 2 runs it in a worker thread.
        """
        loss_sum = 0.0
        grads = None
        for k, batch in enumerate(batches):
            loss, grads = self.model.compute_gradients(batch, seed=seed + k)
            loss_sum += float(loss)
            if self._acc is not None:
                if k == 0:
                    self._acc[:] = grads
                else:
                    gradutil.accumulate(self._acc, grads, 1.0)
        return (self._acc if self._acc is not None else grads), loss_sum

    async def reduce(self, grads: np.ndarray, loss_sum: float):
        """Reduce `grads` per the mode; return (this rank's averaged shard, sq-norm, loss).

        ddp returns the whole averaged gradient as the "shard" it updates.
        """
        denom = self.world * self.accum
        if self.mode == "zero2":
            shard = await self.coll.reduce_scatter(grads)
        else:
            await self.coll.all_reduce(grads)
            shard = grads if self.mode == "ddp" else grads[self.lo : self.hi]
        if denom != 1:
            gradutil.scale(shard, 1.0 / denom)
        own = shard if self.mode != "ddp" else shard[self.lo : self.hi]
        totals = np.array([gradutil.sq_norm(own), loss_sum], dtype=np.float64)
        await self.coll.all_reduce(totals)
        return shard, float(totals[0]), float(totals[1]) / denom

    def apply(self, shard: np.ndarray, total_sq_norm: float, step: int) -> tuple[float,
                                                                                StepResult]:
        """Clip and update this rank's parameters; return (lr, result)."""
        lr = lr_at(self.cfg.schedule, self.cfg.optimizer.lr, step, self.cfg.total_steps)
        params = self.model.params
        target = params if self.mode == "ddp" else params[self.lo : self.hi]
        result = self.opt.update(target, shard, lr=lr, total_sq_norm=total_sq_norm,
                                 clip_norm=self.cfg.train.clip_norm)
        return lr, result

    async def gather(self, result: StepResult) -> None:
        if self.mode != "ddp" and result.applied:
            params = self.model.params
            await self.coll.all_gather(params[self.lo : self.hi], params)

    async def step(self, step: int, batches: list[dict], *, seed: int = 0,
                   run_sync: Callable | None = None) -> StepStats:
        """All phases of global step `step` on this rank's micro-batches.

        `run_sync(fn, *args)` runs the compute phase (e.g. trio.to_thread.run_sync);
        None runs it inline.
        """
        if run_sync is None:
            grads, loss_sum = self.compute(batches, seed)
        else:
            grads, loss_sum = await run_sync(self.compute, batches, seed)
        shard, sq, loss = await self.reduce(grads, loss_sum)
        lr, result = self.apply(shard, sq, step)
        await self.gather(result)
        return StepStats(step, loss, lr, result.grad_norm, result.applied, result.clip_coef)

    # -- checkpoint support ------------------------------------------------------------

    def shard_tensors(self) -> dict[str, np.ndarray]:
        """This rank's slice [lo:hi) of params and of every optimizer state vector."""
        lo, hi = self.lo, self.hi
        out = {"params": self.model.params[lo:hi]}
        for key, buf in self.opt.state.items():
            out[key] = buf[lo:hi] if self.mode == "ddp" else buf
        return out

    def load_full(self, params: np.ndarray, state: dict[str, np.ndarray],
                  counters: dict[str, int]) -> None:
        """Install full-length vectors (as assembled from a checkpoint of any world size)."""
        self.model.params[:] = params
        if self.mode == "ddp":
            self.opt.load(state, counters)
        else:
            self.opt.load({k: v[self.lo : self.hi] for k, v in state.items()}, counters)
