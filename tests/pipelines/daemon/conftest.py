"""A real daemon for the tests: `zerotrain serve` as a process of its own, on a state dir
in tmp_path, with real `zerotrain run` jobs and rank processes under it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# a small job that still runs real ranks (two processes, a ring, checkpoints): a
# 784-32-32-10 MLP on 512 samples, ~10 ms a step, a second to start. No early stopping:
# this model's accuracy saturates, and `zerotrain run --resume` does not restore the
# early-stopping state from the checkpoint (a resumed run stops at another step), which
# is the run's to fix, not the daemon's
SMALL = [
    "mlp_classifier",
    "--ranks",
    "2",
    "--seed",
    "3",
    "--set",
    "model.hidden=[32,32]",
    "--set",
    "data.n_train=512",
    "--set",
    "data.n_eval=128",
    "--set",
    "train.batch_size=64",
    "--set",
    "eval.early_stopping.patience=0",
]
MARKER_VAR = "ZEROTRAIN_DAEMON_JOB"


def zerotrain(*args, env=None, timeout=120, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def http_get(address: str, path: str) -> tuple[int, str]:
    """GET http://ADDRESS/PATH: (status, body), error statuses included."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def marked_pids(state_dir: Path) -> list[int]:
    """Live processes of any job of this state dir (their environment marker). The
    daemon's waiting warm runner (pipelines.daemon.warm: marker warm-N) is no job's:
    while a daemon answers, its waiting runner and any it starts later are left out; a
    runner that took a job counts as that job's."""
    want = f"{MARKER_VAR}={Path(state_dir).resolve()}:".encode()
    spare = _spare_runners(state_dir)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z":
            continue
        items = [item[len(want) :] for item in env.split(b"\0") if item.startswith(want)]
        if items and not spare(items[0]):
            pids.append(int(entry))
    return pids


def _spare_runners(state_dir: Path):
    """A test of a marker's suffix: a warm runner no job has taken (see marked_pids)."""
    from pipelines.daemon import protocol
    from pipelines.daemon.client import call
    from pipelines.daemon.statedir import DaemonUsageError

    try:
        warm = call(state_dir, protocol.DaemonInfo(), timeout=5)["warm"]
    except DaemonUsageError:
        return lambda suffix: False

    def spare(suffix: bytes) -> bool:
        if not suffix.startswith(b"warm-"):
            return False
        n = int(suffix[5:])
        return n > warm["started"] or n == warm["idle"]

    return spare


class DaemonProcess:
    def __init__(self, state_dir: Path, *extra, env=None):
        self.state_dir = Path(state_dir)
        self.extra = [str(e) for e in extra]
        if "--job-nice" not in self.extra:
            # jobs level with the rest of the suite: at serve's default (10) a job of
            # one test worker gets a tenth of a CPU the other worker's processes want
            self.extra += ["--job-nice", "0"]
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.log_path = self.state_dir.with_name(self.state_dir.name + "-serve.log")

    def start(self, *, wait=True) -> DaemonProcess:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "serve", "--state-dir", str(self.state_dir)]
            + self.extra,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self.env,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=30.0) -> None:
        from pipelines.daemon import protocol
        from pipelines.daemon.client import call
        from pipelines.daemon.statedir import DaemonUsageError

        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}: {self.output()}"
            try:
                call(self.state_dir, protocol.DaemonInfo(), timeout=5)
                return
            except DaemonUsageError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args, timeout=120) -> subprocess.CompletedProcess:
        return zerotrain(*args, "--state-dir", self.state_dir, timeout=timeout)

    def submit(self, *args) -> int:
        r = self.cli("submit", *args)
        assert r.returncode == 0, r.stderr
        return int(r.stdout)

    def status(self, job) -> dict:
        """The job's status through the control endpoint, from this process (what
        `zerotrain status JOB --json` prints; polling through the command line would start
        a Python process five times a second beside the job)."""
        from pipelines.daemon import protocol
        from pipelines.daemon.client import call

        return call(self.state_dir, protocol.JobStatus(str(job)), timeout=30)

    def wait_for(self, job, states, timeout=180.0, step=None) -> dict:
        """Poll until the job is in one of ``states`` (and, if given, at >= ``step``)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.status(job)
            if s["state"] in states and (step is None or (s["step"] or 0) >= step):
                return s
            assert s["state"] not in ("failed",) or "failed" in states, s
            assert time.monotonic() < deadline, f"job {job} still {s['state']}: {s}"
            time.sleep(0.2)

    def terminate(self, timeout=60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def cleanup(self) -> None:
        self.terminate()
        self.log.close()
        for pid in marked_pids(self.state_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    """One daemon (--cpus 2) for the tests of a module that only submit and control
    their own jobs and leave none running: each finds its jobs by id."""
    d = DaemonProcess(tmp_path_factory.mktemp("shared") / "state", "--http", "off", "--cpus", "2")
    d.start()
    yield d
    d.cleanup()


@pytest.fixture
def daemon_factory(tmp_path):
    made = []

    def make(*extra, name="state", start=True, env=None) -> DaemonProcess:
        d = DaemonProcess(tmp_path / name, "--http", "off", *extra, env=env)
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        d.cleanup()


_REFERENCE: dict[tuple, str] = {}


@pytest.fixture(scope="session")
def reference_hash(tmp_path_factory):
    """params_sha256 of `zerotrain run ARGS` (cached per ARGS for the session)."""

    def run(*args) -> str:
        key = tuple(map(str, args))
        if key not in _REFERENCE:
            run_dir = tmp_path_factory.mktemp("ref") / "run"
            r = zerotrain("run", *key, "--run-dir", run_dir, timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
            _REFERENCE[key] = json.loads((run_dir / "summary.json").read_text())["params_sha256"]
        return _REFERENCE[key]

    return run
