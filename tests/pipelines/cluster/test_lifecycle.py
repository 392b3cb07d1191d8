"""A run's processes and files live and die with the run: the real CLI in its own session,
killed or stopped from outside, and what is left of it checked by process group, by a
/proc scan and on disk. Every wait is bounded; nothing asserts on speed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from .cluster_util import SMALL

REPO = Path(__file__).resolve().parents[3]
DEADLINE = 120  # seconds for a run to reach a step under load
MARK = "ZEROTRAIN_TEST_RUN"  # an environment mark every process of a test's run inherits
LONG = [*SMALL, "--ranks", "2", "--steps", "100000", "--set", "checkpoint.every=20"]


def start(run_dir: Path, *args: str, command: str = "run") -> tuple[subprocess.Popen, str]:
    """The real CLI as its own session (setsid, as a job runner starts it)."""
    mark = uuid.uuid4().hex
    env = dict(os.environ, **{MARK: mark})
    env.pop("OPENBLAS_NUM_THREADS", None)
    argv = [sys.executable, "-m", "pipelines.cli", command, "mlp_classifier", *args]
    proc = subprocess.Popen(
        [*argv, "--run-dir", str(run_dir)],
        env=env,
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, mark


def _stat(pid: str) -> tuple[int, str] | None:
    """(process group, state) of a pid, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[2]), fields[0].decode()


def living(pgid: int, mark: str) -> list[str]:
    """Processes of the run not yet dead (zombies count as dead): in its process group,
    or carrying its environment mark anywhere on the machine (a /proc scan)."""
    found = []
    needle = f"{MARK}={mark}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        st = _stat(pid)
        if st is None or st[1] == "Z":
            continue
        if st[0] == pgid:
            found.append(pid)
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(pid)
    return found


def children_env(pgid: int, key: str) -> set[str]:
    """The values of `key` in the environments of the group's processes."""
    values = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        st = _stat(pid)
        if st is None or st[0] != pgid:
            continue
        try:
            for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                if item.startswith(key.encode() + b"="):
                    values.add(item.split(b"=", 1)[1].decode())
        except OSError:
            pass
    return values


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, steps: int) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if metrics.exists() and metrics.read_text().count("\n") >= steps:
            return
        time.sleep(0.05)
    pytest.fail(f"the run did not reach step {steps} in {DEADLINE}s")


def tree(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file under the run dir with its size and mtime."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in run_dir.rglob("*")
        if p.is_file()
    }


def test_no_process_of_a_run_outlives_a_kill_9_of_its_top_process(tmp_path):
    run_dir = tmp_path / "run"
    proc, mark = start(run_dir, *LONG, "--hook", str(REPO / "scripts/hooks/dead_layer.py"))
    try:
        wait_for_steps(proc, run_dir, 30)
        pgid = os.getpgid(proc.pid)
        assert len(living(pgid, mark)) >= 4  # the top process, two ranks, the analyzer
        (ipc_dir,) = children_env(pgid, "ZEROTRAIN_IPC_DIR")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        time.sleep(0.5)
        assert living(pgid, mark) == []
        # and nothing more is written into the run dir by anyone
        before = tree(run_dir)
        time.sleep(3.0)  # past the ranks' heartbeat timeout (2 s)
        assert tree(run_dir) == before
        # the killed run's ipc directory is left behind, and removed by the next run's
        # (any zerotrain process on the machine may be that next one)
        import actors

        fresh = actors.new_ipc_directory()
        try:
            assert not os.path.exists(ipc_dir) and fresh != ipc_dir
        finally:
            import shutil

            shutil.rmtree(fresh)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_second_run_on_a_run_dir_in_use_is_refused_naming_the_owner(tmp_path):
    run_dir = tmp_path / "run"
    first, _ = start(run_dir, *LONG)
    try:
        wait_for_steps(first, run_dir, 10)
        second, _ = start(run_dir, *SMALL, "--ranks", "2", "--seed", "1")
        _, err = second.communicate(timeout=DEADLINE)
        assert second.returncode == 2, err
        assert err.splitlines() == [
            f"zerotrain run: {run_dir} is in use by another run (pid {first.pid}); wait for "
            "it to end or choose another --run-dir"
        ]
        assert first.poll() is None  # the owner goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


