"""The daemon: `zerotrain serve`. It owns the job table, the control endpoint, the HTTP
server and one job supervisor per running job.

The shape is OTP's, two levels above a rank::

    Daemon (this module, one trio loop)
    ├── control endpoint            requests -> handlers below, one at a time per client
    ├── scheduler                   starts queued jobs that fit the CPU budget
    ├── JobSupervisor per job       `zerotrain run` in its own process group
    └── HTTP server thread          reads snapshots this loop publishes, never the table

Every decision is written to the job table before it is acted on, so a daemon killed at
any point is followed by one that knows what was running: on start it kills whatever is
left of its predecessor's jobs (by their environment marker) and queues again every job
that was running, to resume from its last valid checkpoint. A job that was stopping
becomes what it was being stopped for (paused, stopped, cancelled), or queued when it
was the daemon's own shutdown that stopped it.

The daemon's SIGTERM or SIGINT stops every running job the planned way (SIGTERM to its
process group, SIGKILL after ``grace`` seconds), records them as queued, and exits; the
next `zerotrain serve` resumes them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path

import trio

from ..store.rundir import write_json_atomic
from . import notify, protocol
from .control import serve_control
from .jobs import FINAL, Job, JobState, JobTable
from .scheduler import to_start
from .statedir import RECENT_ENDED, DaemonUsageError, StateDir
from .supervisor import (
    EXIT_STOPPED,
    JOB_NICE,
    JobSupervisor,
    job_marker,
    kill_processes,
    launcher_argv,
)
from .warm import WarmPool

__all__ = ["Daemon"]

log = logging.getLogger("zerotrain.daemon")

_PIPELINE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_VERBS = ("pause", "resume", "stop", "cancel")
_LOG_CHUNK = 1 << 18
LIVE_START_SECONDS = 60.0  # a job just started: until its run has written its plan
LIVE_CALL_SECONDS = 150.0  # a round, a step and a checkpoint's write and verification


class Daemon:
    def __init__(
        self,
        state_dir: Path,
        *,
        cpus: int,
        http: str | None,
        grace: float = 25.0,
        job_nice: int = JOB_NICE,
    ):
        self.state = StateDir(state_dir)
        self.cpus = cpus
        self.job_nice = job_nice
        self.http_address = http
        self.grace = grace
        self.table: JobTable | None = None
        self.running: dict[int, JobSupervisor] = {}
        self.closing = False
        self.ready = False
        self.http_bound: str | None = None
        self.snapshot: dict = {"jobs": [], "daemon": {}}
        self._wake = trio.Event()
        self.started_at = time.time()
        self.control_stats = None
        # a job runner started before its job (pipelines.daemon.warm), on room: _warm_room
        self.warm = WarmPool(
            self.state.path,
            launch=launcher_argv(job_nice),
            log_path=self.state.path / "warm.log",
        )

    # ---- life ----------------------------------------------------------------------

    def open(self) -> None:
        """Take the state dir and open the table (DaemonUsageError: one line, exit 2)."""
        self.state.acquire()
        try:
            self.table = JobTable(self.state.db_path)
        except DaemonUsageError:
            self.state.release()
            raise

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT (call :meth:`open` first)."""
        try:
            await self._recover()
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    self.control_stats = await nursery.start(
                        serve_control, self.state.socket_path, self.handle
                    )
                    http = None
                    if self.http_address:
                        from .http import start_http

                        http = start_http(self.http_address, self)
                        self.http_bound = http.address
                        host, _, port = http.address.rpartition(":")
                        write_json_atomic(self.state.http_path, {"host": host, "port": int(port)})
                        log.info("[daemon] http on http://%s/", self.http_bound)
                    nursery.start_soon(self._scheduler)
                    nursery.start_soon(self._publisher)
                    nursery.start_soon(self.warm.run, self._warm_room)
                    nursery.start_soon(notify.watchdog)
                    self.ready = True
                    self._publish()
                    notify.notify("READY=1\nSTATUS=serving")
                    log.info(
                        "[daemon] pid %d serving %s (%d cpus)",
                        os.getpid(),
                        self.state.path,
                        self.cpus,
                    )
                    async for signum in signals:
                        log.info("[daemon] %s: stopping jobs", signal.Signals(signum).name)
                        break
                    notify.notify("STOPPING=1")
                    self.ready = False
                    await self._shutdown()
                    if http is not None:
                        http.close()
                    nursery.cancel_scope.cancel()
        finally:
            try:
                self.state.http_path.unlink()
            except FileNotFoundError:
                pass
            self.table.close()
            self.state.release()

    async def _recover(self) -> None:
        killed = await kill_processes(job_marker(self.state.path, None))
        if killed:
            log.info("[daemon] killed %d process(es) left by an earlier daemon", killed)
        for job in self.table.all({JobState.RUNNING, JobState.STOPPING}):
            if job.state == JobState.RUNNING or job.want in (None, JobState.QUEUED.value):
                new = JobState.QUEUED
            else:
                new = JobState(job.want)
            self.table.update(job.id, state=new, want=None, pid=None)
            log.info("[daemon] job %d was %s when its daemon died: now %s", job.id, job.state, new)

    async def _shutdown(self) -> None:
        self.closing = True
        self.warm.close()
        for job_id, sup in list(self.running.items()):
            job = self.table.get(job_id)
            if job.state == JobState.RUNNING:
                self.table.update(job_id, state=JobState.STOPPING, want=JobState.QUEUED.value)
            sup.request_stop()
        with trio.move_on_after(self.grace + 15):
            while self.running:
                await trio.sleep(0.05)

    # ---- scheduling ----------------------------------------------------------------

    def _wake_scheduler(self) -> None:
        self._wake.set()

    def cpus_in_use(self) -> int:
        return sum(sup.job.ranks for sup in self.running.values())

    def _warm_room(self) -> tuple[int, int]:
        """(CPUs a warm job runner may warm on now, CPUs of the budget free): none while
        the daemon stops or a job starts; else the CPUs that are neither a running job's
        in the scheduler's count nor beyond the machine's (pipelines.daemon.warm)."""
        if self.closing or any(sup.starting() for sup in self.running.values()):
            return 0, 0
        used = self.cpus_in_use()
        free = self.cpus - used
        return min(free, len(os.sched_getaffinity(0)) - used), free

    async def _scheduler(self) -> None:
        async with trio.open_nursery() as jobs:
            while True:
                self._wake = trio.Event()  # before the look: a wake during it is kept
                if not self.closing:
                    queued = self.table.all({JobState.QUEUED})
                    for job in to_start(queued, self.cpus_in_use(), self.cpus):
                        self._start(jobs, job)
                with trio.move_on_after(1.0):
                    await self._wake.wait()

    def _start(self, nursery, job: Job) -> None:
        job_dir = self.state.job_dir(job.id)
        config_path = job_dir / f"{job.pipeline}.toml"
        now = time.time()
        self.table.update(
            job.id,
            state=JobState.RUNNING,
            want=None,
            attempts=job.attempts + 1,
            restarts=job.attempts,  # every start after the first resumes
            started=job.started or now,
            exit_code=None,
            error=None,
        )
        job = self.table.get(job.id)
        sup = JobSupervisor(
            job,
            self.state.path,
            config_path,
            job_dir / "job.log",
            self.grace,
            on_start=lambda pid: self.table.update(job.id, pid=pid),
            warm=self.warm,
            nice=self.job_nice,
        )
        self.running[job.id] = sup
        nursery.start_soon(self._run_job, sup)

    async def _run_job(self, sup: JobSupervisor) -> None:
        job_id = sup.job.id
        code, error = None, None
        try:
            code = await sup.run()
        except Exception as err:  # could not start (OSError, a vanished run dir...)
            log.exception("[job %d] supervisor failed", job_id)
            error = f"the job supervisor failed: {type(err).__name__}: {err}"
        finally:
            del self.running[job_id]
            with trio.CancelScope(shield=True):
                self._finish(job_id, code, error, sup)
            self._wake_scheduler()

    def _finish(self, job_id: int, code: int | None, error: str | None, sup) -> None:
        job = self.table.get(job_id)
        fields = {"pid": None, "exit_code": code, "step": sup.progress.step, "want": None}
        if sup.progress.loss is not None:
            fields["loss"] = sup.progress.loss
        if code == 0:
            state = JobState.DONE
            summary = _read_json(Path(job.run_dir) / "summary.json")
            fields["summary"] = summary
            if summary and isinstance(summary.get("steps"), int):
                fields["step"] = summary["steps"]
        elif job.want:
            state = JobState(job.want)
        elif code == EXIT_STOPPED:
            state = JobState.STOPPED
        else:
            state = JobState.FAILED
            fields["error"] = error or _failure_line(sup.log_path, code)
        if state in FINAL:
            fields["ended"] = time.time()
        fields["state"] = state
        self.table.update(job_id, **fields)
        log.info("[job %d] %s (exit %s)", job_id, state, code)
        self._publish()

    # ---- snapshots (read by the HTTP thread) ----------------------------------------

    def job_view(self, job: Job) -> dict:
        out = job.public()
        sup = self.running.get(job.id)
        if sup is not None:
            p = sup.progress
            pid = sup.process.pid if sup.process is not None else None
            out.update(step=p.step, loss=p.loss, last_step_t=p.last_t, pid=pid)
            out["runner"] = sup.runner  # "warm-N": the daemon's N-th warm runner; "cold"
            out["samples_per_s"] = p.samples_per_s
        return out

    def _publish(self) -> None:
        jobs = []
        for job in self.table.recent(RECENT_ENDED):
            view = self.job_view(job)
            sup = self.running.get(job.id)
            if sup is not None:
                p = sup.progress
                view["losses"] = list(p.losses)
                view["evals"] = list(p.evals)
                view["step_hist"] = list(p.step_hist)
                view["step_sum"] = p.step_sum
                view["steps_seen"] = p.steps_seen
                view["batch_size"] = job.config.get("train", {}).get("batch_size", 0)
                tel = sup.telemetry
                view["ranks_live"] = [
                    {
                        "rank": r,
                        "pid": rec.get("pid"),
                        "step": rec.get("step"),
                        "compute_per_step": rec.get("compute_per_step"),
                        "rss_bytes": rec.get("rss_bytes"),
                        "t": rec.get("t"),
                        "phase": rec.get("phase"),
                        "since": rec.get("since"),
                        **tel.rank_faults.get(r, {"restarts": {}}),
                    }
                    for r, rec in sorted(tel.ranks.items())
                ]
                view["restarts_by_reason"] = dict(tel.restarts)
                view["checkpoint_s"] = tel.checkpoint_s
                view["checkpoint_step"] = tel.checkpoint_step
                view["hook_errors"] = dict(sup.hooks.errors)
                view["attempt_started"] = sup.started_at
                cluster = job.config.get("cluster", {})
                view["heartbeat_timeout"] = cluster.get("heartbeat_timeout", 2.0)
            jobs.append(view)
        self.snapshot = {"jobs": jobs, "daemon": self.info()}  # one reference swap

    async def _publisher(self) -> None:
        while True:
            await trio.sleep(1.0)
            self._publish()
            for job_id, sup in list(self.running.items()):
                if sup.progress.step:
                    self.table.update(job_id, step=sup.progress.step, loss=sup.progress.loss)

    def info(self) -> dict:
        return {
            "pid": os.getpid(),
            "state_dir": str(self.state.path),
            "cpus": self.cpus,
            "cpus_in_use": self.cpus_in_use(),
            "http": self.http_bound,
            "ready": self.ready,
            "closing": self.closing,
            "started": self.started_at,
            "jobs": self.table.counts(),
            "control": dict(vars(self.control_stats)) if self.control_stats else {},
            "warm": self.warm.stats(),
        }

    # ---- requests ------------------------------------------------------------------

    async def handle(self, request):
        if isinstance(request, protocol.Submit):
            return await self._submit(request)
        if isinstance(request, protocol.ListJobs):
            jobs = self.table.all(None if request.all else set(JobState) - FINAL)
            return [self.job_view(j) for j in jobs]
        if isinstance(request, protocol.JobStatus):
            if not request.job:
                jobs = self.table.recent(RECENT_ENDED)
                return {"daemon": self.info(), "jobs": [self.job_view(j) for j in jobs]}
            job = self._find(request.job, "status")
            return {**self.job_view(job), "config": job.config}
        if isinstance(request, protocol.Control):
            return self._control(request.verb, request.job)
        if isinstance(request, protocol.ReadLog):
            return self._read_log(request)
        if isinstance(request, protocol.DaemonInfo):
            return self.info()
        if isinstance(request, protocol.Checkpoint | protocol.SetKey | protocol.HookRequest):
            return await self._live(request)
        raise protocol.ControlError(f"no handler for {type(request).__name__}")

    def _find(self, ref: str, verb: str) -> Job:
        job = None
        if ref.isdigit():
            job = self.table.get(int(ref))
        else:
            job = self.table.named(ref)
        if job is None:
            known, total = self.table.newest(20), sum(self.table.counts().values())
            listing = ", ".join(f"{j.id} ({j.name}, {j.state})" for j in known)
            more = f" and {total - 20} older" if total > 20 else ""
            raise DaemonUsageError(
                f"zerotrain {verb}: unknown job {ref!r}; "
                + (f"known jobs: {listing}{more}" if known else "no jobs have been submitted")
            )
        return job

    async def _submit(self, req: protocol.Submit) -> dict:
        if self.closing:
            raise DaemonUsageError("zerotrain submit: the daemon is shutting down; nothing queued")
        if not _PIPELINE_NAME.fullmatch(req.pipeline):
            raise DaemonUsageError(
                f"zerotrain submit: pipeline name {req.pipeline!r} must match "
                f"{_PIPELINE_NAME.pattern}"
            )
        if not os.path.isabs(req.cwd) or not os.path.isdir(req.cwd):
            raise DaemonUsageError(f"zerotrain submit: cwd {req.cwd!r} is not a directory")
        for spec in req.hooks:
            if not spec or not (spec.startswith("builtin") or os.path.isabs(spec)):
                raise DaemonUsageError(
                    f"zerotrain submit: hook {spec!r}: expected an absolute PATH[:NAME] or "
                    "builtin[:NAME]"
                )
        incoming = self.state.path / "jobs" / f".incoming-{os.getpid()}-{time.monotonic_ns()}"
        incoming.mkdir(parents=True)
        try:
            path = incoming / f"{req.pipeline}.toml"
            path.write_text(req.config_toml)
            cfg = await trio.to_thread.run_sync(_load, path, list(req.overrides))
            if cfg.cluster.ranks > self.cpus:
                raise DaemonUsageError(
                    f"zerotrain submit: the job needs {cfg.cluster.ranks} CPUs (one per rank), "
                    f"the daemon's budget is {self.cpus} (zerotrain serve --cpus N); "
                    "nothing queued"
                )
            from ..config import config_hash

            argv = [a for o in req.overrides for a in ("--set", o)]
            argv += [a for h in req.hooks for a in ("--hook", h)]
            job = self.table.add(
                name=req.name,
                pipeline=req.pipeline,
                config=cfg.to_dict(),
                config_hash=config_hash(cfg),
                argv=argv,
                cwd=req.cwd,
                ranks=cfg.cluster.ranks,
                priority=req.priority,
                run_dir_for=self.state.default_run_dir,
            )
            job_dir = self.state.job_dir(job.id)
            if job_dir.exists():  # a table moved away and started anew: keep the old files
                job_dir.rename(job_dir.with_name(f"{job.id}.old-{time.time_ns()}"))
            incoming.rename(job_dir)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        log.info("[job %d] submitted: %s, %d ranks", job.id, job.pipeline, job.ranks)
        self._wake_scheduler()
        self._publish()
        return {"id": job.id, "name": job.name, "run_dir": job.run_dir}

    def _control(self, verb: str, ref: str) -> dict:
        if verb not in _VERBS:
            raise DaemonUsageError(
                f"zerotrain: unknown verb {verb!r}; accepted: {', '.join(_VERBS)}"
            )
        job = self._find(ref, verb)
        s = job.state
        sup = self.running.get(job.id)
        accepts = {
            "pause": "a queued or running job",
            "stop": "a queued, running or paused job",
            "cancel": "a queued, running, stopping, paused or stopped job",
            "resume": "a paused or stopped job",
        }[verb]
        new: dict = {}
        if verb == "resume" and s in (JobState.PAUSED, JobState.STOPPED):
            new = {"state": JobState.QUEUED}
        elif verb == "pause" and s == JobState.QUEUED:
            new = {"state": JobState.PAUSED}
        elif verb == "stop" and s in (JobState.QUEUED, JobState.PAUSED):
            new = {"state": JobState.STOPPED}
        elif verb == "cancel" and s in (JobState.QUEUED, JobState.PAUSED, JobState.STOPPED):
            new = {"state": JobState.CANCELLED, "ended": time.time()}
        elif s == JobState.RUNNING and verb in ("pause", "stop", "cancel"):
            want = {"pause": "paused", "stop": "stopped", "cancel": "cancelled"}[verb]
            new = {"state": JobState.STOPPING, "want": want}
        elif s == JobState.STOPPING and verb == "cancel":
            new = {"want": "cancelled"}
        else:
            raise DaemonUsageError(
                f"zerotrain {verb}: job {job.id} ({job.name}) is {s}; {verb} accepts {accepts}"
            )
        self.table.update(job.id, **new)
        if new.get("state") == JobState.STOPPING or "want" in new:
            if sup is not None:
                sup.request_stop()
        self._wake_scheduler()
        self._publish()
        return self.job_view(self.table.get(job.id))

    async def _live(self, req) -> dict:
        """Live control of a running job: a remote call to its run's Coordinator
        (pipelines.cluster.live) from a worker thread, so the daemon goes on serving."""
        from ..cluster import messages as msg
        from ..cluster.live import LiveError, call_run
        from ..config import ConfigError, check_live_override, from_resolved

        verb = {
            protocol.Checkpoint: "checkpoint",
            protocol.SetKey: "set",
            protocol.HookRequest: f"hook {getattr(req, 'action', '')}",
        }[type(req)]
        job = self._find(req.job, verb)
        sup = self.running.get(job.id)
        if job.state != JobState.RUNNING or sup is None:
            raise DaemonUsageError(
                f"zerotrain {verb}: job {job.id} ({job.name}) is {job.state}; {verb} accepts "
                "a running job"
            )
        in_process = job.ranks == 1 and "--hook" not in job.argv
        if in_process and not job.config.get("hooks", {}).get("specs"):
            raise DaemonUsageError(  # `zerotrain run --ranks 1` trains in one process
                f"zerotrain {verb}: job {job.id} ({job.name}) trains in one process (--ranks "
                "1), which has no control channel; live control needs --ranks 2 or more"
            )
        if verb == "set":
            try:  # the run checks again against its config of the moment
                check_live_override(from_resolved(job.config), req.key, req.value)
            except ConfigError as err:
                raise DaemonUsageError(f"zerotrain set: {err}; nothing changed") from None
            record = msg.SetOverride(req.key, req.value, req.at_step)
        elif isinstance(req, protocol.HookRequest):
            record = _hook_change(req)
        else:
            record = msg.CheckpointNow()
        run_dir = Path(job.run_dir)
        deadline = time.monotonic() + LIVE_START_SECONDS
        while True:  # the attempt may not have written its plan yet
            try:
                if os.stat(run_dir / "plan.json").st_mtime >= (sup.started_at or 0):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.running.get(job.id) is not sup:
                raise DaemonUsageError(
                    f"zerotrain {verb}: job {job.id} ({job.name}) has not started its "
                    f"ranks within {LIVE_START_SECONDS:g}s; nothing changed"
                )
            await trio.sleep(0.1)
        try:
            reply = await trio.to_thread.run_sync(
                lambda: call_run(run_dir, record, timeout=LIVE_CALL_SECONDS)
            )
        except LiveError as err:
            raise DaemonUsageError(f"zerotrain {verb}: job {job.id} ({job.name}): {err}") from None
        if "error" in reply:
            raise DaemonUsageError(
                f"zerotrain {verb}: job {job.id} ({job.name}): {reply['error']}; nothing changed"
            )
        log.info("[job %d] %s: %s", job.id, verb, reply)
        return {"id": job.id, "name": job.name, **reply}

    def _read_log(self, req: protocol.ReadLog) -> dict:
        job = self._find(req.job, "logs")
        path = self.state.job_dir(job.id) / "job.log"
        limit = min(max(req.limit, 0), _LOG_CHUNK) or _LOG_CHUNK
        data = b""
        try:
            with open(path, "rb") as f:
                f.seek(max(req.offset, 0))
                data = f.read(limit)
        except FileNotFoundError:
            pass
        return {
            "data": data,
            "offset": max(req.offset, 0) + len(data),
            "state": str(job.state),
            "ended": job.state in FINAL or job.state in (JobState.PAUSED, JobState.STOPPED),
        }


