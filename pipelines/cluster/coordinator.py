"""The Coordinator: the control plane of a cluster run, an actor in the `zerotrain` process.

Its own state is the run's membership and recovery: who has joined, which generation
trains, which ranks are down, who waits at the end (`Recovery` is its state machine). It
monitors every rank's Trainer; a Down (a killed, crashed or hung-and-killed rank) asks
the survivors to regroup. When all N ranks have joined it picks the newest step whose
state still exists -- each shard in its owner's snapshot or, for a replaced rank, in its
replica holder's copy (msg.replica_holder: the right neighbour on one host, the same
local rank of the next node on several); else the newest valid checkpoint on disk; else
the seed -- and answers every join with a Plan: the new generation and that step (see
pipelines.cluster.rank). A rank that does not rejoin within the collective timeout is
killed, and so replaced (another node's by its node agent). On several nodes, another
node's rank seen down starts that node's rejoin deadline: a whole node lost is waited
for (its ranks come back when the node is started again) until cluster.rejoin_timeout,
then the run fails naming the node.

Planned stops. A signal to the zerotrain process or to any rank (StopRequest) asks for a
stop: all ranks must end after the same step, write its checkpoint and exit. The ranks
run in lock-step (each step's collectives need every rank), so: the Coordinator casts
StopPrepare to every Trainer; each answers StopStep with the steps it has completed and
from then on starts at most one more before the decision. Lock-step keeps every answer
within one of the others, so with S = max + 1 every rank can reach S and none has
passed it: StopAt(S) goes to all, and each rank ends after step S through the run's
normal end (a checkpoint of S, verified by its manifest). When no generation trains
(ranks starting, or a recovery under way) the stop waits for the next one, whose Plan
says stop_at its restore step. A second signal to the same process, or
cluster.grace_seconds without an end, stops at once: every rank is SIGKILLed, and the
last good checkpoint is what remains.

Rounds. A stop is one kind of *round*: StopPrepare, StopStep from every rank, a step S
every rank can reach and none has passed. Live control uses the same round without
ending the run (its requests come from a control tool holding the run's token,
pipelines.cluster.live): `CheckpointNow` makes the ranks write a full checkpoint after S
and go on, answered once its manifest is written and the checkpoint verifies (requests
made before that are answered by the same checkpoint); `SetOverride` records a live
override from S on (or a later `at_step`), appended durably to RUN/overrides.jsonl before
any rank hears of it; `HookChange` attaches analyzers (their records in hooks.jsonl from
the step after S; the analyzer process is started for a run that had none) or detaches
one, recorded in RUN/hooks_live.jsonl, and the analyzer process has re-read that file
before any rank samples by it. A transform is refused: it edits the gradients, so the
job's bits would no longer be its config's. The decision goes to every Trainer as
Boundary(S, checkpoint, overrides, hooks); every Plan carries the overrides, the live
analyzers and the agreed checkpoints not yet written, so a rank restored from a replica
or a checkpoint replays them. A request while no
generation trains waits for the next one; rounds follow one another, never overlap.

What must also outlive any rank is kept by helpers with one job each, fed by the
Coordinator's messages: `StepLog` (metrics.jsonl, progress, the consecutive-skip limit),
`EarlyStop` (the decisions every rank asks for), `Manifests` (a checkpoint's manifest
once every rank's shard file of its step is durable; a continuous run's rank 0 is then
told, CheckpointWritten, and exports that checkpoint) and `FaultLog` (recovery.json).
"""

from __future__ import annotations

import enum
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
from ..config import Config, ConfigError, LiveConfig, check_live_override
from ..core import RunIdentity
from ..store import checkpoint as ckpt_mod
from ..store.overrides import (
    HOOKS_FILE,
    OVERRIDES_FILE,
    append_override,
    hook_windows,
    read_live_hooks,
    read_overrides,
)
from ..store.rundir import (
    Progress,
    RunDir,
    disk_error,
    last_good_checkpoint,
    stop_line,
    write_json_atomic,
)
from . import messages as msg
from . import nodes
from .messages import (
    EXIT,
    REGROUP,
    ChaosFired,
    CheckpointNow,
    DiskError,
    EvalReported,
    Held,
    HookChange,
    Join,
    Plan,
    ProtocolActor,
    RankFinished,
    RunStatus,
    SetOverride,
    ShardWritten,
    StepLogged,
    StopQuery,
    StopRequest,
    StopStep,
)

__all__ = ["Coordinator", "EarlyStop", "FaultLog", "Manifests", "Recovery", "StepLog"]


class Recovery(enum.Enum):
    """Where the run stands, as the Coordinator sees it::

        (start) --> STARTING --all N joined--> TRAINING <----------------------+
                                                  |                            |
                            a Down, or a Join (a  |        all N joined: the   |
                            rank restarted before |        generation after is |
                            its Down was seen)    v        formed at the       |
                                              REGROUPING --restore point-------+
                                                  |  ^
                          collective_timeout, and +--+ ranks not rejoined are
                          some rank has not rejoined   killed (and so replaced)

        TRAINING --every rank sent RankFinished--> DONE   (each is answered EXIT)
        any state --fail(reason)----------------> DONE   (skip limit, no restarts left)

    STARTING: generation 0; joins wait until all N ranks have joined. A Down changes
    nothing: the rank supervisor restarts the rank, which joins.
    TRAINING: generation g >= 1 trains. A rank that has finished waits in its
    RankFinished call until all N have; a Down answers the waiting ones REGROUP.
    REGROUPING: generation g + 1 is forming. The ranks not joined and not down were
    cast RegroupCalled (they abort their step and join); joins wait for all N.
    DONE: the outcome is set (finished, or failed with a reason); Downs are ignored.
    """

    STARTING = "starting"
    TRAINING = "training"
    REGROUPING = "regrouping"
    DONE = "done"


@dataclass
class _Join:
    from_: actors.From
    pid: int
    held: Held
    generation: int = 0  # the newest generation the rank trained in (0: fresh)


@dataclass
class _Outcome:
    done: trio.Event = field(default_factory=trio.Event)
    failure: str | None = None
    finished: dict = field(default_factory=dict)  # rank -> its final info
    stopped: str | None = None  # a planned stop's one line (a signal ended the run)
    master_lost: bool = False  # node K > 0: node 0 is lost and waited for (nodes.py)


