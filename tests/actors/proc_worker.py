"""A rank-like process for the actor tests: started by actors.process_spec, it serves an
``Echo`` actor, and a ``Gate`` that holds and releases Echo, under a supervisor. Run
only as a supervised child.
PROC_WORKER_IGNORE_SIGTERM=1 makes it ignore SIGTERM (to test the SIGKILL fallback)."""

import collections
import logging
import os
import signal
import sys
import time

import numpy as np
import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import actors  # noqa: E402

NODE = []  # this process's node, once open
HOLDS: dict[str, trio.Event] = {}  # Echo's ("hold", key) waits until Gate releases key


class Echo(actors.Actor):
    """Answers test requests; records the Down messages it gets."""

    async def init(self):
        self.casts = 0
        self.cast_log = collections.deque(maxlen=1000)  # the latest casts, in arrival order
        self.downs = []

    async def handle_call(self, request, from_):
        match request:
            case ("echo", value):
                return value
            case ("double", array):
                return array * 2
            case ("zeros", n):
                return np.zeros(n, np.float32)
            case ("range", n):
                return list(range(n))
            case ("crash", text):
                raise RuntimeError(text)
            case ("sleep", seconds):
                await trio.sleep(seconds)
                return "slept"
            case ("hold", key):
                await HOLDS.setdefault(key, trio.Event()).wait()
                return "released"
            case ("block", seconds):
                time.sleep(seconds)  # blocks the whole trio loop: heartbeats stop too
                return "blocked"
            case ("call", target, inner):
                return await actors.call(target, inner)
            case ("cast", target, msg):
                await actors.cast(target, msg)
                return None
            case ("node_stats",):
                return NODE[0].statistics()
            case ("monitor", target):
                actors.monitor(target)
                return None
            case ("downs",):
                return [(down.target, actors.format_reason(down.reason)) for down in self.downs]
            case ("bump",):  # a request with a side effect
                self.casts += 1
                return self.casts
            case ("casts",):
                return self.casts
            case ("cast_log",):
                return list(self.cast_log)
            case ("pid",):
                return os.getpid()
        raise ValueError(f"unknown request {request!r}")

    async def handle_cast(self, msg):
        self.casts += 1
        self.cast_log.append(msg)

    async def handle_info(self, msg):
        if isinstance(msg, actors.Down):
            self.downs.append(msg)


class Gate(actors.Actor):
    """Holds Echo from outside its mailbox: while Echo waits in ("hold", key), a test can
    fill Echo's mailbox, look at this process's node through Gate, and release Echo."""

    async def handle_call(self, request, from_):
        match request:
            case ("holding", key):
                return key in HOLDS
            case ("release", key):
                HOLDS[key].set()
                return None
            case ("node_stats",):
                return NODE[0].statistics()
        raise ValueError(f"unknown request {request!r}")


async def main():
    stubborn = os.environ.get("PROC_WORKER_IGNORE_SIGTERM") == "1"
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    async with actors.child_node(handle_sigterm=not stubborn) as node:
        NODE.append(node)
        children = [Echo.child_spec(name="Echo"), Gate.child_spec(name="Gate")]
        await actors.Supervisor(children, max_restarts=100).run()


if __name__ == "__main__":
    level = os.environ.get("PROC_WORKER_LOG", "WARNING")
    logging.basicConfig(level=level, format="%(relativeCreated)6d %(name)s %(message)s")
    trio.run(main)
