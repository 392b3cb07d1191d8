"""The cluster: the `zerotrain` process supervising N rank processes (and the analyzer).

    cluster node "cluster"
    ├── Coordinator          control plane: joins, generations, metrics, manifests
    ├── RankSupervisor       one_for_one over rank0..rankN-1 (process children),
    │                        restart intensity cluster.max_restarts in max_seconds
    └── AnalyzerSupervisor   the hook analyzer process (when analyzers are loaded),
                             apart, so a failing research script cannot use up the
                             ranks' restart budget

The Coordinator (pipelines.cluster.coordinator) is the control plane: joins, generations,
metrics, manifests, the fault record.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import trio

import actors

from .. import core
from ..config import Config
from ..core import RunIdentity, RunStopped, TrainingFailed, prepare_run
from ..data import data_record, record_epochs
from ..store import checkpoint as ckpt_mod
from ..store.overrides import OVERRIDES_FILE, append_override, hook_windows, read_overrides
from ..store.rundir import LOCK_FD_ENV, Progress, RunDir, last_good_checkpoint, write_json_atomic
from . import messages as msg
from . import nodes, prefork
from .chaos import expand
from .coordinator import Coordinator
from .nodes import NodeLayout
from .rank import PLAN_ENV, RUN_ID_ENV

TOKEN_FILE = "token"  # in the run's ipc directory: the run's admission token (actors)

__all__ = ["run_cluster"]


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def run_cluster(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: str | Path | None = None,
    hooks: list[str] = (),
    chaos=None,
    out=None,
    layout: NodeLayout | None = None,
    overrides: list[dict] | None = None,
) -> dict:
    """Train `cfg` on cfg.cluster.ranks rank processes; return the summary (also
    written). `chaos`: parsed ChaosEvents (simulate) or None. `overrides`: live
    overrides to apply at their steps (checked; `zerotrain run --overrides FILE`); a
    resumed run replays its own (RUN/overrides.jsonl). `layout`: this node's
    place in a multi-node run (pipelines.cluster.nodes), None on one host; node K > 0
    returns None (node 0 writes the summary). Raises RunRefused (exit 2) before the run
    dir is created when the run cannot start as asked, TrainingFailed (exit 3) when it
    cannot go on."""
    if layout is not None:
        run_dir = nodes.plan_env_dir(Path(run_dir), layout.node_rank)
    t_start = time.perf_counter()
    inputs = prepare_run(cfg, resume=resume, hooks=hooks)
    identity = inputs.identity
    rundir, again = _open_run_dir(cfg, run_dir, inputs, resume, overrides, layout)
    progress = core.progress_for(cfg, out)
    specs = list(cfg.hooks.specs) + list(hooks)
    analyzers = any(h.kind == "analyzer" for h in inputs.hooks)
    # ipc paths must be short (AF_UNIX): a private directory under /tmp, removed below
    # (a killed run's is removed by the next run: actors.new_ipc_directory)
    ipc_dir = actors.new_ipc_directory()
    ports: list[socket.socket] = []
    try:
        run_id = uuid.uuid4().hex  # a rank reads only its own run's plan
        plan_path = _write_plan(
            cfg, rundir, specs, analyzers, ipc_dir, inputs.data_cfg.cache_dir, run_id, ports
        )
        coord = Coordinator(
            cfg,
            rundir,
            progress,
            resume=inputs.resume.root if inputs.resume else None,
            events=expand(chaos or [], cfg.cluster.ranks, cfg.train.steps),
            identity=identity,
        )
        coord.ports = ports  # the multi-node tables' ports join the rings' (closed below)
        coord.own_hooks = {h.name for h in inputs.hooks if h.kind == "analyzer"}
        if layout is not None:  # node-major ranks; node K's shards go to node 0's root
            coord.local_ranks = layout.ranks
            coord.replica_stride = len(layout.ranks)  # replicas on the next node
            layout = nodes.plan_node(plan_path, layout, cfg, inputs.hooks)
            if layout.node_rank > 0:  # (its failure lines name the run's checkpoints)
                coord.ckpt_root = rundir.path.parent / cfg.checkpoint.dir
        if again:
            _continue_after_loss(coord, rundir, layout)
        config_hash = identity.config_hash
        del inputs  # the top process keeps no model or data while the ranks train
        if layout is not None:  # with keys, every tcp:// socket of this agent is CURVE
            nodes.secure_agent(layout)
        trio.run(
            _serve,
            cfg,
            coord,
            (plan_path, run_id),
            ipc_dir,
            specs if analyzers else None,
            rundir,
            (layout, config_hash),
        )
    finally:
        actors.secure_tcp(None)
        rundir.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)
        for port in ports:
            port.close()
    _record_outcome(coord, rundir, chaos)
    if layout is not None and layout.node_rank > 0:
        progress.message(f"done: {nodes.agent_label(layout)}; summary on node 0")
        return None
    return _summarize(cfg, coord, identity, rundir, progress, time.perf_counter() - t_start)


def _open_run_dir(cfg: Config, run_dir, inputs, resume, overrides, layout) -> tuple[RunDir, bool]:
    """The run directory with the run's config, data record, epochs and overrides; and
    whether this is node 0 started again in a running run (its node was lost): then
    the run dir and its checkpoints are this run's own (nodes.earlier_start)."""
    identity = inputs.identity
    again = layout is not None and nodes.earlier_start(run_dir, layout, identity.config_hash)
    own = run_dir if again and resume is None else resume
    rundir = RunDir(run_dir, resume=own, checkpoint_dir=cfg.checkpoint.dir)
    rundir.write_config(cfg, identity.config_hash, identity.resume_hash)
    rundir.write_data(data_record(inputs.train))
    record_epochs(inputs.train, rundir.path)
    if inputs.resume is not None:  # steps after the checkpoint are trained again
        rundir.forget_steps_after(int(inputs.resume.manifest["step"]))
    _record_overrides(rundir.path, overrides, inputs.resume)
    return rundir, bool(again)


