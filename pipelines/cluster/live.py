"""Live control of a running cluster run from outside it: a remote call to its Coordinator.

A run's cluster node binds in the run's 0700 ipc directory and admits only nodes that
present the run's token (actors._admission), which the run writes to ``<ipc dir>/token``
(0600); the run dir's plan.json names the ipc directory. So a process of the run's user
-- the daemon, a test, a tool -- opens a node of its own in that directory with that
token and calls ``Coordinator@cluster`` with one of the records of
pipelines.cluster.messages (RunStatus, CheckpointNow, SetOverride), as a rank would. No
second protocol, and a process without the token gets no connection at all.

:func:`call_run` is synchronous (its own ``trio.run``, so any thread may use it, and a
process may control several runs at once: each call is a node of its own).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import trio

import actors

from . import messages as msg
from .main import TOKEN_FILE

__all__ = ["LiveError", "call_run", "run_endpoint"]

_CALLS = itertools.count(1)


class LiveError(RuntimeError):
    """The run cannot be reached or did not answer; one line saying why."""


def run_endpoint(run_dir) -> tuple[str, str]:
    """(ipc dir, token) of the run training in `run_dir`; LiveError when it is not a
    running cluster run of this user."""
    run_dir = Path(run_dir)
    try:
        plan = json.loads((run_dir / "plan.json").read_text())
    except (OSError, ValueError):
        raise LiveError(
            f"{run_dir} has no readable plan.json: not a cluster run that trains now "
            "(a --ranks 1 run has no control channel)"
        ) from None
    ipc_dir = plan.get("ipc_dir") if isinstance(plan, dict) else None
    if not isinstance(ipc_dir, str) or not os.path.isdir(ipc_dir):
        raise LiveError(f"the run in {run_dir} is not running (its ipc directory is gone)")
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
    ipc_dir, token = run_endpoint(run_dir)
    return trio.run(_call, ipc_dir, token, request, timeout)


async def _call(ipc_dir: str, token: str, request, timeout: float) -> dict:
    name = f"control-{os.getpid()}-{next(_CALLS)}"  # one node per call, named apart
    failure = None
    async with actors.open_node(name, directory=ipc_dir, token=token):
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
