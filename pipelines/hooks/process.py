"""The analyzer process: research hooks run here, isolated from the ranks.

Why a process of its own (DESIGN.md, "Processes and the supervisor tree"): a research
script may raise, hang, leak or burn a core; none of that may stop, stall or change a
training run. In its own OS process it can be killed and restarted by the cluster
supervisor like any other child. The ranks send it samples from a task of their own
(`pipelines.hooks.link.HookOutbox`); a step never waits for it: a rank whose last sample
is unanswered declines the next one instead (demand, see pipelines.hooks.link).

The tree inside the process (one_for_one)::

    analyzer process  (python -m pipelines.hooks.process, a child of the cluster supervisor)
    └── Supervisor "analyzer"                one_for_one, 3 restarts in 5 s
        ├── Supervisor (temporary)            one_for_one, HOOK_RESTARTS: gives up =
        │   └── HookWorker "hook:grad_norm"   the hook is disabled; one analyzer hook,
        │                                     its own worker thread
        ├── Supervisor (temporary)
        │   └── HookWorker "hook:noise_scale" ...
        └── HookAnalyzer "HookAnalyzer"       assembles steps, runs the due workers,
                                              writes hooks.jsonl and TensorBoard files

A step from N ranks arrives as N `HookSample` casts; the HookAnalyzer puts the shards
together (grad, params, update by [lo:hi]; each rank's own gradient whole), builds a
read-only `HookContext` and calls the due HookWorkers concurrently; their records go
to the sinks. Receiving never waits for analysis: the analysis runs in a helper task,
so the mailbox keeps draining and no back-pressure reaches the ranks.

## What fails here, and what happens

The hook failure policy (a hook raises, hangs, or its worker keeps failing; a sink
fails; the process is killed) is written once, in the `pipelines.hooks` package doc; the
constants it names (`HOOK_RESTARTS`, `MAX_HANGS`, `EXIT_HUNG`) are defined here. What
belongs to this process alone:

- **Behind**: when a step is complete, every older step still incomplete -- or complete
  and not yet started -- is dropped and counted (`dropped`). At most
  `MAX_PENDING_STEPS` incomplete steps are held; the oldest goes beyond that, and so
  does one left incomplete for `PENDING_MAX_S` (a rank restarted). A sample of a step
  already analyzed or dropped (a late rank, a replay after recovery) is `stale` and
  ignored. A sample that came as a call is answered with its final fate: the rank's
  credit for the next one (pipelines.hooks.link: demand), so a slow analyzer gets fewer
  samples instead of dropping copies the ranks paid for.
- **A sample that makes no sense** (wrong world, bounds, lengths, not a HookSample) is
  logged, counted (`rejected`) and ignored. A spec that fails to load is logged and
  skipped: the analyzer runs the hooks it could load.

## Cost to the ranks

The process runs under SCHED_IDLE (else at nice `NICE`) with one BLAS thread, so on a
busy machine the ranks get the cores first and the analyzer falls behind (the ranks
then decline samples, counted in their outboxes) instead; once the ranks are done
("stats") it goes back to SCHED_OTHER at nice `NICE` to settle. It holds at most
`MAX_PENDING_STEPS` + 1 steps of samples: about that many times world x n x 16 bytes
(each rank's full gradient plus its shards), plus one assembled step.

`actors.call("HookAnalyzer@analyzer", "stats")` answers the counters of this process
for summary.json: steps_analyzed, dropped, stale, rejected, skipped (a worker was
restarting), hook_errors, timeouts, restarts (of actors inside the process; restarts of
the process itself are the cluster supervisor's to count), sink_errors, per-hook
counts, the disabled hooks and the pid. `timeouts` (overall and per hook) and `hangs`
count over the whole run -- they are read back from RUN_DIR/hooks_quarantine.json, since
a hang ends the process that saw it; the other counters are this process's.

Per rank, in samples, "ranks" says what became of every sample received: analyzed,
dropped, stale, rejected, skipped (no hook due) or pending; a rank's ("flush", rank)
call, made at its end after its last cast, answers that rank's counts (and, once every
rank has flushed, the process takes the CPU back).

"stats" is asked once, when the ranks are done: it first lets the analyzer settle --
the step in analysis finishes, a complete step waiting for it is analyzed, and no new
sample arrived for `SETTLE_QUIET_S` -- at most about timeout_s + 1 s (capped by
`SETTLE_MAX_S`), so the last steps of a run reach hooks.jsonl instead of being cut off
by the shutdown. Meanwhile the mailbox keeps draining. A process that must exit for a
hung hook answers a waiting "stats" first.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path

import numpy as np
import trio

import actors

from ._runner import HookState, HookStats, Sinks
from .link import FINAL_FATES, SAMPLE_FATES, HookSample

__all__ = [
    "EXIT_HUNG",
    "HOOK_RESTARTS",
    "MAX_HANGS",
    "MAX_PENDING_STEPS",
    "HookAnalyzer",
    "HookWorker",
    "analyzer_spec",
    "main",
]

NODE = "analyzer"
MAX_PENDING_STEPS = 2  # ranks step in lockstep: an older incomplete step is lost
PENDING_MAX_S = 3.0  # an incomplete step older than this is dropped (a rank restarted)
NICE = 10  # the analyzer yields the CPU to the ranks (CFS weight ~1/10 of a rank's)
# a hook's worker is restarted at most 3 times in 5 s (OTP's default intensity); one
# failure more and its supervisor gives up: the hook is disabled for this process
HOOK_RESTARTS = (3, 5.0)
MAX_HANGS = 2  # a hook that hung this many times in a run is not loaded again
SETTLE_QUIET_S = 0.25  # "stats" waits for this long without a new sample ...
SETTLE_MAX_S = 10.0  # ... and for the step in analysis, at most timeout_s + 1 or this
EXIT_HUNG = 75  # a hook hung: exit so that a fresh process reclaims its thread
QUARANTINE = "hooks_quarantine.json"

_log = logging.getLogger("zerotrain.hooks.analyzer")
_REPO = str(Path(__file__).resolve().parent.parent)


# =====================================================================================
# The parent's side: the child spec
# =====================================================================================


def analyzer_spec(
    run_dir,
    specs: list,
    world: int,
    timeout_s: float,
    *,
    node: str = NODE,
    shutdown=5.0,
    endpoint: str | None = None,
    keys: dict | None = None,
) -> actors.ChildSpec:
    """The child spec of the analyzer process, for the cluster supervisor.

    run_dir    where hooks.jsonl and the TensorBoard files (RUN_DIR/tb) go.
    specs      hook specs as in the config (strings or dicts; JSON data -- never Hooks,
               which cannot cross a process); transforms among them are ignored here.
    world      ranks per step. timeout_s: per-call budget of a hook, > 0.
    endpoint   where its node binds (a multi-node run: tcp on node 0's address, which
               every node's ranks are told); default the cluster's ipc directory.
    keys       a multi-node run's keyring plan (pipelines.cluster.nodes.keyring_plan):
               the process installs node 0's keyring before it opens a socket.
    Relative script paths are resolved from the current directory.
    """
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"analyzer_spec: world must be an int >= 1, got {world!r}")
    if not (isinstance(timeout_s, int | float) and timeout_s > 0):
        raise ValueError(f"analyzer_spec: timeout_s must be a number > 0, got {timeout_s!r}")
    try:
        specs_json = json.dumps(list(specs))
    except TypeError:
        raise TypeError(
            f"analyzer_spec: specs must be strings or dicts (JSON data), got {specs!r}"
        ) from None
    argv = [
        sys.executable,
        "-m",
        "pipelines.hooks.process",
        "--run-dir",
        str(Path(run_dir).resolve()),
        "--world",
        str(world),
        "--timeout",
        repr(float(timeout_s)),
        "--base-dir",
        os.getcwd(),
        "--specs",
        specs_json,
    ]
    if keys is not None:
        argv += ["--keys", json.dumps(keys)]
    path = os.environ.get("PYTHONPATH")
    env = {"PYTHONPATH": _REPO + (os.pathsep + path if path else "")}
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = os.environ.get(var, "1")  # one BLAS thread: the cores are the ranks'
    return actors.process_spec(
        node,
        argv,
        wait_for=["HookAnalyzer"],
        restart="permanent",
        env=env,
        shutdown=shutdown,
        endpoint=endpoint,
    )


# =====================================================================================
# The ledger: what survives an actor's restart inside the process
# =====================================================================================


class _Ledger:
    """Counters, hooks, sinks and the exit switch of one analyzer process.

    Owned by `main`; handed to every actor, so a restarted actor carries on counting.
    """

    def __init__(self, run_dir: Path, world: int, timeout_s: float, base_dir: str):
        self.run_dir, self.world, self.timeout_s, self.base_dir = (
            run_dir,
            world,
            timeout_s,
            base_dir,
        )
        self.hooks = {}  # name -> (spec, Hook), in load order
        # name -> (after, until): the steps a hook attached or detached live may see
        # (RUN/hooks_live.jsonl); a hook not named there sees every step
        self.windows: dict[str, tuple[int, float]] = {}
        self.disabled = {}  # name -> why
        self.started = set()  # worker names started once (a later init is a restart)
        self.per_hook = {}  # name -> HookStats, shared by every worker of that hook
        self.counts = dict.fromkeys(
            ("steps_analyzed", "dropped", "stale", "rejected", "skipped", "restarts"), 0
        )
        self.last_step = 0  # newest step analyzed or dropped: older samples are stale
        self.first_step = None  # the first step this process got a sample of
        # per rank (str), in samples: what became of each sample received from it
        self.per_rank = collections.defaultdict(lambda: dict.fromkeys(SAMPLE_FATES, 0))
        self.flushed = set()  # ranks whose outbox flushed ("flush"): they are done
        self.sinks = None  # a hooks.Sinks, once open
        self.exit_reason = None
        self.exit_scope = None
        self.hangs = {}  # name -> hangs in this run (all processes), from the quarantine
        # hooks.jsonl already holds records when this process starts: an earlier analyzer
        # process of the run (or of the run it resumes) wrote them, and the state its
        # hooks kept is gone -- every hook's series restarts here (HookWorker)
        self.series_restart = False
        self.restarted_at = {}  # name -> the first step of its restarted series
        self.stats_waiting = 0  # "stats" calls settling: an exit waits for their reply
        # id(sample) -> the rank's call waiting for that sample's final fate: the reply
        # is the rank's credit to offer another sample (link.HookOutbox)
        self.waiting = {}

    def open(self, specs: list):
        from pipelines.hooks import ANALYZER, HooksLog, load_hooks
        from pipelines.hooks.tensorboard import EventWriter

        hung = _read_quarantine(self.run_dir)
        self.hangs = dict(hung)
        for spec in specs:
            try:
                loaded = load_hooks([spec], base_dir=self.base_dir)
            except Exception as exc:  # a broken script must not stop the other hooks
                _log.error("[HookAnalyzer] hooks %r not loaded: %s", spec, _one_line(exc))
                continue
            for hook in loaded:
                if hook.kind != ANALYZER:
                    continue
                if hook.name in self.hooks:
                    _log.error(
                        "[HookAnalyzer] hook %r loaded twice: the second is ignored", hook.name
                    )
                    continue
                self.hooks[hook.name] = (spec, hook)
                self.per_hook[hook.name] = HookStats()
                # run-wide: a hang ends the process that saw it (the quarantine file)
                self.per_hook[hook.name].timeouts = hung.get(hook.name, 0)
                if hung.get(hook.name, 0) >= MAX_HANGS:
                    self.disable(hook.name, f"hung {hung[hook.name]} times in this run")
        try:
            self.series_restart = (self.run_dir / "hooks.jsonl").stat().st_size > 0
        except OSError:
            self.series_restart = False
        self.tb = EventWriter(self.run_dir / "tb")
        self.sinks = Sinks([HooksLog(self.run_dir / "hooks.jsonl"), self.tb])

    def open_live(self) -> list[str]:
        """Read RUN/hooks_live.jsonl again: the windows of the hooks attached or detached
        live, and the attached hooks not loaded yet (loaded now); their names."""
        from pipelines.hooks import ANALYZER, load_hooks
        from pipelines.store.overrides import hook_windows, read_live_hooks

        records = read_live_hooks(self.run_dir)
        self.windows = hook_windows(records)
        new = []
        for rec in records:
            name = rec["name"]
            if rec["action"] != "attach" or name in self.hooks:
                continue
            try:
                loaded = load_hooks([rec["spec"]], base_dir=self.base_dir)
                hook = next(h for h in loaded if h.name == name and h.kind == ANALYZER)
            except Exception as exc:  # e.g. the script changed since it was attached
                _log.error("[HookAnalyzer] hook %r not attached: %s", name, _one_line(exc))
                continue
            self.hooks[name] = (rec["spec"], hook)
            self.per_hook[name] = HookStats()
            new.append(name)
        return new

    def active(self, name: str, step: int) -> bool:
        """Whether hook `name` is attached at `step` (see `windows`)."""
        after, until = self.windows.get(name, (0, math.inf))
        return after < step <= until

    def disable(self, name: str, why: str):
        """Call hook `name` no more in this process (logged once)."""
        if name not in self.disabled:
            self.disabled[name] = why
            _log.warning("[HookAnalyzer] hook %r disabled: %s", name, why)
        stats = self.per_hook.get(name)
        if stats is not None and stats.state is HookState.ACTIVE:  # HUNG says more
            stats.state = HookState.DISABLED

    def hung(self, name: str):
        """Remember the hang on disk, and ask the process to exit (a fresh one reclaims
        the thread) once the current step's records are written."""
        counts = _read_quarantine(self.run_dir)
        counts[name] = counts.get(name, 0) + 1
        self.hangs[name] = counts[name]
        tmp = self.run_dir / (QUARANTINE + ".tmp")
        tmp.write_text(json.dumps(counts))
        os.replace(tmp, self.run_dir / QUARANTINE)
        self.exit_reason = self.exit_reason or f"hook {name!r} hung"

    def exit_if_asked(self):
        if self.exit_reason and self.exit_scope is not None and not self.stats_waiting:
            _log.warning("[HookAnalyzer] %s: restarting the analyzer process", self.exit_reason)
            self.exit_scope.cancel()

    def write(self, records: list, step: int, names: list):
        """The records of an analysed step to the sinks, and to TensorBoard the
        fraction analysed so far of each hook in `names` (the hooks due at `step`)."""
        self.sinks.write(records)
        try:
            for name in names:
                self.tb.add_scalar(f"{name}/fraction_analysed", self.fraction(name, step), step)
            self.tb.flush()
        except Exception as exc:  # as for any sink: count it, go on
            self.sinks.errors += 1
            _log.error("[HookAnalyzer] sink EventWriter failed: %s", _one_line(exc))

    def steps_due(self, name: str, upto: int) -> int:
        """How many steps hook `name` asked for, from this process's first sample to
        `upto` (a restarted process counts from its own start, as its counters do)."""
        every = self.hooks[name][1].every
        start = (self.first_step or 1) - 1
        return max(upto // every - start // every, 0)

    def fraction(self, name: str, upto: int) -> float:
        """The fraction of hook `name`'s due steps up to `upto` it was run on."""
        due = self.steps_due(name, upto)
        return self.per_hook[name].calls / due if due else math.nan

    def fate(self, samples, fate: str):
        """Count `fate` for each of `samples` (HookSamples), per rank; a final fate
        answers the rank's call that brought the sample (its credit comes back)."""
        for s in samples:
            self.per_rank[str(s.rank)][fate] += 1
            if fate in FINAL_FATES and (from_ := self.waiting.pop(id(s), None)) is not None:
                from_.reply(fate)

    def release_waiting(self, why: str):
        """Answer every waiting call (the actor holding their samples restarted)."""
        waiting, self.waiting = self.waiting, {}
        for from_ in waiting.values():
            from_.reply(why)

    def stats(self) -> dict:
        hooks = self.per_hook.values()
        return {
            **self.counts,
            "hook_errors": sum(h.errors for h in hooks),
            "timeouts": sum(h.timeouts for h in hooks),
            "sink_errors": self.sinks.errors if self.sinks else 0,
            "ranks": {rank: dict(c) for rank, c in sorted(self.per_rank.items())},
            "hooks": {
                name: {
                    **c.as_dict(),
                    "steps_due": self.steps_due(name, self.last_step),
                    "fraction_analysed": _json_float(self.fraction(name, self.last_step)),
                    "restarted_at": self.restarted_at.get(name),
                }
                for name, c in self.per_hook.items()
            },
            "disabled": dict(self.disabled),
            "hangs": dict(self.hangs),
            "pid": os.getpid(),
        }

    def close(self):
        if self.sinks is not None:
            self.sinks.close()


def _read_quarantine(run_dir: Path) -> dict:
    try:
        data = json.loads((run_dir / QUARANTINE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, int)}


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 6)


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# =====================================================================================
# HookWorker: one hook, alone with its thread
# =====================================================================================


class HookWorker(actors.Actor):
    """Runs one analyzer hook on the contexts the HookAnalyzer calls it with.

    An actor for failure isolation: its hook runs in its own worker thread (a hang
    holds up no other hook), and a raise crashes the worker alone: its supervisor
    restarts it with the hook's script reloaded, or disables the hook (see the failure
    policy in the `pipelines.hooks` doc). Its counters (`ledger.per_hook`) outlive it.

    handle_call(("run", ctx)) -> a hooks.jsonl record, or None (nothing to say).

    A restarted series: a worker started after an earlier one of its hook (in this
    process, or in an earlier analyzer process: `_Ledger.series_restart`) runs a hook
    whose state is fresh. Its series begins at the first step it is called on, S: the
    hook sees `ctx.series_start` = S - every (its first sample counts for one sampling
    period, as at the run's start) and each record it writes carries "restarted_at": S,
    as does summary.json's hooks.analyzer.hooks.<name>.restarted_at.
    """

    mailbox_size = 4

    def __init__(self, ledger: _Ledger, name: str):
        self.ledger, self.name = ledger, name

    async def init(self):
        from pipelines.hooks import AnalyzerRunner, load_hooks

        spec, hook = self.ledger.hooks[self.name]
        if self.name in self.ledger.started:
            self.ledger.counts["restarts"] += 1
            try:  # a fresh copy of the script: no state left over from the crash
                fresh = load_hooks([spec], base_dir=self.ledger.base_dir)
                hook = next(h for h in fresh if h.name == self.name)
            except Exception as exc:
                self.ledger.disable(self.name, f"reload failed: {_one_line(exc)}")
        self.restarted = self.name in self.ledger.started or self.ledger.series_restart
        self.restarted_at = None  # the first step of this worker's series, if restarted
        self.ledger.started.add(self.name)
        self.hook = hook
        self.runner = AnalyzerRunner(
            [hook],
            timeout_s=self.ledger.timeout_s,
            stats=self.ledger.per_hook,
            label=f"HookAnalyzer {self.name}",
        )

    async def handle_call(self, request, from_):
        match request:
            case ("run", ctx):
                return await self._run(ctx)
        raise ValueError(f"HookWorker takes ('run', ctx), got {request!r:.80}")

    async def _run(self, ctx):
        if self.restarted:
            if self.restarted_at is None:
                self.restarted_at = self.ledger.restarted_at[self.name] = ctx.step
            start = max(self.restarted_at - self.hook.every, 0)
            ctx = dataclasses.replace(ctx, series_start=start)
        record = await trio.to_thread.run_sync(
            self.runner.run_hook, self.hook, ctx, abandon_on_cancel=True
        )
        if record is not None and self.restarted_at is not None:
            record["restarted_at"] = self.restarted_at
        if self.runner.needs_restart:
            self.ledger.hung(self.name)
            self.ledger.disable(self.name, "hung: waiting for the process restart")
            return record
        if record is not None and "error" in record:  # a crash: the supervisor decides
            raise actors.Stop(f"hook {self.name!r} failed at step {ctx.step}", reply=record)
        return record

    async def terminate(self, reason):
        self.runner.close()


# =====================================================================================
# HookAnalyzer: samples in, steps out
# =====================================================================================


class HookAnalyzer(actors.Actor):
    """Assembles each step from the ranks' HookSamples and has it analyzed.

    An actor for state and concurrency: the partial steps of several ranks, received
    while the previous step is being analyzed. A HookSample comes as a call (from a
    rank's HookOutbox: answered with the sample's final fate once it has one -- the
    rank's credit for its next sample) or as a cast. Calls: "stats" -> the process's
    counters (see the module doc).
    """

    mailbox_size = 64

    def __init__(self, ledger: _Ledger):
        self.ledger = ledger

    async def init(self):
        if "HookAnalyzer" in self.ledger.started:
            self.ledger.counts["restarts"] += 1
        self.ledger.started.add("HookAnalyzer")
        self.ledger.release_waiting("lost")  # samples of the previous incarnation
        self.pending = {}  # step -> {rank: HookSample}, incomplete
        self.pending_since = {}  # step -> when its first sample arrived
        self.ready = None  # (step, {rank: sample}): complete, waiting for the analysis task
        self.analyzing = False
        self.in_analysis = None  # the group being analyzed
        self.last_arrival = trio.current_time()
        self.wake = trio.Event()
        self.nursery.start_soon(self._analysis_loop)

    # ---- receiving -------------------------------------------------------------------

    async def handle_cast(self, msg):
        self._receive(msg)

    def _receive(self, msg):
        if isinstance(msg, HookSample):
            self.ledger.fate([msg], "received")
        problem = self._check(msg)
        if problem:
            self.ledger.counts["rejected"] += 1
            if isinstance(msg, HookSample):
                self.ledger.fate([msg], "rejected")
            self.log.warning("rejected a sample: %s", problem)
            return
        self.last_arrival = trio.current_time()
        self._take(msg)

    async def handle_call(self, request, from_):
        if isinstance(request, HookSample):  # answered by ledger.fate, once final
            self.ledger.waiting[id(request)] = from_
            self._receive(request)
            return actors.NOREPLY
        if request == "stats":
            self.ledger.stats_waiting += 1
            self.nursery.start_soon(self._settled_stats, from_)
            return actors.NOREPLY
        match request:
            case ("flush", rank):
                return self._flushed(rank)
            case "hooks_changed":  # the run attached or detached a hook live
                for name in self.ledger.open_live():
                    await self.nursery.start(_attached, _hook_spec(self.ledger, name))
                return sorted(self.ledger.hooks)
        raise ValueError(
            f"HookAnalyzer answers 'stats', 'hooks_changed' or ('flush', rank), got {request!r:.80}"
        )

    def _flushed(self, rank) -> dict:
        """A rank is done and its outbox empty: the samples it sent before this call
        (same connection, same mailbox, in order) have all been taken. Answer what this process
        received from that rank, so that the rank can count what never arrived."""
        ledger = self.ledger
        ledger.flushed.add(str(rank))
        if len(ledger.flushed) >= ledger.world:  # every rank is done training
            _take_the_cpu_back()
        return dict(ledger.per_rank[str(rank)])

    async def _settled_stats(self, from_):
        """Reply to "stats" once settled (see the module doc), or at the deadline."""
        ledger = self.ledger
        _take_the_cpu_back()
        try:
            with trio.move_on_after(min(ledger.timeout_s + 1.0, SETTLE_MAX_S)):
                while (
                    self.analyzing
                    or self.ready is not None
                    or trio.current_time() - self.last_arrival < SETTLE_QUIET_S
                ):
                    await trio.sleep(0.02)
            stats = ledger.stats()
            stats["pending"] = len(self.pending) + (self.ready is not None)
            held = [s for group in self.pending.values() for s in group.values()]
            for group in (self.ready and self.ready[1], self.in_analysis):
                held += list((group or {}).values())
            for rank, counts in stats["ranks"].items():
                counts["pending"] = sum(1 for s in held if str(s.rank) == rank)
            from_.reply(stats)
        finally:
            ledger.stats_waiting -= 1
            ledger.exit_if_asked()

    def _check(self, s) -> str | None:
        if not isinstance(s, HookSample):
            return f"expected a HookSample, got {type(s).__name__}"
        if s.world != self.ledger.world or not 0 <= s.rank < s.world:
            return f"rank {s.rank} of world {s.world}; this analyzer takes {self.ledger.world}"
        n = np.asarray(s.rank_grad).size
        if not 0 <= s.lo <= s.hi <= n:
            return f"rank {s.rank}: shard [{s.lo}, {s.hi}) outside [0, {n})"
        for field in ("grad", "params", "update"):
            size = np.asarray(getattr(s, field)).size
            if size != s.hi - s.lo:
                return f"rank {s.rank}: {field} has {size} values for shard [{s.lo}, {s.hi})"
        if s.step < 1:
            return f"rank {s.rank}: step {s.step} (steps are 1-based)"
        return None

    def _take(self, s: HookSample):
        ledger = self.ledger
        if ledger.first_step is None:
            ledger.first_step = s.step
        if s.step <= ledger.last_step:
            ledger.counts["stale"] += 1
            ledger.fate([s], "stale")
            return
        if s.step not in self.pending:
            self.pending_since[s.step] = trio.current_time()
        group = self.pending.setdefault(s.step, {})
        if s.rank in group:  # a second sample of the rank for the step: the first is old
            ledger.fate([group[s.rank]], "stale")
        group[s.rank] = s
        if len(group) < ledger.world:
            while len(self.pending) > MAX_PENDING_STEPS:
                self._drop(min(self.pending))
            return
        del self.pending[s.step]
        self.pending_since.pop(s.step, None)
        for older in [step for step in self.pending if step < s.step]:
            self._drop(older)
        if self.ready is not None:  # complete but never started: behind
            ledger.counts["dropped"] += 1
            ledger.fate(self.ready[1].values(), "dropped")
        self.ready = (s.step, group)
        ledger.last_step = max(ledger.last_step, s.step)
        self.wake.set()

    def _drop(self, step):
        self.pending_since.pop(step, None)
        self.ledger.fate(self.pending.pop(step).values(), "dropped")
        self.ledger.counts["dropped"] += 1
        self.ledger.last_step = max(self.ledger.last_step, step)

    def _drop_abandoned(self):
        """Drop incomplete steps nobody completed in PENDING_MAX_S (a rank restarted
        or gave up on it): their samples' calls get their answer, the ranks their credit."""
        if len(self.ref.mailbox):  # unread samples (a starved process) may complete them
            return
        now = trio.current_time()
        for step in [t for t, since in self.pending_since.items() if now - since > PENDING_MAX_S]:
            self._drop(step)

    # ---- analysing -------------------------------------------------------------------

    async def _analysis_loop(self):
        while True:
            with trio.move_on_after(PENDING_MAX_S / 2):
                await self.wake.wait()
            self._drop_abandoned()
            if not self.wake.is_set():
                continue
            self.wake = trio.Event()
            while self.ready is not None:
                (step, group), self.ready = self.ready, None
                self.analyzing, self.in_analysis = True, group
                fate = "dropped"  # cancelled: the process is going down
                try:
                    fate = await self._analyze(step, group)
                finally:
                    self.analyzing, self.in_analysis = False, None
                    self.ledger.fate(group.values(), fate)
                self.ledger.exit_if_asked()

    async def _analyze(self, step: int, group: dict) -> str:
        """Analyze one complete step; the fate of its samples: "analyzed", "rejected"
        or "skipped" (no hook due: all disabled)."""
        ledger = self.ledger
        due = [
            name
            for name, (_, hook) in ledger.hooks.items()
            if hook.due(step) and name not in ledger.disabled and ledger.active(name, step)
        ]
        if not due:
            return "skipped"
        try:
            ctx = _context(step, [group[r] for r in sorted(group)])
        except (TypeError, ValueError) as exc:  # e.g. a layout that does not fit
            ctx = _one_line(exc)
        if isinstance(ctx, str):
            ledger.counts["rejected"] += 1
            self.log.warning("step %d rejected: %s", step, ctx)
            return "rejected"
        records = {}

        async def run(name):
            try:
                records[name] = await actors.call(
                    f"hook:{name}", ("run", ctx), timeout=ledger.timeout_s + 30.0
                )
            except (actors.ActorExited, actors.NoSuchActor, actors.CallTimeout):
                ledger.counts["skipped"] += 1  # its worker is restarting

        async with trio.open_nursery() as nursery:
            for name in due:
                nursery.start_soon(run, name)
        ordered = [records[n] for n in due if records.get(n) is not None]
        await trio.to_thread.run_sync(ledger.write, ordered, step, due)
        ledger.counts["steps_analyzed"] += 1
        return "analyzed"


def _context(step: int, samples: list):
    """The HookContext of one complete step, or a string saying why there is none."""
    from pipelines.hooks import HookContext

    first = samples[0]
    n = np.asarray(first.rank_grad).size
    bounds = sorted((s.lo, s.hi) for s in samples)
    covered = 0
    for lo, hi in bounds:  # shards tile [0, n): ZeRO shards, or whole copies in ddp
        if lo > covered:
            return f"shards {bounds} leave a gap at {covered}"
        covered = max(covered, hi)
    if covered != n or any(np.asarray(s.rank_grad).size != n for s in samples):
        return f"shards {bounds} do not cover the {n} parameters"
    flat = {
        k: np.empty(n, dtype=np.asarray(first.grad).dtype) for k in ("grad", "params", "update")
    }
    for s in samples:
        for key, buf in flat.items():
            buf[s.lo : s.hi] = getattr(s, key)
    layout = [tuple(e) for e in first.layout] if first.layout else [("params", 0, (n,))]
    return HookContext.from_flat(
        step,
        layout,
        flat["grad"],
        loss=first.loss,
        lr=first.lr,
        rank_grads={s.rank: s.rank_grad for s in samples},
        params=flat["params"],
        update=flat["update"],
        batch_size=first.batch_size,
        world_size=first.world,
    )


# =====================================================================================
# The process
# =====================================================================================


async def _serve(args) -> int:
    ledger = _Ledger(Path(args.run_dir), args.world, args.timeout, args.base_dir)
    try:
        ledger.open(json.loads(args.specs))
        ledger.open_live()  # the hooks attached live (a restarted process too)
        children = [_hook_spec(ledger, name) for name in ledger.hooks]
        children.append(HookAnalyzer.child_spec(ledger, name="HookAnalyzer"))
        async with actors.child_node():
            with trio.CancelScope() as scope:
                ledger.exit_scope = scope
                supervisor = actors.Supervisor(children, name="analyzer")
                async with trio.open_nursery() as nursery:
                    await nursery.start(supervisor.run)
                    # up (HookAnalyzer registered) at normal priority, so that a busy
                    # machine cannot starve the start-up; from now on only idle cores
                    _yield_the_cpu()
    finally:
        ledger.close()
    return EXIT_HUNG if ledger.exit_reason else 0


def _hook_spec(ledger: _Ledger, name: str) -> actors.ChildSpec:
    """Hook `name`'s worker under a supervisor of its own with the intensity
    `HOOK_RESTARTS`: a failing hook is restarted; one failing faster than that makes its
    supervisor give up, which disables the hook. Temporary, so giving up ends there and
    never charges the process's own restart budget."""
    restarts, seconds = HOOK_RESTARTS
    worker = HookWorker.child_spec(ledger, name, name=f"hook:{name}")
    supervisor = actors.Supervisor([worker], max_restarts=restarts, max_seconds=seconds)

    async def start(task_status=trio.TASK_STATUS_IGNORED):
        try:
            return await supervisor.run(task_status=task_status)
        except actors.RestartIntensityExceeded:
            ledger.disable(name, f"failed more than {restarts} times in {seconds:g} s")
            raise

    return actors.ChildSpec(id=f"hook:{name}", start=start, restart="temporary", type="supervisor")


async def _attached(spec: actors.ChildSpec, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A hook attached live: its worker's supervisor runs under the HookAnalyzer (so it
    ends with it); giving up disables the hook (as `_hook_spec` says), nothing more."""
    try:
        await spec.start(task_status=task_status)
    except actors.RestartIntensityExceeded:
        pass


def _yield_the_cpu():
    """SCHED_IDLE (Linux): run only on a core no rank wants, and be preempted at once
    when one does -- nice 10 still takes ~1/10 of a busy core and delays a waking rank.
    Where SCHED_IDLE is missing or refused, nice `NICE`. Every thread of the process
    (Linux schedules threads; threads started later inherit the caller's policy)."""
    for tid in _threads():
        try:
            os.setpriority(os.PRIO_PROCESS, tid, NICE)
        except (AttributeError, OSError):  # not permitted: the parent's priority
            pass
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            pass


def _threads() -> list[int]:
    """This process's thread ids (Linux), else [0]: the calling thread."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _take_the_cpu_back():
    """The ranks are done ("stats"): every thread back to SCHED_OTHER (still at nice
    `NICE`), so that settling is not starved by other work on the machine. Best effort."""
    if not hasattr(os, "SCHED_IDLE"):
        return
    for tid in _threads():
        try:
            if os.sched_getscheduler(tid) == os.SCHED_IDLE:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass


def main(argv=None) -> int:
    """python -m pipelines.hooks.process --run-dir D --world N --timeout S --specs JSON
    [--keys JSON]."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.hooks.process")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--specs", required=True, help="the hook specs as a JSON list")
    parser.add_argument("--base-dir", default=os.getcwd())
    parser.add_argument("--keys", help="a multi-node run's keyring plan (JSON)")
    args = parser.parse_args(argv)
    if args.keys:  # every tcp:// socket of this process is CURVE under node 0's keys
        from ..cluster.nodes import secure_rank

        secure_rank({"keys": json.loads(args.keys), "endpoints": []})
    logging.basicConfig(
        level=os.environ.get("ZEROTRAIN_ANALYZER_LOG", "WARNING"),
        format="%(name)s %(message)s",
        stream=sys.stderr,
    )
    # a terminal's Ctrl-C (and Slurm's or the user's stop signals) reach every process
    # of the run: the cluster decides how the run stops and ends this one (SIGTERM)
    for signum in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    return trio.run(_serve, args)


if __name__ == "__main__":
    sys.exit(main())
