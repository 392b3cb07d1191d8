"""Helpers shared by several test files: import them as
`from tests.actors.actor_util import Watcher` (a conftest is not importable under
--import-mode=importlib, and these are classes and async functions, not fixtures)."""

import trio

import actors


class Watcher(actors.Actor):
    """Monitors and links on request and keeps every message it gets.

    Calls: ("monitor", target) -> MonitorRef, ("demonitor", ref), ("link", target),
    ("unlink", target). `events` holds what came to handle_info (Down, and Exit when
    trapping) in order; `got` is set at the first.
    """

    trap_exits = False

    async def init(self):
        self.events = []
        self.got = trio.Event()

    async def handle_call(self, request, from_):
        kind, target = request
        if kind == "monitor":
            return actors.monitor(target)
        if kind == "demonitor":
            actors.demonitor(target)
        elif kind == "link":
            actors.link(target)
        elif kind == "unlink":
            actors.unlink(target)
        else:
            raise AssertionError(request)
        return None

    async def handle_info(self, msg):
        self.events.append(msg)
        self.got.set()


class TrappingWatcher(Watcher):
    """A Watcher that traps exits: a linked actor's crash comes as an Exit message."""

    trap_exits = True


async def child(supervisor, id):
    """The ChildInfo of child `id` of the registered `supervisor`."""
    return {c.id: c for c in await actors.which_children(supervisor)}[id]


async def wait_restarted(supervisor, id, restarts=1):
    """Poll until child `id` of `supervisor` has been restarted `restarts` times and runs
    again; its ChildInfo. Bound the wait with the test's own fail_after."""
    while (info := await child(supervisor, id)).restarts < restarts or info.state != "running":
        await trio.sleep(0.05)
    return info
