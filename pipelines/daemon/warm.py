"""The warm job runner: a `zerotrain run` process started before its job is known.

Starting a job cold costs three interpreter start-ups one after another -- the job's
`zerotrain run`, then each rank (the rank supervisor starts them in order) -- each
importing numpy, trio, zmq, the kernels and pipelines: about a second of a 2-rank
job's start here, before any of its own work. So the daemon keeps one job runner ready::

    daemon ──Popen (main thread, launcher: PR_SET_PDEATHSIG)──> runner
        runner: set the BLAS thread limits, import what `zerotrain run` and a rank import,
                fork rank templates (pipelines.cluster.prefork), say "ready" on stdout,
                block reading stdin
    submit ──> JobSupervisor takes the ready runner, writes one JSON line to its stdin:
                {"argv": [run arguments], "cwd", "env", "log"}
        runner: stdout and stderr to the job's log, stdin from /dev/null, the job's cwd
                and environment, then `zerotrain run ARGS` in-process (pipelines.cli.main)
                -- its ranks are handed to the templates instead of exec'd.

A runner is a job's top process exactly as a cold `zerotrain run` is: the daemon's child
in a session of its own, forked by the daemon's main thread through the same launcher
(PR_SET_PDEATHSIG = SIGKILL, the daemon's pid checked), waited for through a pidfd,
stopped by signals to its process group; its run dir's lock is taken by `zerotrain run`
inside it as always. So a job from the runner ends with the params_sha256 of the same
`zerotrain run` (tests/pipelines/daemon/test_warm.py checks it), and a `kill -9` of the
daemon takes the runner, its job and its ranks along.

The pool (:class:`WarmPool`, one task of the daemon) keeps at most one runner, and
starts one again as soon as the last is taken -- so a second job submitted while one
trains starts warm too -- but only on room the daemon's jobs do not hold (``room()``,
the daemon's ``_warm_room``): at least one CPU of the budget that the scheduler has not
given to a running job and that the machine has (a budget above the machine's CPUs is
not room), and no job starting (from its start until its first step: warming beside it
would slow the start the runner is there to shorten). Warming costs about half a
CPU-second, which would otherwise come out of a training job's CPUs. The runner forks as
many rank templates as the budget has CPUs free when it starts (at most
:data:`MAX_TEMPLATES`); a job's ranks beyond them are exec'd. A job that finds the
runner still warming waits for it (it is ready sooner than a cold start would be); a job
that finds none starts cold (`zerotrain run` exec'd). A runner that dies while it waits
(killed, out of memory) is noticed within :data:`POLL_SECONDS` and replaced; after
:data:`MAX_FAILURES` runners in a row that die before they are ready the pool gives up
(jobs start cold) and says so once. A runner's output until it takes a job goes to
``DIR/warm.log``. A runner that cannot fork rank templates (a thread is running: e.g.
BLAS threads the environment asked for) runs its job with exec'd ranks.

Its processes carry the *runner's* marker in ``/proc/PID/environ`` (the kernel keeps the
environment block a process was exec'd with): ``ZEROTRAIN_DAEMON_JOB=DIR:warm-N``. The
supervisor maps the job's marker to it (``supervisor.alias_marker``), so finding, killing
and health-checking a job's processes work the same for warm and cold jobs, and a next
daemon's recovery kills leftover runners with the jobs' processes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ["POLL_SECONDS", "WarmPool", "runner_main"]

log = logging.getLogger("zerotrain.daemon")

POLL_SECONDS = 0.1
WARMING_WAIT = 10.0
MAX_FAILURES = 3  # runners in a row that die before they are ready: stop warming
MAX_TEMPLATES = 16
READY = b"ready\n"

# what a `zerotrain run` and its ranks import; a job imports anything else as it would cold
_PRELOAD = (
    "numpy",
    "trio",
    "zmq",
    "msgpack",
    "actors",
    "cykernels.gemm",
    "pipelines.config",
    "pipelines.core",
    "pipelines.data",
    "pipelines.local",
    "pipelines.use",
    "pipelines.step",
    "pipelines.optim",
    "pipelines.metrics",
    "pipelines.model",
    "pipelines.store.checkpoint",
    "pipelines.cluster.main",
    "pipelines.cluster.rank",
    "pipelines.launch",
)


# ---- the daemon's side --------------------------------------------------------------


class WarmPool:
    """At most one warm runner for the daemon of ``state_dir`` (see the module doc)."""

    def __init__(self, state_dir: Path, *, launch: list[str], log_path: Path):
        self.state_dir = Path(state_dir)
        self.templates = 0  # rank templates of the waiting runner (the budget free then)
        self.launch = launch  # supervisor.launcher_argv: PDEATHSIG, nice, then exec
        self.log_path = Path(log_path)
        self.started = 0  # runners started (the marker's N)
        self.replaced = 0  # runners that died while waiting, replaced
        self.taken = 0  # jobs that started warm
        self.failures = 0  # runners in a row that died before they were ready
        self._proc: subprocess.Popen | None = None
        self._marker = ""
        self._ready = False
        self._closed = False

    def stats(self) -> dict:
        """For DaemonInfo: the waiting runner (its number N in warm-N, pid, readiness)
        and the counts."""
        return {
            "ready": self._ready,
            "pid": self._proc.pid if self._proc else None,
            "idle": self.started if self._proc else None,
            "started": self.started,
            "replaced": self.replaced,
            "taken": self.taken,
            "templates": self.templates if self._proc else None,
            "disabled": self.failures >= MAX_FAILURES,
        }

    async def run(self, room) -> None:
        """Keep a runner ready. ``room()`` -> (CPUs a runner may warm on now, CPUs of the
        budget free): one starts when the first is at least 1 (see the module doc), with
        a rank template per free CPU of the budget."""
        import trio

        try:
            while not self._closed:
                if self._proc is None and self.failures < MAX_FAILURES:
                    usable, free = room()
                    if usable >= 1:
                        self._start(min(free, MAX_TEMPLATES))
                elif self._proc is not None:
                    self._check()
                await trio.sleep(POLL_SECONDS)
        finally:
            self.close()

    async def take(self) -> tuple[subprocess.Popen, str] | None:
        """The ready runner and its marker, now the caller's; None when there is none.
        A runner still warming up is waited for (at most :data:`WARMING_WAIT` seconds):
        it is ready sooner than a cold start would be, and a cold start beside it would
        only slow both down."""
        import trio

        with trio.move_on_after(WARMING_WAIT):
            while self._proc is not None and not self._ready:
                self._check()
                if not self._ready:
                    await trio.sleep(POLL_SECONDS / 4)
        if self._proc is None:
            return None
        self._check()
        if self._proc is None or not self._ready:
            return None
        proc, marker = self._proc, self._marker
        self._proc, self._ready = None, False
        self.taken += 1
        return proc, marker

    def close(self) -> None:
        """Kill the waiting runner (and its templates), if any."""
        self._closed = True
        proc, self._proc, self._ready = self._proc, None, False
        if proc is not None:
            _kill_group(proc)

    def _start(self, templates: int) -> None:
        from .supervisor import MARKER_VAR, warm_marker

        self.started += 1
        self.templates = templates
        self._marker = warm_marker(self.state_dir, self.started)
        env = {**job_environment(), MARKER_VAR: self._marker.split("=", 1)[1]}
        argv = [
            *self.launch,
            "-m",
            "pipelines.daemon.warm",
            str(self.templates),
        ]
        with open(self.log_path, "ab") as err:
            # from the daemon's main thread (the task runs there): PR_SET_PDEATHSIG fires
            # when the forking *thread* ends (supervisor's module doc)
            self._proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._ready = False
        self._said = b""

    def _check(self) -> None:
        """Read the runner's "ready"; notice its death (then it is replaced)."""
        proc = self._proc
        if not self._ready:
            try:
                self._said += proc.stdout.read() or b""
            except (BlockingIOError, ValueError):
                pass
            self._ready = self._said.endswith(READY)
        if self._ready:
            self.failures = 0
        if proc.poll() is not None:
            self.replaced += 1
            self.failures += 0 if self._ready else 1
            if self.failures >= MAX_FAILURES:
                log.warning(
                    "[daemon] %d warm job runners in a row ended before they were ready "
                    "(their output: %s); jobs start cold from now on",
                    self.failures,
                    self.log_path,
                )
            else:
                log.warning(
                    "[daemon] the warm job runner (pid %d) ended (exit %s) while waiting: replaced",
                    proc.pid,
                    proc.returncode,
                )
            _kill_group(proc)
            self._proc, self._ready = None, False


