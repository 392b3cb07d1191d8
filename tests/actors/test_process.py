"""OS processes as supervised children: crashes by signal, lost heartbeats, SIGTERM/SIGKILL
shutdown, start failures, and the child side's orphan rule. Real processes, real time:
every wait is bounded by LIMIT and nothing asserts on wall time."""

import os
import signal
import sys
from contextlib import asynccontextmanager

import pytest
import trio

import actors
from actors import ActorExited, NoNode, StartChildError
from tests.actors.actor_util import child, wait_restarted

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proc_worker.py")
LIMIT = 30
HEARTBEAT_TIMEOUT = 1.0  # generous: 2 cores are shared with other test runs


def worker_spec(name, **options):
    options.setdefault("shutdown", 2)
    return actors.process_spec(name, [sys.executable, WORKER], wait_for=["Echo"], **options)


@asynccontextmanager
async def supervised(*specs, **supervisor_options):
    with trio.fail_after(LIMIT):
        options = {"heartbeat_interval": 0.1, "heartbeat_timeout": HEARTBEAT_TIMEOUT}
        async with actors.open_node("test", **options):
            async with trio.open_nursery() as nursery:
                sup = actors.Supervisor(specs, name="ranks", **supervisor_options)
                ref = await nursery.start(sup.run)
                yield ref
                await actors.stop(ref, timeout=None)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_process_child_killed_with_sigkill_is_restarted():
    async with supervised(worker_spec("w1")):
        before = await child("ranks", "w1")
        os.kill(before.pid, signal.SIGKILL)
        after = await wait_restarted("ranks", "w1")
        assert after.pid != before.pid
        assert "was killed by SIGKILL" in after.last_exit
        assert await actors.call("Echo@w1", ("echo", 1)) == 1


async def test_a_sigstopped_process_child_is_detected_by_missed_heartbeats_and_restarted():
    async with supervised(worker_spec("w1")):
        before = await child("ranks", "w1")
        os.kill(before.pid, signal.SIGSTOP)
        after = await wait_restarted("ranks", "w1")
        assert f"sent no heartbeat for {HEARTBEAT_TIMEOUT:g}s; killed" in after.last_exit
        assert not alive(before.pid)  # SIGKILLed and reaped, not left stopped
        assert await actors.call("Echo@w1", ("echo", 2)) == 2


async def test_a_child_whose_event_loop_blocks_is_treated_as_hung():
    async with supervised(worker_spec("w1")):
        with pytest.raises(ActorExited, match="noconnection"):
            await actors.call("Echo@w1", ("block", 30), timeout=20)
        info = await wait_restarted("ranks", "w1")
        assert "sent no heartbeat" in info.last_exit


async def test_a_process_that_exits_normally_is_not_restarted_when_transient():
    async with supervised(worker_spec("w1", restart="transient")):
        pid = (await child("ranks", "w1")).pid
        os.kill(pid, signal.SIGTERM)  # the worker shuts down cleanly: exit status 0
        while (info := await child("ranks", "w1")).state != "done":
            await trio.sleep(0.05)
        assert (info.last_exit, info.restarts) == ("normal", 0)


async def test_stopping_a_process_child_sends_sigterm_and_it_exits_cleanly():
    async with supervised(worker_spec("w1")):
        pid = (await child("ranks", "w1")).pid
        await actors.terminate_child("ranks", "w1")
        info = await child("ranks", "w1")
        assert (info.state, info.last_exit) == ("done", "normal")
        assert not alive(pid)
        await actors.restart_child("ranks", "w1")
        assert await actors.call("Echo@w1", ("echo", 3)) == 3


async def test_a_process_ignoring_sigterm_is_sigkilled_after_its_shutdown_timeout():
    spec = worker_spec("w1", shutdown=0.5, env={"PROC_WORKER_IGNORE_SIGTERM": "1"})
    async with supervised(spec):
        pid = (await child("ranks", "w1")).pid
        await actors.terminate_child("ranks", "w1")
        info = await child("ranks", "w1")
        assert info.last_exit == "killed"
        assert not alive(pid)


