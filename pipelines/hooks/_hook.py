"""The hook record and the two decorators that make one.

A hook is plain data around a function: what kind it is, its name, how often it runs.
The decorators return a `Hook`, which is still callable as the function it wraps, so a
research script can call its own hooks in a notebook or a test.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

ANALYZER = "analyzer"
TRANSFORM = "transform"
KINDS = (ANALYZER, TRANSFORM)


class HookError(Exception):
    """A hook could not be loaded, declared, or returned something that is not metrics.

    The message is one line that names the hook (or the path it came from) and says what
    was accepted and what was received.
    """


@dataclasses.dataclass(frozen=True)
class Hook:
    """One research hook: `fn(ctx) -> dict | None`, run when `step % every == 0`.

    kind       "analyzer" (read-only, in the analyzer process, off the critical path) or
               "transform" (in the rank, edits the rank's gradient before reduction).
    name       unique within a run: the key of its records in hooks.jsonl and the prefix of
               its TensorBoard tags.
    every      sampling period in steps, >= 1.
    exact      an analyzer that must see every one of its due steps: the ranks wait for
               the analyzer before such a step instead of skipping it (training pays
               in time). False: the analyzer takes the due steps it has time for.
    timeout_s  per-call budget for an analyzer (None: the runner's default). Transforms
               have no timeout: they are part of the step's arithmetic.
    source     where it was loaded from, for error messages ("" when made in code).
    """

    fn: Callable[[Any], Any]
    kind: str
    name: str
    every: int = 1
    timeout_s: float | None = None
    source: str = ""
    exact: bool = False

    def __post_init__(self):
        if not callable(self.fn):
            raise HookError(
                f"hook {self.name!r}: expected a callable, got {type(self.fn).__name__}"
            )
        if self.kind not in KINDS:
            raise HookError(f"hook {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise HookError(f"hook name must be a non-empty str without '/', got {self.name!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise HookError(f"hook {self.name!r}: every must be an int >= 1, got {self.every!r}")
        if self.timeout_s is not None and not (
            isinstance(self.timeout_s, int | float) and self.timeout_s > 0
        ):
            raise HookError(
                f"hook {self.name!r}: timeout_s must be a number > 0 or None, "
                f"got {self.timeout_s!r}"
            )
        if not isinstance(self.exact, bool):
            raise HookError(f"hook {self.name!r}: exact must be True or False, got {self.exact!r}")
        if self.kind == TRANSFORM and self.exact:
            raise HookError(
                f"hook {self.name!r}: transforms run at every step already and take no exact"
            )
        if self.kind == TRANSFORM and self.timeout_s is not None:
            raise HookError(
                f"hook {self.name!r}: transforms run inside the step and take no timeout_s"
            )

    def due(self, step: int) -> bool:
        """True when this hook samples `step` (every k steps, starting at step 0)."""
        return step % self.every == 0

    def __call__(self, ctx):
        return self.fn(ctx)

    def replace(self, **changes) -> "Hook":
        """A copy with some fields changed (config overrides of `every`, `name`, ...)."""
        return dataclasses.replace(self, **changes)

    @property
    def __wrapped__(self):  # inspect.signature / unwrap see the plain function
        return self.fn


def _decorator(kind, fn, every, name, timeout_s, exact=False):
    def make(f):
        return Hook(
            fn=f,
            kind=kind,
            name=name or getattr(f, "__name__", ""),
            every=every,
            timeout_s=timeout_s,
            exact=exact,
        )

    # Both `@analyzer` and `@analyzer(every=10)` work.
    return make(fn) if fn is not None else make


def analyzer(
    fn=None,
    *,
    every: int = 1,
    name: str | None = None,
    timeout_s: float | None = None,
    exact: bool = False,
):
    """Declare a read-only analyzer hook: `fn(ctx) -> dict of metrics | None`.

    It runs in the analyzer process, never in a rank: the step does not wait for it, and
    its context holds read-only arrays. If it raises or outlives `timeout_s`, the error
    is logged and recorded and the hook restarted or disabled: the failure policy in the
    `pipelines.hooks` doc.

        @analyzer(every=10)
        def head_norm(ctx):
            return {"norm": float(np.linalg.norm(ctx.grads["head.weight"]))}

    By default it sees the due steps the analyzer has time for (summary.json reports
    the fraction); with `exact=True` it sees every one of them, and training waits for
    it when it is slower than the steps -- for a study that needs every sample.

    Do not use an analyzer to change training: write a `transform`.
    """
    return _decorator(ANALYZER, fn, every, name, timeout_s, exact)


def transform(fn=None, *, every: int = 1, name: str | None = None):
    """Declare a gradient transform: edits `ctx.grads` in place, before the reduction.

    It runs inside each rank on that rank's own gradient (views into its flat gradient
    buffer: write `g[...] = ...`, `g *= c`), with `ctx.rng`, a numpy Generator seeded from
    (run seed, step, rank, hook name) — use it and nothing else for randomness, so a run
    is reproducible bit for bit. It may return metrics like an analyzer.

        @transform
        def clip_each_layer(ctx):
            for g in ctx.grads.values():
                n = float(np.linalg.norm(g))
                if n > 1.0:
                    g *= 1.0 / n

    A transform that raises fails the step (it is part of the training arithmetic): keep
    transforms small, and put anything exploratory in an analyzer.
    """
    return _decorator(TRANSFORM, fn, every, name, None)