@pytest.mark.parametrize("ranks", ["1", "2"])
def test_a_run_dir_holding_checkpoints_is_refused_without_resume(tmp_path, ranks):
    run_dir = tmp_path / "run"
    proc, _ = start(run_dir, *SMALL, "--ranks", ranks)
    assert proc.wait(DEADLINE) == 0, proc.communicate()[1][-3000:]
    metrics = (run_dir / "metrics.jsonl").read_text()
    again, _ = start(run_dir, *SMALL, "--ranks", ranks, "--seed", "1")
    _, err = again.communicate(timeout=DEADLINE)
    assert again.returncode == 2, err
    assert err.splitlines() == [
        f"zerotrain run: {run_dir} already holds checkpoints ({run_dir}/checkpoints); "
        f"continue that run with --resume {run_dir}, or choose a new --run-dir"
    ]
    assert (run_dir / "metrics.jsonl").read_text() == metrics


def test_a_rank_refuses_the_plan_of_another_run_and_a_run_dir_it_does_not_hold(tmp_path):
    import json

    from pipelines.store.rundir import RunDir

    run_dir = RunDir(tmp_path / "run")
    try:
        plan = tmp_path / "run" / "plan.json"
        plan.write_text(json.dumps({"run_id": "a" * 32, "run_dir": str(run_dir.path)}))
        base = dict(os.environ, ZEROTRAIN_PLAN=str(plan))

        def rank(**env):
            argv = [sys.executable, "-m", "pipelines.cluster.rank"]
            fds = (int(env["ZEROTRAIN_RUN_LOCK_FD"]),) if "ZEROTRAIN_RUN_LOCK_FD" in env else ()
            return subprocess.run(
                argv, env={**base, **env}, cwd=REPO, capture_output=True, text=True,
                timeout=DEADLINE, pass_fds=fds,
            )  # fmt: skip

        other = rank(ZEROTRAIN_RUN_ID="b" * 32, ZEROTRAIN_RUN_LOCK_FD=str(run_dir.lock_fd))
        assert other.returncode == 2
        assert other.stderr.splitlines() == [
            f"zerotrain rank: {plan} is the plan of run {'a' * 32!r}, not of this rank's run "
            f"{'b' * 32!r}"
        ]
        refused = [
            f"zerotrain rank: this process does not hold the lock of {run_dir.path} "
            f"({run_dir.path}/.lock)"
        ]
        unlocked = rank(ZEROTRAIN_RUN_ID="a" * 32)
        assert (unlocked.returncode, unlocked.stderr.splitlines()) == (2, refused)
        # the lock file itself, opened anew, is not the owner's lock
        fd = os.open(run_dir.path / ".lock", os.O_RDONLY)
        try:
            opened = rank(ZEROTRAIN_RUN_ID="a" * 32, ZEROTRAIN_RUN_LOCK_FD=str(fd))
        finally:
            os.close(fd)
        assert (opened.returncode, opened.stderr.splitlines()) == (2, refused)
    finally:
        run_dir.close()


def test_tcp_ring_ports_are_held_from_their_choice_to_the_ranks_bind(tmp_path):
    """A port chosen for a rank's ring is not free for anyone else in between (a port
    picked and released was: another run, or this squatter, could bind it first)."""
    import errno
    import json
    import socket

    run_dir = tmp_path / "run"
    proc, _ = start(run_dir, *SMALL, "--ranks", "2", "--set", 'cluster.transport="tcp"')
    try:
        plan = run_dir / "plan.json"
        deadline = time.monotonic() + DEADLINE
        while not plan.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        ports = [int(e.rsplit(":", 1)[1]) for e in json.loads(plan.read_text())["endpoints"]]
        for port in ports:
            squatter = socket.socket()
            try:
                with pytest.raises(OSError) as refused:
                    squatter.bind(("127.0.0.1", port))
                assert refused.value.errno == errno.EADDRINUSE
            finally:
                squatter.close()
        _, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