class Coordinator(ProtocolActor):
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
        self.progress = progress
        self.resume = resume  # a checkpoint dir to start from, or None
        self.outcome = _Outcome()
        self.ckpt_root = rundir.checkpoints(cfg.checkpoint.dir)
        self.state = Recovery.STARTING
        self.generation = 0  # the generation training (or last trained)
        self.joins: dict[int, _Join] = {}
        self.pids: dict[int, int] = {}
        # the ranks this process started (another node's pids are not ours to signal)
        self.local_ranks: range = range(self.world)
        self.ports: list = []  # tcp ports held for the run (multi-node: nodes.local_table)
        self.replica_stride = 1  # msg.replica_holder's: R ranks per node on several nodes
        # nodes whose ranks are down and not back, each with its outage's number (the
        # run fails past cluster.rejoin_timeout: _enforce_rejoin)
        self.lost_nodes: dict[int, int] = {}
        self.outages = 0
        self.down: set[int] = set()  # ranks seen down and not joined since
        self.deadlines: set[int] = set()  # generations whose regroup is being enforced
        self.monitors: dict = {}  # MonitorRef -> rank
        self.finishing: dict[int, tuple] = {}  # rank -> (its From, its final info)
        self.resumed_step = 0
        self.analyzer_stats = None
        self.rundir = rundir
        self.at_step = 0  # the newest step of the training generation (replays included)
        # unplanned crashes: (step, reason) -> the generation they ended; and their count
        self.crashes: dict[tuple[int, str], int] = {}
        self.unplanned = 0
        # planned stops (see the module doc)
        self.stop_reason: str | None = None  # the first signal, once one came
        self.stop_signals: dict[str, int] = {}  # source -> signals it received
        self.stop_steps: dict[int, int] = {}  # rank -> steps completed, this generation
        self.stop_at: int | None = None
        self.round_open = False  # a round's StopPrepare went out, its step is not decided
        # live control (see the module doc): requests waiting for a round, and agreed
        # checkpoints waiting for their manifest (step -> callers)
        self.live = LiveConfig(cfg, read_overrides(rundir.path / OVERRIDES_FILE))
        self.want_checkpoint: list[actors.From] = []
        self.want_set: list[tuple[actors.From, SetOverride, object]] = []
        self.checkpoint_waiters: dict[int, list[actors.From]] = {}
        self.live_hooks = read_live_hooks(rundir.path)  # RUN/hooks_live.jsonl's records
        self.want_hooks: list[tuple[actors.From, list[dict]]] = []  # records, step unset
        self.own_hooks: set[str] = set()  # the analyzers the run started with (main)
        # starts the analyzer process if the run has none (main): True if it did
        self.start_analyzer = None
        self.steps = StepLog(rundir, progress)
        self.stops = EarlyStop(cfg, progress)
        self.fault_log = FaultLog(events)
        self.manifests = Manifests(cfg, self.ckpt_root, identity)

    # what the run's summary and recovery.json read
    faults = property(lambda self: self.fault_log.faults)
    restarts = property(lambda self: self.fault_log.restarts)
    losses = property(lambda self: self.steps.losses)
    t_first_step = property(lambda self: self.steps.t_first_step)
    stopped_early = property(lambda self: self.stops.stopped_early)

    # -- calls -------------------------------------------------------------------------

    async def handle_call(self, request, from_):
        match request:
            case Join(rank=rank, pid=pid, held=held) if rank < self.world:
                return await self._join(rank, pid, held, from_, request.generation)
            case ChaosFired(event_id=event_id, pid=pid) if self.fault_log.knows(event_id):
                return self._chaos_fired(event_id, pid)
            case StopQuery(step=s):
                return self.stops.query(s, from_)
            case StopRequest(source=source, signal=signame):
                return self._request_stop(source, signame)
            case RankFinished(rank=rank, info=info) if rank < self.world:
                self.finishing[rank] = (from_, info)
                if len(self.finishing) == self.world:
                    self._finish()
                return actors.NOREPLY
            case RunStatus():
                return self._status()
            case CheckpointNow():
                return self._want_checkpoint(from_)
            case SetOverride():
                return self._want_set(request, from_)
            case HookChange():
                return self._want_hook(request, from_)
        return self.reject(request)

    async def _join(self, rank: int, pid: int, held: Held, from_, generation: int = 0):
        if self.pids.get(rank) not in (None, pid):
            self.progress.message(f"rank {rank} is back (pid {pid})")
        self.pids[rank] = pid
        self.finishing.pop(rank, None)
        if not any(r == rank for r in self.monitors.values()):
            self.monitors[actors.monitor(f"Trainer@rank{rank}")] = rank
        self.joins[rank] = _Join(from_, pid, held, generation)
        self.down.discard(rank)
        k = self.node_of(rank)
        if k in self.lost_nodes and not any(r in self.down for r in self.ranks_of(k)):
            del self.lost_nodes[k]  # all its ranks are back
        if self.state is Recovery.TRAINING:  # a rank left a running generation: regroup
            self.state = Recovery.REGROUPING
        await self._ask_regroup()
        if len(self.joins) == self.world:
            self._form_generation()
        return actors.NOREPLY

    async def _ask_regroup(self) -> None:
        if self.state is not Recovery.REGROUPING:
            return
        forming = self.generation + 1
        if forming not in self.deadlines:
            self.deadlines.add(forming)
            self.nursery.start_soon(self._enforce_regroup, forming)
        for r in range(self.world):
            if r in self.joins:
                continue
            if r not in self.down:
                with trio.move_on_after(1.0):
                    await msg.ask_regroup(r, forming)
            elif r not in self.local_ranks:
                # seen down over tcp -- gone with its node, or alive behind a late ack or a
                # slow link: told too (in the background), so a live one rejoins now
                self.nursery.start_soon(self._cast_trainer, msg.ask_regroup, r, forming)

    async def _enforce_regroup(self, forming: int) -> None:
        """A rank that does not rejoin within the collective timeout (stuck in compute,
        say, with its heartbeats still going) is killed, and so replaced. Another node's
        rank is killed by its node agent, also when it was seen down (over tcp that may
        be a late ack or a slow link while it lives; a gone one is "gone" there)."""
        await trio.sleep(self.cfg.cluster.collective_timeout)
        if self.generation >= forming or self.outcome.done.is_set():
            return
        for r in range(self.world):
            if r in self.joins or r not in self.pids:
                continue
            if r not in self.local_ranks:
                self.nursery.start_soon(self._kill_remote, r, self.pids[r])
            elif r not in self.down:
                self.progress.message(f"rank {r} did not rejoin in time: killing it")
                try:
                    os.kill(self.pids[r], signal.SIGKILL)
                except ProcessLookupError:
                    pass

    async def _kill_remote(self, rank: int, pid: int) -> None:
        k = self.node_of(rank)
        if await nodes.kill_rank(k, rank, pid) == "killed":
            self.progress.message(f"rank {rank} did not rejoin in time: node {k}'s agent killed it")

    def node_of(self, rank: int) -> int:
        """The node whose agent runs `rank` (ranks are node-major: R per node)."""
        return rank // len(self.local_ranks)

    def ranks_of(self, k: int) -> range:
        per = len(self.local_ranks)
        return range(k * per, (k + 1) * per)

    async def _enforce_rejoin(self, k: int, outage: int) -> None:
        """Node k's ranks went down (its agent lost, say): the other nodes keep their
        state in memory and wait for them -- node k started again with its node rank --
        until cluster.rejoin_timeout; then the run fails (exit 3) in one line naming
        the node and the last good checkpoint."""
        timeout = self.cfg.cluster.rejoin_timeout
        await trio.sleep(timeout)
        if self.lost_nodes.get(k) != outage or self.outcome.done.is_set():
            return
        ranks = self.ranks_of(k)
        missing = ", ".join(str(r) for r in ranks if r in self.down)
        self.fail(
            f"node {k} lost: rank(s) {missing} not back within cluster.rejoin_timeout "
            f"{timeout:g}s; last good checkpoint: {last_good_checkpoint(self.ckpt_root)}"
        )

    def _form_generation(self) -> None:
        source, step, path, manifest = self._restore_point(
            {r: j.held for r, j in self.joins.items()}
        )
        # past every generation a rank reports: one Coordinator numbers them in order; a
        # Coordinator started again (node 0 lost) learns from the joins where they were
        gen = max(self.generation, *(j.generation for j in self.joins.values())) + 1
        self.generation = gen
        if self.state is not Recovery.DONE:
            self.state = Recovery.TRAINING
        self.fault_log.restored(step, source)
        if self.fault_log.faults:
            self._write_live_faults()
        self.stop_steps.clear()
        self.round_open = False
        self.stop_at = None
        if self.stop_reason is not None:  # asked while no generation trained: stop now
            self.stop_at = step
        for s in [s for s in self.checkpoint_waiters if s < step]:  # restored past it
            self.checkpoint_waiters.setdefault(step, []).extend(self.checkpoint_waiters.pop(s))
        plan = Plan(
            gen,
            step,
            source,
            str(path) if path else None,
            self.fault_log.pending(),
            self.stop_at,
            list(self.live.overrides),
            sorted(self.checkpoint_waiters),
            list(self.live_hooks),
        )
        if gen > 1:
            self.progress.message(
                f"generation {gen}: all {self.world} ranks joined; resuming at step {step} "
                f"from {source}"
            )
        elif step:
            self.resumed_step = step
            if manifest is not None:  # a --resume: early stopping counts on from there
                self.stops.early.load(manifest.get("early_stopping", {}))
            self.progress.message(f"resumed at step {step} from {path or source}")
        self.at_step = step
        self.manifests.clear()  # writes of the last generation that did not complete
        joins, self.joins = self.joins, {}
        for join in joins.values():
            join.from_.reply(plan)
        if self.want_checkpoint or self.want_set or self.want_hooks:  # asked while none trained
            self._open_round()

    def _restore_point(self, held: dict[int, Held]) -> tuple[str, int, Path | None, dict | None]:
        """Where the next generation starts: (source, step, checkpoint path, its manifest)."""
        world = self.world
        steps = sorted({s for h in held.values() for s in h.own}, reverse=True)
        holder = [msg.replica_holder(r, world, self.replica_stride) for r in range(world)]
        for s in steps:
            if all(s in held[r].own or s in held[holder[r]].replica for r in range(world)):
                return "memory", s, None, None
        for root in (self.ckpt_root, self.resume):
            if root is None:
                continue
            lv = ckpt_mod.latest_valid(root)
            for bad, why in lv.skipped:
                self.progress.message(f"skipping checkpoint {bad}: {why}")
            if lv.path is not None:
                return "disk", int(lv.manifest["step"]), lv.path, lv.manifest
        return "init", 0, None, None

    def _chaos_fired(self, event_id: int, pid: int) -> bool:
        ev = self.fault_log.fired(event_id, self.steps.last_step, self.generation)
        if ev["kind"] == "wait":  # its gate opened: no fault, nothing to say
            return True
        if ev["kind"] == "stall":  # another node's rank: its agent sends the SIGCONT
            k = None if ev["rank"] in self.local_ranks else self.node_of(ev["rank"])
            self.nursery.start_soon(_resume_later, pid, ev["seconds"], ev["rank"], k, self.progress)
        self.progress.message(
            f"chaos: {ev['kind']} rank {ev['rank']} at step {ev['step']}"
            + (f" ({ev['at']})" if ev.get("at") not in (None, "start") else "")
        )
        return True

    # -- casts -------------------------------------------------------------------------

    async def handle_cast(self, message):
        try:
            self._cast(message)
        except OSError as err:  # writing metrics, hooks or a manifest
            why = disk_error(err, self.rundir.path)
            if why is None:
                raise
            self._fail_world(why)

    def _cast(self, message) -> None:
        match message:
            case StepLogged(record=record):
                self._log_step(record)
            case EvalReported(step=s, metrics=metrics) if self.stops.accepts(metrics):
                self.steps.evaluated(s, metrics)
                self.stops.evaluated(s, metrics)
            case ShardWritten(rank=rank, generation=generation) if rank < self.world:
                if generation == self.generation:  # else from before a regroup: rewritten
                    written = self.manifests.shard_written(
                        message,
                        self.steps,
                        self.stops,
                        self.live.at(message.step),
                        asked=message.step in self.checkpoint_waiters,
                    )
                    if written is not None and self.cfg.train.steps == 0:
                        # a continuous run's rank 0 exports a checkpoint once it is
                        # complete, never before: weights/latest.safetensors is always
                        # the params of a checkpoint that has its manifest
                        self.nursery.start_soon(
                            self._cast_trainer, msg.checkpoint_written, 0, message.step, written
                        )
                    if written is not None and message.step in self.checkpoint_waiters:
                        waiters = self.checkpoint_waiters.pop(message.step)
                        ckpt = ckpt_mod.checkpoint_dir(self.ckpt_root, message.step)
                        self.nursery.start_soon(_answer_checkpoint, ckpt, waiters)
            case DiskError(rank=rank, why=why) if rank < self.world:
                self._fail_world(why)
            case StopStep(rank=rank, done=done, generation=generation) if rank < self.world:
                self._stop_step(rank, done, generation)
            case _:
                self.drop(message)

    def _log_step(self, record: dict) -> None:
        if record["generation"] == self.generation:
            self.at_step = record["step"]
        recovered = self.fault_log.step_seen(record["generation"], time.time())
        for line in recovered:
            self.progress.message(line)
        if recovered:  # their recovery times, for the daemon's /metrics
            self._write_live_faults()
        failure = self.steps.log(record)
        if failure is not None:
            self.fail(failure)

    # -- monitors ----------------------------------------------------------------------

    async def handle_info(self, message):
        if not isinstance(message, actors.Down):
            return
        rank = self.monitors.pop(message.ref, None)
        if rank is None or self.outcome.done.is_set():
            return
        reason = actors.format_reason(message.reason)
        fault = self.fault_log.down(rank, reason, self.steps.last_step, self.generation)
        self._write_live_faults()
        if fault.kind == "crash" and self._crashed_before(rank, reason):
            return
        self.progress.message(f"rank {rank} is down ({reason}); the others regroup")
        k = self.node_of(rank)
        if k != self.node_of(self.local_ranks.start) and k not in self.lost_nodes:
            # another node's rank: its agent restarts it, unless the node is lost
            self.outages += 1
            self.lost_nodes[k] = self.outages
            self.nursery.start_soon(self._enforce_rejoin, k, self.outages)
        pending = self.joins.pop(rank, None)
        if pending is not None:
            # A monitor also fires noconnection when its ack comes late (a loaded host,
            # a slow link) while the rank lives and waits in its join: answered, it
            # joins again and is watched anew; a rank really gone never reads this
            # (test_a_late_monitor_ack_while_a_rank_of_node_1_waits_to_join_does_not_hang).
            pending.from_.reply(REGROUP)
        self.down.add(rank)
        self.stop_steps.clear()  # a round under way is decided in the next generation
        self.round_open = False
        self.stop_at = None
        for waiter, _ in list(self.finishing.values()):
            waiter.reply(REGROUP)
        self.finishing.clear()
        if self.state is Recovery.TRAINING:
            self.state = Recovery.REGROUPING
        await self._ask_regroup()

    def _crashed_before(self, rank: int, reason: str) -> bool:
        """Unplanned crashes are retried from the restore point, but not forever: the
        same error at the same step twice (a restore replays into it again), or more
        than cluster.max_total_restarts of them in the whole run, end the run. Chaos
        faults are planned and not counted. Another node's rank lost over tcp
        ("noconnection": a late ack, a slow link, a lost node) is no error of the step:
        it counts against the budget only.

        The step is the newest one logged, which may be one behind the failing rank's:
        rank 0's record of the step before can arrive after the crash. So the same error
        one step apart counts as the same step."""
        key = (self.at_step, reason)
        budget = self.cfg.cluster.max_total_restarts
        self.unplanned += 1
        remote_link = reason == "noconnection" and rank not in self.local_ranks
        earlier = [
            s
            for s in (self.at_step - 1, self.at_step, self.at_step + 1)
            if self.crashes.get((s, reason), self.generation) < self.generation
        ]
        if not remote_link and earlier:
            self.fail(
                f"rank {rank} failed again at step {max(self.at_step, *earlier)} with the same "
                f"error after a restore ({reason}); last good checkpoint: "
                f"{last_good_checkpoint(self.ckpt_root)}"
            )
            return True
        if not remote_link:
            self.crashes[key] = self.generation
        if self.unplanned > budget:
            self.fail(
                f"{self.unplanned} rank crashes exceed cluster.max_total_restarts {budget} "
                f"(last: rank {rank}, {reason}); last good checkpoint: "
                f"{last_good_checkpoint(self.ckpt_root)}"
            )
            return True
        return False

    def _fail_world(self, why: str) -> None:
        """An error of the world (a full, read-only or forbidden disk): the run ends now,
        in one line naming the path, the error and the last good checkpoint."""
        self.fail(f"{why}; last good checkpoint: {last_good_checkpoint(self.ckpt_root)}")

    def _write_live_faults(self) -> None:
        """live/faults.json: recovery.json's content so far, for the daemon's /metrics
        while the run trains (recovery.json itself is written at the end)."""
        live = self.steps.rundir.path / "live"
        try:
            live.mkdir(exist_ok=True)
            faults = [f.record() for f in self.faults]
            write_json_atomic(live / "faults.json", {"faults": faults, "restarts": self.restarts})
        except OSError:
            pass  # telemetry only: the run goes on without it

    # -- the end -----------------------------------------------------------------------

    def _finish(self) -> None:
        for waiter, info in self.finishing.values():
            self.outcome.finished[info["rank"]] = info
            waiter.reply(EXIT)
        self.finishing.clear()
        step = self.outcome.finished[0]["step"]
        if self.stop_reason is not None and self.live.at(step).train.more(step):
            self.outcome.stopped = stop_line(step, self.stop_reason, self.ckpt_root, self.rundir)
        self.state = Recovery.DONE
        self._end_live()
        self.outcome.done.set()

    # -- planned stops (see the module doc) --------------------------------------------

    def _request_stop(self, source: str, signame: str) -> str:
        """A signal reached `source`: "stopping", or "exit" when the run is over (the
        asking process leaves at once)."""
        if self.outcome.done.is_set():
            return "exit"
        count = self.stop_signals[source] = self.stop_signals.get(source, 0) + 1
        if count > 1:  # the same process signalled again: no more waiting
            self._stop_now(f"a second {signame} to {source}")
            return "exit"
        if self.stop_reason is not None:
            return "stopping"  # one Ctrl-C reaches every process of the terminal's group
        self.stop_reason = f"{signame} to {source}"
        self.progress.message(
            f"{signame}: stopping after the next step every rank can reach, with a "
            "checkpoint (a second signal stops at once)"
        )
        self.nursery.start_soon(self._enforce_grace)
        self._open_round()
        return "stopping"

    def _open_round(self) -> None:
        """Ask every rank for its completed steps (StopPrepare), unless a round is open
        already (its decision covers what was asked since), a stop is decided, or no
        generation trains (the next one opens it)."""
        if self.state is not Recovery.TRAINING or self.round_open or self.stop_at is not None:
            return
        self.round_open = True
        self.stop_steps.clear()
        for r in range(self.world):
            self.nursery.start_soon(self._cast_trainer, msg.stop_prepare, r, self.generation)

    def _stop_step(self, rank: int, done: int, generation: int) -> None:
        if generation != self.generation or not self.round_open:
            return
        self.stop_steps[rank] = done
        if len(self.stop_steps) < self.world:
            return
        self.round_open = False
        agreed = max(self.stop_steps.values()) + 1
        if self.stop_reason is None:
            self._decide_live(agreed, generation)
            return
        self.stop_at = agreed
        total = self.live.at(agreed - 1).train.steps
        if total:
            self.stop_at = min(self.stop_at, total)
        done = ", ".join(str(self.stop_steps[r]) for r in range(self.world))
        self.progress.message(
            f"stopping after step {self.stop_at} (steps completed by ranks "
            f"0..{self.world - 1}: {done})"
        )
        self._refuse_live("the run is stopping (its stop writes a checkpoint)")
        for r in range(self.world):
            self.nursery.start_soon(self._cast_trainer, msg.stop_at, r, self.stop_at, generation)

    async def _cast_trainer(self, send, rank: int, *args) -> None:
        with trio.move_on_after(1.0):  # a dead rank: the next generation carries the stop
            await send(rank, *args)

    async def _enforce_grace(self) -> None:
        grace = self.cfg.cluster.grace_seconds
        await trio.sleep(grace)
        if not self.outcome.done.is_set():
            self._stop_now(f"no checkpointed stop within cluster.grace_seconds {grace:g}")

    def _stop_now(self, why: str) -> None:
        """Stop without a checkpoint of this step: every rank is SIGKILLed now (a shard
        write in flight leaves no manifest, so the last good checkpoint stays the last
        good one)."""
        for pid in (p for r, p in self.pids.items() if r in self.local_ranks):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.outcome.stopped = (
            f"stopped at once ({why}); last good checkpoint: "
            f"{last_good_checkpoint(self.ckpt_root)}; continue with --resume {self.rundir.path}"
        )
        self.state = Recovery.DONE
        self._end_live()
        self.outcome.done.set()

    # -- live control (see the module doc) ---------------------------------------------

    def _status(self) -> dict:
        return {
            "step": self.at_step,
            "generation": self.generation,
            "state": self.state.value,
            "stopping": self.stop_reason is not None,
            "overrides": list(self.live.overrides),
            # callers waiting for a checkpoint (CheckpointNow) to be agreed or written
            "checkpoint_callers": len(self.want_checkpoint)
            + sum(map(len, self.checkpoint_waiters.values())),
        }

    def _refusal(self) -> str | None:
        if self.outcome.done.is_set():
            return "the run is over"
        if self.stop_reason is not None:
            return "the run is stopping (its stop writes a checkpoint)"
        return None

    def _want_checkpoint(self, from_: actors.From):
        why = self._refusal()
        if why is not None:
            return {"error": why}
        if self.checkpoint_waiters:  # agreed, not written yet: that one answers too
            self.checkpoint_waiters[max(self.checkpoint_waiters)].append(from_)
        else:
            self.want_checkpoint.append(from_)
            self._open_round()
        return actors.NOREPLY

    def _want_set(self, request: SetOverride, from_: actors.From):
        why = self._refusal()
        if why is not None:
            return {"error": why}
        try:
            value = check_live_override(self.live.at(self.at_step), request.key, request.value)
        except ConfigError as err:
            return {"error": str(err)}
        if request.at_step is not None and request.at_step <= self.at_step:
            return {
                "error": f"--at-step {request.at_step} is past: the run has completed "
                f"{self.at_step} steps"
            }
        self.want_set.append((from_, request, value))
        self._open_round()
        return actors.NOREPLY

    def _active_hooks(self) -> set[str]:
        """The analyzers that sample now: the run's own and those attached live, less
        those detached."""
        windows = hook_windows(self.live_hooks)
        names = self.own_hooks | set(windows)
        return {n for n in names if windows.get(n, (0, math.inf))[1] == math.inf}

    def _hook_conflict(self, records: list[dict]) -> str | None:
        active = self._active_hooks()
        for rec in records:
            if rec["action"] == "attach" and rec["name"] in active:
                return f"a hook named {rec['name']!r} is attached already"
            if rec["action"] == "detach" and rec["name"] not in active:
                listing = ", ".join(sorted(active)) or "none"
                return f"no hook named {rec['name']!r} is attached (attached: {listing})"
        return None

    def _want_hook(self, request: HookChange, from_: actors.From):
        why = self._refusal()
        if why is None and self.start_analyzer is None:  # (main sets it once ranks start)
            why = "the run cannot start an analyzer yet: its ranks are not started"
        if why is not None:
            return {"error": why}
        if request.action == "detach":
            records = [
                {"action": "detach", "spec": "", "name": request.target, "every": 1,
                 "exact": False}
            ]  # fmt: skip
        else:
            records = _attach_records(request.target)
            if isinstance(records, str):
                return {"error": records}
        why = self._hook_conflict(records)
        if why is not None:
            return {"error": why}
        self.want_hooks.append((from_, records))
        self._open_round()
        return actors.NOREPLY

    def _end_live(self) -> None:
        """The run is over: whoever still waits hears so (written checkpoints answered
        already; the final one is the run's own)."""
        self._refuse_live("the run ended before the request was carried out")
        for waiters in self.checkpoint_waiters.values():
            for waiter in waiters:
                waiter.reply({"error": "the run ended before the checkpoint was written"})
        self.checkpoint_waiters.clear()

    def _refuse_live(self, why: str) -> None:
        for waiter in self.want_checkpoint:
            waiter.reply({"error": why})
        for waiter, _, _ in self.want_set:
            waiter.reply({"error": why})
        for waiter, _ in self.want_hooks:
            waiter.reply({"error": why})
        self.want_checkpoint, self.want_set, self.want_hooks = [], [], []

    def _decide_live(self, agreed: int, generation: int) -> None:
        """A round without a stop agreed on `agreed`: record the overrides that fit (the
        others are answered why not), fix the checkpoint's step, tell every rank."""
        for waiter, request, value in self.want_set:
            at = request.at_step or agreed
            total = self.live.at(at - 1).train.steps
            if at < agreed:
                why = (
                    f"--at-step {at} is too near: every rank can still honour step "
                    f"{agreed} at the earliest"
                )
            elif total and at > total:
                why = f"the run ends after step {total}, before step {at}"
            else:
                why = None
            if why is not None:
                waiter.reply({"error": why})
                continue
            record = {"step": at, "key": request.key, "value": value}
            try:
                append_override(self.rundir.path, record)
            except OSError as err:
                waiter.reply({"error": f"cannot record the override: {err}"})
                continue
            self.live.set([*self.live.overrides, record])
            self.progress.message(f"set {request.key} = {value!r} from step {at}")
            waiter.reply({**record, "file": str(self.rundir.path / OVERRIDES_FILE)})
        self.want_set = []
        checkpoint = False
        if self.want_checkpoint:
            total = self.live.at(agreed - 1).train.steps
            if total and agreed > total:
                for waiter in self.want_checkpoint:
                    waiter.reply({"error": f"the run ends after step {total} (its final one)"})
                self.want_checkpoint = []
            else:
                checkpoint = True
                self.checkpoint_waiters.setdefault(agreed, []).extend(self.want_checkpoint)
                self.want_checkpoint = []
                self.progress.message(f"checkpoint asked for: after step {agreed}")
        hooks_changed = self._decide_hooks(agreed)
        self.round_open = True  # until every rank is told: no round may start before
        self.nursery.start_soon(self._boundary, agreed, generation, checkpoint, hooks_changed)

    def _decide_hooks(self, agreed: int) -> bool:
        """Record the hook changes asked for at step `agreed`; whether any was."""
        changed = False
        for waiter, records in self.want_hooks:
            why = self._hook_conflict(records)
            if why is not None:
                waiter.reply({"error": why})
                continue
            try:
                for record in records:
                    append_override(self.rundir.path, {**record, "step": agreed}, HOOKS_FILE)
            except OSError as err:
                waiter.reply({"error": f"cannot record the hook change: {err}"})
                continue
            self.live_hooks += [{**record, "step": agreed} for record in records]
            changed = True
            names = [r["name"] for r in records]
            action = records[0]["action"]
            self.progress.message(f"hook {action} {', '.join(names)} after step {agreed}")
            waiter.reply(
                {
                    "step": agreed,
                    "action": action,
                    "names": names,
                    "file": str(self.rundir.path / "hooks.jsonl"),
                }
            )
        self.want_hooks = []
        return changed

    async def _boundary(self, agreed: int, generation: int, checkpoint: bool, hooks: bool):
        """Tell every rank the round's decision -- once the analyzer process knows of
        the hooks changed in it (started for a run that had none), so that it runs an
        attached hook from its first step (bounded by hooks.timeout_s: past that, the
        ranks go on and the analyzer catches up)."""
        if hooks:
            with trio.move_on_after(self.cfg.hooks.timeout_s + 5):
                if not await self.start_analyzer():
                    try:
                        await actors.call(
                            "HookAnalyzer@analyzer", "hooks_changed", self.cfg.hooks.timeout_s
                        )
                    except actors.ActorError as err:  # restarting: it reads the file then
                        self.progress.message(f"the analyzer did not take the hooks: {err}")
        overrides, live_hooks = list(self.live.overrides), list(self.live_hooks)
        async with trio.open_nursery() as casts:
            for r in range(self.world):
                casts.start_soon(
                    self._cast_trainer,
                    msg.boundary,
                    r,
                    agreed,
                    generation,
                    checkpoint,
                    overrides,
                    live_hooks,
                )
        # every rank has the decision ahead of a next round's StopPrepare
        if generation == self.generation and self.state is Recovery.TRAINING:
            self.round_open = False
            wanted = self.want_checkpoint or self.want_set or self.want_hooks
            if self.stop_reason is not None or wanted:  # asked while this one was told
                self._open_round()

    def fail(self, reason: str) -> None:
        if not self.outcome.done.is_set():
            self.outcome.failure = reason
            self.state = Recovery.DONE
            self._end_live()
            self.outcome.done.set()


