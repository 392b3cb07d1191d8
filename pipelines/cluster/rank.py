"""A rank process (`python -m pipelines.cluster.rank`), started by the cluster supervisor.

It opens its node as a supervised child (heartbeats to the cluster), builds its model
replica and data, opens its end of the ring, and runs the role actors
(pipelines.cluster.roles) and the Trainer under its "RoleSupervisor" (one_for_all, no
restarts: a crashed role is a crashed rank). The messages are the records of
pipelines.cluster.messages.

The Trainer's life is a loop of *join, restore, train*:

1. join: call the Coordinator with the snapshots this rank holds; the reply (once every
   rank has joined) names the generation, the step to start from and where its state
   comes from: "init" (the seed), "memory" (its own snapshot, or -- a fresh process --
   its right neighbour's replica of it -- on several nodes, the replica_holder's on the
   next node), or "disk" (a checkpoint).
2. restore: the Optimizer installs that state and all-gathers the full parameters.
3. train: steps until the end; every `snapshot_every` steps a snapshot is taken and
   replicated to the right neighbour, every `checkpoint.every` steps also written to
   disk. A failed collective, a vanished neighbour or the Coordinator's RegroupCalled
   ends the attempt: back to 1. Replayed steps give the same bits (pure data, seeded
   dropout, fixed summation order), so nothing is lost.

Exit status 0 only when the Coordinator says the run is over; any other end (SIGTERM,
a crash, the cluster gone) is non-zero, so the supervisor treats it as a failure.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import trio

import actors
from cykernels import gemm

from ..config import LiveConfig, from_resolved
from ..core import (
    STOP_SIGNALS,
    build_model_for,
    evaluate_run,
    export_checkpoint_latest,
    export_weights,
    step_seed,
)
from ..data import EPOCHS_DIR, EpochLog, load_dataset
from ..step import RankStep
from ..store import checkpoint as ckpt_mod
from ..store.rundir import (
    LOCK_FD_ENV,
    RunDirRefused,
    check_run_lock,
    disk_error,
    params_sha256,
)
from . import messages as msg
from .chaos import RankChaos
from .messages import (
    COORDINATOR,
    Boundary,
    CheckpointWritten,
    Failed,
    Plan,
    ProtocolActor,
    Regroup,
    RegroupCalled,
    RestoreState,
    StopAt,
    StopPrepare,
)
from .roles import (
    BackwardGate,
    Checkpointer,
    DataLoader,
    HookSampler,
    Optimizer,
    RankState,
    compute_gradients,
    reduce_buckets,
    reduce_gradients,
)

__all__ = ["PLAN_ENV", "RUN_ID_ENV", "Trainer", "main"]

PLAN_ENV = "ZEROTRAIN_PLAN"
RUN_ID_ENV = "ZEROTRAIN_RUN_ID"  # the run that started this rank (its plan's run_id)
log = logging.getLogger("zerotrain.rank")


def _build(plan: dict, rank: int) -> dict:
    """The heavy, synchronous part of starting (run in a worker thread)."""
    cfg = from_resolved(plan["config"])
    world = cfg.cluster.ranks
    data_cfg = dataclasses.replace(cfg.data, cache_dir=plan.get("data_cache") or cfg.data.cache_dir)
    # data.follow: each epoch's files as the run recorded them (or records them first)
    epochs = EpochLog(Path(plan["run_dir"]) / EPOCHS_DIR)
    dataset = load_dataset(data_cfg, "train", epochs=epochs)
    evalset = load_dataset(data_cfg, cfg.eval.split, epochs=epochs) if rank == 0 else None
    model = build_model_for(cfg, dataset.meta)
    return {"cfg": cfg, "world": world, "dataset": dataset, "evalset": evalset, "model": model}


def _transforms(cfg, model, rank: int, world: int, specs: list):
    if not specs:
        return None
    from pipelines.hooks import ANALYZER, TransformRunner
    from pipelines.hooks import load_hooks as _load

    hooks = [h for h in _load(list(specs)) if h.kind != ANALYZER]
    if not hooks:
        return None
    return TransformRunner(
        hooks, layout=model.layout, seed=cfg.train.seed, rank=rank, world_size=world
    )


class Trainer(ProtocolActor):
    """Drives the steps (see the module doc). A RegroupCalled cast aborts its attempt."""

    def __init__(self, state: RankState, finished: trio.Event, multi_node: bool = False):
        self.state = state
        self.finished = finished
        self.multi_node = multi_node
        self.exit_ok = False
        self.final_eval: dict | None = None
        self.hooks_agreed = True
        self.live = LiveConfig(state.cfg)  # the base config and the run's live overrides
        self._stop_plan(None)
        # a continuous run's rank 0 exports each checkpoint once the Coordinator says it
        # is complete (CheckpointWritten): the steps it wrote and has not heard of, the
        # newest complete one, the newest exported
        self.unconfirmed: set[int] = set()
        self.export_wanted = 0
        self.exported = 0
        self.export_changed = trio.Event()

    async def init(self) -> None:
        self.state.chaos.nursery = self.nursery
        self.nursery.start_soon(self._drive)
        self.nursery.start_soon(self._live_writer)
        if self._exports():
            self.nursery.start_soon(self._exporter)
        if self.multi_node:
            self.nursery.start_soon(self._watch_coordinator)

    async def _watch_coordinator(self) -> None:
        """On several nodes: node 0 lost (killed, or cut off by a partition) ends this
        rank's step -- its collectives are aborted, as by RegroupCalled, which cannot
        come across a cut link -- and the rank waits in its join (messages.join) until
        node 0 is heard from again, then joins at once, with its snapshots."""
        node = actors.current_node()
        coordinator = COORDINATOR.split("@", 1)[1]
        while True:
            await node.wait_peer(coordinator, alive=False)
            st = self.state
            log.warning("rank %d: node 0 lost: stopping the step, waiting for it", st.rank)
            st.abort_collectives(max(st.generation, st.min_generation) + 1)
            await node.wait_peer(coordinator, alive=True)

    def _exports(self) -> bool:
        # a run started continuous (a live train.steps may end it) exports as one
        return self.state.rank == 0 and self.live.base.train.steps == 0

    async def handle_cast(self, message):
        st = self.state
        match message:
            case RegroupCalled(generation=generation):
                st.abort_collectives(generation)
            case StopPrepare(generation=generation) if generation == st.generation:
                await self._prepare(generation)
            case StopPrepare(generation=generation) if generation > st.generation:
                # the round of a generation whose Plan this rank has not acted on yet
                # (the Coordinator opens it as it answers the joins): answered once this
                # rank has restored that generation's state
                self.early_prepare = generation
            case StopAt(step=step, generation=generation) if generation == st.generation:
                self.stop_at = step
                self._release()
            case Boundary(step=step, generation=generation) if generation == st.generation:
                if message.checkpoint:
                    self.checkpoints.add(step)
                self.live.set(message.overrides)
                st.live_hooks = message.hooks
                self._release()
            case StopPrepare() | StopAt() | Boundary():
                pass  # of a generation that is over
            case CheckpointWritten(step=step, written=written) if (
                self._exports() and step <= self.state.done_steps
            ):  # (a step this rank has not reached cannot be complete)
                self.unconfirmed.discard(step)
                if written and step > self.export_wanted:
                    self.export_wanted = step
                self._export_changed()
            case _:
                self.drop(message)

    def _export_changed(self) -> None:
        self.export_changed.set()
        self.export_changed = trio.Event()

    async def _exporter(self) -> None:
        """Export the newest complete checkpoint (CheckpointWritten) as
        weights/latest.safetensors, from its files: latest.safetensors is always a
        checkpoint that has its manifest. One export at a time, newest first; one that
        retention removed meanwhile is skipped (a newer one is complete)."""
        st = self.state
        run_dir = Path(st.ckpt_root).parent
        while True:
            while self.exported >= self.export_wanted:
                await self.export_changed.wait()
            s = self.export_wanted
            ckpt = ckpt_mod.checkpoint_dir(st.ckpt_root, s)
            export = export_checkpoint_latest
            try:
                await trio.to_thread.run_sync(export, run_dir, st.cfg, st.model, ckpt)
            except (OSError, ckpt_mod.CheckpointError) as err:
                if self.export_wanted == s:  # not a retired one: say so, train on
                    log.warning("rank 0: weights/latest.safetensors of step %d: %s", s, err)
            self.exported = s
            self._export_changed()

    async def _confirmed_and_exported(self, s: int) -> None:
        """Wait until the checkpoint of step `s` this rank wrote is complete and exported
        (or known never to complete); Regroup if a rank fails first."""
        st = self.state
        while s in self.unconfirmed or self.exported < self.export_wanted:
            changed = self.export_changed
            await st.wait_unless_regroup(changed)
            if not changed.is_set():
                raise Regroup("a rank failed while the stop's checkpoint was completed")

    def _stop_plan(self, stop_at: int | None, checkpoints=()) -> None:
        """A generation's round state: the agreed last step, if any yet; the agreed
        checkpoints (`zerotrain checkpoint`) not written yet."""
        self.stop_at = stop_at
        self.hold: int | None = None  # a round is open: start no step from here on
        self.released = trio.Event()  # the round's decision came
        self.checkpoints: set[int] = set(checkpoints)
        self.live_written: set[int] = set()  # agreed checkpoints written in this one
        self.done = 0  # steps completed in this generation's state

    async def _prepare(self, generation: int) -> None:
        """A round: from now on start step done + 1 at most before the decision (the
        Coordinator's module doc says why every rank can then act at one step)."""
        self.hold = self.done + 1
        self.released = trio.Event()
        await msg.stop_step(self.state.rank, self.done, generation)

    early_prepare = 0  # a round's generation, asked for before this rank was in it

    def _periodic(self, s: int) -> bool:
        """Whether the step that ended at `s` wrote a periodic checkpoint of it (the
        final one is the run's end's)."""
        cfg = self.live.at(max(s - 1, 0))
        every = cfg.checkpoint.every
        return bool(every and s % every == 0) and s != cfg.train.steps

    def _release(self) -> None:
        self.hold = None
        self.released.set()

    def _config_at(self, s: int):
        """The config of what this rank decides with `s` steps completed (live
        overrides applied); the step's own code reads it from the rank state."""
        cfg = self.live.at(s)
        if cfg is not self.state.cfg:
            self.state.cfg = cfg
            self.state.step.cfg = cfg
        return cfg

    async def _drive(self) -> None:
        st = self.state
        while True:
            st.enter("join")
            held = await msg.held_snapshots()
            newest = max(st.generation, st.min_generation)  # (a Coordinator started again)
            plan = await msg.join(st.rank, os.getpid(), held, newest)
            try:
                self._stop_plan(plan.stop_at, plan.checkpoints)
                self.done = plan.step  # what a round asked for from here on is told
                self.live.set(plan.overrides)
                st.live_hooks = plan.hooks
                await self._restore(plan)
                if self.early_prepare == plan.generation:
                    await self._prepare(plan.generation)
                if await self._train(plan):
                    break
            except Regroup as why:
                log.warning("rank %d: rejoining: %s", st.rank, str(why).splitlines()[0])
        self.exit_ok = True
        self.finished.set()

    async def _restore(self, plan: Plan) -> None:
        st = self.state
        st.chaos.load(plan.chaos)
        if plan.generation > st.ring.generation:
            st.ring.set_generation(plan.generation)
        st.min_generation = max(st.min_generation, plan.generation)
        st.generation = plan.generation
        s = plan.step
        snapshot = None
        if plan.source == "memory":
            snapshot = await msg.own_snapshot(s)
            if snapshot is None:
                right = msg.replica_holder(st.rank, st.world, st.replica_stride)
                try:
                    snapshot = await msg.replica_of(right, st.rank, s, 10.0)
                except actors.ActorError as err:
                    raise Regroup(f"replica from rank {right}: {err}") from None
                if snapshot is None:
                    raise Regroup(f"rank {right} holds no replica of step {s}")
        await msg.restore_state(RestoreState(plan.source, s, plan.path, snapshot))
        # the restored state is a snapshot too (a later failure can come back to it); on a
        # checkpoint step the shard file is written again (its first write may be torn)
        cfg = self._config_at(max(s - 1, 0))  # what the step that ended at s decided
        every = cfg.checkpoint.every
        due = bool(every and s and s % every == 0) or s in self.checkpoints
        to_disk = due and s != cfg.train.steps
        if to_disk:  # only when that checkpoint never completed
            done = ckpt_mod.checkpoint_dir(st.ckpt_root, s) / ckpt_mod.MANIFEST
            to_disk = not done.exists()
        self.unconfirmed.clear()  # a generation that is over completes none of them
        if to_disk and self._exports():
            self.unconfirmed.add(s)
        await msg.take_snapshot(s, to_disk)
        self.checkpoints.discard(s)

    async def _train(self, plan: Plan) -> bool:
        """Steps from plan.step; True when the run is complete."""
        st = self.state
        s = plan.step
        self.hooks_agreed = True  # every rank starts here with the same value
        stopped = False
        st.enter("step", s)
        while True:
            self.done = s
            if self.hold is not None and s >= self.hold:
                # a round is open: its decision may change what this step does
                released = self.released
                st.enter("stop")
                await st.wait_unless_regroup(released)
                st.enter("step")
                if not released.is_set():
                    raise Regroup("a rank failed while the ranks agreed on a step")
                continue
            cfg = self._config_at(s)
            total = cfg.train.steps
            if not cfg.train.more(s):
                break
            if self.stop_at is not None and s >= self.stop_at:
                stopped = True  # a planned stop (a signal): end here, checkpointed
                break
            if s in self.checkpoints:  # agreed in a round: written here, where every
                # rank has heard the decision (right after step s it may not have yet)
                self.checkpoints.discard(s)
                if not self._periodic(s):
                    if self._exports():  # exported once complete (_exporter)
                        self.unconfirmed.add(s)
                    await msg.take_snapshot(s, True)
                self.live_written.add(s)
            record = await self._step(s, plan.generation)
            s += 1
            st.enter("step", s)
            to_disk = self._periodic(s)
            if to_disk and self._exports():  # exported once complete (_exporter)
                self.unconfirmed.add(s)
            if to_disk or s % cfg.cluster.snapshot_every == 0:
                await msg.take_snapshot(s, to_disk)
            stop = False
            if (cfg.eval.every and s % cfg.eval.every == 0) or s == total:
                metrics = None
                if st.rank == 0:
                    st.enter("eval")
                    metrics = await trio.to_thread.run_sync(self._eval_metrics)
                    st.enter("step")
                if record is not None:
                    record["eval"] = metrics
                    self.final_eval = metrics
                    await msg.eval_reported(s, metrics)
                if cfg.eval.early_stopping.patience and s != total:
                    stop = await msg.should_stop(s)
            if record is not None:
                await msg.step_logged(record)
            if stop:
                break
        await self._finish(s, plan, stopped)
        return True

    async def _finish(self, s: int, plan: Plan, stopped: bool) -> None:
        """The end: final checkpoint and evaluation, then wait for everyone (Regroup if
        a rank fails first). A stop's step may be on disk already: written in the loop
        (a checkpoint step), restored from this run's checkpoint, or step 0 (nothing to
        keep); a stop spends no time on an evaluation or the final weights."""
        st = self.state
        st.enter("finish")
        every = self.live.at(max(s - 1, 0)).checkpoint.every  # what the last step decided
        restored = plan.source == "disk" and Path(plan.path).parent == Path(st.ckpt_root)
        written = bool(every and s % every == 0) or s in self.live_written
        on_disk = s == 0 or written or (s == plan.step and restored)
        if not (stopped and on_disk):
            if self._exports():
                self.unconfirmed.add(s)
            await msg.take_snapshot(s, True)
        await msg.flush_writes()
        if self._exports():  # the stop's checkpoint, exported before the run ends
            await self._confirmed_and_exported(s)
        info = {"rank": st.rank, "step": s, "memory": st.step.memory(), "cpus": _cpus()}
        info["blas"] = gemm.library()
        timing = {k: v / max(st.timed_steps, 1) for k, v in st.timing.items()}
        # the framework's own share: actor messages, copies, scheduling
        parts = ("data_s", "compute_s", "comm_s", "apply_s")
        timing["other_s"] = max(timing["step_s"] - sum(timing[k] for k in parts), 0.0)
        timing["overlapped_buckets"] = st.overlapped_buckets / max(st.timed_steps, 1)
        info["timing"] = timing
        info["timed_steps"] = st.timed_steps
        ring = st.ring.stats()
        info["admission"] = {  # summary.json: whether something knocked (main.py)
            "node": actors.current_node().statistics(),
            "ring_refused": ring["refused"],
            "regroups": ring["failures"],
        }
        # the casts to the analyzer may still be on the way (queued here, unread there):
        # they would be lost with this process, and the analyzer's "stats" (asked by the
        # cluster, over another connection) could answer before they arrive
        await msg.flush_hooks(st.cfg.hooks.timeout_s + 5.0)
        info["hooks"] = await msg.hook_stats()
        if st.rank == 0:
            if stopped:
                info["eval"] = self.final_eval or {}
            else:
                info["eval"] = self.final_eval or await trio.to_thread.run_sync(self._eval_metrics)
            info["params_sha256"] = params_sha256(st.model)
            info["n_params"] = int(st.model.params.size)
            info["skipped_steps"] = st.step.opt.skipped
            try:
                if not stopped:  # the final weights are a finished run's
                    await trio.to_thread.run_sync(self._export, s, info["params_sha256"])
            except OSError as err:
                why = disk_error(err, Path(st.ckpt_root).parent / "weights.safetensors")
                if why is None:
                    raise
                await msg.disk_error(st.rank, s, why)
        await msg.rank_finished(st.rank, info)

    async def _step(self, s: int, generation: int) -> dict | None:
        """One step; rank 0 returns its metrics record (the others None)."""
        st = self.state
        rs = st.step
        t0 = time.perf_counter()
        await st.chaos.at(s, "start")
        batches = await msg.fetch_batches(s)
        st.add_time("data_s", time.perf_counter() - t0)
        decision = await msg.sample_decision(s + 1, self.hooks_agreed)
        sampled = decision.sampled
        rs.keep_for_hooks = sampled
        rs.hook_credit = decision.credit
        await st.chaos.at(s, "compute")
        shard, sq, loss = await self._gradients(s, batches, overlap=not sampled)
        self.hooks_agreed = rs.hooks_agreed
        lo, hi = rs.lo, rs.hi
        if sampled:  # what the analyzer gets from this rank: its shard (and own gradient)
            own = shard[lo:hi] if shard.size == rs.n else shard
            rs.hook_view["grad"] = own.copy()
            rs.hook_view["params_before"] = rs.model.params[lo:hi].copy()
        lr, result = await msg.apply_update(s, shard, sq)
        dt = time.perf_counter() - t0
        st.add_time("step_s", dt)
        st.timed_steps += 1
        if sampled:
            view = dict(rs.hook_view)
            view["update"] = rs.model.params[lo:hi] - view["params_before"]
            await msg.send_sample(s + 1, loss, lr, view)
        if st.rank != 0:
            return None
        record = {
            "step": s + 1,
            "loss": loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "samples_per_s": st.cfg.train.batch_size / dt if dt > 0 else 0.0,
            "skipped": not result.applied,
            "clip_coef": result.clip_coef,
            "generation": generation,
            "t": time.time(),
        }
        if rs.transform_records:  # rank 0's, for hooks.jsonl (as the local runner)
            record["transforms"] = rs.transform_records
        return record

    async def _live_writer(self) -> None:
        """live/rank-R.json in the run dir, replaced whole (rename) every LIVE_SECONDS,
        for the daemon's /metrics and /readyz: this rank's pid, steps completed, what it
        is doing and since when (RankState.phase), cumulative compute seconds (work
        before the collective) and RSS; `t` is when it was written. Written by a task
        of its own, so a rank whose step hangs while its event loop runs still reports
        (the same phase since the same time), and one whose loop stops does not (an
        old `t`). A reader sees an old file or a new one. Nothing reads it back here."""
        st = self.state
        live = Path(st.ckpt_root).parent / "live"
        tmp = live / f".rank-{st.rank}.json.{os.getpid()}"
        while True:
            status = {
                "rank": st.rank,
                "pid": os.getpid(),
                "step": st.done_steps,
                "phase": st.phase,
                "since": st.phase_since,
                "compute_s": st.timing["compute_s"],
                "timed_steps": st.timed_steps,
                "rss_bytes": _rss_bytes(),
                "t": time.time(),
            }
            try:
                live.mkdir(exist_ok=True)
                tmp.write_text(json.dumps(status))
                os.replace(tmp, live / f"rank-{st.rank}.json")
            except OSError:
                pass  # telemetry only: a full disk must not end the rank
            await trio.sleep(LIVE_SECONDS)

    async def _gradients(self, s: int, batches, overlap: bool):
        """Compute this rank's gradients of step `s` and reduce them: (shard, sq_norm,
        loss). With `overlap` (and a mode that can), buckets are all-reduced as backward
        finishes them (same bits either way)."""
        st = self.state
        rs = st.step
        seed = step_seed(st.cfg.train.seed, s, st.rank)
        done = 0
        if overlap and rs.can_overlap():
            gate = BackwardGate(rs.n)
            computed = {}

            async def compute() -> None:
                computed["out"] = await compute_gradients(st, s, batches, seed, gate)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(compute)
                done = await reduce_buckets(st, s, rs.model.grads, gate)
            grads, loss_sum = computed["out"]
            done = _check(done)  # (after the nursery: a Regroup must not be grouped)
            st.overlapped_buckets += done
        else:
            grads, loss_sum = await compute_gradients(st, s, batches, seed, None)
        return _check(await reduce_gradients(st, s, grads, loss_sum, done))

    def _eval_metrics(self) -> dict:
        st = self.state
        return evaluate_run(st.cfg, st.model, st.evalset)

    def _export(self, s: int, sha: str) -> None:
        st = self.state
        export_weights(Path(st.ckpt_root).parent, st.cfg, st.model, s, sha)


LIVE_SECONDS = 0.5


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _check(result):
    if isinstance(result, Failed):
        raise Regroup(result.reason)
    return result


async def _forward_stop_signals(rank: int, scope: trio.CancelScope) -> None:
    """A signal to this rank asks the Coordinator for a planned stop (its module doc);
    the rank leaves at once when the run is over or the Coordinator is gone -- as when
    the cluster stops its children (SIGTERM) on its way out."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        # blocked since the fork (the cluster's block_signals): any that came while the
        # rank started is delivered now, to this receiver
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        async for signum in signals:
            name = signal.Signals(signum).name
            try:
                answer = await msg.stop_requested(COORDINATOR, f"rank {rank}", name, 2.0)
            except (actors.ActorError, msg.BadMessage, trio.TooSlowError, TimeoutError):
                answer = "exit"
            if answer == "exit":
                scope.cancel()
                return


def _checkpoint_root(plan: dict, cfg) -> Path:
    """Where this rank's shards go: node K of a multi-node run writes into node 0's
    root (its plan says), every other rank into its run dir's."""
    if plan.get("checkpoint_root"):
        return Path(plan["checkpoint_root"])
    return Path(plan["run_dir"]) / cfg.checkpoint.dir


def _node_options(plan: dict) -> dict:
    """A multi-node plan names every node a rank may reach (its parent's entry is the
    parent's own); on one host they are found in the ipc directory."""
    peers = plan.get("peers")
    if not peers:
        return {}
    parent = os.environ[actors.ENV["parent"]]
    return {"peers": {**peers, parent: os.environ[actors.ENV["parent_endpoint"]]}}


async def _main(plan: dict) -> int:
    async with actors.child_node(handle_sigterm=False, **_node_options(plan)):
        rank = int(os.environ[actors.ENV["rank"]])
        node_scope = trio.CancelScope()
        with node_scope:
            async with trio.open_nursery() as outer:
                outer.start_soon(_forward_stop_signals, rank, node_scope)
                code = await _train_rank(plan, rank)
                outer.cancel_scope.cancel()
            return code
    return 0  # told to leave (the run is over, or the cluster stops its children)


async def _train_rank(plan: dict, rank: int) -> int:
    built = await trio.to_thread.run_sync(_build, plan, rank)
    cfg, world, model = built["cfg"], built["world"], built["model"]
    ring = actors.Ring(
        rank,
        world,
        plan["endpoints"],
        timeout=cfg.cluster.collective_timeout,
    )
    try:
        specs = list(plan.get("hooks", []))
        transforms = _transforms(cfg, model, rank, world, specs)
        state = RankState(
            cfg=cfg,
            rank=rank,
            world=world,
            dataset=built["dataset"],
            evalset=built["evalset"],
            model=model,
            step=RankStep(model, cfg, ring, transforms=transforms),
            ring=ring,
            ckpt_root=_checkpoint_root(plan, cfg),
            chaos=RankChaos(rank, COORDINATOR),
            initial_params=model.params.copy(),
            replica_stride=int(plan.get("replica_stride", 1)),
        )
        outbox = None
        if plan.get("analyzers"):
            from ..hooks.link import HookOutbox

            outbox = HookOutbox(specs, layout=model.layout)
        finished = trio.Event()
        trainer = Trainer(state, finished, multi_node=bool(plan.get("peers")))
        roles = [
            DataLoader.child_spec(state, name="DataLoader"),
            Optimizer.child_spec(state, name="Optimizer"),
            Checkpointer.child_spec(state, name="Checkpointer"),
            HookSampler.child_spec(state, outbox, name="HookSampler"),
            actors.ChildSpec(id="Trainer", start=_runner(trainer, "Trainer")),
        ]
        supervisor = actors.Supervisor(
            roles, strategy="one_for_all", max_restarts=0, name="RoleSupervisor"
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run_supervisor, supervisor, nursery.cancel_scope)
            await finished.wait()
            nursery.cancel_scope.cancel()
        return 0 if trainer.exit_ok else 1
    finally:
        ring.close()


def _runner(actor: actors.Actor, name: str):
    """A start function for a pre-built actor instance (its one incarnation: the rank
    supervisor never restarts a role)."""

    async def start(task_status=trio.TASK_STATUS_IGNORED):
        return await actor.run(name=name, task_status=task_status)

    return start


async def _run_supervisor(supervisor: actors.Supervisor, scope: trio.CancelScope) -> None:
    await supervisor.run()
    scope.cancel()


def _cpus() -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def pin_to_cpu(rank: int, world: int) -> int | None:
    """Pin this process to the rank-th CPU it may run on when the run has exactly one
    rank per such CPU. Else leave it free: with more ranks, two would share a CPU;
    with fewer, every run on the machine would pile onto the first CPUs (restrict the
    set with taskset to pin a run to some CPUs of a big machine). Must run before any
    thread starts (threads inherit the mask). The CPU, or None."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None
    if world != len(allowed):
        return None
    cpu = allowed[rank]
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as err:
        log.warning("rank %d: not pinned to CPU %d: %s", rank, cpu, err)
        return None
    return cpu


def _check_ownership(plan: dict) -> None:
    """The plan is this run's and the run dir is this run's: exit 2 in one line if not
    (a plan rewritten by another run, or a rank not started by the run's owner)."""
    mine = os.environ.get(RUN_ID_ENV, "")
    if plan.get("run_id") != mine:
        print(
            f"zerotrain rank: {os.environ[PLAN_ENV]} is the plan of run "
            f"{plan.get('run_id')!r}, not of this rank's run {mine!r}",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        check_run_lock(plan["run_dir"], int(os.environ.get(LOCK_FD_ENV, "-1")))
    except (RunDirRefused, ValueError) as err:
        print(f"zerotrain rank: {err}", file=sys.stderr)
        sys.exit(2)


def _secure(plan: dict) -> None:
    """A multi-node run with keys: every tcp:// socket of this rank is CURVE. Exit 2 in
    one line when the keys cannot be used. Imported here, not at the top: a plan without
    keys needs neither pipelines.launch nor .nodes, and a restarted rank's start is on
    the path of a recovery (each module is compiled again when no .pyc can be written)."""
    from ..launch import KeysError
    from .nodes import secure_rank

    try:
        secure_rank(plan)
    except (KeysError, ValueError) as err:
        print(f"zerotrain rank: keys: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format=f"zerotrain {os.environ.get('ZEROTRAIN_NODE', 'rank')}: %(message)s",
    )
    try:
        plan = json.loads(Path(os.environ[PLAN_ENV]).read_text())
    except (KeyError, OSError, ValueError) as err:
        print(f"zerotrain rank: cannot read the plan (${PLAN_ENV}): {err}", file=sys.stderr)
        sys.exit(2)
    _check_ownership(plan)
    if plan.get("keys"):
        _secure(plan)
    cluster = plan["config"]["cluster"]
    if cluster.get("pin_ranks", True):
        pin_to_cpu(int(os.environ[actors.ENV["rank"]]), int(cluster["ranks"]))
    code = trio.run(_main, plan)
    # the ring may still hold the last acks for slower neighbours: actors' transport
    # flushes the context at exit, so leave through the normal interpreter exit
    sys.exit(code)


if __name__ == "__main__":
    main()
