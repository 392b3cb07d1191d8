"""Faults injected on purpose (`zerotrain simulate --chaos SPEC`): the grammar and the runtime.

SPEC is `;`-separated events `KIND:key=value,...`:

    kill:rank=R,step=S[,at=P]        SIGKILL rank R when it reaches step S; P is where in
                                     the step: start (default), compute, reduce, gather,
                                     checkpoint (after its shard file of step S is written)
    term:rank=R,step=S[,at=P]        SIGTERM: a planned stop of the whole run (exit 4,
                                     resumable), as when scancel signals one task
    stall:rank=R,step=S,seconds=T    SIGSTOP, then SIGCONT after T seconds
    hang:rank=R,step=S               rank R's step never ends, its heartbeats go on (a
                                     stuck computation: the process looks alive)
    wait:rank=R,step=S,until=PATH    rank R's step S starts only once PATH exists (a gate
                                     a test or operator opens: e.g. give every rank one to
                                     hold the run at step S while files are added)
    delay:rank=R,ms=M                M ms added to every send of rank R
    straggler:rank=R,factor=F        rank R computes F times slower (F >= 1)
    random-kill:every=K,seed=X       SIGKILL a random rank every K steps (seeded)

The cluster expands the SPEC into numbered events (`expand`); each
rank receives, whenever it joins, the events aimed at it that have not fired yet, and
fires them itself at the named point of the step with a real signal to its own pid
(SIGKILL, SIGTERM, SIGSTOP). Before a signal it tells the coordinator, which records
the fault time (and, for a stall, sends SIGCONT after the stated seconds); a wait is
told once its gate has opened (no fault: only that it passed). An event fires once: a
rank replaying steps after a recovery, or a rank started in a dead one's place, is not
given it again.

`delay` and `straggler` are standing conditions, not events: a delayed rank sleeps
before each of its sends into the ring, a straggler sleeps (factor - 1) times its
compute time after computing.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import numpy as np
import trio

import actors

from ..config import ConfigError
from .messages import chaos_fired

__all__ = ["ChaosEvent", "RankChaos", "expand", "parse_chaos"]

_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "stall": signal.SIGSTOP}
# events that fire once, at a point of a step
_ONE_SHOT = (*_SIGNALS, "hang", "wait")
# how long after a phase starts its kill lands (the phase is then under way)
_PHASE_DELAY_S = {"compute": 0.002, "reduce": 0.0005, "gather": 0.0005}


# ---------------------------------------------------------------------------------------
# The grammar
# ---------------------------------------------------------------------------------------
# kind -> {key: type}; every key is required except those in OPTIONAL.
KINDS: dict[str, dict[str, type]] = {
    "kill": {"rank": int, "step": int},
    "term": {"rank": int, "step": int},
    "stall": {"rank": int, "step": int, "seconds": float},
    "hang": {"rank": int, "step": int},
    "wait": {"rank": int, "step": int, "until": str},
    "delay": {"rank": int, "ms": float},
    "straggler": {"rank": int, "factor": float},
    "random-kill": {"every": int, "seed": int},
}
PHASES = ("start", "compute", "reduce", "gather", "checkpoint")
OPTIONAL: dict[str, dict[str, type]] = {"kill": {"at": str}, "term": {"at": str}}


@dataclass(frozen=True)
class ChaosEvent:
    kind: str
    args: dict


def _event(text: str, ranks: int) -> ChaosEvent:
    kind, sep, rest = text.strip().partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise ConfigError(
            f"--chaos: expected an event kind of {', '.join(KINDS)}, got "
            f"{kind!r} in {text.strip()!r}"
        )
    schema = dict(KINDS[kind], **OPTIONAL.get(kind, {}))
    args = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in schema:
            raise ConfigError(
                f"--chaos {kind}: expected keys {', '.join(schema)} as key=value, got {item!r}"
            )
        try:
            args[key] = schema[key](value)
        except ValueError:
            raise ConfigError(
                f"--chaos {kind}.{key}: expected "
                f"{'an integer' if schema[key] is int else 'a number'}, got "
                f"{value!r}"
            ) from None
    missing = [k for k in KINDS[kind] if k not in args]
    if missing:
        raise ConfigError(
            f"--chaos {kind}: missing {', '.join(missing)} (expected "
            f"{kind}:" + ",".join(f"{k}=..." for k in schema) + ")"
        )
    if "rank" in args and not 0 <= args["rank"] < ranks:
        raise ConfigError(f"--chaos {kind}.rank: expected 0 <= rank < {ranks}, got {args['rank']}")
    for key in ("step", "every"):
        if key in args and args[key] < (1 if key == "every" else 0):
            raise ConfigError(f"--chaos {kind}.{key}: expected a positive integer, got {args[key]}")
    for key in ("seconds", "ms"):
        if key in args and args[key] < 0:
            raise ConfigError(f"--chaos {kind}.{key}: expected >= 0, got {args[key]}")
    if kind == "straggler" and args["factor"] < 1:
        raise ConfigError(f"--chaos straggler.factor: expected >= 1, got {args['factor']}")
    if "at" in args and args["at"] not in PHASES:
        raise ConfigError(
            f"--chaos {kind}.at: expected one of {', '.join(PHASES)}, got {args['at']!r}"
        )
    return ChaosEvent(kind, args)


def parse_chaos(spec: str, ranks: int) -> list[ChaosEvent]:
    """Events of a SPEC for a world of `ranks`; ConfigError (one line) when malformed."""
    events = [_event(part, ranks) for part in spec.split(";") if part.strip()]
    if not events:
        raise ConfigError(
            f"--chaos: expected at least one event such as kill:rank=1,step=10, got {spec!r}"
        )
    return events


# ---------------------------------------------------------------------------------------
# The runtime
# ---------------------------------------------------------------------------------------


def expand(events: list[ChaosEvent], world: int, steps: int) -> list[dict]:
    """Numbered one-shot events (dicts: id, kind, rank, step, at, seconds) and the
    standing conditions (kind delay / straggler), random-kill drawn from its seed."""
    out: list[dict] = []
    for ev in events:
        a = ev.args
        if ev.kind == "random-kill":
            rng = np.random.default_rng(a["seed"])
            for s in range(a["every"], steps, a["every"]):
                out.append({"kind": "kill", "rank": int(rng.integers(world)), "step": s})
        else:
            out.append({"kind": ev.kind, **a})
    for i, ev in enumerate(out):
        ev["id"] = i
        if ev["kind"] in _ONE_SHOT:
            ev.setdefault("at", "start")
    return out


class RankChaos:
    """The events of one rank (empty in a normal run: every method is then a no-op)."""

    def __init__(self, rank: int, coordinator: str):
        self.rank = rank
        self.coordinator = coordinator
        self.pending: list[dict] = []
        self.delay_s = 0.0
        self.straggler_factor = 1.0
        self.nursery: trio.Nursery | None = None

    def load(self, events: list[dict]) -> None:
        mine = [e for e in events if e.get("rank") == self.rank]
        self.pending = [e for e in mine if e["kind"] in _ONE_SHOT]
        self.delay_s = sum(e["ms"] for e in mine if e["kind"] == "delay") / 1000.0
        self.straggler_factor = max([e["factor"] for e in mine if e["kind"] == "straggler"] or [1])

    def _take(self, step: int, at: str) -> dict | None:
        for ev in self.pending:
            if ev["step"] == step and ev["at"] == at:
                self.pending.remove(ev)
                return ev
        return None

    async def _fire(self, ev: dict) -> None:
        if ev["kind"] == "wait":  # not a fault: the step waits, the loop runs on
            while not os.path.exists(ev["until"]):
                await trio.sleep(0.05)
            # passed: a rank that rejoins (every plan carries the pending events) must not
            # wait at this step again, whether or not the gate still exists. A report that
            # does not arrive only leaves the event pending: the step goes on either way
            with trio.move_on_after(2.0):
                try:
                    await chaos_fired(self.coordinator, ev["id"], os.getpid(), 2.0)
                except actors.ActorError:
                    pass
            return
        with trio.move_on_after(2.0):
            await chaos_fired(self.coordinator, ev["id"], os.getpid(), 2.0)
        if ev["kind"] == "hang":
            await trio.sleep_forever()  # the caller's step never ends; the loop runs on
        os.kill(os.getpid(), _SIGNALS[ev["kind"]])
        await trio.sleep(0)

    async def at(self, step: int, phase: str) -> None:
        """Called as `phase` of `step` begins: fire now (start) or a moment into it."""
        if not self.pending:
            return
        ev = self._take(step, phase)
        if ev is None:
            return
        if phase == "start":
            await self._fire(ev)
            return
        assert self.nursery is not None

        async def later() -> None:
            await trio.sleep(_PHASE_DELAY_S.get(phase, 0.0))
            await self._fire(ev)

        self.nursery.start_soon(later)

    async def before_send(self, step: int, phase: str) -> None:
        if self.delay_s:
            await trio.sleep(self.delay_s)
        await self.at(step, phase)

    async def after_shard_write(self, step: int) -> None:
        """After the shard file of `step` is durable, before the coordinator hears of it
        (so the checkpoint of that step never completes)."""
        ev = self._take(step, "checkpoint") if self.pending else None
        if ev is not None:
            await self._fire(ev)