# ---------------------------------------------------------------------------------------
# What outlives any rank, besides membership
# ---------------------------------------------------------------------------------------


class StepLog:
    """The run's metrics as rank 0 reports them: metrics.jsonl (a replayed step is
    logged once), hooks.jsonl's transform records, the progress line, the losses and
    evaluations by step, and the consecutive-skip limit."""

    def __init__(self, rundir: RunDir, progress: Progress):
        self.rundir = rundir
        self.progress = progress
        self.last_step = 0  # the newest step logged
        self.losses: dict[int, float] = {}
        self.evals: dict[int, dict] = {}
        self.skips = core.SkipLimit()
        self.t_first_step: float | None = None

    def log(self, record: dict) -> str | None:
        """Log one step's record; the failure when the skip limit is reached."""
        s = record["step"]
        self.losses[s] = record["loss"]
        if s <= self.last_step:
            return None  # a replayed step: same bits, logged already
        failure = self.skips.update(record["skipped"], s)
        if failure:
            self.rundir.log_step({k: v for k, v in record.items() if k not in ("t", "generation")})
            return failure
        if self.t_first_step is None:
            self.t_first_step = time.time()
        self.last_step = s
        evaluated = record.get("eval")
        transforms = record.pop("transforms", None)
        if transforms:
            _append_lines(self.rundir.path / "hooks.jsonl", transforms)
            record["transforms"] = len(transforms)
        record = {k: v for k, v in record.items() if k != "generation"}
        self.rundir.log_step(record)
        extra = core.eval_text(evaluated) if evaluated else ""
        self.progress.update(s, record["loss"], record["lr"], record["samples_per_s"], extra)
        return None

    def continue_log(self) -> None:
        """A Coordinator started again in its run's dir (node 0 was lost): the steps
        metrics.jsonl holds are not logged again -- the generation that replays them
        gives the same records -- and their losses are known."""
        try:
            lines = (self.rundir.path / "metrics.jsonl").read_text().splitlines()
        except OSError:
            return
        for line in lines:
            try:
                record = json.loads(line)
                s, loss = int(record["step"]), record["loss"]
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by the kill
            self.losses[s] = loss
            self.last_step = max(self.last_step, s)

    def evaluated(self, s: int, metrics: dict) -> None:
        self.evals[s] = metrics

    def eval_at(self, s: int) -> dict:
        """The newest evaluation at or before step `s` ({} if none)."""
        done = [k for k in self.evals if k <= s]
        return dict(self.evals[max(done)]) if done else {}


