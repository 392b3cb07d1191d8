"""One training step as seen by one rank: compute, reduce, clip, update, gather.

Written against a small collective interface so that the same code runs

- in one process with world size 1 (`LocalCollective`: every operation is the identity),
- in one process simulating N ranks (`InProcessGroup(N).members`, used by the tests that
  prove ddp == zero1 == zero2 == world 1), and
- in N rank processes over the ZeroMQ ring (`actors.Ring`, passed in as it is:
  pipelines.cluster.rank).

The collective interface is actors' `Ring` (so a Ring plugs in as it is): arrays are
flat, C-contiguous, and every rank calls the same operations in the same order with the
same `step`::

    rank, world
    await all_reduce(x, step=s, wire=w)      x[:] = the sum over ranks, in place
    await reduce_scatter(x, step=s, wire=w)  this rank's shard of the sum (shard_bounds);
                                   -> view   the rest of x is left with partial sums
    await all_gather(x, step=s)              on entry x[lo:hi] holds this rank's shard;
                                             on return every shard is filled in

`wire` is None (the array's dtype travels) or "bf16" (float32 sums travel as bfloat16
and add in float32: actors' module doc, "The bf16 wire"); the gradient's reduction
passes `cluster.wire_dtype` ("fp32" -> None), everything else the default.

Shard r of a length-n vector is `shard_bounds(n, world, r)` everywhere (actors'
definition). Sums follow the ring's fixed order — segment s is
x[s+1] + x[s+2] + ... + x[s] (ranks mod world), the same bits on every rank and run after
run — and `InProcessGroup` sums in exactly that order, so a simulated run gives the bits
of a real multi-process run.

The modes (DeepSpeed ZeRO stages 0/1/2)::

    ddp     all_reduce(grad); divide by world*accum; every rank updates every parameter
            with its own full optimizer state (replicated)
    zero1   all_reduce(grad); divide; each rank updates only params[lo:hi] with the m, v
            of that shard; all_gather(params)
    zero2   reduce_scatter(grad): each rank keeps only its shard of the summed gradient;
            divide; update params[lo:hi]; all_gather(params)

Global-norm clipping uses one float64 all_reduce of [shard sq-norm, loss sum, hook
credit] in every mode (ddp sums the same shard norms), so all three modes see the same
clip factor and the same reported loss. A non-finite reduced norm makes every rank skip the step.

The step is split in phases (`compute`, `reduce`, `apply`) so that the cluster's role
actors (pipelines.cluster.roles) each own one: GradientWorker runs `compute` in a worker
thread, Reducer `reduce`, Optimizer `apply`; `RankStep.step` strings them together for
the single-process runner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import trio

from actors import bf16_round, bf16_widen, shard_bounds

from .optim import ShardOptimizer, StepResult, gradutil, lr_at

__all__ = [
    "InProcessGroup",
    "LocalCollective",
    "RankStep",
    "StepStats",
    "gradient_buckets",
    "shard_bounds",
]


# ---------------------------------------------------------------------------------------
# Collectives that need no network
# ---------------------------------------------------------------------------------------


class LocalCollective:
    """World size 1: every operation leaves the array as it is."""

    rank, world = 0, 1

    async def all_reduce(self, x: np.ndarray, *, step: int, wire: str | None = None) -> np.ndarray:
        return x

    async def reduce_scatter(
        self, x: np.ndarray, *, step: int, wire: str | None = None
    ) -> np.ndarray:
        return x

    async def all_gather(self, x: np.ndarray, *, step: int) -> np.ndarray:
        return x


class InProcessGroup:
    """N collective members in one trio loop: run each rank as a task with its member.

    An operation completes when all N members have entered it. Sums follow the ring's
    order per segment (see the module doc), in the inputs' dtype, so results are the
    bits the real Ring would give. Members must call the same operations in the same
    order with the same step, as real ranks must (a mismatch raises AssertionError).
    """

    def __init__(self, world: int):
        self.world = world
        self.members = [_Member(self, r) for r in range(world)]
        self._pending: dict[int, dict] = {}

    async def _exchange(self, seq: int, rank: int, key: tuple, value: np.ndarray):
        slot = self._pending.setdefault(
            seq, {"values": {}, "done": trio.Event(), "key": key, "left": self.world}
        )
        assert slot["key"] == key, f"rank {rank} called {key}, another rank {slot['key']}"
        slot["values"][rank] = value
        if len(slot["values"]) == self.world:
            slot["done"].set()
        await slot["done"].wait()
        values = [slot["values"][r] for r in range(self.world)]
        slot["left"] -= 1
        if slot["left"] == 0:
            del self._pending[seq]
        return values

    def ring_sum(self, values: list[np.ndarray], wire: str | None = None) -> np.ndarray:
        """The sum the Ring computes: segment s folded from rank s+1 around to rank s;
        on the bf16 wire each partial sum, and the finished one, rounded to bfloat16
        (nothing crosses a wire in a world of one)."""
        world = self.world
        bf16 = wire == "bf16" and world > 1
        total = np.empty_like(values[0])
        for seg in range(world):
            lo, hi = shard_bounds(total.size, world, seg)
            acc = values[(seg + 1) % world][lo:hi].copy()
            for j in range(2, world + 1):
                if bf16:
                    acc = bf16_widen(bf16_round(acc))
                acc += values[(seg + j) % world][lo:hi]
            total[lo:hi] = bf16_widen(bf16_round(acc)) if bf16 else acc
        return total


class _Member:
    def __init__(self, group: InProcessGroup, rank: int):
        self.group, self.rank, self.world = group, rank, group.world
        self._seq = 0

    async def _swap(self, op: str, step: int, x: np.ndarray, wire: str | None = None):
        self._seq += 1
        key = (op, step, x.size, x.dtype.str, wire)
        return await self.group._exchange(self._seq, self.rank, key, x.copy())

    async def all_reduce(self, x, *, step, wire=None):
        x[:] = self.group.ring_sum(await self._swap("all_reduce", step, x, wire), wire)
        return x

    async def reduce_scatter(self, x, *, step, wire=None):
        lo, hi = shard_bounds(x.size, self.world, self.rank)
        summed = self.group.ring_sum(await self._swap("reduce_scatter", step, x, wire), wire)
        x[lo:hi] = summed[lo:hi]
        return x[lo:hi]

    async def all_gather(self, x, *, step):
        for r, other in enumerate(await self._swap("all_gather", step, x)):
            lo, hi = shard_bounds(x.size, self.world, r)
            x[lo:hi] = other[lo:hi]
        return x


def gradient_buckets(layout, n: int, bucket_elems: int) -> list[tuple[int, int]]:
    """Fixed buckets of a length-n flat gradient, in backward's order (last first):
    contiguous [lo, hi) ranges cut at trainable parameters' starts, each at least
    `bucket_elems` long except possibly the first parameters' remainder."""
    starts = sorted({slot.offset for slot in layout if slot.trainable and slot.offset < n})
    cuts = [n]
    for offset in reversed(starts):
        if cuts[-1] - offset >= bucket_elems:
            cuts.append(offset)
    if cuts[-1] != 0:
        cuts.append(0)
    return [(cuts[i + 1], cuts[i]) for i in range(len(cuts) - 1)]


