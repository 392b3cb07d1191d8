"""OS processes as supervised children -- and the small API the child process uses.

A crash and its restart
-----------------------
::

    # parent (the `zerotrain` process)
    async with actors.open_node("cluster") as node:
        ranks = [
            actors.process_spec(f"rank{r}", [sys.executable, "-m", "app.rank", str(r)],
                                wait_for=["Optimizer"], rank=r)
            for r in range(4)
        ]
        await actors.Supervisor(ranks, strategy="one_for_one").run()

    # child (pipelines/rank.py)
    async def main():
        async with actors.child_node() as node:          # node "rank2", parent "cluster"
            await actors.Supervisor([Optimizer.child_spec(name="Optimizer"), ...]).run()

``kill -9`` rank2's pid: the parent sees the exit at once (``ProcessExit: killed by
SIGKILL``), its supervisor logs one line and starts a fresh interpreter; callers of
``"Optimizer@rank2"`` get ``ActorExited(reason="noconnection")`` meanwhile.
``kill -STOP`` it instead: its heartbeats stop, and ``heartbeat_timeout`` later the
parent declares it lost, SIGKILLs it and restarts it the same way.

The parent side
---------------
:func:`process_spec` builds a child spec. Starting it spawns a fresh interpreter from
``argv`` (never a fork of the running parent: a forked zmq context is unusable; a
``spawner`` may hand the start to a process forked before any context existed) with the
environment below; the child counts as started when its node's first heartbeat reaches
the parent's node, carrying every name in ``wait_for``. It then crashes -- for its
supervisor to handle -- when the process exits with a non-zero status or a signal
(:class:`ProcessExit`), or when its heartbeats stop for ``heartbeat_timeout`` (it is
SIGKILLed first). Exit status 0 is a normal exit. Stopping it sends SIGTERM, waits the
spec's ``shutdown`` seconds, then SIGKILLs it. The parent needs a node (:func:`open_node`).

The child side
--------------
:func:`child_node` reads the environment, opens the child's node, connects to the
parent and heart-beats it from the trio loop (a blocked or stopped loop is detected).
Actors registered in the child are served to remote callers by that node. The block
is cancelled -- and the process can exit 0 -- on SIGTERM, or when the parent has been
silent for the heartbeat timeout (an orphan does not linger). A parent that dies takes
its children with it at once: the child arms PR_SET_PDEATHSIG (SIGKILL) when it opens
its node, so a child of a kill -9'd parent writes nothing more.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from . import _registry
from ._errors import ProcessExit
from ._node import Node, open_node
from ._registry import check_name
from ._spec import ChildSpec

__all__ = ["ENV", "ProcessChild", "child_node", "process_spec"]

log = logging.getLogger("zerotrain.actors.process")

ENV = {
    "node": "ZEROTRAIN_NODE",  # the child's node name
    "parent": "ZEROTRAIN_PARENT",  # the parent's node name
    "parent_endpoint": "ZEROTRAIN_PARENT_ENDPOINT",
    "directory": "ZEROTRAIN_IPC_DIR",  # shared ipc directory ("" if none)
    "endpoint": "ZEROTRAIN_ENDPOINT",  # where the child binds ("": in the directory)
    "heartbeat": "ZEROTRAIN_HEARTBEAT",  # "<interval>,<timeout>" in seconds
    "rank": "ZEROTRAIN_RANK",  # "" if none
    "parent_pid": "ZEROTRAIN_PARENT_PID",  # the process that started the child
    "token": "ZEROTRAIN_TOKEN",  # the parent node's token, hex ("" if none): actors._admission
}
"""Environment variables a supervised process child is started with."""


Spawner = Callable[..., Any]
"""``spawner(argv, env, cwd, pass_fds, output, block_signals)``: start the child some
other way than a fresh ``Popen(argv)`` -- e.g. hand the job to a process forked earlier
that has already imported what ``argv`` would import -- and return a handle with
``pid``, ``returncode``, ``poll()`` and ``send_signal(sig)`` (as ``subprocess.Popen``
has) for a direct child of this process; or None to start ``argv`` the usual way. It
is called on the trio thread and must not block."""


class _Spawned:
    """A child process started from the thread that runs the trio loop.

    The child arms PR_SET_PDEATHSIG (:func:`die_with_parent`), and Linux sends that
    signal when the *thread* that forked the child exits, not the process.
    ``trio.lowlevel.open_process`` forks in a worker thread of trio's cache, which exits
    after 10 s idle and would take every child with it; the trio thread lives as long as
    the supervisor that owns the children, so the fork happens there (``Popen`` uses
    vfork/posix_spawn: it blocks the loop for about a millisecond). Exit is awaited on a
    pidfd, as trio does.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        cwd: str | None,
        pass_fds: Sequence[int],
        output: int | None,
        block_signals: Sequence[int] = (),
        spawner: Spawner | None = None,
    ) -> None:
        started = None
        if spawner is not None:
            started = spawner(argv, env, cwd, tuple(pass_fds), output, tuple(block_signals))
        if started is not None:
            self._popen = started
            self._pidfd: int | None = os.pidfd_open(started.pid)
            self._waiting = False
            return
        # a blocked signal mask is inherited through fork and exec: blocked here for the
        # fork, the signals stay pending in the child until it unblocks them (once it
        # handles them) -- none kills it while it starts, none is lost
        if block_signals:
            before = signal.pthread_sigmask(signal.SIG_BLOCK, block_signals)
        try:
            self._popen = subprocess.Popen(
                argv, env=env, cwd=cwd, pass_fds=tuple(pass_fds), stdout=output, stderr=output
            )
        finally:
            if block_signals:
                signal.pthread_sigmask(signal.SIG_SETMASK, before)
        self._pidfd: int | None = os.pidfd_open(self._popen.pid)
        self._waiting = False

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        # one waiter at a time on the pidfd (trio refuses two); a second one polls
        while self._popen.poll() is None:
            if self._waiting or self._pidfd is None:
                await trio.sleep(0.01)
                continue
            self._waiting = True
            try:
                await trio.lowlevel.wait_readable(self._pidfd)
            finally:
                self._waiting = False
        if self._pidfd is not None and not self._waiting:
            os.close(self._pidfd)
            self._pidfd = None
        return self._popen.returncode

    def send_signal(self, sig: int) -> None:
        if self._popen.poll() is None:  # never signal a reaped (perhaps reused) pid
            self._popen.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclasses.dataclass