class EarlyStop:
    """Early stopping's decision after each evaluation, the same for every rank: a rank
    asking before rank 0's evaluation arrived waits for it."""

    def __init__(self, cfg: Config, progress: Progress):
        self.early = core.early_stopping_for(cfg)
        self.progress = progress
        self.decisions: dict[int, bool] = {}
        self.waiters: dict[int, list] = {}
        self.stopped_early = False

    def accepts(self, metrics: dict) -> bool:
        """Whether `metrics` holds what the decision needs."""
        return not self.early.patience or self.early.metric in metrics

    def query(self, s: int, from_: actors.From):
        if s in self.decisions:
            return self.decisions[s]
        self.waiters.setdefault(s, []).append(from_)
        return actors.NOREPLY

    def evaluated(self, s: int, metrics: dict) -> None:
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
        for waiter in self.waiters.pop(s, []):
            waiter.reply(stop)


class Manifests:
    """A checkpoint's manifest, written once every rank's shard file of its step is
    durable (then retention runs). A write failure is reported and training goes on,
    unless the disk is full, read-only or forbidden (raised: the Coordinator ends the
    run)."""

    def __init__(self, cfg: Config, root: Path, identity: RunIdentity):
        self.cfg = cfg
        self.world = cfg.cluster.ranks
        self.root = root
        self.identity = identity  # what every manifest records of the run
        self.shards: dict[int, dict[int, tuple]] = {}  # step -> rank -> (info, counters)

    def clear(self) -> None:
        self.shards.clear()

    def shard_written(
        self, m: ShardWritten, steps: StepLog, stops: EarlyStop, live: Config, asked: bool
    ) -> bool | None:
        """None while shards of the step are missing; then whether its manifest was
        written (False: reported, the run goes on). `live`: the config at that step (its
        live checkpoint.keep_last); `asked`: a user asked for this checkpoint (its
        manifest says so, and retention keeps it)."""
        s = m.step
        got = self.shards.setdefault(s, {})
        got[m.rank] = (m.info, m.counters)
        if len(got) < self.world:
            return None
        del self.shards[s]
        infos = [ckpt_mod.ShardInfo(**i) for i, _ in got.values()]
        metrics = dict(steps.eval_at(s), train_loss=steps.losses.get(s, math.nan))
        manifest = core.checkpoint_manifest(
            self.cfg,
            self.identity,
            s,
            world=self.world,
            counters=got[0][1],
            early_state=stops.early.state(),
            metrics=metrics,
            data_epochs=core.followed_epochs(self.cfg, steps.rundir.path),
            bounds=[(i.lo, i.hi) for i in sorted(infos, key=lambda i: i.rank)],
        )
        if asked:
            manifest["asked"] = True
        ckpt = ckpt_mod.checkpoint_dir(self.root, s)
        try:
            ckpt_mod.write_manifest(ckpt, manifest, infos)
        except OSError as err:
            if disk_error(err) is not None:  # a full or read-only disk: the run ends
                raise
            steps.progress.message(f"checkpoint {ckpt} not completed: {err}")
            return False
        core.retain(live, self.root)
        return True


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
    event: int | None = None  # the chaos event's id, for a planned fault

    def record(self) -> dict:
        record = {
            "kind": self.kind,
            "rank": self.rank,
            "step": self.step,
            "reason": self.reason,
            "detection_s": self.detected_s,
            "recovery_s": self.recovered_s,
            "steps_replayed": self.steps_replayed,
            "restored_from": self.restored_from,
        }
        if self.event is not None:
            record["event"] = self.event
        return record

    @classmethod
    def of_record(cls, record: dict) -> _Fault:
        """A fault recorded by an earlier Coordinator of the run (live/faults.json)."""
        return cls(
            str(record["kind"]),
            int(record["rank"]),
            int(record["step"]),
            time.time(),
            -1,  # an earlier Coordinator's generation: any generation now is later
            str(record.get("reason", "")),
            record.get("detection_s"),
            record.get("recovery_s"),
            record.get("steps_replayed"),
            str(record.get("restored_from", "")),
            event=record.get("event"),
        )


