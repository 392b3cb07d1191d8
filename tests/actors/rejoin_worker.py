"""One rank process for tests/actors/test_ring_rejoin.py (spawned, never forked).

    python rejoin_worker.py RANK WORLD DIR GENERATION --wire W   # W: lanes or frames

Builds ``Ring(RANK, WORLD, ..., generation=GENERATION)`` over ``DIR/rank-<r>`` and then
obeys one command per line on stdin, answering one line on stdout each:

    loop            all-reduce a large array until a CollectiveError; "ready" after the
                    first one, then "error <monotonic time> <message>"
    reduce          one all-reduce of the large array: "ok" or "error <time> <message>"
    check G OUT     set_generation(G) unless already there, then all_reduce,
                    reduce_scatter and all_gather of integer-valued inputs (exact in any
                    order); save inputs and results to OUT: "checked"
    exit            close the ring and exit

A replacement rank is this same program started with the next generation: it joins
the ring by binding the endpoint of the rank it replaces.
"""

import os
import sys
import time

import numpy as np
import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from actors._collectives import CollectiveError, Ring, shard_bounds  # noqa: E402
from actors._transport import ipc_endpoint  # noqa: E402

LARGE = 1 << 22  # float32 elements (16 MiB): many chunks in flight when a rank dies
CHECK_SIZES = [30_011, 7]  # not divisible by the world size
TIMEOUT = 120.0  # the no-progress timeout; failures must be noticed long before it


def check_inputs(rank: int, n: int) -> np.ndarray:
    return np.random.default_rng([rank, n]).integers(-1000, 1000, n).astype(np.float32)


def say(*words) -> None:
    print(*words, flush=True)


def error_line(exc: CollectiveError) -> str:
    return f"error {time.monotonic():.6f} {str(exc).replace(chr(10), ' ')}"


async def run_check(ring: Ring, generation: int, out: str) -> None:
    if generation > ring.generation:
        ring.set_generation(generation)
    results = {}
    step = 1000
    for n in CHECK_SIZES:
        x = check_inputs(ring.rank, n)
        results[f"input/{n}"] = x
        step += 1
        results[f"all_reduce/{n}"] = (await ring.all_reduce(x.copy(), step=step)).copy()
        step += 1
        results[f"reduce_scatter/{n}"] = (await ring.reduce_scatter(x.copy(), step=step)).copy()
        gathered = np.full(n, np.nan, np.float32)
        start, stop = shard_bounds(n, ring.world, ring.rank)
        gathered[start:stop] = x[start:stop]
        step += 1
        results[f"all_gather/{n}"] = (await ring.all_gather(gathered, step=step)).copy()
    results["stale_discarded"] = np.array(ring.stats()["stale_discarded"])
    np.savez(out, **results)


async def serve(ring: Ring) -> None:
    x = np.ones(LARGE, np.float32)
    step = 0
    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline)
        command = line.split()
        if not command or command[0] == "exit":
            return
        try:
            if command[0] == "loop":
                while True:
                    step += 1
                    await ring.all_reduce(x, step=step)
                    x.fill(1.0)
                    if step == 1:
                        say("ready")
            elif command[0] == "reduce":
                step += 1
                await ring.all_reduce(x, step=step)
                x.fill(1.0)
                say("ok")
            elif command[0] == "check":
                await run_check(ring, int(command[1]), command[2])
                say("checked")
            else:
                raise SystemExit(f"unknown command {line!r}")
        except CollectiveError as exc:
            x.fill(1.0)
            say(error_line(exc))


def main() -> None:
    *args, option, wire = sys.argv[1:]
    assert option == "--wire" and wire in ("lanes", "frames"), sys.argv
    rank, world, directory, generation = int(args[0]), int(args[1]), args[2], int(args[3])
    endpoints = [ipc_endpoint(f"rank-{r}", directory) for r in range(world)]
    lanes = wire == "lanes"

    async def run():
        options = dict(generation=generation, timeout=TIMEOUT, lanes=lanes)
        with Ring(rank, world, endpoints, **options) as ring:
            await serve(ring)

    trio.run(run)


if __name__ == "__main__":
    main()