def _hook_change(req: protocol.HookRequest):
    """The run's HookChange record; DaemonUsageError (one line) for a request that
    cannot be one."""
    from ..cluster import messages as msg

    if req.action not in ("attach", "detach"):
        raise DaemonUsageError(
            f"zerotrain hook: unknown action {req.action!r}; accepted: attach, detach"
        )
    target = req.target
    if req.action == "attach" and not (target.startswith("builtin") or os.path.isabs(target)):
        raise DaemonUsageError(
            f"zerotrain hook attach: hook {target!r}: expected an absolute PATH[:NAME] or "
            "builtin[:NAME]"
        )
    try:
        return msg.HookChange(req.action, target)
    except msg.BadMessage as err:
        raise DaemonUsageError(f"zerotrain hook {req.action}: {err}") from None


def _load(path: Path, overrides: list[str]):
    from ..config import ConfigError, load_config

    try:
        return load_config(path, overrides)
    except ConfigError as err:
        raise DaemonUsageError(f"zerotrain submit: config error: {err}; nothing queued") from None


def _read_json(path: Path):
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _failure_line(log_path: Path, code: int | None) -> str:
    """The last 'zerotrain' line of the job's log (its one-line error), else the exit."""
    how = f"exit code {code}" if code is None or code >= 0 else f"killed by signal {-code}"
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 16384))
            tail = f.read().decode(errors="replace").splitlines()
    except OSError:
        return how
    for line in reversed(tail):
        if line.startswith("zerotrain"):
            return f"{line.strip()} ({how})"
    return how