async def test_a_process_that_dies_while_starting_fails_the_supervisor_start():
    crash = actors.process_spec("w1", [sys.executable, "-c", "raise SystemExit(3)"])
    error = pytest.RaisesExc(StartChildError, match="w1 .*exited with status 3 while starting")
    with pytest.RaisesGroup(error, flatten_subgroups=True):
        async with supervised(crash):
            pass


async def test_escalation_stops_every_process():
    pids = []
    escalation = pytest.RaisesGroup(actors.RestartIntensityExceeded, flatten_subgroups=True)
    with escalation:
        async with supervised(worker_spec("w1"), worker_spec("w2"), max_restarts=0):
            pids += [(await child("ranks", w)).pid for w in ("w1", "w2")]
            os.kill(pids[0], signal.SIGKILL)
            await trio.sleep_forever()
    assert not any(alive(p) for p in pids)


async def test_process_children_need_a_node():
    with pytest.raises(NoNode, match="open_node"):
        await worker_spec("w1").start()


async def test_an_orphaned_child_exits_on_its_own():
    """A child whose parent never answers (here: no parent at all) exits with status 0
    after the heartbeat timeout instead of lingering."""
    env = {
        **os.environ,
        actors.ENV["node"]: "orphan",
        actors.ENV["parent"]: "ghost",
        actors.ENV["parent_endpoint"]: "ipc:///nonexistent/zerotrain-ghost",
        actors.ENV["directory"]: "",
        actors.ENV["heartbeat"]: "0.1,0.5",
        actors.ENV["rank"]: "",
    }
    with trio.fail_after(LIMIT):
        result = await trio.run_process([sys.executable, WORKER], env=env, check=False)
    assert result.returncode == 0


def test_child_node_outside_a_supervised_process_says_what_to_use():
    async def main():
        async with actors.child_node():
            pass

    for name in ("node", "parent"):
        os.environ.pop(actors.ENV[name], None)
    with pytest.raises(RuntimeError, match="open_node"):
        trio.run(main)


async def test_a_process_child_outlives_the_idle_threads_of_its_parent():
    """The child's parent-death signal is tied to the thread that forked it: a child
    forked in one of trio's cached worker threads would be SIGKILLed when that thread
    retires after 10 s idle. It is forked in the trio thread, which outlives it."""
    async with supervised(worker_spec("w1")):
        before = await child("ranks", "w1")
        await trio.sleep(12)  # past trio's worker-thread idle timeout (10 s)
        after = await child("ranks", "w1")
        assert (after.pid, after.restarts) == (before.pid, 0)
        assert await actors.call("Echo@w1", ("echo", 4)) == 4


def test_a_child_dies_with_its_parent_however_the_parent_dies():
    """kill -9 of the parent: the child, armed with PR_SET_PDEATHSIG, goes at once (not
    after its heartbeat timeout, here 60 s)."""
    script = f"""
import os, sys, trio, actors
sys.path.insert(0, {os.path.dirname(WORKER)!r})
async def main():
    async with actors.open_node("test", heartbeat_interval=0.1, heartbeat_timeout=60):
        spec = actors.process_spec("w1", [sys.executable, {WORKER!r}], wait_for=["Echo"])
        async with trio.open_nursery() as nursery:
            await nursery.start(actors.Supervisor([spec], name="ranks").run)
            info, = await actors.which_children("ranks")
            print(info.pid, flush=True)
            await trio.sleep_forever()
trio.run(main)
"""
    import subprocess
    import time

    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert alive(pid)
        parent.kill()
        parent.wait(LIMIT)
        deadline = time.monotonic() + 0.5
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(f"/proc/{pid}/stat") if alive(pid) else open(os.devnull) as f:
            state = f.read().rpartition(")")[2].split()[:1]
        assert state in ([], ["Z"]), f"the child {pid} outlived its parent ({state})"
    finally:
        parent.kill()
        parent.wait()