class FaultLog:
    """The faults of a run (recovery.json): each chaos event fired and each rank seen
    down, with when it was detected, where the run restored from and when it had
    recovered (the first step logged by a later generation)."""

    def __init__(self, events: list[dict]):
        self.events = events  # the chaos events, numbered (chaos.expand)
        self.fired_at: dict[int, float] = {}  # event id -> wall time
        self.faults: list[_Fault] = []
        self.restarts = 0

    def knows(self, event_id: int) -> bool:
        return any(e["id"] == event_id for e in self.events)

    def pending(self) -> list[dict]:
        return [e for e in self.events if e["id"] not in self.fired_at]

    def fired(self, event_id: int, last_step: int, generation: int) -> dict:
        """Record chaos event `event_id` as fired now (no longer pending); the event. A
        wait that passed is no fault."""
        now = time.time()
        self.fired_at[event_id] = now
        ev = next(e for e in self.events if e["id"] == event_id)
        if ev["kind"] == "wait":
            return ev
        fault = _Fault(ev["kind"], ev["rank"], last_step, now, generation, "chaos", event=event_id)
        if ev["kind"] == "stall":
            fault.resumes_at = now + ev["seconds"]
        self.faults.append(fault)
        return ev

    def down(self, rank: int, reason: str, last_step: int, generation: int) -> _Fault:
        """Rank `rank` was seen down: a chaos event's fault is detected, or a crash (a
        new fault, kind "crash"); the fault."""
        now = time.time()
        self.restarts += 1
        fault = next(
            (
                f
                for f in self.faults
                if f.rank == rank and f.detected_s is None and f.reason == "chaos"
            ),
            None,
        )
        if fault is None:
            fault = _Fault("crash", rank, last_step, now, generation)
            self.faults.append(fault)
        fault.detected_s = now - fault.t
        fault.reason = reason if fault.reason != "chaos" else f"chaos: {reason}"
        return fault

    def continue_from(self, path: Path, lost: range, last_step: int, generation: int) -> None:
        """A Coordinator started again (node 0 was lost): the faults and restarts its
        predecessor recorded in `path` (live/faults.json, as far as it got), its fired
        chaos events no longer pending, and the loss of node 0's ranks `lost` after
        `last_step` as faults of their own, recovered once a generation trains."""
        try:
            earlier = json.loads(path.read_text())
            records, restarts = list(earlier["faults"]), int(earlier["restarts"])
            faults = [_Fault.of_record(r) for r in records]
        except (OSError, ValueError, KeyError, TypeError):
            faults, restarts = [], 0  # killed before it wrote any, or mid-write
        now = time.time()
        for fault in faults:
            if fault.event is not None and self.knows(fault.event):
                self.fired_at[fault.event] = now
        reason = "node 0 lost (its agent and ranks); started again"
        faults += [_Fault("node_lost", r, last_step, now, generation, reason) for r in lost]
        self.faults = faults + self.faults
        self.restarts += restarts + len(lost)

    def restored(self, step: int, source: str) -> None:
        """A generation formed at `step` from `source`: what earlier faults replay."""
        for fault in self.faults:
            if fault.steps_replayed is None:
                fault.steps_replayed = max(fault.step - step, 0)
                fault.restored_from = source

    def step_seen(self, generation: int, now: float) -> list[str]:
        """A step of `generation` was logged: faults now recovered (progress lines)."""
        lines = []
        for fault in self.faults:
            if fault.recovered_s is not None:
                continue
            if (
                fault.detected_s is None
                and fault.resumes_at is not None
                and now >= fault.resumes_at
                and generation == fault.generation
            ):
                # a stall shorter than the heartbeat timeout: the rank went on, no restart
                fault.recovered_s, fault.steps_replayed = now - fault.t, 0
                fault.restored_from = "resumed (SIGCONT)"
            elif generation > fault.generation:
                fault.recovered_s = now - fault.t
                lines.append(
                    f"recovered from {fault.kind} of rank {fault.rank} in "
                    f"{fault.recovered_s:.3f}s ({fault.steps_replayed} steps replayed)"
                )
        return lines


