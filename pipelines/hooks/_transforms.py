"""Transforms: hooks that run inside a rank and edit its gradient before the reduction.

They sit on the critical path and change the numbers a run produces, so the rules are
the opposite of an analyzer's:

- no isolation and no timeout: a transform is part of the step's arithmetic. One that
  raises fails the step with TransformError (the rank crashes and is restarted by its
  supervisor, fails again, and the run escalates: a broken transform stops the run with
  a checkpoint instead of training on silently different gradients);
- determinism: the only randomness is `ctx.rng`, a fresh numpy Generator per (seed,
  step, rank, hook name), so a rerun — or a recovery that replays a step — draws the
  same numbers. Keying by hook name keeps a transform's stream unchanged when another
  transform is added before it.
- transforms run in the order they were loaded, each seeing the previous one's output.
"""

import math
import zlib

import numpy as np

from ._context import HookContext, flat_views, normalise_layout
from ._hook import TRANSFORM, Hook, HookError
from ._metrics import make_record, validate_metrics

# A fixed word that separates this purpose's streams from every other SeedSequence
# spawned from the run seed (data order, dropout, init).
_PURPOSE = zlib.crc32(b"zerotrain.hooks.transform")


class TransformError(HookError):
    """A transform raised or returned something that is not metrics; the step fails."""


def transform_rng(seed: int, step: int, rank: int, name: str = "") -> np.random.Generator:
    """The Generator a transform named `name` gets at (`seed`, `step`, `rank`).

    A pure function of its arguments: call it twice, get two generators that draw the
    same numbers.
    """
    key = (_PURPOSE, int(step), int(rank), zlib.crc32(name.encode()))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=key)))


class TransformRunner:
    """Applies a rank's transforms to its flat gradient, in place, step by step.

    The GradientWorker (or Reducer, before the first bucket goes out) calls `apply` once
    per step; it returns the step's records for the analyzer to log.
    """

    def __init__(self, hooks, *, layout, seed: int, rank: int, world_size: int = 1):
        self.hooks = [h for h in hooks if h.kind == TRANSFORM]
        others = [h.name for h in hooks if h.kind != TRANSFORM]
        if others:
            raise HookError(f"TransformRunner takes transforms only, got analyzers {others}")
        self.layout = normalise_layout(layout)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)

    def __bool__(self):
        return bool(self.hooks)

    def apply(
        self, step, grad_flat, *, params_flat=None, batch_size=None, loss=math.nan, lr=math.nan
    ):
        """Run the transforms due at `step` on `grad_flat` (edited in place); their records.

        `loss` is this rank's own micro-batch loss (the global one is not known yet).
        """
        due = [h for h in self.hooks if h.due(step)]
        if not due:
            return []
        grads = flat_views(grad_flat, self.layout, readonly=False)
        params = None if params_flat is None else flat_views(params_flat, self.layout)
        records = []
        for hook in due:
            ctx = HookContext(
                step=int(step),
                loss=float(loss),
                lr=float(lr),
                grads=grads,
                rank_grads={self.rank: grads},
                params=params or {},
                names=tuple(grads),
                batch_size=batch_size,
                world_size=self.world_size,
                rank=self.rank,
                rng=transform_rng(self.seed, step, self.rank, hook.name),
            )
            metrics = self._call(hook, ctx)
            if metrics:
                records.append(make_record(step, hook, metrics, rank=self.rank))
        return records

    def _call(self, hook: Hook, ctx):
        try:
            return validate_metrics(hook.name, hook(ctx))
        except HookError as exc:
            raise TransformError(f"{exc} (at step {ctx.step} on rank {ctx.rank})") from exc
        except Exception as exc:
            raise TransformError(
                f"transform {hook.name!r} raised at step {ctx.step} on rank {ctx.rank}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