def _continue_after_loss(coord: Coordinator, rundir: RunDir, layout: NodeLayout) -> None:
    """Node 0 started again in its running run: the steps and faults the Coordinator
    before it recorded are the run's (metrics.jsonl, live/faults.json), and the loss of
    node 0's ranks is a fault of its own."""
    coord.steps.continue_log()
    faults = rundir.path / "live" / "faults.json"
    coord.fault_log.continue_from(faults, layout.ranks, coord.steps.last_step, coord.generation)


def _record_outcome(coord: Coordinator, rundir: RunDir, chaos) -> None:
    """Write recovery.json (under chaos, or when a rank was restarted); raise
    TrainingFailed or RunStopped when the run did not end by finishing its steps."""
    recovery = [f.record() for f in coord.faults]
    if chaos is not None or recovery:
        write_json_atomic(
            rundir.path / "recovery.json", {"faults": recovery, "restarts": coord.restarts}
        )
    if coord.outcome.failure is not None:
        raise TrainingFailed(coord.outcome.failure)
    if coord.outcome.stopped is not None:
        raise RunStopped(coord.outcome.stopped)


def _record_overrides(run_dir: Path, overrides, resume) -> None:
    """RUN/overrides.jsonl, which the Coordinator reads: `overrides` for a fresh run; a
    resumed run's own when it resumes into another dir (into its own: kept as it is)."""
    if overrides is None and resume is not None:
        source = Path(resume.root).parent / OVERRIDES_FILE
        if source.resolve() != (run_dir / OVERRIDES_FILE).resolve():
            overrides = read_overrides(source)
    if overrides:
        for record in overrides:
            append_override(run_dir, record)