def _append_lines(path: Path, records: list[dict]) -> None:
    """Append JSON lines with one O_APPEND write: the analyzer process appends to the same
    file, and whole writes do not interleave."""
    data = "".join(json.dumps(r, allow_nan=False, separators=(",", ":")) + "\n" for r in records)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _attach_records(spec: str) -> list[dict] | str:
    """The hooks_live records (step unset) of attaching `spec`'s analyzers, or why not."""
    from ..hooks import ANALYZER, HookError, load_hooks

    try:
        hooks = load_hooks([spec])
    except HookError as err:
        return str(err)
    except Exception as err:  # the script's own import error
        return f"hook {spec!r} does not load: {type(err).__name__}: {err}"
    transforms = [h.name for h in hooks if h.kind != ANALYZER]
    if transforms:
        return (
            f"{', '.join(transforms)}: a transform cannot be attached live -- it edits the "
            "gradients, so the job would no longer train as its config says and its "
            "params_sha256 would differ; give it at submit (--hook)"
        )
    if not hooks:
        return f"hook {spec!r} holds no analyzer"
    return [
        {"action": "attach", "spec": spec, "name": h.name, "every": h.every, "exact": h.exact}
        for h in hooks
    ]


async def _answer_checkpoint(ckpt: Path, waiters: list) -> None:
    """Answer the callers of an agreed checkpoint once it verifies (every shard's size
    and SHA-256, the shards tiling the vector)."""
    with trio.CancelScope(shield=True):  # the run may be ending: answer all the same
        try:
            manifest = await trio.to_thread.run_sync(ckpt_mod.verify_checkpoint, ckpt)
            answer = {"step": int(manifest["step"]), "manifest": str(ckpt / ckpt_mod.MANIFEST)}
        except ckpt_mod.CheckpointError as err:
            answer = {"error": f"checkpoint {ckpt} does not verify: {err}"}
        for waiter in waiters:
            waiter.reply(answer)


async def _resume_later(pid: int, seconds: float, rank: int, node: int | None, progress) -> None:
    await trio.sleep(seconds)
    if node is not None:  # "gone": killed meanwhile; None: node lost
        said = await nodes.kill_rank(node, rank, pid, "cont")
        progress.message(f"chaos: stall of rank {rank} over: node {node}'s agent says {said}")
        return
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass  # killed meanwhile (a stall longer than the heartbeat timeout)
