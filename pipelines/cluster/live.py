"""Live control of a running cluster run from outside it: a remote call to its Coordinator.

A run's cluster node binds in the run's 0700 ipc directory and admits only nodes that
present the run's token (actors._admission), which the run writes to ``<ipc dir>/token``
(0600); the run dir's plan.json names the ipc directory. So a process of the run's user
-- the daemon, a test, a tool -- opens a node of its own in that directory with that
token and calls ``Coordinator@cluster`` with one of the records of
pipelines.cluster.messages (RunStatus, CheckpointNow, SetOverride), as a rank would. No
second protocol, and a process without the token gets no connection at all.

A multi-node run (pipelines.cluster.nodes) has its Coordinator on node 0, whose node
binds the master endpoint (tcp) rather than the ipc directory; each agent's plan.json
names it ("control": the master endpoint, where a tool on that host binds its own node
so that node 0 can answer, and the host's keys if the run has them). So a run dir of
any node reaches the one Coordinator: DIR (node 0's, or every node's on a shared
filesystem) or DIR/node-K, and DIR when it holds only DIR/node-K (node K's host
without a shared filesystem). Admission there is the run's: with keys, the tool
presents its host's key (pipelines.launch.curve.node_keyring names it
"control<K>-..."), without keys the run is a loopback test mode that admits anyone.

:func:`call_run` is synchronous (its own ``trio.run``, so any thread may use it, and a
process may control several runs at once: each call is a node of its own).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
from pathlib import Path

import trio

import actors

from . import messages as msg
from .main import TOKEN_FILE

__all__ = ["LiveError", "call_run", "run_endpoint"]

_CALLS = itertools.count(1)


class LiveError(RuntimeError):
    """The run cannot be reached or did not answer; one line saying why."""


def _plan(run_dir: Path) -> dict:
    """The plan.json of the run in `run_dir` (or of the one node-K dir in it), while it
    runs; LiveError when it is not a running cluster run of this user."""
    path = run_dir / "plan.json"
    if not path.exists():
        agents = sorted(run_dir.glob("node-*/plan.json"))
        if len(agents) == 1:  # node K's host, no shared filesystem: DIR/node-K only
            path = agents[0]
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError):
        raise LiveError(
            f"{run_dir} has no readable plan.json: not a cluster run that trains now "
            "(a --ranks 1 run has no control channel)"
        ) from None
    ipc_dir = plan.get("ipc_dir") if isinstance(plan, dict) else None
    if not isinstance(ipc_dir, str) or not os.path.isdir(ipc_dir):
        raise LiveError(f"the run in {run_dir} is not running (its ipc directory is gone)")
    return plan


def run_endpoint(run_dir) -> tuple[str, str]:
    """(ipc dir, token) of the one-host run training in `run_dir`; LiveError when it is
    not a running cluster run of this user."""
    ipc_dir = _plan(Path(run_dir))["ipc_dir"]
    try:
        token = (Path(ipc_dir) / TOKEN_FILE).read_text().strip()
    except OSError as err:
        raise LiveError(f"cannot read the run's token in {ipc_dir}: {err.strerror}") from None
    return ipc_dir, token


def call_run(run_dir, request, *, timeout: float = 120.0) -> dict:
    """Send `request` (a RunStatus, CheckpointNow or SetOverride record) to the
    Coordinator of the run in `run_dir`; its answer (a dict, ``{"error": line}`` when the
    run refused). LiveError when the run cannot be reached or does not answer within
    `timeout` seconds."""
    control = _plan(Path(run_dir)).get("control")
    if control is None:  # one host: the cluster node in the run's ipc directory
        ipc_dir, token = run_endpoint(run_dir)
        options = {"directory": ipc_dir, "token": token}
        name = f"control-{os.getpid()}-{next(_CALLS)}"  # one node per call, named apart
        return trio.run(_call, name, options, request, timeout)
    name = f"control{control['node']}-{os.getpid()}-{next(_CALLS)}"
    options = {"endpoint": control["bind"], "peers": {"cluster": control["master"]}}
    spec = control.get("keys")
    if not spec:  # a loopback test mode: plaintext tcp
        return trio.run(_call, name, options, request, timeout)
    with _KEYRINGS.using(json.dumps(spec, sort_keys=True), lambda: _keyring(spec)):
        return trio.run(_call, name, options, request, timeout)  # over CURVE, as this host


class _Keyrings:
    """The process's tcp keyring (actors.secure_tcp: one for every socket the process
    opens) for calls running at once in several threads: calls under the same keys
    share it; a call under other keys waits until none is left, since a socket opened
    under the wrong host's key is refused by the run ("host node1's key sent as
    'control0-...'")."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._installed: str | None = None
        self._users = 0
        self._previous = None

    @contextlib.contextmanager
    def using(self, which: str, make):
        keyring = make()  # (LiveError before anything is installed)
        with self._cond:
            self._cond.wait_for(lambda: self._users == 0 or self._installed == which)
            if self._users == 0:
                self._previous = actors.secure_tcp(keyring)
                self._installed = which
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                if self._users == 0:
                    actors.secure_tcp(self._previous)
                    self._installed = None
                    self._cond.notify_all()


_KEYRINGS = _Keyrings()


def _keyring(spec: dict | None):
    """This host's keyring in a multi-node run with keys (None without)."""
    if not spec:
        return None
    from ..launch import KeysError, load_keys
    from ..launch.curve import node_keyring

    try:
        keys = load_keys(spec["dir"])
        return node_keyring(keys, spec["node"], spec["nnodes"], spec["ranks_per_node"],
                            spec["run_id"])  # fmt: skip
    except KeysError as err:
        raise LiveError(f"the run's keys cannot be used here: {err}") from None


# The tool's node takes the run for lost only after this long without its heartbeats: a
# loaded machine's late heartbeat is no lost run (the call's own timeout bounds it all).
_HEARTBEAT_TIMEOUT = 10.0


async def _call(name: str, options: dict, request, timeout: float) -> dict:
    failure = None
    async with actors.open_node(name, heartbeat_timeout=_HEARTBEAT_TIMEOUT, **options):
        try:  # inside the node: its nursery would wrap the error in a group
            reply = await actors.call(msg.COORDINATOR, request, timeout)
        except actors.CallTimeout:
            failure = f"the run did not answer within {timeout:g}s"
        except actors.ActorError as err:
            failure = f"the run cannot be reached: {str(err).splitlines()[0]}"
    if failure is not None:
        raise LiveError(failure)
    if isinstance(reply, msg.Rejected):
        raise LiveError(f"the run refused the request: {reply.reason}")
    if not isinstance(reply, dict):
        raise LiveError(f"the run answered {type(reply).__name__}, not a dict")
    return reply