def _write_plan(
    cfg, rundir: RunDir, specs, analyzers: bool, ipc_dir: str, cache, run_id: str, ports: list
) -> Path:
    """plan.json: what every rank process reads to start (the run's id, config,
    endpoints); a rank started by another run refuses it. tcp ring ports are reserved
    into `ports`, for the caller to hold until the run ends."""
    world = cfg.cluster.ranks
    if cfg.cluster.transport == "ipc":
        endpoints = [f"ipc://{ipc_dir}/ring-{r}" for r in range(world)]
    else:
        ports += _reserve_ports(world)
        endpoints = [f"tcp://127.0.0.1:{p.getsockname()[1]}" for p in ports]
    plan = {
        "run_id": run_id,
        "config": cfg.to_dict(),
        "run_dir": str(rundir.path.resolve()),
        "ipc_dir": ipc_dir,  # the cluster node and its token (pipelines.cluster.live)
        "hooks": specs,
        "analyzers": analyzers,
        "endpoints": endpoints,
        "data_cache": cache,
    }
    plan_path = rundir.path / "plan.json"
    write_json_atomic(plan_path, plan)
    return plan_path


def _summarize(
    cfg, coord: Coordinator, identity: RunIdentity, rundir: RunDir, progress: Progress, wall
) -> dict:
    """Write summary.json from the ranks' final reports; return the summary."""
    world = cfg.cluster.ranks
    finished = coord.outcome.finished
    info0 = finished[0]
    steps = info0["step"]
    summary = core.run_summary(
        cfg,
        identity,
        steps=steps,
        trained_steps=steps - coord.resumed_step,
        wall_s=wall,
        final_loss=coord.losses.get(steps, math.nan),
        eval_metrics=info0["eval"],
        restarts=coord.restarts,
        skipped_steps=info0["skipped_steps"],
        stopped_early=coord.stopped_early,
        params_sha256=info0["params_sha256"],
        n_params=info0["n_params"],
        memory=[finished[r]["memory"] for r in range(world)],
        # the matrix library each rank multiplied with (cykernels.gemm: "mkl" or "numpy")
        blas=",".join(sorted({finished[r]["blas"] for r in range(world)})),
        hooks={"ranks": [finished[r]["hooks"] for r in range(world)]},
        run_dir=rundir.path,
    )
    summary["timing"] = info0["timing"]
    summary["timing_per_rank"] = [finished[r]["timing"] for r in range(world)]
    summary["first_step_s"] = (coord.t_first_step - _T0) if coord.t_first_step else None
    # the CPUs each rank process may run on (one each when cluster.pin_ranks took)
    summary["cpus_per_rank"] = [finished[r].get("cpus") for r in range(world)]
    if coord.analyzer_stats is not None:
        summary["hooks"]["analyzer"] = coord.analyzer_stats
    summary["admission"] = _admission_summary(coord.node_stats, finished, world, coord.agent_stats)
    rundir.write_summary(summary)
    progress.message(
        f"done: {steps} steps on {world} ranks ({cfg.cluster.mode}) in {wall:.1f}s, final loss "
        f"{summary['final_loss']:.4f}, eval {summary['eval']}, restarts {coord.restarts} "
        f"-> {rundir.path}"
    )
    return summary


def _admission_summary(
    cluster_stats: dict | None, finished: dict, world: int, agent_stats: dict
) -> dict:
    """Whether something knocked: per node -- the cluster (node 0's agent), each other
    node's agent (node1, ...: None when it did not answer node 0's last word) and each
    rank -- connections and messages refused (no token or key, a spoofed sender,
    another run; and those three parts of it: refused_handshake, refused_sender,
    refused_run), refused_duplicate (a second process under a live agent's name),
    rejected (malformed) and dropped (answers nobody read); per rank, its ring inbox's
    refused connections and its regroups (collectives that failed)."""
    keys = ("refused", "rejected", "dropped", "refused_handshake", "refused_sender",
            "refused_run", "refused_duplicate")  # fmt: skip
    per_node = {"cluster": {k: (cluster_stats or {}).get(k, 0) for k in keys}}
    for k, stats in sorted(agent_stats.items()):
        per_node[nodes.node_name(k)] = (
            None if stats is None else {key: stats.get(key, 0) for key in keys}
        )
    for r in range(world):
        per_node[f"rank{r}"] = {k: finished[r]["admission"]["node"][k] for k in keys}
    return {
        "nodes": per_node,
        "ring_refused_per_rank": [finished[r]["admission"]["ring_refused"] for r in range(world)],
        "regroups_per_rank": [finished[r]["admission"]["regroups"] for r in range(world)],
    }