class _ProcessHandle:
    """What the supervisor holds for a running process child."""

    process: _Spawned
    node: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def request_stop(self, reason: Any = "shutdown") -> None:
        """Graceful stop: SIGTERM (the supervisor SIGKILLs after the shutdown timeout)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)


class ProcessChild:
    """One supervised OS process (see the module doc); build it with :func:`process_spec`."""

    def __init__(
        self,
        node: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        wait_for: Sequence[str] = (),
        start_timeout: float = 30.0,
        rank: int | None = None,
        endpoint: str | None = None,
        pass_fds: Sequence[int] = (),
        output: int | None = None,
        block_signals: Sequence[int] = (),
        spawner: Spawner | None = None,
    ) -> None:
        self.node = check_name(node, "node name")
        self.spawner = spawner
        self.pass_fds = tuple(pass_fds)
        self.output = output
        self.block_signals = tuple(block_signals)
        self.endpoint = endpoint
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"argv must be a non-empty list of strings, got {argv!r}")
        self.argv = list(argv)
        self.env = dict(env or {})
        self.cwd = cwd
        self.wait_for = tuple(wait_for)
        self.start_timeout = start_timeout
        self.rank = rank

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> str:
        parent: Node = _registry.current_node()
        env = {**os.environ, **self.env, **self._child_env(parent)}
        known = parent.peer_info(self.node)
        previous = known.generation if known else None
        process = _Spawned(
            self.argv,
            env,
            self.cwd,
            self.pass_fds,
            self.output,
            self.block_signals,
            self.spawner,
        )
        handle = _ProcessHandle(process, self.node)
        what = f"{self.node} (pid {process.pid})"
        try:
            first = None
            with trio.move_on_after(self.start_timeout):
                first = await _first(
                    up=lambda: parent.wait_peer(
                        self.node, newer_than=previous, names=self.wait_for
                    ),
                    exit=process.wait,
                )
            if first is None:
                names = f" with {', '.join(self.wait_for)} registered" if self.wait_for else ""
                raise ProcessExit(f"{what} did not come up within {self.start_timeout:g}s{names}")
            if first == "exit":
                raise ProcessExit(f"{what} {_describe(process.returncode)} while starting")
            task_status.started(handle)
            log.info("[process %s] started pid %d", self.node, process.pid)
            first = await _first(
                exit=process.wait,
                lost=lambda: parent.wait_peer(self.node, alive=False),
            )
            if first == "lost":
                raise ProcessExit(
                    f"{what} sent no heartbeat for {parent.heartbeat_timeout:g}s; killed"
                )
            if process.returncode != 0:
                raise ProcessExit(f"{what} {_describe(process.returncode)}")
            return "normal"
        finally:
            if process.returncode is None:
                process.kill()  # SIGKILL: lost, cancelled (killed), or failed to start
            with trio.CancelScope(shield=True):
                await process.wait()
            parent.peer_exited(self.node)

    def _child_env(self, parent: Node) -> dict[str, str]:
        return {
            ENV["node"]: self.node,
            ENV["parent"]: parent.name,
            ENV["parent_endpoint"]: parent.endpoint,
            ENV["directory"]: parent.directory or "",
            ENV["heartbeat"]: f"{parent.heartbeat_interval!r},{parent.heartbeat_timeout!r}",
            ENV["rank"]: "" if self.rank is None else str(self.rank),
            ENV["endpoint"]: self.endpoint or "",
            ENV["parent_pid"]: str(os.getpid()),
            ENV["token"]: (parent.token or b"").hex(),
        }


def process_spec(
    node: str,
    argv: Sequence[str],
    *,
    id: Any = None,
    restart: str = "permanent",
    shutdown: float | str = 5.0,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    wait_for: Sequence[str] = (),
    start_timeout: float = 30.0,
    rank: int | None = None,
    endpoint: str | None = None,
    pass_fds: Sequence[int] = (),
    output: int | None = None,
    block_signals: Sequence[int] = (),
    spawner: Spawner | None = None,
) -> ChildSpec:
    """A child spec running ``argv`` as an OS process whose node is named ``node``.

    ``wait_for``: actor names the child must have registered before it counts as
    started (so the next child, or a caller, can rely on them). ``shutdown``: seconds
    between SIGTERM and SIGKILL. ``endpoint``: where the child's node binds (e.g.
    ``"tcp://127.0.0.1:*"``); default: ``<name>`` in the parent's ipc directory.
    ``pass_fds``: file descriptors the child inherits (same numbers; all others close).
    ``output``: a file descriptor for the child's stdout and stderr (default: the
    parent's). ``block_signals``: signals the child starts with blocked (pending, not
    lost) -- it unblocks them once it handles them (``signal.pthread_sigmask``).
    ``spawner``: tried first at every start (see :data:`Spawner`); None from it, or no
    spawner, starts ``argv`` with ``Popen``. Liveness uses the parent node's heartbeat settings.
    """
    child = ProcessChild(
        node,
        argv,
        env=env,
        cwd=cwd,
        wait_for=wait_for,
        start_timeout=start_timeout,
        rank=rank,
        endpoint=endpoint,
        pass_fds=pass_fds,
        output=output,
        block_signals=block_signals,
        spawner=spawner,
    )
    return ChildSpec(
        id=node if id is None else id, start=child.run, restart=restart, shutdown=shutdown
    )


def _describe(returncode: int | None) -> str:
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


async def _first(**branches: Callable[[], Awaitable[Any]]) -> str:
    """Run the branches concurrently; return the name of the first to finish."""
    winner: list[str] = []
    async with trio.open_nursery() as nursery:
        for name, fn in branches.items():

            async def run(name: str = name, fn: Callable[[], Awaitable[Any]] = fn) -> None:
                await fn()
                if not winner:
                    winner.append(name)
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
    return winner[0]


# =====================================================================================
# The child side
# =====================================================================================


@asynccontextmanager
async def child_node(*, handle_sigterm: bool = True, **node_options: Any) -> AsyncIterator[Node]:
    """Open this process's node as a supervised child (see the module doc).

    The block is cancelled on SIGTERM (``handle_sigterm``) or when the parent is gone;
    leaving it normally afterwards lets the process exit with status 0. Extra keyword
    arguments go to :func:`open_node`. Raises RuntimeError outside a process started by
    :func:`process_spec`.
    """
    env = os.environ
    if ENV["node"] not in env or ENV["parent"] not in env:
        raise RuntimeError(
            f"child_node() runs in a process started by actors.process_spec ({ENV['node']} "
            "is not set); a stand-alone process opens its node with actors.open_node()"
        )
    _die_with_parent()
    parent = env[ENV["parent"]]
    interval, timeout = (float(x) for x in env[ENV["heartbeat"]].split(","))
    options = {
        "directory": env.get(ENV["directory"]) or None,
        "endpoint": env.get(ENV["endpoint"]) or None,
        "peers": {parent: env[ENV["parent_endpoint"]]},
        "heartbeat_interval": interval,
        "heartbeat_timeout": timeout,
        "rank": int(env[ENV["rank"]]) if env.get(ENV["rank"]) else None,
        "token": bytes.fromhex(env.get(ENV["token"], "")) or None,
        **node_options,
    }
    async with open_node(env[ENV["node"]], **options) as node:
        node.connect(parent)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_exit_when_parent_is_gone, node, parent, nursery.cancel_scope)
            if handle_sigterm:
                nursery.start_soon(_exit_on_sigterm, node, nursery.cancel_scope)
            yield node
            nursery.cancel_scope.cancel()


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the process that started it dies.

    A process started by :func:`process_spec` calls this first thing (``child_node``
    does): then no child outlives its parent, however the parent died (kill -9
    included), and a child of a dead parent writes nothing more. If the parent died
    before the signal was armed, this process exits at once (status 1). Outside such a
    process (no ``ZEROTRAIN_PARENT_PID``) it does nothing.
    """
    expected = os.environ.get(ENV["parent_pid"])
    if not expected:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != int(expected):  # the parent died before the signal was armed
        os._exit(1)


async def _exit_when_parent_is_gone(node: Node, parent: str, scope: trio.CancelScope) -> None:
    await node.wait_peer(parent, alive=False)
    log.warning("[node %s] parent %s is gone: exiting", node.name, parent)
    scope.cancel()


async def _exit_on_sigterm(node: Node, scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            log.info("[node %s] SIGTERM: shutting down", node.name)
            scope.cancel()
            return
