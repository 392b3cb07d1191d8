"""The Coordinator: the control plane of a cluster run, an actor in the `zerotrain` process.

It holds what must outlive any rank: the generation, the metrics log, the early-stopping
state, the checkpoint manifests (written once every rank's shard file of a step is
durable) and the fault record of a chaos run. It monitors every rank's Trainer; a Down
(a killed, crashed or hung-and-killed rank) asks the survivors to regroup. When all N
ranks have joined it picks the newest step whose state still exists -- each shard in its
owner's snapshot or, for a replaced rank, in its right neighbour's replica; else the
newest valid checkpoint on disk; else the seed -- and answers every join with the new
generation and that step (see pipelines.cluster.rank). A rank that does not rejoin within the
collective timeout is killed, and so replaced.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

import actors

from .. import core
from ..config import Config
from ..core import RunIdentity
from ..store import checkpoint as ckpt_mod
from ..store.rundir import Progress, RunDir

__all__ = ["Coordinator"]


@dataclass
class _Fault:
    kind: str
    rank: int
    step: int  # the last completed step when it happened
    t: float  # wall time of the fault (or of its detection, for an unplanned crash)
    generation: int
    reason: str = ""
    detected_s: float | None = None
    recovered_s: float | None = None
    steps_replayed: int | None = None
    restored_from: str = ""
    resumes_at: float | None = None  # a stall: when SIGCONT is due

    def record(self) -> dict:
        return {
            "kind": self.kind,
            "rank": self.rank,
            "step": self.step,
            "reason": self.reason,
            "detection_s": self.detected_s,
            "recovery_s": self.recovered_s,
            "steps_replayed": self.steps_replayed,
            "restored_from": self.restored_from,
        }


@dataclass
class _Join:
    from_: actors.From
    pid: int
    held: dict


@dataclass
class _Outcome:
    done: trio.Event = field(default_factory=trio.Event)
    failure: str | None = None
    finished: dict = field(default_factory=dict)  # rank -> its final info


class Coordinator(actors.Actor):
    """The control plane of one run (see the module doc)."""

    mailbox_size = 256

    def __init__(
        self,
        cfg: Config,
        rundir: RunDir,
        progress: Progress,
        *,
        resume,
        events: list[dict],
        identity: RunIdentity,
    ):
        self.cfg = cfg
        self.world = cfg.cluster.ranks
        self.rundir = rundir
        self.progress = progress
        self.resume = resume  # a checkpoint dir to start from, or None
        self.events = events
        self.outcome = _Outcome()
        self.ckpt_root = rundir.checkpoints(cfg.checkpoint.dir)
        self.identity = identity  # what every manifest records of the run
        self.generation = 0
        self.target = 1  # the generation the next round of joins forms
        self.joins: dict[int, _Join] = {}
        self.pids: dict[int, int] = {}
        self.down: set[int] = set()  # ranks seen down and not joined since
        self.skips = core.SkipLimit()
        self.deadlines: set[int] = set()  # generations whose regroup is being enforced
        self.monitors: dict = {}  # MonitorRef -> rank
        self.fired: dict[int, float] = {}  # chaos event id -> wall time
        self.faults: list[_Fault] = []
        self.restarts = 0
        self.last_step = 0  # the newest step logged
        self.losses: dict[int, float] = {}
        self.last_eval: dict = {}
        self.evals: dict[int, dict] = {}
        self.decisions: dict[int, bool] = {}
        self.stop_waiters: dict[int, list] = {}
        self.stopped_early = False
        self.shards: dict[int, dict[int, tuple]] = {}
        self.finishing: dict[int, tuple] = {}
        self.early = core.early_stopping_for(cfg)
        self.t_first_step: float | None = None
        self.resumed_step = 0
        self.analyzer_stats = None

    # -- calls -------------------------------------------------------------------------

    async def handle_call(self, request, from_):
        kind = request[0]
        if kind == "join":
            _, rank, pid, held = request
            return await self._join(rank, pid, held, from_)
        if kind == "chaos_fired":
            return self._chaos_fired(request[1], request[2])
        if kind == "should_stop":
            s = request[1]
            if s in self.decisions:
                return self.decisions[s]
            self.stop_waiters.setdefault(s, []).append(from_)
            return actors.NOREPLY
        if kind == "finished":
            _, rank, info = request
            self.finishing[rank] = (from_, info)
            if len(self.finishing) == self.world:
                self._finish()
            return actors.NOREPLY
        raise ValueError(f"Coordinator: unknown request {kind!r}")

    async def _join(self, rank: int, pid: int, held: dict, from_):
        if self.pids.get(rank) not in (None, pid):
            self.progress.message(f"rank {rank} is back (pid {pid})")
        self.pids[rank] = pid
        self.finishing.pop(rank, None)
        if not any(r == rank for r in self.monitors.values()):
            self.monitors[actors.monitor(f"Trainer@rank{rank}")] = rank
        self.joins[rank] = _Join(from_, pid, held)
        self.down.discard(rank)
        if self.target == self.generation:  # a rank left a running generation: regroup
            self.target = self.generation + 1
        await self._ask_regroup()
        if len(self.joins) == self.world:
            self._form_generation()
        return actors.NOREPLY

    async def _ask_regroup(self) -> None:
        if self.generation == 0:
            return
        if self.target not in self.deadlines:
            self.deadlines.add(self.target)
            self.nursery.start_soon(self._enforce_regroup, self.target)
        for r in range(self.world):
            if r not in self.joins and r not in self.down:
                with trio.move_on_after(1.0):
                    await actors.cast(f"Trainer@rank{r}", ("regroup", self.target))

    async def _enforce_regroup(self, target: int) -> None:
        """A rank that does not rejoin within the collective timeout (stuck in compute,
        say, with its heartbeats still going) is killed, and so replaced."""
        await trio.sleep(self.cfg.cluster.collective_timeout)
        if self.generation >= target or self.outcome.done.is_set():
            return
        for r in range(self.world):
            if r not in self.joins and r not in self.down and r in self.pids:
                self.progress.message(f"rank {r} did not rejoin in time: killing it")
                try:
                    os.kill(self.pids[r], signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _form_generation(self) -> None:
        held = {r: j.held for r, j in self.joins.items()}
        source, step, path = self._restore_point(held)
        gen = self.target
        self.generation = gen
        for fault in self.faults:
            if fault.steps_replayed is None:
                fault.steps_replayed = max(fault.step - step, 0)
                fault.restored_from = source
        pending = [e for e in self.events if e["id"] not in self.fired]
        plan = {"action": "train", "generation": gen, "step": step, "source": source}
        plan["path"] = str(path) if path else None
        plan["chaos"] = pending
        if gen > 1:
            self.progress.message(
                f"generation {gen}: all {self.world} ranks joined; resuming at step {step} "
                f"from {source}"
            )
        elif step:
            self.resumed_step = step
            self.progress.message(f"resumed at step {step} from {path or source}")
        self.shards.clear()  # writes of the last generation that did not complete
        joins, self.joins = self.joins, {}
        for join in joins.values():
            join.from_.reply(plan)

    def _restore_point(self, held: dict) -> tuple[str, int, Path | None]:
        world = self.world
        steps = sorted({s for h in held.values() for s in h["own"]}, reverse=True)
        for s in steps:
            if all(
                s in held[r]["own"] or s in held[(r + 1) % world]["replica"] for r in range(world)
            ):
                return "memory", s, None
        for root in (self.ckpt_root, self.resume):
            if root is None:
                continue
            lv = ckpt_mod.latest_valid(root)
            for bad, why in lv.skipped:
                self.progress.message(f"skipping checkpoint {bad}: {why}")
            if lv.path is not None:
                return "disk", int(lv.manifest["step"]), lv.path
        return "init", 0, None

    def _chaos_fired(self, event_id: int, pid: int) -> bool:
        now = time.time()
        self.fired[event_id] = now
        ev = next(e for e in self.events if e["id"] == event_id)
        self.faults.append(
            _Fault(ev["kind"], ev["rank"], self.last_step, now, self.generation, "chaos")
        )
        if ev["kind"] == "stall":
            self.faults[-1].resumes_at = now + ev["seconds"]
        if ev["kind"] == "stall":
            self.nursery.start_soon(_resume_later, pid, ev["seconds"])
        self.progress.message(
            f"chaos: {ev['kind']} rank {ev['rank']} at step {ev['step']}"
            + (f" ({ev['at']})" if ev.get("at") not in (None, "start") else "")
        )
        return True

    # -- casts -------------------------------------------------------------------------

    async def handle_cast(self, msg):
        kind = msg[0]
        if kind == "step":
            self._log_step(msg[1])
        elif kind == "eval":
            self._eval(msg[1], msg[2])
        elif kind == "shard_written":
            self._shard_written(*msg[1:])

    def _log_step(self, record: dict) -> None:
        now = time.time()
        for fault in self.faults:
            if fault.recovered_s is not None:
                continue
            if (
                fault.detected_s is None
                and fault.resumes_at is not None
                and now >= fault.resumes_at
                and record["generation"] == fault.generation
            ):
                # a stall shorter than the heartbeat timeout: the rank went on, no restart
                fault.recovered_s, fault.steps_replayed = now - fault.t, 0
                fault.restored_from = "resumed (SIGCONT)"
            elif record["generation"] > fault.generation:
                fault.recovered_s = now - fault.t
                self.progress.message(
                    f"recovered from {fault.kind} of rank {fault.rank} in "
                    f"{fault.recovered_s:.3f}s ({fault.steps_replayed} steps replayed)"
                )
        s = record["step"]
        self.losses[s] = record["loss"]
        if s <= self.last_step:
            return  # a replayed step: same bits, logged already
        failure = self.skips.update(record["skipped"], s)
        if failure:
            self.rundir.log_step({k: v for k, v in record.items() if k not in ("t", "generation")})
            self.fail(failure)
            return
        if self.t_first_step is None:
            self.t_first_step = now
        self.last_step = s
        evaluated = record.get("eval")
        if evaluated:
            self.last_eval = evaluated
        transforms = record.pop("transforms", None)
        if transforms:
            _append_lines(self.rundir.path / "hooks.jsonl", transforms)
            record["transforms"] = len(transforms)
        record = {k: v for k, v in record.items() if k != "generation"}
        self.rundir.log_step(record)
        extra = core.eval_text(evaluated) if evaluated else ""
        self.progress.update(s, record["loss"], record["lr"], record["samples_per_s"], extra)

    def _eval(self, s: int, metrics: dict) -> None:
        self.evals[s] = metrics
        self.last_eval = metrics
        if s in self.decisions or not self.early.patience:
            return
        stop = bool(self.early.update(metrics[self.early.metric]))
        self.decisions[s] = stop
        if stop and not self.stopped_early:
            self.stopped_early = True
            self.progress.message(
                f"early stop at step {s}: {self.early.metric} did not improve for "
                f"{self.early.patience} evaluations"
            )
        for waiter in self.stop_waiters.pop(s, []):
            waiter.reply(stop)

    def _shard_written(
        self, rank: int, s: int, info: dict, counters: dict, generation: int
    ) -> None:
        if generation != self.generation:
            return  # from before a regroup: that round of writes is rewritten or abandoned
        got = self.shards.setdefault(s, {})
        got[rank] = (info, counters)
        if len(got) < self.world:
            return
        del self.shards[s]
        infos = [ckpt_mod.ShardInfo(**i) for i, _ in got.values()]
        metrics = dict(self._eval_at(s), train_loss=self.losses.get(s, math.nan))
        manifest = core.checkpoint_manifest(
            self.cfg,
            self.identity,
            s,
            world=self.world,
            counters=got[0][1],
            early_state=self.early.state(),
            metrics=metrics,
        )
        ckpt = ckpt_mod.checkpoint_dir(self.ckpt_root, s)
        try:
            ckpt_mod.write_manifest(ckpt, manifest, infos)
        except OSError as err:  # the disk, not the run: report it and train on
            self.progress.message(f"checkpoint {ckpt} not completed: {err}")
            return
        core.retain(self.cfg, self.ckpt_root)

    def _eval_at(self, s: int) -> dict:
        done = [k for k in self.evals if k <= s]
        return dict(self.evals[max(done)]) if done else {}

    # -- monitors ----------------------------------------------------------------------

    async def handle_info(self, msg):
        if not isinstance(msg, actors.Down):
            return
        rank = self.monitors.pop(msg.ref, None)
        if rank is None or self.outcome.done.is_set():
            return
        now = time.time()
        self.restarts += 1
        reason = actors.format_reason(msg.reason)
        fault = next(
            (
                f
                for f in self.faults
                if f.rank == rank and f.detected_s is None and f.reason == "chaos"
            ),
            None,
        )
        if fault is None:
            fault = _Fault("crash", rank, self.last_step, now, self.generation)
            self.faults.append(fault)
        fault.detected_s = now - fault.t
        fault.reason = reason if fault.reason != "chaos" else f"chaos: {reason}"
        self.progress.message(f"rank {rank} is down ({reason}); the others regroup")
        self.joins.pop(rank, None)
        self.down.add(rank)
        for waiter, _ in list(self.finishing.values()):
            waiter.reply("regroup")
        self.finishing.clear()
        if self.target == self.generation:
            self.target = self.generation + 1
        await self._ask_regroup()

    # -- the end -----------------------------------------------------------------------

    def _finish(self) -> None:
        for waiter, info in self.finishing.values():
            self.outcome.finished[info["rank"]] = info
            waiter.reply("exit")
        self.finishing.clear()
        self.outcome.done.set()

    def fail(self, reason: str) -> None:
        if not self.outcome.done.is_set():
            self.outcome.failure = reason
            self.outcome.done.set()


def _append_lines(path: Path, records: list[dict]) -> None:
    """Append JSON lines with one O_APPEND write: the analyzer process appends to the same
    file, and whole writes do not interleave."""
    data = "".join(json.dumps(r, allow_nan=False, separators=(",", ":")) + "\n" for r in records)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


async def _resume_later(pid: int, seconds: float) -> None:
    await trio.sleep(seconds)
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass  # killed meanwhile (a stall longer than the heartbeat timeout)
