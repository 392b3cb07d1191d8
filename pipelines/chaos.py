"""Faults injected on purpose (`zerotrain simulate --chaos SPEC`): the runtime side.

The cluster expands the SPEC (pipelines._chaos) into numbered events (`expand`); each
rank receives, whenever it joins, the events aimed at it that have not fired yet, and
fires them itself at the named point of the step with a real signal to its own pid
(SIGKILL, SIGTERM, SIGSTOP). Before a signal it tells the coordinator, which records
the fault time (and, for a stall, sends SIGCONT after the stated seconds). An event
fires once: a rank replaying steps after a recovery does not fire it again.

`delay` and `straggler` are standing conditions, not events: a delayed rank sleeps
before each of its sends into the ring, a straggler sleeps (factor - 1) times its
compute time after computing.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import trio

import actors

from ._chaos import ChaosEvent

__all__ = ["RankChaos", "expand"]

_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "stall": signal.SIGSTOP}
# how long after a phase starts its kill lands (the phase is then under way)
_PHASE_DELAY_S = {"compute": 0.002, "reduce": 0.0005, "gather": 0.0005}


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
        if ev["kind"] in _SIGNALS or ev["kind"] == "hang":
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
        self.pending = [e for e in mine if e["kind"] in _SIGNALS or e["kind"] == "hang"]
        self.delay_s = sum(e["ms"] for e in mine if e["kind"] == "delay") / 1000.0
        self.straggler_factor = max([e["factor"] for e in mine if e["kind"] == "straggler"] or [1])

    def _take(self, step: int, at: str) -> dict | None:
        for ev in self.pending:
            if ev["step"] == step and ev["at"] == at:
                self.pending.remove(ev)
                return ev
        return None

    async def _fire(self, ev: dict) -> None:
        with trio.move_on_after(2.0):
            await actors.call(self.coordinator, ("chaos_fired", ev["id"], os.getpid()), 2.0)
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