def hand_over(proc: subprocess.Popen, argv: list[str], cwd: str, env: dict, log: Path) -> None:
    """Give a taken runner its job: `zerotrain run ARGV` in ``cwd`` with ``env``, output
    appended to ``log``. One line on a pipe that is empty: it never blocks."""
    line = json.dumps({"argv": argv, "cwd": cwd, "env": env, "log": str(log)}) + "\n"
    try:
        proc.stdin.write(line.encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it died after all: its exit code says so
    proc.stdout.close()


def job_environment() -> dict:
    """The environment of a job's processes, before its marker (warm and cold alike)."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()  # SIGKILLed: at once
    for pipe in (proc.stdin, proc.stdout):
        try:
            pipe.close()
        except (OSError, ValueError):
            pass


# ---- the runner's side ----------------------------------------------------------------


def runner_main(templates: int) -> int:
    """The runner process: warm up, wait for the job, run it (see the module doc)."""
    import importlib

    from .. import cli
    from ..cluster import prefork

    cli._limit_blas_threads()  # before numpy: as `zerotrain run` does
    for name in _PRELOAD:
        importlib.import_module(name)
    import actors

    for name in actors.__all__:  # `import actors` alone loads none of its modules
        getattr(actors, name)
    try:
        prefork.prefork(templates)
    except RuntimeError as err:  # e.g. BLAS threads the user asked for: ranks exec'd
        print(f"zerotrain warm runner: no rank templates: {err}", file=sys.stderr)
    os.write(1, READY)
    line = sys.stdin.buffer.readline()
    if not line:
        return 0  # the daemon let it go unused
    job = json.loads(line)
    out = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    sys.argv = [cli.__file__, *job["argv"]]
    return cli.main(job["argv"])


if __name__ == "__main__":
    sys.exit(runner_main(int(sys.argv[1])))