# process start, for the cold-start figure (command to first step)
_T0 = time.time()


async def _serve(cfg, coord: Coordinator, plan, ipc_dir: str, analyzer_specs, rundir, multi):
    rank_log = _rank_log(rundir.path)  # open while ranks (re)start
    try:
        # a signal to this process asks for a planned stop (the coordinator's doc)
        with trio.open_signal_receiver(*core.STOP_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                layout = multi[0]
                to = "Coordinator" if layout is None else "Coordinator@cluster"
                source = _signal_source(layout)
                nursery.start_soon(_forward_stop_signals, signals, to, source, coord)
                if layout is not None and layout.node_rank > 0:
                    await _serve_node(cfg, coord, plan, ipc_dir, rundir, rank_log, multi)
                else:
                    await _serve_ranks(
                        cfg, coord, plan, ipc_dir, analyzer_specs, rundir, rank_log, multi
                    )
                nursery.cancel_scope.cancel()
    finally:
        if rank_log >= 0:
            os.close(rank_log)


def _signal_source(layout: NodeLayout | None) -> str:
    """Who a signal to this process reached, as the stop's line says. Each node agent
    is its own source: `scancel --signal=USR1` signals every node's agent at once, one
    signal each, which is one stop request -- a second signal to the *same* process
    is what stops at once (the Coordinator counts them by source)."""
    if layout is None:
        return "the zerotrain process"
    return f"the agent of node {layout.node_rank}"


async def _forward_stop_signals(signals, coordinator: str, source: str, coord) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        while True:  # the Coordinator may not be registered yet (the first moments)
            try:
                await msg.stop_requested(coordinator, source, name, 5.0)
                break
            except actors.ActorError:
                if coord.outcome.master_lost:  # node K > 0 while node 0 is lost
                    _stop_unagreed(coord, f"{name} to {source}")
                    return
                await trio.sleep(0.05)


def _stop_unagreed(coord: Coordinator, reason: str) -> None:
    """Node K > 0 asked to stop while node 0 is lost: no Coordinator can agree a step
    with its ranks, so this node stops now (exit 4), naming the checkpoint to resume
    from; node 0, if it comes back, waits for this node as for any lost one."""
    if not coord.outcome.done.is_set():
        coord.outcome.stopped = (
            f"stopped ({reason}) while node 0 is lost: no step could be agreed; last good "
            f"checkpoint: {last_good_checkpoint(coord.ckpt_root)}"
        )
        coord.outcome.done.set()


def _rank_supervisor(cfg, plan, rundir, rank_log, ranks, endpoints=None) -> actors.Supervisor:
    """one_for_one over this node's rank processes (all ranks on one host). `endpoints`:
    {rank: where its node binds} in a multi-node run (default: the ipc directory)."""
    plan_path, plan_id = plan
    env = {
        PLAN_ENV: str(plan_path),
        RUN_ID_ENV: plan_id,
        LOCK_FD_ENV: str(rundir.lock_fd),  # the ranks share the run dir's lock
    }
    specs = [
        actors.process_spec(
            f"rank{r}",
            [sys.executable, "-m", "pipelines.cluster.rank"],
            env=env,
            rank=r,
            restart="transient",
            shutdown=3.0,
            start_timeout=60.0,
            pass_fds=(rundir.lock_fd,),
            output=rank_log,
            # pending until the rank forwards them as stop requests
            block_signals=core.STOP_SIGNALS,
            endpoint=None if endpoints is None else endpoints[r],
            spawner=prefork.spawn_rank,  # a warm runner's forked ranks (else exec)
        )
        for r in ranks
    ]
    return actors.Supervisor(
        specs,
        strategy="one_for_one",
        max_restarts=cfg.cluster.max_restarts,
        max_seconds=cfg.cluster.max_seconds,
        name="RankSupervisor",
    )


async def _serve_ranks(cfg, coord, plan, ipc_dir: str, analyzer_specs, rundir, rank_log, multi):
    layout, config_hash = multi
    hb = cfg.cluster.heartbeat_timeout
    coord.analyzer_stats = None
    coord.node_stats = None
    coord.agent_stats = {}  # node rank -> its agent's node statistics (announce_end)
    # Only this run's processes may connect (actors._admission); the token also sits in
    # the run's 0700 ipc directory, so a tool of the same user can join the run's nodes.
    token = secrets.token_hex(16)  # (written, unused, in a multi-node run)
    token_path = Path(ipc_dir) / TOKEN_FILE
    token_path.touch(mode=0o600)
    token_path.write_text(token)
    async with actors.open_node(
        "cluster",
        directory=ipc_dir,
        endpoint=None if layout is None else layout.master_endpoint,
        heartbeat_interval=min(0.2, hb / 5),
        heartbeat_timeout=hb,
        # One host: only this run's processes may connect. Several: the node agents of
        # other hosts hold no token; their admission is the CURVE keyring's (installed
        # by secure_agent when the run has keys; nodes.py's module doc).
        token=token if layout is None else None,
    ) as node:
        async with trio.open_nursery() as nursery:
            await nursery.start(_coordinate, coord)
            endpoints = None
            if layout is not None:  # every node's hello first: then the plan is whole
                endpoints = await nodes.gather_nodes(
                    nursery, node, layout, config_hash, plan[0], coord
                )  # (ports held in coord.ports until the run ends)
                if endpoints is None:
                    nursery.cancel_scope.cancel()
                    return
            ranks = _rank_supervisor(cfg, plan, rundir, rank_log, coord.local_ranks, endpoints)
            analyzer = []  # its supervisor, once started

            async def start_analyzer() -> bool:
                """Start the analyzer process unless it runs; True if started."""
                if analyzer:
                    return False
                from ..hooks.process import analyzer_spec

                specs = analyzer_specs or []
                where = {}
                if layout is not None:  # reached over tcp by every node's ranks
                    where = nodes.analyzer_place(plan[0], layout)
                spec = analyzer_spec(
                    rundir.path, specs, cfg.cluster.ranks, cfg.hooks.timeout_s, **where
                )
                side = actors.Supervisor(
                    [spec], name="AnalyzerSupervisor", max_restarts=10, max_seconds=10.0
                )
                analyzer.append(side)
                await nursery.start(_side, side)
                return True

            attached = any(u == math.inf for _, u in hook_windows(coord.live_hooks).values())
            if analyzer_specs or attached:  # (attached live: a resume, or a recovery)
                # up before the ranks, so the first samples have a receiver
                await start_analyzer()
            coord.start_analyzer = start_analyzer  # analyzers attached live (hook attach)
            nursery.start_soon(_ranks, ranks, coord)
            await coord.outcome.done.wait()
            if layout is not None:
                coord.agent_stats = await nodes.announce_end(layout, coord.outcome)
            if analyzer and coord.outcome.failure is None and not coord.outcome.stopped:
                with trio.move_on_after(cfg.hooks.timeout_s + 5):
                    while True:  # it may be restarting (a hook hung): ask again
                        try:
                            coord.analyzer_stats = await actors.call(
                                "HookAnalyzer@analyzer", "stats", cfg.hooks.timeout_s + 5
                            )
                            break
                        except actors.ActorError as err:
                            coord.analyzer_stats = {"error": str(err)}
                            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        coord.node_stats = node.statistics()


async def _serve_node(cfg, coord, plan, ipc_dir: str, rundir, rank_log, multi):
    """Node K > 0: say hello to node 0, then supervise this node's ranks until they end
    (the Coordinator told them the run is over), give up (reported to node 0), or node 0
    is lost. The outcome goes into `coord.outcome` (this node runs no Coordinator)."""
    layout, config_hash = multi
    hb = cfg.cluster.heartbeat_timeout
    async with actors.open_node(
        nodes.node_name(layout.node_rank),
        directory=ipc_dir,
        endpoint=nodes.endpoint_of(layout.advertise_ip, "*"),
        peers={"cluster": layout.master_endpoint},
        heartbeat_interval=min(0.2, hb / 5),
        heartbeat_timeout=hb,
    ) as node:
        table = nodes.local_table(layout, node.endpoint, coord.ports)
        tables = await nodes.rendezvous(layout, config_hash, table, nodes.HELLO_TIMEOUT)
        nodes.adopt_table(layout, table, tables, coord.ports)  # a lost node back
        endpoints = nodes.write_plan_table(plan[0], layout, tables)
        ranks = _rank_supervisor(cfg, plan, rundir, rank_log, layout.ranks, endpoints)
        mine = tables[str(layout.node_rank)]  # (what node 0 started again is told)
        await nodes.supervise_node(ranks, layout, coord, config_hash, mine)


async def _coordinate(coord: Coordinator, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the Coordinator; a crash of it (a bug) ends the run with its reason in one
    line (the traceback is logged by the actor runtime)."""
    try:
        await coord.run(name="Coordinator", task_status=task_status)
    except Exception as exc:
        coord.fail(f"the coordinator crashed: {type(exc).__name__}: {exc}")


async def _ranks(supervisor: actors.Supervisor, coord: Coordinator) -> None:
    try:
        reason = await supervisor.run()
    except actors.RestartIntensityExceeded as err:
        last = ckpt_mod.latest_valid(coord.ckpt_root).path
        coord.fail(
            f"{str(err).splitlines()[0]} (cluster.max_restarts "
            f"{supervisor.max_restarts} in {supervisor.max_seconds:g}s); last good "
            f"checkpoint: {last if last else 'none written yet'}"
        )
        return
    except actors.StartChildError as err:
        coord.fail(f"could not start the rank processes: {str(err).splitlines()[0]}")
        return
    coord.fail(f"the rank supervisor stopped ({reason})")


async def _side(supervisor: actors.Supervisor, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The analyzer's supervisor. Hooks must never stop training: if it cannot start
    (or gives up later), the run goes on without analyzers -- the ranks' outboxes count
    what they could not send."""
    started = False

    class _Started:
        def started(self, value=None):
            nonlocal started
            started = True
            task_status.started(value)

    try:
        await supervisor.run(task_status=_Started())
    except actors.ActorError as err:
        print(f"zerotrain: the hook analyzer gave up: {err}", file=sys.stderr)
        if not started:
            task_status.started()


def _rank_log(run_dir: Path) -> int:
    """Where the rank processes' stdout and stderr go: <run dir>/ranks.log, so a crash's
    traceback is kept without reaching the terminal (the coordinator reports the fault
    there in a line); nowhere when the run dir cannot take it."""
    try:
        fd = os.open(run_dir / "ranks.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return subprocess.DEVNULL
    return fd


def _reserve_ports(n: int) -> list[socket.socket]:
    """n loopback tcp ports held for the run's rings: each socket is bound to a port the
    kernel picked (bind to port 0) with SO_REUSEADDR and never listens. A rank's ring
    socket (libzmq sets SO_REUSEADDR on its listeners) binds and listens on the same
    port -- again after a restart -- while a plain bind, and the kernel's own choice of
    a port for another run, refuse a port that is held. So no other process can take a
    ring port between this choice and the rank's bind (a port chosen and released
    could be). Close them when the run ends."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks
