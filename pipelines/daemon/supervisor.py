"""The job supervisor: runs one job as a child `zerotrain run` and reports how it ended.

A job is a `zerotrain run` process, started in its own session and process group; the
job's whole cluster (coordinator, rank processes, analyzer) lives under it. So a job that
crashes, hangs or is killed touches no other job and not the daemon, and a job gets
exactly what `zerotrain run` gives: same config, seed and run dir => the same bits.

* start: ``zerotrain run CONFIG ARGS --run-dir RUN`` (a fresh start), or with
  ``--resume RUN`` once the run dir holds a valid checkpoint from an earlier attempt --
  handed to the daemon's warm job runner when one is ready (``pipelines.daemon.warm``:
  the same `zerotrain run`, started before the job with its imports done), else exec'd.
  A fresh start in a run dir left by an earlier attempt without a valid checkpoint moves
  that dir aside (``RUN.attempt-N``): a run starts in an empty dir or resumes, nothing in
  between.
* stop: SIGTERM to the job's process group, as a terminal's Ctrl-C reaches every
  process of a foreground job: `zerotrain run`'s planned stop (issue 17) agrees on a step
  and checkpoints. A job still running ``grace`` seconds later is SIGKILLed.
* the parent's death: the job's top process has PR_SET_PDEATHSIG = SIGKILL, set before
  it execs (a ``python -c`` launcher, so no code runs between fork and exec in the
  daemon, which has threads). The signal fires when the *thread* that forked the child
  ends, so the child is forked by the daemon's main thread (a plain ``Popen``, a few ms)
  and waited for through a pidfd: trio's ``open_process`` forks in a worker thread,
  which trio retires after a few idle seconds, and that would kill the job.
  Every process of a job carries ``ZEROTRAIN_DAEMON_JOB=<state dir>:<job id>`` in its
  environment (rank processes inherit it): that is how :func:`job_processes` finds what
  is left of a job after its top process is gone -- the daemon when a job ends, the next
  daemon for the jobs of one that was killed -- to kill it before the run dir is reused.
* progress: the supervisor reads new lines of the run's metrics.jsonl (appended line by
  line, pipelines.store.rundir) every :data:`POLL_SECONDS`, and what the run keeps in
  ``live/`` for it: each rank's ``rank-R.json`` (pid, steps completed, what it is doing
  and since when, cumulative compute seconds, RSS; replaced whole twice a second) and
  ``faults.json`` (recovery.json so far), plus the newest checkpoint's manifest time
  (:class:`Telemetry`). A rank is down when its process is gone, stopped (SIGSTOP: state
  T) or a zombie: :func:`rank_state` looks at /proc, so /readyz names a stopped rank at
  once, before the run's own heartbeat timeout has it killed and replaced. A rank is
  also down when it is *silent* (:func:`silent_ranks`): another rank waits in the step's
  collectives for it and it has either made no progress on that step, or written no
  telemetry, for the run's heartbeat timeout -- a hung computation whose process still
  heartbeats (the run notices that only after cluster.collective_timeout), or a rank
  whose event loop stopped.
* hook errors: the run's hooks.jsonl (appended by the analyzer process, across its
  restarts and the job's attempts) is read the same way; every record with an "error"
  (the hook raised, returned something that is not metrics, or hung: pipelines.hooks)
  counts one for its hook (:class:`HookLedger`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .statedir import DEFAULT_JOB_NICE

__all__ = [
    "EXIT_STOPPED",
    "JOB_NICE",
    "POLL_SECONDS",
    "HookLedger",
    "JobSupervisor",
    "JsonlTail",
    "Progress",
    "Telemetry",
    "alias_marker",
    "job_marker",
    "job_processes",
    "kill_processes",
    "launcher_argv",
    "read_live_ranks",
    "silent_ranks",
    "warm_marker",
]

log = logging.getLogger("zerotrain.daemon")

EXIT_STOPPED = 4  # `zerotrain run`: stopped by a planned stop, resumable (issue 17)
POLL_SECONDS = 0.5
LIVE_SECONDS = 0.5  # how often a rank replaces live/rank-R.json (pipelines.cluster.rank)
MARKER_VAR = "ZEROTRAIN_DAEMON_JOB"
# a job counts as starting (no warm runner warms beside it) until its first step, or this
# long after its top process started: a job that never steps does not stop warming for good
STARTING_SECONDS = 30.0
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Runs in the job's top process between fork and the real exec: set the parent-death
# signal, then make sure the parent did not die before it was set (the signal would
# never come), then lower the job's priority (below), then become `zerotrain run`.
_LAUNCHER = (
    "import ctypes, os, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0) != 0: sys.exit(70)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(71)\n"
    "nice = int(sys.argv[2])\n"
    "if nice:\n"
    "    os.nice(nice)\n"
    "    try:\n"
    "        with open('/proc/self/autogroup', 'w') as f: f.write(str(nice))\n"
    "    except OSError: pass\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[3:]])\n"
)
# A job's processes run JOB_NICE nice levels below the daemon (`zerotrain serve
# --job-nice`), and so do their session's scheduling group where Linux groups sessions
# (autogroup): training takes every CPU nothing else wants, while the daemon, its HTTP
# endpoint and an operator's `zerotrain status` are served first. Ranks compete with each
# other as before (one value for all), so a job alone on the machine trains as fast.
JOB_NICE = DEFAULT_JOB_NICE


def launcher_argv(nice: int) -> list[str]:
    """The start of a job process's command line: the launcher, told the daemon's pid and
    how many nice levels to go down (the job's own arguments follow)."""
    return [sys.executable, "-c", _LAUNCHER, str(os.getpid()), str(nice)]


def job_marker(state_dir: Path, job_id: int | None) -> str:
    """The environment entry that marks a job's processes (prefix of all jobs' if None)."""
    base = f"{MARKER_VAR}={Path(state_dir).resolve()}:"
    return base if job_id is None else f"{base}{job_id}"


def warm_marker(state_dir: Path, n: int) -> str:
    """The marker of the daemon's n-th warm job runner (pipelines.daemon.warm)."""
    return f"{job_marker(state_dir, None)}warm-{n}"


# job marker -> the marker of the warm runner running that job. A runner's processes
# show the runner's marker in /proc (their environment block is fixed at exec), so a
# job's processes are those holding either; set while the job's supervisor runs.
_aliases: dict[str, str] = {}


def alias_marker(marker: str, runner: str | None) -> None:
    """Count processes holding ``runner``'s marker as ``marker``'s (None: stop)."""
    if runner is None:
        _aliases.pop(marker, None)
    else:
        _aliases[marker] = runner


def _is_job_suffix(rest: bytes) -> bool:
    """What follows a state dir's marker prefix: a job id, or warm-N (a warm runner)."""
    return rest.isdigit() or (rest.startswith(b"warm-") and rest[5:].isdigit())


def _state_and_environment(pid: int) -> tuple[bytes | None, list[bytes]]:
    """Process ``pid``'s state letter (b"R", b"S", b"T", b"Z", ...) and its environment
    entries; (None, []) once it is gone or unreadable (another user's)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None, []
    end = stat.rfind(b")")  # the command name may itself hold ')'
    return stat[end + 2 : end + 3], env.split(b"\0")


def job_processes(marker: str) -> list[int]:
    """Pids of live processes whose environment holds ``marker`` (an exact entry, or a
    prefix ending in ':' for every job of a state dir). Other users' processes, and
    processes that end while we look, are skipped."""
    want = marker.encode()
    prefix = want.endswith(b":")
    alias = _aliases.get(marker, "").encode() or None
    found = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        state, env = _state_and_environment(int(entry.name))
        if state in (None, b"Z"):
            continue  # gone, or a zombie: already dead, waiting for its parent
        for item in env:
            if (
                (item.startswith(want) and _is_job_suffix(item[len(want) :]))
                if prefix
                else (item == want or item == alias)
            ):
                found.append(int(entry.name))
                break
    return found


async def kill_processes(marker: str, *, wait: float = 10.0) -> int:
    """SIGKILL every process holding ``marker`` until none is left (or ``wait`` runs out).
    Returns how many were killed."""
    killed = 0
    with trio.move_on_after(wait):
        while True:
            pids = job_processes(marker)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            await trio.sleep(0.05)
    return killed


def rank_state(pid: int, marker: str) -> str:
    """'up', or why the rank process ``pid`` is down: 'gone', 'stopped', 'zombie'.
    ``marker`` guards against a reused pid (the process must carry the job's marker, or
    that of the warm runner running the job)."""
    state, env = _state_and_environment(pid)
    alias = _aliases.get(marker)
    if state is None or not (
        marker.encode() in env or (alias is not None and alias.encode() in env)
    ):
        return "gone"
    if state in (b"T", b"t"):
        return "stopped"
    if state in (b"Z", b"X"):
        return "zombie"
    return "up"


def read_live_ranks(run_dir: Path, since: float) -> dict[int, dict]:
    """rank -> its live/rank-R.json (only those written since ``since``: this attempt's)."""
    live = Path(run_dir) / "live"
    try:
        names = os.listdir(live)
    except OSError:
        return {}
    out = {}
    for name in names:
        if name.startswith("rank-") and name.endswith(".json"):
            rec = _read_json_since(live / name, since)
            if rec is not None and isinstance(rec.get("rank"), int):
                out[rec["rank"]] = rec
    return out


def silent_ranks(records: dict[int, dict], timeout: float, now: float) -> dict[int, str]:
    """rank -> why it is silent, from the ranks' live records (pipelines.cluster.rank).

    A rank R is silent when another rank Q waits for it -- Q's phase is "collective"
    (its gradients computed, in the step's collectives) at a step R has not completed
    (Q's completed steps >= R's) -- and R either has written no record for ``timeout``
    (the run's heartbeat timeout) + LIVE_SECONDS, a record's normal age being up to one
    write interval (its event loop is not running: stopped, or blocked), or has been in
    the phase "step" (the step's own work: data, hooks, compute) for ``timeout``
    without completing it (a hung computation). A rank evaluating, joining or waiting
    for a stop decision is busy, not silent; so is every rank when none waits."""
    out = {}
    for r, rec in records.items():
        done = rec.get("step", 0)
        waiting = [
            q
            for q, other in sorted(records.items())
            if q != r and other.get("phase") == "collective" and other.get("step", 0) >= done
        ]
        if not waiting:
            continue
        quiet = now - float(rec.get("t", now))
        stuck = now - float(rec.get("since", now)) if rec.get("phase") == "step" else 0.0
        who = f"rank {waiting[0]} waits" if len(waiting) == 1 else f"ranks {waiting} wait"
        if quiet > timeout + LIVE_SECONDS:  # a running rank writes every LIVE_SECONDS
            out[r] = f"silent: no telemetry for {quiet:.1f}s, {who}"
        elif stuck > timeout:
            out[r] = f"silent: step {done + 1} not done in {stuck:.1f}s, {who}"
    return out


@dataclass
class Telemetry:
    """Per-rank and fault telemetry of the attempt, from the run dir's ``live/`` files
    (only those written since this attempt started) and its checkpoints."""

    ranks: dict = field(default_factory=dict)  # rank -> rank-R.json + compute_per_step
    restarts: dict = field(default_factory=dict)  # fault kind -> restarts in the run
    # rank -> {"restarts": {fault kind: n}, "reason": the newest fault's reason}
    rank_faults: dict = field(default_factory=dict)
    checkpoint_step: int | None = None
    checkpoint_s: float | None = None  # end of that step -> its manifest written

    def read(self, run_dir: Path, since: float, step_t: dict, ckpt_sub: str) -> None:
        live = run_dir / "live"
        for rec in read_live_ranks(run_dir, since).values():
            old = self.ranks.get(rec["rank"])
            if old and old.get("pid") == rec.get("pid") and rec["step"] > old["step"]:
                steps = rec.get("timed_steps", 0) - old.get("timed_steps", 0)
                if steps > 0:
                    rec["compute_per_step"] = (rec["compute_s"] - old["compute_s"]) / steps
                else:
                    rec["compute_per_step"] = old.get("compute_per_step")
            elif old and old.get("pid") == rec.get("pid"):
                rec["compute_per_step"] = old.get("compute_per_step")
            self.ranks[rec["rank"]] = rec
        faults = _read_json_since(live / "faults.json", since)
        if faults is not None:
            self.restarts, self.rank_faults = {}, {}
            for f in faults.get("faults", []):
                if f.get("detection_s") is not None:  # seen down: the rank was replaced
                    self.restarts[f["kind"]] = self.restarts.get(f["kind"], 0) + 1
                    if isinstance(f.get("rank"), int):
                        mine = self.rank_faults.setdefault(f["rank"], {"restarts": {}})
                        mine["restarts"][f["kind"]] = mine["restarts"].get(f["kind"], 0) + 1
                        mine["reason"] = str(f.get("reason") or f["kind"])
        self._newest_checkpoint(run_dir / ckpt_sub, step_t)

    def _newest_checkpoint(self, root: Path, step_t: dict) -> None:
        try:
            steps = sorted(n for n in os.listdir(root) if n.startswith("step-"))
        except OSError:
            return
        for name in reversed(steps):
            try:
                step = int(name[5:])
                manifest = os.stat(root / name / "manifest.json")
            except (ValueError, OSError):
                continue  # not complete yet
            if not stat.S_ISREG(manifest.st_mode):
                continue  # a directory of that name is no manifest
            mtime = manifest.st_mtime
            if step != self.checkpoint_step and step in step_t:
                self.checkpoint_step = step
                self.checkpoint_s = max(0.0, mtime - step_t[step])
            return


def _read_json_since(path: Path, since: float):
    try:
        if os.stat(path).st_mtime < since:
            return None  # an earlier attempt's
        with open(path, "rb") as f:
            rec = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


class JsonlTail:
    """The new complete lines of a file that is only ever appended to, one JSON object
    each: :meth:`read` returns the objects added since the last call (a line still
    being written waits for its newline; a line that is not an object is skipped)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.partial = b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(1 << 22)
        except OSError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        out = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out


@dataclass
class HookLedger:
    """Errors per hook in the run's hooks.jsonl: every hook that wrote a record is
    listed (0 until it fails), so a healthy hook's counter exists too."""

    errors: dict = field(default_factory=dict)  # hook name -> error records

    def add(self, record: dict) -> None:
        hook = record.get("hook")
        if not isinstance(hook, str) or not hook:
            return
        self.errors[hook] = self.errors.get(hook, 0) + (1 if "error" in record else 0)


@dataclass
class Progress:
    """What the run's metrics.jsonl said last: read by status, /metrics and the page."""

    step: int = 0
    loss: float | None = None
    last_t: float | None = None
    samples_per_s: float | None = None
    losses: list = field(default_factory=list)  # (step, loss), thinned to <= 400 points
    evals: list = field(default_factory=list)  # (step, {metric: value}), <= 200 points
    step_hist: list = field(default_factory=lambda: [0] * (len(STEP_BUCKETS) + 1))
    step_sum: float = 0.0
    steps_seen: int = 0
    step_t: dict = field(default_factory=dict)  # step -> wall time, the last 512 steps

    def add(self, record: dict) -> None:
        step, t = record.get("step"), record.get("t")
        if not isinstance(step, int):
            return
        if isinstance(t, int | float) and self.last_t is not None and step == self.step + 1:
            dt = max(0.0, t - self.last_t)
            self.step_sum += dt
            self.steps_seen += 1
            for i, bound in enumerate(STEP_BUCKETS):
                if dt <= bound:
                    self.step_hist[i] += 1
                    break
            else:
                self.step_hist[-1] += 1
        self.step = step
        loss = record.get("loss")
        self.loss = float(loss) if isinstance(loss, int | float) else self.loss
        self.last_t = float(t) if isinstance(t, int | float) else self.last_t
        if isinstance(t, int | float):
            self.step_t[step] = float(t)
            if len(self.step_t) > 512:
                del self.step_t[min(self.step_t)]
        sps = record.get("samples_per_s")
        self.samples_per_s = float(sps) if isinstance(sps, int | float) else self.samples_per_s
        if self.loss is not None:
            self.losses.append((step, self.loss))
            if len(self.losses) > 400:
                self.losses = self.losses[::2]
        evaluated = record.get("eval")
        if isinstance(evaluated, dict):
            numbers = {k: float(v) for k, v in evaluated.items() if isinstance(v, int | float)}
            if numbers:
                self.evals.append((step, numbers))
                if len(self.evals) > 200:
                    self.evals = self.evals[::2]


class JobSupervisor:
    """Runs one attempt of one job: start, watch, stop on request, clean up."""

    def __init__(
        self,
        job,
        state_dir: Path,
        config_path: Path,
        log_path: Path,
        grace: float,
        on_start,
        warm=None,
        nice: int = JOB_NICE,
    ):
        self.job = job
        self.nice = nice  # nice levels below the daemon (launcher_argv)
        self.warm = warm  # a WarmPool (pipelines.daemon.warm) to take a ready runner from
        self.started_warm = False
        self.runner: str | None = None  # once started: "warm-N" (the runner's marker) or "cold"
        self.on_start = on_start  # called with the top process's pid once it is started
        self.state_dir = Path(state_dir)
        self.config_path = config_path
        self.log_path = log_path
        self.grace = grace
        self.marker = job_marker(state_dir, job.id)
        self.process: subprocess.Popen | None = None
        self.progress = Progress()
        self.telemetry = Telemetry()
        self.hooks = HookLedger()
        self._metrics_tail = JsonlTail(Path(job.run_dir) / "metrics.jsonl")
        self._hooks_tail = JsonlTail(Path(job.run_dir) / "hooks.jsonl")
        self.started_at = None
        self.stop_requested_at: float | None = None
        self._stop = trio.Event()

    def run_args(self, resume: bool) -> list[str]:
        """The job's `zerotrain run` arguments."""
        run = ["run", str(self.config_path), *self.job.argv, "--run-dir", self.job.run_dir]
        if resume:
            run += ["--resume", self.job.run_dir]
        return run

    def argv(self, resume: bool) -> list[str]:
        """The job's command line when it starts cold."""
        run = ["-m", "pipelines.cli", *self.run_args(resume)]
        return [*launcher_argv(self.nice), *run]

    def starting(self) -> bool:
        """True from the supervisor's start until the job's first step is seen (at most
        :data:`STARTING_SECONDS` after its top process started)."""
        if self.started_at is None:
            return True
        return not self.progress.step and time.time() - self.started_at < STARTING_SECONDS

    def request_stop(self) -> None:
        """The planned stop: SIGTERM to the job's process group (idempotent)."""
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
        self._stop.set()

    async def run(self) -> int:
        """Start the job (``on_start(pid)``) and return its exit code once every process
        of the job is gone (negative: killed by that signal)."""
        from .warm import hand_over, job_environment

        resume = await trio.to_thread.run_sync(self._prepare_run_dir)
        env = {**job_environment(), MARKER_VAR: self.marker.split("=", 1)[1]}
        runner = await self.warm.take() if self.warm is not None else None
        with open(self.log_path, "ab") as out:
            how = " (resume)" if resume else ""
            how += ", warm runner" if runner else ""
            when = time.strftime("%Y-%m-%d %H:%M:%S")
            attempt = self.job.attempts
            line = f"--- zerotrain serve: job {self.job.id} attempt {attempt}{how} at {when}\n"
            out.write(line.encode())
            out.flush()
            if runner is None:
                self.process = subprocess.Popen(
                    self.argv(resume),
                    cwd=self.job.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        self.runner = "cold"
        if runner is not None:
            self.process, runner_marker = runner
            self.started_warm = True
            self.runner = runner_marker.rpartition(":")[2]
            alias_marker(self.marker, runner_marker)
            hand_over(self.process, self.run_args(resume), self.job.cwd, env, self.log_path)
        self.started_at = time.time()
        self.on_start(self.process.pid)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_metrics)
                nursery.start_soon(self._stopper)
                await self._wait()
                nursery.cancel_scope.cancel()
            self._read_metrics()
        finally:
            with trio.CancelScope(shield=True):
                if self.process.returncode is None:
                    self._signal_group(signal.SIGKILL)
                    await self._wait()
                # the rest of the job (ranks, analyzer) may outlive its top process briefly
                with trio.move_on_after(3.0):
                    while job_processes(self.marker):
                        await trio.sleep(0.1)
                await kill_processes(self.marker)
                alias_marker(self.marker, None)
        return self.process.returncode

    async def _wait(self) -> int:
        """Wait for the top process to exit, then reap it (only here, see _signal_group)."""
        fd = os.pidfd_open(self.process.pid)
        try:
            while self.process.poll() is None:
                await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)
        return self.process.returncode

    def _signal_group(self, sig: int) -> None:
        # The group id is the top process's pid (a new session): valid while that process
        # is not reaped, which happens only in _wait(), never between this check and kill.
        if self.process is not None and self.process.returncode is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    async def _stopper(self) -> None:
        await self._stop.wait()
        self._signal_group(signal.SIGTERM)
        await trio.sleep(self.grace)
        log.warning("[job %d] not stopped %gs after SIGTERM: SIGKILL", self.job.id, self.grace)
        self._signal_group(signal.SIGKILL)

    # ---- run dir -------------------------------------------------------------------

    def _prepare_run_dir(self) -> bool:
        """True to resume (a valid checkpoint from an earlier attempt); else make sure the
        run dir does not exist, moving an earlier attempt's aside."""
        from ..store.checkpoint import latest_valid

        run_dir = Path(self.job.run_dir)
        sub = self.job.config.get("checkpoint", {}).get("dir", "checkpoints")
        if self.job.attempts > 1 and latest_valid(run_dir / sub).path is not None:
            return True
        if run_dir.exists():
            n = 1
            while (aside := run_dir.with_name(f"{run_dir.name}.attempt-{n}")).exists():
                n += 1
            run_dir.rename(aside)
        return False

    # ---- progress ------------------------------------------------------------------

    def _read_metrics(self) -> None:
        for record in self._metrics_tail.read():
            self.progress.add(record)
        for record in self._hooks_tail.read():
            self.hooks.add(record)

    def _read_telemetry(self) -> None:
        sub = self.job.config.get("checkpoint", {}).get("dir", "checkpoints")
        since = self.started_at or 0.0
        self.telemetry.read(Path(self.job.run_dir), since, self.progress.step_t, sub)

    async def _watch_metrics(self) -> None:
        while True:
            self._read_metrics()
            self._read_telemetry()
            await trio.sleep(POLL_SECONDS)