# ---------------------------------------------------------------------------------------
# The rank's step
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepStats:
    step: int  # 0-based global optimizer step just taken
    loss: float  # mean loss over the global batch (all ranks, all micro-steps)
    lr: float
    grad_norm: float  # global L2 norm of the averaged gradient, before clipping
    applied: bool  # False: skipped for a non-finite gradient
    clip_coef: float


class RankStep:
    """The per-rank state of data-parallel training: model replica, shard, optimizer.

    `model` is a pipelines.model model (flat `params`, `compute_gradients`); `cfg` the
    resolved Config; `coll` a collective member (see the module doc).
    """

    def __init__(self, model, cfg, coll, *, transforms=None, keep_for_hooks: bool = False):
        self.model, self.cfg, self.coll = model, cfg, coll
        # transforms: a pipelines.hooks.TransformRunner for this rank (or None). They edit
        # the rank's own gradient before the reduction; their records land in
        # `transform_records` for the caller to log.
        self.transforms = transforms
        self.transform_records: list[dict] = []
        # keep_for_hooks: keep copies of what analyzers see (the averaged gradient before
        # clipping, this rank's own gradient, the parameters before the update); the
        # caller sets it for the steps an analyzer is due.
        self.keep_for_hooks = keep_for_hooks
        self.hook_view: dict[str, np.ndarray] = {}
        # hook_credit: whether this rank's analyzer link could take a sample now; it
        # rides in the step's small all-reduce, and `hooks_agreed` says whether every
        # rank could (then all sample the next due step). Never part of the arithmetic.
        self.hook_credit = False
        self.hooks_agreed = False
        self.mode = cfg.cluster.mode
        # how the gradient travels between ranks (the only reduction that may be rounded)
        self.wire = None if cfg.cluster.wire_dtype == "fp32" else cfg.cluster.wire_dtype
        self.rank, self.world = coll.rank, coll.world
        n = model.params.size
        self.n = n
        self.lo, self.hi = shard_bounds(n, coll.world, coll.rank)
        # ddp keeps the full optimizer state on every rank; zero1/zero2 only the shard's.
        full = self.mode == "ddp"
        self.opt = ShardOptimizer(cfg.optimizer, n if full else self.hi - self.lo)
        self.accum = cfg.train.grad_accum
        self._acc = np.zeros(n, dtype=np.float32) if self.accum > 1 else None
        bucket_mb = cfg.cluster.bucket_mb
        self.buckets = (
            gradient_buckets(model.layout, n, int(bucket_mb * (1 << 20)) // 4)
            if bucket_mb > 0 and self.mode != "zero2" and self.world > 1
            else []
        )

    # -- memory accounting (summary.json) ----------------------------------------------

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds for optimizer state and gradients, by kind."""
        full = self.n * 4
        reduced = full if self.mode in ("ddp", "zero1") else (self.hi - self.lo) * 4
        return {
            "optimizer_state_bytes": self.opt.state_bytes,
            "reduced_grad_bytes": reduced,  # the gradient kept after the reduction
            "compute_grad_bytes": full + (self._acc.nbytes if self._acc is not None else 0),
            "param_bytes": full,
        }

    # -- phases ------------------------------------------------------------------------

    def compute(
        self, batches: list[dict], seed: int = 0, step: int = 0, grad_ready=None
    ) -> tuple[np.ndarray, float]:
        """Sum of the micro-batch gradients (a flat buffer) and of their losses, after
        this rank's gradient transforms.

        Synchronous and CPU-bound: the cluster's GradientWorker runs it in a worker
        thread. `grad_ready`
        (only with one micro-batch and no transforms: see `can_overlap`) is passed to
        the model's backward, which reports each range of the gradient as it is final.
        """
        loss_sum = 0.0
        grads = None
        for k, batch in enumerate(batches):
            ready = grad_ready if k == len(batches) - 1 else None
            loss, grads = self.model.compute_gradients(batch, seed=seed + k, grad_ready=ready)
            loss_sum += float(loss)
            if self._acc is not None:
                if k == 0:
                    self._acc[:] = grads
                else:
                    gradutil.accumulate(self._acc, grads, 1.0)
        flat = self._acc if self._acc is not None else grads
        # Hooks number steps like metrics.jsonl: 1-based, the count of steps done after it.
        if self.transforms and any(h.due(step + 1) for h in self.transforms.hooks):
            # a transform sees the gradient of this rank's mean loss: with accumulation,
            # scale the sum down and back up around it
            if self.accum != 1:
                gradutil.scale(flat, 1.0 / self.accum)
            self.transform_records = self.transforms.apply(
                step + 1,
                flat,
                params_flat=self.model.params,
                batch_size=len(next(iter(batches[0].values()))) * self.accum,
                loss=loss_sum / self.accum,
            )
            if self.accum != 1:
                gradutil.scale(flat, float(self.accum))
        else:
            self.transform_records = []
        if self.keep_for_hooks:
            self.hook_view["rank_grad"] = flat / self.accum
        return flat, loss_sum

    def can_overlap(self) -> bool:
        """Whether bucket reductions may start while backward runs: buckets configured,
        one micro-batch (an accumulated gradient is final only at the end), and no
        transforms (they edit the whole gradient after backward)."""
        return bool(self.buckets) and self.accum == 1 and not self.transforms

    async def reduce_bucket(self, grads: np.ndarray, index: int, step: int) -> None:
        """All-reduce bucket `index` of `grads` in place (ddp, zero1 with buckets)."""
        lo, hi = self.buckets[index]
        await self.coll.all_reduce(grads[lo:hi], step=step, wire=self.wire)

    async def reduce(self, grads: np.ndarray, loss_sum: float, step: int, buckets_done: int = 0):
        """Reduce `grads` per the mode; return (this rank's averaged shard, sq-norm, loss).

        ddp returns the whole averaged gradient as the "shard" it updates. With buckets
        the gradient is all-reduced bucket by bucket (the first `buckets_done` already
        were, overlapped with backward); the bits depend on the buckets, never on the
        timing.
        """
        denom = self.world * self.accum
        if self.mode == "zero2":
            shard = await self.coll.reduce_scatter(grads, step=step, wire=self.wire)
        else:
            if self.buckets:
                for index in range(buckets_done, len(self.buckets)):
                    await self.reduce_bucket(grads, index, step)
            else:
                await self.coll.all_reduce(grads, step=step, wire=self.wire)
            shard = grads if self.mode == "ddp" else grads[self.lo : self.hi]
        if denom != 1:
            gradutil.scale(shard, 1.0 / denom)
        own = shard if self.mode != "ddp" else shard[self.lo : self.hi]
        credit = 1.0 if self.hook_credit else 0.0
        totals = np.array([gradutil.sq_norm(own), loss_sum, credit], dtype=np.float64)
        await self.coll.all_reduce(totals, step=step)
        self.hooks_agreed = totals[2] == self.world
        return shard, float(totals[0]), float(totals[1]) / denom

    def apply(self, shard: np.ndarray, total_sq_norm: float, step: int) -> tuple[float, StepResult]:
        """Clip and update this rank's parameters; return (lr, result)."""
        lr = lr_at(self.cfg.schedule, self.cfg.optimizer.lr, step, self.cfg.total_steps)
        params = self.model.params
        target = params if self.mode == "ddp" else params[self.lo : self.hi]
        result = self.opt.update(
            target, shard, lr=lr, total_sq_norm=total_sq_norm, clip_norm=self.cfg.train.clip_norm
        )
        return lr, result

    async def gather(self, result: StepResult, step: int) -> None:
        if self.mode != "ddp" and result.applied:
            await self.coll.all_gather(self.model.params, step=step)

    async def step(
        self, step: int, batches: list[dict], *, seed: int = 0, run_sync: Callable | None = None
    ) -> StepStats:
        """All phases of global step `step` on this rank's micro-batches.

        `run_sync(fn, *args)` runs the compute phase (e.g. trio.to_thread.run_sync);
        None runs it inline.
        """
        if run_sync is None:
            grads, loss_sum = self.compute(batches, seed, step)
        else:
            grads, loss_sum = await run_sync(self.compute, batches, seed, step)
        shard, sq, loss = await self.reduce(grads, loss_sum, step)
        if self.keep_for_hooks:
            self.hook_view["grad"] = shard.copy()
            self.hook_view["params_before"] = self.model.params.copy()
        lr, result = self.apply(shard, sq, step)
        await self.gather(result, step)
        return StepStats(step, loss, lr, result.grad_norm, result.applied, result.clip_coef)

    # -- checkpoint support ------------------------------------------------------------

    def shard_tensors(self) -> dict[str, np.ndarray]:
        """This rank's slice [lo:hi) of params and of every optimizer state vector."""
        lo, hi = self.lo, self.hi
        out = {"params": self.model.params[lo:hi]}
        for key, buf in self.opt.state.items():
            out[key] = buf[lo:hi] if self.mode == "ddp" else buf
        return out

    def load_full(
        self, params: np.ndarray, state: dict[str, np.ndarray], counters: dict[str, int]
    ) -> None:
        """Install full-length vectors (as assembled from a checkpoint of any world size)."""
        self.model.params[:] = params
        if self.mode == "ddp":
            self.opt.load(state, counters)
        else:
            self.opt.load({k: v[self.lo : self.hi] for k, v in state.items()}, counters)
